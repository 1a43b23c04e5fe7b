//! `distributedfs [options] <mountpoint> <metaserver port> <dataserver port>...`

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use dfs::client::engine::Backoff;
use dfs::client::session::Collection;
use dfs::client::Cluster;
use dfs::metaserver::namespace::sessions::ClientInfo;
use fuser::{Config, MountOption, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

/// Mounts a DFS cluster with FUSE. Runs in the foreground; SIGINT or SIGTERM unmounts cleanly.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    secret: dfs::cli::SecretArg,
    #[command(flatten)]
    metrics: dfs::cli::MetricsArg,
    /// Let users other than the mounting one use the mount (needs root or user_allow_other).
    #[arg(long)]
    allow_other: bool,
    /// FUSE worker threads: a write waiting for a down server holds only one.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Kernel read-ahead for this mount, in KiB (needs root; 0 keeps the kernel's 128 KiB). Cold
    /// sequential reads measured 270 MB/s at 128 KiB and 485 MB/s at 4096 (README).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(0..=1 << 20))]
    readahead_kib: u32,
    /// Replicas this mount's writes wait for: at least the cluster's write quorum, at most the
    /// replica count (default: the cluster's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    write_quorum: Option<u8>,
    /// Replicas this mount's reads compare: at least the cluster's read quorum, at most the
    /// replica count (default: the cluster's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    read_quorum: Option<u8>,
    /// Mount read-only: every change (write, create, remove, rename, setattr) fails with EROFS.
    #[arg(long)]
    ro: bool,
    /// Mount options as mount(8) takes them, comma-separated: ro, rw, allow_other.
    #[arg(short = 'o', value_delimiter = ',', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Broken on purpose, for the lab's own tests: reads do not verify checksums.
    #[arg(long, hide = true)]
    debug_skip_checksums: bool,
    /// Where to mount (an existing directory).
    mountpoint: PathBuf,
    /// The metaserver's port (127.0.0.1) or HOST:PORT.
    meta: String,
    /// Every dataserver's port or HOST:PORT, in ring order.
    #[arg(required = true)]
    dataservers: Vec<String>,
}

/// A FUSE daemon killed without unmounting leaves "Transport endpoint is not connected": detach it.
/// statfs always reaches the daemon (stat may be answered from the kernel's attribute cache).
fn clear_stale_mount(mp: &Path) {
    if let Err(e) = nix::sys::statfs::statfs(mp) {
        if e == nix::errno::Errno::ENOTCONN {
            warn!("{} is a stale mount (its daemon died); detaching it", mp.display());
            if let Err(e) = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH) {
                warn!("detaching {}: {e}", mp.display());
            }
        }
    }
}

/// Sets the mount's kernel read-ahead. The kernel caps a FUSE mount's read-ahead at its default
/// (128 KiB) whatever the daemon asks at init; only the mount's backing device info in sysfs can
/// raise it, and only once mounted. Runs on its own thread: the stat is served by this daemon.
fn set_readahead(mp: PathBuf, kib: u32) {
    let run = move || {
        let dev = match nix::sys::stat::stat(&mp) {
            Ok(st) => st.st_dev,
            Err(e) => return warn!("read-ahead: stat {}: {e}", mp.display()),
        };
        let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
        match std::fs::write(&knob, kib.to_string()) {
            Ok(()) => info!("read-ahead {kib} KiB ({knob})"),
            Err(e) => warn!("read-ahead stays at the kernel's default: writing {knob}: {e}"),
        }
    };
    if let Err(e) = std::thread::Builder::new().name("dfs-readahead".into()).spawn(run) {
        warn!("read-ahead stays at the kernel's default: {e}");
    }
}

fn main() -> std::process::ExitCode {
    if let Some(code) = dfs::cli::generated_docs::<Args>("distributedfs") {
        return code;
    }
    let args = Args::parse();
    dfs::cli::exit("distributedfs", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    dfs::cli::init_tracing_mount();
    args.secret.apply().map_err(anyhow::Error::msg)?;
    // Block SIGINT and SIGTERM in every thread; one thread waits for them and unmounts.
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
    signals.thread_block().context("blocking signals")?;
    // After the signals are blocked: the metrics thread inherits the mask, so SIGINT still
    // reaches only the thread that unmounts.
    args.metrics.start().map_err(anyhow::Error::msg)?;

    let (mut read_only, mut allow_other) = (args.ro, args.allow_other);
    for o in &args.options {
        match o.trim() {
            "ro" => read_only = true,
            "rw" => read_only = false,
            "allow_other" => allow_other = true,
            "" => {}
            o => bail!("mount option {o:?} is not known (known: ro, rw, allow_other)"),
        }
    }

    clear_stale_mount(&args.mountpoint);
    match std::fs::metadata(&args.mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(anyhow!("mount point {} is not a directory", args.mountpoint.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow!(
                "mount point {} does not exist (create the directory first)",
                args.mountpoint.display()
            ))
        }
        Err(e) => return Err(anyhow!("mount point {}: {e}", args.mountpoint.display())),
    }
    let ring = dfs::shared::layout::parse_ring(&args.dataservers).map_err(|e| anyhow!("dataserver list: {e}"))?;
    let asked =
        dfs::shared::layout::Quorum { write: args.write_quorum.unwrap_or(0), read: args.read_quorum.unwrap_or(0) };
    let cluster =
        Cluster::connect_asking(&args.meta, Some(&ring), Backoff::default(), asked).map_err(|e| anyhow!("{e}"))?;
    let (q, r) = (cluster.layout().quorum, cluster.layout().replicas);
    info!(write_quorum = q.w(r), read_quorum = q.q(r), replicas = r, "quorums");
    if q.may_miss(r) {
        warn!("write quorum {} + read quorum {} <= {r} replicas: a read may miss the latest write", q.w(r), q.q(r));
    }
    if args.debug_skip_checksums {
        warn!("--debug-skip-checksums: reads will return unverified data");
        cluster.debug_skip_checksums();
    }
    let notifier = Arc::new(OnceLock::new());
    let info = ClientInfo {
        host: dfs::client::session::host_name(),
        pid: std::process::id(),
        mount: std::fs::canonicalize(&args.mountpoint).unwrap_or(args.mountpoint.clone()).display().to_string(),
    };
    let fs = dfs::fuse::DfsFs::new(cluster, notifier.clone(), info, Collection::default())
        .context("starting the mount's threads and its session with the metaserver")?;

    let mut config = Config::default();
    config.mount_options =
        vec![MountOption::FSName("dfs".into()), MountOption::Subtype("dfs".into()), MountOption::DefaultPermissions];
    // The kernel refuses every change to a read-only mount (EROFS) before asking the daemon.
    if read_only {
        config.mount_options.push(MountOption::RO);
        info!("read-only mount");
    }
    if allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(usize::from(args.threads));
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, &args.mountpoint, &config)
        .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    if args.readahead_kib > 0 {
        set_readahead(args.mountpoint.clone(), args.readahead_kib);
    }
    let mut unmounter = session.unmount_callable();
    let mp = args.mountpoint.clone();
    std::thread::Builder::new().name("dfs-signals".into()).spawn(move || {
        if let Ok(sig) = signals.wait() {
            info!("{sig:?}: unmounting {}", mp.display());
            if let Err(e) = unmounter.unmount() {
                warn!("unmount failed: {e}; detaching");
                let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    })?;
    info!("serving {}", args.mountpoint.display());
    session.run().context("FUSE session")?;
    info!("unmounted {}", args.mountpoint.display());
    Ok(())
}
