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

impl<P: DataPort> Engine<P> {
    /// Checks every replica of every block of a file of `size` bytes. Returns, per block with a
    /// problem, (block index, [(server, state)]) for each replica that is not `Ok`. A block missing
    /// on every replica is a hole, not a problem.
    pub async fn check(&self, file_id: u64, size: u64) -> Problems {
        let count = size.div_ceil(self.block_size);
        let keys: Vec<BlockKey> = (0..count).map(|index| BlockKey { file_id, index }).collect();
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
        for ((&s, idx), reply) in per_server.iter().zip(join_all(asks).await) {
            match reply {
                Ok(blocks) => {
                    for (&i, (b, _, _)) in idx.iter().zip(blocks) {
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
        for (i, replicas) in seen.into_iter().enumerate() {
            let newest = replicas.iter().filter_map(|(_, r)| r.as_ref().ok()?.as_ref()).map(|b| b.version).max();
            let Some(newest) = newest else {
                if replicas.iter().all(|(_, r)| matches!(r, Ok(None))) {
                    continue; // a hole
                }
                let states = replicas.into_iter().map(|(s, r)| (s, r.err().unwrap_or(ReplicaState::Missing))).collect();
                problems.push((i as u64, states));
                continue;
            };
            let bad: Vec<(usize, ReplicaState)> = replicas
                .iter()
                .filter_map(|(s, r)| {
                    let state = match r {
                        Err(state) => state.clone(),
                        Ok(None) => ReplicaState::Missing,
                        Ok(Some(b)) if !b.verifies() => ReplicaState::Corrupt,
                        Ok(Some(b)) if b.version < newest => ReplicaState::Stale,
                        Ok(Some(_)) => return None,
                    };
                    Some((*s, state))
                })
                .collect();
            if !bad.is_empty() {
                problems.push((i as u64, bad));
            }
        }
        problems
    }
}
