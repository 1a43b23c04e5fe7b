//! The Raft log and vote in an LMDB store of their own. Every append, truncation, purge and vote
//! is one durable commit before it is reported done, so a member that restarts (or is killed)
//! finds what it promised.

// openraft's storage traits return its (large) StorageError by value; the helpers here do too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::shared::db::{Db, DbError, Read, Table};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";

struct Store {
    db: Db,
    /// Entries by index (big-endian, so key order is index order).
    log: Table,
    /// The vote, the last purged log id, the committed log id.
    state: Table,
}

/// Cheap to clone; clones share the store (replication tasks read through their own clone).
#[derive(Clone)]
pub struct LogStore {
    store: Arc<Store>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn encode(v: &impl Serialize) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(write_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(b).map_err(read_err)
}

impl LogStore {
    /// Opens (creating if needed) the log store in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, DbError> {
        let (db, [log, state]) = Db::open(dir, ["log", "state"])?;
        Ok(LogStore { store: Arc::new(Store { db, log, state }) })
    }

    fn get_state<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.store.db.read(|r| Ok::<_, DbError>(r.get(self.store.state, key)?.map(<[u8]>::to_vec)));
        raw.map_err(read_err)?.map(|b| decode(&b)).transpose()
    }

    fn put_state(&self, key: &[u8], value: &impl Serialize) -> Result<(), StorageError> {
        let bytes = encode(value)?;
        self.store.db.write(|w| w.put(self.store.state, key, &bytes)).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // Keys are 8 bytes; a 9-byte bound lies after every key.
        let to = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1).map(|i| i.to_be_bytes().to_vec()),
            Bound::Excluded(&i) => Some(i.to_be_bytes().to_vec()),
            Bound::Unbounded => None,
        }
        .unwrap_or_else(|| vec![0xff; 9]);
        let raw = self.store.db.read(|r| r.scan(self.store.log, &from.to_be_bytes(), &to, usize::MAX));
        raw.map_err(read_err)?.iter().map(|(_, v)| decode(v)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get_state(PURGED)?;
        let last = self.store.db.read(|r| r.last(self.store.log)).map_err(read_err)?;
        let last: Option<LogId> = last.map(|(_, v)| decode::<Entry>(&v)).transpose()?.map(|e| e.log_id);
        // An empty log (all purged) ends where the purge did.
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_state(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_state(VOTE)
    }

    // No save_committed: recording the commit position would cost a durable commit on every member
    // for every change, and it is only a shortcut. A restarted member applies what the leader tells
    // it is committed, from its own log.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index.to_be_bytes(), encode(&e)?)))
            .collect::<Result<Vec<_>, StorageError>>()?;
        // One durable commit for the whole batch: entries appended together share the sync.
        let written = self.store.db.write(|w| {
            for (k, v) in &encoded {
                w.put(self.store.log, k, v)?;
            }
            Ok::<_, DbError>(())
        });
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index.to_be_bytes();
        self.store.db.write(|w| w.delete_range(self.store.log, &from, &[0xff; 9])).map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let to = log_id.index.checked_add(1).map(|i| i.to_be_bytes().to_vec()).unwrap_or_else(|| vec![0xff; 9]);
        let purged = encode(&log_id)?;
        // The record of the purge and the purge itself in one commit: a crash leaves both or neither.
        self.store
            .db
            .write(|w| {
                w.put(self.store.state, PURGED, &purged)?;
                w.delete_range(self.store.log, &[0; 8], &to)?;
                Ok::<_, DbError>(())
            })
            .map_err(write_err)
    }
}
