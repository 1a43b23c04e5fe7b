//! `dfs-lab bench`: the mount benchmark. The same table for a fresh DFS mount or, with `--target DIR`,
//! any directory (a local one gives the ceiling). Each figure is the median of several runs. Where
//! fio is installed, it measures the three I/O workloads too, as a second opinion from the standard
//! tool; where sqlite3 is, SQLite's transactions (an application's locks, writes and syncs).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};

use crate::cluster::LabCluster;
use crate::config::Profile;

const MIB: usize = 1 << 20;
const SEQ_MIB: usize = 256;
const SMALL_FILES: usize = 2000;
/// The workers of the small-file table's parallel rows.
const SMALL_WORKERS: usize = 8;
const TREE_DIRS: usize = 50;
const TREE_FILES: usize = 20;

/// Empties the kernel's page, dentry and inode caches, so the next access reaches the filesystem.
/// Pages a process has mapped stay: a DFS dataserver reads its store through a map, so what it
/// has served once stays in memory, and a cold read reads a file no read has touched.
fn drop_caches() -> bool {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

struct Metric {
    name: &'static str,
    unit: &'static str,
    /// Bigger is better (throughput) or smaller (seconds).
    higher_better: bool,
    values: Vec<f64>,
}

fn per_s(n: f64, t: Duration) -> f64 {
    n / t.as_secs_f64()
}

/// A 4096-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size; the memory is freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// CPU time the whole machine has spent busy so far (every process and the kernel, from
/// /proc/stat), in seconds. A benchmark runs one filesystem at a time, so what it adds over a
/// workload is that filesystem's cost (its client and servers together) and the workload's own.
fn machine_cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/stat") else { return f64::NAN };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return f64::NAN };
    // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy: f64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return f64::NAN;
    }
    busy / hz as f64
}

/// CPU seconds per GiB moved, given the machine's busy seconds before and after.
fn cpu_per_gib(before: f64, after: f64) -> f64 {
    (after - before) / (SEQ_MIB as f64 / 1024.0)
}

/// One run of every workload in `work`; `other` is `work` through a second mount, if any.
fn one_run(work: &Path, other: Option<&Path>, seed: u64, m: &mut [Metric]) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chunk = vec![0u8; MIB];
    rng.fill(&mut chunk[..]);
    let seq = work.join("seq.bin");

    // Sequential write: 1 MiB writes, then fsync.
    let cpu = machine_cpu_seconds();
    let t = Instant::now();
    write_through(&seq, &mut chunk, SEQ_MIB)?;
    m[0].values.push(per_s(SEQ_MIB as f64, t.elapsed()));
    m[10].values.push(cpu_per_gib(cpu, machine_cpu_seconds()));

    // Cold sequential read.
    drop_caches();
    let cpu = machine_cpu_seconds();
    let t = Instant::now();
    let n = read_through(&seq, &mut chunk)?;
    anyhow::ensure!(n == SEQ_MIB * MIB, "read {n} bytes of {}", SEQ_MIB * MIB);
    m[1].values.push(per_s(SEQ_MIB as f64, t.elapsed()));
    m[11].values.push(cpu_per_gib(cpu, machine_cpu_seconds()));

    // Random 4 KiB reads, direct I/O, queue depth 1, 10 s, of a file no read has touched yet
    // (see `drop_caches`).
    let random = work.join("random.bin");
    write_through(&random, &mut chunk, SEQ_MIB)?;
    drop_caches();
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&random).context("O_DIRECT open")?;
    let mut buf = Aligned::new(4096);
    let pages = (SEQ_MIB * MIB / 4096) as u64;
    let t = Instant::now();
    let mut ops = 0u64;
    while t.elapsed() < Duration::from_secs(10) {
        let off = rng.random_range(0..pages) * 4096;
        f.read_exact_at(buf.as_mut(), off)?;
        ops += 1;
    }
    m[2].values.push(per_s(ops as f64, t.elapsed()));
    drop(f);

    // Several files written and read at once, each by its own thread. Before the files above go,
    // so that these take new pages of a store rather than ones a read has mapped.
    let (w, r) = parallel_files(work, seed)?;
    m[12].values.push(w);
    m[13].values.push(r);
    fs::remove_file(&seq)?;
    fs::remove_file(&random)?;

    // Small files: create + write 4 KiB + close; stat cold; delete.
    let [creates, stats, deletes] = small_files(&work.join("small"), 1)?;
    m[3].values.push(creates);
    m[4].values.push(stats);
    m[5].values.push(deletes);
    // The same by 8 workers at once, each on its own share: concurrent changes can share a sync.
    let [creates, stats, deletes] = small_files(&work.join("small8"), SMALL_WORKERS)?;
    m[14].values.push(creates);
    m[15].values.push(stats);
    m[16].values.push(deletes);

    // A tree of 1000 files in 50 directories: ls -lR and a walk with lstat, both cold.
    let tree = work.join("tree");
    for d in 0..TREE_DIRS {
        let dir = tree.join(format!("d{d}"));
        fs::create_dir_all(&dir)?;
        for i in 0..TREE_FILES {
            fs::write(dir.join(format!("f{i}")), b"x")?;
        }
    }
    drop_caches();
    let t = Instant::now();
    let st = std::process::Command::new("ls").arg("-lR").arg(&tree).stdout(std::process::Stdio::null()).status()?;
    anyhow::ensure!(st.success(), "ls -lR failed");
    m[6].values.push(t.elapsed().as_secs_f64());
    drop_caches();
    let t = Instant::now();
    let mut seen = 0;
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            let md = fs::symlink_metadata(&p)?;
            seen += 1;
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    anyhow::ensure!(seen == TREE_DIRS * (TREE_FILES + 1), "walk saw {seen} entries");
    m[7].values.push(t.elapsed().as_secs_f64());
    fs::remove_dir_all(&tree)?;

    let other_side = other.map_or_else(|| work.join("lock"), |o| o.join("lock"));
    let (pairs, handover) = locks(&work.join("lock"), &other_side)?;
    m[8].values.push(pairs);
    m[9].values.push(handover);
    fs::remove_file(work.join("lock"))?;
    Ok(())
}

/// Writes `mib` MiB to a new file at `path`, `chunk` (1 MiB) at a time with its first byte the
/// MiB's number, then fsyncs.
fn write_through(path: &Path, chunk: &mut [u8], mib: usize) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for i in 0..mib {
        chunk[0] = i as u8;
        f.write_all(chunk)?;
    }
    Ok(f.sync_all()?)
}

/// Reads the file at `path` from start to end in `buf`-sized reads; how many bytes it held.
fn read_through(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = File::open(path)?;
    let mut n = 0;
    loop {
        match f.read(buf)? {
            0 => return Ok(n),
            k => n += k,
        }
    }
}

/// Runs `job` on each of `paths` at once, a thread each, and waits for all; the first error.
fn on_each_at_once(paths: &[PathBuf], job: impl Fn(usize, &Path) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let job = &job;
        let threads: Vec<_> = paths.iter().enumerate().map(|(i, p)| s.spawn(move || job(i, p))).collect();
        threads.into_iter().try_for_each(|t| t.join().map_err(|_| anyhow::anyhow!("a thread panicked"))?)
    })
}

/// Files written and read at once by [`parallel_files`], and the size of each.
const PARALLEL_FILES: usize = 4;
const PARALLEL_MIB: usize = 64;

/// Writes `PARALLEL_FILES` files of `PARALLEL_MIB` MiB at once (1 MiB writes and an fsync, a thread
/// each), then reads them back cold at once. (MiB/s written, MiB/s read), all files together, from
/// the first start to the last finish.
fn parallel_files(work: &Path, seed: u64) -> anyhow::Result<(f64, f64)> {
    let paths: Vec<PathBuf> = (0..PARALLEL_FILES).map(|i| work.join(format!("par{i}.bin"))).collect();
    let total = (PARALLEL_FILES * PARALLEL_MIB) as f64;
    let t = Instant::now();
    on_each_at_once(&paths, |i, p| {
        let mut chunk = vec![0u8; MIB];
        rand::rngs::StdRng::seed_from_u64(seed * 100 + i as u64).fill(&mut chunk[..]);
        write_through(p, &mut chunk, PARALLEL_MIB)
    })?;
    let written = per_s(total, t.elapsed());
    drop_caches();
    let t = Instant::now();
    on_each_at_once(&paths, |_, p| {
        let n = read_through(p, &mut vec![0u8; MIB])?;
        anyhow::ensure!(n == PARALLEL_MIB * MIB, "read {n} bytes of {}", p.display());
        Ok(())
    })?;
    let read = per_s(total, t.elapsed());
    for p in &paths {
        fs::remove_file(p)?;
    }
    Ok((written, read))
}

/// Uncontended flock lock+unlock pairs.
const LOCK_PAIRS: usize = 1000;
/// Lock hand-overs timed per run.
const HANDOVERS: usize = 50;

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor the File owns.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Uncontended lock+unlock pairs per second on `file`, and the median time from one holder's
/// unlock to a waiter's grant, the waiter's open file being `other` (the same file through another
/// mount, when there is one), in milliseconds.
fn locks(file: &Path, other: &Path) -> anyhow::Result<(f64, f64)> {
    File::create(file)?;
    let a = File::open(file)?;
    let t = Instant::now();
    for _ in 0..LOCK_PAIRS {
        flock(&a, libc::LOCK_EX)?;
        flock(&a, libc::LOCK_UN)?;
    }
    let pairs = per_s(LOCK_PAIRS as f64, t.elapsed());
    let mut handover = Vec::with_capacity(HANDOVERS);
    for _ in 0..HANDOVERS {
        flock(&a, libc::LOCK_EX)?;
        let b = File::open(other)?;
        let waiter = std::thread::spawn(move || -> std::io::Result<Instant> {
            flock(&b, libc::LOCK_EX)?;
            let got = Instant::now();
            flock(&b, libc::LOCK_UN)?;
            Ok(got)
        });
        // Long enough for the waiter's request to be queued (a metaserver round trip or two).
        std::thread::sleep(Duration::from_millis(30));
        let released = Instant::now();
        flock(&a, libc::LOCK_UN)?;
        let got = waiter.join().map_err(|_| anyhow::anyhow!("the waiter panicked"))??;
        handover.push(got.saturating_duration_since(released).as_secs_f64() * 1000.0);
    }
    Ok((pairs, median(&handover)))
}

/// Runs one fio job on `file` with `args` and returns its JSON report.
fn fio(file: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("fio")
        .args(["--name=dfs-lab", "--ioengine=psync", "--output-format=json"])
        .arg(format!("--filename={}", file.display()))
        .args(args)
        .output()
        .context("running fio")?;
    anyhow::ensure!(out.status.success(), "fio {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    parse_fio(&out.stdout)
}

/// fio's JSON report; fio may print notes before it.
fn parse_fio(stdout: &[u8]) -> anyhow::Result<serde_json::Value> {
    let start = stdout.iter().position(|&b| b == b'{').context("fio printed no JSON report")?;
    serde_json::from_slice(&stdout[start..]).context("parsing fio's JSON report")
}

/// One figure of the first job of a fio report: `side` is "read" or "write", `field` "bw" (KiB/s)
/// or "iops".
fn fio_figure(report: &serde_json::Value, side: &str, field: &str) -> anyhow::Result<f64> {
    report["jobs"][0][side][field].as_f64().with_context(|| format!("fio's report has no jobs[0].{side}.{field}"))
}

/// fio's version of the three I/O workloads of [`one_run`], into `m[0..3]`.
fn fio_run(work: &Path, m: &mut [Metric]) -> anyhow::Result<()> {
    let file = work.join("fio.bin");
    let size = format!("--size={SEQ_MIB}M");
    let r = fio(&file, &["--rw=write", "--bs=1M", &size, "--end_fsync=1"])?;
    m[0].values.push(fio_figure(&r, "write", "bw")? / 1024.0);
    drop_caches();
    let r = fio(&file, &["--rw=read", "--bs=1M", &size])?;
    m[1].values.push(fio_figure(&r, "read", "bw")? / 1024.0);
    drop_caches();
    // A file no read has touched: see `drop_caches`.
    let random = work.join("fio-random.bin");
    fio(&random, &["--rw=write", "--bs=1M", &size, "--end_fsync=1"])?;
    drop_caches();
    let r = fio(
        &random,
        &["--rw=randread", "--bs=4k", "--direct=1", "--iodepth=1", &size, "--runtime=10", "--time_based"],
    )?;
    m[2].values.push(fio_figure(&r, "read", "iops")?);
    fs::remove_file(&file)?;
    fs::remove_file(&random)?;
    Ok(())
}

/// Transactions in the sqlite3 rows.
const SQLITE_TX: usize = 500;

/// SQLite's transactions, as an application that keeps a database in the filesystem makes them:
/// each locks the file with `fcntl` (several times), writes, syncs and unlocks, in the rollback
/// journal's way (a journal file made, synced and deleted each time) and in the WAL's (appends
/// to a log, locks in its shared-memory file). One `sqlite3` process runs them all; the database
/// must then hold every row and pass SQLite's integrity check.
fn sqlite_run(work: &Path, m: &mut [Metric]) -> anyhow::Result<()> {
    for (i, mode) in ["delete", "wal"].into_iter().enumerate() {
        let db = work.join(format!("bench-{mode}.sqlite"));
        // The mode answers for itself: a WAL the filesystem could not give would otherwise be
        // timed as a rollback journal. (WAL stays the database's mode; a journal is the default.)
        let set = sqlite(&db, format!("PRAGMA journal_mode={mode};\nCREATE TABLE t (k INTEGER, v BLOB);\n"))?;
        anyhow::ensure!(set.trim() == mode, "sqlite3 on {} gave journal mode {set:?}, not {mode}", db.display());
        let script: String =
            (0..SQLITE_TX).map(|k| format!("BEGIN; INSERT INTO t VALUES ({k}, randomblob(100)); COMMIT;\n")).collect();
        let t = Instant::now();
        sqlite(&db, script)?;
        m[i].values.push(per_s(SQLITE_TX as f64, t.elapsed()));
        let check = sqlite(&db, "SELECT count(*) FROM t; PRAGMA integrity_check;\n".into())?;
        anyhow::ensure!(
            check.split_whitespace().collect::<Vec<_>>() == [SQLITE_TX.to_string().as_str(), "ok"],
            "the {mode} database after its transactions: {check}"
        );
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = fs::remove_file(format!("{}{suffix}", db.display()));
        }
    }
    Ok(())
}

/// Runs `script` through `sqlite3` on database `db`, stopping at its first error; its output. No
/// start-up file is read, and the output is SQLite's plain list, whatever the user's settings.
fn sqlite(db: &Path, script: String) -> anyhow::Result<String> {
    let mut child = std::process::Command::new("sqlite3")
        .args(["-batch", "-bail", "-init", "/dev/null", "-list", "-noheader"])
        .arg(db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting sqlite3")?;
    let mut stdin = child.stdin.take().context("sqlite3's input")?;
    // Written from a thread of its own while the output is read: neither pipe can fill up and
    // stop the other.
    let feed = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().context("sqlite3")?;
    let fed = feed.join().map_err(|_| anyhow::anyhow!("writing to sqlite3 panicked"))?;
    anyhow::ensure!(
        out.status.success() && out.stderr.is_empty(),
        "sqlite3 on {} failed ({}): {}",
        db.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    fed.context("writing to sqlite3")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sqlite_installed() -> bool {
    std::process::Command::new("sqlite3").arg("-version").output().is_ok_and(|o| o.status.success())
}

fn fio_installed() -> bool {
    std::process::Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// Shell commands that start and stop the filesystem `bench --compare` measures DFS against.
pub struct PeerCommands {
    /// Run before each of its turns; returns once its mount is ready.
    pub start: Option<String>,
    /// Run after each of its turns; leaves none of its processes running.
    pub stop: Option<String>,
}

/// How long a peer's start or stop command may take.
const PEER_COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs `cmd` with `sh -c`, its output in `log`; an error unless it exits 0 within
/// [`PEER_COMMAND_LIMIT`].
fn run_shell(cmd: &str, what: &str, log: &Path) -> anyhow::Result<()> {
    let mut c = std::process::Command::new("sh");
    c.arg("-c").arg(cmd);
    let (status, _) = crate::procs::run_to_end(c, what, log, PEER_COMMAND_LIMIT)?;
    anyhow::ensure!(
        status.success(),
        "{what} `{cmd}` failed ({status}); its output:\n{}",
        crate::procs::log_tail(log, 15)
    );
    Ok(())
}

/// The I/O and metadata table on `target` (a directory) or on a fresh DFS cluster for each run;
/// with `compare`, on those and that directory in alternate runs, side by side. A DFS cluster
/// runs only during its own turns, and with `peer` commands the compared filesystem only during
/// its own: idle, a filesystem's processes still wake up and take CPU from the one measured
/// (MooseFS's four idle chunkservers used 7% of a core here and cost DFS's random reads 15-20%).
pub fn bench(
    profile: &Profile,
    bin: &Path,
    (target, compare): (Option<PathBuf>, Option<PathBuf>),
    peer: &PeerCommands,
    runs: usize,
    block_size: Option<u32>,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(p) = plot {
        // Refused before the runs, not after them.
        File::create(p).with_context(|| format!("the plot file {}", p.display()))?;
    }
    let tmp = tempfile::Builder::new().prefix("dfs-lab-bench-").tempdir()?;
    let bs = block_size.unwrap_or(profile.default_block_size);
    let what = match &target {
        Some(t) => format!("directory {}", t.display()),
        None => format!(
            "a fresh {} cluster for each run (N=4, R={}, block size {bs}, mounted twice)",
            profile.name, profile.default_replicas
        ),
    };
    let work_name = format!("dfs-lab-bench-{}", std::process::id());
    let cold = drop_caches();
    let against = compare.as_ref().map_or(String::new(), |d| {
        let alone = if peer.start.is_some() { ", each started for its own runs" } else { "" };
        format!(" against {} in alternate runs{alone}", d.display())
    });
    dfs::outln!(
        "dfs-lab bench on {what}{against}: median of {runs} run(s){}",
        if cold { "" } else { " (cannot drop caches: not root; reads are warm)" }
    );
    let metric = |name, unit, higher_better| Metric { name, unit, higher_better, values: Vec::new() };
    let mut m = vec![
        metric("sequential write 256 MiB, 1 MiB writes + fsync", "MiB/s", true),
        metric("sequential read, cold", "MiB/s", true),
        metric("random 4 KiB reads, O_DIRECT, QD1, 10 s", "IOPS", true),
        metric("create+write 4 KiB+close, 2000 files", "files/s", true),
        metric("stat, cold, 2000 files", "files/s", true),
        metric("delete, 2000 files", "files/s", true),
        metric("ls -lR, 1000 files in 50 dirs, cold", "s", false),
        metric("walk with lstat, 1000 files in 50 dirs, cold", "s", false),
        metric("flock lock+unlock, uncontended, 1000 pairs", "pairs/s", true),
        metric(
            if target.is_none() {
                "flock hand-over to a waiter on another mount"
            } else {
                "flock hand-over to a waiter (same directory)"
            },
            "ms",
            false,
        ),
        metric("CPU per GiB written (whole machine, /proc/stat)", "CPU s", false),
        metric("CPU per GiB read, cold (whole machine)", "CPU s", false),
        metric("4 files at once, 64 MiB each: write + fsync, total", "MiB/s", true),
        metric("4 files at once: read cold, total", "MiB/s", true),
        metric("create+write 4 KiB+close, 8 workers, a dir each", "files/s", true),
        metric("stat, cold, 8 workers, a dir each", "files/s", true),
        metric("delete, 8 workers, a dir each", "files/s", true),
    ];
    let fio_rows = m.len();
    let with_fio = fio_installed();
    if with_fio {
        m.push(metric("fio: sequential write 256 MiB, 1 MiB, end fsync", "MiB/s", true));
        m.push(metric("fio: sequential read, cold", "MiB/s", true));
        m.push(metric("fio: random 4 KiB reads, direct, QD1, 10 s", "IOPS", true));
    } else {
        dfs::outln!("(fio is not installed: its rows are left out)");
    }
    let sqlite_rows = m.len();
    let with_sqlite = sqlite_installed();
    if with_sqlite {
        m.push(metric("SQLite: 500 one-insert transactions, journal", "tx/s", true));
        m.push(metric("SQLite: 500 one-insert transactions, WAL", "tx/s", true));
    } else {
        dfs::outln!("(sqlite3 is not installed: its rows are left out)");
    }
    // The peer's figures: the same workloads, the lock hand-over within one mount of it.
    let mut pm: Vec<Metric> = m.iter().map(|x| Metric { values: Vec::new(), ..*x }).collect();
    // One run of the table in a new directory `work` (and `other`, the same through a second
    // mount), which is removed afterwards.
    let table = |work: &Path, other: Option<&Path>, run: usize, m: &mut [Metric]| -> anyhow::Result<()> {
        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let r = one_run(work, other, run as u64, m)
            .and_then(|()| if with_fio { fio_run(work, &mut m[fio_rows..sqlite_rows]) } else { Ok(()) })
            .and_then(|()| if with_sqlite { sqlite_run(work, &mut m[sqlite_rows..]) } else { Ok(()) });
        let _ = fs::remove_dir_all(work);
        r
    };
    let dfs_turn = |run: usize, m: &mut [Metric]| -> anyhow::Result<()> {
        if let Some(t) = &target {
            return table(&t.join(&work_name), None, run, m);
        }
        let dir = tmp.path().join(format!("run{run}"));
        fs::create_dir(&dir)?;
        let mut c =
            LabCluster::start(profile, bin, &dir, (4, profile.metaservers), bs, (profile.default_replicas, None))?;
        // A second mount, for the lock hand-over between mounts.
        let r = c.mount_other().and_then(|()| {
            let other = c.other_mountpoint().join(&work_name);
            table(&c.mountpoint().join(&work_name), Some(&other), run, m)
        });
        drop(c); // shuts the cluster down, before its directory goes
        let _ = fs::remove_dir_all(&dir);
        r
    };
    let peer_turn = |dir: &Path, run: usize, m: &mut [Metric]| -> anyhow::Result<()> {
        if let Some(cmd) = &peer.start {
            run_shell(cmd, "the compared filesystem's start command", &tmp.path().join("peer-start.log"))?;
        }
        let r = table(&dir.join(&work_name), None, run, m);
        let stopped = match &peer.stop {
            Some(cmd) => run_shell(cmd, "the compared filesystem's stop command", &tmp.path().join("peer-stop.log")),
            None => Ok(()),
        };
        r.and(stopped)
    };
    for run in 0..runs {
        // Which goes first alternates, so that neither always runs on a machine the other just
        // warmed or tired.
        let order = if run % 2 == 0 { [false, true] } else { [true, false] };
        for is_peer in order {
            match (is_peer, &compare) {
                (false, _) => {
                    eprintln!("run {}/{runs}...", run + 1);
                    dfs_turn(run, &mut m)?;
                }
                (true, Some(dir)) => {
                    eprintln!("run {}/{runs} (the other)...", run + 1);
                    peer_turn(dir, run, &mut pm)?;
                }
                (true, None) => {}
            }
        }
    }
    if let Some(p) = plot {
        let rows: Vec<crate::plot::Row> = m
            .iter()
            .zip(&pm)
            .map(|(x, y)| crate::plot::Row {
                name: x.name,
                unit: x.unit,
                higher_better: x.higher_better,
                dfs: median(&x.values),
                other: compare.is_some().then(|| median(&y.values)),
                full: None,
            })
            .collect();
        let other = compare.as_ref().map_or(String::new(), |d| d.display().to_string());
        let title = format!("dfs-lab bench: {what}, medians of {runs} run(s)");
        let svg = crate::plot::svg(&title, &other, &rows, "how many times better DFS did; above 1 is better");
        fs::write(p, svg).with_context(|| format!("writing {}", p.display()))?;
        dfs::outln!("plot: {}", p.display());
    }
    if compare.is_some() {
        dfs::outln!("{:<50} {:>10} {:>10} {:>7}  unit", "workload", "DFS", "other", "ratio");
        for (x, y) in m.iter().zip(&pm) {
            let (a, b) = (median(&x.values), median(&y.values));
            // Above 1: DFS is better, whichever way the unit runs.
            let ratio = if x.higher_better { a / b } else { b / a };
            dfs::outln!("{:<50} {a:>10.2} {b:>10.2} {ratio:>7.2}  {}", x.name, x.unit);
        }
        dfs::outln!("(ratio: how many times better DFS did, medians; above 1 is better)");
        return Ok(());
    }
    dfs::outln!("{:<50} {:>12}  unit (all runs)", "workload", "median");
    for x in &m {
        let all: Vec<String> = x.values.iter().map(|v| format!("{v:.2}")).collect();
        let better = if x.higher_better { "higher is better" } else { "lower is better" };
        dfs::outln!("{:<50} {:>12.2}  {} ({}; {better})", x.name, median(&x.values), x.unit, all.join(", "));
    }
    Ok(())
}

/// Creates (4 KiB written), cold stats and deletes of `SMALL_FILES` files in `dir`, by `workers`
/// threads each on its own share in a directory of its own; returns (creates/s, stats/s,
/// deletes/s). A directory each, because the kernel serializes creates and unlinks within one
/// directory whatever the filesystem (it locks the directory), so workers sharing one would
/// measure that lock rather than how the filesystem serves changes at once.
fn small_files(dir: &Path, workers: usize) -> anyhow::Result<[f64; 3]> {
    let each = SMALL_FILES / workers;
    let dirs: Vec<PathBuf> = (0..workers).map(|w| dir.join(format!("w{w}"))).collect();
    for d in &dirs {
        fs::create_dir_all(d)?;
    }
    let names: Vec<Vec<PathBuf>> = dirs.iter().map(|d| (0..each).map(|i| d.join(format!("f{i}"))).collect()).collect();
    let phase = |op: &(dyn Fn(&Path) -> std::io::Result<()> + Sync)| -> anyhow::Result<f64> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let all: Vec<_> = names.iter().map(|share| s.spawn(move || share.iter().try_for_each(|p| op(p)))).collect();
            all.into_iter().try_for_each(|h| {
                h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?.map_err(anyhow::Error::from)
            })
        })?;
        Ok(per_s((each * workers) as f64, t.elapsed()))
    };
    let creates = phase(&|p| fs::write(p, [b's'; 4096]))?;
    drop_caches();
    let stats = phase(&|p| fs::symlink_metadata(p).map(|_| ()))?;
    let deletes = phase(&|p| fs::remove_file(p))?;
    for d in &dirs {
        fs::remove_dir(d)?;
    }
    fs::remove_dir(dir)?;
    Ok([creates, stats, deletes])
}

/// `dfs-lab bench --metadata`: small-file creates, stats and deletes on a fresh cluster with one
/// metaserver and on one with a group of three (the profile's group_metaserver), alternately,
/// `runs` pairs; one worker and eight. Prints medians and the group's ratio to the single one.
pub fn bench_metadata(profile: &Profile, bin: &Path, runs: usize, block_size: Option<u32>) -> anyhow::Result<()> {
    anyhow::ensure!(
        profile.metaservers == 1 && profile.group_metaserver.is_some(),
        "the profile runs one metaserver and names a group_metaserver (as lab/targets/dfs.toml does)"
    );
    let bs = block_size.unwrap_or(profile.default_block_size);
    dfs::outln!(
        "dfs-lab bench --metadata: {} (N=4, R={}, block size {bs}), one metaserver against a group of three, \
         alternately, median of {runs} pair(s)",
        profile.name,
        profile.default_replicas
    );
    // [single, group][workload][run]
    let mut v = vec![vec![Vec::new(); 6]; 2];
    for run in 0..runs {
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            eprintln!("run {}/{runs}: {}...", run + 1, ["one metaserver", "a group of three"][which]);
            let tmp = tempfile::Builder::new().prefix("dfs-lab-bench-").tempdir()?;
            let shape = (4, [1, 3][which]);
            let mut c = LabCluster::start(profile, bin, tmp.path(), shape, bs, (profile.default_replicas, None))?;
            let work = c.mountpoint().join("bench");
            let r = small_files(&work, 1).and_then(|a| Ok((a, small_files(&work, SMALL_WORKERS)?)));
            c.shutdown();
            let (one, eight) = r?;
            for (k, x) in one.iter().chain(eight.iter()).enumerate() {
                v[which][k].push(*x);
            }
        }
    }
    let names = ["creates (4 KiB each)", "stats, cold", "deletes"];
    dfs::outln!("{:<34} {:>14} {:>16} {:>8}", "workload, files/s", "one metaserver", "group of three", "ratio");
    for k in 0..6 {
        let (one, group) = (median(&v[0][k]), median(&v[1][k]));
        let name = format!(
            "{}, {} worker{}",
            names[k % 3],
            if k < 3 { 1 } else { SMALL_WORKERS },
            if k < 3 { "" } else { "s" }
        );
        dfs::outln!("{name:<34} {one:>14.0} {group:>16.0} {:>7.2}x", group / one);
    }
    Ok(())
}

/// The bandwidth cap on one dataserver in `bench --quorum`, bytes per second.
const SLOW_SERVER: u64 = 16 << 20;
/// The file `bench --quorum` writes and reads.
const QUORUM_FILE: usize = 64 << 20;

/// Writes `bytes` (a multiple of 4 MiB) to `path` in 4 MiB calls and fsyncs, then reads it back
/// cold. How long each took.
fn write_then_read(path: &Path, bytes: usize) -> anyhow::Result<(Duration, Duration)> {
    let chunk: Vec<u8> = (0..4 << 20).map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let t = Instant::now();
    let mut f = File::create(path)?;
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    drop(f);
    let w = t.elapsed();
    drop_caches();
    let t = Instant::now();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k;
    }
    anyhow::ensure!(n == bytes, "read back {n} bytes of {bytes}");
    Ok((w, t.elapsed()))
}

/// `bytes` moved in `t`, in MB/s.
fn mb_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

/// The profile's dataserver command with `extra` flags for every server, and `slow` flags for
/// server 0 only.
fn with_server_flags(profile: &Profile, extra: &str, slow: &str) -> anyhow::Result<Profile> {
    let ds = profile.dataserver.as_ref().ok_or_else(|| anyhow::anyhow!("the profile has no dataserver command"))?;
    let run = ds.full().run;
    let (prog, rest) = run.split_once(' ').ok_or_else(|| anyhow::anyhow!("cannot split {run}"))?;
    let all = format!("exec {prog} {extra} {rest}");
    let zero = format!("exec {prog} {extra} {slow} {rest}");
    let line = format!("if [ {{index}} = 0 ]; then {zero}; else {all}; fi");
    let mut p = profile.clone();
    p.dataserver = Some(crate::config::TargetCommand::Full(crate::config::FullCommand {
        run: line,
        cwd: None,
        env: Default::default(),
        shell: true,
    }));
    Ok(p)
}

/// On a fresh cluster of `n` dataservers: `before` on the mount, then a file of `bytes` written
/// and read (see [`write_then_read`]).
fn on_fresh_cluster(
    profile: &Profile,
    bin: &Path,
    n: usize,
    bs: u32,
    shape: (u8, Option<(u8, u8)>),
    bytes: usize,
    before: impl Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<(Duration, Duration)> {
    let tmp = tempfile::Builder::new().prefix("dfs-lab-bench-").tempdir()?;
    let mut c = LabCluster::start(profile, bin, tmp.path(), (n, 1), bs, shape)?;
    let res = before(c.mountpoint()).and_then(|()| write_then_read(&c.mountpoint().join("bench"), bytes));
    c.shutdown();
    res
}

/// Runs `cases` (name, profile, write quorum) alternately, `runs` rounds, each on a fresh cluster
/// (N=4, R = the profile's): `before` on the mount first, then a 64 MiB file written (fsync) and
/// read cold. Prints the medians; returns them, [case][write, read].
fn write_read_cases(
    profile: &Profile,
    bin: &Path,
    runs: usize,
    bs: u32,
    cases: &[(&str, &Profile, u8)],
    before: impl Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<[f64; 2]>> {
    let r = profile.default_replicas;
    // [case][write, read][run]
    let mut v = vec![vec![Vec::new(); 2]; cases.len()];
    for run in 0..runs {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let (name, p, w) = cases[k];
            eprintln!("run {}/{runs}: {name}...", run + 1);
            let quorums = profile.quorums.then_some((w, 1));
            let (wr, rd) = on_fresh_cluster(p, bin, 4, bs, (r, quorums), QUORUM_FILE, &before)?;
            v[k][0].push(mb_per_s(QUORUM_FILE, wr));
            v[k][1].push(mb_per_s(QUORUM_FILE, rd));
        }
    }
    dfs::outln!("{:<30} {:>12} {:>12}", "case", "write MB/s", "read MB/s");
    let mut out = Vec::new();
    for (k, (name, _, _)) in cases.iter().enumerate() {
        let m = [median(&v[k][0]), median(&v[k][1])];
        dfs::outln!("{name:<30} {:>12.1} {:>12.1}", m[0], m[1]);
        out.push(m);
    }
    Ok(out)
}

/// `dfs-lab bench --quorum`: sequential write (fsynced) and cold read of a 64 MiB file, N=4, R=3,
/// with dataserver 0 capped at 16 MiB/s, write quorum 3 against 2. Alternately, `runs` pairs;
/// medians.
pub fn bench_quorum(profile: &Profile, bin: &Path, runs: usize, block_size: Option<u32>) -> anyhow::Result<()> {
    anyhow::ensure!(profile.quorums, "the profile must take quorums (quorums = true, as lab/targets/dfs.toml)");
    let bs = block_size.unwrap_or(profile.default_block_size);
    let r = profile.default_replicas;
    dfs::outln!(
        "dfs-lab bench --quorum: {} (N=4, R={r}, block size {bs}), dataserver 0 capped at {} MiB/s, a {} MiB \
         file written (fsync) and read cold, alternately, median of {runs} pair(s)",
        profile.name,
        SLOW_SERVER >> 20,
        QUORUM_FILE >> 20
    );
    let capped = with_server_flags(profile, "--scrub-every 0", &format!("--max-bandwidth {SLOW_SERVER}"))?;
    let cases = [("W = 3", &capped, r), ("W = 2", &capped, r.saturating_sub(1).max(1))];
    let m = write_read_cases(profile, bin, runs, bs, &cases, |_| Ok(()))?;
    dfs::outln!("W = 2 / W = 3: write {:.2}x, read {:.2}x", m[1][0] / m[0][0], m[1][1] / m[0][1]);
    Ok(())
}

/// `dfs-lab bench --scrub`: the same write and cold read with every scrubber passing back to back
/// at its default rate against scrubbers off; both clusters first hold another 64 MiB file, so
/// that the scrubbers have something to read. Alternately, `runs` pairs; medians.
pub fn bench_scrub(profile: &Profile, bin: &Path, runs: usize, block_size: Option<u32>) -> anyhow::Result<()> {
    let bs = block_size.unwrap_or(profile.default_block_size);
    dfs::outln!(
        "dfs-lab bench --scrub: {} (N=4, R={}, block size {bs}), a {} MiB file written (fsync) and read cold \
         beside another as big, alternately, median of {runs} pair(s)",
        profile.name,
        profile.default_replicas,
        QUORUM_FILE >> 20
    );
    let quiet = with_server_flags(profile, "--scrub-every 0", "")?;
    let scrubbing = with_server_flags(profile, "--scrub-every 1", "")?;
    let r = profile.default_replicas;
    let cases = [("scrubbers off", &quiet, r), ("scrubbers on (default rate)", &scrubbing, r)];
    let m = write_read_cases(profile, bin, runs, bs, &cases, |mnt| {
        write_then_read(&mnt.join("old"), QUORUM_FILE).map(|_| ())
    })?;
    dfs::outln!("scrubbing / not: write {:.2}x, read {:.2}x", m[1][0] / m[0][0], m[1][1] / m[0][1]);
    Ok(())
}

/// The bandwidth cap on every dataserver in `bench --striping`, bytes per second.
const STRIPE_CAP: u64 = 8 << 20;
/// The file `bench --striping` writes and reads.
const STRIPE_FILE: usize = 64 << 20;
/// The cluster sizes `bench --striping` measures.
const STRIPE_SERVERS: [usize; 3] = [4, 6, 8];

/// `dfs-lab bench --striping`: every dataserver capped at `STRIPE_CAP`, a `STRIPE_FILE` file
/// written (fsync) and read cold through the mount, for N = 4, 6 and 8 in turn, `runs` rounds on
/// fresh clusters. Prints the medians against the ideal: a write sends R copies of each byte over
/// N links (N x cap / R), a read one copy (N x cap). With `plot`, draws them beside the ideal.
pub fn bench_striping(
    profile: &Profile,
    bin: &Path,
    runs: usize,
    block_size: Option<u32>,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    let bs = block_size.unwrap_or(profile.default_block_size);
    let r = profile.default_replicas;
    let cap = STRIPE_CAP as f64 / MIB as f64;
    let what = format!(
        "{} (R={r}, block size {bs}), every dataserver capped at {cap} MiB/s, a {} MiB file written (fsync) and \
         read cold, median of {runs} run(s)",
        profile.name,
        STRIPE_FILE >> 20
    );
    dfs::outln!("dfs-lab bench --striping: {what}");
    let capped = with_server_flags(profile, &format!("--scrub-every 0 --max-bandwidth {STRIPE_CAP}"), "")?;
    // [n][write, read][run], MiB/s
    let mut v = vec![[Vec::new(), Vec::new()]; STRIPE_SERVERS.len()];
    let mib = STRIPE_FILE as f64 / MIB as f64;
    for run in 0..runs {
        for (k, &n) in STRIPE_SERVERS.iter().enumerate() {
            eprintln!("run {}/{runs}: N = {n}...", run + 1);
            let quorums = profile.quorums.then_some((r, 1));
            let (w, rd) = on_fresh_cluster(&capped, bin, n, bs, (r, quorums), STRIPE_FILE, |_| Ok(()))?;
            v[k][0].push(mib / w.as_secs_f64());
            v[k][1].push(mib / rd.as_secs_f64());
        }
    }
    // [n][write, read]
    let measured: Vec<[f64; 2]> = v.iter().map(|[w, rd]| [median(w), median(rd)]).collect();
    let ideal: Vec<[f64; 2]> =
        STRIPE_SERVERS.iter().map(|&n| [n as f64 * cap / f64::from(r.max(1)), n as f64 * cap]).collect();
    dfs::outln!(
        "{:>3} {:>12} {:>8} {:>9} {:>12} {:>8} {:>9}",
        "N",
        "write MiB/s",
        "ideal",
        "of ideal",
        "read MiB/s",
        "ideal",
        "of ideal"
    );
    for (k, n) in STRIPE_SERVERS.iter().enumerate() {
        let ([mw, mr], [iw, ir]) = (measured[k], ideal[k]);
        dfs::outln!("{n:>3} {mw:>12.1} {iw:>8.1} {:>9.2} {mr:>12.1} {ir:>8.1} {:>9.2}", mw / iw, mr / ir);
    }
    if let Some(p) = plot {
        // Writes first, then reads, each growing with N and drawn to one scale (the largest
        // figure of its side), so that the bars show the scaling.
        let names: Vec<String> =
            ["write", "read"].iter().flat_map(|side| STRIPE_SERVERS.map(|n| format!("{side}, N = {n}"))).collect();
        let mut rows = Vec::new();
        for side in 0..2 {
            let full = (0..STRIPE_SERVERS.len()).map(|k| measured[k][side].max(ideal[k][side])).fold(0.0, f64::max);
            for k in 0..STRIPE_SERVERS.len() {
                rows.push(crate::plot::Row {
                    name: &names[side * STRIPE_SERVERS.len() + k],
                    unit: "MiB/s",
                    higher_better: true,
                    dfs: measured[k][side],
                    other: Some(ideal[k][side]),
                    full: Some(full),
                });
            }
        }
        let title =
            format!("dfs-lab bench --striping: every dataserver capped at {cap} MiB/s, R = {r}, medians of {runs}");
        let svg = crate::plot::svg(
            &title,
            "ideal: N x cap / R (writes), N x cap (reads)",
            &rows,
            "the share of the ideal reached; 1 is the ideal",
        );
        fs::write(p, svg).with_context(|| format!("writing {}", p.display()))?;
        dfs::outln!("plot: {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_figures_are_read_from_its_report_after_any_notes() {
        let out = br#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version": "fio-3.33", "jobs": [{"jobname": "dfs-lab", "read": {"bw": 524288, "iops": 6417.5}, "write": {"bw": 0}}]}"#;
        let r = parse_fio(out).expect("parse");
        assert_eq!(fio_figure(&r, "read", "bw").expect("bw") / 1024.0, 512.0);
        assert_eq!(fio_figure(&r, "read", "iops").expect("iops"), 6417.5);
        assert!(fio_figure(&r, "write", "iops").is_err(), "a missing figure is an error, not zero");
        assert!(parse_fio(b"fio: no JSON here").is_err());
    }

    /// The SQLite rows time every transaction, leave no database behind, and fail on a database
    /// that does not hold what was written (or a sqlite3 that fails).
    #[test]
    fn the_sqlite_rows_count_transactions_and_check_the_database() {
        if !sqlite_installed() {
            eprintln!("skipped: sqlite3 is not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let metric = |name| Metric { name, unit: "tx/s", higher_better: true, values: Vec::new() };
        let mut m = [metric("journal"), metric("wal")];
        sqlite_run(dir.path(), &mut m).expect("the SQLite rows");
        assert!(m.iter().all(|x| x.values.len() == 1 && x.values[0] > 0.0), "one figure each");
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 0, "the databases are removed");

        let db = dir.path().join("t.sqlite");
        sqlite(&db, "CREATE TABLE t (k INTEGER);\n".into()).expect("a table");
        let e = sqlite(&db, "INSERT INTO nowhere VALUES (1);\n".into()).expect_err("a failing statement");
        assert!(format!("{e:#}").contains("nowhere"), "{e:#}");
    }

    #[test]
    fn a_peer_command_that_fails_is_an_error_with_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("cmd.log");
        run_shell("echo starting; test -d /", "the start command", &log).expect("a command exiting 0 passes");
        let e = run_shell("echo no mount here; exit 3", "the start command", &log).expect_err("exit 3 is an error");
        let e = format!("{e:#}");
        assert!(e.contains("exit status: 3") && e.contains("no mount here"), "{e}");
    }
}
