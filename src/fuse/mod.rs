//! The FUSE adapter (fuser): translates kernel requests into [`Cluster`] calls and replies. It owns
//! only client-side state: open handles, directory snapshots, per-inode write buffers that coalesce
//! small writes into whole blocks, and orphans waiting for their last close.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info};

use crate::client::interrupt::Caller;
use crate::client::no_xattrs::NoXattrs;
use crate::client::reclaim::Reclaim;
use crate::client::seen::{ClusterSink, Seen};
use crate::client::session::{Collection, Session, SessionHost};
use crate::client::statahead::{Answer, Statahead};
use crate::client::writeback::{Tell, WriteBack};
use crate::client::Cluster;
use crate::metaserver::namespace::locks::LockType;
use crate::metaserver::namespace::sessions::ClientInfo;
use crate::shared::metrics;
use crate::shared::{Attr, FsError, FsResult, Kind, NewNode, SetAttr, TimeSet, RENAME_EXCHANGE, RENAME_NOREPLACE};
use attr::{file_attr, file_type, time_ns};

mod attr;
mod held;

/// How long the kernel may cache attributes and entries. Short, so that other mounts' changes show
/// soon; `open` also revalidates (close-to-open).
const TTL: Duration = Duration::from_secs(1);
// A directory's attributes from a change's answer serve no longer than the kernel keeps them.
const _: () = assert!(TTL.as_nanos() == crate::client::fresh_dirs::FRESH_FOR.as_nanos());
/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;
/// Threads that store buffered writes in the background (for all inodes; see [`WriteBack`]).
const FLUSH_THREADS: usize = 4;

fn errno(e: &FsError) -> Errno {
    FAILED.set(Some(e.errno_name()));
    Errno::from_i32(e.errno())
}

/// An errno the mount answers with on its own (not an [`FsError`]'s), recorded for the metrics as
/// [`errno`] records the others.
fn refuse(e: Errno) -> Errno {
    let name = match e.code() {
        libc::EBADF => "EBADF",
        libc::EFBIG => "EFBIG",
        libc::EIO => "EIO",
        libc::EINTR => "EINTR",
        libc::EINVAL => "EINVAL",
        libc::ENODATA => "ENODATA",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ERANGE => "ERANGE",
        libc::ESTALE => "ESTALE",
        _ => "other",
    };
    FAILED.set(Some(name));
    e
}

thread_local! {
    /// The error the operation this thread serves replied with (set by [`errno`] or [`refuse`],
    /// through which every failed reply passes), for the metrics.
    static FAILED: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Counts a kernel request in the metrics when dropped: an error if it replied with one.
struct Counted(metrics::Op);

fn counted(op: &'static str) -> Counted {
    FAILED.set(None);
    Counted(metrics::op(op))
}

impl Drop for Counted {
    fn drop(&mut self) {
        match FAILED.take() {
            Some(e) => self.0.failed(e),
            None => self.0.ok(0),
        }
    }
}

/// A directory's entries (name, attributes) for one open handle: taken at opendir, their order
/// fixed for the handle's offsets. The attributes are taken again before they go to the kernel
/// once they may be stale (see [`DfsFs::fresh_listing`]).
struct Listing {
    /// Each entry, and whether its name had gone when the attributes were last taken.
    entries: Vec<(Vec<u8>, Attr, bool)>,
    /// The directory's parent, for "..".
    parent: u64,
    /// When the attributes were taken, and this mount's change epoch and [`Seen`]'s clock just
    /// before.
    taken: Instant,
    epoch: u64,
    asked: u64,
}

/// Directories this mount removed (by rmdir, or a rename over them), with their last attributes
/// (no links), oldest first. A process may still hold one (its working directory, an open
/// handle), and the kernel asks for the attributes of what it holds after the metaserver has
/// forgotten them: a local file system answers with no links, as this mount does from here for
/// the last [`REMOVED_DIRS_KEPT`].
#[derive(Default)]
struct RemovedDirs {
    attrs: HashMap<u64, Attr>,
    order: std::collections::VecDeque<u64>,
}

const REMOVED_DIRS_KEPT: usize = 1024;

impl RemovedDirs {
    fn record(&mut self, a: Attr) {
        let ino = a.ino;
        if self.attrs.insert(ino, a).is_none() {
            self.order.push_back(ino);
        }
        while self.order.len() > REMOVED_DIRS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.attrs.remove(&old);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct DfsFs {
    c: Cluster,
    block_size: u64,
    next_fh: AtomicU64,
    /// Open directory handles: fh -> snapshot of entries taken at opendir.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    removed_dirs: Mutex<RemovedDirs>,
    wb: Arc<WriteBack>,
    /// Open handles per inode, and the orphans waiting for their last close.
    reclaim: Arc<Reclaim>,
    /// This mount's session with the metaserver (ended when the mount goes).
    _session: Session,
    /// The lock owners that have set a lock here, with the open files (handles) they locked
    /// through: their locks are released at close.
    held: Arc<held::Held>,
    /// (size, mtime) last reported to the kernel per inode, to notice other mounts' changes at open.
    seen: Arc<Seen>,
    /// Files the kernel forgot while they were open here: their records in `seen` go at their
    /// last release, once their writes landed, unless the kernel has them again by then.
    forgotten: Mutex<std::collections::HashSet<u64>>,
    /// Listings fetched ahead of lookups, and the epoch of this mount's changes that voids them.
    ahead: Arc<Statahead>,
    /// Files the metaserver said have no extended attributes, lately.
    no_xattrs: NoXattrs,
    notifier: Arc<OnceLock<Notifier>>,
    /// The threads lock requests and the unlocks of closes wait on (see [`DfsFs::setlk`]).
    waiters: Waiters,
}

/// Threads that lock requests (and the unlocks of closes) wait on, kept for the next: a
/// [`Cluster`] connects each thread it is used on for the thread's life (a runtime and a
/// connection to the metaserver), so a thread per wait would leave one of each behind every time.
/// One more starts only when every thread is waiting, so there are as many as the most requests
/// that ever waited at once.
struct Waiters {
    jobs: Mutex<std::sync::mpsc::Sender<WaitJob>>,
    queue: Arc<Mutex<std::sync::mpsc::Receiver<WaitJob>>>,
    idle: Arc<AtomicU64>,
    /// Threads started so far.
    threads: AtomicU64,
}

type WaitJob = Box<dyn FnOnce() + Send>;

impl Default for Waiters {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        Waiters {
            jobs: Mutex::new(tx),
            queue: Arc::new(Mutex::new(rx)),
            idle: Arc::default(),
            threads: AtomicU64::new(0),
        }
    }
}

impl Waiters {
    /// Runs `job` on an idle waiter thread, or on a new one.
    fn run(&self, job: WaitJob) -> std::io::Result<()> {
        let jobs = lock(&self.jobs);
        let claimed = self.idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
        if !claimed {
            let (queue, idle) = (self.queue.clone(), self.idle.clone());
            let worker = move || loop {
                let Ok(job) = lock(&queue).recv() else { return };
                job();
                idle.fetch_add(1, Ordering::AcqRel);
            };
            std::thread::Builder::new().name("dfs-lock-wait".into()).spawn(worker)?;
            self.threads.fetch_add(1, Ordering::Relaxed);
        }
        // A job sent goes to a thread not waiting: the one just claimed or started.
        let _ = jobs.send(job);
        Ok(())
    }
}

impl DfsFs {
    /// `notifier` is filled in once the FUSE session exists (it is made from the session). Begins
    /// the mount's session with the metaserver, as `info`.
    pub fn new(
        c: Cluster,
        notifier: Arc<OnceLock<Notifier>>,
        info: ClientInfo,
        gc: Collection,
    ) -> std::io::Result<DfsFs> {
        let bg = c.clone();
        let reclaim = Arc::new(Reclaim::start(move |batch| bg.reclaim(batch))?);
        let held: Arc<held::Held> = Arc::default();
        let host = Arc::new(MountHost(reclaim.clone(), held.clone()));
        let session = Session::start(&c, info, host, gc).map_err(|e| std::io::Error::other(e.to_string()))?;
        let seen: Arc<Seen> = Arc::default();
        let ahead = Arc::new(Statahead::new(TTL));
        let sink = ClusterSink { c: c.clone(), seen: seen.clone(), ahead: ahead.clone() };
        let wb = Arc::new(WriteBack::new(sink, u64::from(c.layout().block_size), FLUSH_THREADS)?);
        wb.send_aged(crate::client::writeback::SEND_AFTER)?;
        Ok(DfsFs {
            block_size: u64::from(c.layout().block_size),
            c,
            next_fh: AtomicU64::new(1),
            dirs: Mutex::default(),
            removed_dirs: Mutex::default(),
            wb,
            reclaim,
            _session: session,
            held,
            seen,
            forgotten: Mutex::default(),
            ahead,
            no_xattrs: NoXattrs::default(),
            notifier,
            waiters: Waiters::default(),
        })
    }

    /// The cluster, with calls that give up once `req`'s caller is signalled or gone (see
    /// [`crate::client::interrupt`]): a request waiting for a down server must not make its caller
    /// unkillable.
    fn c(&self, req: &Request) -> Cluster {
        self.c.interruptible(Caller(req.pid()))
    }

    /// The attributes for the kernel from a change's answer.
    fn attr(&self, a: &Attr) -> FileAttr {
        self.attr_as(a, None)
    }

    /// The attributes for the kernel from the answer to a question asked at `asked` (the clock
    /// of [`Seen`]): if this mount changed the file since, the answer may be older than the change,
    /// and is not recorded.
    fn answer_attr(&self, a: &Attr, asked: u64) -> FileAttr {
        self.attr_as(a, Some(asked))
    }

    fn attr_as(&self, a: &Attr, asked: Option<u64>) -> FileAttr {
        // The kernel has the file again (a forget it sent is for an inode it has dropped): its
        // record is in use.
        {
            let mut forgotten = lock(&self.forgotten);
            if !forgotten.is_empty() {
                forgotten.remove(&a.ino);
            }
        }
        // What the metaserver says (or, for an answer older than this mount's change, what the
        // change left), which `open` compares with it later; the kernel is shown the end and the
        // times of writes not landed yet, as a local file system shows them at once.
        let (size, mtime) = self.seen.shown(a.ino, a.size, a.mtime, asked, self.wb.end(a.ino).unwrap_or(0));
        match self.wb.written(a.ino) {
            Some(t) if t > mtime || t > a.ctime => {
                let shown = Attr { mtime: mtime.max(t), ctime: a.ctime.max(t), ..a.clone() };
                file_attr(&shown, size, MAX_WRITE)
            }
            _ if mtime != a.mtime => file_attr(&Attr { mtime, ..a.clone() }, size, MAX_WRITE),
            _ => file_attr(a, size, MAX_WRITE),
        }
    }

    /// Open directory `fh`'s listing to be read from `offset`, fresh enough to hand the kernel. It
    /// was taken at opendir, and a program may read its directory long after: attributes older
    /// than a change that came since would set the kernel's size of a file back (an append would
    /// then land over the data after the old end) and the size this mount plans partial-block
    /// writes against, and a name removed since would be given back to the kernel. So once this
    /// mount changed anything, or the kernel's cache time has passed, it is taken again. Read from
    /// the start again (`rewinddir`), it is the directory as it is now; read on, its names keep
    /// their places (the handle's offsets count them), a name that has gone is no longer listed,
    /// and names made since are not added (POSIX leaves them unspecified until a rewind).
    fn fresh_listing(&self, req: &Request, dir: u64, fh: u64, offset: u64) -> Result<Arc<Listing>, Errno> {
        let Some(listing) = lock(&self.dirs).get(&fh).cloned() else { return Err(refuse(Errno::EBADF)) };
        if listing.epoch == self.ahead.changes() && listing.taken.elapsed() < TTL {
            return Ok(listing);
        }
        let (taken, epoch, asked) = (Instant::now(), self.ahead.changes(), self.seen.asking());
        let (parent, now) = self.entries_of(req, dir).map_err(|e| errno(&e))?;
        let entries = if offset == 0 {
            now.into_iter().map(|(name, a)| (name, a, false)).collect()
        } else {
            let now: HashMap<Vec<u8>, Attr> = now.into_iter().collect();
            listing
                .entries
                .iter()
                .map(|(name, old, _)| match now.get(name) {
                    Some(a) => (name.clone(), a.clone(), false),
                    None => (name.clone(), old.clone(), true),
                })
                .collect()
        };
        let fresh = Arc::new(Listing { entries, parent, taken, epoch, asked });
        // Not again if a releasedir came meanwhile.
        if let Some(slot) = lock(&self.dirs).get_mut(&fh) {
            *slot = fresh.clone();
        }
        Ok(fresh)
    }

    /// Directory `dir`'s parent, and its entries with their attributes. A directory removed while
    /// a process still has it (its working directory, an open handle) lists as empty, as on
    /// Linux's file systems: the kernel hands its inode here after the metaserver has forgotten it.
    fn entries_of(&self, req: &Request, dir: u64) -> FsResult<crate::shared::DirListing> {
        match self.c(req).listing(dir) {
            Err(FsError::NotFound) => {
                let parent = lock(&self.removed_dirs).attrs.get(&dir).map_or(crate::shared::ROOT, |a| a.parent);
                Ok((parent, Vec::new()))
            }
            r => r,
        }
    }

    fn reply_entry(&self, r: FsResult<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Replies to a request that changed something, after voiding the listings fetched ahead.
    fn reply_changed(&self, r: FsResult<Attr>, reply: ReplyEntry) {
        self.changed();
        self.reply_entry(r, reply)
    }

    /// Replies to a request that removed a name; the inode it orphaned (if any) is freed now or at
    /// its last close here.
    fn reply_removed(&self, r: FsResult<u64>, reply: ReplyEmpty) {
        self.changed();
        self.reply_removed_after(r, reply)
    }

    /// [`Self::reply_removed`] once the listings fetched ahead were told of the change.
    fn reply_removed_after(&self, r: FsResult<u64>, reply: ReplyEmpty) {
        match r {
            Ok(orphan) => {
                self.reclaim.orphaned(orphan);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Replies to a change that answers nothing but success or an error.
    fn reply_changed_empty(&self, r: FsResult<()>, reply: ReplyEmpty) {
        self.changed();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Records that this mount changed something (called after the change, whatever its outcome).
    fn changed(&self) {
        self.ahead.changed();
    }

    /// The size this mount knows for `ino` (refreshed by every attribute reply and at open), grown by
    /// writes it has accepted. Reads use it instead of asking the metaserver each time.
    fn known_size(&self, ino: u64) -> Option<u64> {
        let seen = self.seen.size(ino)?;
        Some(seen.max(self.wb.end(ino).unwrap_or(0)))
    }

    /// A handle for an open of `ino` with open(2)'s `flags`.
    fn add_open(&self, ino: u64, flags: i32) -> u64 {
        self.reclaim.opened(ino);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.wb.opened(ino, fh, flags & libc::O_ACCMODE != libc::O_RDONLY);
        fh
    }

    /// Handle `fh` of `ino` is closed (released, or refused at its open): what is still buffered
    /// goes to the background; at the last close here, the record of a file the kernel forgot
    /// meanwhile goes, and so do the blocks of an orphan, each once every write landed.
    fn closed(&self, ino: u64, fh: u64) {
        self.wb.closed(ino, fh);
        self.wb.send_off(ino);
        let mut last = false;
        let freed = self.reclaim.closed(ino, || {
            last = true;
            self.wb.forget_if_idle(ino)
        });
        if last && lock(&self.forgotten).remove(&ino) {
            self.forget_seen(ino);
        }
        if let Some(orphan) = freed {
            self.wb.after_writes(ino, move || orphan.free());
        }
    }

    /// Drops the record of `ino` in `seen` once its writes have landed (their sink plans by it).
    fn forget_seen(&self, ino: u64) {
        let seen = self.seen.clone();
        self.wb.after_writes(ino, move || seen.forget(ino));
    }

    /// Releases `owner`'s locks on `ino` if it ever set one through this mount (so a close that
    /// never locked costs no call). A caller signalled or killed meanwhile is answered at once and
    /// the unlock goes on in the background, once this mount's writes to the file have landed (an
    /// interrupted flush left them to land on their own; the owner's next lock waits for the
    /// unlock, see [`held`]): a process killed while the metaserver was away waited for it to come
    /// back, unkillable (the kernel waits for the close of a dying process), and held a FUSE
    /// worker thread meanwhile.
    fn release_locks(&self, req: &Request, ino: u64, owner: u64) {
        if !self.held.close_owner(ino, owner) {
            return;
        }
        match self.c(req).lock(ino, owner, (0, u64::MAX), None, 0, false) {
            Err(FsError::Interrupted) => self.unlock_after_writes(ino, vec![owner]),
            r => {
                if let Err(e) = r {
                    tracing::warn!(ino, owner, "releasing locks at close failed: {e}");
                }
                self.held.released(ino, owner);
            }
        }
    }

    /// At the last close of open file `fh`: releases the locks of every owner that locked through
    /// it and through no other open file since (see [`held`]). This covers flock locks (the
    /// kernel names their owner at release) and OFD locks (it does not); a process's fcntl locks
    /// went at its close (flush) already.
    ///
    /// The unlocks go once this mount's writes to the file have landed (see `setlk`), in the
    /// background: nobody waits for a release.
    fn release_locks_of(&self, ino: u64, fh: u64) {
        let owners = self.held.close_file(ino, fh);
        if !owners.is_empty() {
            self.unlock_after_writes(ino, owners);
        }
    }

    /// Unlocks what `owners` hold on `ino` (a close marked the releases as on their way) once
    /// this mount's writes to the file have landed, on a waiter thread: one waiting for a
    /// dataserver or the metaserver that is down would otherwise hold a FUSE worker thread (or a
    /// write-back thread, which the writes of other files need). A waiter thread keeps its
    /// connection for the next.
    fn unlock_after_writes(&self, ino: u64, owners: Vec<u64>) {
        let (c, held) = (self.c.clone(), self.held.clone());
        let (landed, writes) = std::sync::mpsc::channel();
        self.wb.after_writes(ino, move || {
            let _ = landed.send(());
        });
        let unlock = {
            let owners = owners.clone();
            Box::new(move || {
                // Sent once the writes landed (dropped unsent only with the mount).
                let _ = writes.recv();
                owners.into_iter().for_each(|owner| unlock_all(&c, &held, ino, owner));
            })
        };
        if let Err(e) = self.waiters.run(unlock) {
            tracing::warn!(ino, "no thread for the unlocks of a close, done here: {e}");
            owners.into_iter().for_each(|owner| self.unlock_all(ino, owner));
        }
    }

    /// Unlocks what `owner` holds on `ino`; a close marked the release as on its way.
    fn unlock_all(&self, ino: u64, owner: u64) {
        unlock_all(&self.c, &self.held, ino, owner);
    }

    /// What revalidating a file's cached attributes and pages needs, for a thread of its own.
    fn cache(&self) -> Cache {
        Cache {
            seen: self.seen.clone(),
            wb: self.wb.clone(),
            ahead: self.ahead.clone(),
            notifier: self.notifier.clone(),
        }
    }

    /// See [`Cache::revalidate`].
    fn revalidate(&self, c: &Cluster, ino: u64) -> (bool, FsResult<Attr>) {
        self.cache().revalidate(c, ino)
    }
}

/// The mount's records of what the kernel caches, shared with the threads lock waits run on.
struct Cache {
    seen: Arc<Seen>,
    wb: Arc<WriteBack>,
    ahead: Arc<Statahead>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl Cache {
    /// Close-to-open: if another mount changed the file since the kernel last heard of it, drop the
    /// kernel's cached attributes and pages. Returns whether it had changed, and the attributes
    /// (an error if the metaserver did not answer them).
    fn revalidate(&self, c: &Cluster, ino: u64) -> (bool, FsResult<Attr>) {
        let asked = self.seen.asking();
        match c.getattr(ino) {
            // Not taken: this mount changed the file while asking, which is no other mount's
            // change, or a later question's answer is in already.
            Ok(a) => (self.revalidate_from(ino, &a, (asked, asked)).unwrap_or(false), Ok(a)),
            Err(e) => (false, Err(e)),
        }
    }

    /// [`Cache::revalidate`] from attributes the metaserver answered to a call sent and answered
    /// at the stamps given (see [`Seen::answered_between`]): whether another mount had changed
    /// the file, or None if the answer was not taken.
    fn revalidate_from(&self, ino: u64, a: &Attr, stamps: (u64, u64)) -> Option<bool> {
        let pending = self.wb.end(ino).unwrap_or(0);
        let before = self.seen.answered_between(ino, a.size, a.mtime, stamps, pending)?;
        let now = (a.size.max(pending), a.mtime);
        let moved = before.is_some_and(|b| b != now);
        if moved {
            // Another mount changed it: listings fetched ahead may hold the old attributes.
            self.ahead.changed();
        }
        // Not while writes of ours are buffered: the kernel's size then includes them. Once they
        // landed (a close flushes them; the release that drops their state comes later, on its
        // own), the file is the metaserver's again: an append right after another mount's must
        // see its size.
        if moved && self.wb.idle(ino) {
            self.drop_cached(ino);
        }
        Some(moved)
    }

    /// Drops the kernel's cached attributes and pages of `ino`.
    fn drop_cached(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                debug!(ino, "invalidate: {e}");
            }
        }
    }
}

/// A lock request (see [`DfsFs::setlk`]), answered on the thread it waited on.
struct LockRequest {
    ino: u64,
    owner: u64,
    fh: u64,
    range: (u64, u64),
    typ: Option<LockType>,
}

impl LockRequest {
    /// Answers the request from how it went (`r`, through `c`); `plain` is the cluster without
    /// the caller's interruption, which withdraws an interrupted one.
    fn answer(
        &self,
        (r, asked): (FsResult<Option<Attr>>, u64),
        c: &Cluster,
        plain: &Cluster,
        held: &held::Held,
        cache: &Cache,
        reply: ReplyEmpty,
    ) {
        let (ino, owner) = (self.ino, self.owner);
        let received = cache.seen.asking();
        let granted = |attr: Option<Attr>| match self.typ {
            Some(_) => {
                held.granted(ino, owner, self.fh);
                // From the attributes the grant came with, as the metaserver had them when it
                // answered; asked again if there are none, or if they cannot be taken (this
                // mount's writes landed while the request waited, say).
                let taken = attr.and_then(|a| cache.revalidate_from(ino, &a, (asked, received)));
                // Without the attributes (a request interrupted and then found granted has a
                // signalled caller, whose calls give up), the cache goes.
                if taken.is_none() {
                    if let (_, Err(e)) = cache.revalidate(c, ino) {
                        debug!(ino, "revalidating after a lock was granted: {e}");
                        cache.drop_cached(ino);
                    }
                }
            }
            None => held.unlocked(ino, owner, self.fh),
        };
        match r {
            Ok(attr) => {
                granted(attr);
                reply.ok()
            }
            Err(FsError::Interrupted) => {
                let t = self.typ.unwrap_or(LockType::Read);
                match plain.cancel_lock(ino, owner, self.range, t) {
                    // Granted before it could be withdrawn: the caller has it.
                    Ok(true) => {
                        granted(None);
                        reply.ok()
                    }
                    Ok(false) => reply.error(refuse(Errno::EINTR)),
                    Err(e) => {
                        tracing::warn!(ino, owner, "withdrawing an interrupted lock request failed: {e}");
                        reply.error(refuse(Errno::EINTR))
                    }
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Unlocks what `owner` holds on `ino` through `c`, at a close that marked the release in `held`
/// as on its way.
fn unlock_all(c: &Cluster, held: &held::Held, ino: u64, owner: u64) {
    if let Err(e) = c.lock(ino, owner, (0, u64::MAX), None, 0, false) {
        tracing::warn!(ino, owner, "releasing locks at close failed: {e}");
    }
    held.released(ino, owner);
}

/// What the session reports and frees for a mount.
struct MountHost(Arc<Reclaim>, Arc<held::Held>);

impl SessionHost for MountHost {
    fn opens(&self) -> (u64, Vec<u64>) {
        self.0.open_inodes()
    }

    fn free(&self, inos: Vec<u64>) {
        self.0.offered(inos);
    }

    fn expired(&self) {
        self.1.expired();
    }
}

/// The answer to a read or write through an open file whose lock was lost (see `Held::expired`).
fn lock_lost() -> Errno {
    refuse(Errno::EIO)
}

/// A FUSE lock type: read, write, or unlock (None).
fn lock_type(typ: i32) -> Result<Option<LockType>, Errno> {
    match typ {
        libc::F_RDLCK => Ok(Some(LockType::Read)),
        libc::F_WRLCK => Ok(Some(LockType::Write)),
        libc::F_UNLCK => Ok(None),
        _ => Err(refuse(Errno::EINVAL)),
    }
}

/// Whether `req`'s caller was signalled or went away (see [`crate::client::interrupt`]).
fn interrupted(req: &Request) -> bool {
    Caller(req.pid()).interrupted()
}

fn name_bytes(n: &OsStr) -> &[u8] {
    n.as_bytes()
}

impl Filesystem for DfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.add_capabilities(
            InitFlags::FUSE_AUTO_INVAL_DATA | InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_DO_READDIRPLUS,
        );
        // Locks go to the metaserver, so they hold across mounts; without these the kernel would
        // keep fcntl and flock locks to this machine.
        if config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS).is_err() {
            tracing::warn!("the kernel does not pass locks to FUSE: locks hold within this machine only");
        }
        info!("mounted: block size {}, {} dataservers", self.block_size, self.c.layout().n());
        Ok(())
    }

    /// The kernel forgot `ino` (it evicted its inode, or a lookup found another inode under a name
    /// it had): what this mount keeps of the file goes, unless it is open or being written here.
    /// Should the kernel still have the inode (the second case), its cached pages are checked
    /// against the file's attributes at their next refresh, within a second, instead of at the
    /// next open.
    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        if self.reclaim.open_count(ino.0) == 0 {
            self.forget_seen(ino.0);
        } else {
            // The kernel may forget a file before it sends the release of its last close.
            lock(&self.forgotten).insert(ino.0);
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = counted("lookup");
        let name = name_bytes(name);
        // Before the look at the listings: a write that lands after it voids what they answer.
        let asked = self.seen.asking();
        let fetch = match self.ahead.lookup(parent.0, name) {
            // The answer to the listing's question, not to this lookup's.
            Answer::Found(a, ttl, listed) => {
                self.no_xattrs.noted(&a, listed, ttl);
                return reply.entry(&ttl, &self.answer_attr(&a, listed), Generation(0));
            }
            // Refetching would not help: a search for names that are not there (a PATH or include
            // path search) would otherwise refetch the listing every few lookups.
            Answer::Missing => false,
            Answer::NoListing => self.ahead.count_lookup(parent.0),
        };
        let c = self.c(req);
        match c.lookup(parent.0, name) {
            Ok(a) => {
                self.no_xattrs.noted(&a, asked, TTL);
                reply.entry(&TTL, &self.answer_attr(&a, asked), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
        if fetch {
            self.ahead.fetch(parent.0, self.seen.asking(), || c.readdir(parent.0));
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = counted("getattr");
        let c = self.c(req);
        // A directory this mount just changed: the kernel dropped its attributes for that change,
        // and the change's answer carried them.
        if let Some((a, left)) = c.fresh_dir(ino.0) {
            return reply.attr(&left, &self.attr(&a));
        }
        let asked = self.seen.asking();
        let r = c.getattr(ino.0).or_else(|e| match e {
            FsError::NotFound => lock(&self.removed_dirs).attrs.get(&ino.0).cloned().ok_or(e),
            e => Err(e),
        });
        match r {
            Ok(a) => {
                self.no_xattrs.noted(&a, asked, TTL);
                reply.attr(&TTL, &self.answer_attr(&a, asked))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = counted("setattr");
        let ts = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => TimeSet::Now,
                TimeOrNow::SpecificTime(s) => TimeSet::At(time_ns(s)),
            })
        };
        let set =
            SetAttr { perm: mode.map(|m| (m & 0o7777) as u16), uid, gid, size, atime: ts(atime), mtime: ts(mtime) };
        // Every change of attributes comes after the writes before it: an explicit mtime (cp -p,
        // tar -x, touch -d on an open file) must not be overwritten when buffered writes land,
        // and a new size must apply to the data written so far.
        // A file open here may be written by another thread meanwhile: its writes wait for the
        // change (see `WriteBack::changing`).
        let c = self.c(req);
        let sized = size.is_some();
        let r = if self.reclaim.open_count(ino.0) > 0 {
            self.wb.changing(ino.0, sized, &|| interrupted(req), || c.setattr(ino.0, set))
        } else {
            let r = self.wb.flush(ino.0, Tell::Nobody, &|| interrupted(req)).and_then(|()| c.setattr(ino.0, set));
            if sized && r.is_ok() {
                self.wb.truncated(ino.0);
            }
            r
        };
        self.changed();
        match r {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = counted("readlink");
        match self.c(req).readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let _op = counted("mknod");
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return reply.error(refuse(Errno::EINVAL)),
        };
        let node = NewNode { kind, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev };
        self.reply_changed(self.c(req).mknod(parent.0, name_bytes(name), node), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let _op = counted("mkdir");
        let node =
            NewNode { kind: Kind::Dir, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev: 0 };
        self.reply_changed(self.c(req).mknod(parent.0, name_bytes(name), node), reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = counted("unlink");
        let (c, name) = (self.c(req), name_bytes(name));
        let r = c.unlink(parent.0, name);
        match r {
            // The inode's last name went: the listings fetched ahead stay, without it.
            Ok(orphan) if orphan != 0 => self.ahead.removed(parent.0, name, c.fresh_dir_parent(parent.0)),
            _ => self.changed(),
        }
        self.reply_removed_after(r, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = counted("rmdir");
        let r = self.c(req).rmdir(parent.0, name_bytes(name));
        let r = r.map(|gone| gone.into_iter().for_each(|a| lock(&self.removed_dirs).record(a)));
        self.reply_changed_empty(r, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let _op = counted("symlink");
        let r =
            self.c(req).symlink(parent.0, name_bytes(link_name), target.as_os_str().as_bytes(), req.uid(), req.gid());
        self.reply_changed(r, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = counted("rename");
        let bits = flags.bits();
        let mut f = 0;
        if bits & libc::RENAME_NOREPLACE != 0 {
            f |= RENAME_NOREPLACE;
        }
        if bits & libc::RENAME_EXCHANGE != 0 {
            f |= RENAME_EXCHANGE;
        }
        if bits & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return reply.error(refuse(Errno::EINVAL));
        }
        let r = self.c(req).rename(parent.0, name_bytes(name), newparent.0, name_bytes(newname), f);
        let r = r.map(|(orphan, gone)| {
            gone.into_iter().for_each(|a| lock(&self.removed_dirs).record(a));
            orphan
        });
        self.reply_removed(r, reply);
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let _op = counted("link");
        self.reply_changed(self.c(req).link(ino.0, newparent.0, name_bytes(newname)), reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = counted("open");
        // Open first, then ask: the session's next report must hold this open before a removal
        // by another mount can be freed, and the getattr may take longer than a heartbeat.
        let fh = self.add_open(ino.0, flags.0);
        let (moved, now) = self.revalidate(&self.c(req), ino.0);
        // The kernel may hold a name for up to a second after another mount removed or replaced
        // it, and open the inode it had. ESTALE makes it look the name up again and open what it
        // names now (or create it, or answer ENOENT), as a local file system would. Not a file
        // open here already, which a process may open again through /proc while it has no name.
        let gone = match &now {
            Err(FsError::NotFound) => true,
            Ok(a) => a.nlink == 0 && self.reclaim.open_count(ino.0) <= 1,
            Err(_) => false,
        };
        if gone {
            self.closed(ino.0, fh);
            // The kernel's second lookup must not be answered from a listing fetched ahead, which
            // may still hold the old inode under the name.
            self.changed();
            return reply.error(refuse(Errno::ESTALE));
        }
        // The kernel places an O_APPEND write at the size it has cached, which another mount's
        // changes may have outdated (it refreshes no attributes before a write); `write` places it
        // at the end this mount knows instead. When the file did change elsewhere, direct I/O
        // keeps the kernel from caching the data at the offset it chose.
        let stale_size = moved && flags.0 & libc::O_APPEND != 0;
        reply.opened(FileHandle(fh), if stale_size { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _op = counted("read");
        if self.held.lost(fh.0) {
            return reply.error(lock_lost());
        }
        if let Err(e) = self.wb.flush(ino.0, Tell::Nobody, &|| interrupted(req)) {
            return reply.error(errno(&e));
        }
        let r = match self.known_size(ino.0) {
            Some(known) => self.c(req).read_at(ino.0, offset, u64::from(size), known),
            None => self.c(req).read(ino.0, offset, u64::from(size)),
        };
        match r {
            Ok(d) => {
                metrics::bytes("read", d.len());
                reply.data(&d)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = counted("write");
        if self.held.lost(fh.0) {
            return reply.error(lock_lost());
        }
        let offset = match self.known_size(ino.0) {
            Some(end) if flags.0 & libc::O_APPEND != 0 => offset.max(end),
            _ => offset,
        };
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > crate::shared::MAX_SIZE) {
            return reply.error(refuse(Errno::EFBIG));
        }
        if let Err(e) = self.wb.write(ino.0, fh.0, offset, data, &|| interrupted(req)) {
            return reply.error(errno(&e));
        }
        metrics::bytes("write", data.len());
        reply.written(data.len() as u32);
    }

    /// The flush at close: the kernel waits for it even when the caller was killed, so an
    /// interrupted flush leaves its data to the background (a later flush or fsync of a handle
    /// open meanwhile reports how it went) instead of holding the caller.
    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let _op = counted("flush");
        let flushed = self.wb.flush(ino.0, Tell::Close(fh.0), &|| interrupted(req));
        // POSIX: closing any descriptor of a file releases the process's fcntl locks on it; after
        // the writes made under them have landed (see `setlk`), as Linux releases them after the
        // flush.
        self.release_locks(req, ino.0, lock_owner.0);
        match flushed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = counted("release");
        // The kernel names the owner of the file's flock locks here, but that owner may be a
        // newer open file's by now; the locks taken through this one are known by its handle.
        self.release_locks_of(ino.0, fh.0);
        // Nobody waits for a release (the kernel sends it after the last close): what is still
        // buffered goes to the background, and its errors to the flush or fsync of the handles
        // still open.
        self.closed(ino.0, fh.0);
        reply.ok();
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _op = counted("fsync");
        // Every write the cluster accepted is already on all replicas and durable.
        match self.wb.flush(ino.0, Tell::Fsync(fh.0), &|| interrupted(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = counted("opendir");
        let (taken, epoch, asked) = (Instant::now(), self.ahead.changes(), self.seen.asking());
        match self.entries_of(req, ino.0) {
            Ok((parent, entries)) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                let entries = entries.into_iter().map(|(n, a)| (n, a, false)).collect();
                lock(&self.dirs).insert(fh, Arc::new(Listing { entries, parent, taken, epoch, asked }));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _op = counted("readdir");
        let entries = match self.fresh_listing(req, ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let dots =
            [(ino.0, FileType::Directory, OsStr::new(".")), (entries.parent, FileType::Directory, OsStr::new(".."))];
        let names = entries.entries.iter().map(|(n, a, gone)| (a.ino, file_type(a.kind), OsStr::from_bytes(n), *gone));
        let all = dots.into_iter().map(|(i, k, n)| (i, k, n, false)).chain(names);
        for (i, (child, kind, name, gone)) in all.enumerate().skip(offset as usize) {
            if gone {
                continue;
            }
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Entries with their attributes (the listing has them already), so that `ls -l` and tree walks
    /// need no LOOKUP per entry.
    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let _op = counted("readdirplus");
        let entries = match self.fresh_listing(req, ino.0, fh.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        // The kernel makes no dentries for "." and "..", so their attributes only need the right kind.
        let dot = |ino: u64| FileAttr {
            ino: INodeNo(ino),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: MAX_WRITE,
            flags: 0,
        };
        // The attributes were taken up to a second ago: the kernel keeps them for what is left of
        // that second, no more than it keeps any other attributes.
        let left = crate::client::time_left(TTL, entries.taken.elapsed()).unwrap_or_default();
        let mut i = offset as usize;
        while i < 2 {
            let (child, name) = if i == 0 { (ino.0, ".") } else { (entries.parent, "..") };
            if reply.add(INodeNo(child), (i + 1) as u64, name, &TTL, &dot(child), Generation(0)) {
                return reply.ok();
            }
            i += 1;
        }
        for (k, (name, a, gone)) in entries.entries.iter().enumerate().skip(i - 2) {
            if *gone {
                continue;
            }
            self.no_xattrs.noted(a, entries.asked, left);
            if reply.add(
                INodeNo(a.ino),
                (k + 3) as u64,
                OsStr::from_bytes(name),
                &left,
                &self.answer_attr(a, entries.asked),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        let _op = counted("releasedir");
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _op = counted("fsyncdir");
        reply.ok(); // namespace changes are durable when they return
    }

    /// Size, used and free as DFS sees them: used is what the files take (the size of the servers'
    /// block stores on disk, over R); free is what can still be written before the fullest disk fills. Blocks go
    /// round-robin to every server, R copies each, so a disk that holds k of the n servers receives
    /// k·R/n of every byte written (servers that share a disk share its free space).
    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = counted("statfs");
        const BSIZE: u64 = 4096;
        let c = self.c(req);
        let (n, r) = (self.c.layout().n() as u64, u64::from(self.c.layout().replicas.max(1)));
        let mut stored = 0u64;
        let mut disks: HashMap<u64, (u64, u64)> = HashMap::new();
        for s in 0..self.c.layout().n() {
            if let Ok(Ok(st)) = c.server_status(s) {
                stored += st.bytes;
                let d = disks.entry(st.disk_id).or_insert((st.disk_free, 0));
                d.0 = d.0.min(st.disk_free);
                d.1 += 1;
            }
        }
        let free = disks.values().map(|&(free, k)| free.saturating_mul(n) / (k * r)).min().unwrap_or(0);
        // Servers report bytes of disk; a block takes more than its size there.
        let bs = self.c.layout().block_size as usize;
        let free = free / crate::shared::block::disk_bytes(bs) * bs as u64;
        let used = stored / r;
        let files = c.inode_count().unwrap_or(0);
        let (blocks, bfree) = ((used + free) / BSIZE, free / BSIZE);
        reply.statfs(blocks, bfree, bfree, files + bfree, bfree, BSIZE as u32, 255, BSIZE as u32);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let _op = counted("access");
        reply.ok(); // permissions are checked by the kernel (default_permissions)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = counted("create");
        let node = NewNode {
            kind: Kind::File,
            perm: (mode & !umask & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
        };
        let r = self.c(req).mknod(parent.0, name_bytes(name), node);
        self.changed();
        match r {
            Ok(a) => {
                let fh = self.add_open(a.ino, flags);
                reply.created(&TTL, &self.attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty());
            }
            // Without O_EXCL, a name another mount created after this kernel looked it up (two
            // processes on two mounts opening one new file at once) must open that file, as on a
            // local file system, not fail. ESTALE makes the kernel do the open once more with a
            // fresh lookup, which finds the file and opens it the usual way: its own access
            // checks, O_TRUNC, a symlink followed, EISDIR for a directory.
            Err(FsError::Exists) if flags & libc::O_EXCL == 0 => reply.error(refuse(Errno::ESTALE)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let _op = counted("getlk");
        let typ = match lock_type(typ) {
            Ok(Some(t)) => t,
            Ok(None) => return reply.error(refuse(Errno::EINVAL)),
            Err(e) => return reply.error(e),
        };
        match self.c(req).test_lock(ino.0, lock_owner.0, (start, end), typ) {
            Ok(Some(l)) => {
                let t = if l.typ == LockType::Write { libc::F_WRLCK } else { libc::F_RDLCK };
                reply.locked(l.start, l.end, t, l.pid)
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// fcntl F_SETLK/F_SETLKW, OFD locks and flock: a request that has to wait waits on a thread
    /// of its own, until granted, or answers EINTR once its caller is signalled (the request is
    /// withdrawn). Not on this worker: the mount's workers are few (`--threads`), and as many
    /// waiters would leave none to serve the holder's unlock, which they wait for.
    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let op = counted("setlk");
        let typ = match lock_type(typ) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let (ino, owner) = (ino.0, lock_owner.0);
        if typ.is_some() {
            if let Err(e) = self.held.locking(ino, owner, fh.0, &|| interrupted(req)) {
                return reply.error(errno(&e));
            }
        }
        // A lock is where mounts hand a file over, as NFS makes it: what this mount wrote lands
        // before it locks or unlocks (an interrupted wait leaves it to land on its own, and the
        // lock or unlock goes on), and once it holds a lock it drops what the kernel cached of a
        // file another mount changed, so a read under the lock sees the last holder's writes.
        let _ = self.wb.flush(ino, Tell::Nobody, &|| interrupted(req));
        // An unlock is not interruptible: fcntl's and flock's unlocks never answer EINTR, and
        // withdrawing one (as a waiting request is withdrawn) would answer it from whether the
        // lock is still held, which says nothing of the unlock. It goes on through a metaserver's
        // absence instead.
        let c = if typ.is_some() { self.c(req) } else { self.c.clone() };
        let q = LockRequest { ino, owner, fh: fh.0, range: (start, end), typ };
        let (held, cache, plain) = (self.held.clone(), self.cache(), self.c.clone());
        // Asked first without waiting: a lock that is free (most are) is answered from here.
        let asked = cache.seen.asking();
        let first = c.lock(ino, owner, (start, end), typ, pid, false);
        if !(sleep && typ.is_some() && matches!(first, Err(FsError::WouldBlock))) {
            return q.answer((first, asked), &c, &plain, &held, &cache, reply);
        }
        let wait = move || {
            let _op = op;
            let asked = cache.seen.asking();
            let r = c.lock(ino, owner, (start, end), typ, pid, true);
            q.answer((r, asked), &c, &plain, &held, &cache, reply);
        };
        // Were no thread to be had, the reply would go unanswered, which fuser answers EIO.
        if let Err(e) = self.waiters.run(Box::new(wait)) {
            tracing::warn!(ino, owner, "no thread for a lock request to wait on: {e}");
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = counted("setxattr");
        // A position is macOS's resource forks only.
        if position != 0 {
            return reply.error(refuse(Errno::EINVAL));
        }
        self.no_xattrs.changing(ino.0);
        let r = self.c(req).set_xattr(ino.0, name_bytes(name), value, flags as u32);
        self.no_xattrs.changed(ino.0, self.seen.asking());
        self.reply_changed_empty(r, reply);
    }

    /// `size` 0 asks how large the value is; a value larger than `size` is ERANGE.
    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        let _op = counted("getxattr");
        // Asked before every write (FUSE mounts are never "nosec"); never kept, so never asked on.
        if name_bytes(name) == crate::metaserver::namespace::xattrs::CAPABILITY {
            return reply.error(refuse(Errno::ENODATA));
        }
        // A name the metaserver would refuse is left to it to answer.
        if self.no_xattrs.none(ino.0) && crate::metaserver::namespace::xattrs::validate_name(name_bytes(name)).is_ok() {
            return reply.error(refuse(Errno::ENODATA));
        }
        match self.c(req).xattr(ino.0, name_bytes(name)) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(refuse(Errno::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// The names, each followed by a NUL; sized as `getxattr`.
    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let _op = counted("listxattr");
        if self.no_xattrs.none(ino.0) {
            return if size == 0 { reply.size(0) } else { reply.data(&[]) };
        }
        match self.c(req).xattrs(ino.0) {
            Ok(names) => {
                // Linux lists `trusted.*` attributes to privileged callers only (and refuses their
                // values to others itself); a FUSE filesystem's list reaches the caller as it is.
                // FUSE passes no capabilities: root stands for CAP_SYS_ADMIN.
                let names: Vec<_> =
                    names.into_iter().filter(|n| req.uid() == 0 || !n.starts_with(b"trusted.")).collect();
                let mut list = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
                for n in names {
                    list.extend_from_slice(&n);
                    list.push(0);
                }
                if size == 0 {
                    reply.size(list.len() as u32)
                } else if list.len() > size as usize {
                    reply.error(refuse(Errno::ERANGE))
                } else {
                    reply.data(&list)
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = counted("removexattr");
        self.no_xattrs.changing(ino.0);
        let r = self.c(req).remove_xattr(ino.0, name_bytes(name));
        self.no_xattrs.changed(ino.0, self.seen.asking());
        self.reply_changed_empty(r, reply);
    }

    /// Mode 0 grows the size to cover the range (DFS reserves no space ahead: a later write can
    /// still find a disk full); KEEP_SIZE alone changes nothing; PUNCH_HOLE (with KEEP_SIZE) and
    /// ZERO_RANGE write zeros over the range (within the size for the first; ZERO_RANGE grows it
    /// unless KEEP_SIZE), so the range reads as zeros: the blocks it covers whole are stored empty
    /// (their space freed, see `Engine::write`), the partial ones at its edges keep their other
    /// bytes. Other modes (COLLAPSE_RANGE, INSERT_RANGE, ...) answer EOPNOTSUPP.
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = counted("fallocate");
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        let Some(end) = offset.checked_add(length).filter(|&e| e <= crate::shared::MAX_SIZE) else {
            return reply.error(refuse(Errno::EFBIG));
        };
        let c = self.c(req);
        // The size now, not the one this mount saw last: another mount may have grown the file.
        let size_now = || c.getattr(ino.0).map(|a| a.size.max(self.wb.end(ino.0).unwrap_or(0)));
        let zero_to = match mode {
            0 => {
                // Grows from the size it asks for itself, never below it.
                let r = self.wb.changing(ino.0, true, &|| interrupted(req), || c.grow(ino.0, end));
                self.changed();
                return match r {
                    // The size reads plan against: the kernel grew the file itself, and a read
                    // it sends (a fault of a mapping) must not stop at the old end.
                    Ok(a) => {
                        self.seen.record(a.ino, a.size, a.mtime);
                        reply.ok()
                    }
                    Err(e) => reply.error(errno(&e)),
                };
            }
            KEEP => return reply.ok(),
            ZERO => end,
            m if m == PUNCH || m == ZERO | KEEP => match size_now() {
                Ok(size) => end.min(size),
                Err(e) => return reply.error(errno(&e)),
            },
            _ => return reply.error(refuse(Errno::EOPNOTSUPP)),
        };
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(zero_to.saturating_sub(offset)) as usize];
        let mut at = offset;
        while at < zero_to {
            let n = PIECE.min(zero_to - at) as usize;
            if let Err(e) = self.wb.write(ino.0, fh.0, at, &zeros[..n], &|| interrupted(req)) {
                return reply.error(errno(&e));
            }
            at += n as u64;
        }
        self.changed();
        reply.ok()
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let _op = counted("lseek");
        reply.error(refuse(Errno::ENOSYS));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _op = counted("copy_file_range");
        reply.error(refuse(Errno::ENOSYS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests that wait one after another wait on one thread, kept; as many wait at once, as
    /// many threads. Regression: a thread per wait, each leaving its connections behind.
    #[test]
    fn lock_waits_reuse_their_threads() {
        let w = Waiters::default();
        for _ in 0..10 {
            let (tx, rx) = std::sync::mpsc::channel();
            w.run(Box::new(move || tx.send(()).unwrap())).unwrap();
            rx.recv_timeout(Duration::from_secs(10)).expect("ran");
            // The thread counts itself idle just after the job returns.
            let start = Instant::now();
            while w.idle.load(Ordering::Acquire) == 0 {
                assert!(start.elapsed() < Duration::from_secs(10), "the thread never came back");
                std::thread::yield_now();
            }
        }
        assert_eq!(w.threads.load(Ordering::Relaxed), 1);
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..3 {
            let (gate, tx) = (gate.clone(), tx.clone());
            w.run(Box::new(move || {
                let (open, cv) = &*gate;
                let _open = cv.wait_while(lock(open), |o| !*o).unwrap();
                tx.send(()).unwrap();
            }))
            .unwrap();
        }
        *lock(&gate.0) = true;
        gate.1.notify_all();
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(10)).expect("each ran");
        }
        assert_eq!(w.threads.load(Ordering::Relaxed), 3);
    }
}
