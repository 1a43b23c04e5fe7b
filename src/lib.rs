//! DFS: a fault-tolerant distributed filesystem. The folders are the roles:
//!
//! - [`client`]: what a mount (or `dfsctl`) does: file operations over the metaserver and the
//!   dataservers, the block engine, write-back, statahead and reclaim, all behind ports;
//! - [`metaserver`]: the namespace store;
//! - [`dataserver`]: the block store, rebuild from peers, the bandwidth cap, the process;
//! - [`wire`]: the Cap'n Proto schema, its bindings, and the adapters that implement the ports and
//!   serve the stores (the only place besides [`fuse`] and the binaries that knows the RPC library);
//! - [`fuse`]: the kernel adapter, which only translates and replies;
//! - [`shared`]: the types, limits and helpers every role uses.
//!
//! A write goes FUSE → `client::files` → `client::engine` → `client::ports` → `wire`.

pub mod cli;
pub mod client;
pub mod dataserver;
pub mod fuse;
pub mod metaserver;
pub mod shared;
pub mod wire;
