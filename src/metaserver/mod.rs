//! The metaserver: the namespace (inodes, directory entries, orphans and the cluster layout) in
//! one LMDB store, served over the wire by `wire::meta_service`.

pub mod group;
pub mod namespace;
pub mod raft;

use std::path::Path;

use tracing::info;

use crate::shared::start::{DirLock, StartError};
use group::GroupConfig;
use namespace::Namespace;

/// Runs the metaserver on `addr` with its store in `dir`, until the process ends.
pub fn run(dir: &Path, block_size: Option<u32>, replicas: Option<u8>, addr: &str) -> Result<(), StartError> {
    let listener = crate::wire::bind(addr)?;
    let _lock = DirLock::acquire(dir, &format!("the metaserver on {addr}"))?;
    let ns = Namespace::open(dir, block_size, replicas).map_err(|e| StartError::store(dir, e))?;
    info!(dir = %dir.display(), block_size = ns.block_size(), replicas = ns.replicas(), "metaserver store open");
    crate::wire::serve_metaserver(listener, ns, addr)
}

/// Runs member `id` of the metaserver group `group` with its stores in `dir`, until the process
/// ends. The group forms itself the first time its member 0 starts.
pub fn run_member(
    dir: &Path,
    shape: (Option<u32>, Option<u8>),
    group: &GroupConfig,
    id: usize,
) -> Result<(), StartError> {
    let addr = group.member(id).map_err(|e| StartError::store(dir, e))?.to_string();
    let listener = crate::wire::bind(&addr)?;
    let _lock = DirLock::acquire(dir, &format!("metaserver group member {id} on {addr}"))?;
    info!(dir = %dir.display(), member = id, members = group.members.len(), "metaserver group member starting");
    crate::wire::serve_metaserver_member(listener, dir, shape, group, id)
}
