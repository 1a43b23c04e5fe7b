//! `dataserver [--data-dir DIR] <index> <port0> <port1> ... <portN-1>`

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;

/// A DFS dataserver: stores its share of the blocks; rebuilds it from its neighbours after a lost disk.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where the block store lives (default ./dfs-data/ds<index>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cap on the block bytes this server sends and receives, per second (the assignment's premise
    /// that each server's bandwidth is limited; used by the benchmarks).
    #[arg(long, value_name = "BYTES_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    max_bandwidth: Option<u64>,
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
    let args = Args::parse();
    dfs::cli::exit("dataserver", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    dfs::cli::init_tracing();
    let ring = dfs::shared::layout::parse_ring(&args.ports).map_err(anyhow::Error::msg)?;
    if args.index >= ring.len() {
        bail!("index {} is outside the ring of {} dataservers (indexes start at 0)", args.index, ring.len());
    }
    let dir = args.data_dir.unwrap_or_else(|| PathBuf::from(format!("./dfs-data/ds{}", args.index)));
    let opts = dfs::dataserver::DataServerOptions {
        max_bandwidth: args.max_bandwidth,
        debug_skip_rebuild: args.debug_skip_rebuild,
    };
    Ok(dfs::dataserver::run(&dir, args.index, ring, opts)?)
}
