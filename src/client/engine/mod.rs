//! The client engine: the data path of a file. It cuts byte ranges into blocks,
//! places them, writes every replica in parallel and waits for all of them, or for a write quorum
//! W of them (retrying, with backoff, while servers are down), reads each block from one replica
//! (spread evenly over the servers) with MD5 verification, or compares a read quorum of them by
//! version ([`quorum`]), falls back to the others and repairs bad copies. It talks to dataservers
//! through [`DataPort`], so it knows nothing of the wire; it runs on one thread and its futures
//! need not be `Send`.

mod check;
mod quorum;

pub use check::{Problems, ReplicaState};

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tracing::{error, info, warn};

use super::ports::{Cut, DataPort, RangeReply};
use crate::shared::block::{page_count, pieces, Block, BlockKey, PAGE};
use crate::shared::layout::Layout;
use crate::shared::placement::replica_servers;
use crate::shared::{PortError, MAX_CUTS, MAX_SIZE};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("file too large")]
    TooBig,
    #[error("block {index} of file {file_id}: every replica is corrupt")]
    Corrupt { file_id: u64, index: u64 },
    #[error("dataserver {server}: {msg}")]
    Refused { server: String, msg: String },
    #[error("dataserver {server}: {msg}")]
    NoSpace { server: String, msg: String },
}

/// Backoff while waiting for a server that is down.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { first: Duration::from_millis(50), max: Duration::from_secs(1) }
    }
}

/// Payload bytes per RPC message; keeps messages far below the 64 MiB wire limit.
const MESSAGE_BYTES: usize = 4 << 20;
/// Blocks per RPC message (bounds the per-block overhead of tiny blocks).
const MESSAGE_BLOCKS: usize = 32 * 1024;
/// A write's blocks for one server go in messages of up to this many bytes, [`MESSAGES_IN_FLIGHT`] at
/// a time: the server commits one (writes and syncs it) while the next is on its way, instead of
/// the link standing idle for every commit. Reads are cut and overlapped the same way.
const PIPELINED_BYTES: usize = 1 << 20;
const MESSAGES_IN_FLIGHT: usize = 2;

/// Versions order writes of a block: wall-clock nanoseconds, strictly increasing across every thread
/// of one client process (all its engines share one clock).
#[derive(Debug, Default)]
pub struct VersionClock {
    last: std::sync::atomic::AtomicU64,
}

impl VersionClock {
    pub fn next(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let now = crate::shared::now_ns().max(0) as u64;
        let prev = self.last.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| Some(now.max(l + 1)));
        let prev = prev.unwrap_or_else(|l| l);
        now.max(prev + 1)
    }
}

pub struct Engine<P> {
    port: P,
    n: usize,
    block_size: u64,
    replicas: u8,
    /// Replicas a write waits for (at most `replicas`).
    write_quorum: u8,
    /// Replicas a read compares (1: the first verified copy is taken).
    read_quorum: u8,
    backoff: Backoff,
    rng: RefCell<SmallRng>,
    clock: std::sync::Arc<VersionClock>,
    /// A broken client for the lab's own tests (`distributedfs --debug-skip-checksums`): reads
    /// return whatever a replica holds, unverified. Never set otherwise.
    skip_checksums: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What the replicas said of one block during a read.
#[derive(Default)]
struct Probe {
    order: Vec<usize>,
    good: Option<Block>,
    /// Servers that answered with a corrupt copy or an authoritative "not found".
    bad: Vec<usize>,
    corrupt: bool,
    absent: bool,
    /// Servers that answered for the block: with a copy (intact or not) or a "not found" that
    /// counts (its server was not rebuilding).
    answered: usize,
    /// The server the good copy came from, and the newest cut a server said removed the block.
    good_from: usize,
    cut: u64,
    /// The servers that answered a corrupt copy, and the newest version such a copy claims (the
    /// largest there is for a copy of another key).
    corrupt_at: Vec<usize>,
    corrupt_newest: u64,
}

impl Probe {
    /// Whether every corrupt copy is older than a cut another holder applied: what a holder that
    /// missed the cut still has (an interrupted truncate), and not a write lost to corruption.
    fn corrupt_but_cut(&self) -> bool {
        self.corrupt && self.cut > self.corrupt_newest
    }
}

impl<P: DataPort> Engine<P> {
    pub fn new(port: P, layout: &Layout, backoff: Backoff, clock: std::sync::Arc<VersionClock>) -> Self {
        Engine {
            port,
            n: layout.n(),
            block_size: u64::from(layout.block_size),
            replicas: layout.replicas,
            write_quorum: layout.quorum.w(layout.replicas),
            read_quorum: layout.quorum.q(layout.replicas),
            backoff,
            rng: RefCell::new(SmallRng::from_os_rng()),
            clock,
            skip_checksums: Default::default(),
        }
    }

    /// Shares `flag` as this engine's "skip checksums" switch (see the field).
    pub fn with_skip_checksums(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.skip_checksums = flag;
        self
    }

    /// For each block of a server's reply, whether it verifies (all hashed in one pass).
    fn verified_each(&self, replies: &[(Option<Block>, bool, u64)]) -> Vec<bool> {
        if self.skip_checksums.load(std::sync::atomic::Ordering::Relaxed) {
            return vec![true; replies.len()];
        }
        crate::shared::block::verify_each(replies.iter().map(|r| r.0.as_ref()))
    }

    pub fn port(&self) -> &P {
        &self.port
    }

    /// How many dataservers the ring has.
    pub fn servers(&self) -> usize {
        self.n
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn servers_of(&self, key: BlockKey) -> Vec<usize> {
        replica_servers(key.file_id, key.index, usize::from(self.replicas), self.n)
    }

    /// The order in which each block's replicas are asked: a long read goes to each server in runs
    /// of blocks it holds one after the other, then the others at random.
    ///
    /// A server stores its blocks in the order they were written, those of R replica positions
    /// interleaved: the blocks of a run lie together on its disk, and a cold read moves just them
    /// (the store reads the pages a get asks for, see `dataserver::readahead`), where a server
    /// asked for every R-th block it holds would read them all. Each server is given at most its
    /// share of the read, 1/N of the blocks rounded up (a read lasts as long as its busiest
    /// server). A run starts at the holder that holds the most blocks after it (the last replica
    /// position: R blocks) and goes on while that holder has the next block and room in its share;
    /// otherwise the holder next in line with room starts a shorter one. The first run's holder is
    /// at a replica position drawn once per read, so that successive reads, and single-block
    /// reads, still take every replica in turn: a bad copy anywhere is met by reads (and mended)
    /// as well as by the scrubber. The other holders stay in random order so that fallbacks
    /// spread too.
    fn read_orders(&self, keys: impl Iterator<Item = BlockKey>) -> Vec<Vec<usize>> {
        let keys: Vec<BlockKey> = keys.collect();
        let share = keys.len().div_ceil(self.n.max(1));
        let mut load = vec![0usize; self.n];
        let mut rng = self.rng.borrow_mut();
        let start = rng.random_range(0..usize::from(self.replicas.max(1)));
        let mut run: Option<usize> = None;
        keys.into_iter()
            .map(|key| {
                let mut order = self.servers_of(key);
                let len = order.len();
                let room = |j: &usize| load[order[*j]] < share;
                let on = run.and_then(|s| order.iter().position(|&o| o == s)).filter(room);
                // A new run: from the preferred position down, round the ring, the first holder
                // with room; when none has any (the read's end), the least loaded.
                let preferred = if run.is_none() { start } else { len.saturating_sub(1) };
                let first = on
                    .or_else(|| (0..len).map(|d| (preferred + len - d) % len).find(room))
                    .or_else(|| (0..len).min_by_key(|&j| load[order[j]]));
                if let Some(first) = first {
                    order.swap(0, first);
                    load[order[0]] += 1;
                    run = Some(order[0]);
                    order[1..].shuffle(&mut *rng);
                }
                order
            })
            .collect()
    }

    fn next_version(&self) -> u64 {
        self.clock.next()
    }

    fn block(&self, file_id: u64, index: u64, version: u64, data: Vec<u8>) -> Block {
        Block::new(BlockKey { file_id, index }, version, self.replicas, data)
    }

    /// Writes `data` at `offset` of file `file_id`, whose size is currently `file_size`. Returns
    /// only once every replica of every block has it. Partial blocks keep the
    /// rest of their bytes.
    #[tracing::instrument(level = "debug", skip(self, data), fields(len = data.len()))]
    pub async fn write(&self, file_id: u64, offset: u64, data: &[u8], file_size: u64) -> Result<(), EngineError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= MAX_SIZE).ok_or(EngineError::TooBig)?;
        let bs = self.block_size;
        let version = self.next_version();
        let mut contents = Vec::new();
        for p in pieces(offset, end, bs) {
            let (b, start, lo, hi) = (p.index, p.start, p.lo, p.hi);
            let piece = &data[p.in_range(offset)];
            // Bytes of this block outside [lo, hi) that lie inside the file must be kept; a block
            // the write covers whole keeps nothing, and needs no read.
            let covered = p.whole(bs);
            let keeps_old = !covered && start < file_size && (lo > 0 || start + (hi as u64) < file_size);
            let content = if covered && piece.iter().all(|&b| b == 0) {
                // A whole block of zeros is stored empty: reads fill a short block with zeros, so
                // it reads the same and its space is freed (fallocate's PUNCH_HOLE and ZERO_RANGE
                // come this way, and so does any block written as zeros).
                Vec::new()
            } else if keeps_old {
                let mut old = self.read_to_merge(file_id, b).await?;
                old.truncate((file_size - start).min(bs) as usize);
                if old.len() < hi {
                    old.resize(hi, 0);
                }
                old[lo..hi].copy_from_slice(piece);
                old
            } else {
                let mut v = vec![0u8; lo];
                v.extend_from_slice(piece);
                v
            };
            contents.push((BlockKey { file_id, index: b }, content));
        }
        self.put_all(&Block::batch(version, self.replicas, contents)).await
    }

    /// Whether writes wait for fewer servers than hold a copy (the servers then note hints).
    fn hinted(&self) -> bool {
        self.write_quorum < self.replicas
    }

    /// Sends every block to all its replicas, all servers in parallel, each retried until it
    /// succeeds; returns once every block is on W of its replicas (all of them by default). With
    /// W < R the servers note, in the same commit, which holders may still lack each block, and
    /// hand it over to them (`dataserver::handoff`): a request still on its way when this returns
    /// is left to finish on its own, and one to a server that is down, to the hints.
    async fn put_all(&self, blocks: &[Block]) -> Result<(), EngineError> {
        let mut by_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, b) in blocks.iter().enumerate() {
            for s in self.servers_of(b.key) {
                by_server.entry(s).or_default().push(i);
            }
        }
        let hint = self.hinted();
        let mut sends: FuturesUnordered<_> = by_server
            .into_iter()
            .map(|(s, idx)| async move {
                let refs: Vec<&Block> = idx.iter().map(|&i| &blocks[i]).collect();
                (idx, self.put_retrying(s, &refs, hint).await)
            })
            .collect();
        let w = usize::from(self.write_quorum);
        let mut acks = vec![0usize; blocks.len()];
        while let Some((idx, r)) = sends.next().await {
            r?;
            for i in idx {
                acks[i] += 1;
            }
            if hint && acks.iter().all(|&a| a >= w) {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn put_retrying(&self, server: usize, blocks: &[&Block], hint: bool) -> Result<(), EngineError> {
        let puts = chunks(blocks, PIPELINED_BYTES)
            .map(|chunk| self.retrying(server, "write", move || self.port.put(server, chunk, false, hint)));
        futures::stream::iter(puts).buffer_unordered(MESSAGES_IN_FLIGHT).try_collect().await
    }

    /// Runs `op` against `server` until it succeeds, backing off while the server is unreachable.
    async fn retrying<T, F: std::future::Future<Output = Result<T, PortError>>>(
        &self,
        server: usize,
        what: &str,
        op: impl Fn() -> F,
    ) -> Result<T, EngineError> {
        let mut delay = self.backoff.first;
        let mut waited = Duration::ZERO;
        loop {
            match op().await {
                Ok(v) => {
                    if waited > Duration::ZERO {
                        info!(server, addr = %self.port.name(server), ?waited, "dataserver {server} is back; {what} done");
                    }
                    return Ok(v);
                }
                Err(PortError::Refused(msg)) => {
                    return Err(EngineError::Refused { server: self.port.name(server), msg });
                }
                Err(PortError::NoSpace(msg)) => {
                    return Err(EngineError::NoSpace { server: self.port.name(server), msg });
                }
                Err(PortError::Unreachable(e)) => {
                    if waited == Duration::ZERO || waited.as_secs() / 10 != (waited + delay).as_secs() / 10 {
                        warn!(server, addr = %self.port.name(server), ?waited, "{what} waits for dataserver {server}: {e}");
                    }
                    tokio::time::sleep(delay).await;
                    waited += delay;
                    delay = (delay * 2).min(self.backoff.max);
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` of a file of size `file_size`. Holes read as zeros.
    pub async fn read(&self, file_id: u64, offset: u64, len: u64, file_size: u64) -> Result<Vec<u8>, EngineError> {
        Ok(self.read_noting_holes(file_id, offset, len, file_size).await?.0)
    }

    /// [`Self::read`], also saying whether a block of the range was missing from every replica that
    /// answered: a hole, or a file whose blocks were reclaimed (the caller can tell them apart).
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn read_noting_holes(
        &self,
        file_id: u64,
        offset: u64,
        len: u64,
        file_size: u64,
    ) -> Result<(Vec<u8>, bool), EngineError> {
        if offset >= file_size || len == 0 {
            return Ok((Vec::new(), false));
        }
        let end = offset.saturating_add(len).min(file_size);
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        if first == last && self.read_quorum == 1 {
            let base = first * bs;
            let (lo, hi) = ((offset - base) as usize, (end - base) as usize);
            // Only when the pages asked for are fewer than the block holds of the file.
            let held = (file_size - base).min(bs) as usize;
            if page_count(hi) - lo / PAGE < page_count(held) {
                return self.read_part(BlockKey { file_id, index: first }, lo, hi).await;
            }
        }
        let blocks = self.read_blocks(file_id, first, last + 1).await?;
        let holes = blocks.iter().any(Option::is_none);
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (p, data) in pieces(offset, end, bs).zip(blocks) {
            put_piece(&mut out, &data.unwrap_or_default(), p.lo, p.hi);
        }
        Ok((out, holes))
    }

    /// Reads bytes [`lo`, `hi`) of one block, asking the replica that [`Self::read_orders`] puts
    /// first for only the pages that hold them, each verified against its own MD5 (a 4 KiB read
    /// then moves and hashes 4 KiB, not the block). Anything but a copy that verifies (a server
    /// down, no copy there, a corrupt one) goes the whole-block way, which tries every replica
    /// and mends bad copies; a copy found corrupt here is mended from its result.
    async fn read_part(&self, key: BlockKey, lo: usize, hi: usize) -> Result<(Vec<u8>, bool), EngineError> {
        let s = self.read_orders(std::iter::once(key)).remove(0)[0];
        let skip = self.skip_checksums.load(std::sync::atomic::Ordering::Relaxed);
        let mut corrupt = false;
        if let Ok(RangeReply { part: Some(part), .. }) = self.port.get_range(s, key, lo as u32, hi as u32).await {
            if skip || part.verifies() {
                if let Some(out) = part.bytes(lo, hi) {
                    return Ok((out, false));
                }
            }
            warn!(server = s, file_id = key.file_id, block = key.index, "read: a corrupt copy on dataserver {s}");
            corrupt = true;
        }
        let good = self.read_verified(key.file_id, key.index, key.index + 1).await?.pop().flatten();
        if let Some(good) = good.as_ref().filter(|_| corrupt) {
            // Replaces the copy only if it is still bad (a repair put checks its pages too).
            match self.port.put(s, &[good], true, false).await {
                Ok(()) => crate::shared::metrics::repaired(1),
                Err(e) => warn!(server = s, "repair on dataserver {s} failed: {e}"),
            }
        }
        let mut out = Vec::with_capacity(hi - lo);
        put_piece(&mut out, good.as_ref().map_or(&[][..], |b| &b.data), lo, hi);
        Ok((out, good.is_none()))
    }

    /// Reads blocks [from, to) of a file, verified, as stored (`None`: a hole).
    async fn read_blocks(&self, file_id: u64, from: u64, to: u64) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.read_blocks_with(file_id, from, to, (self.read_quorum, self.read_quorum)).await
    }

    /// Block `b`'s content for a partial write or a truncate to merge into (empty for a hole),
    /// read from R - W + 1 replicas (or the read quorum's, if more): then one of them holds the
    /// last write acknowledged. With W < R a replica may have missed it, and a merge into its
    /// older copy, stored under a newer version, would undo that write everywhere. Servers that
    /// are down are not waited for beyond the read quorum, so that the write goes on; that undoes
    /// the last write if only they held it (README's quorum section says so; W + Q > R rules it
    /// out).
    async fn read_to_merge(&self, file_id: u64, b: u64) -> Result<Vec<u8>, EngineError> {
        let want = self.read_quorum.max(self.replicas.saturating_sub(self.write_quorum) + 1);
        let quorum = (want, self.read_quorum);
        Ok(self.read_blocks_with(file_id, b, b + 1, quorum).await?.pop().flatten().unwrap_or_default())
    }

    /// Reads blocks [from, to) from `want` replicas each, or `least` when no more answer.
    async fn read_blocks_with(
        &self,
        file_id: u64,
        from: u64,
        to: u64,
        (want, least): (u8, u8),
    ) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        if want > 1 {
            return self.read_blocks_quorum(file_id, from, to, (want, least)).await;
        }
        Ok(self.read_verified(file_id, from, to).await?.into_iter().map(|b| b.map(|b| b.data)).collect())
    }

    /// Reads blocks [from, to) of a file, each from one replica, verified (`None`: a hole). Each
    /// block is asked of its replicas in a random order until one verifies. Afterwards every
    /// replica that answered with a bad copy gets the good one; a server that was down gets nothing.
    async fn read_verified(&self, file_id: u64, from: u64, to: u64) -> Result<Vec<Option<Block>>, EngineError> {
        let keys: Vec<BlockKey> = (from..to).map(|index| BlockKey { file_id, index }).collect();
        let keys = &keys;
        let mut probes: Vec<Probe> = keys.iter().map(|_| Probe::default()).collect();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut delay = self.backoff.first;
        let mut rounds_waited = 0u32;
        while !pending.is_empty() {
            let orders = self.read_orders(pending.iter().map(|&i| keys[i]));
            for (&i, order) in pending.iter().zip(orders) {
                probes[i] = Probe { order, ..Probe::default() };
            }
            let mut down = vec![false; self.n];
            for round in 0..usize::from(self.replicas) {
                let mut by_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for &i in &pending {
                    if probes[i].good.is_none() && !down[probes[i].order[round]] {
                        by_server.entry(probes[i].order[round]).or_default().push(i);
                    }
                }
                let asks = by_server.iter().map(|(&s, idx)| self.get_many(s, idx.iter().map(|&i| keys[i])));
                for ((&s, idx), reply) in by_server.iter().zip(join_all(asks).await) {
                    let replies = match reply {
                        Ok(r) => r,
                        Err(e) => {
                            warn!(server = s, addr = %self.port.name(s), "read: dataserver {s}: {e}; trying other replicas");
                            down[s] = true;
                            continue;
                        }
                    };
                    let ok = self.verified_each(&replies);
                    for ((&i, (block, rebuilding, cut)), ok) in idx.iter().zip(replies).zip(ok) {
                        let p = &mut probes[i];
                        match block {
                            Some(b) if b.key == keys[i] && ok => {
                                p.good = Some(b);
                                p.good_from = s;
                            }
                            Some(b) => {
                                p.answered += 1;
                                warn!(
                                    server = s,
                                    file_id,
                                    block = keys[i].index,
                                    "read: a corrupt copy on dataserver {s}"
                                );
                                p.corrupt = true;
                                p.bad.push(s);
                                p.corrupt_at.push(s);
                                let claims = if b.key == keys[i] { b.version } else { u64::MAX };
                                p.corrupt_newest = p.corrupt_newest.max(claims);
                            }
                            None => {
                                p.bad.push(s);
                                p.absent |= !rebuilding;
                                p.answered += usize::from(!rebuilding);
                                p.cut = p.cut.max(cut);
                            }
                        }
                    }
                }
            }
            let mut still = Vec::new();
            for &i in &pending {
                let p = &probes[i];
                if p.good.is_some() || (p.absent && (!p.corrupt || p.corrupt_but_cut())) {
                    continue; // found, or a hole: a server that is not rebuilding would hold it
                }
                // Corrupt where every holder answered: lost. While a holder is down (or rebuilding)
                // it may hold a good copy: wait for it, as for a block no holder answered for.
                if p.corrupt && p.answered >= usize::from(self.replicas) {
                    error!(file_id, block = keys[i].index, "read: every replica is corrupt");
                    return Err(EngineError::Corrupt { file_id, index: keys[i].index });
                }
                still.push(i);
            }
            pending = still;
            if !pending.is_empty() {
                if rounds_waited.is_multiple_of(20) {
                    warn!(file_id, blocks = pending.len(), "read: no intact replica reachable; waiting");
                }
                rounds_waited += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.backoff.max);
            }
        }
        // A copy older than a cut another holder applied is what a holder that missed the cut
        // still has (an interrupted truncate): the block reads as the hole the cut made, and the
        // cut goes to that holder, as a read with a larger quorum does. Its old bytes, read and
        // then "repaired" onto the holder that cut them (which refuses them), came back on every
        // read until the scrubber carried the cut. So with a corrupt copy older than the cut.
        let mut cuts: BTreeMap<usize, Vec<Cut>> = BTreeMap::new();
        for (p, k) in probes.iter_mut().zip(keys) {
            let cut = Cut { file_id, from_block: k.index, version: p.cut };
            if p.good.as_ref().is_some_and(|b| b.version < p.cut) {
                p.good = None;
                cuts.entry(p.good_from).or_default().push(cut);
            }
            if p.good.is_none() && p.corrupt_but_cut() {
                for &s in &p.corrupt_at {
                    cuts.entry(s).or_default().push(cut);
                }
            }
        }
        self.repair(&probes).await;
        self.send_cuts(cuts).await;
        Ok(probes.into_iter().map(|p| p.good).collect())
    }

    /// Writes good copies back to the replicas that answered with bad ones. Best effort: a failure
    /// is logged, and the next read or a scrub will try again.
    async fn repair(&self, probes: &[Probe]) {
        let mut by_server: BTreeMap<usize, Vec<&Block>> = BTreeMap::new();
        for p in probes {
            if let Some(good) = &p.good {
                for &s in &p.bad {
                    by_server.entry(s).or_default().push(good);
                }
            }
        }
        self.put_repairs(by_server).await;
    }

    /// Puts good copies on the servers that answered missing, older or corrupt ones. Best
    /// effort: a failure is logged, and the next read or a scrub will try again.
    async fn put_repairs(&self, by_server: BTreeMap<usize, Vec<&Block>>) {
        let fixes = by_server.iter().map(|(&s, blocks)| async move {
            for chunk in chunks(blocks, MESSAGE_BYTES) {
                if let Err(e) = self.port.put(s, chunk, true, false).await {
                    warn!(server = s, blocks = chunk.len(), "repair on dataserver {s} failed: {e}");
                    return;
                }
            }
            info!(server = s, addr = %self.port.name(s), blocks = blocks.len(), "repaired copies on dataserver {s}");
            crate::shared::metrics::repaired(blocks.len() as u64);
        });
        join_all(fixes).await;
    }

    /// Reads `keys` from server `s` in messages of bounded size. Each answer comes with whether
    /// the server was rebuilding (its "not found" is then not authoritative) and, for one not
    /// found, the version of the cut that removed it there (0: none known).
    async fn get_many(
        &self,
        s: usize,
        keys: impl Iterator<Item = BlockKey>,
    ) -> Result<Vec<(Option<Block>, bool, u64)>, PortError> {
        let keys: Vec<BlockKey> = keys.collect();
        let mut out = Vec::with_capacity(keys.len());
        // Like writes, [`MESSAGES_IN_FLIGHT`] messages at a time: the server reads the next from its
        // store while this one crosses the link.
        let mut replies = futures::stream::iter(keys.chunks(self.keys_per_message()))
            .map(|chunk| async move { (chunk.len(), self.port.get(s, chunk).await) })
            .buffered(MESSAGES_IN_FLIGHT);
        while let Some((asked, r)) = replies.next().await {
            let r = r?;
            if r.blocks.len() != asked {
                return Err(PortError::Refused("answered a different number of blocks".into()));
            }
            let cuts = r.cut_versions.into_iter().chain(std::iter::repeat(0));
            out.extend(r.blocks.into_iter().zip(cuts).map(|(b, c)| (b, r.rebuilding, c)));
        }
        Ok(out)
    }

    fn keys_per_message(&self) -> usize {
        (PIPELINED_BYTES / self.block_size.max(1) as usize).clamp(1, MESSAGE_BLOCKS)
    }

    /// Changes a file's size from `old_size` to `new_size` on the dataservers: the block that holds
    /// the smaller of the two sizes loses its bytes past it, and every later block is deleted, so
    /// that what lies past the end reads as zeros after any later extension.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn truncate(&self, file_id: u64, old_size: u64, new_size: u64) -> Result<(), EngineError> {
        if new_size > MAX_SIZE {
            return Err(EngineError::TooBig);
        }
        let at = old_size.min(new_size);
        let bs = self.block_size;
        if !at.is_multiple_of(bs) {
            let b = at / bs;
            let data = self.read_to_merge(file_id, b).await?;
            let keep = (at % bs) as usize;
            if data.len() > keep {
                let block = self.block(file_id, b, self.next_version(), data[..keep].to_vec());
                self.put_all(std::slice::from_ref(&block)).await?;
            }
        }
        let version = self.next_version();
        self.cut(&[Cut { file_id, from_block: at.div_ceil(bs), version }]).await
    }

    /// Deletes all blocks of files whose last link went: one call (one commit) per server for the
    /// whole batch, in messages of at most [`MAX_CUTS`] files.
    #[tracing::instrument(level = "debug", skip_all, fields(files = file_ids.len()))]
    pub async fn delete(&self, file_ids: &[u64]) -> Result<(), EngineError> {
        let version = self.next_version();
        let cuts: Vec<Cut> = file_ids.iter().map(|&file_id| Cut { file_id, from_block: 0, version }).collect();
        for chunk in cuts.chunks(MAX_CUTS) {
            self.cut(chunk).await?;
        }
        Ok(())
    }

    /// Sends cuts to every server (a file's blocks are on all of them). Each server keeps the
    /// cuts, so that a copy of a removed block arriving later is refused. With W < R this returns
    /// once all but R - W servers have them (so that every block's holders include W that cut
    /// it); those servers note the cuts for the others, who get them when back.
    async fn cut(&self, cuts: &[Cut]) -> Result<(), EngineError> {
        let hint = self.hinted();
        let mut all: FuturesUnordered<_> =
            (0..self.n).map(|s| self.retrying(s, "delete", move || self.port.truncate(s, cuts, hint))).collect();
        let need = self.n - usize::from(self.replicas - self.write_quorum);
        let mut done = 0;
        while let Some(r) = all.next().await {
            r?;
            done += 1;
            if done >= need {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Splits a server's blocks into messages of at most `max_bytes` (and at least one block).
/// Appends bytes [`lo`, `hi`) of a block stored as `data` to `out`. A stored block may end before
/// `hi` (a file extended by truncate): the rest is zeros.
fn put_piece(out: &mut Vec<u8>, data: &[u8], lo: usize, hi: usize) {
    let want = out.len() + (hi - lo);
    if lo < data.len() {
        out.extend_from_slice(&data[lo..data.len().min(hi)]);
    }
    out.resize(want, 0);
}

fn chunks<'a, 'b>(blocks: &'b [&'a Block], max_bytes: usize) -> impl Iterator<Item = &'b [&'a Block]> {
    let mut rest = blocks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < MESSAGE_BLOCKS && (n == 0 || bytes + rest[n].data.len() <= max_bytes) {
            bytes += rest[n].data.len();
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

#[cfg(test)]
mod tests {
    use super::super::fakes::{block_on, engine};
    use super::*;

    /// Regression: a read past the end of a short stored block (a file extended by truncate)
    /// sliced out of bounds and panicked on the RPC thread, which reached the user as EIO.
    #[test]
    fn reads_past_a_short_block_after_extension_are_zeros() {
        let e = engine(5, 65536);
        block_on(async {
            e.write(7, 0, &[b'x'; 512], 0).await.unwrap();
            e.truncate(7, 512, 70000).await.unwrap();
            let got = e.read(7, 16384, 16384, 70000).await.unwrap();
            assert_eq!(got, vec![0u8; 16384]);
            let head = e.read(7, 500, 20, 70000).await.unwrap();
            assert_eq!(&head[..12], &[b'x'; 12]);
            assert_eq!(&head[12..], &[0u8; 8]);
        });
    }

    /// A range's blocks are first asked of their servers evenly (a read waits for its busiest
    /// server), and in runs of consecutive blocks, so that each server reads blocks that lie
    /// together in its store; each block's order still holds each of its replicas once.
    #[test]
    fn a_range_is_read_evenly_from_every_server_in_runs() {
        for n in [4, 5, 6, 8, 9] {
            let e = engine(n, 8);
            let r = usize::from(e.replicas);
            for _ in 0..50 {
                let keys: Vec<BlockKey> = (3..3 + 12 * n as u64).map(|index| BlockKey { file_id: 7, index }).collect();
                let orders = e.read_orders(keys.iter().copied());
                let mut first = vec![0usize; n];
                for (k, order) in keys.iter().zip(&orders) {
                    let mut got = order.clone();
                    got.sort_unstable();
                    let mut want = e.servers_of(*k);
                    want.sort_unstable();
                    assert_eq!(got, want, "block {} asks each replica once", k.index);
                    first[order[0]] += 1;
                }
                assert_eq!(first, vec![12; n], "N = {n}: blocks first asked of each server");
                // Asked one server after another, a run of R at a time (the last two holders of a
                // ring that R does not divide share one run's blocks).
                let runs = 1 + orders.windows(2).filter(|w| w[0][0] != w[1][0]).count();
                assert!(
                    runs <= keys.len() / r + 1 + keys.len() / (r * n),
                    "N = {n}: {runs} runs for {} blocks",
                    keys.len()
                );
            }
        }
        // Reads of one block still take each of its replicas first in turn (so reads meet a bad
        // copy wherever it is); missing one in 200 reads has odds of 3 x (2/3)^200.
        let e = engine(4, 8);
        let key = BlockKey { file_id: 7, index: 0 };
        let firsts: std::collections::BTreeSet<usize> =
            (0..200).map(|_| e.read_orders(std::iter::once(key))[0][0]).collect();
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), {
            let mut h = e.servers_of(key);
            h.sort_unstable();
            h
        });
    }

    /// Whole blocks written as zeros (a punched hole) keep no data, yet read as zeros and are no
    /// hole (the file was not reclaimed); the partial blocks at the edges keep their other bytes.
    #[test]
    fn whole_blocks_of_zeros_are_stored_empty_and_read_as_zeros() {
        let e = engine(4, 8);
        block_on(async {
            e.write(9, 0, &[b'a'; 40], 0).await.unwrap();
            e.write(9, 5, &[0u8; 27], 40).await.unwrap();
            let got = e.read_noting_holes(9, 0, 40, 40).await.unwrap();
            let want = [&[b'a'; 5][..], &[0u8; 27], &[b'a'; 8]].concat();
            assert_eq!(got, (want, false));
            let stored = |index: u64| -> Vec<usize> {
                let stores = e.port().stores.borrow();
                stores.iter().filter_map(|st| st.get(&BlockKey { file_id: 9, index })).map(|b| b.data.len()).collect()
            };
            assert_eq!(stored(0), vec![8; 3], "block 0 keeps its first 5 bytes");
            assert_eq!(stored(1), vec![0; 3], "block 1 is all zeros: stored empty");
            assert_eq!(stored(2), vec![0; 3]);
            assert_eq!(stored(3), vec![0; 3]);
            assert_eq!(stored(4), vec![8; 3], "block 4 was not written");
        });
    }

    #[test]
    fn partial_block_writes_keep_the_rest_and_holes_read_as_zeros() {
        let e = engine(4, 8);
        block_on(async {
            e.write(3, 0, b"0123456789abcdef", 0).await.unwrap();
            e.write(3, 5, b"XY", 16).await.unwrap();
            e.write(3, 40, b"Z", 16).await.unwrap();
            let got = e.read(3, 0, 100, 41).await.unwrap();
            let mut want = b"01234XY789abcdef".to_vec();
            want.resize(40, 0);
            want.push(b'Z');
            assert_eq!(got, want);
            e.truncate(3, 41, 6).await.unwrap();
            e.truncate(3, 6, 20).await.unwrap();
            let got = e.read(3, 0, 100, 20).await.unwrap();
            assert_eq!(got, [b"01234X".as_slice(), &[0u8; 14]].concat());
            // Block 0 is stored short (6 bytes; the zeros after them are no hole); block 1 is gone.
            assert!(!e.read_noting_holes(3, 0, 8, 20).await.unwrap().1);
            assert!(e.read_noting_holes(3, 0, 16, 20).await.unwrap().1);
        });
    }

    #[test]
    fn a_corrupt_replica_is_read_around_and_repaired() {
        let e = engine(4, 8);
        block_on(async {
            e.write(9, 0, b"abcdefgh", 0).await.unwrap();
            for s in replica_servers(9, 0, 3, 4).into_iter().take(2) {
                e.port().stores.borrow_mut()[s].get_mut(&BlockKey { file_id: 9, index: 0 }).unwrap().data[0] ^= 1;
            }
            for _ in 0..40 {
                assert_eq!(e.read(9, 0, 8, 8).await.unwrap(), b"abcdefgh");
            }
            assert!(e.check(9, 8).await.is_empty(), "the bad copies were not repaired");
        });
    }

    /// A sparse file of a petabyte is checked by what the servers hold, not block by block (the
    /// check used to make a list of its 2^47 blocks, and the process died allocating it).
    #[test]
    fn check_skips_what_no_server_holds_and_finds_a_bad_copy_far_out() {
        let e = engine(4, 8);
        let far = 1u64 << 50;
        block_on(async {
            e.write(9, 0, b"abcdefgh", 0).await.unwrap();
            e.write(9, far, b"ijklmnop", 8).await.unwrap();
            let size = far + 8;
            assert!(e.check(9, size).await.is_empty());
            let key = BlockKey { file_id: 9, index: far / 8 };
            let s = replica_servers(9, far / 8, 3, 4)[1];
            e.port().stores.borrow_mut()[s].get_mut(&key).unwrap().data[0] ^= 1;
            assert_eq!(e.check(9, size).await, vec![(far / 8, vec![(s, ReplicaState::Corrupt)])]);
            e.port().stores.borrow_mut()[s].remove(&key);
            assert_eq!(e.check(9, size).await, vec![(far / 8, vec![(s, ReplicaState::Missing)])]);
            // With every server down, the check stops at its first block.
            for s in 0..4 {
                e.port().set_up(s, false);
            }
            let down = e.check(9, size).await;
            assert_eq!(down.len(), 1);
            assert_eq!(down[0].0, 0);
            assert!(down[0].1.iter().all(|(_, st)| *st == ReplicaState::Unreachable), "{down:?}");
        });
    }

    #[test]
    fn a_read_of_a_few_pages_fetches_only_them_and_a_whole_block_read_does_not() {
        let e = engine(4, 16384);
        let data: Vec<u8> = (0..40000u32).map(|i| (i % 251) as u8).collect();
        block_on(async {
            e.write(9, 0, &data, 0).await.unwrap();
            let (gets, parts) = (e.port().gets.get(), e.port().range_gets.get());
            for (off, len) in [(4096u64, 4096u64), (16384 + 100, 5000), (32768, 4096), (39000, 4096)] {
                let end = (off + len).min(40000) as usize;
                assert_eq!(e.read(9, off, len, 40000).await.unwrap(), &data[off as usize..end]);
            }
            assert_eq!((e.port().gets.get(), e.port().range_gets.get()), (gets, parts + 4));
            // A whole block, and the whole of the last block's 7232 bytes, are read as blocks.
            assert_eq!(e.read(9, 16384, 16384, 40000).await.unwrap(), &data[16384..32768]);
            assert_eq!(e.read(9, 32768, 16384, 40000).await.unwrap(), &data[32768..]);
            assert_eq!((e.port().gets.get(), e.port().range_gets.get()), (gets + 2, parts + 4));
        });
    }

    #[test]
    fn a_corrupt_page_is_read_around_and_its_copy_repaired() {
        let e = engine(4, 16384);
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8).collect();
        let key = BlockKey { file_id: 9, index: 0 };
        block_on(async {
            e.write(9, 0, &data, 0).await.unwrap();
            for s in replica_servers(9, 0, 3, 4).into_iter().take(2) {
                e.port().stores.borrow_mut()[s].get_mut(&key).unwrap().data[5000] ^= 1;
            }
            for _ in 0..40 {
                assert_eq!(e.read(9, 4096, 4096, 16384).await.unwrap(), &data[4096..8192]);
            }
            assert!(e.check(9, 16384).await.is_empty(), "the bad copies were not repaired");
            for st in e.port().stores.borrow_mut().iter_mut() {
                if let Some(b) = st.get_mut(&key) {
                    b.data[5000] ^= 1;
                }
            }
            assert!(matches!(e.read(9, 4096, 4096, 16384).await, Err(EngineError::Corrupt { .. })));
        });
    }

    #[test]
    fn every_replica_corrupt_is_an_error_and_never_data() {
        let e = engine(4, 8);
        block_on(async {
            e.write(9, 0, b"abcdefgh", 0).await.unwrap();
            for st in e.port().stores.borrow_mut().iter_mut() {
                if let Some(b) = st.get_mut(&BlockKey { file_id: 9, index: 0 }) {
                    b.data[0] ^= 1;
                }
            }
            assert!(matches!(e.read(9, 0, 8, 8).await, Err(EngineError::Corrupt { .. })));
        });
    }

    /// A corrupt copy while the other holders are down is not the end: a read, and a partial
    /// write (which merges into the block's old content), wait for a holder with a good copy, as
    /// for a block no holder answers for. Both used to fail at once.
    #[test]
    fn a_corrupt_copy_with_the_other_holders_down_waits_for_them() {
        let e = engine(4, 8);
        let key = BlockKey { file_id: 9, index: 0 };
        let [rotted, a, b] = replica_servers(9, 0, 3, 4)[..] else { panic!("three replicas") };
        block_on(async {
            e.write(9, 0, b"abcdefgh", 0).await.unwrap();
            e.port().stores.borrow_mut()[rotted].get_mut(&key).unwrap().data[0] ^= 1;
            for s in [a, b] {
                e.port().set_up(s, false);
            }
            let read = tokio::time::timeout(Duration::from_millis(300), e.read(9, 0, 8, 8)).await;
            assert!(read.is_err(), "the read answered {:?} with the good copies' holders down", read.map(|r| r.ok()));
            let write = tokio::time::timeout(Duration::from_millis(300), e.write(9, 2, b"X", 8)).await;
            assert!(
                write.is_err(),
                "the write answered {:?} with the good copies' holders down",
                write.map(|r| r.ok())
            );
            for s in [a, b] {
                e.port().set_up(s, true);
            }
            assert_eq!(e.read(9, 0, 8, 8).await.unwrap(), b"abcdefgh");
            e.write(9, 2, b"X", 8).await.unwrap();
            assert_eq!(e.read(9, 0, 8, 8).await.unwrap(), b"abXdefgh");
        });
    }

    /// A truncate that reached one holder of a block and not the others (interrupted): a read
    /// that meets the cut reads the hole it made and carries the cut to the others, instead of
    /// returning the old bytes and "repairing" them onto the holder that cut them.
    #[test]
    fn a_cut_one_holder_applied_reaches_the_others_through_reads() {
        let e = engine(4, 8);
        let key = BlockKey { file_id: 7, index: 1 };
        let holders = replica_servers(7, 1, 3, 4);
        block_on(async {
            e.write(7, 0, b"0123456789abcdef", 0).await.unwrap();
            let cut = Cut { file_id: 7, from_block: 1, version: u64::MAX / 2 };
            e.port().truncate(holders[0], &[cut], false).await.unwrap();
            let held = || holders.iter().filter(|&&s| e.port().stores.borrow()[s].contains_key(&key)).count();
            let mut reads = 0;
            while held() > 0 {
                assert!(reads < 100, "the cut reached no other holder in {reads} reads");
                e.read(7, 8, 8, 16).await.unwrap();
                reads += 1;
            }
            assert_eq!(e.read(7, 8, 8, 16).await.unwrap(), vec![0u8; 8], "the cut block reads as a hole");
            assert_eq!(e.read(7, 0, 8, 16).await.unwrap(), b"01234567");
        });
    }

    /// `check` reports what a read would replace: a copy of the newest version with the smaller
    /// MD5 (two writes in one nanosecond), and a copy that survived a cut its other holders
    /// applied. It reported both fine, and the holders of the cut missing.
    #[test]
    fn check_reports_a_same_version_copy_and_a_survivor_of_a_cut() {
        let e = engine(4, 8);
        let key = BlockKey { file_id: 9, index: 0 };
        let holders = replica_servers(9, 0, 3, 4);
        block_on(async {
            e.write(9, 0, b"abcdefgh", 0).await.unwrap();
            let v = e.port().stores.borrow()[holders[0]][&key].version;
            let (a, b) = (Block::new(key, v, 3, b"first...".to_vec()), Block::new(key, v, 3, b"second..".to_vec()));
            let (small, large) = if a.md5 < b.md5 { (a, b) } else { (b, a) };
            e.port().stores.borrow_mut()[holders[0]].insert(key, small);
            for &s in &holders[1..] {
                e.port().stores.borrow_mut()[s].insert(key, large.clone());
            }
            assert_eq!(e.check(9, 8).await, vec![(0, vec![(holders[0], ReplicaState::Stale)])]);
            let cut = Cut { file_id: 9, from_block: 0, version: v + 10 };
            for &s in &holders[1..] {
                e.port().truncate(s, &[cut], false).await.unwrap();
            }
            assert_eq!(e.check(9, 8).await, vec![(0, vec![(holders[0], ReplicaState::Stale)])]);
        });
    }

    #[test]
    fn reads_survive_two_of_four_servers_down_and_writes_wait() {
        let e = engine(4, 8);
        block_on(async {
            let data: Vec<u8> = (0..200u8).collect();
            e.write(5, 0, &data, 0).await.unwrap();
            e.port().set_up(0, false);
            e.port().set_up(2, false);
            assert_eq!(e.read(5, 0, 200, 200).await.unwrap(), data);
            let w = e.write(5, 0, b"new", 200);
            let timeout = tokio::time::timeout(Duration::from_millis(50), w).await;
            assert!(timeout.is_err(), "a write returned while replicas were down");
        });
    }

    /// Regression: rewriting whole blocks of an existing file read every block first (the
    /// read-modify-write meant for partial blocks), making rewrites many times slower than writes.
    #[test]
    fn rewriting_whole_blocks_reads_nothing_and_partial_edges_read_once_each() {
        let e = engine(4, 8);
        block_on(async {
            e.write(2, 0, &[1u8; 800], 0).await.unwrap();
            let before = e.port().gets.get();
            e.write(2, 0, &[2u8; 800], 800).await.unwrap();
            assert_eq!(e.port().gets.get(), before, "a whole-block rewrite must not read");
            e.write(2, 4, &[3u8; 16], 800).await.unwrap();
            assert_eq!(e.port().gets.get(), before + 2, "two partial edge blocks, one read each");
            let got = e.read(2, 0, 24, 800).await.unwrap();
            assert_eq!(got, [[2u8; 4].as_slice(), &[3u8; 16], &[2u8; 4]].concat());
        });
    }

    #[test]
    fn offsets_past_two_to_the_63_are_refused() {
        let e = engine(4, 8);
        block_on(async {
            assert!(matches!(e.write(1, 1 << 63, b"x", 0).await, Err(EngineError::TooBig)));
            assert!(matches!(e.write(1, u64::MAX, b"x", 0).await, Err(EngineError::TooBig)));
            assert!(matches!(e.truncate(1, 0, 1 << 63).await, Err(EngineError::TooBig)));
            assert_eq!(e.port().puts.get(), 0);
        });
    }
}
