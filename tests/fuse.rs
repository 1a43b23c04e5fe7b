//! The FUSE client against real clusters. Needs /dev/fuse and root; skips, saying so,
//! where they are absent.

mod common;
#[path = "../src/bin/dfs-lab/normalize.rs"]
mod normalize;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn sh(dir: &Path, script: &str) -> String {
    let out = bounded(300, "bash").arg("-c").arg(script).current_dir(dir).output().expect("run bash");
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s += &String::from_utf8_lossy(&out.stderr);
    s
}

#[test]
fn report_script_gives_the_same_output_as_a_local_directory() {
    if !fuse_available("report_script") {
        return;
    }
    let cluster = TestCluster::start(4, 8, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let local = tempfile::tempdir().expect("tmp");
    let script =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/lab/workloads/report_script.sh")).expect("script");
    let ours = sh(&mnt.path, &script);
    let theirs = sh(local.path(), &script);
    let (ours, theirs) = (
        normalize::normalize(&ours, &mnt.path.display().to_string()),
        normalize::normalize(&theirs, &local.path().display().to_string()),
    );
    assert!(ours.contains("world how are you"), "{ours}");
    assert_eq!(ours, theirs, "mount (left) and local (right) differ");
}

/// One operation of the differential test, applied the same way to both roots.
#[derive(Debug)]
enum Op {
    Create(String),
    Write(String, u64, usize, u64),
    Truncate(String, u64),
    Rename(String, String),
    Link(String, String),
    Symlink(String, String),
    Mkdir(String),
    Rmdir(String),
    Unlink(String),
    Chmod(String, u32),
}

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let p = |s: &str| root.join(s);
    let r = match op {
        Op::Create(a) => OpenOptions::new().create(true).append(true).open(p(a)).map(|_| ()),
        Op::Write(a, off, len, seed) => (|| {
            let mut f = OpenOptions::new().write(true).open(p(a))?;
            f.seek(SeekFrom::Start(*off))?;
            f.write_all(&random_bytes(*seed, *len))
        })(),
        Op::Truncate(a, len) => OpenOptions::new().write(true).open(p(a)).and_then(|f| f.set_len(*len)),
        Op::Rename(a, b) => fs::rename(p(a), p(b)),
        Op::Link(a, b) => fs::hard_link(p(a), p(b)),
        Op::Symlink(t, b) => std::os::unix::fs::symlink(t, p(b)),
        Op::Mkdir(a) => fs::create_dir(p(a)),
        Op::Rmdir(a) => fs::remove_dir(p(a)),
        Op::Unlink(a) => fs::remove_file(p(a)),
        Op::Chmod(a, m) => fs::set_permissions(p(a), fs::Permissions::from_mode(*m)),
    };
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Everything observable of a tree: per path, kind, mode, link count, size, content or target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&rel)).expect("read_dir").flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = rel.join(e.file_name());
            let md = fs::symlink_metadata(root.join(&rel)).expect("lstat");
            let ft = md.file_type();
            let what = if ft.is_dir() {
                stack.push(rel.clone());
                format!("dir {:o} nlink {}", md.mode() & 0o7777, md.nlink())
            } else if ft.is_symlink() {
                format!("symlink -> {}", fs::read_link(root.join(&rel)).expect("readlink").display())
            } else {
                let data = fs::read(root.join(&rel)).expect("read");
                let sum: u64 = data.iter().enumerate().map(|(i, b)| (i as u64 + 1) * u64::from(*b)).sum();
                format!("file {:o} nlink {} size {} sum {sum}", md.mode() & 0o7777, md.nlink(), md.len())
            };
            out.insert(rel.display().to_string(), what);
        }
    }
    out
}

fn random_op(rng: &mut StdRng, local: &Path, bs: u64) -> Op {
    // Paths are drawn from a small pool so that operations collide often.
    let dirs: Vec<String> = {
        let mut d = vec![String::new()];
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for e in fs::read_dir(local.join(&rel)).expect("read_dir").flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let r = rel.join(e.file_name());
                    d.push(format!("{}/", r.display()));
                    stack.push(r);
                }
            }
        }
        d.sort();
        d
    };
    let path = |rng: &mut StdRng| {
        let d = &dirs[rng.random_range(0..dirs.len())];
        let names = ["a", "b", "c", "d", "e", "f"];
        format!("{d}{}", names[rng.random_range(0..names.len())])
    };
    let offset = |rng: &mut StdRng| match rng.random_range(0..3) {
        0 => rng.random_range(0..6) * bs + [0, 1, bs - 1][rng.random_range(0..3)],
        1 => rng.random_range(0..4 * bs),
        _ => 0,
    };
    match rng.random_range(0..100) {
        0..=14 => Op::Create(path(rng)),
        15..=39 => {
            let (a, off) = (path(rng), offset(rng));
            Op::Write(a, off, rng.random_range(1..(3 * bs as usize)), rng.random())
        }
        40..=47 => {
            let (a, off) = (path(rng), offset(rng));
            Op::Truncate(a, off)
        }
        48..=59 => Op::Rename(path(rng), path(rng)),
        60..=65 => Op::Link(path(rng), path(rng)),
        // Relative targets that cannot leave the tree from any depth ("../x" at the top would
        // reach outside each root, where the two sides differ).
        66..=69 => Op::Symlink(["a", "./b", "c/d"][rng.random_range(0..3)].to_string(), path(rng)),
        70..=79 => Op::Mkdir(path(rng)),
        80..=85 => Op::Rmdir(path(rng)),
        86..=93 => Op::Unlink(path(rng)),
        _ => Op::Chmod(path(rng), [0o644, 0o600, 0o755, 0o700, 0o4755][rng.random_range(0..5)]),
    }
}

#[test]
fn randomized_operations_match_a_local_directory() {
    if !fuse_available("randomized_operations") {
        return;
    }
    let seed: u64 = std::env::var("DFS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let ops: usize = std::env::var("DFS_DIFF_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    eprintln!("randomized differential test: DFS_SEED={seed} DFS_DIFF_OPS={ops}");
    let bs = 512;
    let cluster = TestCluster::start(4, bs as u32, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let local = tempfile::tempdir().expect("tmp");
    let mut rng = StdRng::seed_from_u64(seed);
    // How many of the last steps a failure shows (DFS_DIFF_HISTORY, default 15).
    let shown: usize = std::env::var("DFS_DIFF_HISTORY").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let mut history = Vec::new();
    for step in 0..ops {
        let op = random_op(&mut rng, local.path(), bs);
        let theirs = apply(local.path(), &op);
        let ours = apply(&mnt.path, &op);
        history.push(format!("{step}: {op:?} -> {theirs:?}"));
        assert_eq!(
            ours,
            theirs,
            "seed {seed}, step {step}: {op:?}\nlast steps:\n{}",
            history[history.len().saturating_sub(shown)..].join("\n")
        );
        if step % 25 == 24 || step + 1 == ops {
            let (a, b) = (snapshot(&mnt.path), snapshot(local.path()));
            assert_eq!(
                a,
                b,
                "seed {seed}, trees differ after step {step}\nlast steps:\n{}",
                history[history.len().saturating_sub(shown)..].join("\n")
            );
        }
    }
}

#[test]
fn killed_client_restarts_on_its_mount_point_and_fsynced_files_are_intact() {
    if !fuse_available("killed_client") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mp = cluster.dir.path().join("mnt");
    let mut mnt = Mount::start(&cluster, &mp, "fs1");
    let durable = Arc::new(Mutex::new(Vec::<usize>::new()));
    let (d2, root) = (durable.clone(), mp.clone());
    let writer = std::thread::spawn(move || {
        for i in 0..10_000usize {
            let r = (|| {
                let mut f = fs::File::create(root.join(format!("f{i}")))?;
                f.write_all(&random_bytes(i as u64, 100_000 + i))?;
                f.sync_all()
            })();
            if r.is_err() {
                return;
            }
            d2.lock().expect("lock").push(i);
        }
    });
    wait_until("5 fsync'd files", Duration::from_secs(60), || durable.lock().expect("lock").len() >= 5);
    mnt.kill9();
    writer.join().expect("writer");
    let done = durable.lock().expect("lock").clone();
    // Starting again on the same (now stale) mount point works.
    let mnt2 = Mount::start(&cluster, &mp, "fs2");
    for i in done {
        let got = fs::read(mnt2.path.join(format!("f{i}"))).expect("read back");
        assert!(got == random_bytes(i as u64, 100_000 + i), "file f{i} was fsync'd but differs");
    }
}

#[test]
fn file_of_256_mib_written_with_dd_reads_back_with_the_same_sha256() {
    if !fuse_available("256 MiB dd") {
        return;
    }
    let cluster = TestCluster::start(4, dfs::shared::layout::DEFAULT_BLOCK_SIZE, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let src = cluster.dir.path().join("src");
    fs::write(&src, random_bytes(256, 256 << 20)).expect("write source");
    let dst = mnt.path.join("big");
    let dd = bounded(600, "dd")
        .args([format!("if={}", src.display()), format!("of={}", dst.display()), "bs=1M".into(), "conv=fsync".into()])
        .output()
        .expect("dd");
    assert!(dd.status.success(), "{}", String::from_utf8_lossy(&dd.stderr));
    let sum = |p: &Path| {
        let out = bounded(300, "sha256sum").arg(p).output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
    };
    assert_eq!(fs::metadata(&dst).expect("stat").len(), 256 << 20);
    assert_eq!(sum(&dst), sum(&src));
}

/// Big sequential writes are flushed in the background while the writer goes on; writes that go
/// back into those blocks (before, during and after their flush) must win, and a reader on the
/// same mount must see every byte as last written.
#[test]
fn overwrites_of_blocks_being_flushed_in_the_background_win() {
    if !fuse_available("overwrite during background flush") {
        return;
    }
    let cluster = TestCluster::start(4, dfs::shared::layout::DEFAULT_BLOCK_SIZE, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let path = mnt.path.join("f");
    let mut model = random_bytes(7, 32 << 20);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
    let mut rng = StdRng::seed_from_u64(11);
    for (i, chunk) in model.clone().chunks(1 << 20).enumerate() {
        f.write_all(chunk).expect("sequential write");
        if i % 2 == 1 {
            // Go back into what was written so far (likely still in flight), at an unaligned spot.
            let len = rng.random_range(1..200_000);
            let off = rng.random_range(0..((i as u64 + 1) << 20) - len as u64) as usize;
            let patch = random_bytes(100 + i as u64, len);
            f.write_all_at(&patch, off as u64).expect("overwrite");
            model[off..off + len].copy_from_slice(&patch);
            f.seek(SeekFrom::Start(((i + 1) << 20) as u64)).expect("seek back to the end");
        }
    }
    let mut seen = vec![0u8; model.len()];
    f.read_exact_at(&mut seen, 0).expect("read back through the open file");
    assert!(seen == model, "read on the writing handle differs from what was written");
    drop(f);
    let back = fs::read(&path).expect("read back");
    assert_eq!(back.len(), model.len());
    let first_diff = back.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "file differs from what was written");
}

/// Unlinked files (a burst of them, reclaimed in batches, and one still open at unlink) lose their
/// blocks on every server and leave no orphan behind; files still linked keep theirs.
#[test]
fn deleted_files_blocks_are_reclaimed_and_orphans_purged() {
    if !fuse_available("reclaim") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let c = cluster.client();
    let blocks = || -> u64 { (0..4).map(|i| c.server_status(i).expect("rpc").expect("status").blocks).sum() };
    fs::write(mnt.path.join("keep"), random_bytes(1, 3 * 4096)).expect("write keep");
    let kept = blocks();
    assert_eq!(kept, 3 * 3, "three blocks, three replicas each");
    for i in 0..300 {
        fs::write(mnt.path.join(format!("f{i}")), random_bytes(i, 2 * 4096)).expect("write");
    }
    let open = fs::File::open(mnt.path.join("f0")).expect("open f0");
    let f0 = open.metadata().expect("stat f0").ino();
    for i in 0..300 {
        fs::remove_file(mnt.path.join(format!("f{i}"))).expect("unlink");
    }
    // Orphans are purged only after their blocks are gone everywhere: once f0 is the only one left,
    // the others' blocks are gone and f0 (still open) keeps its two blocks on three servers.
    wait_until("only the open file is left an orphan", Duration::from_secs(30), || {
        c.orphans().expect("orphans") == vec![f0]
    });
    assert_eq!(blocks(), kept + 2 * 3, "the open file's blocks stay until its last close");
    drop(open);
    wait_until("deleted files' blocks are gone", Duration::from_secs(30), || blocks() == kept);
    wait_until("no orphans left", Duration::from_secs(30), || c.orphans().expect("orphans").is_empty());
    assert_eq!(fs::read(mnt.path.join("keep")).expect("read keep"), random_bytes(1, 3 * 4096));
}

#[test]
fn write_blocked_on_a_down_server_does_not_freeze_the_mount() {
    if !fuse_available("blocked write") {
        return;
    }
    let mut cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    fs::write(mnt.path.join("other"), b"readable").expect("write other");
    cluster.kill(0);
    let target = mnt.path.join("blocked");
    let mut dd = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", target.display()), "bs=64k", "count=16", "conv=fsync"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dd");
    std::thread::sleep(Duration::from_secs(2));
    assert!(dd.try_wait().expect("dd status").is_none(), "the write returned while a replica was down");
    let ls = Command::new("timeout").args(["10", "ls", "-l"]).arg(&mnt.path).output().expect("ls");
    assert!(ls.status.success(), "ls froze while a write waited");
    assert_eq!(fs::read(mnt.path.join("other")).expect("read other"), b"readable");
    cluster.start_server(0);
    wait_until("dd to finish", Duration::from_secs(60), || dd.try_wait().ok().flatten().is_some());
    assert!(dd.wait().expect("dd").success());
    assert_eq!(fs::metadata(&target).expect("stat").len(), 16 * 65536);
}

/// A cluster (N = 4, 512-byte blocks, R = 3) with two mounts of it. Bind the three in this order:
/// the mounts then go (unmount) before the cluster.
fn two_mounts() -> (TestCluster, Mount, Mount) {
    let cluster = TestCluster::start(4, 512, 3);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    (cluster, a, b)
}

#[test]
fn two_mounts_see_each_others_closed_files() {
    if !fuse_available("two mounts") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"first\n").expect("write on a");
    assert_eq!(fs::read(b.path.join("f")).expect("read on b"), b"first\n");
    let mut f = OpenOptions::new().append(true).open(a.path.join("f")).expect("open on a");
    f.write_all(b"second line, longer\n").expect("append on a");
    drop(f);
    assert_eq!(fs::read(b.path.join("f")).expect("read on b"), b"first\nsecond line, longer\n");
    fs::write(b.path.join("f"), b"short").expect("rewrite on b");
    assert_eq!(fs::read(a.path.join("f")).expect("read on a"), b"short");
}

/// Statahead: once a run of lookups in a directory has fetched its listing, changes made through
/// the mount still show at once, and a file another mount creates is found (a name missing from
/// the listing is still looked up).
#[test]
fn lookups_answered_ahead_see_this_mounts_changes_and_other_mounts_new_files() {
    if !fuse_available("statahead") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    let dir = a.path.join("d");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..40 {
        fs::write(dir.join(format!("f{i}")), b"x").expect("create");
    }
    // The kernel's cached entries would answer these stats itself; dropping them sends each one
    // to the mount as a lookup.
    let forget_entries = || fs::write("/proc/sys/vm/drop_caches", "2").expect("drop dentries");
    forget_entries();
    for i in 0..40 {
        assert_eq!(fs::symlink_metadata(dir.join(format!("f{i}"))).expect("stat").len(), 1);
    }
    // Within the listing's lifetime (a second): a file created through the other mount is found,
    // then changes made through this one show.
    fs::write(b.path.join("d/new"), b"from b").expect("create on b");
    assert_eq!(fs::symlink_metadata(dir.join("new")).expect("stat new").len(), 6);
    OpenOptions::new().append(true).open(dir.join("f30")).and_then(|mut f| f.write_all(b"more")).expect("append");
    fs::set_permissions(dir.join("f31"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::remove_file(dir.join("f32")).expect("unlink");
    fs::rename(dir.join("f33"), dir.join("g33")).expect("rename");
    forget_entries();
    let gone = |name: &str| fs::symlink_metadata(dir.join(name)).map_err(|e| e.kind());
    assert_eq!(fs::symlink_metadata(dir.join("f30")).expect("stat f30").len(), 5);
    assert_eq!(fs::symlink_metadata(dir.join("f31")).expect("stat f31").mode() & 0o777, 0o600);
    assert_eq!(gone("f32").map(|_| ()), Err(std::io::ErrorKind::NotFound));
    assert_eq!(gone("f33").map(|_| ()), Err(std::io::ErrorKind::NotFound));
    assert_eq!(fs::symlink_metadata(dir.join("g33")).expect("stat g33").len(), 1);
}

/// Appends alternating between two mounts, each open, append, close: every append lands after
/// the other mount's, even when this mount's previous file state is still kept (its release after
/// the close comes later, on its own).
#[test]
fn appends_alternating_between_two_mounts_all_land() {
    if !fuse_available("alternating appends") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    let mut want = String::new();
    for i in 0..60 {
        for (m, tag) in [(&a, "a"), (&b, "b")] {
            let line = format!("{tag} {i}\n");
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(m.path.join("log"))
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .expect("append");
            want += &line;
        }
    }
    assert_eq!(fs::read_to_string(a.path.join("log")).expect("read"), want);
}
