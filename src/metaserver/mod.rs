//! The metaserver: the namespace (inodes, directory entries, orphans and the cluster layout) in
//! one LMDB store, served over the wire by `wire::meta_service`.

pub mod group;
pub mod namespace;
pub mod raft;

use std::path::Path;

use tracing::info;

use crate::shared::start::{DirLock, StartError};
use namespace::Namespace;

/// Runs the metaserver on `addr` with its store in `dir`, until the process ends.
pub fn run(dir: &Path, block_size: Option<u32>, replicas: Option<u8>, addr: &str) -> Result<(), StartError> {
    let listener = crate::wire::bind(addr)?;
    let _lock = DirLock::acquire(dir, &format!("the metaserver on {addr}"))?;
    let ns = Namespace::open(dir, block_size, replicas).map_err(|e| StartError::store(dir, e))?;
    info!(dir = %dir.display(), block_size = ns.block_size(), replicas = ns.replicas(), "metaserver store open");
    crate::wire::serve_metaserver(listener, ns, addr)
}
