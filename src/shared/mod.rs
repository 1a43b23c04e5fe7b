//! What every role shares: the inode and error types, the cluster layout, blocks and their
//! placement, and the one LMDB adapter both servers store through.

pub mod block;
pub mod checksum;
pub mod db;
pub mod layout;
pub mod metrics;
pub mod placement;
pub mod start;
#[cfg(test)]
pub(crate) mod tmpfs;
pub mod types;
pub mod wal;

pub use types::*;
