//! DFS: a fault-tolerant distributed filesystem. Modules, bottom-up:
//! storage (`db`), domain (`layout`, `placement`, `block`, `blockstore`, `namespace`, `engine`),
//! wire (`rpc`), processes (`server`), and the FUSE client (`fs`, with `writeback` and `interrupt`).

pub mod block;
pub mod blockstore;
pub mod cli;
pub mod db;
pub mod engine;
pub mod fs;
pub mod interrupt;
pub mod layout;
pub mod namespace;
pub mod normalize;
pub mod placement;
pub mod rpc;
pub mod server;
pub mod throttle;
pub mod writeback;
