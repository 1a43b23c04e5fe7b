//! Checking a file's replicas (`dfsctl check`): every replica of every block, asked and
//! verified, with the state of each that is not fine.

use std::collections::BTreeMap;

use futures::future::join_all;

use super::{DataPort, Engine};
use crate::shared::block::{Block, BlockKey};
use crate::shared::PortError;

/// What `check` found: per block with a problem, its index and the replicas that are not fine.
pub type Problems = Vec<(u64, Vec<(usize, ReplicaState)>)>;

/// One replica's state found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    Ok,
    Missing,
    Corrupt,
    Stale,
    Unreachable,
    /// The server answered but refused (e.g. its ring differs).
    Refused,
}

/// Blocks checked per round: what a check holds at once is every replica's copy of this many.
const WINDOW: u64 = 1024;

impl<P: DataPort> Engine<P> {
    /// Checks every replica of every block of a file of `size` bytes. Returns, per block with a
    /// problem, (block index, [(server, state)]) for each replica that is not `Ok`. A block missing
    /// on every replica is a hole, not a problem.
    ///
    /// The file is checked a window of blocks at a time, and a run of blocks no dataserver holds
    /// is skipped by asking each for the next block of the file it holds: a sparse file of a
    /// petabyte is not asked for block by block. Skipping goes by the servers that answer; if none
    /// does, the check stops at that block, every holder of it reported as not answering.
    pub async fn check(&self, file_id: u64, size: u64) -> Problems {
        let count = size.div_ceil(self.block_size);
        let mut problems = Vec::new();
        let mut lo = 0;
        while lo < count {
            match self.next_held(file_id, lo).await {
                Ok(Some(next)) if next < count => lo = next,
                Ok(_) => break,
                Err(state) => {
                    let key = BlockKey { file_id, index: lo };
                    problems.push((lo, self.servers_of(key).into_iter().map(|s| (s, state.clone())).collect()));
                    break;
                }
            }
            let hi = (lo + WINDOW).min(count);
            problems.extend(self.check_window(file_id, lo, hi).await);
            lo = hi;
        }
        problems
    }

    /// The first block at or after `from` of `file_id` that any dataserver holds (`None`: none
    /// does); `Err` if no dataserver answered.
    async fn next_held(&self, file_id: u64, from: u64) -> Result<Option<u64>, ReplicaState> {
        // `list` lists after the key given: the one just before block `from`.
        let after = match from.checked_sub(1) {
            Some(index) => BlockKey { file_id, index },
            None => BlockKey { file_id: file_id.saturating_sub(1), index: u64::MAX },
        };
        let asks = (0..self.n).map(|s| self.port.list(s, after, 1));
        let mut next = None;
        let mut state = None;
        for page in join_all(asks).await {
            match page {
                Ok(page) => {
                    state = Some(ReplicaState::Ok);
                    if let Some((k, _)) = page.keys.first().filter(|(k, _)| k.file_id == file_id) {
                        next = Some(next.map_or(k.index, |n: u64| n.min(k.index)));
                    }
                }
                Err(PortError::Refused(_)) if state.is_none() => state = Some(ReplicaState::Refused),
                Err(_) => {}
            }
        }
        match state {
            Some(ReplicaState::Ok) => Ok(next),
            other => Err(other.unwrap_or(ReplicaState::Unreachable)),
        }
    }

    /// [`Engine::check`] of blocks `lo..hi`.
    async fn check_window(&self, file_id: u64, lo: u64, hi: u64) -> Problems {
        let keys: Vec<BlockKey> = (lo..hi).map(|index| BlockKey { file_id, index }).collect();
        let keys = &keys;
        let mut per_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            for s in self.servers_of(*k) {
                per_server.entry(s).or_default().push(i);
            }
        }
        let asks = per_server.iter().map(|(&s, idx)| self.get_many(s, idx.iter().map(|&i| keys[i])));
        // seen[i]: per replica, (server, Ok(Some(block)) | Ok(None) if missing | Err(state) if not asked)
        type Seen = Vec<(usize, Result<Option<Block>, ReplicaState>)>;
        let mut seen: Vec<Seen> = vec![Vec::new(); keys.len()];
        // cuts[i]: the newest cut a server that lacks block i says removed it there.
        let mut cuts = vec![0u64; keys.len()];
        for ((&s, idx), reply) in per_server.iter().zip(join_all(asks).await) {
            match reply {
                Ok(blocks) => {
                    for (&i, (b, _, cut)) in idx.iter().zip(blocks) {
                        if b.is_none() {
                            cuts[i] = cuts[i].max(cut);
                        }
                        seen[i].push((s, Ok(b)));
                    }
                }
                Err(e) => {
                    let state = if matches!(e, PortError::Refused(_)) {
                        ReplicaState::Refused
                    } else {
                        ReplicaState::Unreachable
                    };
                    idx.iter().for_each(|&i| seen[i].push((s, Err(state.clone()))));
                }
            }
        }
        let mut problems = Vec::new();
        for (i, (replicas, cut)) in seen.into_iter().zip(cuts).enumerate() {
            // Ordered as a read and the servers order two copies: by version, then by MD5.
            let newest =
                replicas.iter().filter_map(|(_, r)| r.as_ref().ok()?.as_ref()).map(|b| (b.version, b.md5)).max();
            // A cut newer than every copy: the copies are what holders that missed it still have
            // (the block reads as a hole); the holders that cut it are fine.
            if newest.is_some_and(|(version, _)| cut > version) {
                let survivors: Vec<(usize, ReplicaState)> = replicas
                    .iter()
                    .filter_map(|(s, r)| match r {
                        Err(state) => Some((*s, state.clone())),
                        Ok(Some(_)) => Some((*s, ReplicaState::Stale)),
                        Ok(None) => None,
                    })
                    .collect();
                problems.push((lo + i as u64, survivors));
                continue;
            }
            let Some(newest) = newest else {
                if replicas.iter().all(|(_, r)| matches!(r, Ok(None))) {
                    continue; // a hole
                }
                let states = replicas.into_iter().map(|(s, r)| (s, r.err().unwrap_or(ReplicaState::Missing))).collect();
                problems.push((lo + i as u64, states));
                continue;
            };
            let bad: Vec<(usize, ReplicaState)> = replicas
                .iter()
                .filter_map(|(s, r)| {
                    let state = match r {
                        Err(state) => state.clone(),
                        Ok(None) => ReplicaState::Missing,
                        Ok(Some(b)) if !b.verifies() => ReplicaState::Corrupt,
                        Ok(Some(b)) if (b.version, b.md5) < newest => ReplicaState::Stale,
                        Ok(Some(_)) => return None,
                    };
                    Some((*s, state))
                })
                .collect();
            if !bad.is_empty() {
                problems.push((lo + i as u64, bad));
            }
        }
        problems
    }
}
