//! `metaserver [--data-dir DIR] [--block-size BYTES] [--replicas R] <port>`

use std::path::PathBuf;

use clap::Parser;

/// The DFS metaserver: owns the directory tree and the cluster layout.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where the metadata store lives.
    #[arg(long, default_value = "./dfs-data/meta")]
    data_dir: PathBuf,
    /// Block size in bytes, fixed when the store is created (default 16384, chosen by measurement: README).
    #[arg(long)]
    block_size: Option<u32>,
    /// Replicas per block, fixed when the store is created (default 3).
    #[arg(long)]
    replicas: Option<u8>,
    /// Port to listen on (127.0.0.1), or HOST:PORT.
    port: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    dfs::cli::exit("metaserver", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    dfs::cli::init_tracing();
    let addr = dfs::shared::layout::parse_addr(&args.port).map_err(anyhow::Error::msg)?;
    Ok(dfs::metaserver::run(&args.data_dir, args.block_size, args.replicas, &addr)?)
}
