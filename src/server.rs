//! Process entry points of the two servers: open the store, listen, serve forever.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::info;

use crate::blockstore::BlockStore;
use crate::namespace::Namespace;
use crate::rpc::data_service::{compare_rings, rebuild, DataNode, DataServerImpl, RebuildProgress};
use crate::rpc::dfs_capnp::{data_server, meta};
use crate::rpc::meta_service::MetaService;
use crate::rpc::net;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Binds `addr` before anything is created on disk: a server that cannot listen leaves no store.
fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    l.set_nonblocking(true).context("setting the listener non-blocking")?;
    Ok(l)
}

/// An exclusive lock on a data dir, held for the life of the process: two servers on one store
/// would each believe they own it.
pub struct DirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DirLock {
    /// Creates `dir` if needed and locks it for `who` (e.g. "dataserver 2"), or says which
    /// process holds it.
    pub fn acquire(dir: &Path, who: &str) -> anyhow::Result<DirLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                anyhow::bail!(
                    "data dir {} is in use by {holder}; two servers cannot share a data dir (give --data-dir)",
                    dir.display()
                );
            }
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        };
        // Who holds it, for the message above.
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{who} (pid {})", std::process::id())?;
        Ok(DirLock { _lock: lock })
    }
}

/// Runs the metaserver on `addr` with its store in `dir`.
pub fn run_metaserver(dir: &Path, block_size: Option<u32>, replicas: Option<u8>, addr: &str) -> anyhow::Result<()> {
    let listener = bind(addr)?;
    let _lock = DirLock::acquire(dir, &format!("the metaserver on {addr}"))?;
    let ns = Namespace::open(dir, block_size, replicas)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("opening the metadata store in {}", dir.display()))?;
    info!("metaserver: store {} (block size {}, {} replicas)", dir.display(), ns.block_size(), ns.replicas());
    let client: meta::Client = capnp_rpc::new_client(MetaService::new(Arc::new(ns)));
    let rt = runtime()?;
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        info!("metaserver listening on {addr}");
        net::serve(listener, client.client).await;
        Ok(())
    })
}

/// How a dataserver runs, beyond its place in the ring.
#[derive(Debug, Clone, Default)]
pub struct DataServerOptions {
    /// Caps the block bytes it sends and receives per second.
    pub max_bandwidth: Option<u64>,
    /// A broken server for the lab's own tests: a new store is marked complete without copying
    /// anything from the peers.
    pub debug_skip_rebuild: bool,
}

/// Runs dataserver `index` of `ring` with its store in `dir`; rebuilds first if the store is new.
pub fn run_dataserver(dir: &Path, index: usize, ring: Vec<String>, opts: DataServerOptions) -> anyhow::Result<()> {
    let max_bandwidth = opts.max_bandwidth;
    let addr = ring[index].clone();
    let listener = bind(&addr)?;
    let _lock = DirLock::acquire(dir, &format!("dataserver {index} on {addr}"))?;
    let (store, mut complete) =
        BlockStore::open(dir).with_context(|| format!("opening the block store in {}", dir.display()))?;
    if opts.debug_skip_rebuild && !complete {
        tracing::warn!("--debug-skip-rebuild: the new store is marked complete without a rebuild");
        store.mark_complete()?;
        complete = true;
    }
    let (blocks, _) = store.stats()?;
    info!("dataserver {index}: store {} holds {blocks} blocks", dir.display());
    let node = Rc::new(DataNode {
        store: Arc::new(store),
        index,
        ring,
        data_dir: dir.to_path_buf(),
        rebuild: RefCell::new(RebuildProgress::default()),
        link: crate::throttle::Throttle::new(max_bandwidth),
    });
    let client: data_server::Client = capnp_rpc::new_client(DataServerImpl { node: node.clone() });
    let rt = runtime()?;
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        info!("dataserver {index} listening on {addr}");
        tokio::task::spawn_local(compare_rings(node.clone()));
        if !complete {
            tokio::task::spawn_local(rebuild(node));
        }
        net::serve(listener, client.client).await;
        Ok(())
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    init_tracing_at("info");
}

/// For command-line tools, whose output is their answer: only warnings unless `RUST_LOG` says more.
pub fn init_tracing_quiet() {
    init_tracing_at("warn");
}

/// For the mount. fuser 0.18 unmounts again when its session ends, after `umount` already did:
/// its check for a live mount reads the dead connection's POLLERR as "mounted", so every clean
/// `umount` ended with "WARN Failed to umount filesystem: Invalid argument". Its session and mount
/// modules log only that at warning level; the mount logs failed unmounts of its own.
pub fn init_tracing_mount() {
    init_tracing_with("info", &["fuser::session=error", "fuser::mnt=error"]);
}

fn init_tracing_at(default: &str) {
    init_tracing_with(default, &[]);
}

fn init_tracing_with(default: &str, quiet: &[&str]) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    for d in quiet.iter().filter_map(|d| d.parse().ok()) {
        filter = filter.add_directive(d);
    }
    // Colours only on a terminal: logs that go to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
