//! Rebuilding a new (or wiped) store from the ring neighbours, and checking at start that every
//! peer was started with the same ring. Both talk to the peers through [`PeerPort`], so they are
//! tested here with fakes; `wire::peer` is the real port.

use std::time::Duration;

use futures::StreamExt;
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
/// Fetches of blocks from a peer asked at once.
const FETCHES_IN_FLIGHT: usize = 2;
/// Files whose cuts are asked for per call.
const CUT_PAGE: u32 = 1024;

/// Why copying from one peer stopped (it is tried again later).
#[derive(Debug, thiserror::Error)]
pub(super) enum CopyError {
    #[error(transparent)]
    Peer(#[from] PortError),
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    #[error("local store: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Worker(#[from] WorkerLost),
    #[error("storing the copies: {0}")]
    Room(String),
}

/// How far a rebuild has come, for `dfsctl status`.
#[derive(Clone, Debug, Default)]
pub struct RebuildProgress {
    pub active: bool,
    pub copied: u64,
    pub listed: u64,
    pub peers_left: u32,
    /// Peers the rebuild finished without (copied from later, when they answer).
    pub skipped: Vec<usize>,
    /// Blocks a peer listed that no holder reached had intact, and the first of them.
    pub nowhere: u64,
    pub nowhere_keys: Vec<BlockKey>,
}

/// One page of a peer's listing of the blocks another server should hold.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Keys in ascending order, each with the version the peer holds.
    pub keys: Vec<(BlockKey, u64)>,
    /// The MD5 of each listed block, in the same order; empty from a peer that does not send them.
    pub md5s: Vec<Checksum>,
    /// The peer is rebuilding its own store: what it lists may fall short of its share.
    pub rebuilding: bool,
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
    /// The cuts `peer` keeps, of up to `limit` files from file id `from` on, and whether that
    /// was the last of them (see `BlockStore::list_cuts`).
    async fn cuts(&self, peer: usize, from: u64, limit: u32) -> Result<(Vec<Cut>, bool), PortError>;
    /// How many hints `peer` keeps for server `target`, of versions below `before` (0: all).
    async fn hints_for(&self, peer: usize, target: usize, before: u64) -> Result<u64, PortError>;
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

/// How long a rebuild keeps trying a peer that does not answer, by default.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// Blocks found nowhere that `dfsctl status` names (the count is complete).
const NOWHERE_SHOWN: usize = 32;

/// Whether a rebuild of server `me` may finish without peer `p`: every placement window of `r`
/// consecutive servers holding both has a third member whose listing was read to the end, so
/// each block the two share was offered by a live holder.
fn may_skip(me: usize, p: usize, n: usize, r: usize, done: &[bool]) -> bool {
    let r = r.min(n);
    (0..n).all(|s| {
        let window: Vec<usize> = (0..r).map(|k| (s + k) % n).collect();
        !(window.contains(&me) && window.contains(&p)) || window.iter().any(|&q| q != me && q != p && done[q])
    })
}

/// Copies from every peer the blocks this server should hold, then records the store complete.
/// Serves meanwhile. A peer that fails is left for later while the others are copied from, and
/// asked again with backoff. A peer that has not answered for `node.rebuild_give_up` is skipped
/// once every block it shares with this server has another holder that was listed to the end
/// (with the fewest replicas of a block copied or held so far, or 2 before any); the rebuild
/// then finishes without it, and copies from it later, whenever it answers. Blocks listed but
/// found on no holder intact are counted for `dfsctl status`. Completion is recorded in the
/// store, so a server killed mid-rebuild resumes the rebuild when restarted.
pub async fn rebuild(node: &DataNode, peers: &impl PeerPort) {
    let n = node.ring.len();
    let me = node.index;
    // Nearest peers first: with R replicas only those within R-1 positions share blocks with us.
    let mut pending: Vec<Pending> = (0..n).filter(|&j| j != me).map(Pending::new).collect();
    pending.sort_by_key(|p| {
        let d = (p.peer + n - me) % n;
        d.min(n - d)
    });
    {
        let mut p = node.rebuild.borrow_mut();
        p.active = true;
        p.peers_left = pending.len() as u32;
    }
    info!(server = me, peers = pending.len(), "store is new or incomplete; rebuilding from the peers");
    let mut done = vec![false; n];
    done[me] = true;
    let mut found = Found::default();
    let mut skipped = Vec::new();
    // Peers copied from while they rebuilt their own stores: they cover no other peer until
    // listed again once their rebuild is over.
    let mut short = Vec::new();
    let mut delay = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut failed = Vec::new();
        for mut p in pending {
            let was = (p.cuts_from, p.after);
            let copied = copy_from(node, peers, &mut p, &mut found).await;
            if (p.cuts_from, p.after) != was {
                // It answered some pages: slow, not silent.
                p.failing_since = None;
            }
            match copied {
                Ok(()) => {
                    // A peer rebuilding its own store may lack blocks of its share: it does not
                    // stand in for another holder that is silent.
                    done[p.peer] = !p.short;
                    if p.short {
                        short.push(p.peer);
                    }
                    let progress = {
                        let mut progress = node.rebuild.borrow_mut();
                        progress.peers_left -= 1;
                        progress.clone()
                    };
                    info!(
                        server = me,
                        peer = p.peer,
                        copied = progress.copied,
                        listed = progress.listed,
                        peers_left = progress.peers_left,
                        "rebuild: peer done"
                    );
                }
                Err(e) => {
                    warn!(server = me, peer = p.peer, addr = %node.ring[p.peer], "rebuild: peer failed, will retry: {e}");
                    p.failing_since.get_or_insert_with(tokio::time::Instant::now);
                    failed.push(p);
                }
            }
        }
        // Skip the peers that have failed long enough, where the others cover them. Before any
        // block is known, by 2 replicas: a block of 2 is covered by nobody else.
        let r = found.fewest_replicas.map_or(2, usize::from);
        let mut kept = Vec::new();
        for p in failed {
            let long = p.failing_since.is_some_and(|t| t.elapsed() >= node.rebuild_give_up);
            if long && may_skip(me, p.peer, n, r, &done) {
                warn!(
                    server = me,
                    peer = p.peer,
                    "rebuild: finishing without dataserver {} (no answer for {:?}); what it holds comes \
                     from the other holders, and it is copied from when it answers",
                    p.peer,
                    node.rebuild_give_up
                );
                node.rebuild.borrow_mut().peers_left -= 1;
                skipped.push(p);
            } else {
                kept.push(p);
            }
        }
        // A silent peer that only a peer listed while rebuilding could cover: ask whether that
        // rebuild is over, and if so list that peer again (what it holds already is not copied
        // again). Else this rebuild would wait for the silent peer for good.
        let stuck = kept.iter().any(|p| p.failing_since.is_some_and(|t| t.elapsed() >= node.rebuild_give_up));
        if stuck && !short.is_empty() {
            let start = BlockKey { file_id: 0, index: 0 };
            let mut still = Vec::new();
            for peer in short.drain(..) {
                let asked = tokio::time::timeout(node.rebuild_give_up, peers.list_for(peer, me, start, 1)).await;
                if matches!(asked, Ok(Ok(ref page)) if !page.rebuilding) {
                    info!(server = me, peer, "rebuild: the peer's own rebuild is over; listing it again");
                    node.rebuild.borrow_mut().peers_left += 1;
                    kept.push(Pending::new(peer));
                } else {
                    still.push(peer);
                }
            }
            short = still;
        }
        pending = kept;
        node.rebuild.borrow_mut().skipped = skipped.iter().map(|p| p.peer).collect();
        if !pending.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
    found.report(node).await;
    let store = node.store.clone();
    let recorded: Result<(), CopyError> = async { Ok(blocking(move || store.mark_complete()).await??) }.await;
    match recorded {
        Ok(()) => {
            let (copied, nowhere) = {
                let mut p = node.rebuild.borrow_mut();
                p.active = false;
                (p.copied, p.nowhere)
            };
            info!(server = me, copied, nowhere, skipped = skipped.len(), "rebuild complete");
        }
        Err(e) => {
            warn!(server = me, "rebuild: cannot record completion: {e}");
            return;
        }
    }
    // Late copies from the skipped peers, for blocks only they and this server held (none when
    // the skip rule held) and versions newer than the other holders' (a hand-over not yet done).
    while !skipped.is_empty() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
        let mut still = Vec::new();
        for mut p in skipped {
            match copy_from(node, peers, &mut p, &mut found).await {
                Ok(()) => info!(server = me, peer = p.peer, "rebuild: the skipped peer answered and was copied from"),
                Err(e) => {
                    debug!(server = me, peer = p.peer, "rebuild: skipped peer still failing: {e}");
                    still.push(p);
                }
            }
        }
        skipped = still;
        node.rebuild.borrow_mut().skipped = skipped.iter().map(|p| p.peer).collect();
        found.report(node).await;
    }
}

/// A peer a rebuild has yet to copy from.
struct Pending {
    peer: usize,
    /// The file id its cuts are taken from next; `None` once all are.
    cuts_from: Option<u64>,
    /// The last key copied (listings resume after it).
    after: BlockKey,
    /// Since when it has been failing.
    failing_since: Option<tokio::time::Instant>,
    /// It listed while rebuilding its own store: copied from, it still covers no other peer.
    short: bool,
}

impl Pending {
    fn new(peer: usize) -> Pending {
        let after = BlockKey { file_id: 0, index: 0 };
        Pending { peer, cuts_from: Some(0), after, failing_since: None, short: false }
    }
}

/// A peer that gave no `what` within `limit`: tried again later, like one that is down.
fn late(what: &str, limit: Duration) -> CopyError {
    CopyError::Peer(PortError::Unreachable(format!("no {what} in {limit:?}")))
}

/// Blocks `keys` from `peer`, in one get, or in halves while the peer refuses a get (its reply
/// would be too large: a get of [`FETCH`] blocks of over 768 KiB carries more than a reply may).
/// Each get is given up after `limit`.
pub(super) async fn fetch(
    peers: &impl PeerPort,
    peer: usize,
    keys: &[BlockKey],
    limit: Duration,
) -> Result<Vec<Option<Block>>, CopyError> {
    let mut got = Vec::with_capacity(keys.len());
    let mut asks = vec![keys];
    while let Some(ask) = asks.pop() {
        match tokio::time::timeout(limit, peers.get(peer, ask)).await.map_err(|_| late("blocks", limit))? {
            Ok(blocks) => got.extend(blocks),
            Err(PortError::Refused(_)) if ask.len() > 1 => {
                let (a, b) = ask.split_at(ask.len() / 2);
                asks.extend([b, a]);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Stores what of `blocks` the disk has room for, halving a batch its admission refuses (a disk
/// that takes a few more blocks takes them, though a batch of 64 large ones would not fit).
/// Answers how many were stored, and why the first block refused alone was.
async fn put_what_fits(node: &DataNode, blocks: Vec<Block>) -> (u64, Option<String>) {
    let (mut stored, mut refused) = (0, None);
    let mut todo = vec![blocks];
    while let Some(mut batch) = todo.pop() {
        if batch.is_empty() {
            continue;
        }
        match node.make_room(batch.iter().map(|b| b.data.len())) {
            Ok(admitted) => {
                let count = batch.len() as u64;
                match node.put_admitted(batch, admitted).await {
                    Ok(_) => stored += count,
                    Err(e) => return (stored, Some(e)),
                }
            }
            Err(_) if batch.len() > 1 => {
                let rest = batch.split_off(batch.len() / 2);
                todo.push(rest);
                todo.push(batch);
            }
            Err(e) => {
                refused.get_or_insert(e);
            }
        }
    }
    (stored, refused)
}

/// What a rebuild learned across peers.
#[derive(Default)]
struct Found {
    /// Blocks listed by a peer but not obtained intact from it (corrupt, or gone meanwhile), with
    /// the newest version listed.
    missed: std::collections::BTreeMap<BlockKey, u64>,
    /// The fewest replicas of any block copied, or held here already.
    fewest_replicas: Option<u8>,
}

impl Found {
    fn fewer_replicas(&mut self, r: u8) {
        self.fewest_replicas = Some(self.fewest_replicas.map_or(r, |f| f.min(r)));
    }

    /// Counts the missed blocks this store still lacks into `node.rebuild`.
    async fn report(&mut self, node: &DataNode) {
        let store = node.store.clone();
        let keys: Vec<BlockKey> = self.missed.keys().copied().collect();
        // Held intact by now, or deleted meanwhile (a cut recorded here covers it).
        let looked = blocking(move || Ok::<_, DbError>((store.get(&keys)?, store.cut_versions(&keys)?, keys))).await;
        let Ok(Ok((got, cuts, keys))) = looked else { return };
        // A cut older than the version listed does not cover it: a file truncated and then
        // written again (an O_TRUNC open) keeps its tombstone, and its lost blocks are lost.
        for ((k, b), cut) in keys.iter().zip(got).zip(cuts) {
            if b.is_some_and(|b| b.verifies()) || self.missed.get(k).is_some_and(|&v| cut > v) {
                self.missed.remove(k);
            }
        }
        let mut p = node.rebuild.borrow_mut();
        p.nowhere = self.missed.len() as u64;
        p.nowhere_keys = self.missed.keys().take(NOWHERE_SHOWN).copied().collect();
        if p.nowhere > 0 {
            error!(
                server = node.index,
                blocks = p.nowhere,
                "rebuild: blocks listed by a peer were found intact on no holder reached"
            );
        }
    }
}

/// Copies from peer `p.peer`, page by page, its cuts and then every block this server should
/// hold, resuming where `p` says (advanced as pages are done, so that a retry after a lost
/// connection does not start over).
///
/// The cuts: this store's own tombstones went with its disk, and a peer that missed a cut (its
/// hint for it still waiting on another server) still holds the blocks it removed. Applied here,
/// the cuts remove such copies taken from another peer before, and refuse those offered after.
#[tracing::instrument(level = "debug", skip(node, peers, p, found), fields(server = node.index, peer = p.peer))]
async fn copy_from(
    node: &DataNode,
    peers: &impl PeerPort,
    p: &mut Pending,
    found: &mut Found,
) -> Result<(), CopyError> {
    let (peer, after) = (p.peer, &mut p.after);
    // A stopped peer accepts connections and never answers: every call is bounded.
    let limit = node.rebuild_give_up;
    while let Some(from) = p.cuts_from {
        let (cuts, done) =
            tokio::time::timeout(limit, peers.cuts(peer, from, CUT_PAGE)).await.map_err(|_| late("cuts", limit))??;
        let next = cuts.last().and_then(|c| c.file_id.checked_add(1));
        if !cuts.is_empty() {
            let store = node.store.clone();
            blocking(move || store.truncate(&cuts, None)).await??;
        }
        // A page that is not the last has cuts (see `BlockStore::list_cuts`).
        p.cuts_from = if done { None } else { next };
    }
    loop {
        let page = tokio::time::timeout(limit, peers.list_for(peer, node.index, *after, PAGE))
            .await
            .map_err(|_| late("listing", limit))??;
        node.rebuild.borrow_mut().listed += page.keys.len() as u64;
        p.short |= page.rebuilding;
        let store = node.store.clone();
        let keys: Vec<BlockKey> = page.keys.iter().map(|(k, _)| *k).collect();
        let local = blocking(move || store.versions_checked(&keys)).await??;
        // What we lack, hold an older version of, or hold damaged.
        let listed: Vec<(BlockKey, u64)> = page
            .keys
            .iter()
            .zip(&local)
            .filter(|((_, v), l)| l.is_none_or(|(version, good, _)| version < *v || !good))
            .map(|(kv, _)| *kv)
            .collect();
        let wanted: Vec<BlockKey> = listed.iter().map(|(k, _)| *k).collect();
        // Held already (copied before a restart): their replica count counts as a copy's would.
        for &(_, _, replicas) in local.iter().flatten().filter(|&&(_, good, r)| good && r > 0) {
            found.fewer_replicas(replicas);
        }
        for (k, v) in listed {
            let newest = found.missed.entry(k).or_insert(v);
            *newest = (*newest).max(v);
        }
        // Two fetches in flight: the peer reads the next chunk from its disk while this one is
        // stored here.
        let mut fetches = futures::stream::iter(wanted.chunks(FETCH))
            .map(|chunk| fetch(peers, peer, chunk, limit))
            .buffered(FETCHES_IN_FLIGHT);
        while let Some(got) = fetches.next().await {
            let got = got?;
            let mut blocks = Vec::with_capacity(got.len());
            // A block deleted meanwhile is simply not there.
            for b in got.into_iter().flatten() {
                if b.data.len() > MAX_BLOCK_SIZE as usize || b.replicas == 0 {
                    continue;
                }
                if b.verifies() {
                    found.missed.remove(&b.key);
                    found.fewer_replicas(b.replicas);
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
            let (stored, refused) = put_what_fits(node, blocks).await;
            node.rebuild.borrow_mut().copied += stored;
            if let Some(why) = refused {
                return Err(CopyError::Room(why));
            }
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
        /// Most block bytes a get's reply may carry (a dataserver refuses a get beyond its limit).
        max_reply: usize,
        /// Peers that say they are rebuilding their own stores.
        rebuilding: RefCell<Vec<usize>>,
    }

    impl FakePeers {
        fn new(files: u64, blocks: u64) -> FakePeers {
            Self::with_replicas(files, blocks, R)
        }

        fn with_replicas(files: u64, blocks: u64, r: u8) -> FakePeers {
            let ring: Vec<String> = (0..N).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
            let mut held = vec![BTreeMap::new(); N];
            for f in 1..=files {
                for i in 0..blocks {
                    let key = BlockKey { file_id: f, index: i };
                    let b = Block::new(key, 1, r, format!("{f}/{i}").into_bytes());
                    for (s, h) in held.iter_mut().enumerate() {
                        if holds(s, f, i, r.into(), N) {
                            h.insert(key, b.clone());
                        }
                    }
                }
            }
            let calls = RefCell::default();
            FakePeers {
                ring,
                held,
                down: vec![],
                other_ring: vec![],
                calls,
                max_reply: usize::MAX,
                rebuilding: RefCell::default(),
            }
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
            let (keys, md5s): (Vec<(BlockKey, u64)>, Vec<Checksum>) = self.held[peer]
                .range(first.unwrap_or(after)..)
                .filter(|(k, b)| holds(target, k.file_id, k.index, b.replicas.into(), N))
                .take(limit as usize)
                .map(|(k, b)| ((*k, b.version), b.md5))
                .unzip();
            Ok(ListPage {
                done: keys.len() < limit as usize,
                keys,
                md5s,
                rebuilding: self.rebuilding.borrow().contains(&peer),
            })
        }

        async fn get(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, PortError> {
            self.answer(peer)?;
            let got: Vec<Option<Block>> = keys.iter().map(|k| self.held[peer].get(k).cloned()).collect();
            if got.iter().flatten().map(|b| b.data.len()).sum::<usize>() > self.max_reply {
                return Err(PortError::Refused("the reply would carry too many bytes".into()));
            }
            Ok(got)
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

        async fn cuts(&self, peer: usize, _: u64, _: u32) -> Result<(Vec<Cut>, bool), PortError> {
            self.answer(peer)?;
            Ok((Vec::new(), true))
        }

        async fn hints_for(&self, _: usize, _: usize, _: u64) -> Result<u64, PortError> {
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
            rebuild_give_up: GIVE_UP,
            link: crate::dataserver::throttle::Throttle::new(None),
            scrub: crate::dataserver::scrub::Scrubber::new(1 << 30, None),
            catching_up: Default::default(),
            reserve: 0,
            admitted: Default::default(),
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

    /// A rebuild onto a disk too small for the server's share stops short of the reserve that
    /// deletes need (and stays incomplete, retrying), as clients' puts do: it used to fill the
    /// disk whole.
    #[tokio::test]
    async fn a_rebuild_onto_a_disk_too_small_keeps_the_reserve_for_deletes() {
        let base = tempfile::tempdir().expect("temp dir");
        let Some(_disk) = crate::shared::tmpfs::Tmpfs::mount(base.path(), 12 << 20) else { return };
        // Blocks of 512 KiB: a fetched batch of 64 (32 MiB) is more than the disk can take whole.
        let mut peers = FakePeers::new(5, 8);
        for held in &mut peers.held {
            for b in held.values_mut() {
                *b = Block::new(b.key, 1, R, vec![b.key.index as u8; 512 << 10]);
            }
        }
        let dir = base.path().join("ds");
        std::fs::create_dir(&dir).expect("store dir");
        let node = DataNode {
            store: Arc::new(BlockStore::open(&dir).expect("store").0),
            index: 0,
            ring: peers.ring.clone(),
            data_dir: dir,
            rebuild: RefCell::default(),
            rebuild_give_up: GIVE_UP,
            link: crate::dataserver::throttle::Throttle::new(None),
            scrub: crate::dataserver::scrub::Scrubber::new(1 << 30, None),
            catching_up: Default::default(),
            reserve: 2 << 20,
            admitted: Default::default(),
        };
        node.keep_reserve();
        let share: usize =
            (0..N).flat_map(|p| peers.held[p].keys()).filter(|k| holds(0, k.file_id, k.index, R.into(), N)).count();
        assert!(share * (512 << 10) / 3 > 12 << 20, "the share must not fit");
        let r = tokio::time::timeout(Duration::from_secs(5), rebuild(&node, &peers)).await;
        assert!(r.is_err(), "the rebuild cannot finish on this disk");
        assert!(
            node.store.tail() >= node.reserve / 2,
            "the rebuild took the reserve: {} KiB left",
            node.store.tail() >> 10
        );
        assert!(node.rebuild.borrow().copied > 0, "it copied what fits");
        let cut = crate::dataserver::blockstore::Cut { file_id: 1, from_block: 0, version: 2 };
        node.store.truncate(&[cut], None).expect("a delete on the full disk");
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

    /// A peer refuses a get whose reply would carry more than it may (64 blocks of over 768 KiB,
    /// with its 48 MiB limit): the rebuild asks for fewer at a time. It asked for the same 64
    /// again and again, and never finished.
    #[tokio::test]
    async fn blocks_too_large_to_fetch_64_at_a_time_are_fetched_fewer_at_a_time() {
        let mut peers = FakePeers::new(3, 40);
        for held in &mut peers.held {
            for b in held.values_mut() {
                *b = Block::new(b.key, 1, R, vec![b.key.index as u8; 4096]);
            }
        }
        peers.max_reply = 5 * 4096;
        let (dir, node) = rebuild_finishing(&peers).await;
        for p in 1..N {
            let (have, want) = stored(&node, &peers, p);
            assert_eq!(have, want, "blocks shared with peer {p}");
        }
        assert!(is_complete(&dir, node));
    }

    /// Rebuilds server 0 from `peers` for five give-up times of (paused) time, which must not be
    /// enough.
    async fn rebuild_never_finishing(peers: &FakePeers) -> (tempfile::TempDir, DataNode) {
        let (dir, node) = node(0, peers);
        let r = tokio::time::timeout(GIVE_UP * 5, rebuild(&node, peers)).await;
        assert!(r.is_err(), "a rebuild must not finish while a peer may hold the only copy");
        (dir, node)
    }

    /// Runs a rebuild of server 0 until it has finished without `skipped` (it goes on trying that
    /// peer in the background, so it never returns while the peer fails). Returns the time taken.
    async fn finish_without(node: &DataNode, peers: &FakePeers, skipped: usize) -> Duration {
        let start = tokio::time::Instant::now();
        let finished = async {
            while node.rebuild.borrow().active || !node.rebuild.borrow().skipped.contains(&skipped) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = rebuild(node, peers) => panic!("the rebuild stops trying a skipped peer only once it answers"),
            r = tokio::time::timeout(GIVE_UP * 5, finished) => assert!(r.is_ok(), "the rebuild did not finish"),
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_is_skipped_after_a_while_and_its_blocks_come_from_the_others() {
        let mut peers = FakePeers::new(5, 40);
        peers.down = vec![1];
        let (dir, node) = node(0, &peers);
        let took = finish_without(&node, &peers, 1).await;
        assert!(took >= GIVE_UP, "skipped before the give-up time: {took:?}");
        for p in 1..N {
            let (have, want) = stored(&node, &peers, p);
            assert_eq!(have, want, "blocks shared with peer {p}");
        }
        let progress = node.rebuild.borrow().clone();
        assert_eq!((progress.peers_left, progress.nowhere), (0, 0), "{progress:?}");
        assert!(is_complete(&dir, node));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_with_another_ring_is_never_copied_from_and_the_others_cover_it() {
        let mut peers = FakePeers::new(3, 20);
        peers.other_ring = vec![3];
        let (dir, node) = node(0, &peers);
        finish_without(&node, &peers, 3).await;
        let (have, want) = stored(&node, &peers, 3);
        assert_eq!(have, want, "blocks shared with peer 3, from its co-holders");
        assert!(is_complete(&dir, node));
    }

    /// R = 2: a rebuild resumed after a restart holds what it copied before (here every block
    /// it shares with server 3), and copies nothing more from the peers that list to the end; its
    /// other neighbour, 1, is down, and the blocks of 2 replicas on 1 and this server have no
    /// other holder, so the rebuild must wait for 1. It took the fewest replicas from the blocks
    /// it copied, none this time, and so assumed 3, by which server 2 covered them: it finished
    /// without them.
    #[tokio::test(start_paused = true)]
    async fn a_resumed_rebuild_counts_the_replicas_of_the_blocks_it_holds_already() {
        let mut peers = FakePeers::with_replicas(5, 40, 2);
        let (dir, node) = node(0, &peers);
        let copied: Vec<Block> =
            peers.held[3].values().filter(|b| holds(0, b.key.file_id, b.key.index, 2, N)).cloned().collect();
        assert!(!copied.is_empty());
        node.store.put(&copied, true, None).unwrap();
        peers.down = vec![1];
        let r = tokio::time::timeout(GIVE_UP * 5, rebuild(&node, &peers)).await;
        assert!(r.is_err(), "finished without the blocks only the down neighbour holds");
        assert!(!is_complete(&dir, node));
    }

    /// Two servers wiped at once, 0 and 1, and server 2 silent: blocks on {0, 1, 2} are on 2
    /// alone now. Server 1 lists to the end, but what it lists is what it rebuilt so far: it
    /// must not stand in for 2. It did, and server 0 finished without those blocks.
    #[tokio::test(start_paused = true)]
    async fn a_peer_rebuilding_its_own_store_does_not_stand_in_for_a_silent_one() {
        let mut peers = FakePeers::new(5, 40);
        peers.held[1].clear();
        *peers.rebuilding.borrow_mut() = vec![1];
        peers.down = vec![2];
        let (dir, node) = rebuild_never_finishing(&peers).await;
        assert!(!is_complete(&dir, node));
    }

    /// The same, but server 1's own rebuild ends meanwhile: server 0 lists it again, and then
    /// finishes without the silent server 2, which server 1 now covers. It waited for 2 for good.
    #[tokio::test(start_paused = true)]
    async fn a_peer_whose_own_rebuild_ended_is_listed_again_and_stands_in() {
        let mut peers = FakePeers::new(5, 40);
        *peers.rebuilding.borrow_mut() = vec![1];
        peers.down = vec![2];
        let (dir, node) = node(0, &peers);
        let ends = async {
            tokio::time::sleep(GIVE_UP * 3).await;
            assert!(node.rebuild.borrow().active, "finished while server 1 was still rebuilding");
            peers.rebuilding.borrow_mut().clear();
        };
        let (took, ()) = tokio::join!(finish_without(&node, &peers, 2), ends);
        assert!(took > GIVE_UP * 3, "finished before server 1's rebuild ended");
        let (have, want) = stored(&node, &peers, 1);
        assert_eq!(have, want, "the blocks shared with server 1");
        assert!(is_complete(&dir, node));
    }

    #[tokio::test(start_paused = true)]
    async fn two_neighbours_down_hold_blocks_nobody_else_has_so_the_rebuild_waits() {
        let mut peers = FakePeers::new(5, 40);
        peers.down = vec![1, 2];
        let (dir, node) = rebuild_never_finishing(&peers).await;
        let (have, want) = stored(&node, &peers, 3);
        assert_eq!(have, want, "blocks shared with the live peer 3");
        let progress = node.rebuild.borrow().clone();
        assert!(progress.active);
        assert_eq!(progress.peers_left, 2, "{progress:?}");
        assert!(peers.calls.borrow().iter().filter(|&&p| p == 1).count() > 3, "the down peer is asked again");
        assert!(!is_complete(&dir, node));
    }

    #[test]
    fn a_peer_may_be_skipped_only_where_a_listed_holder_covers_it() {
        // Ring of 5, server 0 rebuilding, 3 replicas: windows {3,4,0}, {4,0,1}, {0,1,2}.
        let done = |d: &[usize]| (0..5).map(|i| i == 0 || d.contains(&i)).collect::<Vec<bool>>();
        assert!(may_skip(0, 1, 5, 3, &done(&[2, 4])));
        assert!(!may_skip(0, 1, 5, 3, &done(&[4])), "{{0,1,2}} has no listed third member");
        assert!(!may_skip(0, 1, 5, 2, &done(&[2, 3, 4])), "with 2 replicas only 0 and 1 hold {{0,1}}");
        assert!(may_skip(0, 3, 5, 2, &done(&[])), "3 shares nothing with 0 at 2 replicas");
        assert!(may_skip(0, 2, 5, 3, &done(&[1])));
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
        let progress = node.rebuild.borrow().clone();
        let ours: Vec<BlockKey> = (1..=2)
            .map(|f| BlockKey { file_id: f, index: 3 })
            .filter(|k| holds(0, k.file_id, 3, R.into(), N))
            .collect();
        assert!(!ours.is_empty());
        assert_eq!(progress.nowhere, ours.len() as u64, "block 3 is corrupt on every holder: {progress:?}");
        assert_eq!(progress.nowhere_keys, ours);
    }

    /// A block corrupt on every holder is reported lost even in a file truncated before it was
    /// written again (an O_TRUNC open leaves a tombstone older than the blocks): any cut hid it.
    #[tokio::test]
    async fn a_lost_block_of_a_file_truncated_before_it_was_written_again_is_reported() {
        let mut peers = FakePeers::new(2, 10);
        for h in &mut peers.held {
            for b in h.values_mut() {
                *b = Block::new(b.key, 10, R, b.data.clone());
                if b.key.index == 3 {
                    b.data[0] ^= 1;
                }
            }
        }
        let (_dir, node) = node(0, &peers);
        let cuts: Vec<Cut> = (1..=2).map(|f| Cut { file_id: f, from_block: 0, version: 5 }).collect();
        node.store.truncate(&cuts, None).expect("the truncates before the writes");
        let r = tokio::time::timeout(Duration::from_secs(20), rebuild(&node, &peers)).await;
        assert!(r.is_ok(), "the rebuild did not finish");
        let ours = (1..=2).filter(|&f| holds(0, f, 3, R.into(), N)).count() as u64;
        assert!(ours > 0);
        let progress = node.rebuild.borrow().clone();
        assert_eq!(progress.nowhere, ours, "block 3 is corrupt on every holder: {progress:?}");
    }

    /// A wiped server rebuilt while a cut had not reached every holder: one peer still holds
    /// blocks the others cut (its hint waits on them). The rebuilt store must not keep those
    /// blocks, whichever peer it copies from first. Server 0 is rebuilt; peers are asked nearest
    /// first (1 and 3, then 2), so file 1's stale copies on peer 1 come before peer 3's cut, and
    /// file 2's cut on peer 1 comes before the stale copies on peer 3.
    #[tokio::test]
    async fn a_cut_one_peer_missed_is_taken_from_the_others() {
        use crate::dataserver::testing::StorePeers;
        let peers = StorePeers::new(N);
        let (stale_on, cut_at) = ([(1, 1), (2, 3)], 50);
        for (file, stale) in stale_on {
            let blocks: Vec<Block> = (0..8)
                .map(|i| Block::new(BlockKey { file_id: file, index: i }, 10, R, format!("{file}/{i}").into_bytes()))
                .collect();
            for s in 1..N {
                let held: Vec<Block> =
                    blocks.iter().filter(|b| holds(s, file, b.key.index, R.into(), N)).cloned().collect();
                peers.store(s).put(&held, false, None).expect("put");
                if s != stale {
                    peers
                        .store(s)
                        .truncate(&[Cut { file_id: file, from_block: 2, version: cut_at }], None)
                        .expect("cut");
                }
            }
        }
        let node = peers.node(0);
        let r = tokio::time::timeout(Duration::from_secs(20), rebuild(&node, &peers)).await;
        assert!(r.is_ok(), "the rebuild did not finish with every peer up");
        for (file, stale) in stale_on {
            let keys: Vec<BlockKey> = (0..8)
                .map(|i| BlockKey { file_id: file, index: i })
                .filter(|k| holds(0, file, k.index, R.into(), N))
                .collect();
            let got = node.store.get(&keys).expect("get");
            for (k, b) in keys.iter().zip(got) {
                assert_eq!(
                    b.is_some(),
                    k.index < 2,
                    "file {file} block {}: the rebuilt store has {:?} (peer {stale} missed the cut from block 2)",
                    k.index,
                    b.map(|b| b.version)
                );
            }
            assert_eq!(node.store.cuts_of(file).expect("cuts"), vec![(2, cut_at)], "file {file}'s tombstone");
        }
    }
}
