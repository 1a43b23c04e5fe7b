//! `metaserver [--data-dir DIR] [--block-size BYTES] [--replicas R] <port>`: a metaserver on its own.
//! `metaserver [--data-dir DIR] [--block-size BYTES] [--replicas R] --config FILE <id>`: member `id`
//! of the group that FILE lists. `--write-quorum W --read-quorum Q` set the quorums.

use std::path::PathBuf;

use clap::Parser;

/// The DFS metaserver: owns the directory tree and the cluster layout, alone or as a member of a
/// Raft group.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    security: dfs::cli::ServerSecurity,
    #[command(flatten)]
    metrics: dfs::cli::MetricsArg,
    /// Where the metadata store lives (default ./dfs-data/meta, or ./dfs-data/meta<id> in a group).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Block size in bytes, fixed when the store is created (default 16384, chosen by measurement: README).
    #[arg(long)]
    block_size: Option<u32>,
    /// Replicas per block, fixed when the store is created (default 3).
    #[arg(long)]
    replicas: Option<u8>,
    /// Replicas a write waits for, 1..=R, fixed when first given (default R: every replica). The
    /// others get the block in the background (hinted hand-over).
    #[arg(long)]
    write_quorum: Option<u8>,
    /// Replicas a read asks and compares, 1..=R, fixed when first given (default 1: one verified copy).
    #[arg(long)]
    read_quorum: Option<u8>,
    /// The group's config file ("M: <n>" and "metadata<i>: host:port" lines); the argument is
    /// then this member's id.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seconds a client session (a mount) lives without a heartbeat; then its locks are released
    /// and what it had open no longer keeps removed files.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    session_lease: u64,
    /// Port to listen on (127.0.0.1), or HOST:PORT; with --config, this member's id.
    port: String,
}

fn main() -> std::process::ExitCode {
    if let Some(code) = dfs::cli::generated_docs::<Args>("metaserver") {
        return code;
    }
    let args = Args::parse();
    dfs::cli::exit("metaserver", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    dfs::cli::init_tracing_metaserver();
    args.security.apply().map_err(anyhow::Error::msg)?;
    args.metrics.start().map_err(anyhow::Error::msg)?;
    for (flag, v) in [("--write-quorum", args.write_quorum), ("--read-quorum", args.read_quorum)] {
        if v == Some(0) {
            anyhow::bail!("{flag} 0: a quorum is at least 1");
        }
    }
    let quorum =
        dfs::shared::layout::Quorum { write: args.write_quorum.unwrap_or(0), read: args.read_quorum.unwrap_or(0) };
    if let Some(r) = args.replicas {
        quorum.validate(r)?;
    }
    let shape = dfs::metaserver::namespace::Shape { block_size: args.block_size, replicas: args.replicas, quorum };
    let lease = std::time::Duration::from_secs(args.session_lease);
    let Some(config) = &args.config else {
        let addr = dfs::shared::layout::parse_addr(&args.port)?;
        let dir = args.data_dir.unwrap_or_else(|| PathBuf::from("./dfs-data/meta"));
        return Ok(dfs::metaserver::run(&dir, shape, &addr, lease)?);
    };
    let group = dfs::metaserver::group::GroupConfig::load(config)?;
    let id: usize = args.port.parse().map_err(|_| anyhow::anyhow!("member id '{}' is not a number", args.port))?;
    group.member(id)?;
    let dir = args.data_dir.unwrap_or_else(|| PathBuf::from(format!("./dfs-data/meta{id}")));
    dfs::metaserver::run_member(&dir, shape, &group, id, lease).map_err(|e| match e {
        // The member's line names where it listens: another process has that address (member `id`
        // started twice?), or this machine does not.
        dfs::shared::start::StartError::Listen { addr, error } => anyhow::anyhow!(
            "member {id} of {}: cannot listen on {addr} ({error}): is member {id} running already, \
             or is its line for another machine?",
            config.display()
        ),
        e => e.into(),
    })
}
