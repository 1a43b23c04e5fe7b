//! What a member of a replicated metaserver group needs of its namespace: applying a client's
//! change exactly once, records of the replication's own beside the namespace (in the same
//! transactions), and the whole store as a snapshot.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{dec, enc, Change, Namespace, Outcome};
use crate::shared::db::{DbError, Entry, Read, Writer};
use crate::shared::{FsError, FsResult};

/// A client's last request, as the sessions table keeps it, and when it was applied.
#[derive(Serialize, Deserialize)]
struct Session {
    seq: u64,
    reply: Result<Outcome, FsError>,
    at: i64,
}

/// A last request as stores made before it had a time kept it: read as applied at time 0.
#[derive(Deserialize)]
struct SessionWithoutTime {
    seq: u64,
    reply: Result<Outcome, FsError>,
}

fn dec_session(b: &[u8]) -> FsResult<Session> {
    match postcard::from_bytes::<Session>(b) {
        Ok(s) => Ok(s),
        Err(postcard::Error::DeserializeUnexpectedEnd) => {
            let o: SessionWithoutTime = dec(b)?;
            Ok(Session { seq: o.seq, reply: o.reply, at: 0 })
        }
        Err(e) => Err(FsError::Io(format!("corrupt metadata record: {e}"))),
    }
}

/// Every table's entries, in a fixed order.
#[derive(Serialize, Deserialize)]
struct Dump {
    tables: Vec<Vec<Entry>>,
}

/// Prefix of the replication's own records in the meta table (never a namespace key).
const RECORD: &[u8] = b"replica/";
/// The record of the last change's stamp (see `Namespace::stamp_in`).
const STAMP: &str = "stamp";

impl Namespace {
    /// Runs `f` in a durable write transaction of the namespace's store.
    /// Lock requests waiting to be granted watch [`Namespace::epoch`], bumped after the commit.
    pub(crate) fn write<T, E: From<DbError>>(&self, f: impl FnOnce(&mut Writer) -> Result<T, E>) -> Result<T, E> {
        let r = self.db.write(f);
        self.epoch.send_modify(|e| *e += 1);
        r
    }

    /// A receiver that sees every committed change (for waiting until a lock is granted).
    pub fn epoch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Applies request `seq` of `client` once: a retry of the client's last request (the same
    /// `seq`, resent after a lost answer or a failover) gets the answer it got then, without being
    /// applied again. A change that fails leaves the namespace as it was and its error is the
    /// answer. The outer error is the store's own failure.
    pub(crate) fn apply_once_in(
        &self,
        w: &mut Writer,
        (client, seq): (u64, u64),
        now: i64,
        change: &Change,
    ) -> FsResult<Result<Outcome, FsError>> {
        let key = client.to_be_bytes();
        if let Some(last) = w.get(self.sessions, &key)?.map(dec_session).transpose()? {
            if seq == last.seq {
                return Ok(last.reply);
            }
            if seq < last.seq {
                return Ok(Err(FsError::Invalid(format!(
                    "request {seq} of client {client:#x} comes after its request {}",
                    last.seq
                ))));
            }
        }
        let reply = self.answer_in(w, change, now)?;
        w.put(self.sessions, &key, &enc(&Session { seq, reply: reply.clone(), at: now })?)?;
        Ok(reply)
    }

    /// Applies `change` in a transaction nested in `w`: a change that fails leaves the namespace
    /// as it was and its error is the answer. A failure of this disk (no room for LMDB's spill, a
    /// read error) is no answer: recorded, it would stand for the change here while the other
    /// members of a group applied it, or a replay after a restart did. It is the outer error, and
    /// the whole transaction fails.
    pub(crate) fn answer_in(&self, w: &mut Writer, change: &Change, now: i64) -> FsResult<Result<Outcome, FsError>> {
        let reply = w.nested(|n| self.apply_in(n, change, now));
        if w.store_failed() {
            return Err(reply.err().unwrap_or_else(|| FsError::Io("the store failed applying a change".into())));
        }
        Ok(reply)
    }

    /// Whether request `seq` of `client` was applied and its answer is kept (a retry of it gets
    /// that answer, whatever would refuse a new request now).
    pub fn answered(&self, client: u64, seq: u64) -> FsResult<bool> {
        let last = self.db.read(|r| r.get(self.sessions, &client.to_be_bytes())?.map(dec_session).transpose())?;
        Ok(last.is_some_and(|l| l.seq == seq))
    }

    /// Forgets the last answers of clients that changed nothing since `before` (a client retrying
    /// for longer than that would have its change applied again). Returns how many went.
    pub(crate) fn forget_replies_in(&self, w: &mut Writer, before: i64) -> FsResult<u64> {
        let mut old = Vec::new();
        for (k, v) in w.all(self.sessions)? {
            if dec_session(&v)?.at < before {
                old.push(k);
            }
        }
        for k in &old {
            w.delete(self.sessions, k)?;
        }
        Ok(old.len() as u64)
    }

    /// The time a change applied in `w` takes: `now`, its own stamp, unless that is not after the
    /// last change's (a leader's clock behind the leader's before it, or a clock stepped back),
    /// then just after it. So stamps follow the order in which changes apply, whoever took them:
    /// the collector frees an orphan on reports stamped after its removal, and a report taken
    /// before the removal must not look taken after it. Applied the same on every member.
    pub(crate) fn stamp_in(&self, w: &mut Writer, now: i64) -> FsResult<i64> {
        let key = [RECORD, STAMP.as_bytes()].concat();
        let last: Option<i64> = w.get(self.meta, &key)?.map(postcard::from_bytes).transpose().map_err(dump_err)?;
        let now = match last {
            Some(last) if now <= last => last.saturating_add(1),
            _ => now,
        };
        w.put(self.meta, &key, &enc(&now)?)?;
        Ok(now)
    }

    /// Stores one of the replication's own records (e.g. the last applied log position) in `w`.
    pub(crate) fn put_record_in(&self, w: &mut Writer, name: &str, value: &impl Serialize) -> FsResult<()> {
        Ok(w.put(self.meta, &[RECORD, name.as_bytes()].concat(), &enc(value)?)?)
    }

    /// One of the replication's own records.
    pub(crate) fn record<T: DeserializeOwned>(&self, name: &str) -> FsResult<Option<T>> {
        let key = [RECORD, name.as_bytes()].concat();
        self.db.read(|r| r.get(self.meta, &key)?.map(|v| postcard::from_bytes(v)).transpose().map_err(dump_err))
    }

    /// One of the replication's own records as the last checkpoint holds it.
    pub(crate) fn checkpointed_record<T: DeserializeOwned>(&self, name: &str) -> FsResult<Option<T>> {
        let key = [RECORD, name.as_bytes()].concat();
        self.db.read_checkpointed(|r| {
            r.get(self.meta, &key)?.map(|v| postcard::from_bytes(v)).transpose().map_err(dump_err)
        })
    }

    fn tables(&self) -> [crate::shared::db::Table; 9] {
        [
            self.inodes,
            self.dirents,
            self.orphans,
            self.meta,
            self.sessions,
            self.clients,
            self.locks,
            self.waits,
            self.xattrs,
        ]
    }

    /// Makes the store's commits so far durable and the state a crash returns to (for a store
    /// opened with `Durability::Checkpointed`; nothing to do otherwise).
    pub(crate) fn checkpoint(&self) -> FsResult<()> {
        Ok(self.db.checkpoint()?)
    }

    /// The whole store (namespace, sessions and records), as of one read transaction: the last
    /// checkpoint's, so that a snapshot never holds what a crash could take back.
    pub(crate) fn dump(&self) -> FsResult<Dumped> {
        let tables =
            self.db.read_checkpointed(|r| self.tables().iter().map(|&t| r.all(t)).collect::<Result<Vec<_>, _>>())?;
        let records = tables[3].iter().filter(|(k, _)| k.starts_with(RECORD)).cloned().collect();
        Ok(Dumped { bytes: postcard::to_allocvec(&Dump { tables }).map_err(dump_err)?, records })
    }

    /// Replaces the whole store with a [`Namespace::dump`], inside `w`.
    pub(crate) fn restore_in(&self, w: &mut Writer, dump: &[u8]) -> FsResult<()> {
        let dump: Dump = postcard::from_bytes(dump).map_err(dump_err)?;
        // Snapshots made before sessions have the first five tables, and before extended
        // attributes the first eight; the others start empty.
        let n = self.tables().len();
        if dump.tables.len() != n && dump.tables.len() != 5 && dump.tables.len() != 8 {
            return Err(FsError::Io(format!("a snapshot of {} tables, expected {n}", dump.tables.len())));
        }
        let none = Vec::new();
        for (i, t) in self.tables().into_iter().enumerate() {
            w.clear(t)?;
            for (k, v) in dump.tables.get(i).unwrap_or(&none) {
                w.put(t, k, v)?;
            }
        }
        Ok(())
    }
}

/// A [`Namespace::dump`]: the bytes of a snapshot, and the records as of the same transaction.
pub(crate) struct Dumped {
    pub bytes: Vec<u8>,
    records: Vec<Entry>,
}

impl Dumped {
    /// One of the replication's records as the dump has it.
    pub fn record<T: DeserializeOwned>(&self, name: &str) -> FsResult<Option<T>> {
        let key = [RECORD, name.as_bytes()].concat();
        self.records.iter().find(|(k, _)| *k == key).map(|(_, v)| postcard::from_bytes(v)).transpose().map_err(dump_err)
    }
}

fn dump_err(e: postcard::Error) -> FsError {
    FsError::Io(format!("snapshot: {e}"))
}
