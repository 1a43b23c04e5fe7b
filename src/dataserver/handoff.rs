//! Hinted hand-over. A client writing with a write quorum below the replica count returns once W
//! replicas hold a block; each server that stored it noted, in the same commit, the block's other
//! holders (and for a cut, every other server). Every second this server asks each noted peer
//! which versions it holds, sends it the blocks it lacks or holds older, sends it the cuts, and
//! forgets those hints. A peer that is down keeps its hints until it is back: this is also how a
//! restarted server catches up without a rebuild.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use tracing::{debug, info, warn};

use super::blockstore::{Cut, Hint};
use super::rebuild::PeerPort;
use super::DataNode;
use crate::shared::block::{Block, BlockKey};
use crate::shared::{blocking, now_ns};

/// How often the hints are looked at.
pub const EVERY: Duration = Duration::from_secs(1);
/// Hints read per round.
const BATCH: usize = 4096;
/// Block bytes sent to a peer per call.
pub(super) const SEND_BYTES: usize = 4 << 20;

/// `items` cut into runs of about [`SEND_BYTES`] by their `size`: each run holds the items that
/// start within it, at least one.
pub(super) fn by_bytes<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let before = rest.iter().scan(0, |bytes: &mut usize, t| Some(std::mem::replace(bytes, *bytes + size(t))));
        let n = before.take_while(|&b| b < SEND_BYTES).count();
        let (run, after) = rest.split_at(n.max(1));
        runs.push(run);
        rest = after;
    }
    runs
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Blocks sent to peers that lacked them or held them older.
    pub sent: u64,
    /// Cuts sent.
    pub cuts: u64,
    /// Hints forgotten (handed over, or found already held).
    pub settled: u64,
    /// Peers that did not answer (their hints stay).
    pub unreachable: u64,
}

/// Hands hints over every [`EVERY`], leaving hints younger than `settle` (by their version, the
/// writer's clock) to the writer's requests that may still be on their way.
pub async fn run(node: &DataNode, peers: &impl PeerPort, settle: Duration) {
    let mut waiting_for: Option<u64> = None;
    loop {
        tokio::time::sleep(EVERY).await;
        match round(node, peers, settle).await {
            Ok(r) => {
                if r.sent + r.cuts > 0 {
                    info!(server = node.index, sent = r.sent, cuts = r.cuts, "handed over what peers lacked");
                }
                if r.unreachable > 0 && waiting_for != Some(r.unreachable) {
                    debug!(server = node.index, peers = r.unreachable, "hints wait for peers that are down");
                }
                waiting_for = Some(r.unreachable);
            }
            Err(e) => warn!(server = node.index, "hand-over: {e}"),
        }
    }
}

/// How far ahead of a restarted server's clock a writing client's clock may be for catch-up to
/// count what the server missed just before it started (writes since then, hinted for it while
/// it stored them too, are settled within a round or two).
const CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// Longest a restarted server waits for its peers' hints before it counts as caught up anyway.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// After a start: until no reachable peer keeps hints for this server of writes from before it
/// started, its answers may be older than what was acknowledged while it was down, and it says so
/// (readers do not count them toward a read quorum). Hints of later writes do not count: a peer
/// notes one for every other holder of each write it stores, this server included while it
/// stores the same write, so under a steady stream of writes with W < R some are always there.
/// Peers hand their hints over on their own; this only watches for the end. A peer that does not
/// answer is not waited for: what it could hand over, a write quorum of at least two put on
/// another holder too, which hints for us as well.
pub async fn catch_up(node: &DataNode, peers: &impl PeerPort) {
    let started = std::time::Instant::now();
    // Versions are the writing clients' clocks: a write missed just before the start, by a
    // client whose clock is ahead of this server's, still counts.
    let before = (now_ns().max(1) as u64).saturating_add(CLOCK_MARGIN.as_nanos() as u64);
    let mut told = false;
    loop {
        // All peers at once, as the hand-over asks them: a slow one holds up no other.
        let asked = (0..node.ring.len()).filter(|&p| p != node.index).map(|p| peers.hints_for(p, node.index, before));
        let pending: u64 = futures::future::join_all(asked).await.into_iter().map(|n| n.unwrap_or(0)).sum();
        if pending == 0 {
            break;
        }
        if !told {
            info!(server = node.index, hints = pending, "catching up: peers hold what this server missed");
            told = true;
        }
        if started.elapsed() > CATCH_UP_LIMIT {
            warn!(server = node.index, hints = pending, "still not caught up after {CATCH_UP_LIMIT:?}; serving as is");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.catching_up.set(false);
    if told {
        info!(server = node.index, "caught up");
    }
}

/// One pass over (at most [`BATCH`] per peer of) the hints. Read peer by peer: the hints of a
/// peer that is down (and may be kept by the thousand) must not fill the batch of every round
/// and starve the others; and handed to every peer at once.
pub async fn round(node: &DataNode, peers: &impl PeerPort, settle: Duration) -> Result<Round, String> {
    let (store, me, n) = (node.store.clone(), node.index, node.ring.len());
    let per_peer = move || (0..n).filter(|&t| t != me).map(|t| store.hints_of(t, BATCH)).collect::<Result<Vec<_>, _>>();
    let hints = blocking(per_peer).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?.concat();
    let ripe = (now_ns().max(0) as u64).saturating_sub(settle.as_nanos() as u64);
    let mut by_peer: BTreeMap<usize, Vec<Hint>> = BTreeMap::new();
    for (t, h) in hints {
        if h.version() <= ripe && t < node.ring.len() && t != node.index {
            by_peer.entry(t).or_default().push(h);
        }
    }
    let mut round = Round::default();
    // Every peer at once: one that does not answer (stopped, or cut off until a call times out)
    // must not hold up the hand-over to the others.
    let mut all: FuturesUnordered<_> = by_peer
        .into_iter()
        .map(|(peer, hints)| async move {
            let r = hand_to(node, peers, peer, &hints).await;
            (peer, hints, r)
        })
        .collect();
    while let Some((peer, hints, r)) = all.next().await {
        match r {
            Ok((sent, cuts)) => {
                round.sent += sent;
                round.cuts += cuts;
                round.settled += hints.len() as u64;
                let done: Vec<(usize, Hint)> = hints.into_iter().map(|h| (peer, h)).collect();
                let store = node.store.clone();
                blocking(move || store.forget_hints(&done))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
            Err(e) => {
                debug!(server = node.index, peer, "hand-over to dataserver {peer} waits: {e}");
                round.unreachable += 1;
            }
        }
    }
    Ok(round)
}

/// Gives `peer` what `hints` name and it lacks. Returns (blocks sent, cuts sent).
async fn hand_to(
    node: &DataNode,
    peers: &impl PeerPort,
    peer: usize,
    hints: &[Hint],
) -> Result<(u64, u64), crate::shared::PortError> {
    let cuts: Vec<Cut> = hints.iter().filter_map(|h| if let Hint::Cut(c) = h { Some(*c) } else { None }).collect();
    // Cuts first: a block sent after them that they removed would be refused anyway.
    if !cuts.is_empty() {
        peers.truncate(peer, &cuts).await?;
    }
    let keys: Vec<BlockKey> =
        hints.iter().filter_map(|h| if let Hint::Block { key, .. } = h { Some(*key) } else { None }).collect();
    if keys.is_empty() {
        return Ok((0, cuts.len() as u64));
    }
    let theirs = peers.versions(peer, &keys).await?;
    let local = |e: String| crate::shared::PortError::Unreachable(e);
    let store = node.store.clone();
    let ours = {
        let keys = keys.clone();
        blocking(move || store.versions_sized(&keys))
            .await
            .map_err(|e| local(e.to_string()))?
            .map_err(|e| local(e.to_string()))?
    };
    // Only the blocks held newer here are read, about [`SEND_BYTES`] at a time (by their stored
    // sizes): a round's hints may name thousands of blocks of up to 16 MiB each, for every peer
    // at once.
    let newer: Vec<(BlockKey, u64, usize)> = keys
        .into_iter()
        .zip(ours.into_iter().zip(theirs))
        .filter(|(_, ((o, _), t))| o > t)
        .map(|(k, ((_, size), t))| (k, t, size))
        .collect();
    let mut sent = 0;
    for chunk in by_bytes(&newer, |(_, _, size)| *size) {
        let store = node.store.clone();
        let wanted: Vec<BlockKey> = chunk.iter().map(|(k, _, _)| *k).collect();
        let read = blocking(move || store.get(&wanted))
            .await
            .map_err(|e| local(e.to_string()))?
            .map_err(|e| local(e.to_string()))?;
        // Verified (a corrupt copy here is the scrubber's to mend; the hint is dropped, and the
        // scrubber's comparison of versions is the backstop), and still newer than the peer's.
        let batch: Vec<Block> = read
            .into_iter()
            .zip(chunk)
            .filter_map(|(b, (_, t, _))| b.filter(|b| b.version > *t && b.verifies()))
            .collect();
        if !batch.is_empty() {
            peers.put(peer, &batch).await?;
            sent += batch.len() as u64;
        }
    }
    Ok((sent, cuts.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::super::blockstore::HintFor;
    use super::super::testing::StorePeers;
    use super::*;
    use crate::shared::placement::replica_servers;

    const N: usize = 4;

    /// `n` blocks of file 9 held by servers 0, 1 and 3, written 10 s ago: written by 3 with
    /// W < R, each leaves a hint for 0 and for 1.
    fn held_by_0_1_and_3(n: usize) -> Vec<Block> {
        let v = now_ns() as u64 - 10_000_000_000;
        (0..)
            .filter(|&i| {
                let mut h = replica_servers(9, i, 3, N);
                h.sort_unstable();
                h == [0, 1, 3]
            })
            .take(n)
            .map(|i| Block::new(BlockKey { file_id: 9, index: i }, v, 3, b"x".to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn a_peer_that_was_down_gets_what_it_missed_and_the_hints_go() {
        let peers = StorePeers::new(N);
        let key = BlockKey { file_id: 9, index: 0 };
        let holders = replica_servers(9, 0, 3, N);
        let (a, b, late) = (holders[0], holders[1], holders[2]);
        // A write with W = 2 while `late` is down: the two holders store it with hints.
        let v = now_ns() as u64 - 10_000_000_000;
        let block = Block::new(key, v, 3, b"new".to_vec());
        for s in [a, b] {
            peers.store(s).put(std::slice::from_ref(&block), false, Some(HintFor { me: s, n: N })).unwrap();
        }
        peers.set_up(late, false);
        let node = peers.node(a);
        let r = round(&node, &peers, Duration::ZERO).await.unwrap();
        assert_eq!(r.unreachable, 1, "the down peer is not reached");
        assert_eq!(r.settled, 1, "the hint for the live holder is settled without sending anything");
        assert_eq!(r.sent, 0);
        assert_eq!(node.store.hint_count().unwrap(), 1, "the hint for the down peer stays");
        peers.set_up(late, true);
        let r = round(&node, &peers, Duration::ZERO).await.unwrap();
        assert_eq!((r.sent, r.unreachable), (1, 0));
        assert_eq!(peers.store(late).versions(&[key]).unwrap(), vec![v]);
        assert_eq!(node.store.hint_count().unwrap(), 0);
    }

    /// Regression: a round read the first [`BATCH`] hints in key order, the lowest-numbered
    /// target's first, so a down peer with that many hints starved the hand-over to every other.
    #[tokio::test]
    async fn a_down_peer_with_many_hints_does_not_starve_the_others() {
        let peers = StorePeers::new(N);
        let me = 3;
        let blocks = held_by_0_1_and_3(BATCH + 100);
        peers.store(me).put(&blocks, false, Some(HintFor { me, n: N })).unwrap();
        peers.set_up(0, false);
        let node = peers.node(me);
        for _ in 0..2 {
            round(&node, &peers, Duration::ZERO).await.unwrap();
        }
        assert_eq!(node.store.hints_for(1, 0).unwrap(), 0, "peer 1's hints waited behind down peer 0's");
        assert_eq!(node.store.hints_for(0, 0).unwrap(), (BATCH + 100) as u64);
    }

    /// Regression: a restarted server counted every hint its peers kept for it, and under a
    /// steady stream of writes with W < R they always kept some (one per write it stored too):
    /// it stayed "catching up", its answers not counted by readers, for the whole limit.
    #[tokio::test]
    async fn catching_up_waits_only_for_hints_of_writes_from_before_the_start() {
        let peers = StorePeers::new(N);
        let holders = replica_servers(9, 0, 3, N);
        let (a, late) = (holders[0], holders[2]);
        let index = (1..).find(|&i| {
            let h = replica_servers(9, i, 3, N);
            h.contains(&a) && h.contains(&late)
        });
        let key = |i| BlockKey { file_id: 9, index: i };
        let missed = Block::new(key(0), now_ns() as u64 - 10_000_000_000, 3, b"missed".to_vec());
        peers.store(a).put(&[missed], false, Some(HintFor { me: a, n: N })).unwrap();
        let node = peers.node(late);
        node.catching_up.set(true);
        let writes_go_on = async {
            // Written after the start, to `late` too, with a hint for it all the same.
            let i = index.expect("a block held by both");
            let new = Block::new(key(i), now_ns() as u64 + 3 * CLOCK_MARGIN.as_nanos() as u64, 3, b"new".to_vec());
            peers.store(late).put(std::slice::from_ref(&new), false, None).unwrap();
            peers.store(a).put(&[new], false, Some(HintFor { me: a, n: N })).unwrap();
            // The missed write is handed over; the new one is too young to be.
            round(&peers.node(a), &peers, Duration::from_secs(5)).await.unwrap();
        };
        let (caught_up, ()) =
            tokio::join!(tokio::time::timeout(Duration::from_secs(20), catch_up(&node, &peers)), writes_go_on);
        assert!(caught_up.is_ok() && !node.catching_up.get(), "still catching up");
        assert!(peers.store(late).versions(&[key(0)]).unwrap()[0] > 0, "the missed write was handed over");
        assert!(peers.store(a).hints_for(late, 0).unwrap() >= 1, "the new write's hint is still kept");
    }

    /// Regression: peers were handed their hints one after the other, so one whose calls went
    /// unanswered until they timed out held up every peer after it, round after round.
    #[tokio::test]
    async fn a_peer_slow_to_fail_does_not_hold_up_the_others() {
        let peers = StorePeers::new(N);
        let me = 3;
        let blocks = held_by_0_1_and_3(20);
        peers.store(me).put(&blocks, false, Some(HintFor { me, n: N })).unwrap();
        peers.set_slow(0, true);
        let node = peers.node(me);
        let keys: Vec<BlockKey> = blocks.iter().map(|b| b.key).collect();
        let handed = async {
            let start = std::time::Instant::now();
            while peers.store(1).versions(&keys).unwrap().contains(&0) {
                assert!(start.elapsed() < super::super::testing::SLOW / 2, "peer 1 waited behind slow peer 0");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let (r, ()) = tokio::join!(round(&node, &peers, Duration::ZERO), handed);
        assert_eq!(r.unwrap().unreachable, 1);
        assert_eq!(node.store.hints_for(1, 0).unwrap(), 0);
    }

    #[tokio::test]
    async fn young_hints_wait_and_cuts_reach_the_peer_before_blocks() {
        let peers = StorePeers::new(N);
        let now = now_ns() as u64;
        let me = 0;
        let cut = Cut { file_id: 5, from_block: 0, version: now - 5_000_000_000 };
        // Peer 1 still holds an old block of the file.
        let old = Block::new(BlockKey { file_id: 5, index: 1 }, now - 9_000_000_000, 4, b"old".to_vec());
        peers.store(1).put(&[old], false, None).unwrap();
        peers.store(me).truncate(&[cut], Some(HintFor { me, n: N })).unwrap();
        let node = peers.node(me);
        let r = round(&node, &peers, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(r, Round::default(), "a hint younger than the settling time is left alone");
        let r = round(&node, &peers, Duration::ZERO).await.unwrap();
        assert_eq!(r.cuts, 3);
        assert_eq!(peers.store(1).versions(&[BlockKey { file_id: 5, index: 1 }]).unwrap(), vec![0]);
    }
}
