//! The dataserver: blocks in one LMDB store ([`blockstore`]), the rebuild of a new store from its
//! peers ([`rebuild`]), the hand-over of what peers missed ([`handoff`]), the scrubber
//! ([`scrub`]), a bandwidth cap ([`throttle`]), and the process that serves them over the wire
//! (`wire::data_service`).

pub mod blockstore;
pub mod handoff;
pub mod journal;
pub mod readahead;
pub mod rebuild;
pub mod scrub;
#[cfg(test)]
mod testing;
pub mod throttle;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use crate::shared::block::Block;
use crate::shared::start::{DirLock, StartError};
use blockstore::BlockStore;
use rebuild::RebuildProgress;

/// How a dataserver runs, beyond its place in the ring.
#[derive(Debug, Clone)]
pub struct DataServerOptions {
    /// Caps the block bytes it sends and receives per second.
    pub max_bandwidth: Option<u64>,
    /// A broken server for the lab's own tests: a new store is marked complete without copying
    /// anything from the peers.
    pub debug_skip_rebuild: bool,
    /// How long a rebuild keeps trying a peer that does not answer before it finishes without it.
    pub rebuild_give_up: std::time::Duration,
    /// Bytes per second a scrub pass may read.
    pub scrub_rate: u64,
    /// Time from the end of one scrub pass to the start of the next (`None`: only when asked).
    pub scrub_every: Option<std::time::Duration>,
    /// Hints are kept but not handed over (tests that need a stale replica to stay stale).
    pub hold_hints: bool,
}

impl Default for DataServerOptions {
    fn default() -> Self {
        DataServerOptions {
            max_bandwidth: None,
            debug_skip_rebuild: false,
            rebuild_give_up: rebuild::GIVE_UP,
            scrub_rate: scrub::DEFAULT_RATE,
            scrub_every: Some(scrub::DEFAULT_EVERY),
            hold_hints: false,
        }
    }
}

/// What every connection to this dataserver shares.
pub struct DataNode {
    pub store: Arc<BlockStore>,
    pub index: usize,
    pub ring: Vec<String>,
    pub data_dir: PathBuf,
    pub rebuild: RefCell<RebuildProgress>,
    /// See [`DataServerOptions::rebuild_give_up`].
    pub rebuild_give_up: std::time::Duration,
    /// The server's bandwidth cap (`--max-bandwidth`), charged for block bytes in and out.
    pub link: throttle::Throttle,
    pub scrub: scrub::Scrubber,
    /// Disk kept allocated past the end of the store's file, for commits that must grow it on
    /// a full disk (see `keep_reserve`).
    pub reserve: u64,
    /// Bytes of puts admitted and not yet committed (counted against the room).
    pub admitted: std::cell::Cell<u64>,
    /// Restarted, and peers may still hold hints for it: its answers may be stale, so readers do
    /// not count them toward a quorum (see `handoff::catch_up`).
    pub catching_up: std::cell::Cell<bool>,
}

/// Runs dataserver `index` of `ring` with its store in `dir`; rebuilds first if the store is new.
pub fn run(dir: &Path, index: usize, ring: Vec<String>, opts: DataServerOptions) -> Result<(), StartError> {
    let addr = ring.get(index).cloned().ok_or(StartError::NotInRing { index, servers: ring.len() })?;
    let listener = crate::wire::bind(&addr)?;
    let _lock = DirLock::acquire(dir, &format!("dataserver {index} on {addr}"))?;
    let (store, mut complete) = BlockStore::open(dir).map_err(|e| StartError::store(dir, e))?;
    if opts.debug_skip_rebuild && !complete {
        tracing::warn!("--debug-skip-rebuild: the new store is marked complete without a rebuild");
        store.mark_complete().map_err(|e| StartError::store(dir, e))?;
        complete = true;
    }
    let (blocks, _) = store.stats().map_err(|e| StartError::store(dir, e))?;
    info!(server = index, dir = %dir.display(), blocks, "dataserver store open");
    let reserve = reserve_for(disk_total(dir), disk_available(dir) + store.tail());
    let node = DataNode {
        store: Arc::new(store),
        index,
        ring,
        data_dir: dir.to_path_buf(),
        rebuild: RefCell::new(RebuildProgress::default()),
        rebuild_give_up: opts.rebuild_give_up,
        link: throttle::Throttle::new(opts.max_bandwidth),
        scrub: scrub::Scrubber::new(opts.scrub_rate, opts.scrub_every),
        catching_up: std::cell::Cell::new(true),
        reserve,
        admitted: Default::default(),
    };
    node.keep_reserve();
    crate::wire::serve_dataserver(listener, node, complete, !opts.hold_hints)
}

/// Below this much room (or a tenth of the disk), space freed by deletes is made usable at once.
const SHORT_ROOM: u64 = 64 << 20;
/// Bytes of a put that [`DataNode::make_room`] admitted, counted against the room until dropped:
/// when the put committed or failed, or when its call was given up while it waited (a client's
/// timeout, a dropped connection), which would otherwise leave them counted for good and the
/// disk refusing puts while it has room.
#[must_use]
pub struct Admission<'a> {
    node: &'a DataNode,
    bytes: u64,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.node.admitted.set(self.node.admitted.get().saturating_sub(self.bytes));
    }
}

/// Room left unused for LMDB's own pages (branches, the free list) when blocks are admitted.
const MARGIN: u64 = 256 << 10;
/// Free disk space blocks never take: the metaserver, logs or other dataservers may share the
/// disk, and the metaserver takes creates only while it has its last MiB.
const DISK_MARGIN: u64 = 2 << 20;

/// The reserve on a disk of `total` bytes with `room` bytes free for this server (its disk's free
/// space and the reserve it already holds): 1% of the disk or a 64th of the room, whichever is
/// less, but at least 4 MiB and at most 64 MiB. By estimate a delete's commit needs about 1 MiB
/// per 10,000 blocks it drops (the leaves it rewrites, ~100 keys each, and 8 bytes per freed page
/// in the free list): 64 MiB is a commit dropping some 600,000 blocks (10 GiB of 16 KiB blocks).
/// A disk may be shared by several servers (a test cluster starts up to eight on one), and a
/// reserve sized from the disk alone would take much of a nearly full disk's room before any
/// block is written.
pub fn reserve_for(total: u64, room: u64) -> u64 {
    (total / 100).min(room / 64).clamp(4 << 20, 64 << 20)
}

fn disk_available(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |v| v.blocks_available() * v.fragment_size())
}

fn disk_total(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |v| v.blocks() * v.fragment_size())
}

impl DataNode {
    /// Bytes of disk this server may still fill: the free pages inside its store, what is
    /// allocated past its end beyond the reserve (see `make_room`), and its disk's free space but
    /// the last `DISK_MARGIN`; less a margin for LMDB's own pages and whatever the reserve lacks.
    fn disk_room(&self) -> u64 {
        let disk = disk_available(&self.data_dir);
        let inside = self.store.free_inside().unwrap_or(0);
        let tail = self.store.tail();
        let (lacking, beyond) = (self.reserve.saturating_sub(tail), tail.saturating_sub(self.reserve));
        (inside + beyond + disk.saturating_sub(DISK_MARGIN)).saturating_sub(MARGIN + lacking)
    }

    /// Bytes of disk this server may still fill with blocks (`dfsctl status`; a mount's `df`
    /// turns it into bytes of files with `shared::block::disk_bytes`).
    pub fn room(&self) -> u64 {
        self.disk_room()
    }

    /// Whether room is short enough that space a delete frees must be usable at once (see
    /// `BlockStore::settle`): under a tenth of the disk, or under 64 MiB.
    pub fn room_is_short(&self) -> bool {
        self.short(self.room())
    }

    fn short(&self, room: u64) -> bool {
        room < (disk_total(&self.data_dir) / 10).max(SHORT_ROOM)
    }

    /// Copies what `dfsctl status` shows into the metrics' gauges (see `--metrics`).
    pub fn publish_metrics(&self) {
        use crate::shared::metrics::set;
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Ok((blocks, bytes)) = self.store.stats() {
            set("dfs_blocks", "Blocks this dataserver holds", as_gauge(blocks));
            set("dfs_block_bytes", "Bytes of the blocks this dataserver holds", as_gauge(bytes));
        }
        set("dfs_disk_room_bytes", "Bytes this dataserver may still fill with blocks", as_gauge(self.room()));
        set(
            "dfs_hints",
            "Blocks or cuts held for peers that missed them",
            as_gauge(self.store.hint_count().unwrap_or(0)),
        );
        let r = self.rebuild.borrow().clone();
        set("dfs_rebuilding", "1 while this dataserver rebuilds its store from its peers", i64::from(r.active));
        set("dfs_rebuild_copied", "Blocks the current or last rebuild copied", as_gauge(r.copied));
        set("dfs_rebuild_listed", "Blocks the peers listed for the current or last rebuild", as_gauge(r.listed));
        set(
            "dfs_catching_up",
            "1 while peers hand over what this dataserver missed while down",
            i64::from(self.catching_up.get()),
        );
        let s = self.scrub.status();
        set("dfs_scrub_running", "1 while a scrub pass runs", i64::from(s.running));
        set("dfs_scrub_passes", "Scrub passes ended since the start", as_gauge(s.passes));
        set("dfs_scrub_checked", "Blocks the current or last scrub pass verified", as_gauge(s.checked));
        set("dfs_scrub_total", "Blocks the current or last scrub pass has to verify", as_gauge(s.total));
        set("dfs_scrub_corrupt", "Corrupt copies the current or last scrub pass found", as_gauge(s.corrupt));
        set("dfs_scrub_repaired", "Copies the current or last scrub pass mended here", as_gauge(s.repaired));
    }

    /// Admits blocks of these sizes unless the disk has no room for them (with the puts admitted
    /// and not yet committed), until the answer is dropped.
    pub fn make_room(&self, sizes: impl Iterator<Item = usize>) -> Result<Admission<'_>, String> {
        let room = self.disk_room().saturating_sub(self.admitted.get());
        // The blocks' pages, and a few branch pages besides.
        let needed: u64 = sizes.map(crate::shared::block::disk_bytes).sum::<u64>() + (64 << 10);
        if needed > room {
            return Err(self.no_room(room, needed));
        }
        let admitted = self.admitted.get() + needed;
        // The room seen here may be taken before the put commits by whatever shares the disk
        // (another server, the metaserver, logs), and LMDB would then grow the store into the
        // reserve that deletes need: on a disk so filled, no delete could commit and no room
        // would come back. Near full, the reserve and the puts admitted must fit in the free
        // pages inside the store and what is allocated past its end; what they lack is allocated
        // up front. Half the reserve stays allocated whatever the pages inside (as
        // `keep_reserve` keeps it): LMDB reuses no page freed since the store's last checkpoint,
        // and those count as free inside too. The other half may be pages inside, as
        // `disk_room` counts them: after a delete's commit took some of the reserve on a disk
        // another server has filled since, the tail cannot be topped up, and puts the pages the
        // delete freed hold were refused while `df` showed the room.
        if self.reserve > 0 && self.short(room) {
            let inside = self.store.free_inside().unwrap_or(0);
            let tail = (self.reserve + admitted).saturating_sub(inside).max(self.reserve / 2);
            if self.store.tail() < tail {
                if let Err(e) = self.store.keep_tail(tail) {
                    tracing::debug!(server = self.index, needed, "no room allocated for a put: {e}");
                    return Err(self.no_room(room, needed));
                }
            }
        }
        self.admitted.set(admitted);
        Ok(Admission { node: self, bytes: needed })
    }

    fn no_room(&self, room: u64, needed: u64) -> String {
        format!(
            "{} dataserver {} has {} KiB left, {} KiB asked",
            crate::shared::NO_SPACE_TAG,
            self.index,
            room >> 10,
            needed >> 10
        )
    }

    /// Why a put that failed in the store failed, when the disk has no room for it: LMDB reports
    /// a short write on a full disk as an I/O error (EIO), not as ENOSPC.
    pub fn out_of_room(&self, needed: u64) -> Option<String> {
        let room = self.disk_room();
        (room < needed || disk_available(&self.data_dir) < MARGIN).then(|| self.no_room(room, needed))
    }

    /// Stores copies taken from peers (a rebuild's, the scrubber's) under the admission a
    /// client's put goes through: a rebuild onto a disk too small for its share would otherwise
    /// grow the store into the reserve that deletes need, and fill the disk for good. Answers how
    /// many were stored (see [`BlockStore::put`]).
    pub async fn put_copies(&self, blocks: Vec<Block>) -> Result<usize, String> {
        if blocks.is_empty() {
            return Ok(0);
        }
        let admitted = self.make_room(blocks.iter().map(|b| b.data.len()))?;
        self.put_admitted(blocks, admitted).await
    }

    /// Stores copies that `make_room` admitted (`admitted`, its answer), as [`Self::put_copies`].
    pub async fn put_admitted(&self, blocks: Vec<Block>, admitted: Admission<'_>) -> Result<usize, String> {
        match self.put_in(blocks, true, None, admitted).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(why) => Err(why),
        }
    }

    /// A client's put: admitted against the disk's room, passed through the bandwidth cap, then
    /// stored. `Err` says why the disk has no room for it; else the store's answer.
    pub async fn put(
        &self,
        blocks: Vec<Block>,
        repair: bool,
        hint: Option<blockstore::HintFor>,
    ) -> Result<Result<usize, blockstore::StoreError>, String> {
        let admitted = self.make_room(blocks.iter().map(|b| b.data.len()))?;
        self.link.pass(blocks.iter().map(|b| b.data.len()).sum()).await;
        self.put_in(blocks, repair, hint, admitted).await
    }

    /// Stores `blocks` under `admitted`, then lets the admission go.
    async fn put_in(
        &self,
        blocks: Vec<Block>,
        repair: bool,
        hint: Option<blockstore::HintFor>,
        admitted: Admission<'_>,
    ) -> Result<Result<usize, blockstore::StoreError>, String> {
        let store = self.store.clone();
        let put = crate::shared::blocking(move || store.put(&blocks, repair, hint)).await;
        let needed = admitted.bytes;
        drop(admitted);
        self.keep_reserve();
        match put {
            Err(lost) => Err(lost.to_string()),
            // LMDB reports a full disk as an I/O error.
            Ok(Err(blockstore::StoreError::Db(e))) => match self.out_of_room(needed) {
                Some(why) => Err(why),
                None => Ok(Err(blockstore::StoreError::Db(e))),
            },
            Ok(r) => Ok(r),
        }
    }

    /// Keeps the reserve allocated past the end of the store's file after a commit that may
    /// have grown into it: once the file has grown into half of it, it is made whole again. Not
    /// after every commit that grew the file: an `fallocate` took 170 us on ext4 here (and 9 ms on
    /// tmpfs), a fifth of a small put's time. What is not allocated `disk_room` counts as taken
    /// all the same. On a full disk the reserve stays short until deletes free room.
    pub fn keep_reserve(&self) {
        if self.reserve == 0 || self.store.tail() >= self.reserve / 2 {
            return;
        }
        if let Err(e) = self.store.keep_tail(self.reserve) {
            tracing::debug!(server = self.index, tail = self.store.tail(), "the reserve stays short: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataserver::blockstore::Cut;
    use crate::shared::block::BlockKey;
    use std::future::Future;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn the_reserve_is_a_hundredth_of_the_disk_and_a_64th_of_the_room_within_bounds() {
        assert_eq!(reserve_for(4 * GIB, 4 * GIB), 4 * GIB / 100);
        assert_eq!(reserve_for(252 * GIB, 80 * GIB), 64 * MIB, "at most 64 MiB");
        // A big disk nearly full: the room bounds it, not the disk.
        assert_eq!(reserve_for(252 * GIB, 640 * MIB), 10 * MIB);
        assert_eq!(reserve_for(64 * MIB, 64 * MIB), 4 * MIB, "at least 4 MiB");
        assert_eq!(reserve_for(252 * GIB, 16 * MIB), 4 * MIB, "at least 4 MiB");
    }

    /// Server 0 of four, on `store` in `dir`, with a reserve of `reserve` bytes.
    fn node_on(store: Arc<BlockStore>, dir: &std::path::Path, reserve: u64) -> DataNode {
        DataNode {
            store,
            index: 0,
            ring: (0..4).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect(),
            data_dir: dir.to_path_buf(),
            rebuild: RefCell::default(),
            rebuild_give_up: rebuild::GIVE_UP,
            link: throttle::Throttle::new(None),
            scrub: scrub::Scrubber::new(1 << 30, None),
            catching_up: Default::default(),
            reserve,
            admitted: Default::default(),
        }
    }

    /// Servers that share a disk (a test cluster's, or a dataserver beside its metaserver) each see
    /// the same free space. A put admitted from it could find the room taken by a neighbour when it
    /// committed, and LMDB then grew the store into the reserve that deletes need: on a disk so
    /// filled no delete could commit any more, and no room came back.
    #[test]
    fn a_put_admitted_before_a_neighbour_filled_the_disk_leaves_the_reserve_whole() {
        let base = tempfile::tempdir().expect("temp dir");
        let Some(_disk) = crate::shared::tmpfs::Tmpfs::mount(base.path(), 32 << 20) else { return };
        let dir = base.path().join("ds");
        std::fs::create_dir(&dir).expect("store dir");
        let node = node_on(Arc::new(BlockStore::open(&dir).expect("store").0), &dir, 4 * MIB);
        node.keep_reserve();
        assert!(node.store.tail() >= node.reserve, "the reserve is allocated at the start");

        // Nearly full: 6 MiB left besides the reserve.
        let filler = std::fs::File::create(base.path().join("filler")).expect("filler");
        let free = disk_available(base.path());
        nix::fcntl::posix_fallocate(&filler, 0, (free - 6 * MIB) as i64).expect("fill");

        let blocks: Vec<Block> =
            (0..128).map(|i| Block::new(BlockKey { file_id: 7, index: i }, 1, 3, vec![i as u8; 16384])).collect();
        let admitted = node.make_room(blocks.iter().map(|b| b.data.len())).expect("room for 2.5 MiB");
        // A neighbour takes the rest of the disk before the put commits.
        let rest = disk_available(base.path());
        if rest > 0 {
            let len = filler.metadata().expect("filler").len();
            nix::fcntl::posix_fallocate(&filler, len as i64, rest as i64).expect("fill the rest");
        }
        let put = node.store.put(&blocks, false, None);
        drop(admitted);
        node.keep_reserve();
        put.expect("an admitted put commits");
        assert!(
            node.store.tail() >= node.reserve,
            "the put took the reserve: {} KiB of {} KiB left",
            node.store.tail() >> 10,
            node.reserve >> 10
        );
        let cut = Cut { file_id: 7, from_block: 0, version: 2 };
        assert_eq!(node.store.truncate(&[cut], None).expect("a delete on the full disk"), 128);
    }

    /// A store whose reserve ran short (a delete's commit took some of it) on a disk another
    /// server has filled since still takes a put its free pages inside hold with the reserve.
    /// Regression: the put was refused because the tail could not be topped up, while `df`
    /// showed the room the delete freed.
    #[test]
    fn a_put_the_free_pages_inside_hold_with_the_reserve_is_taken_on_a_full_disk() {
        let base = tempfile::tempdir().expect("temp dir");
        let Some(_disk) = crate::shared::tmpfs::Tmpfs::mount(base.path(), 32 << 20) else { return };
        let dir = base.path().join("ds");
        std::fs::create_dir(&dir).expect("store dir");
        let store = Arc::new(BlockStore::open(&dir).expect("store").0);
        let blocks = |file_id, n| -> Vec<Block> {
            (0..n).map(|i| Block::new(BlockKey { file_id, index: i }, 1, 3, vec![i as u8; 16384])).collect()
        };
        // 10 MiB stored, then deleted (settled, as on a short disk): the pages stay inside the
        // store, free.
        store.put(&blocks(7, 640), false, None).expect("put");
        let cut = |file_id| Cut { file_id, from_block: 0, version: 2 };
        assert_eq!(store.truncate(&[cut(7)], None).expect("delete"), 640);
        store.settle().expect("settle");
        store.settle().expect("settle");
        // The reserve allocated at 4 MiB, then asked of 6: 2 MiB short, as after a delete's
        // commit took some of it.
        node_on(store.clone(), &dir, 4 * MIB).keep_reserve();
        let node = node_on(store, &dir, 6 * MIB);
        assert!(node.store.tail() >= node.reserve / 2, "half the reserve is there");
        let filler = std::fs::File::create(base.path().join("filler")).expect("filler");
        nix::fcntl::posix_fallocate(&filler, 0, disk_available(base.path()) as i64).expect("fill");
        assert!(node.store.tail() < node.reserve, "the reserve is short");
        assert!(node.store.keep_tail(node.reserve).is_err(), "the disk has no room to top it up");

        let one = blocks(8, 64);
        let admitted = node.make_room(one.iter().map(|b| b.data.len())).expect("room for 1 MiB inside");
        node.store.put(&one, false, None).expect("an admitted put commits");
        drop(admitted);
        assert_eq!(node.store.truncate(&[cut(8)], None).expect("a delete on the full disk"), 64);
    }

    /// A put whose call is given up while it waits for the bandwidth cap (the client's timeout,
    /// a dropped connection: the RPC system drops the call) lets its admission go. Regression:
    /// the admission was released after the awaits only, so each such put shrank the room for
    /// good, until the server refused every put with room on its disk.
    #[tokio::test]
    async fn a_put_given_up_while_it_waits_lets_its_admission_go() {
        let peers = testing::StorePeers::new(4);
        let node = DataNode { link: throttle::Throttle::new(Some(1)), ..peers.node(0) };
        let key = BlockKey { file_id: 1, index: 0 };
        let put = node.put(vec![Block::new(key, 1, 3, vec![7; 4096])], false, None);
        let mut put = Box::pin(put);
        let waker = futures::task::noop_waker();
        let polled = put.as_mut().poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending(), "the put waits for the cap");
        assert!(node.admitted.get() > 0, "admitted while it waits");
        drop(put);
        assert_eq!(node.admitted.get(), 0);
    }
}
