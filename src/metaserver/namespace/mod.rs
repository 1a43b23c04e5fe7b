//! The metaserver's namespace: inodes, directory entries and the cluster layout, in LMDB.
//! Every operation is one durable transaction that either applies whole or not at all, and returns
//! the POSIX error when it cannot apply. Permission checks are the kernel's
//! (`default_permissions`); the namespace enforces structure: names, types, emptiness, cycles.

mod change;
pub mod locks;
mod names;
mod replica;
pub mod sessions;
pub mod xattrs;

pub use change::{decode_client_change, sizes_within_limits, Change, Outcome, Request, MAX_ENCODED};

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::shared::db::{Db, Durability, Read, Table, Writer};
use crate::shared::layout::{self, Layout, LayoutError, Quorum, DEFAULT_BLOCK_SIZE, DEFAULT_REPLICAS};
use crate::shared::{
    now_ns, validate_name, Attr, FsError, FsResult, Kind, NewNode, RegisterError, SetAttr, TimeSet, MAX_SIZE, NAME_MAX,
    ROOT, TARGET_MAX,
};

/// Why a store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] FsError),
    #[error("the store was created with {what} {stored}; {flag} {asked} differs")]
    ShapeDiffers { what: &'static str, flag: &'static str, stored: u32, asked: u32 },
    #[error(transparent)]
    Shape(#[from] LayoutError),
}

/// What a new store is created with (`None`: the default), and the quorums (0: the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    pub block_size: Option<u32>,
    pub replicas: Option<u8>,
    pub quorum: Quorum,
}

pub struct Namespace {
    db: Db,
    /// Where the store is (its disk's free space decides whether creates are taken).
    dir: std::path::PathBuf,
    inodes: Table,
    dirents: Table,
    orphans: Table,
    meta: Table,
    /// Per client of a replicated group: its last request's sequence number and answer.
    sessions: Table,
    /// Live client sessions (see `sessions.rs`).
    clients: Table,
    /// Per locked inode: its locks and queued requests.
    locks: Table,
    /// Per lock owner that waits and inode it waits for (an owner's threads may wait for
    /// several): nothing else.
    waits: Table,
    /// Extended attributes (see `xattrs.rs`).
    xattrs: Table,
    /// Bumped after every committed change, for lock requests waiting to be granted.
    epoch: tokio::sync::watch::Sender<u64>,
    block_size: u32,
    replicas: u8,
    quorum: Quorum,
}

const NEXT_INO: &[u8] = b"next_ino";
const SHAPE: &[u8] = b"shape";
/// The quorums (write, read), recorded the first time a metaserver is given them.
const QUORUM: &[u8] = b"quorum";
const LAYOUT: &[u8] = b"layout";

fn enc<T: Serialize>(v: &T) -> FsResult<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| FsError::Io(e.to_string()))
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8]) -> FsResult<T> {
    postcard::from_bytes(b).map_err(|e| FsError::Io(format!("corrupt metadata record: {e}")))
}

/// An inode as stores made before inodes had versions kept it (the same fields, without the version
/// at the end): read as version 0, and written back with a version on its next change.
#[derive(Deserialize)]
struct AttrWithoutVersion {
    ino: u64,
    kind: crate::shared::Kind,
    perm: u16,
    nlink: u32,
    uid: u32,
    gid: u32,
    size: u64,
    atime: i64,
    mtime: i64,
    ctime: i64,
    rdev: u32,
    parent: u64,
    target: Vec<u8>,
}

fn dec_attr(b: &[u8]) -> FsResult<Attr> {
    match postcard::from_bytes::<Attr>(b) {
        Ok(a) => Ok(a),
        Err(postcard::Error::DeserializeUnexpectedEnd) => {
            let o: AttrWithoutVersion = dec(b)?;
            Ok(Attr {
                ino: o.ino,
                kind: o.kind,
                perm: o.perm,
                nlink: o.nlink,
                uid: o.uid,
                gid: o.gid,
                size: o.size,
                atime: o.atime,
                mtime: o.mtime,
                ctime: o.ctime,
                rdev: o.rdev,
                parent: o.parent,
                target: o.target,
                version: 0,
                xattrs: None,
            })
        }
        Err(e) => Err(FsError::Io(format!("corrupt metadata record: {e}"))),
    }
}

fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// Keys of a directory's entries lie in [prefix, prefix of the next inode).
fn dir_range(dir: u64) -> ([u8; 8], Vec<u8>) {
    let to = match dir.checked_add(1) {
        Some(n) => n.to_be_bytes().to_vec(),
        None => vec![0xff; 9 + NAME_MAX],
    };
    (dir.to_be_bytes(), to)
}

impl Namespace {
    /// Refuses a create when the store's disk is down to its last MiB, so that deletes, renames
    /// and the sizes of files being written can still commit (each takes a few pages).
    pub fn room_for_creates(&self) -> Result<(), FsError> {
        let v =
            nix::sys::statvfs::statvfs(&self.dir).map_err(|e| FsError::Io(format!("{}: {e}", self.dir.display())))?;
        let free = v.blocks_available() * v.fragment_size() + self.db.free_inside().unwrap_or(0);
        let reserve: u64 = 1 << 20;
        if free < reserve {
            return Err(FsError::NoSpace(format!(
                "the metaserver's disk has {} KiB free, below its margin of {} MiB",
                free >> 10,
                reserve >> 20
            )));
        }
        Ok(())
    }

    /// Opens the store in `dir`, creating it with the given shape (or the defaults) if new. An
    /// existing store keeps its shape; asking for another one is an error that says what differs.
    pub fn open(dir: &Path, block_size: Option<u32>, replicas: Option<u8>) -> Result<Namespace, OpenError> {
        Self::open_with(dir, Shape { block_size, replicas, quorum: Quorum::default() }, Durability::Full)
    }

    /// [`Namespace::open`] with the given durability of its commits (a group member's namespace
    /// can redo its last commits from the Raft log).
    pub fn open_with(
        dir: &Path,
        Shape { block_size, replicas, quorum }: Shape,
        durability: Durability,
    ) -> Result<Namespace, OpenError> {
        let tables = ["inodes", "dirents", "orphans", "meta", "sessions", "clients", "locks", "waits", "xattrs"];
        let (db, t) = Db::open_with(dir, tables, durability).map_err(FsError::from)?;
        let mut ns = Namespace {
            db,
            dir: dir.to_path_buf(),
            inodes: t[0],
            dirents: t[1],
            orphans: t[2],
            meta: t[3],
            sessions: t[4],
            clients: t[5],
            locks: t[6],
            waits: t[7],
            xattrs: t[8],
            epoch: tokio::sync::watch::Sender::new(0),
            block_size: 0,
            replicas: 0,
            quorum: Quorum::default(),
        };
        let stored: Option<(u32, u8)> = ns.db.read(|r| r.get(ns.meta, SHAPE)?.map(dec).transpose())?;
        let shape = match stored {
            Some((bs, r)) => {
                if let Some(want) = block_size.filter(|&b| b != bs) {
                    let (what, flag) = ("block size", "--block-size");
                    return Err(OpenError::ShapeDiffers { what, flag, stored: bs, asked: want });
                }
                if let Some(want) = replicas.filter(|&x| x != r) {
                    let (what, flag) = ("replicas", "--replicas");
                    return Err(OpenError::ShapeDiffers { what, flag, stored: r.into(), asked: want.into() });
                }
                (bs, r)
            }
            None => {
                let shape = (block_size.unwrap_or(DEFAULT_BLOCK_SIZE), replicas.unwrap_or(DEFAULT_REPLICAS));
                layout::validate_shape(shape.0, shape.1)?;
                // The root's times are set by the first registration (see `register_in`), a
                // change every member of a group applies at the same stamped time; not from this
                // member's clock now, which would give each member a root of its own.
                let root = Attr {
                    ino: ROOT,
                    kind: Kind::Dir,
                    perm: 0o755,
                    nlink: 2,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    atime: 0,
                    mtime: 0,
                    ctime: 0,
                    rdev: 0,
                    parent: ROOT,
                    target: vec![],
                    version: 1,
                    xattrs: None,
                };
                ns.db.write(|w| {
                    w.put(ns.meta, SHAPE, &enc(&shape)?)?;
                    w.put(ns.meta, NEXT_INO, &(ROOT + 1).to_le_bytes())?;
                    w.put(ns.inodes, &ROOT.to_be_bytes(), &enc(&root)?)?;
                    Ok::<_, FsError>(())
                })?;
                shape
            }
        };
        (ns.block_size, ns.replicas) = shape;
        ns.quorum = ns.fix_quorum(quorum)?;
        Ok(ns)
    }

    /// The quorums recorded, or `asked` recorded now if none were (a store made before quorums
    /// existed takes them on its first start with the flags). Asking for others than those
    /// recorded is an error, as for the block size.
    fn fix_quorum(&self, asked: Quorum) -> Result<Quorum, OpenError> {
        let stored: Option<(u8, u8)> = self.db.read(|r| r.get(self.meta, QUORUM)?.map(dec).transpose())?;
        match stored {
            Some((w, q)) => {
                for (what, flag, asked, stored) in [
                    ("write quorum", "--write-quorum", asked.write, w),
                    ("read quorum", "--read-quorum", asked.read, q),
                ] {
                    if asked != 0 && asked != stored {
                        let (stored, asked) = (u32::from(stored), u32::from(asked));
                        return Err(OpenError::ShapeDiffers { what, flag, stored, asked });
                    }
                }
                Ok(Quorum { write: w, read: q })
            }
            None => {
                asked.validate(self.replicas)?;
                if asked != Quorum::default() {
                    let v = enc(&(asked.write, asked.read))?;
                    self.db.write(|w| w.put(self.meta, QUORUM, &v)).map_err(FsError::from)?;
                }
                Ok(asked)
            }
        }
    }

    /// The quorums a write and a read need (0: the defaults, all and one).
    pub fn quorum(&self) -> Quorum {
        self.quorum
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn replicas(&self) -> u8 {
        self.replicas
    }

    /// The recorded layout, if a client has registered one.
    pub fn layout(&self) -> FsResult<Option<Layout>> {
        self.db.read(|r| {
            let servers: Option<Vec<String>> = r.get(self.meta, LAYOUT)?.map(dec).transpose()?;
            servers.map(|servers| self.shaped(r, servers)).transpose()
        })
    }

    /// `servers` with the block size, replicas and quorums recorded in the store: this server's
    /// own until the first registration, the group's from then on (see [`Change::RegisterAs`]),
    /// also on a member that was started with others or caught up from a snapshot.
    fn shaped(&self, r: &impl Read, servers: Vec<String>) -> FsResult<Layout> {
        let (block_size, replicas) = match r.get(self.meta, SHAPE)?.map(dec::<(u32, u8)>).transpose()? {
            Some(shape) => shape,
            None => (self.block_size, self.replicas),
        };
        let quorum = match r.get(self.meta, QUORUM)?.map(dec::<(u8, u8)>).transpose()? {
            Some((write, read)) => Quorum { write, read },
            None => Quorum::default(),
        };
        Ok(Layout { servers, block_size, replicas, quorum })
    }

    /// A client's registration as this server journals it: with the shape it records (see
    /// [`Change::RegisterAs`]). Any other change is returned as it is.
    pub fn with_shape(&self, change: Change) -> FsResult<Change> {
        if !matches!(change.inner(), Change::Register { .. }) {
            return Ok(change);
        }
        Ok(match change {
            Change::Register { servers } => {
                let l = self.db.read(|r| self.shaped(r, vec![]))?;
                let (write_quorum, read_quorum) = (l.quorum.write, l.quorum.read);
                let (block_size, replicas) = (l.block_size, l.replicas);
                Change::RegisterAs { servers, block_size, replicas, write_quorum, read_quorum }
            }
            Change::By { session, change } => Change::By { session, change: Box::new(self.with_shape(*change)?) },
            c => c,
        })
    }

    /// Records the dataserver ring the first time; afterwards refuses any other ring, saying what
    /// differs. Returns the full layout.
    pub fn register(&self, servers: &[String]) -> Result<Layout, RegisterError> {
        self.db.write(|w| self.register_in(w, servers, None, now_ns()))
    }

    /// [`Self::register`] inside a write transaction, at time `now`. With `shape`, the first
    /// registration records it as this store's (block size, replicas, write and read quorum): the
    /// shape of the group member that took it. The first also gives the root directory the times
    /// it was made without.
    pub(crate) fn register_in(
        &self,
        w: &mut Writer,
        servers: &[String],
        shape: Option<(u32, u8, Quorum)>,
        now: i64,
    ) -> Result<Layout, RegisterError> {
        let refused = |why: String| RegisterError::Refused(format!("refused: {why}"));
        match w.get(self.meta, LAYOUT)?.map(dec::<Vec<String>>).transpose()? {
            Some(ours) => match layout::ring_difference(&ours, servers) {
                Some(d) => Err(refused(d)),
                None => Ok(self.shaped(w, servers.to_vec())?),
            },
            None => {
                let mut layout = self.shaped(w, servers.to_vec())?;
                if let Some((block_size, replicas, quorum)) = shape {
                    layout = Layout { block_size, replicas, quorum, ..layout };
                }
                layout.validate().map_err(|e| refused(e.to_string()))?;
                if shape.is_some() {
                    if (layout.block_size, layout.replicas) != (self.block_size, self.replicas) {
                        tracing::warn!(
                            block_size = layout.block_size,
                            replicas = layout.replicas,
                            "this member was started with another shape; it takes the group's"
                        );
                    }
                    w.put(self.meta, SHAPE, &enc(&(layout.block_size, layout.replicas))?)?;
                    w.put(self.meta, QUORUM, &enc(&(layout.quorum.write, layout.quorum.read))?)?;
                }
                w.put(self.meta, LAYOUT, &enc(&servers)?)?;
                let mut root = Self::inode(w, self.inodes, ROOT)?;
                if [root.atime, root.mtime, root.ctime].contains(&0) {
                    for t in [&mut root.atime, &mut root.mtime, &mut root.ctime] {
                        if *t == 0 {
                            *t = now;
                        }
                    }
                    self.put_inode(w, &mut root)?;
                }
                Ok(layout)
            }
        }
    }

    fn inode(r: &impl Read, t: Table, ino: u64) -> FsResult<Attr> {
        r.get(t, &ino.to_be_bytes())?.map(dec_attr).transpose()?.ok_or(FsError::NotFound)
    }

    /// Stores a changed inode, counting the change in its version. Every change to an inode goes
    /// through here once per transaction, so the version goes up by exactly one per change.
    fn put_inode(&self, w: &mut Writer, a: &mut Attr) -> FsResult<()> {
        a.version += 1;
        Ok(w.put(self.inodes, &a.ino.to_be_bytes(), &enc(a)?)?)
    }

    fn entry(&self, r: &impl Read, parent: u64, name: &[u8]) -> FsResult<Option<u64>> {
        Ok(r.get(self.dirents, &dirent_key(parent, name))?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes))
    }

    fn dir(&self, r: &impl Read, ino: u64) -> FsResult<Attr> {
        let d = Self::inode(r, self.inodes, ino)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(d)
    }

    /// Updates a directory after its entries changed: mtime and ctime, and its link count.
    fn touch_dir(&self, w: &mut Writer, ino: u64, nlink_delta: i32, now: i64) -> FsResult<()> {
        let mut d = Self::inode(w, self.inodes, ino)?;
        d.nlink = d.nlink.saturating_add_signed(nlink_delta);
        d.mtime = now;
        d.ctime = now;
        self.put_inode(w, &mut d)
    }

    /// Drops one link of a non-directory; an inode whose last link went becomes an orphan, kept
    /// until `purge` so that open files still work and their blocks can be deleted first.
    fn drop_link(&self, w: &mut Writer, ino: u64, now: i64) -> FsResult<u64> {
        let mut a = Self::inode(w, self.inodes, ino)?;
        a.nlink = a.nlink.saturating_sub(1);
        a.ctime = now;
        self.put_inode(w, &mut a)?;
        if a.nlink == 0 {
            w.put(self.orphans, &ino.to_be_bytes(), &[])?;
            return Ok(ino);
        }
        Ok(0)
    }

    #[tracing::instrument(level = "debug", skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        self.db.read(|r| {
            self.dir(r, parent)?;
            let ino = self.entry(r, parent, name)?.ok_or(FsError::NotFound)?;
            Self::inode(r, self.inodes, ino)
        })
    }

    /// The inode at an absolute path (`/` separated, empty components skipped), looked up entry by
    /// entry without following symlinks: for operators and testers, who name files by path.
    pub fn resolve(&self, path: &[u8]) -> FsResult<Attr> {
        let mut a = self.getattr(ROOT)?;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty() && *n != b".") {
            a = self.lookup(a.ino, name)?;
        }
        Ok(a)
    }

    #[tracing::instrument(level = "debug", skip(self))]
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.db.read(|r| Self::inode(r, self.inodes, ino))
    }

    #[tracing::instrument(level = "debug", skip(self))]
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.db.write(|w| self.setattr_in(w, ino, set, now_ns()))
    }

    /// [`Self::setattr`] inside a write transaction at time `now`.
    pub(crate) fn setattr_in(&self, w: &mut Writer, ino: u64, set: &SetAttr, now: i64) -> FsResult<Attr> {
        let mut a = Self::inode(w, self.inodes, ino)?;
        if let Some(size) = set.size {
            match a.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("only regular files have a size to set".into())),
            }
            if size > MAX_SIZE {
                return Err(FsError::TooBig);
            }
            a.size = size;
            a.mtime = now;
        }
        if let Some(p) = set.perm {
            a.perm = p & 0o7777;
        }
        if let Some(u) = set.uid {
            a.uid = u;
        }
        if let Some(g) = set.gid {
            a.gid = g;
        }
        let time = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(ns) => ns,
        };
        if let Some(t) = set.atime {
            a.atime = time(t);
        }
        if let Some(t) = set.mtime {
            a.mtime = time(t);
        }
        a.ctime = now;
        self.put_inode(w, &mut a)?;
        Ok(a)
    }

    /// Creates a file, directory, FIFO, socket or device node (or, with `target`, a symlink).
    #[tracing::instrument(level = "debug", skip(self, w, name, target), fields(name = %String::from_utf8_lossy(name), kind = ?node.kind))]
    pub(crate) fn create_in(
        &self,
        w: &mut Writer,
        parent: u64,
        name: &[u8],
        node: &NewNode,
        target: &[u8],
        now: i64,
    ) -> FsResult<Attr> {
        validate_name(name)?;
        let p = self.dir(w, parent)?;
        if p.nlink == 0 {
            return Err(FsError::NotFound); // a removed directory that is still open
        }
        if self.entry(w, parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let next = w.get(self.meta, NEXT_INO)?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes);
        let ino = next.ok_or_else(|| FsError::Io("inode counter missing".into()))?;
        w.put(self.meta, NEXT_INO, &(ino + 1).to_le_bytes())?;
        let mut perm = node.perm & 0o7777;
        let mut gid = node.gid;
        // A setgid directory passes its group on, and its setgid bit to new subdirectories.
        if p.perm & 0o2000 != 0 {
            gid = p.gid;
            if node.kind == Kind::Dir {
                perm |= 0o2000;
            }
        }
        let is_dir = node.kind == Kind::Dir;
        let mut a = Attr {
            ino,
            kind: node.kind,
            perm,
            nlink: if is_dir { 2 } else { 1 },
            uid: node.uid,
            gid,
            size: target.len() as u64,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: node.rdev,
            parent: if is_dir { parent } else { 0 },
            target: target.to_vec(),
            version: 0,
            xattrs: None,
        };
        self.put_inode(w, &mut a)?;
        w.put(self.dirents, &dirent_key(parent, name), &ino.to_be_bytes())?;
        self.touch_dir(w, parent, if is_dir { 1 } else { 0 }, now)?;
        Ok(a)
    }

    pub fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.db.write(|w| self.mknod_in(w, parent, name, node, now_ns()))
    }

    /// [`Self::mknod`] inside a write transaction at time `now`.
    pub(crate) fn mknod_in(
        &self,
        w: &mut Writer,
        parent: u64,
        name: &[u8],
        node: &NewNode,
        now: i64,
    ) -> FsResult<Attr> {
        if node.kind == Kind::Symlink {
            return Err(FsError::Invalid("symlinks are made with symlink".into()));
        }
        self.create_in(w, parent, name, node, &[], now)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        self.db.write(|w| self.symlink_in(w, parent, name, target, (uid, gid), now_ns()))
    }

    /// [`Self::symlink`] inside a write transaction at time `now`, owned by (uid, gid).
    pub(crate) fn symlink_in(
        &self,
        w: &mut Writer,
        parent: u64,
        name: &[u8],
        target: &[u8],
        (uid, gid): (u32, u32),
        now: i64,
    ) -> FsResult<Attr> {
        if target.is_empty() || target.contains(&0) {
            return Err(FsError::Invalid("a symlink target is non-empty and has no NUL byte".into()));
        }
        if target.len() > TARGET_MAX {
            return Err(FsError::NameTooLong);
        }
        let node = NewNode { kind: Kind::Symlink, perm: 0o777, uid, gid, rdev: 0 };
        self.create_in(w, parent, name, &node, target, now)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let a = self.getattr(ino)?;
        if a.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(a.target)
    }

    /// All entries of a directory with their attributes, in name order.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Attr)>> {
        self.listing(ino).map(|(_, entries)| entries)
    }

    /// [`Self::readdir`], with the directory's parent (the root's is the root).
    pub fn listing(&self, ino: u64) -> FsResult<crate::shared::DirListing> {
        self.listing_page(ino, b"", usize::MAX).map(|(listing, _)| listing)
    }

    /// A page of [`Self::listing`]: the entries after the name `after` (empty: from the first),
    /// at most `limit` of them, and whether more follow.
    pub fn listing_page(&self, ino: u64, after: &[u8], limit: usize) -> FsResult<(crate::shared::DirListing, bool)> {
        self.db.read(|r| {
            let parent = self.dir(r, ino)?.parent;
            let (from, to) = dir_range(ino);
            let mut from = from.to_vec();
            if !after.is_empty() {
                // The least key past the name's own.
                from.extend_from_slice(after);
                from.push(0);
            }
            let mut out = Vec::new();
            let found = r.scan(self.dirents, &from, &to, limit.saturating_add(1))?;
            let more = found.len() > limit;
            for (k, v) in found.into_iter().take(limit) {
                let child =
                    v.as_slice().try_into().map(u64::from_be_bytes).map_err(|_| FsError::Io("bad dirent".into()))?;
                out.push((k[8..].to_vec(), Self::inode(r, self.inodes, child)?));
            }
            Ok(((parent, out), more))
        })
    }

    /// Records a completed write that ended at `size`: grows the file if needed, sets mtime/ctime.
    #[tracing::instrument(level = "debug", skip(self))]
    pub fn extend(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.db.write(|w| self.extend_in(w, ino, size, now_ns()))
    }

    /// [`Self::extend`] inside a write transaction at time `now`.
    pub(crate) fn extend_in(&self, w: &mut Writer, ino: u64, size: u64, now: i64) -> FsResult<Attr> {
        if size > MAX_SIZE {
            return Err(FsError::TooBig);
        }
        let mut a = Self::inode(w, self.inodes, ino)?;
        if a.kind != Kind::File {
            return Err(if a.kind == Kind::Dir { FsError::IsDir } else { FsError::Invalid("not a file".into()) });
        }
        a.size = a.size.max(size);
        a.mtime = now;
        a.ctime = now;
        self.put_inode(w, &mut a)?;
        Ok(a)
    }

    /// Forgets orphans once their blocks are gone, in one transaction. An inode that still has
    /// links (or is gone already) is left alone.
    #[tracing::instrument(level = "debug", skip_all, fields(inodes = inos.len()))]
    pub fn purge(&self, inos: &[u64]) -> FsResult<()> {
        self.db.write(|w| self.purge_in(w, inos))
    }

    /// [`Self::purge`] inside a write transaction.
    pub(crate) fn purge_in(&self, w: &mut Writer, inos: &[u64]) -> FsResult<()> {
        for &ino in inos {
            let a = match Self::inode(w, self.inodes, ino) {
                Err(FsError::NotFound) => continue,
                r => r?,
            };
            if a.nlink == 0 {
                w.delete(self.inodes, &ino.to_be_bytes())?;
                w.delete(self.orphans, &ino.to_be_bytes())?;
                self.forget_xattrs_in(w, ino)?;
            }
        }
        Ok(())
    }

    pub fn orphans(&self) -> FsResult<Vec<u64>> {
        self.db.read(|r| {
            let keys = r.scan_keys(self.orphans, &[0u8; 8], &[0xffu8; 9], usize::MAX)?;
            Ok(keys.iter().filter_map(|k| k.as_slice().try_into().ok().map(u64::from_be_bytes)).collect())
        })
    }

    pub fn inode_count(&self) -> FsResult<u64> {
        Ok(self.db.read(|r| r.len(self.inodes))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::{RENAME_EXCHANGE, RENAME_NOREPLACE};

    fn ns() -> (tempfile::TempDir, Namespace) {
        let d = tempfile::tempdir().unwrap();
        let n = Namespace::open(d.path(), Some(8), Some(3)).unwrap();
        (d, n)
    }

    fn node(kind: Kind) -> NewNode {
        NewNode { kind, perm: 0o755, uid: 0, gid: 0, rdev: 0 }
    }

    #[test]
    fn directory_link_count_is_two_plus_subdirectories() {
        let (_d, n) = ns();
        let a = n.mknod(ROOT, b"a", &node(Kind::Dir)).unwrap();
        n.mknod(a.ino, b"b", &node(Kind::Dir)).unwrap();
        n.mknod(a.ino, b"f", &node(Kind::File)).unwrap();
        assert_eq!(n.getattr(a.ino).unwrap().nlink, 3);
        assert_eq!(n.getattr(ROOT).unwrap().nlink, 3);
        n.rmdir(a.ino, b"b").unwrap();
        assert_eq!(n.getattr(a.ino).unwrap().nlink, 2);
    }

    #[test]
    fn posix_errors_for_bad_names_and_structure() {
        let (_d, n) = ns();
        let a = n.mknod(ROOT, b"a", &node(Kind::Dir)).unwrap();
        let f = n.mknod(a.ino, b"f", &node(Kind::File)).unwrap();
        assert_eq!(n.mknod(ROOT, b"a", &node(Kind::File)), Err(FsError::Exists));
        assert_eq!(n.mknod(ROOT, &[b'x'; 256], &node(Kind::File)), Err(FsError::NameTooLong));
        assert!(matches!(n.mknod(ROOT, b"x/y", &node(Kind::File)), Err(FsError::Invalid(_))));
        assert_eq!(n.rmdir(ROOT, b"a"), Err(FsError::NotEmpty));
        assert_eq!(n.unlink(ROOT, b"a"), Err(FsError::IsDir));
        assert_eq!(n.mknod(f.ino, b"x", &node(Kind::File)), Err(FsError::NotDir));
        assert_eq!(n.rmdir(a.ino, b"f"), Err(FsError::NotDir));
        assert_eq!(n.link(a.ino, ROOT, b"l"), Err(FsError::Perm));
        assert!(matches!(n.rename(ROOT, b"a", a.ino, b"sub", 0), Err(FsError::Invalid(_))));
        assert_eq!(n.lookup(ROOT, b"nope"), Err(FsError::NotFound));
        assert_eq!(n.getattr(999), Err(FsError::NotFound));
    }

    #[test]
    fn rename_noreplace_fails_on_any_existing_target_even_the_same_file() {
        let (_d, n) = ns();
        let f = n.mknod(ROOT, b"f", &node(Kind::File)).unwrap();
        n.link(f.ino, ROOT, b"h").unwrap();
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"h", RENAME_NOREPLACE), Err(FsError::Exists));
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"f", RENAME_NOREPLACE), Err(FsError::Exists));
        // Without the flag, two names of one file: nothing happens.
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"h", 0), Ok((0, None)));
        assert_eq!(n.lookup(ROOT, b"f").unwrap().ino, f.ino);
        assert_eq!(n.getattr(f.ino).unwrap().nlink, 2);
    }

    #[test]
    fn rename_replace_rules_and_link_counts() {
        let (_d, n) = ns();
        let a = n.mknod(ROOT, b"a", &node(Kind::Dir)).unwrap();
        let b = n.mknod(ROOT, b"b", &node(Kind::Dir)).unwrap();
        let f = n.mknod(ROOT, b"f", &node(Kind::File)).unwrap();
        let g = n.mknod(ROOT, b"g", &node(Kind::File)).unwrap();
        assert_eq!(n.rename(ROOT, b"a", ROOT, b"f", 0), Err(FsError::NotDir));
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"a", 0), Err(FsError::IsDir));
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE), Err(FsError::Exists));
        assert_eq!(n.rename(ROOT, b"f", ROOT, b"g", 0), Ok((g.ino, None)));
        assert_eq!(n.orphans().unwrap(), vec![g.ino]);
        assert_eq!(n.lookup(ROOT, b"g").unwrap().ino, f.ino);
        // Moving directory a into b: link counts follow.
        n.rename(ROOT, b"a", b.ino, b"a2", 0).unwrap();
        assert_eq!(n.getattr(ROOT).unwrap().nlink, 3);
        assert_eq!(n.getattr(b.ino).unwrap().nlink, 3);
        assert_eq!(n.getattr(a.ino).unwrap().parent, b.ino);
        // Replacing an empty directory keeps counts right.
        let c = n.mknod(ROOT, b"c", &node(Kind::Dir)).unwrap();
        n.rename(b.ino, b"a2", ROOT, b"c", 0).unwrap();
        assert_eq!(n.getattr(c.ino), Err(FsError::NotFound));
        assert_eq!(n.getattr(ROOT).unwrap().nlink, 4);
        assert_eq!(n.getattr(b.ino).unwrap().nlink, 2);
        // Exchange a file and a directory across directories.
        n.rename(ROOT, b"g", b.ino, b"g", 0).unwrap();
        n.rename(ROOT, b"c", b.ino, b"g", RENAME_EXCHANGE).unwrap();
        assert_eq!(n.lookup(ROOT, b"c").unwrap().ino, f.ino);
        assert_eq!(n.lookup(b.ino, b"g").unwrap().ino, a.ino);
        assert_eq!(n.getattr(b.ino).unwrap().nlink, 3);
        assert_eq!(n.getattr(ROOT).unwrap().nlink, 3);
    }

    #[test]
    fn unlinked_file_is_an_orphan_until_purged() {
        let (_d, n) = ns();
        let f = n.mknod(ROOT, b"f", &node(Kind::File)).unwrap();
        n.link(f.ino, ROOT, b"h").unwrap();
        assert_eq!(n.unlink(ROOT, b"f"), Ok(0));
        assert_eq!(n.unlink(ROOT, b"h"), Ok(f.ino));
        assert_eq!(n.getattr(f.ino).unwrap().nlink, 0);
        n.purge(&[f.ino]).unwrap();
        assert_eq!(n.getattr(f.ino), Err(FsError::NotFound));
        assert!(n.orphans().unwrap().is_empty());
    }

    #[test]
    fn layout_is_recorded_once_and_other_orders_refused() {
        let (d, n) = ns();
        let ring: Vec<String> = (1..=4).map(|p| format!("127.0.0.1:{p}")).collect();
        n.register(&ring).unwrap();
        let mut other = ring.clone();
        other.swap(1, 2);
        assert!(n.register(&other).unwrap_err().to_string().contains("position 1"));
        drop(n);
        assert!(Namespace::open(d.path(), Some(512), None).err().unwrap().to_string().contains("block size 8"));
        let n = Namespace::open(d.path(), None, None).unwrap();
        assert_eq!(n.layout().unwrap().unwrap().servers, ring);
    }

    #[test]
    fn every_change_to_an_inode_counts_once_in_its_version() {
        let (_d, n) = ns();
        let v = |ino| n.getattr(ino).unwrap().version;
        let d = n.mknod(ROOT, b"d", &node(Kind::Dir)).unwrap();
        let f = n.mknod(d.ino, b"f", &node(Kind::File)).unwrap();
        assert_eq!((f.version, v(d.ino)), (1, 2), "made, then an entry added");
        assert_eq!(n.extend(f.ino, 10).unwrap().version, 2, "a completed write");
        let set = SetAttr { perm: Some(0o600), ..SetAttr::default() };
        assert_eq!(n.setattr(f.ino, &set).unwrap().version, 3);
        n.link(f.ino, ROOT, b"h").unwrap();
        assert_eq!(v(f.ino), 4);
        let root = v(ROOT);
        n.rename(d.ino, b"f", d.ino, b"g", 0).unwrap();
        assert_eq!((v(f.ino), v(d.ino)), (5, 3), "a rename within one directory changes it once");
        n.mknod(ROOT, b"e", &node(Kind::Dir)).unwrap();
        n.rename(ROOT, b"e", d.ino, b"e", 0).unwrap();
        n.mknod(ROOT, b"x", &node(Kind::Dir)).unwrap();
        n.rename(ROOT, b"x", ROOT, b"d2", 0).unwrap();
        assert_eq!(v(ROOT), root + 4, "two entries made, one moved out, one renamed");
        assert_eq!(n.lookup(ROOT, b"x"), Err(FsError::NotFound));
        assert_eq!(v(f.ino), 5, "failed and unrelated changes leave it");
    }

    #[test]
    fn inodes_stored_before_versions_read_as_version_zero() {
        let (_d, n) = ns();
        let f = n.mknod(ROOT, b"f", &node(Kind::File)).unwrap();
        let mut old = enc(&f).unwrap();
        // The same record without the version: postcard writes it last, as one varint byte.
        assert_eq!(old.pop(), Some(1));
        n.db.write(|w| w.put(n.inodes, &f.ino.to_be_bytes(), &old)).unwrap();
        let read = n.getattr(f.ino).unwrap();
        assert_eq!(read, Attr { version: 0, ..f.clone() });
        assert_eq!(n.extend(f.ino, 1).unwrap().version, 1, "written back with a version");
        n.db.write(|w| w.put(n.inodes, &f.ino.to_be_bytes(), &old[..3])).unwrap();
        assert!(matches!(n.getattr(f.ino), Err(FsError::Io(_))), "a cut record is still an error");
    }
}
