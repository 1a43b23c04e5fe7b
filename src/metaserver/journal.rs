//! A metaserver on its own: each change is written to a journal (`shared::wal`) and synced before
//! it is applied, and applying does not wait for the disk: the namespace is checkpointed every
//! second (`Durability::Checkpointed`), and on start the journal's changes after the checkpoint are
//! applied again. So a change costs one `fdatasync`, where a durable LMDB commit costs two, and the
//! changes that arrive while one is being synced share the next sync (group commit): one thread
//! takes every change waiting, journals them with one sync, applies them in one transaction (each
//! in a nested one, so one that fails leaves the others), then answers them all.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::namespace::{Change, Namespace, OpenError, Outcome, Shape};
use crate::shared::db::Durability;
use crate::shared::wal::Wal;
use crate::shared::{FsError, FsResult};

/// The namespace's record of the last journal entry it applied.
const APPLIED: &str = "journal";
/// How often the namespace is checkpointed (and the journal behind it dropped).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// The most changes journaled with one sync.
const MAX_BATCH: usize = 256;

/// What the journal records of a change: who asked (a client and its sequence number, for
/// exactly-once answers; none for the server's own changes and the per-operation methods), when
/// it was taken, and the change. Applying it again after a crash gives the same result.
#[derive(Serialize, Deserialize)]
struct Entry {
    who: Option<(u64, u64)>,
    now: i64,
    change: Change,
}

/// What applying a change answers: its outcome or its error; the outer error is the store's own.
pub type Applied = FsResult<Result<Outcome, FsError>>;

struct Pending {
    entry: Entry,
    reply: tokio::sync::oneshot::Sender<Applied>,
}

/// The namespace of a metaserver on its own, and the thread that journals and applies its changes.
pub struct Journal {
    ns: Arc<Namespace>,
    tx: Option<Sender<Pending>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// How many changes opening applied again.
    redone: usize,
    /// When the commit under way began (see [`Journal::busy_for`]).
    busy: Arc<Busy>,
}

/// When the journal's thread began the commit it is in, as ms since `base` plus one (0: none).
struct Busy {
    base: Instant,
    since: std::sync::atomic::AtomicU64,
}

impl Busy {
    fn set(&self, busy: bool) {
        let ms = if busy { u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1 } else { 0 };
        self.since.store(ms, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Journal {
    /// Stops the thread once it has answered what it took (it then lets go of the store).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("the journal: {0}")]
    Io(#[from] std::io::Error),
    #[error("applying the journal: {0}")]
    Apply(#[from] FsError),
    #[error(
        "the journal in {dir} begins at change {first}, but the namespace beside it holds changes up to {applied} \
         only: the changes between are in neither (was the namespace's store replaced or removed?); restore it, \
         or move the journal away to start from the namespace as it is"
    )]
    Gap { dir: String, first: u64, applied: u64 },
}

fn apply(ns: &Namespace, w: &mut crate::shared::db::Writer, e: &Entry) -> Applied {
    let now = ns.stamp_in(w, e.now)?;
    match e.who {
        Some(who) => ns.apply_once_in(w, who, now, &e.change),
        None => ns.answer_in(w, &e.change, now),
    }
}

impl Journal {
    /// Opens the namespace in `dir` and its journal, applying again what the journal holds after
    /// the namespace's checkpoint, and starts the thread that takes changes.
    pub fn open(dir: &Path, shape: Shape) -> Result<Journal, JournalError> {
        Self::open_with(dir, shape, CHECKPOINT_EVERY)
    }

    /// [`Journal::open`], checkpointing every `every`.
    fn open_with(dir: &Path, shape: Shape, every: Duration) -> Result<Journal, JournalError> {
        Self::open_preparing(dir, shape, every, |_| {})
    }

    /// [`Journal::open_with`], `prepare` given the log before the journal's thread takes it (a
    /// test's hook).
    fn open_preparing(
        dir: &Path,
        shape: Shape,
        every: Duration,
        prepare: impl FnOnce(&mut Wal),
    ) -> Result<Journal, JournalError> {
        let ns = Arc::new(Namespace::open_with(dir, shape, Durability::Checkpointed)?);
        let mut wal = Wal::open(&dir.join("journal"))?;
        let applied: u64 = ns.record(APPLIED)?.unwrap_or(0);
        // The journal is dropped only behind a checkpoint of the namespace, so it begins at or
        // before the namespace's next change; one that begins later was kept beside another
        // namespace (a store lost or replaced), and applying it would make neither.
        if let Some((first, _)) = wal.bounds().filter(|&(first, _)| first > applied.saturating_add(1)) {
            let dir = dir.join("journal").display().to_string();
            return Err(JournalError::Gap { dir, first, applied });
        }
        let redo = wal.range(applied.saturating_add(1), u64::MAX)?;
        let mut redone = 0;
        if let Some(&(last, _)) = redo.last() {
            let entries = redo
                .iter()
                .map(|(i, b)| {
                    postcard::from_bytes::<Entry>(b).map_err(|e| FsError::Io(format!("journal entry {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            ns.write(|w| {
                for e in &entries {
                    // Its answer was given (or lost with the crash); only the store's failure matters.
                    let _answer = apply(&ns, w, e)?;
                }
                ns.put_record_in(w, APPLIED, &last)
            })?;
            redone = entries.len();
            info!(changes = redone, "journal: changes after the last checkpoint applied again");
        }
        ns.checkpoint()?;
        // What was redone is in the journal, so its last entry is at least that.
        let next = wal.bounds().map_or(0, |(_, l)| l).max(applied) + 1;
        wal.purge(next - 1)?;
        prepare(&mut wal);
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = ns.clone();
        let busy = Arc::new(Busy { base: Instant::now(), since: 0.into() });
        let marks = busy.clone();
        let worker = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || run(&worker, wal, next, &rx, every, &marks))?;
        Ok(Journal { ns, tx: Some(tx), worker: Some(worker), redone, busy })
    }

    /// How long the commit under way has taken so far (zero when none is): a journal held up
    /// by its disk applies no heartbeat meanwhile (see `expire_sessions`).
    pub fn busy_for(&self) -> Duration {
        match self.busy.since.load(std::sync::atomic::Ordering::Acquire) {
            0 => Duration::ZERO,
            ms => self.busy.base.elapsed().saturating_sub(Duration::from_millis(ms - 1)),
        }
    }

    /// How many changes opening applied again from the journal.
    pub fn redone(&self) -> usize {
        self.redone
    }

    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.ns
    }

    /// Journals and applies `change`, taken now, for `who` (see [`Entry`]).
    pub async fn apply(&self, who: Option<(u64, u64)>, change: Change) -> Applied {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let entry = Entry { who, now: crate::shared::now_ns(), change };
        let sent = self.tx.as_ref().map(|tx| tx.send(Pending { entry, reply }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(FsError::Io("the journal has stopped".into()));
        }
        answer.await.map_err(|_| FsError::Io("the journal has stopped".into()))?
    }
}

/// The journal's thread: takes every change waiting, journals them with one sync, applies them in
/// one transaction, answers them; checkpoints the namespace every `every`.
fn run(ns: &Namespace, mut wal: Wal, mut next: u64, rx: &Receiver<Pending>, every: Duration, busy: &Busy) {
    let mut checkpointed = Instant::now();
    loop {
        let wait = every.saturating_sub(checkpointed.elapsed());
        let first = match rx.recv_timeout(wait) {
            Ok(p) => Some(p),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            busy.set(true);
            let answers = commit(ns, &mut wal, next, &batch);
            busy.set(false);
            if answers.is_ok() {
                next += batch.len() as u64;
            }
            match answers {
                Ok(answers) => batch.into_iter().zip(answers).for_each(|(p, a)| drop(p.reply.send(Ok(a)))),
                Err(e) => batch.into_iter().for_each(|p| drop(p.reply.send(Err(e.clone())))),
            }
        }
        if checkpointed.elapsed() >= every {
            checkpointed = Instant::now();
            match ns.checkpoint() {
                Ok(()) => {
                    if let Err(e) = wal.purge(next - 1) {
                        warn!("dropping the journal behind the checkpoint: {e}");
                    }
                }
                Err(e) => warn!("checkpointing the namespace: {e}"),
            }
        }
    }
}

/// Journals `batch` as entries `next`.. with one sync, then applies it. On failure nothing of it
/// stays, in the journal or the namespace.
fn commit(ns: &Namespace, wal: &mut Wal, next: u64, batch: &[Pending]) -> FsResult<Vec<Result<Outcome, FsError>>> {
    let io = |e: std::io::Error| FsError::Io(format!("the journal: {e}"));
    let encoded = batch
        .iter()
        .map(|p| postcard::to_allocvec(&p.entry).map_err(|e| FsError::Io(format!("journal entry: {e}"))))
        .collect::<FsResult<Vec<_>>>()?;
    let records: Vec<(u64, &[u8])> = (next..).zip(encoded.iter().map(Vec::as_slice)).collect();
    let last = next + batch.len() as u64 - 1;
    let journaled = wal.append(&records).and_then(|files| wal.sync_files(&files));
    let applied = journaled.map_err(io).and_then(|()| {
        ns.write(|w| {
            let answers = batch.iter().map(|p| apply(ns, w, &p.entry)).collect::<FsResult<Vec<_>>>()?;
            ns.put_record_in(w, APPLIED, &last)?;
            Ok(answers)
        })
    });
    if applied.is_err() {
        // Not applied, so not to be applied at the next start either.
        if let Err(e) = wal.truncate(next) {
            warn!("taking back journal entries that were not applied: {e}");
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::{Kind, NewNode, ROOT};

    fn file(name: &str) -> Change {
        let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
        Change::Mknod { parent: ROOT, name: name.as_bytes().to_vec(), node }
    }

    fn names(ns: &Namespace) -> Vec<Vec<u8>> {
        ns.readdir(ROOT).expect("readdir").into_iter().map(|(n, _)| n).collect()
    }

    /// A commit held up (by the disk) is told while it lasts: the expirer stands still meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_held_up_is_told_while_it_lasts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hold = |w: &mut Wal| {
            w.before_append = Some(Box::new(|| {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(())
            }))
        };
        let hour = Duration::from_secs(3600);
        let j = Arc::new(Journal::open_preparing(dir.path(), Shape::default(), hour, hold).expect("open"));
        assert_eq!(j.busy_for(), Duration::ZERO);
        let held = j.clone();
        let change = tokio::spawn(async move { held.apply(None, file("a")).await });
        let start = Instant::now();
        while j.busy_for() <= Duration::from_secs(1) {
            assert!(start.elapsed() < Duration::from_secs(5), "the held commit was never told");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        change.await.expect("the change's task").expect("the change").expect("applied");
        assert_eq!(j.busy_for(), Duration::ZERO, "no commit under way");
    }

    /// Changes answered are in the journal before they are applied; a restart that finds the
    /// namespace at its checkpoint (as after a crash) applies the rest again, once each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_after_the_checkpoint_are_applied_again_after_a_crash() {
        let dir = tempfile::tempdir().expect("temp dir");
        // No checkpoint but the one on open: the store goes back to it when reopened.
        let hour = Duration::from_secs(3600);
        let j = Arc::new(Journal::open_with(dir.path(), Shape::default(), hour).expect("open"));
        // Concurrent changes (of 40 clients) share syncs; each gets its own answer.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move { j.apply(Some((100 + i, 1)), file(&format!("f{i:02}"))).await }));
        }
        for t in tasks {
            t.await.expect("task").expect("store").expect("created");
        }
        // A failed change answers its error and leaves the others.
        let again = j.apply(Some((8, 1)), file("f00")).await.expect("store");
        assert_eq!(again, Err(FsError::Exists));
        let before = names(j.namespace());
        assert_eq!(before.len(), 40);
        drop(Arc::into_inner(j).expect("the only handle"));

        let j = Journal::open_with(dir.path(), Shape::default(), hour).expect("reopen");
        assert_eq!(j.redone(), 41);
        assert_eq!(names(j.namespace()), before);
        // The retried last change of a client is answered, not applied again.
        let retry = j.apply(Some((139, 1)), file("f39")).await.expect("store");
        assert!(retry.is_ok(), "{retry:?}");
        assert_eq!(j.namespace().inode_count().expect("count"), 41);
        // Opening checkpointed what it applied: the next open redoes only the retry, which
        // answers again without applying.
        drop(j);
        let j = Journal::open_with(dir.path(), Shape::default(), hour).expect("reopen");
        assert_eq!(j.redone(), 1);
        assert_eq!(names(j.namespace()), before);
        assert_eq!(j.namespace().inode_count().expect("count"), 41);
    }

    /// A journal whose changes begin past the namespace's next one (its store lost or replaced,
    /// the journal left) is refused with the reason: applied, it made a namespace that was
    /// neither the old one nor empty, whose new inodes took old files' numbers.
    #[test]
    fn a_journal_that_begins_past_the_namespace_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut wal = Wal::open(&dir.path().join("journal")).expect("journal");
            let entry = |name: &str| postcard::to_allocvec(&Entry { who: None, now: 0, change: file(name) }).unwrap();
            let (a, b) = (entry("a"), entry("b"));
            let files = wal.append(&[(5, &a), (6, &b)]).expect("append");
            wal.sync_files(&files).expect("sync");
        }
        let hour = Duration::from_secs(3600);
        match Journal::open_with(dir.path(), Shape::default(), hour) {
            Err(e @ JournalError::Gap { first: 5, applied: 0, .. }) => {
                assert!(e.to_string().contains("begins at change 5"))
            }
            Err(e) => panic!("another error: {e}"),
            Ok(j) => panic!("opened, {} changes applied", j.redone()),
        }
        // Nothing was changed: moved away, the journal is no longer in the way.
        std::fs::rename(dir.path().join("journal"), dir.path().join("journal.old")).expect("move");
        let j = Journal::open_with(dir.path(), Shape::default(), hour).expect("opened without it");
        assert!(names(j.namespace()).is_empty());
    }

    /// A change whose journal sync fails is answered with the error and leaves nothing behind:
    /// not in the namespace, and not in the journal for the next start to apply. The change after
    /// it takes its place.
    #[test]
    fn a_change_whose_journal_sync_fails_leaves_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = Namespace::open_with(dir.path(), Shape::default(), Durability::Checkpointed).expect("namespace");
        let mut wal = Wal::open(&dir.path().join("journal")).expect("journal");
        // The first sync fails (and with it, as the kernel may, the pages it was to write).
        let failures = Arc::new(AtomicUsize::new(1));
        let left = failures.clone();
        wal.sync_with(Arc::new(move |f: &std::fs::File| {
            match left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                Err(_) => f.sync_data(),
            }
        }));
        let pending = |name: &str| {
            let (reply, _) = tokio::sync::oneshot::channel();
            Pending { entry: Entry { who: None, now: 0, change: file(name) }, reply }
        };
        let failed = commit(&ns, &mut wal, 1, &[pending("lost")]);
        assert!(matches!(failed, Err(FsError::Io(_))), "{failed:?}");
        assert_eq!(failures.load(Ordering::SeqCst), 0, "the journal's sync went through the log's sync");
        assert!(names(&ns).is_empty(), "not applied");
        assert!(wal.range(1, u64::MAX).expect("range").is_empty(), "taken back from the journal");

        let kept = commit(&ns, &mut wal, 1, &[pending("kept")]).expect("the next change");
        assert!(kept[0].is_ok(), "{kept:?}");
        drop((wal, ns));
        // The namespace goes back to its last checkpoint; the journal gives it the kept change.
        let j = Journal::open_with(dir.path(), Shape::default(), Duration::from_secs(3600)).expect("reopen");
        assert_eq!(j.redone(), 1);
        assert_eq!(names(j.namespace()), vec![b"kept".to_vec()]);
    }
}
