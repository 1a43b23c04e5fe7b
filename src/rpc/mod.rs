//! The wire: Cap'n Proto schema bindings and the adapters between RPC and the domain.

#[rustfmt::skip]
#[allow(clippy::all, clippy::unwrap_used, unused, unreachable_pub, missing_docs)]
pub mod dfs_capnp;

pub mod client;
pub mod convert;
pub mod data_service;
pub mod meta_service;
pub mod net;
