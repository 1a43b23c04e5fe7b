//! The Raft log and vote. Entries go to an append-only segment log (`shared::wal`) and are reported
//! flushed once synced: one `fdatasync` for every batch that is waiting when a sync starts, done by
//! a thread of its own, so the member's one thread (the Raft core, its replication tasks and the
//! client service) goes on serving while the disk syncs. The Raft core itself waits for its append
//! to be flushed before it runs the commands after it (openraft 0.9's `RaftCore::append_to_log`
//! awaits the flush), and those include sending the entries to the followers: on the leader a
//! change costs its own sync and then a follower's, one after the other (README, "A replicated
//! metaserver"). The vote and the position of the last purge are rare writes and live in a small
//! LMDB store, each a durable commit. So a member that restarts (or is killed) finds what it
//! promised.

// openraft's storage traits return its (large) StorageError by value; the helpers here do too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::shared::db::{Db, DbError, Read, Table};
use crate::shared::wal::Wal;

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";

struct Store {
    db: Db,
    /// The vote and the last purged log id.
    state: Table,
    /// The entries. Only the Raft core appends, truncates and purges (one call at a time);
    /// replication tasks read concurrently.
    wal: Arc<Mutex<Wal>>,
    /// An append failed (see [`flush`]).
    failed: Arc<AtomicBool>,
    /// The index of the last purged entry: the segment log may still hold it and those before.
    purged: std::sync::atomic::AtomicU64,
    /// To the thread that syncs appended entries and then reports them flushed.
    flusher: Mutex<std::sync::mpsc::Sender<Flush>>,
    /// What the state machine's checkpoints hold applied, and whether a snapshot's install
    /// failed; a purge waits for the first unless the second (see `purge`).
    checkpointed: std::sync::OnceLock<(tokio::sync::watch::Receiver<Option<u64>>, tokio::sync::watch::Receiver<bool>)>,
}

/// What reports an append synced, or not: openraft's [`LogFlushed`] (a test's stand-in in tests).
type Flushed = Box<dyn FnOnce(std::io::Result<()>) + Send>;

enum Flush {
    /// Sync these files, then report the append done.
    Append(Vec<Arc<std::fs::File>>, Flushed),
    /// Answer once everything sent before is synced and reported.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

fn lock(wal: &Mutex<Wal>) -> MutexGuard<'_, Wal> {
    wal.lock().unwrap_or_else(|p| p.into_inner())
}

/// The flusher thread: syncs the files of every append waiting with one `fdatasync` each, then
/// reports them in the order they came.
///
/// An append that begins a new segment syncs the one before itself, under the log's lock. The
/// kernel reports a failed write-back to one sync only, and may mark the failed pages clean: if
/// that sync failed while the flusher synced the same segment, the flusher's could succeed over
/// the hole. Such an append marks the log `failed` before it lets go of the lock, so the flusher
/// looks, under the lock, after its syncs, and reports nothing synced once an append failed.
/// openraft 0.9 waits for each append to be reported before it makes the next, so the two do not
/// overlap today; the storage API lets them (a Raft core may append again before a flush is
/// reported), and the log keeps its word either way.
fn flush(rx: &std::sync::mpsc::Receiver<Flush>, wal: &Mutex<Wal>, failed: &AtomicBool) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut files: Vec<&Arc<std::fs::File>> = Vec::new();
        for f in jobs.iter().filter_map(|j| if let Flush::Append(f, _) = j { Some(f) } else { None }).flatten() {
            if !files.iter().any(|g| Arc::ptr_eq(g, f)) {
                files.push(f);
            }
        }
        let sync = lock(wal).syncer();
        let synced = files.iter().try_for_each(|f| sync(f)).and_then(|()| {
            let _wal = lock(wal);
            match failed.load(Ordering::Acquire) {
                true => Err(std::io::Error::other("an append to the log failed: what it synced may have a hole")),
                false => Ok(()),
            }
        });
        for job in jobs {
            match job {
                Flush::Append(_, done) => done(match &synced {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                }),
                Flush::Barrier(done) => drop(done.send(())),
            }
        }
    }
}

/// `purged` when nothing was purged.
const NONE: u64 = u64::MAX;

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

/// The error of a write that found the flusher thread gone (the log is being dropped).
fn flusher_stopped() -> std::io::Error {
    std::io::Error::other("the flusher stopped")
}

fn encode(v: &impl Serialize) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(v).map_err(write_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(b).map_err(read_err)
}

impl LogStore {
    /// Opens (creating if needed) the log store in `dir`. Entries an earlier version kept in the
    /// LMDB store's `log` table move to the segment log first.
    pub fn open(dir: &Path) -> Result<LogStore, DbError> {
        let (db, [log, state]) = Db::open(dir, ["log", "state"])?;
        let io = |e: std::io::Error| DbError::Other(format!("the Raft log in {}: {e}", dir.display()));
        let mut wal = Wal::open(&dir.join("wal")).map_err(io)?;
        let old = db.read(|r| r.scan(log, &[0; 8], &[0xff; 9], usize::MAX))?;
        if !old.is_empty() {
            // The table is emptied only once the segment log holds all of it, durably; a start
            // cut short before that (a full disk, an I/O error, a kill) left a prefix of it there.
            // The move goes on past what the segment log holds, and never over it: an append at a
            // held index would drop what follows it.
            let held = wal.bounds().map(|(_, last)| last);
            let recs: Vec<(u64, &[u8])> = old
                .iter()
                .filter_map(|(k, v)| Some((u64::from_be_bytes(k.as_slice().try_into().ok()?), v.as_slice())))
                .filter(|&(i, _)| held.is_none_or(|last| i > last))
                .collect();
            if !recs.is_empty() {
                let files = wal.append(&recs).map_err(io)?;
                wal.sync_files(&files).map_err(io)?;
            }
            db.write(|w| w.delete_range(log, &[0; 8], &[0xff; 9]))?;
        }
        let purged = db.read(|r| Ok::<_, DbError>(r.get(state, PURGED)?.map(<[u8]>::to_vec)))?;
        let purged = match purged {
            Some(b) => postcard::from_bytes::<LogId>(&b).map_err(|e| DbError::Other(e.to_string()))?.index,
            None => NONE,
        };
        let purged = std::sync::atomic::AtomicU64::new(purged);
        let (tx, rx) = std::sync::mpsc::channel();
        let wal = Arc::new(Mutex::new(wal));
        let failed: Arc<AtomicBool> = Arc::default();
        let (w, f) = (wal.clone(), failed.clone());
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush(&rx, &w, &f))
            .map_err(|e| DbError::Other(format!("starting the Raft log's flusher: {e}")))?;
        let flusher = Mutex::new(tx);
        let checkpointed = std::sync::OnceLock::new();
        Ok(LogStore { store: Arc::new(Store { db, state, wal, failed, purged, flusher, checkpointed }) })
    }

    /// Purges from now on only entries that the state machine's checkpoints hold applied, as
    /// `checkpointed` reports them; a purge waiting for them fails once `install_failed` says a
    /// snapshot's install failed (they would never come).
    pub fn purge_only_behind(
        &self,
        checkpointed: tokio::sync::watch::Receiver<Option<u64>>,
        install_failed: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = self.store.checkpointed.set((checkpointed, install_failed));
    }

    /// Returns once every append so far is synced and reported.
    fn drain(&self) -> Result<(), StorageError> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let sent = self.store.flusher.lock().unwrap_or_else(|p| p.into_inner()).send(Flush::Barrier(done));
        sent.ok().and_then(|()| wait.recv().ok()).ok_or_else(|| write_err(flusher_stopped()))
    }

    pub(super) fn wal(&self) -> MutexGuard<'_, Wal> {
        lock(&self.store.wal)
    }

    /// Appends `recs` and hands their files to the flusher, which calls `done` once they are synced.
    fn append_then(&self, recs: &[(u64, &[u8])], done: Flushed) -> std::io::Result<()> {
        let written = {
            let mut wal = self.wal();
            let written = wal.append(recs);
            if written.is_err() {
                // Before the lock goes: see `flush`.
                self.store.failed.store(true, Ordering::Release);
            }
            written
        };
        match written {
            Ok(files) => {
                let flusher = self.store.flusher.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(std::sync::mpsc::SendError(Flush::Append(_, done))) =
                    flusher.send(Flush::Append(files, done))
                {
                    done(Err(flusher_stopped()));
                    return Err(flusher_stopped());
                }
                Ok(())
            }
            Err(e) => {
                done(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
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
        let to = match range.end_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_sub(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => u64::MAX,
        };
        let purged = self.store.purged.load(std::sync::atomic::Ordering::Acquire);
        let from = if purged == NONE { from } else { from.max(purged.saturating_add(1)) };
        let held = self.wal().range(from, to).map_err(read_err)?;
        held.iter().map(|(_, b)| decode(b)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get_state(PURGED)?;
        let last = {
            let wal = self.wal();
            match wal.bounds() {
                Some((_, i)) => wal.get(i).map_err(read_err)?.map(|b| decode::<Entry>(&b)).transpose()?,
                None => None,
            }
        };
        // Entries at or before the purge may still be in the segment log's oldest segment.
        let last = last.map(|e| e.log_id).filter(|l| purged.is_none_or(|p| l.index > p.index));
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
        let encoded =
            entries.into_iter().map(|e| Ok((e.log_id.index, encode(&e)?))).collect::<Result<Vec<_>, StorageError>>()?;
        let recs: Vec<(u64, &[u8])> = encoded.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        // Written under the lock, synced by the flusher: neither readers nor the Raft core wait
        // for the disk.
        self.append_then(&recs, Box::new(move |r| callback.log_io_completed(r))).map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // No append is reported flushed after the entries it wrote are gone.
        self.drain()?;
        self.wal().truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Not past what a checkpoint of the state machine holds: openraft 0.9 purges behind a
        // snapshot from the leader as soon as it hands it to be installed, and a member that
        // crashed before that install was checkpointed would restart with its namespace behind
        // the start of its log, unable to catch up.
        // A purge behind a snapshot whose install failed would wait for good, and the Raft core
        // with it, a member neither working nor stopped: it fails instead, and the core stops.
        if let Some((checkpointed, install_failed)) = self.store.checkpointed.get() {
            let (mut c, mut failed) = (checkpointed.clone(), install_failed.clone());
            tokio::select! {
                held = c.wait_for(|c| c.is_some_and(|a| a >= log_id.index)) => {
                    held.map_err(|_| write_err(std::io::Error::other("the state machine stopped before a purge")))?;
                }
                _ = failed.wait_for(|&f| f) => {
                    return Err(write_err(std::io::Error::other("a snapshot's install failed before a purge behind it")));
                }
            }
        }
        // The record of the purge first: entries at or before it are then gone whatever the
        // segment log still holds, and dropping its old segments can wait for a crash to pass.
        self.drain()?;
        self.put_state(PURGED, &log_id)?;
        self.store.purged.store(log_id.index, std::sync::atomic::Ordering::Release);
        self.wal().purge(log_id.index).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// The kernel reports a failed write-back to one sync only, and may then mark the failed pages
    /// clean. Here the flusher's sync of an append (X) is held while the next append (Y) begins a
    /// new segment, whose sync of the full one fails; X's sync then succeeds, and X must still not
    /// be reported flushed.
    #[test]
    fn a_sync_that_ran_beside_a_failed_one_reports_nothing_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let hook = Arc::new(crate::shared::wal::testing::HeldThenFailed::default());
        log.wal().sync_with(hook.sync());
        hook.arm();
        // X nearly fills a fresh 4 MiB segment; Y does not fit after it.
        let (x, y) = (vec![1u8; 3 << 20], vec![2u8; 1 << 20]);
        let reported = hook.clone();
        log.append_then(&[(1, &x)], Box::new(move |r| reported.answered(r.is_ok()))).expect("X is written");
        hook.wait_held();
        let (y_tx, y_rx) = mpsc::channel::<std::io::Result<()>>();
        assert!(log.append_then(&[(2, &y)], Box::new(move |r| drop(y_tx.send(r)))).is_err());
        assert!(y_rx.recv().unwrap().is_err());
        assert_eq!(hook.answered_meanwhile(), None, "X was reported while Y's failure was pending");
        assert_eq!(
            hook.answer(Duration::from_secs(10)),
            Some(false),
            "X was reported flushed on a sync that ran beside a failed one"
        );
    }

    type Purging = tokio::task::JoinHandle<Result<(), StorageError>>;

    /// A purge of `log` up to `to`, started behind a state machine whose checkpoints hold index 3:
    /// returns the senders of what the checkpoints hold and of whether an install failed, and the
    /// purge, checked to be waiting.
    async fn purge_waiting(
        log: &LogStore,
        to: LogId,
    ) -> (tokio::sync::watch::Sender<Option<u64>>, tokio::sync::watch::Sender<bool>, Purging) {
        let (checkpointed, seen) = tokio::sync::watch::channel(Some(3));
        let (install_failed, told) = tokio::sync::watch::channel(false);
        log.purge_only_behind(seen, told);
        let mut purger = log.clone();
        let purging = tokio::spawn(async move { purger.purge(to).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!purging.is_finished(), "purged past what the checkpoint holds");
        (checkpointed, install_failed, purging)
    }

    /// openraft 0.9 purges a follower's log behind a snapshot from the leader as soon as it hands
    /// the snapshot to be installed, while the install runs on. A member killed before the
    /// install's checkpoint restarted with its namespace behind the start of its log, and could
    /// not catch up. A purge now waits until a checkpoint holds what it drops.
    #[tokio::test]
    async fn a_purge_waits_until_a_checkpoint_holds_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        let encoded: Vec<(u64, Vec<u8>)> = (0..=10)
            .map(|i| (i, encode(&Entry { log_id: id(i), payload: openraft::EntryPayload::Blank }).unwrap()))
            .collect();
        let recs: Vec<(u64, &[u8])> = encoded.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let (tx, rx) = mpsc::channel();
        log.append_then(
            &recs,
            Box::new(move |r| {
                let _ = tx.send(r.is_ok());
            }),
        )
        .expect("appended");
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        let (checkpointed, _install_failed, purging) = purge_waiting(&log, id(8)).await;
        checkpointed.send(Some(8)).unwrap();
        let purged = tokio::time::timeout(Duration::from_secs(10), purging).await;
        purged.expect("the purge ended once a checkpoint held it").expect("the task").expect("purged");
        let state = log.clone().get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(id(8)));
    }

    /// A member upgraded from a build that kept its log in the LMDB store moves the entries to
    /// the segment log at its first start. A start cut short there (a full disk, an I/O error, a
    /// kill) left a prefix of them in the segment log; the next start took that prefix for the
    /// whole log, deleted the rest from LMDB, and the member came back without entries it had
    /// acknowledged.
    #[tokio::test]
    async fn an_upgrade_cut_short_keeps_every_entry_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        let enc = |i| encode(&Entry { log_id: id(i), payload: openraft::EntryPayload::Blank }).unwrap();
        {
            let (db, [log, _]) = Db::open(dir.path(), ["log", "state"]).unwrap();
            db.write(|w| (0..10u64).try_for_each(|i| w.put(log, &i.to_be_bytes(), &enc(i)))).unwrap();
        }
        {
            // What the start cut short had copied: the first three.
            let mut wal = Wal::open(&dir.path().join("wal")).unwrap();
            let (a, b, c) = (enc(0), enc(1), enc(2));
            let files = wal.append(&[(0, &a), (1, &b), (2, &c)]).unwrap();
            wal.sync_files(&files).unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        let got = log.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        drop(log);
        let reopened = LogStore::open(dir.path()).unwrap();
        assert_eq!(reopened.clone().get_log_state().await.unwrap().last_log_id, Some(id(9)));
    }

    /// A purge behind a snapshot whose install failed fails too, and purges nothing: it waited
    /// for a checkpoint that would never come, holding the Raft core (the member answered no
    /// votes nor appends, and did not stop).
    #[tokio::test]
    async fn a_purge_behind_a_snapshot_whose_install_failed_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        let (_checkpointed, install_failed, purging) = purge_waiting(&log, id(8)).await;
        install_failed.send(true).unwrap();
        let purged = tokio::time::timeout(Duration::from_secs(10), purging).await;
        assert!(purged.expect("the purge ended").expect("the task").is_err());
        let state = log.clone().get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, None);
    }
}
