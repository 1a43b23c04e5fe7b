//! `cargo bench`: striping throughput of the client engine against real clusters on loopback, the
//! micro-benchmarks under it, and aggregate throughput under a per-server bandwidth cap.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{random_bytes, TestCluster};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dfs::client::Cluster;
use dfs::dataserver::blockstore::BlockStore;
use dfs::shared::block::{checksum, Block, BlockKey};
use dfs::shared::layout::DEFAULT_BLOCK_SIZE;
use dfs::shared::{Kind, NewNode, ROOT};

const MIB: f64 = 1048576.0;

fn new_file(c: &Cluster, name: &str) -> u64 {
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    c.mknod(ROOT, name.as_bytes(), node).expect("create").ino
}

/// Writes `data` in 4 MiB calls, as `dfsctl put` does.
fn write_all(c: &Cluster, ino: u64, data: &[u8]) {
    for (i, piece) in data.chunks(4 << 20).enumerate() {
        c.write(ino, (i * (4 << 20)) as u64, piece.to_vec()).expect("write");
    }
}

fn read_all(c: &Cluster, ino: u64, size: usize) -> usize {
    let mut n = 0;
    while n < size {
        n += c.read_at(ino, n as u64, 4 << 20, size as u64).expect("read").len();
    }
    n
}

fn striping(cr: &mut Criterion) {
    for (bs, size) in [(DEFAULT_BLOCK_SIZE, 64 << 20), (8u32, 1 << 20)] {
        let mut g = cr.benchmark_group(format!("striping-bs{bs}"));
        g.throughput(Throughput::Bytes(size as u64)).sample_size(10).measurement_time(Duration::from_secs(10));
        let data = random_bytes(1, size);
        for n in [4usize, 6, 8] {
            let cluster = TestCluster::start(n, bs, 3);
            let c = cluster.client();
            let ino = new_file(&c, "f");
            g.bench_function(BenchmarkId::new("write", n), |b| b.iter(|| write_all(&c, ino, &data)));
            g.bench_function(BenchmarkId::new("read", n), |b| b.iter(|| read_all(&c, ino, size)));
        }
        g.finish();
    }
}

fn micro(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("micro");
    g.bench_function("placement", |b| {
        let mut x = 0u64;
        b.iter(|| {
            x += 1;
            dfs::shared::placement::replica_servers(x, x, 3, 8)
        })
    });
    let block = random_bytes(2, DEFAULT_BLOCK_SIZE as usize);
    g.throughput(Throughput::Bytes(block.len() as u64));
    g.bench_function("md5-default-block", |b| b.iter(|| checksum(&block)));
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = BlockStore::open(dir.path()).expect("store");
    let batch: Vec<Block> =
        (0..16).map(|i| Block::new(BlockKey { file_id: 7, index: i }, 1, 3, block.clone())).collect();
    g.throughput(Throughput::Bytes((16 * block.len()) as u64));
    g.bench_function("blockstore-put-16-default-blocks-durable", |b| {
        b.iter(|| store.put(&batch, false, None).expect("put"))
    });
    let keys: Vec<BlockKey> = batch.iter().map(|b| b.key).collect();
    g.bench_function("blockstore-get-16-default-blocks", |b| b.iter(|| store.get(&keys).expect("get")));
    g.finish();
}

/// Under a per-server cap, aggregate throughput should grow with N: ideally N x cap / R for writes
/// (every byte goes to R servers) and N x cap for reads (each byte from one).
fn bandwidth_cap(cr: &mut Criterion) {
    const CAP: u64 = 8 << 20;
    let size = 32 << 20;
    let data = random_bytes(3, size);
    let mut g = cr.benchmark_group("capped-8MiBps");
    g.throughput(Throughput::Bytes(size as u64)).sample_size(10).measurement_time(Duration::from_secs(20));
    let mut summary = Vec::new();
    for n in [4usize, 6, 8] {
        let cluster = TestCluster::start_with(n, DEFAULT_BLOCK_SIZE, 3, &["--max-bandwidth", &CAP.to_string()]);
        let c = cluster.client();
        let ino = new_file(&c, "f");
        write_all(&c, ino, &data);
        let t = Instant::now();
        write_all(&c, ino, &data);
        let w = size as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        read_all(&c, ino, size);
        let r = size as f64 / t.elapsed().as_secs_f64();
        let (iw, ir) = ((n as u64 * CAP / 3) as f64, (n as u64 * CAP) as f64);
        summary.push(format!(
            "N={n}: write {:.1} MiB/s ({:.2} of ideal {:.1}), read {:.1} MiB/s ({:.2} of ideal {:.1})",
            w / MIB,
            w / iw,
            iw / MIB,
            r / MIB,
            r / ir,
            ir / MIB
        ));
        g.bench_function(BenchmarkId::new("write", n), |b| b.iter(|| write_all(&c, ino, &data)));
        g.bench_function(BenchmarkId::new("read", n), |b| b.iter(|| read_all(&c, ino, size)));
    }
    g.finish();
    eprintln!("\nAggregate throughput under a cap of {} MiB/s per dataserver (R=3):", CAP >> 20);
    for l in summary {
        eprintln!("  {l}");
    }
}

criterion_group!(benches, striping, micro, bandwidth_cap);
criterion_main!(benches);
