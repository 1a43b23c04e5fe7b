//! The client: everything a mount or `dfsctl` does with a cluster.
//!
//! - [`ports`]: what the client needs from the metaserver and the dataservers (traits);
//! - [`files`]: file operations that need both (truncate, read, write, check, reclaim);
//! - [`engine`]: the data path of a file: blocks, replicas, checksums, repair;
//! - [`cluster`]: a `Send + Sync` handle that gives each thread its own connections;
//! - [`writeback`], [`statahead`], [`reclaim`]: what a mount adds: buffered writes landed in the
//!   background, directory listings fetched ahead of lookups, deleted files' blocks freed;
//! - [`interrupt`]: telling when the process behind a waiting request gave up;
//! - [`fresh_dirs`]: directories' attributes as this client's own changes left them.

pub mod cluster;
pub mod engine;
#[cfg(test)]
pub mod fakes;
pub mod files;
pub mod fresh_dirs;
pub mod gc;
pub mod interrupt;
pub mod no_xattrs;
pub mod ports;
pub mod reclaim;
pub mod seen;
pub mod session;
pub mod statahead;
pub mod writeback;

pub use cluster::Cluster;

/// What is left of `lifetime` for something `age` old; `None` once nothing is. Answers kept here
/// go to the kernel with this, so that they are never older than its own cache's would be.
pub(crate) fn time_left(lifetime: std::time::Duration, age: std::time::Duration) -> Option<std::time::Duration> {
    lifetime.checked_sub(age).filter(|left| !left.is_zero())
}
