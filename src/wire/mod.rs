//! The wire: the Cap'n Proto schema (`dfs.capnp`) and its committed bindings, the conversions
//! between domain types and messages, connections, and the adapters on both sides: the ports the
//! client and the dataserver's rebuild call through ([`RpcMetaPort`], [`RpcDataPort`],
//! [`peer::RpcPeers`]) and the services that serve the stores. The only module (with the FUSE
//! adapter and the binaries) that knows the RPC library.

#[rustfmt::skip]
#[allow(clippy::all, clippy::unwrap_used, unused, unreachable_pub, missing_docs)]
pub mod dfs_capnp;

pub mod admin;
pub mod auth;
pub mod convert;
pub mod data_client;
pub mod data_service;
pub mod meta_client;
pub mod meta_service;
pub mod net;
pub mod peer;
pub mod raft_net;
pub mod serve;

#[cfg(test)]
mod fuzz;

pub use data_client::RpcDataPort;
pub use meta_client::RpcMetaPort;
pub use serve::{bind, serve_dataserver, serve_metaserver, serve_metaserver_member};
