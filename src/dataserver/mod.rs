//! The dataserver: blocks in one LMDB store ([`blockstore`]), the rebuild of a new store from its
//! peers ([`rebuild`]), the hand-over of what peers missed ([`handoff`]), the scrubber
//! ([`scrub`]), a bandwidth cap ([`throttle`]), and the process that serves them over the wire
//! (`wire::data_service`).

pub mod blockstore;
pub mod handoff;
pub mod rebuild;
pub mod scrub;
#[cfg(test)]
mod testing;
pub mod throttle;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use crate::shared::start::{DirLock, StartError};
use blockstore::BlockStore;
use rebuild::RebuildProgress;

/// How a dataserver runs, beyond its place in the ring.
#[derive(Debug, Clone)]
pub struct DataServerOptions {
    /// Caps the block bytes it sends and receives per second.
    pub max_bandwidth: Option<u64>,
    /// A broken server for the lab's own tests: a new store is marked complete without copying
    /// anything from the peers.
    pub debug_skip_rebuild: bool,
    /// How long a rebuild keeps trying a peer that does not answer before it finishes without it.
    pub rebuild_give_up: std::time::Duration,
    /// Bytes per second a scrub pass may read.
    pub scrub_rate: u64,
    /// Time from the end of one scrub pass to the start of the next (`None`: only when asked).
    pub scrub_every: Option<std::time::Duration>,
    /// Hints are kept but not handed over (tests that need a stale replica to stay stale).
    pub hold_hints: bool,
}

impl Default for DataServerOptions {
    fn default() -> Self {
        DataServerOptions {
            max_bandwidth: None,
            debug_skip_rebuild: false,
            rebuild_give_up: rebuild::GIVE_UP,
            scrub_rate: scrub::DEFAULT_RATE,
            scrub_every: Some(scrub::DEFAULT_EVERY),
            hold_hints: false,
        }
    }
}

/// What every connection to this dataserver shares.
pub struct DataNode {
    pub store: Arc<BlockStore>,
    pub index: usize,
    pub ring: Vec<String>,
    pub data_dir: PathBuf,
    pub rebuild: RefCell<RebuildProgress>,
    /// See [`DataServerOptions::rebuild_give_up`].
    pub rebuild_give_up: std::time::Duration,
    /// The server's bandwidth cap (`--max-bandwidth`), charged for block bytes in and out.
    pub link: throttle::Throttle,
    pub scrub: scrub::Scrubber,
    /// Restarted, and peers may still hold hints for it: its answers may be stale, so readers do
    /// not count them toward a quorum (see `handoff::catch_up`).
    pub catching_up: std::cell::Cell<bool>,
}

/// Runs dataserver `index` of `ring` with its store in `dir`; rebuilds first if the store is new.
pub fn run(dir: &Path, index: usize, ring: Vec<String>, opts: DataServerOptions) -> Result<(), StartError> {
    let addr = ring.get(index).cloned().ok_or(StartError::NotInRing { index, servers: ring.len() })?;
    let listener = crate::wire::bind(&addr)?;
    let _lock = DirLock::acquire(dir, &format!("dataserver {index} on {addr}"))?;
    let (store, mut complete) = BlockStore::open(dir).map_err(|e| StartError::store(dir, e))?;
    if opts.debug_skip_rebuild && !complete {
        tracing::warn!("--debug-skip-rebuild: the new store is marked complete without a rebuild");
        store.mark_complete().map_err(|e| StartError::store(dir, e))?;
        complete = true;
    }
    let (blocks, _) = store.stats().map_err(|e| StartError::store(dir, e))?;
    info!(server = index, dir = %dir.display(), blocks, "dataserver store open");
    let node = DataNode {
        store: Arc::new(store),
        index,
        ring,
        data_dir: dir.to_path_buf(),
        rebuild: RefCell::new(RebuildProgress::default()),
        rebuild_give_up: opts.rebuild_give_up,
        link: throttle::Throttle::new(opts.max_bandwidth),
        scrub: scrub::Scrubber::new(opts.scrub_rate, opts.scrub_every),
        catching_up: std::cell::Cell::new(true),
    };
    crate::wire::serve_dataserver(listener, node, complete, !opts.hold_hints)
}
