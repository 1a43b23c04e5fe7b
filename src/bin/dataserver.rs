//! `dataserver [--data-dir DIR] <index> <port0> <port1> ... <portN-1>`

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;

/// A DFS dataserver: stores its share of the blocks; rebuilds it from its neighbours after a lost disk.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    security: dfs::cli::ServerSecurity,
    #[command(flatten)]
    metrics: dfs::cli::MetricsArg,
    /// Where the block store lives (default ./dfs-data/ds<index>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cap on the block bytes this server sends and receives, per second (the assignment's premise
    /// that each server's bandwidth is limited; used by the benchmarks).
    #[arg(long, value_name = "BYTES_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    max_bandwidth: Option<u64>,
    /// How fast the scrubber may read, in MiB/s (it verifies every block and compares versions
    /// with the peers).
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 4.0)]
    scrub_rate: f64,
    /// Seconds from the end of one scrub pass to the start of the next; 0: only on request
    /// (`dfsctl scrub`).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    scrub_every: u64,
    /// Seconds a rebuild keeps trying a peer that does not answer (down, stopped, cut off) before
    /// it finishes from the other holders; it goes on copying from that peer once it answers.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    rebuild_give_up: u64,
    /// For tests: keep hints without handing them over, so that a replica written while its
    /// server was down stays stale until a read or a scrub mends it.
    #[arg(long, hide = true)]
    debug_hold_hints: bool,
    /// Broken on purpose, for the lab's own tests: a new store is not rebuilt from the peers.
    #[arg(long, hide = true)]
    debug_skip_rebuild: bool,
    /// This server's position in the ring (0-based); it listens on the port at that position.
    index: usize,
    /// Every dataserver's port (127.0.0.1) or HOST:PORT, in ring order.
    #[arg(required = true)]
    ports: Vec<String>,
}

fn main() -> std::process::ExitCode {
    if let Some(code) = dfs::cli::generated_docs::<Args>("dataserver") {
        return code;
    }
    let args = Args::parse();
    dfs::cli::exit("dataserver", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    dfs::cli::init_tracing();
    args.security.apply().map_err(anyhow::Error::msg)?;
    args.metrics.start().map_err(anyhow::Error::msg)?;
    let ring = dfs::shared::layout::parse_ring(&args.ports).map_err(anyhow::Error::msg)?;
    if args.index >= ring.len() {
        bail!("index {} is outside the ring of {} dataservers (indexes start at 0)", args.index, ring.len());
    }
    let dir = args.data_dir.unwrap_or_else(|| PathBuf::from(format!("./dfs-data/ds{}", args.index)));
    if !(args.scrub_rate.is_finite() && args.scrub_rate > 0.0) {
        bail!("--scrub-rate {}: a rate in MiB/s above 0", args.scrub_rate);
    }
    let opts = dfs::dataserver::DataServerOptions {
        max_bandwidth: args.max_bandwidth,
        debug_skip_rebuild: args.debug_skip_rebuild,
        rebuild_give_up: std::time::Duration::from_secs(args.rebuild_give_up),
        scrub_rate: (args.scrub_rate * 1048576.0).max(1.0) as u64,
        scrub_every: (args.scrub_every > 0).then(|| std::time::Duration::from_secs(args.scrub_every)),
        hold_hints: args.debug_hold_hints,
    };
    Ok(dfs::dataserver::run(&dir, args.index, ring, opts)?)
}
