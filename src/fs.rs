//! The FUSE adapter (fuser): translates kernel requests into [`Cluster`] calls and replies. It owns
//! only client-side state: open handles, directory snapshots, per-inode write buffers that coalesce
//! small writes into whole blocks, and orphans waiting for their last close.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info, warn};

use crate::namespace::{Attr, FsError, FsResult, Kind, NewNode, SetAttr, TimeSet, RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::rpc::client::Cluster;

/// How long the kernel may cache attributes and entries. Short, so that other mounts' changes show
/// soon; `open` also revalidates (close-to-open).
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;
/// Once a write buffer holds this much, its whole blocks are flushed in the background while
/// the writer goes on filling the buffer (see [`Dirty`]).
const BUFFER_BYTES: usize = 2 << 20;
/// Background flushes in flight per inode; a writer that gets further ahead waits. They keep the
/// servers busy while the next buffer fills (2 x 4, 3 x 4 and 3 x 8 MiB measured the same), and
/// bound the memory and what a dying client can lose.
const FLUSHES_IN_FLIGHT: usize = 4;
/// Threads that run background flushes (for all inodes).
const FLUSH_THREADS: usize = 4;
/// Lookups in a row in one directory after which its whole listing is fetched (see [`Ahead`]).
const AHEAD_AFTER: u32 = 8;
/// Directories whose listings [`Ahead`] keeps at once.
const AHEAD_DIRS: usize = 16;
/// Most orphans reclaimed together.
const RECLAIM_BATCH: usize = 4096;
/// How long the first orphan of a batch waits for others (a burst of deletes shares the commits).
const RECLAIM_LINGER: Duration = Duration::from_millis(50);

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// A directory's entries (name, attributes), as taken at opendir.
type Listing = Vec<(Vec<u8>, Attr)>;

/// Pending writes of one inode: a contiguous run of bytes not yet sent to the cluster.
#[derive(Default)]
struct Buffer {
    start: u64,
    data: Vec<u8>,
}

/// One inode's writes not yet on the cluster. A sequential writer fills `buf`; each time it holds
/// [`BUFFER_BYTES`], its whole blocks go to a background flush, so that the servers store one
/// chunk while the kernel hands over the next. Every other path (flush, fsync, close, read,
/// truncate, a write elsewhere in the file) first waits for the background flushes: they cover
/// disjoint whole blocks, so their order does not matter, but anything after them must see them
/// landed (and get block versions later than theirs).
#[derive(Default)]
struct Dirty {
    /// The end of the furthest write accepted; the file's size is at least this (reported to the
    /// kernel even before the bytes are flushed, so it never sees the file shrink).
    end: AtomicU64,
    buf: Mutex<Buffer>,
    in_flight: Mutex<InFlight>,
    landed: Condvar,
}

#[derive(Default)]
struct InFlight {
    n: usize,
    /// The first error a background flush met, reported by the next write, flush, fsync or close
    /// (as the kernel reports a failed writeback).
    err: Option<FsError>,
}

impl Dirty {
    /// Waits until at most `max` background flushes are in flight; then hands over the first
    /// error one of them met, if any.
    fn wait_in_flight(&self, max: usize) -> FsResult<()> {
        let mut f = lock(&self.in_flight);
        while f.n > max {
            f = self.landed.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        f.err.take().map_or(Ok(()), Err)
    }

    fn landed(&self, r: FsResult<()>) {
        let mut f = lock(&self.in_flight);
        f.n -= 1;
        if let Err(e) = r {
            f.err.get_or_insert(e);
        }
        self.landed.notify_all();
    }
}

/// Statahead (Lustre's name for it): a run of lookups in one directory (`stat` of each file by name,
/// a build checking its sources, `ls` without readdirplus) costs a metaserver round trip each. After
/// [`AHEAD_AFTER`] of them in a row in one directory, its entries and their attributes are fetched in
/// one call and answer lookups of names in it for [`TTL`], as long as the kernel may cache the same
/// answers anyway. Any change made through this mount discards every listing (see `DfsFs::epoch`);
/// a name not in the listing is still looked up, so that files created elsewhere show at once.
#[derive(Default)]
struct Ahead {
    /// The directory of the last lookup that went to the metaserver, how many did in a row, and the
    /// epoch they saw (a change in between starts a new run: creating files also looks up each name
    /// first, and a listing would be void at the next create).
    streak: (u64, u32, u64),
    /// A directory whose listing is being fetched (one at a time).
    fetching: Option<u64>,
    listed: HashMap<u64, Listed>,
}

enum AheadAnswer {
    /// The name's attributes, and the time left until the listing expires (the kernel may cache
    /// the answer that long, and no longer).
    Found(Attr, Duration),
    /// A fresh listing lacks the name: ask the metaserver (another mount may have just made it),
    /// but do not count towards fetching the listing again.
    Missing,
    NoListing,
}

struct Listed {
    at: Instant,
    /// `DfsFs::epoch` before the fetch: the listing is stale once it moved.
    epoch: u64,
    names: HashMap<Vec<u8>, Attr>,
}

type Job = Box<dyn FnOnce() + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct DfsFs {
    c: Cluster,
    block_size: u64,
    next_fh: AtomicU64,
    /// Open directory handles: fh -> snapshot of entries taken at opendir.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    /// Open handles per inode.
    opens: Mutex<HashMap<u64, u32>>,
    dirty: Mutex<HashMap<u64, Arc<Dirty>>>,
    /// Inodes whose last link went while open here: reclaimed at their last close.
    doomed: Mutex<HashSet<u64>>,
    /// (size, mtime) last reported to the kernel per inode, to notice other mounts' changes at open.
    seen: Arc<Mutex<HashMap<u64, (u64, i64)>>>,
    /// Moves on every change made through this mount (after it is made), so that [`Ahead`]'s
    /// listings taken before it are not used.
    epoch: Arc<AtomicU64>,
    ahead: Mutex<Ahead>,
    reclaim: Mutex<mpsc::Sender<u64>>,
    /// Background flushes (see [`Dirty`]).
    flushes: Mutex<mpsc::Sender<Job>>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl DfsFs {
    /// `notifier` is filled in once the session exists (it is made from the session).
    pub fn new(c: Cluster, notifier: Arc<OnceLock<Notifier>>) -> DfsFs {
        let (tx, rx) = mpsc::channel::<u64>();
        let bg = c.clone();
        // Deleting an orphan's blocks waits for every dataserver; it must not hold up unlink. The
        // orphans queued meanwhile go together: a batch costs one commit per server, so that a
        // burst of deletes does not put several commits per file on the disks behind the unlinks.
        std::thread::Builder::new()
            .name("dfs-reclaim".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    let until = std::time::Instant::now() + RECLAIM_LINGER;
                    while batch.len() < RECLAIM_BATCH {
                        match rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now())) {
                            Ok(ino) => batch.push(ino),
                            Err(_) => break,
                        }
                    }
                    match bg.reclaim(batch.clone()) {
                        Ok(()) => debug!("reclaimed {} inode(s)", batch.len()),
                        Err(e) => {
                            warn!("reclaiming {} inode(s) from {}: {e}; they stay orphans", batch.len(), batch[0])
                        }
                    }
                }
            })
            .ok();
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..FLUSH_THREADS {
            let rx = rx.clone();
            let worker = move || loop {
                let job = lock(&rx).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            };
            if let Err(e) = std::thread::Builder::new().name(format!("dfs-flush-{i}")).spawn(worker) {
                warn!("cannot start a flush thread: {e}");
            }
        }
        DfsFs {
            block_size: u64::from(c.layout().block_size),
            c,
            next_fh: AtomicU64::new(1),
            dirs: Mutex::default(),
            opens: Mutex::default(),
            dirty: Mutex::default(),
            doomed: Mutex::default(),
            seen: Arc::default(),
            epoch: Arc::default(),
            ahead: Mutex::default(),
            reclaim: Mutex::new(tx),
            flushes: Mutex::new(jobs),
            notifier,
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let mut size = a.size;
        if let Some(d) = lock(&self.dirty).get(&a.ino) {
            size = size.max(d.end.load(Ordering::Acquire));
        }
        lock(&self.seen).insert(a.ino, (size, a.mtime));
        let (size, blocks) = match a.kind {
            Kind::Dir => (4096, 8),
            _ => (size, size.div_ceil(512)),
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size,
            blocks,
            atime: time(a.atime),
            mtime: time(a.mtime),
            ctime: time(a.ctime),
            crtime: time(a.ctime),
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: MAX_WRITE,
            flags: 0,
        }
    }

    fn reply_entry(&self, r: FsResult<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Replies to a request that changed something, after moving the epoch (see [`Ahead`]).
    fn reply_changed(&self, r: FsResult<Attr>, reply: ReplyEntry) {
        self.changed();
        self.reply_entry(r, reply)
    }

    /// Records that this mount changed something (called after the change, whatever its outcome).
    fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// What a listing of `parent` fetched ahead (see [`Ahead`]) says of `name`.
    fn lookup_ahead(&self, parent: u64, name: &[u8]) -> AheadAnswer {
        let epoch = self.epoch.load(Ordering::Acquire);
        let ahead = lock(&self.ahead);
        let Some(l) = ahead.listed.get(&parent).filter(|l| l.epoch == epoch) else { return AheadAnswer::NoListing };
        let Some(left) = TTL.checked_sub(l.at.elapsed()).filter(|d| !d.is_zero()) else {
            return AheadAnswer::NoListing;
        };
        match l.names.get(name) {
            Some(a) => AheadAnswer::Found(a.clone(), left),
            None => AheadAnswer::Missing,
        }
    }

    /// Counts a lookup in `parent` that went to the metaserver. True when the caller should now
    /// fetch `parent`'s listing ([`Self::fetch_ahead`]).
    fn count_lookup(&self, parent: u64) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut a = lock(&self.ahead);
        if a.streak.0 == parent && a.streak.2 == epoch {
            a.streak.1 += 1;
        } else {
            a.streak = (parent, 1, epoch);
        }
        if a.streak.1 < AHEAD_AFTER || a.fetching.is_some() {
            return false;
        }
        a.fetching = Some(parent);
        a.streak.1 = 0;
        true
    }

    fn fetch_ahead(&self, parent: u64) {
        // Taken before the call, so that a change made meanwhile (or any time after) voids it.
        let (at, epoch) = (Instant::now(), self.epoch.load(Ordering::Acquire));
        let r = self.c.readdir(parent);
        let mut a = lock(&self.ahead);
        a.fetching = None;
        let entries = match r {
            Ok(e) => e,
            Err(e) => return debug!("statahead of directory {parent}: {e}"),
        };
        a.listed.retain(|_, l| l.at.elapsed() < TTL);
        if a.listed.len() >= AHEAD_DIRS {
            if let Some(oldest) = a.listed.iter().min_by_key(|(_, l)| l.at).map(|(d, _)| *d) {
                a.listed.remove(&oldest);
            }
        }
        a.listed.insert(parent, Listed { at, epoch, names: entries.into_iter().collect() });
    }

    fn dirty_of(&self, ino: u64) -> Arc<Dirty> {
        lock(&self.dirty).entry(ino).or_default().clone()
    }

    /// Sends `ino`'s buffered writes to the cluster. Returns once every replica has them.
    fn flush_ino(&self, ino: u64) -> FsResult<()> {
        let Some(d) = lock(&self.dirty).get(&ino).cloned() else { return Ok(()) };
        let mut buf = lock(&d.buf);
        self.flush_buf(ino, &d, &mut buf)
    }

    /// Waits for `ino`'s background flushes, then sends the whole buffer. Returns once every
    /// replica has all of it, or the first error of either (the caller reports it; the buffer is
    /// empty either way).
    fn flush_buf(&self, ino: u64, d: &Dirty, buf: &mut Buffer) -> FsResult<()> {
        let landed = d.wait_in_flight(0);
        let wrote = match buf.take(buf.data.len()) {
            Some((start, data)) => write_out(&self.c, &self.seen, &self.epoch, ino, start, data),
            None => Ok(()),
        };
        landed.and(wrote)
    }

    /// Hands the buffer's whole blocks to a background flush, keeping back a trailing partial block
    /// (the next write completes it). Waits while too many of `ino`'s flushes are in flight.
    fn flush_behind(&self, ino: u64, d: &Arc<Dirty>, buf: &mut Buffer) -> FsResult<()> {
        d.wait_in_flight(FLUSHES_IN_FLIGHT - 1)?;
        let end = buf.start + buf.data.len() as u64;
        let cut = (end / self.block_size * self.block_size).saturating_sub(buf.start);
        let Some((start, data)) = buf.take(cut as usize) else { return Ok(()) };
        lock(&d.in_flight).n += 1;
        let (c, seen, epoch, dirty) = (self.c.clone(), self.seen.clone(), self.epoch.clone(), d.clone());
        let job: Job = Box::new(move || dirty.landed(write_out(&c, &seen, &epoch, ino, start, data)));
        if let Err(mpsc::SendError(job)) = lock(&self.flushes).send(job) {
            job(); // no flush thread: write here
        }
        Ok(())
    }

    /// The size this mount knows for `ino` (refreshed by every attribute reply and at open), grown by
    /// writes it has accepted. Reads use it instead of asking the metaserver each time.
    fn known_size(&self, ino: u64) -> Option<u64> {
        let seen = lock(&self.seen).get(&ino).map(|s| s.0)?;
        let dirty = lock(&self.dirty).get(&ino).map(|d| d.end.load(Ordering::Acquire)).unwrap_or(0);
        Some(seen.max(dirty))
    }

    fn add_open(&self, ino: u64) -> u64 {
        *lock(&self.opens).entry(ino).or_default() += 1;
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops an orphaned inode's blocks now, or at its last close here.
    fn orphaned(&self, ino: u64) {
        if ino == 0 {
            return;
        }
        if lock(&self.opens).get(&ino).copied().unwrap_or(0) > 0 {
            lock(&self.doomed).insert(ino);
        } else {
            let _ = lock(&self.reclaim).send(ino);
        }
    }

    /// Close-to-open: if another mount changed the file since the kernel last heard of it, drop the
    /// kernel's cached attributes and pages.
    fn revalidate(&self, ino: u64) {
        let Ok(a) = self.c.getattr(ino) else { return };
        let before = lock(&self.seen).get(&ino).copied();
        let now = (a.size, a.mtime);
        let moved = before.is_some_and(|b| b != now);
        if moved {
            // Another mount changed it: listings fetched ahead may hold the old attributes.
            self.changed();
        }
        if moved && lock(&self.dirty).get(&ino).is_none() {
            if let Some(n) = self.notifier.get() {
                if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                    debug!("invalidate inode {ino}: {e}");
                }
            }
        }
        lock(&self.seen).insert(ino, now);
    }
}

impl Buffer {
    /// Takes the first `n` bytes out of the buffer: (their offset, the bytes).
    fn take(&mut self, n: usize) -> Option<(u64, Vec<u8>)> {
        if n == 0 {
            return None;
        }
        let rest = self.data.split_off(n);
        let start = self.start;
        self.start += n as u64;
        Some((start, std::mem::replace(&mut self.data, rest)))
    }
}

/// Writes `data` at `start` to every replica and the new size to the metaserver; then records the
/// size, so that later writes plan against it.
fn write_out(
    c: &Cluster,
    seen: &Mutex<HashMap<u64, (u64, i64)>>,
    epoch: &AtomicU64,
    ino: u64,
    start: u64,
    data: Vec<u8>,
) -> FsResult<()> {
    let known = lock(seen).get(&ino).map(|s| s.0);
    let r = match known {
        Some(size) => c.write_at(ino, start, data, size),
        None => c.write(ino, start, data),
    };
    epoch.fetch_add(1, Ordering::AcqRel);
    let a = r?;
    if let Some(s) = lock(seen).get_mut(&ino) {
        *s = (s.0.max(a.size), a.mtime);
    }
    Ok(())
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
        info!("mounted: block size {}, {} dataservers", self.block_size, self.c.layout().n());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_bytes(name);
        let fetch = match self.lookup_ahead(parent.0, name) {
            AheadAnswer::Found(a, ttl) => return reply.entry(&ttl, &self.attr(&a), Generation(0)),
            // Refetching would not help: a search for names that are not there (a PATH or include
            // path search) would otherwise refetch the listing every few lookups.
            AheadAnswer::Missing => false,
            AheadAnswer::NoListing => self.count_lookup(parent.0),
        };
        self.reply_entry(self.c.lookup(parent.0, name), reply);
        if fetch {
            self.fetch_ahead(parent.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.c.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
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
        let ts = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => TimeSet::Now,
                TimeOrNow::SpecificTime(s) => TimeSet::At(time_ns(s)),
            })
        };
        let set =
            SetAttr { perm: mode.map(|m| (m & 0o7777) as u16), uid, gid, size, atime: ts(atime), mtime: ts(mtime) };
        let r = if size.is_some() {
            // Buffered writes land first; then the new size is the truth.
            let d = self.dirty_of(ino.0);
            let mut buf = lock(&d.buf);
            self.flush_buf(ino.0, &d, &mut buf).and_then(|_| {
                let r = self.c.setattr(ino.0, set);
                d.end.store(0, Ordering::Release);
                r
            })
        } else {
            self.c.setattr(ino.0, set)
        };
        self.changed();
        match r {
            Ok(a) => reply.attr(&TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.c.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return reply.error(Errno::EINVAL),
        };
        let node = NewNode { kind, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev };
        self.reply_changed(self.c.mknod(parent.0, name_bytes(name), node), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let node =
            NewNode { kind: Kind::Dir, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev: 0 };
        self.reply_changed(self.c.mknod(parent.0, name_bytes(name), node), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.c.unlink(parent.0, name_bytes(name));
        self.changed();
        match r {
            Ok(orphan) => {
                self.orphaned(orphan);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.c.rmdir(parent.0, name_bytes(name));
        self.changed();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = self.c.symlink(parent.0, name_bytes(link_name), target.as_os_str().as_bytes(), req.uid(), req.gid());
        self.reply_changed(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let bits = flags.bits();
        let mut f = 0;
        if bits & libc::RENAME_NOREPLACE != 0 {
            f |= RENAME_NOREPLACE;
        }
        if bits & libc::RENAME_EXCHANGE != 0 {
            f |= RENAME_EXCHANGE;
        }
        if bits & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return reply.error(Errno::EINVAL);
        }
        let r = self.c.rename(parent.0, name_bytes(name), newparent.0, name_bytes(newname), f);
        self.changed();
        match r {
            Ok(orphan) => {
                self.orphaned(orphan);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.reply_changed(self.c.link(ino.0, newparent.0, name_bytes(newname)), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.revalidate(ino.0);
        let fh = self.add_open(ino.0);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Err(e) = self.flush_ino(ino.0) {
            return reply.error(errno(&e));
        }
        let r = match self.known_size(ino.0) {
            Some(known) => self.c.read_at(ino.0, offset, u64::from(size), known),
            None => self.c.read(ino.0, offset, u64::from(size)),
        };
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(end) = offset.checked_add(data.len() as u64).filter(|&e| e <= crate::namespace::MAX_SIZE) else {
            return reply.error(Errno::EFBIG);
        };
        let d = self.dirty_of(ino.0);
        let mut buf = lock(&d.buf);
        // A write that does not continue the buffer flushes it (and waits for the background
        // flushes, which may cover the blocks it is about to change).
        if offset != buf.start + buf.data.len() as u64 {
            if let Err(e) = self.flush_buf(ino.0, &d, &mut buf) {
                return reply.error(errno(&e));
            }
        }
        if buf.data.is_empty() {
            buf.start = offset;
        }
        buf.data.extend_from_slice(data);
        d.end.fetch_max(end, Ordering::AcqRel);
        if buf.data.len() >= BUFFER_BYTES {
            if let Err(e) = self.flush_behind(ino.0, &d, &mut buf) {
                return reply.error(errno(&e));
            }
        }
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match self.flush_ino(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.flush_ino(ino.0);
        let last = {
            let mut opens = lock(&self.opens);
            let n = opens.entry(ino.0).or_default();
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                opens.remove(&ino.0);
                lock(&self.dirty).remove(&ino.0);
            }
            last
        };
        if last && lock(&self.doomed).remove(&ino.0) {
            let _ = lock(&self.reclaim).send(ino.0);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Every write the cluster accepted is already on all replicas and durable.
        match self.flush_ino(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.c.readdir(ino.0) {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (crate::namespace::ROOT, FileType::Directory, OsStr::new("..")),
        ];
        let all = dots.into_iter().chain(entries.iter().map(|(n, a)| (a.ino, file_type(a.kind), OsStr::from_bytes(n))));
        for (i, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Entries with their attributes (the listing has them already), so that `ls -l` and tree walks
    /// need no LOOKUP per entry.
    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
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
        let mut i = offset as usize;
        while i < 2 {
            let (child, name) = if i == 0 { (ino.0, ".") } else { (crate::namespace::ROOT, "..") };
            if reply.add(INodeNo(child), (i + 1) as u64, name, &TTL, &dot(child), Generation(0)) {
                return reply.ok();
            }
            i += 1;
        }
        for (k, (name, a)) in entries.iter().enumerate().skip(i - 2) {
            if reply.add(INodeNo(a.ino), (k + 3) as u64, OsStr::from_bytes(name), &TTL, &self.attr(a), Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok(); // namespace changes are durable when they return
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        let (mut total, mut free) = (0u64, 0u64);
        for s in 0..self.c.layout().n() {
            if let Ok(Ok(st)) = self.c.server_status(s) {
                total += st.disk_total;
                free += st.disk_free;
            }
        }
        // Every byte is stored `replicas` times.
        let r = u64::from(self.c.layout().replicas.max(1));
        let files = self.c.inode_count().unwrap_or(0);
        let (blocks, bfree) = (total / r / BSIZE, free / r / BSIZE);
        reply.statfs(blocks, bfree, bfree, files + bfree, bfree, BSIZE as u32, 255, BSIZE as u32);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // permissions are checked by the kernel (default_permissions)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = NewNode {
            kind: Kind::File,
            perm: (mode & !umask & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
        };
        let r = self.c.mknod(parent.0, name_bytes(name), node);
        self.changed();
        match r {
            Ok(a) => {
                let fh = self.add_open(a.ino);
                reply.created(&TTL, &self.attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    // Not supported: answered ENOSYS quietly, so the kernel stops asking and tools fall back
    // (cp copies by read/write, xattr calls fail with EOPNOTSUPP).
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
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
        reply.error(Errno::ENOSYS);
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
        reply.error(Errno::ENOSYS);
    }
}
