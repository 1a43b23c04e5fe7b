//! In-memory stand-ins for the client's ports, for unit tests: a ring of dataservers that tests can
//! take down, make refuse, corrupt and inspect, and a metaserver that is the real namespace in a
//! temp dir (so the rules are the real ones) with an error switch.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use super::engine::{Backoff, Engine};
use super::files::Files;
use super::ports::{Cut, DataPort, GetReply, ListPage, MetaPort, RangeReply, RegisterError};
use crate::metaserver::namespace::sessions::{Query, QueryReply};
use crate::metaserver::namespace::{Change, Namespace, Outcome};
use crate::shared::block::{sums_with_pages, Block, BlockKey, Checksum, Part, PAGE};
use crate::shared::layout::Layout;
use crate::shared::{Attr, FsError, FsResult, NewNode, PortError, SetAttr};

/// Per file: the cuts a server keeps, as (first block, version).
type KeptCuts = HashMap<u64, Vec<(u64, u64)>>;

#[derive(Default)]
pub struct FakeData {
    up: RefCell<Vec<bool>>,
    refusing: RefCell<Vec<bool>>,
    pub stores: RefCell<Vec<HashMap<BlockKey, Block>>>,
    pub puts: Cell<usize>,
    pub gets: Cell<usize>,
    truncates: Cell<usize>,
    /// Servers that say their answers may be stale (rebuilding or catching up).
    catching_up: RefCell<Vec<bool>>,
    /// Per server, per file: the cuts kept (first block, version), as a real server keeps them.
    cuts: RefCell<Vec<KeptCuts>>,
    /// Per server: the MD5s of each stored block's pages, computed when it was stored (as a real
    /// server does), so that a test that damages a stored block damages it for range reads too.
    pages: RefCell<Vec<HashMap<BlockKey, Vec<Checksum>>>>,
    pub range_gets: Cell<usize>,
}

impl FakeData {
    pub fn new(n: usize) -> Self {
        FakeData {
            up: RefCell::new(vec![true; n]),
            refusing: RefCell::new(vec![false; n]),
            stores: RefCell::new(vec![HashMap::new(); n]),
            cuts: RefCell::new(vec![HashMap::new(); n]),
            catching_up: RefCell::new(vec![false; n]),
            pages: RefCell::new(vec![HashMap::new(); n]),
            ..FakeData::default()
        }
    }

    pub fn set_up(&self, s: usize, up: bool) {
        self.up.borrow_mut()[s] = up;
    }

    /// Server `s` says its answers may be stale (as a server catching up after a restart does).
    pub fn set_catching_up(&self, s: usize, on: bool) {
        self.catching_up.borrow_mut()[s] = on;
    }

    /// Server `s` answers every call with a refusal (as one started with another ring does).
    pub fn set_refusing(&self, s: usize, refusing: bool) {
        self.refusing.borrow_mut()[s] = refusing;
    }

    /// How many copies of the file's blocks the ring holds.
    pub fn blocks_of(&self, file_id: u64) -> usize {
        self.stores.borrow().iter().map(|st| st.keys().filter(|k| k.file_id == file_id).count()).sum()
    }

    pub fn truncates(&self) -> usize {
        self.truncates.get()
    }

    fn answer(&self, s: usize) -> Result<(), PortError> {
        if !self.up.borrow()[s] {
            return Err(PortError::Unreachable("down".into()));
        }
        if self.refusing.borrow()[s] {
            return Err(PortError::Refused("server list differs".into()));
        }
        Ok(())
    }
}

impl DataPort for FakeData {
    fn name(&self, server: usize) -> String {
        format!("fake{server}")
    }

    /// With a real server's rules: versions only grow, a repair replaces only a missing, older
    /// or corrupt copy, and a block that a kept cut removed is not stored again.
    async fn put(&self, server: usize, blocks: &[&Block], repair: bool, _hint: bool) -> Result<(), PortError> {
        self.answer(server)?;
        self.puts.set(self.puts.get() + 1);
        let cuts = &self.cuts.borrow()[server];
        for b in blocks {
            let cut = cuts.get(&b.key.file_id).into_iter().flatten().any(|&(f, v)| b.key.index >= f && b.version < v);
            let st = &mut self.stores.borrow_mut()[server];
            let replace = match st.get(&b.key) {
                _ if cut => false,
                None => true,
                Some(old) if repair => old.version < b.version || !old.verifies(),
                Some(old) => old.version <= b.version,
            };
            if replace {
                st.insert(b.key, (*b).clone());
                let pages = match b.data.len() > PAGE {
                    true if b.pages.is_empty() => sums_with_pages(&[&b.data], |_| true).1.remove(0),
                    true => b.pages.clone(),
                    false => vec![],
                };
                self.pages.borrow_mut()[server].insert(b.key, pages);
            }
        }
        Ok(())
    }

    async fn get(&self, server: usize, keys: &[BlockKey]) -> Result<GetReply, PortError> {
        self.answer(server)?;
        self.gets.set(self.gets.get() + 1);
        let st = &self.stores.borrow()[server];
        let cuts = &self.cuts.borrow()[server];
        let cut_versions = keys
            .iter()
            .map(|k| {
                let of = cuts.get(&k.file_id).into_iter().flatten();
                of.filter(|&&(f, _)| k.index >= f && !st.contains_key(k)).map(|&(_, v)| v).max().unwrap_or(0)
            })
            .collect();
        Ok(GetReply {
            blocks: keys.iter().map(|k| st.get(k).cloned()).collect(),
            rebuilding: self.catching_up.borrow()[server],
            cut_versions,
        })
    }

    async fn get_range(&self, server: usize, key: BlockKey, from: u32, to: u32) -> Result<RangeReply, PortError> {
        self.answer(server)?;
        self.range_gets.set(self.range_gets.get() + 1);
        let part = self.stores.borrow()[server].get(&key).map(|b| {
            let pages = self.pages.borrow()[server].get(&key).cloned().unwrap_or_default();
            Part::of(b.version, b.replicas, b.md5, &b.data, &pages, from as usize, to as usize)
        });
        Ok(RangeReply { part, rebuilding: self.catching_up.borrow()[server] })
    }

    async fn truncate(&self, server: usize, cuts: &[Cut], _hint: bool) -> Result<u64, PortError> {
        self.answer(server)?;
        self.truncates.set(self.truncates.get() + 1);
        let st = &mut self.stores.borrow_mut()[server];
        let before = st.len();
        st.retain(|k, b| {
            cuts.iter()
                .all(|c| k.file_id != c.file_id || k.index < c.from_block || (c.version != 0 && b.version >= c.version))
        });
        for c in cuts.iter().filter(|c| c.version != 0) {
            self.cuts.borrow_mut()[server].entry(c.file_id).or_default().push((c.from_block, c.version));
        }
        Ok((before - st.len()) as u64)
    }

    async fn list(&self, server: usize, after: BlockKey, limit: u32) -> Result<ListPage, PortError> {
        self.answer(server)?;
        let st = &self.stores.borrow()[server];
        let mut listed: Vec<((BlockKey, u64), Checksum)> = st
            .iter()
            .filter(|(k, _)| (k.file_id, k.index) > (after.file_id, after.index))
            .map(|(k, b)| ((*k, b.version), b.md5))
            .collect();
        listed.sort_by_key(|((k, _), _)| (k.file_id, k.index));
        let done = listed.len() <= limit as usize;
        listed.truncate(limit as usize);
        let (keys, md5s) = listed.into_iter().unzip();
        Ok(ListPage { keys, md5s, done, rebuilding: false })
    }

    async fn drop_blocks(&self, server: usize, keys: &[(BlockKey, u64)]) -> Result<u64, PortError> {
        self.answer(server)?;
        let st = &mut self.stores.borrow_mut()[server];
        let mut n = 0;
        for (k, v) in keys {
            if st.get(k).is_some_and(|b| b.version == *v) {
                st.remove(k);
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The real namespace in a temp dir, answering `fail`'s error instead while it is set.
pub struct FakeMeta {
    ns: Namespace,
    fail: RefCell<Option<FsError>>,
    _dir: tempfile::TempDir,
}

impl FakeMeta {
    pub fn new(block_size: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = Namespace::open(dir.path(), Some(block_size), Some(3)).expect("namespace");
        FakeMeta { ns, fail: RefCell::new(None), _dir: dir }
    }

    pub fn fail_with(&self, e: Option<FsError>) {
        *self.fail.borrow_mut() = e;
    }

    fn ns(&self) -> FsResult<&Namespace> {
        match self.fail.borrow().clone() {
            Some(e) => Err(e),
            None => Ok(&self.ns),
        }
    }
}

impl MetaPort for FakeMeta {
    async fn register(&self, ring: &[String]) -> Result<Layout, RegisterError> {
        self.ns()?.register(ring).map_err(|e| RegisterError::Refused(e.to_string()))
    }
    async fn layout(&self) -> FsResult<Layout> {
        Ok(self.ns()?.layout()?.unwrap_or_default())
    }
    async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.ns()?.lookup(parent, name)
    }
    async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.ns()?.getattr(ino)
    }
    async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.ns()?.setattr(ino, set)
    }
    async fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.ns()?.mknod(parent, name, node)
    }
    async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        self.ns()?.symlink(parent, name, target, uid, gid)
    }
    async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.ns()?.readlink(ino)
    }
    async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        self.ns()?.link(ino, new_parent, new_name)
    }
    async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        self.ns()?.unlink(parent, name)
    }
    async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Option<Attr>> {
        self.ns()?.rmdir(parent, name).map(Some)
    }
    async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<crate::shared::Renamed> {
        self.ns()?.rename(parent, name, new_parent, new_name, flags)
    }
    async fn readdir(&self, ino: u64) -> FsResult<crate::shared::DirListing> {
        self.ns()?.listing(ino)
    }
    async fn extend(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.ns()?.extend(ino, size)
    }
    async fn purge(&self, inos: &[u64]) -> FsResult<()> {
        self.ns()?.purge(inos)
    }
    async fn orphans(&self) -> FsResult<Vec<u64>> {
        self.ns()?.orphans()
    }
    async fn inode_count(&self) -> FsResult<u64> {
        self.ns()?.inode_count()
    }
    async fn apply(&self, change: Change) -> FsResult<Outcome> {
        self.ns()?.apply(&change)
    }
    async fn query(&self, q: Query) -> FsResult<QueryReply> {
        self.ns()?.query(&q)
    }
}

/// A regular file's attributes, as the metaserver might answer them (its size is its number).
pub fn file_attr(ino: u64) -> Attr {
    Attr {
        ino,
        kind: crate::shared::Kind::File,
        perm: 0o644,
        nlink: 1,
        uid: 0,
        gid: 0,
        size: ino,
        atime: 0,
        mtime: 0,
        ctime: 0,
        rdev: 0,
        parent: 0,
        target: vec![],
        version: 1,
        xattrs: None,
    }
}

pub fn fast_backoff() -> Backoff {
    Backoff { first: Duration::from_millis(1), max: Duration::from_millis(5) }
}

pub fn layout(n: usize, block_size: u32) -> Layout {
    Layout { servers: (0..n).map(|i| format!("fake{i}")).collect(), block_size, replicas: 3, ..Default::default() }
}

pub fn engine(n: usize, block_size: u32) -> Engine<FakeData> {
    Engine::new(FakeData::new(n), &layout(n, block_size), fast_backoff(), Default::default())
}

/// [`engine`] with the quorums given.
pub fn engine_with_quorum(
    n: usize,
    block_size: u32,
    replicas: u8,
    quorum: crate::shared::layout::Quorum,
) -> Engine<FakeData> {
    let layout = Layout { quorum, replicas, ..layout(n, block_size) };
    Engine::new(FakeData::new(n), &layout, fast_backoff(), Default::default())
}

/// File operations over `n` fake dataservers and a fresh namespace.
pub fn files(n: usize, block_size: u32) -> Files<FakeMeta, FakeData> {
    Files::new(FakeMeta::new(block_size), engine(n, block_size))
}

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime").block_on(f)
}
