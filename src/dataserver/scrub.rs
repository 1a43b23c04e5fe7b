//! The scrubber: a pass walks this server's blocks at a bounded rate, verifies each MD5 and
//! replaces a corrupt copy with a good one from another holder; then, for each peer, it compares
//! the versions (and MD5s) both hold by key ranges (a digest per range of about a thousand shared
//! blocks, so equal ranges cost one small call) and, inside a range that differs, sends the peer
//! the newer copies it has and takes the newer ones the peer has. Corruption and stale replicas
//! that no read touches are mended this way; a copy removed by a recorded cut is not brought back
//! (the peer is sent the cut instead). Blocks written in the last few seconds are left alone:
//! their writer's requests may still be on their way.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::blockstore::Cut;
use super::handoff::by_bytes;
use super::rebuild::{fetch, PeerPort};
use super::DataNode;
use crate::shared::block::{Block, BlockKey, Checksum};
use crate::shared::placement::{holds, replica_servers};
use crate::shared::{blocking, now_ns};

/// Default rate: bytes per second a pass may read.
pub const DEFAULT_RATE: u64 = 4 << 20;
/// Default time between the end of a pass and the start of the next.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(3600);
/// Blocks younger than this (by version, the writer's clock) are not compared.
pub const SETTLE: Duration = Duration::from_secs(5);
/// Shared blocks per compared range.
const RANGE: usize = 1024;
/// Blocks verified per read.
const VERIFY_PAGE: usize = 256;
/// How long one get of the blocks a peer holds newer may take.
const FETCH_LIMIT: Duration = Duration::from_secs(120);
/// Tombstones older than this are forgotten (see `BlockStore::prune_cuts`).
const KEEP_CUTS: Duration = Duration::from_secs(24 * 3600);

/// How the current or last pass went (`dfsctl scrub`, `dfsctl status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubStatus {
    pub running: bool,
    pub passes: u64,
    pub started_at: i64,
    pub finished_at: i64,
    pub checked: u64,
    pub total: u64,
    pub corrupt: u64,
    pub repaired: u64,
    pub pushed: u64,
    pub ranges_differed: u64,
    pub rate: u64,
    pub unreachable: u32,
}

/// A server's scrubber: its schedule, its rate and its progress.
pub struct Scrubber {
    status: RefCell<ScrubStatus>,
    wake: tokio::sync::Notify,
    rate: u64,
    every: Option<Duration>,
}

impl Scrubber {
    /// Passes read at most `rate` bytes per second, and start `every` after the last one ended
    /// (`None`: only when asked).
    pub fn new(rate: u64, every: Option<Duration>) -> Scrubber {
        Scrubber {
            status: RefCell::new(ScrubStatus { rate, ..ScrubStatus::default() }),
            wake: tokio::sync::Notify::new(),
            rate: rate.max(1),
            every,
        }
    }

    pub fn status(&self) -> ScrubStatus {
        self.status.borrow().clone()
    }

    /// Starts a pass now, unless one runs.
    pub fn start_now(&self) {
        if !self.status.borrow().running {
            self.wake.notify_one();
        }
    }
}

/// Runs passes for as long as the server runs.
pub async fn run(node: &DataNode, peers: &impl PeerPort) {
    loop {
        match node.scrub.every {
            Some(every) => {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = node.scrub.wake.notified() => {}
                }
            }
            None => node.scrub.wake.notified().await,
        }
        let s = pass(node, peers, SETTLE).await;
        info!(
            server = node.index,
            checked = s.checked,
            corrupt = s.corrupt,
            repaired = s.repaired,
            pushed = s.pushed,
            ranges_differed = s.ranges_differed,
            unreachable = s.unreachable,
            "scrub pass done"
        );
    }
}

/// Keeps a pass at its rate.
struct Pace {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Pace {
    async fn add(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

fn now_secs() -> i64 {
    now_ns() / 1_000_000_000
}

/// One pass. Returns its status (also kept for `status`).
pub async fn pass(node: &DataNode, peers: &impl PeerPort, settle: Duration) -> ScrubStatus {
    let total = node.store.stats().map(|s| s.0).unwrap_or(0);
    let passes = node.scrub.status.borrow().passes;
    *node.scrub.status.borrow_mut() = ScrubStatus {
        running: true,
        passes,
        started_at: now_secs(),
        total,
        rate: node.scrub.rate,
        ..ScrubStatus::default()
    };
    let mut pace = Pace { start: Instant::now(), bytes: 0, rate: node.scrub.rate };
    if let Err(e) = verify(node, peers, &mut pace).await {
        warn!(server = node.index, "scrub: reading the store: {e}");
    }
    if node.rebuild.borrow().active {
        info!(server = node.index, "scrub: not comparing with peers while rebuilding");
    } else {
        for peer in (0..node.ring.len()).filter(|&p| p != node.index) {
            if let Err(e) = compare(node, peers, peer, settle, &mut pace).await {
                warn!(server = node.index, peer, "scrub: comparing with dataserver {peer}: {e}");
                node.scrub.status.borrow_mut().unreachable += 1;
            }
        }
    }
    let before = (now_ns().max(0) as u64).saturating_sub(KEEP_CUTS.as_nanos() as u64);
    let store = node.store.clone();
    if let Ok(Err(e)) = blocking(move || store.prune_cuts(before)).await {
        warn!(server = node.index, "scrub: forgetting old cuts: {e}");
    }
    let mut s = node.scrub.status.borrow_mut();
    s.running = false;
    s.passes += 1;
    s.finished_at = now_secs();
    s.clone()
}

fn local<T>(r: Result<Result<T, impl std::fmt::Display>, impl std::fmt::Display>) -> Result<T, String> {
    r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// Verifies every block held here; replaces corrupt ones.
async fn verify(node: &DataNode, peers: &impl PeerPort, pace: &mut Pace) -> Result<(), String> {
    let mut after = BlockKey { file_id: 0, index: 0 };
    loop {
        let store = node.store.clone();
        let (keys, done) = local(blocking(move || store.list(after, VERIFY_PAGE, |_, _| true)).await)?;
        let store = node.store.clone();
        let ks: Vec<BlockKey> = keys.iter().map(|(k, ..)| *k).collect();
        let sized = local(blocking(move || store.versions_sized(&ks)).await)?;
        let sized: Vec<(BlockKey, usize)> = keys.iter().zip(sized).map(|((k, ..), (_, size))| (*k, size)).collect();
        // Read about SEND_BYTES at a time: a page of 256 blocks of 16 MiB would be 4 GiB.
        for run in by_bytes(&sized, |(_, size)| *size) {
            let store = node.store.clone();
            let ks: Vec<BlockKey> = run.iter().map(|(k, _)| *k).collect();
            let blocks = local(blocking(move || store.get_verified(&ks)).await)?;
            check(node, peers, blocks, pace).await?;
        }
        match keys.last() {
            Some((k, ..)) if !done => after = *k,
            _ => return Ok(()),
        }
    }
}

/// Counts the blocks `verify` read, and mends those that do not verify.
async fn check(
    node: &DataNode,
    peers: &impl PeerPort,
    blocks: Vec<Option<(Block, bool)>>,
    pace: &mut Pace,
) -> Result<(), String> {
    let mut bytes = 0;
    for (b, ok) in blocks.into_iter().flatten() {
        bytes += b.data.len();
        node.scrub.status.borrow_mut().checked += 1;
        if !ok {
            warn!(server = node.index, file = b.key.file_id, block = b.key.index, "scrub: a corrupt copy");
            node.scrub.status.borrow_mut().corrupt += 1;
            // Data that still matches its MD5 (its page checksums alone damaged) is stored
            // again as it is, its page checksums computed afresh; a peer's copy may be older.
            let key = b.key;
            let mended =
                if b.verifies() { node.put_copies(vec![b]).await.map(|n| n > 0) } else { mend(node, peers, &b).await };
            // A copy that could not be stored again (no room on the disk, say) is left for the
            // next pass; the rest of the store is still checked. Ended here, every pass ended at
            // this block for as long as the disk stayed short.
            match mended {
                Ok(true) => node.scrub.status.borrow_mut().repaired += 1,
                Ok(false) => {}
                Err(e) => warn!(server = node.index, file = key.file_id, block = key.index, "scrub: not mended: {e}"),
            }
        }
    }
    pace.add(bytes).await;
    Ok(())
}

/// Replaces the corrupt copy `bad` with the newest good one another holder has. Returns whether
/// it was replaced.
async fn mend(node: &DataNode, peers: &impl PeerPort, bad: &Block) -> Result<bool, String> {
    let n = node.ring.len();
    let mut best: Option<Block> = None;
    for peer in replica_servers(bad.key.file_id, bad.key.index, usize::from(bad.replicas.max(1)), n) {
        if peer == node.index {
            continue;
        }
        if let Ok(mut got) = peers.get(peer, &[bad.key]).await {
            if let Some(b) = got.pop().flatten().filter(|b| b.verifies() && b.key == bad.key) {
                if best.as_ref().is_none_or(|x| x.version < b.version) {
                    best = Some(b);
                }
            }
        }
    }
    let Some(good) = best else {
        warn!(server = node.index, file = bad.key.file_id, block = bad.key.index, "scrub: no good copy reachable");
        return Ok(false);
    };
    Ok(node.put_copies(vec![good]).await? > 0)
}

/// The key just before `k` (for listings that start after a key).
fn before(k: BlockKey) -> BlockKey {
    match (k.file_id, k.index) {
        (0, 0) => k,
        (f, 0) => BlockKey { file_id: f - 1, index: u64::MAX },
        (f, i) => BlockKey { file_id: f, index: i - 1 },
    }
}

/// Compares the blocks this server shares with `peer`, range by range, and mends the ranges that
/// differ.
async fn compare(
    node: &DataNode,
    peers: &impl PeerPort,
    peer: usize,
    settle: Duration,
    pace: &mut Pace,
) -> Result<(), String> {
    let (me, n) = (node.index, node.ring.len());
    let mut from = BlockKey { file_id: 0, index: 0 };
    loop {
        let store = node.store.clone();
        let shared = move |k: BlockKey, r: u8| holds(peer, k.file_id, k.index, usize::from(r), n);
        let (keys, _) = local(blocking(move || store.list_from(from, None, RANGE + 1, shared)).await)?;
        let to = keys.get(RANGE).map(|(k, ..)| *k);
        let store = node.store.clone();
        let ours = local(blocking(move || store.digest(from, to, shared)).await)?;
        let theirs = peers.digest(peer, from, to, me).await.map_err(|e| e.to_string())?;
        if ours != theirs {
            node.scrub.status.borrow_mut().ranges_differed += 1;
            reconcile(node, peers, peer, from, to, settle, pace).await?;
        }
        match to {
            Some(t) => from = t,
            None => return Ok(()),
        }
    }
}

/// A write of a block as listings give it: its version and MD5, ordered as a put orders them.
type Write = (u64, Checksum);

/// Within `[from, to)`: sends `peer` the blocks held newer here, takes the ones it holds newer,
/// and sends it the cuts that removed blocks it still has. Of two writes of one version, the one
/// with the larger MD5 counts as newer, as in a put.
async fn reconcile(
    node: &DataNode,
    peers: &impl PeerPort,
    peer: usize,
    from: BlockKey,
    to: Option<BlockKey>,
    settle: Duration,
    pace: &mut Pace,
) -> Result<(), String> {
    let (me, n) = (node.index, node.ring.len());
    let inside = |k: &BlockKey| *k >= from && to.is_none_or(|t| *k < t);
    // Of each key: our (version, MD5), and the peer's (version, MD5 if it sent them).
    let mut held: BTreeMap<BlockKey, (Write, (u64, Option<Checksum>))> = BTreeMap::new();
    let store = node.store.clone();
    let shared = move |k: BlockKey, r: u8| holds(peer, k.file_id, k.index, usize::from(r), n);
    // Only the range: a differing range lists its own keys, not the rest of the store.
    let ours = local(blocking(move || store.list_from(from, to, usize::MAX, shared)).await)?.0;
    for (k, v, md5) in ours {
        held.entry(k).or_default().0 = (v, md5);
    }
    let mut after = before(from);
    loop {
        let page = peers.list_for(peer, me, after, RANGE as u32).await.map_err(|e| e.to_string())?;
        let mut past = false;
        for (i, (k, v)) in page.keys.iter().enumerate() {
            if inside(k) {
                held.entry(*k).or_default().1 = (*v, page.md5s.get(i).copied());
            } else if *k >= from {
                past = true;
            }
        }
        match page.keys.last() {
            Some((k, _)) if !page.done && !past => after = *k,
            _ => break,
        }
    }
    let young = (now_ns().max(0) as u64).saturating_sub(settle.as_nanos() as u64);
    let (mut give, mut take) = (Vec::new(), Vec::new());
    for (k, (ours, (version, md5))) in held {
        if ours.0.max(version) > young {
            continue;
        }
        // Ordered as a put orders two writes: by version, then by MD5 (two writes of one
        // version). A peer that sends no MD5s (an older build) is compared by version alone.
        let theirs = (version, md5.unwrap_or(ours.1));
        if ours > theirs {
            give.push(k);
        } else if theirs > ours {
            take.push((k, version));
        }
    }
    // Sent about SEND_BYTES at a time by their stored sizes, and fetched as the rebuild fetches
    // (fewer at a time while the peer refuses a reply too large): 64 blocks of up to 16 MiB
    // are more than a message may carry.
    let store = node.store.clone();
    let sized = {
        let give = give.clone();
        local(blocking(move || store.versions_sized(&give)).await)?
    };
    let give: Vec<(BlockKey, usize)> = give.into_iter().zip(sized).map(|(k, (_, size))| (k, size)).collect();
    for chunk in by_bytes(&give, |(_, size)| *size) {
        let store = node.store.clone();
        let keys: Vec<BlockKey> = chunk.iter().map(|(k, _)| *k).collect();
        let blocks: Vec<Block> =
            local(blocking(move || store.get(&keys)).await)?.into_iter().flatten().filter(Block::verifies).collect();
        pace.add(blocks.iter().map(|b| b.data.len()).sum()).await;
        if !blocks.is_empty() {
            peers.put(peer, &blocks).await.map_err(|e| e.to_string())?;
            node.scrub.status.borrow_mut().pushed += blocks.len() as u64;
        }
    }
    for chunk in take.chunks(64) {
        let keys: Vec<BlockKey> = chunk.iter().map(|(k, _)| *k).collect();
        let got: Vec<Block> = fetch(peers, peer, &keys, FETCH_LIMIT)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .flatten()
            .filter(|b| b.verifies() && holds(me, b.key.file_id, b.key.index, usize::from(b.replicas), n))
            .collect();
        pace.add(got.iter().map(|b| b.data.len()).sum()).await;
        let repaired = node.put_copies(got).await?;
        node.scrub.status.borrow_mut().repaired += repaired as u64;
        // What a cut here removed, by the version the peer listed: the peer missed that cut. A
        // copy of its that no longer verifies (not taken) goes too, or it stayed for good: its
        // own pass finds no good copy to mend it with.
        let store = node.store.clone();
        let cut = local(blocking(move || store.cut_versions(&keys)).await)?;
        let cuts: Vec<Cut> = chunk
            .iter()
            .zip(cut)
            .filter(|((_, v), c)| c > v)
            .map(|((k, _), c)| Cut { file_id: k.file_id, from_block: k.index, version: c })
            .collect();
        if !cuts.is_empty() {
            peers.truncate(peer, &cuts).await.map_err(|e| e.to_string())?;
            node.scrub.status.borrow_mut().pushed += cuts.len() as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::StorePeers;
    use super::*;

    const N: usize = 4;

    fn old() -> u64 {
        now_ns() as u64 - 60_000_000_000
    }

    fn write_everywhere(peers: &StorePeers, b: &Block) {
        for s in replica_servers(b.key.file_id, b.key.index, usize::from(b.replicas), N) {
            peers.store(s).put(std::slice::from_ref(b), false, None).unwrap();
        }
    }

    #[tokio::test]
    async fn a_corrupt_block_nobody_reads_is_found_and_replaced_in_one_pass() {
        let peers = StorePeers::new(N);
        let v = old();
        for f in 2..30u64 {
            for i in 0..4 {
                write_everywhere(&peers, &Block::new(BlockKey { file_id: f, index: i }, v, 3, vec![f as u8; 100]));
            }
        }
        let s = replica_servers(7, 0, 3, N)[1];
        peers.store(s).corrupt(7).unwrap();
        let node = peers.node(s);
        let st = pass(&node, &peers, SETTLE).await;
        assert_eq!((st.corrupt, st.repaired, st.unreachable), (1, 1, 0), "{st:?}");
        assert!(peers.store(s).get(&[BlockKey { file_id: 7, index: 0 }]).unwrap()[0].as_ref().unwrap().verifies());
        assert_eq!(st.checked, st.total);
        assert_eq!(st.ranges_differed, 0, "every peer holds the same versions");
        let again = pass(&node, &peers, SETTLE).await;
        assert_eq!((again.corrupt, again.passes), (0, 2));
    }

    /// Corrupt copies that cannot be stored again, for lack of room, are counted and left; the
    /// pass checks the rest. It ended at the first, and so did every pass while the disk stayed
    /// short: nothing after that block was checked.
    #[tokio::test]
    async fn a_copy_not_mended_for_lack_of_room_leaves_the_pass_going() {
        let peers = StorePeers::new(N);
        let v = old();
        for f in 2..30u64 {
            for i in 0..4 {
                write_everywhere(&peers, &Block::new(BlockKey { file_id: f, index: i }, v, 3, vec![f as u8; 100]));
            }
        }
        let s = 1;
        let files: Vec<u64> = (2..30).filter(|&f| replica_servers(f, 0, 3, N).contains(&s)).take(2).collect();
        for &f in &files {
            peers.store(s).corrupt(f).unwrap();
        }
        let node = peers.node(s);
        // Puts admitted meanwhile hold all the room the disk has.
        node.admitted.set(u64::MAX / 2);
        let st = pass(&node, &peers, SETTLE).await;
        assert_eq!((st.checked, st.corrupt, st.repaired), (st.total, 2, 0), "{st:?}");
    }

    /// Large blocks a peer lacks, or holds older, go in gets and puts a message can carry: 64
    /// of them at once were more, and every pass failed on the same range.
    #[tokio::test]
    async fn large_blocks_are_mended_in_gets_and_puts_a_message_can_carry() {
        let peers = StorePeers::new(N);
        // Limits scaled down with the blocks (the service's: 48 and 64 MiB for 16 MiB blocks).
        peers.reply_limit.set(4 << 20);
        peers.put_limit.set(super::super::handoff::SEND_BYTES + (1 << 20));
        let v = old();
        let size = 256 << 10;
        let (me, peer) = (0, 1);
        let shared: Vec<BlockKey> = (2..200u64)
            .map(|f| BlockKey { file_id: f, index: 0 })
            .filter(|k| {
                let at = replica_servers(k.file_id, k.index, 3, N);
                at.contains(&me) && at.contains(&peer)
            })
            .take(80)
            .collect();
        assert_eq!(shared.len(), 80);
        for k in &shared {
            write_everywhere(&peers, &Block::new(*k, v, 3, vec![1; size]));
        }
        // The first 40: lost here. The other 40: newer here than on the peer.
        let (lost, newer) = shared.split_at(40);
        let cuts: Vec<Cut> = lost.iter().map(|k| Cut { file_id: k.file_id, from_block: 0, version: 0 }).collect();
        peers.store(me).truncate(&cuts, None).unwrap();
        let fresh: Vec<Block> = newer.iter().map(|k| Block::new(*k, v + 1, 3, vec![2; size])).collect();
        peers.store(me).put(&fresh, false, None).unwrap();
        let st = pass(&peers.node(me), &peers, SETTLE).await;
        assert_eq!(st.unreachable, 0, "{st:?}");
        let got = peers.store(me).get(lost).unwrap();
        assert!(got.iter().all(|b| b.as_ref().is_some_and(|b| b.version == v)), "lost blocks not taken back");
        let got = peers.store(peer).get(newer).unwrap();
        assert!(got.iter().all(|b| b.as_ref().is_some_and(|b| b.version == v + 1)), "newer blocks not given");
    }

    #[tokio::test]
    async fn damaged_page_checksums_are_computed_again_and_keep_the_newer_version() {
        let peers = StorePeers::new(N);
        let v = old();
        let key = BlockKey { file_id: 5, index: 0 };
        let page = crate::shared::block::PAGE;
        write_everywhere(&peers, &Block::new(key, v, 3, vec![1; 3 * page]));
        // Server `s` alone holds a newer version, whose page checksums are then damaged.
        let s = replica_servers(5, 0, 3, N)[0];
        peers.store(s).put(&[Block::new(key, v + 1, 3, vec![2; 3 * page])], false, None).unwrap();
        peers.store(s).damage_page_checksum(key, 2);
        let st = pass(&peers.node(s), &peers, SETTLE).await;
        assert_eq!((st.corrupt, st.repaired), (1, 1), "{st:?}");
        let (b, ok) = peers.store(s).get_verified(&[key]).unwrap().pop().flatten().unwrap();
        assert!(ok);
        assert_eq!((b.version, b.data), (v + 1, vec![2; 3 * page]));
    }

    #[tokio::test]
    async fn stale_and_missing_copies_converge_without_reads_and_cut_blocks_stay_cut() {
        let peers = StorePeers::new(N);
        let v = old();
        // 3000 blocks, so that the comparison spans several ranges.
        for f in 2..752u64 {
            for i in 0..4 {
                write_everywhere(&peers, &Block::new(BlockKey { file_id: f, index: i }, v, 3, vec![1; 10]));
            }
        }
        let me = 0;
        let holders_of = |f, i| replica_servers(f, i, 3, N);
        // A file rewritten while server `me` was down: the others hold a newer version.
        let (f, i) = (2..752u64)
            .flat_map(|f| (0..4).map(move |i| (f, i)))
            .find(|&(f, i)| holders_of(f, i).contains(&me))
            .unwrap();
        let newer = Block::new(BlockKey { file_id: f, index: i }, v + 1, 3, vec![2; 10]);
        for s in holders_of(f, i).into_iter().filter(|&s| s != me) {
            peers.store(s).put(std::slice::from_ref(&newer), false, None).unwrap();
        }
        // A block that only `me` lost.
        let lost = (2..752u64)
            .flat_map(|f| (0..4).map(move |i| (f, i)))
            .filter(|&(f, i)| holders_of(f, i).contains(&me))
            .nth(500)
            .unwrap();
        let lost = BlockKey { file_id: lost.0, index: lost.1 };
        peers.store(me).truncate(&[Cut { file_id: lost.file_id, from_block: lost.index, version: 0 }], None).unwrap();
        // A file deleted while one of its holders was down: that holder still has it, `me` has the cut.
        let (g, j) = (2..752u64)
            .flat_map(|f| (0..4).map(move |i| (f, i)))
            .find(|&(f, i)| f != lost.file_id && f != newer.key.file_id && holders_of(f, i).contains(&me))
            .unwrap();
        let stale_holder = holders_of(g, j).into_iter().find(|&s| s != me).unwrap();
        for s in (0..N).filter(|&s| s != stale_holder) {
            peers.store(s).truncate(&[Cut { file_id: g, from_block: 0, version: v + 5 }], None).unwrap();
        }
        let node = peers.node(me);
        let st = pass(&node, &peers, SETTLE).await;
        assert!(st.ranges_differed >= 2, "{st:?}");
        assert!(st.repaired >= 2, "the stale and the lost copy were taken: {st:?}");
        let got = peers.store(me).get(&[newer.key, lost]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().version, v + 1);
        assert!(got[1].is_some(), "the lost copy is back");
        assert!(
            peers.store(me).get(&[BlockKey { file_id: g, index: j }]).unwrap()[0].is_none(),
            "a cut block came back"
        );
        assert_eq!(
            peers.store(stale_holder).versions(&[BlockKey { file_id: g, index: j }]).unwrap(),
            vec![0],
            "the holder that missed the delete was sent the cut"
        );
    }

    /// A truncate cut short reached two holders of a block, and the third's copy rotted before a
    /// pass carried the cut to it: the passes cut it. It stayed for good: its holder found no good
    /// copy to mend it with, and its peers sent the cut only for copies of it that verified.
    #[tokio::test]
    async fn a_corrupt_copy_older_than_a_peers_cut_is_cut() {
        let peers = StorePeers::new(N);
        let v = old();
        let key = BlockKey { file_id: 9, index: 0 };
        write_everywhere(&peers, &Block::new(key, v, 3, vec![1; 100]));
        let h = replica_servers(9, 0, 3, N);
        for &s in &h[1..] {
            peers.store(s).truncate(&[Cut { file_id: 9, from_block: 0, version: v + 5 }], None).unwrap();
        }
        peers.store(h[0]).corrupt(9).unwrap();
        assert!(!peers.store(h[0]).get_verified(&[key]).unwrap()[0].as_ref().unwrap().1, "damaged");
        for s in 0..N {
            pass(&peers.node(s), &peers, SETTLE).await;
        }
        assert_eq!(peers.store(h[0]).versions(&[key]).unwrap(), vec![0], "the corrupt copy stayed");
    }

    #[tokio::test]
    async fn young_blocks_are_left_to_their_writer_and_a_down_peer_is_counted() {
        let peers = StorePeers::new(N);
        let me = 1;
        let f = (2..100u64).find(|&f| replica_servers(f, 0, 3, N)[0] == me).unwrap();
        let fresh = Block::new(BlockKey { file_id: f, index: 0 }, now_ns() as u64, 3, b"fresh".to_vec());
        peers.store(me).put(std::slice::from_ref(&fresh), false, None).unwrap();
        let down = (me + 3) % N;
        peers.set_up(down, false);
        let node = peers.node(me);
        let st = pass(&node, &peers, Duration::from_secs(3600)).await;
        assert_eq!(st.pushed, 0, "a block written just now was copied: {st:?}");
        assert_eq!(st.unreachable, 1);
        let st = pass(&node, &peers, Duration::ZERO).await;
        assert_eq!(st.pushed, 2, "{st:?}");
    }

    #[tokio::test]
    async fn replicas_that_each_missed_one_of_two_writes_of_one_version_converge_on_one() {
        // Two mounts wrote one block in the same nanosecond (one version, two contents), each with
        // a write quorum below R: one holder got only the first write, another only the second.
        let peers = StorePeers::new(N);
        let v = old();
        let key = BlockKey { file_id: 9, index: 0 };
        let holders = replica_servers(9, 0, 3, N);
        let (a, b) = (Block::new(key, v, 3, b"first".to_vec()), Block::new(key, v, 3, b"second".to_vec()));
        let kept = if (a.version, a.md5) > (b.version, b.md5) { a.clone() } else { b.clone() };
        peers.store(holders[0]).put(std::slice::from_ref(&a), false, None).unwrap();
        peers.store(holders[1]).put(std::slice::from_ref(&b), false, None).unwrap();
        peers.store(holders[2]).put(std::slice::from_ref(&a), false, None).unwrap();
        peers.store(holders[2]).put(std::slice::from_ref(&b), false, None).unwrap();
        for &s in &holders {
            pass(&peers.node(s), &peers, SETTLE).await;
        }
        for &s in &holders {
            let got = peers.store(s).get(&[key]).unwrap().pop().flatten().unwrap();
            assert_eq!(got.data, kept.data, "server {s} kept the other write");
        }
    }
}
