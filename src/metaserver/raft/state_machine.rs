//! The namespace as Raft's state machine. A batch of committed entries is applied in one
//! transaction, together with the position it reached and the membership, so a member killed at
//! any point restarts consistent: what it applied, it recorded. Applying does not wait for the disk:
//! the store is checkpointed (every second, and before each snapshot), and a member that crashed
//! restarts from its checkpoint and applies the rest again from its log. The log is purged only
//! behind what a checkpoint holds: behind snapshots built here, which are taken from a checkpoint,
//! and behind one installed from the leader once its checkpoint is done (openraft 0.9 purges the
//! log as soon as it hands the snapshot to be installed; `LogStore::purge` waits for
//! [`Checkpointed`]). Each client's change is applied
//! once (see `Namespace::apply_once_in`), whether its entry holds it alone or a batch of them. A snapshot is the whole store as of one read
//! transaction; installing one replaces the store in one transaction.

// openraft's storage traits return its (large) StorageError by value; the helpers here do too.
#![allow(clippy::result_large_err)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};

use super::snapshot_bytes::SnapshotBytes;
use super::{Entry, LogId, Request, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::metaserver::namespace::{Change, Namespace, Outcome};
use crate::shared::db::Writer;
use crate::shared::{FsError, FsResult};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";

/// A snapshot kept whole in memory: its description and its bytes.
type Kept = Option<(SnapshotMeta, Vec<u8>)>;

/// The index of the last entry the namespace's last checkpoint holds applied (`None`: none yet).
pub type Checkpointed = Arc<tokio::sync::watch::Sender<Option<u64>>>;

/// The index of the last entry `ns`'s last checkpoint holds applied.
fn checkpointed_index(ns: &Namespace) -> Result<Option<u64>, FsError> {
    Ok(ns.checkpointed_record::<Option<LogId>>(APPLIED)?.flatten().map(|l| l.index))
}

/// Checkpoints `ns` (blocking), then records in `to` what the checkpoint holds applied.
pub fn checkpoint(ns: &Namespace, to: &Checkpointed) -> Result<(), FsError> {
    ns.checkpoint()?;
    let applied = checkpointed_index(ns)?;
    to.send_if_modified(|c| {
        let newer = applied > *c;
        if newer {
            *c = applied;
        }
        newer
    });
    Ok(())
}

/// Cheap to clone; a clone builds snapshots while the original applies.
#[derive(Clone)]
pub struct StateMachine {
    ns: Arc<Namespace>,
    /// The last snapshot built or installed, kept to send to members that fell behind.
    current: Arc<Mutex<Kept>>,
    builds: Arc<AtomicU64>,
    checkpointed: Checkpointed,
    /// Set once a snapshot's install failed: openraft's state machine worker stops then, and the
    /// log's purge behind that snapshot must not wait for its checkpoint.
    install_failed: Arc<tokio::sync::watch::Sender<bool>>,
}

fn sm_err(e: FsError) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachine {
    pub fn new(ns: Arc<Namespace>) -> Self {
        let applied = checkpointed_index(&ns).ok().flatten();
        let checkpointed = Arc::new(tokio::sync::watch::Sender::new(applied));
        let install_failed = Arc::new(tokio::sync::watch::Sender::new(false));
        StateMachine { ns, current: Arc::default(), builds: Arc::default(), checkpointed, install_failed }
    }

    /// Whether a snapshot's install failed (it stays so).
    pub fn install_failed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.install_failed.subscribe()
    }

    /// What the namespace's checkpoints hold applied, as they are taken.
    pub fn checkpointed(&self) -> &Checkpointed {
        &self.checkpointed
    }

    /// The namespace, for reads (linearizable once the leader confirmed its term).
    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.ns
    }

    fn current(&self) -> MutexGuard<'_, Kept> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `meta`'s snapshot as the one sent to lagging members, unless the one kept is newer:
    /// openraft builds a snapshot in a task of its own, beside the installs of the leader's, so a
    /// build begun before an install may end after it. Kept instead, its older state would be
    /// sent to a follower that needs entries the install let the log purge, again and again.
    pub(super) fn keep(&self, meta: &SnapshotMeta, bytes: Vec<u8>) {
        let mut current = self.current();
        if current.as_ref().is_none_or(|(kept, _)| kept.last_log_id <= meta.last_log_id) {
            *current = Some((meta.clone(), bytes));
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // A snapshot lets the log be purged up to it: it must hold nothing a crash could undo.
        // Read on the blocking pool: the member's tasks share one thread.
        let (ns, to) = (self.ns.clone(), self.checkpointed.clone());
        let dump = tokio::task::spawn_blocking(move || checkpoint(&ns, &to).and_then(|()| ns.dump()))
            .await
            .map_err(|e| FsError::Io(format!("building a snapshot: {e}")))
            .and_then(|r| r)
            .map_err(|e| StorageError::from(StorageIOError::read_state_machine(&e)))?;
        let last: Option<LogId> = dump.record::<Option<LogId>>(APPLIED).map_err(sm_err)?.flatten();
        let membership: StoredMembership = dump.record(MEMBERSHIP).map_err(sm_err)?.unwrap_or_default();
        let n = self.builds.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}-{n}", l.leader_id, l.index, crate::shared::now_ns()),
            None => format!("none-{}-{n}", crate::shared::now_ns()),
        };
        let meta = SnapshotMeta { last_log_id: last, last_membership: membership, snapshot_id };
        self.keep(&meta, dump.bytes.clone());
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotBytes::new(dump.bytes)) })
    }
}

/// Applies one client's request in `w`, at the leader's time for it (made later than any before).
fn apply_one(ns: &Namespace, w: &mut Writer, req: &Request) -> FsResult<Result<Outcome, FsError>> {
    let now = ns.stamp_in(w, req.now)?;
    ns.apply_once_in(w, (req.client, req.seq), now, &req.change)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let last = self.ns.record::<Option<LogId>>(APPLIED).map_err(sm_err)?.flatten();
        let membership = self.ns.record(MEMBERSHIP).map_err(sm_err)?.unwrap_or_default();
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let ns = &self.ns;
        ns.write(|w| {
            let mut out = Vec::with_capacity(entries.len());
            let mut membership = None;
            for e in &entries {
                out.push(match &e.payload {
                    EntryPayload::Blank => Response::None,
                    EntryPayload::Normal(Request { change: Change::Batch { requests }, .. }) => {
                        Response::Many(requests.iter().map(|r| apply_one(ns, w, r)).collect::<FsResult<_>>()?)
                    }
                    EntryPayload::Normal(req) => Response::Applied(apply_one(ns, w, req)?),
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                        Response::None
                    }
                });
            }
            if let Some(last) = entries.last() {
                ns.put_record_in(w, APPLIED, &Some(last.log_id))?;
            }
            if let Some(m) = membership {
                ns.put_record_in(w, MEMBERSHIP, &m)?;
            }
            Ok(out)
        })
        .map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotBytes>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotBytes>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let (ns, m, to) = (self.ns.clone(), meta.clone(), self.checkpointed.clone());
        // Written on the blocking pool: the member's tasks share one thread.
        let installed = tokio::task::spawn_blocking(move || {
            ns.write(|w| {
                ns.restore_in(w, &bytes)?;
                // The snapshot's own description is what was applied, whatever its records say.
                ns.put_record_in(w, APPLIED, &m.last_log_id)?;
                ns.put_record_in(w, MEMBERSHIP, &m.last_membership)
            })
            .and_then(|()| checkpoint(&ns, &to))
            .map(|()| bytes)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let bytes = match installed {
            Ok(bytes) => bytes,
            Err(e) => {
                self.install_failed.send_replace(true);
                return Err(StorageIOError::write_snapshot(Some(meta.signature()), &std::io::Error::other(e)).into());
            }
        };
        self.keep(meta, bytes);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current().as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(SnapshotBytes::new(bytes.clone())),
        }))
    }
}
