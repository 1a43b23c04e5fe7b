//! Rebuilding a new (or wiped) store from the ring neighbours, and checking at start that every
//! peer was started with the same ring. Both talk to the peers through [`PeerPort`], so they are
//! tested here with fakes; `wire::peer` is the real port.

use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::blockstore::{Cut, StoreError};
use super::DataNode;
use crate::shared::block::{Block, BlockKey, Checksum};
use crate::shared::db::DbError;
use crate::shared::layout::{ring_difference, MAX_BLOCK_SIZE};
use crate::shared::{blocking, PortError, WorkerLost};

/// Keys asked for per listing page.
const PAGE: u32 = 1024;
/// Blocks fetched per get.
const FETCH: usize = 64;

/// Why copying from one peer stopped (it is tried again later).
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error(transparent)]
    Peer(#[from] PortError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("local store: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Worker(#[from] WorkerLost),
}

/// How far a rebuild has come, for `dfsctl status`.
#[derive(Clone, Debug, Default)]
pub struct RebuildProgress {
    pub active: bool,
    pub copied: u64,
    pub listed: u64,
    pub peers_left: u32,
}

/// One page of a peer's listing of the blocks another server should hold.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Keys in ascending order, each with the version the peer holds.
    pub keys: Vec<(BlockKey, u64)>,
    /// True when the listing has no more pages.
    pub done: bool,
}

/// A dataserver's view of its peers, by ring index. `Unreachable` means retry later; `Refused`
/// means the peer will not serve us (for example, it was started with another ring).
#[allow(async_fn_in_trait)]
pub trait PeerPort {
    /// The ring `peer` was started with.
    async fn ring(&self, peer: usize) -> Result<Vec<String>, PortError>;
    /// Up to `limit` blocks after `after` that server `target` should hold, as `peer` has them.
    async fn list_for(&self, peer: usize, target: usize, after: BlockKey, limit: u32) -> Result<ListPage, PortError>;
    /// The blocks as `peer` holds them (unverified); `None` where it has none.
    async fn get(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, PortError>;
    /// Gives `peer` copies it may lack: each is stored only where it is missing, corrupt or older.
    async fn put(&self, peer: usize, blocks: &[Block]) -> Result<(), PortError>;
    /// Gives `peer` cuts it may have missed.
    async fn truncate(&self, peer: usize, cuts: &[Cut]) -> Result<(), PortError>;
    /// How many hints `peer` keeps for server `target`.
    async fn hints_for(&self, peer: usize, target: usize) -> Result<u64, PortError>;
    /// The versions `peer` holds of `keys` (0: none).
    async fn versions(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<u64>, PortError>;
    /// `peer`'s digest of the blocks in `[from, to)` that server `shared_with` holds too (see
    /// `BlockStore::digest`).
    async fn digest(
        &self,
        peer: usize,
        from: BlockKey,
        to: Option<BlockKey>,
        shared_with: usize,
    ) -> Result<(u64, Checksum), PortError>;
}

/// Asks every peer for its ring and logs an ERROR for each whose ring differs from this server's
/// (a server started with its ports in another order, or with a typo, would otherwise look healthy
/// while refusing every client). A peer that is down is asked again until it answers.
pub async fn compare_rings(node: &DataNode, peers: &impl PeerPort) {
    let me = node.index;
    let mut waiting: Vec<usize> = (0..node.ring.len()).filter(|&j| j != me).collect();
    let mut delay = Duration::from_millis(200);
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for peer in waiting {
            match peers.ring(peer).await {
                Ok(theirs) => match ring_difference(&theirs, &node.ring) {
                    Some(diff) => error!(
                        server = me,
                        peer,
                        addr = %node.ring[peer],
                        "this server's ring differs from that of dataserver {peer}: {diff}"
                    ),
                    None => debug!(server = me, peer, "same ring as dataserver {peer}"),
                },
                Err(_) => still.push(peer),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// Copies from every peer the blocks this server should hold, then records the store complete.
/// Serves meanwhile. A peer that fails is left for later while the others are copied from, and
/// asked again (with backoff) until it answers, since it may hold the only other copy: the store
/// is complete only once every peer has been listed to the end. Completion is recorded in the
/// store, so a server killed mid-rebuild resumes the rebuild when restarted.
pub async fn rebuild(node: &DataNode, peers: &impl PeerPort) {
    let n = node.ring.len();
    let me = node.index;
    // Nearest peers first: with R replicas only those within R-1 positions share blocks with us.
    let mut pending: Vec<(usize, BlockKey)> =
        (0..n).filter(|&j| j != me).map(|j| (j, BlockKey { file_id: 0, index: 0 })).collect();
    pending.sort_by_key(|&(j, _)| {
        let d = (j + n - me) % n;
        d.min(n - d)
    });
    {
        let mut p = node.rebuild.borrow_mut();
        p.active = true;
        p.peers_left = pending.len() as u32;
    }
    info!(server = me, peers = pending.len(), "store is new or incomplete; rebuilding from the peers");
    let mut delay = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut failed = Vec::new();
        for (peer, mut after) in pending {
            match copy_from(node, peers, peer, &mut after).await {
                Ok(()) => {
                    let p = {
                        let mut p = node.rebuild.borrow_mut();
                        p.peers_left -= 1;
                        p.clone()
                    };
                    info!(
                        server = me,
                        peer,
                        copied = p.copied,
                        listed = p.listed,
                        peers_left = p.peers_left,
                        "rebuild: peer done"
                    );
                }
                Err(e) => {
                    warn!(server = me, peer, addr = %node.ring[peer], "rebuild: peer failed, will retry: {e}");
                    failed.push((peer, after));
                }
            }
        }
        pending = failed;
        if !pending.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
    let store = node.store.clone();
    let recorded: Result<(), CopyError> = async { Ok(blocking(move || store.mark_complete()).await??) }.await;
    match recorded {
        Ok(()) => {
            let copied = {
                let mut p = node.rebuild.borrow_mut();
                p.active = false;
                p.copied
            };
            info!(server = me, copied, "rebuild complete");
        }
        Err(e) => warn!(server = me, "rebuild: cannot record completion: {e}"),
    }
}

/// Copies from `peer`, page by page, every block this server should hold, resuming after `after`
/// (advanced as pages are done, so that a retry after a lost connection does not start over).
#[tracing::instrument(level = "debug", skip(node, peers, after), fields(server = node.index))]
async fn copy_from(node: &DataNode, peers: &impl PeerPort, peer: usize, after: &mut BlockKey) -> Result<(), CopyError> {
    loop {
        let page = peers.list_for(peer, node.index, *after, PAGE).await?;
        node.rebuild.borrow_mut().listed += page.keys.len() as u64;
        let store = node.store.clone();
        let keys: Vec<BlockKey> = page.keys.iter().map(|(k, _)| *k).collect();
        let local = blocking(move || store.get(&keys)).await??;
        // What we lack, hold an older version of, or hold damaged.
        let wanted: Vec<BlockKey> = page
            .keys
            .iter()
            .zip(&local)
            .filter(|((_, v), l)| l.as_ref().is_none_or(|l| l.version < *v || !l.verifies()))
            .map(|((k, _), _)| *k)
            .collect();
        for chunk in wanted.chunks(FETCH) {
            let got = peers.get(peer, chunk).await?;
            let mut blocks = Vec::with_capacity(got.len());
            // A block deleted meanwhile is simply not there.
            for b in got.into_iter().flatten() {
                if b.data.len() > MAX_BLOCK_SIZE as usize || b.replicas == 0 {
                    continue;
                }
                if b.verifies() {
                    blocks.push(b);
                } else {
                    warn!(
                        server = node.index,
                        peer,
                        file = b.key.file_id,
                        block = b.key.index,
                        "rebuild: the peer's copy is corrupt; another peer may have a good one"
                    );
                }
            }
            let count = blocks.len() as u64;
            let store = node.store.clone();
            blocking(move || store.put(&blocks, true, None)).await??;
            node.rebuild.borrow_mut().copied += count;
        }
        if let Some((last, _)) = page.keys.last() {
            *after = *last;
        }
        if page.done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::dataserver::blockstore::BlockStore;
    use crate::shared::placement::holds;

    const N: usize = 4;
    const R: u8 = 3;

    /// Peers holding the blocks placement gives them, some down or on another ring.
    struct FakePeers {
        ring: Vec<String>,
        held: Vec<BTreeMap<BlockKey, Block>>,
        down: Vec<usize>,
        other_ring: Vec<usize>,
        calls: RefCell<Vec<usize>>,
    }

    impl FakePeers {
        fn new(files: u64, blocks: u64) -> FakePeers {
            let ring: Vec<String> = (0..N).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
            let mut held = vec![BTreeMap::new(); N];
            for f in 1..=files {
                for i in 0..blocks {
                    let key = BlockKey { file_id: f, index: i };
                    let b = Block::new(key, 1, R, format!("{f}/{i}").into_bytes());
                    for (s, h) in held.iter_mut().enumerate() {
                        if holds(s, f, i, R.into(), N) {
                            h.insert(key, b.clone());
                        }
                    }
                }
            }
            FakePeers { ring, held, down: vec![], other_ring: vec![], calls: RefCell::default() }
        }

        fn answer(&self, peer: usize) -> Result<(), PortError> {
            self.calls.borrow_mut().push(peer);
            if self.down.contains(&peer) {
                return Err(PortError::Unreachable("connection refused".into()));
            }
            if self.other_ring.contains(&peer) {
                return Err(PortError::Refused("server list differs".into()));
            }
            Ok(())
        }
    }

    impl PeerPort for FakePeers {
        async fn ring(&self, peer: usize) -> Result<Vec<String>, PortError> {
            self.answer(peer)?;
            Ok(self.ring.clone())
        }

        async fn list_for(
            &self,
            peer: usize,
            target: usize,
            after: BlockKey,
            limit: u32,
        ) -> Result<ListPage, PortError> {
            self.answer(peer)?;
            let first = after.index.checked_add(1).map(|index| BlockKey { file_id: after.file_id, index });
            let keys: Vec<(BlockKey, u64)> = self.held[peer]
                .range(first.unwrap_or(after)..)
                .filter(|(k, b)| holds(target, k.file_id, k.index, b.replicas.into(), N))
                .take(limit as usize)
                .map(|(k, b)| (*k, b.version))
                .collect();
            Ok(ListPage { done: keys.len() < limit as usize, keys })
        }

        async fn get(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, PortError> {
            self.answer(peer)?;
            Ok(keys.iter().map(|k| self.held[peer].get(k).cloned()).collect())
        }

        async fn put(&self, _: usize, _: &[Block]) -> Result<(), PortError> {
            Err(PortError::Refused("a rebuild writes nothing to its peers".into()))
        }

        async fn truncate(&self, _: usize, _: &[Cut]) -> Result<(), PortError> {
            Err(PortError::Refused("a rebuild writes nothing to its peers".into()))
        }

        async fn versions(&self, _: usize, _: &[BlockKey]) -> Result<Vec<u64>, PortError> {
            Err(PortError::Refused("not asked by a rebuild".into()))
        }

        async fn hints_for(&self, _: usize, _: usize) -> Result<u64, PortError> {
            Err(PortError::Refused("not asked by a rebuild".into()))
        }

        async fn digest(
            &self,
            _: usize,
            _: BlockKey,
            _: Option<BlockKey>,
            _: usize,
        ) -> Result<(u64, Checksum), PortError> {
            Err(PortError::Refused("not asked by a rebuild".into()))
        }
    }

    fn node(me: usize, peers: &FakePeers) -> (tempfile::TempDir, DataNode) {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, complete) = BlockStore::open(dir.path()).expect("store");
        assert!(!complete);
        let node = DataNode {
            store: Arc::new(store),
            index: me,
            ring: peers.ring.clone(),
            data_dir: dir.path().to_path_buf(),
            rebuild: RefCell::default(),
            link: crate::dataserver::throttle::Throttle::new(None),
            scrub: crate::dataserver::scrub::Scrubber::new(1 << 30, None),
            catching_up: Default::default(),
        };
        (dir, node)
    }

    fn stored(node: &DataNode, peers: &FakePeers, from: usize) -> (usize, usize) {
        let keys: Vec<BlockKey> =
            peers.held[from].keys().filter(|k| holds(node.index, k.file_id, k.index, R.into(), N)).copied().collect();
        let got = node.store.get(&keys).expect("get");
        (got.iter().flatten().count(), keys.len())
    }

    fn is_complete(dir: &tempfile::TempDir, node: DataNode) -> bool {
        drop(node);
        BlockStore::open(dir.path()).expect("reopen").1
    }

    /// Rebuilds server 0 from `peers`, which must finish.
    async fn rebuild_finishing(peers: &FakePeers) -> (tempfile::TempDir, DataNode) {
        let (dir, node) = node(0, peers);
        let r = tokio::time::timeout(Duration::from_secs(20), rebuild(&node, peers)).await;
        assert!(r.is_ok(), "the rebuild did not finish with every peer up");
        (dir, node)
    }

    #[tokio::test]
    async fn every_block_is_copied_from_the_peers_and_the_store_is_complete() {
        let peers = FakePeers::new(5, 40);
        let (dir, node) = rebuild_finishing(&peers).await;
        for p in 1..N {
            let (have, want) = stored(&node, &peers, p);
            assert!(want > 0);
            assert_eq!(have, want, "blocks shared with peer {p}");
        }
        assert!(!node.rebuild.borrow().active);
        assert!(is_complete(&dir, node));
    }

    /// Rebuilds server 0 from `peers` for a minute of (paused) time, which must not be enough.
    async fn rebuild_never_finishing(peers: &FakePeers) -> (tempfile::TempDir, DataNode) {
        let (dir, node) = node(0, peers);
        let r = tokio::time::timeout(Duration::from_secs(60), rebuild(&node, peers)).await;
        assert!(r.is_err(), "a rebuild must not finish while a peer may hold the only copy");
        (dir, node)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_leaves_the_store_incomplete_but_the_others_are_copied() {
        let mut peers = FakePeers::new(5, 40);
        peers.down = vec![1];
        let (dir, node) = rebuild_never_finishing(&peers).await;
        for p in [2, 3] {
            let (have, want) = stored(&node, &peers, p);
            assert_eq!(have, want, "blocks shared with the live peer {p}");
        }
        let progress = node.rebuild.borrow().clone();
        assert!(progress.active);
        assert_eq!(progress.peers_left, 1);
        assert!(peers.calls.borrow().iter().filter(|&&p| p == 1).count() > 3, "the down peer is asked again");
        assert!(!is_complete(&dir, node));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_with_another_ring_is_never_copied_from_and_completion_waits() {
        let mut peers = FakePeers::new(3, 20);
        peers.other_ring = vec![3];
        let (dir, node) = rebuild_never_finishing(&peers).await;
        assert_eq!(node.rebuild.borrow().peers_left, 1);
        assert!(!is_complete(&dir, node));
    }

    #[tokio::test]
    async fn corrupt_copies_are_not_taken() {
        let mut peers = FakePeers::new(2, 10);
        for h in &mut peers.held {
            for b in h.values_mut() {
                if b.key.index == 3 {
                    b.data[0] ^= 1;
                }
            }
        }
        let (_dir, node) = rebuild_finishing(&peers).await;
        for f in 1..=2 {
            let got = node.store.get(&[BlockKey { file_id: f, index: 3 }]).expect("get");
            assert!(got[0].is_none(), "a corrupt block was stored");
        }
        let (have, want) = stored(&node, &peers, 1);
        assert!(have > 0 && have < want);
    }
}
