//! The metaserver group's replication with Raft (openraft): the log and the vote in an LMDB store
//! of their own ([`log_store`]), and the namespace as the state machine ([`state_machine`]), which
//! applies each client's change exactly once and snapshots the whole store. The group's network
//! and processes build on these.

pub mod log_store;
pub mod member;
pub mod snapshot_bytes;
pub mod state_machine;

use openraft::{BasicNode, TokioRuntime};
use serde::{Deserialize, Serialize};

use super::namespace::Outcome;
pub use super::namespace::Request;
use crate::shared::FsError;

/// What applying a log entry answered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// An entry of Raft's own (a new leader's blank entry, a membership change).
    None,
    Applied(Result<Outcome, FsError>),
    /// What each request of a batch answered, in its order.
    Many(Vec<Result<Outcome, FsError>>),
}

openraft::declare_raft_types!(
    /// The metaserver group's Raft types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot_bytes::SnapshotBytes,
        AsyncRuntime = TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;

#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod tests;
