//! The FUSE client against real clusters. Needs /dev/fuse and root; skips, saying so,
//! where they are absent.

mod common;
#[path = "../src/bin/dfs-lab/normalize.rs"]
mod normalize;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
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
        let got = fs::read(mnt2.path.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("reading back f{i}, fsync'd before the kill: {e}\n{}", cluster.logs()));
        assert!(got == random_bytes(i as u64, 100_000 + i), "file f{i} was fsync'd but differs");
    }
}

/// The wait for a mount must not take the plain directory beneath for the mount: a new daemon
/// detaches a stale mount before it mounts its own, and in between the mount point answers statfs
/// (which was all the wait asked once /proc/mounts had listed the stale mount a moment before).
#[test]
fn the_wait_for_a_mount_tells_the_directory_beneath_from_a_mount() {
    if !fuse_available("the wait for a mount") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mp = dir.path().join("mnt");
    fs::create_dir(&mp).expect("mkdir");
    assert!(nix::sys::statfs::statfs(&mp).is_ok());
    assert!(!answers_as_mount(&mp), "a plain directory taken for a mount");
    nix::mount::mount(Some("tmpfs"), &mp, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m"))
        .expect("mount a tmpfs");
    let mounted = answers_as_mount(&mp);
    nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).expect("unmount the tmpfs");
    assert!(mounted, "a tmpfs mounted there not taken for a mount");
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

/// A cluster (N = 4, 4 KiB blocks, R = 3) with one mount of it; bind both, in this order.
fn one_mount() -> (TestCluster, Mount) {
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    (cluster, mnt)
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

/// A mount that still has a file open after its writes landed shows another mount's truncate
/// (after the attribute lifetime), and appends at the new end. It used to keep the end of its
/// own writes until its last close: stat showed the old size, a read gave zeros, and an append
/// left a run of zeros before it.
#[test]
fn a_truncate_by_another_mount_shows_while_this_one_keeps_the_file_open() {
    if !fuse_available("truncate elsewhere") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    let (fa, fb) = (a.path.join("f"), b.path.join("f"));
    let _kept = fs::File::create(&fa).expect("create on a");
    OpenOptions::new().append(true).open(&fa).and_then(|mut f| f.write_all(b"hello world\n")).expect("append on a");
    assert_eq!(fs::read(&fb).expect("read on b"), b"hello world\n");
    fs::File::create(&fb).expect("truncate on b");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::metadata(&fa).expect("stat on a").len() != 0 {
        assert!(std::time::Instant::now() < deadline, "a never saw b's truncate");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(&fa).expect("read on a"), b"");
    OpenOptions::new().append(true).open(&fa).and_then(|mut f| f.write_all(b"y")).expect("append on a");
    assert_eq!(fs::read(&fb).expect("read on b"), b"y");
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

/// A directory listing hands the kernel each entry's attributes, and a directory handle keeps the
/// listing it took at opendir. Attributes older than a write that landed since must not reach the
/// kernel or the mount's own record of the size: `stat` would show the old size, and a
/// partial-block write past the old end would be planned against it and store zeros over the
/// bytes it should have kept.
#[test]
fn a_directory_listing_taken_before_a_write_does_not_shrink_the_file() {
    if !fuse_available("listing before a write") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mnt = Mount::start_with(&cluster, &cluster.dir.path().join("mnt"), "fs", &["--metrics", &metrics]);
    let released = || value(&scrape(port), r#"dfs_operations_total{op="release"}"#);
    let (dir, f) = (mnt.path.join("d"), mnt.path.join("d/f"));
    fs::create_dir(&dir).expect("mkdir");
    let mut want: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&f, &want).expect("write");
    let listing = fs::read_dir(&dir).expect("opendir");
    // A write that lands after the listing was taken, before it is read.
    let before = released();
    let more = vec![b'm'; 6000];
    OpenOptions::new().append(true).open(&f).and_then(|mut a| a.write_all(&more)).expect("append");
    want.extend_from_slice(&more);
    // The kernel releases a closed file on its own time; the write's state in the mount goes
    // with it, and then only the listing speaks of the size.
    wait_until("the append's handle released", Duration::from_secs(10), || released() > before);
    let h = OpenOptions::new().read(true).write(true).open(&f).expect("open");
    assert_eq!(listing.count(), 1);
    assert_eq!(fs::metadata(&f).expect("stat").len(), 12_000, "the size after the old listing went by");
    // Into block 2 (8192-12287), past the listing's size: the rest of the block must stay.
    h.write_all_at(b"tail", 9000).expect("write");
    drop(h);
    want[9000..9004].copy_from_slice(b"tail");
    let got = fs::read(&f).expect("read");
    assert_eq!(got.len(), want.len());
    let first = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first, None, "the write after the old listing: first difference at byte {first:?}");
}

/// The names of an open directory stream, read to its end with libc's `readdir`.
fn names_of(d: *mut libc::DIR) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        // SAFETY: `d` is an open directory stream; the entry is read before the next call.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returns a NUL-terminated name in the entry it returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    out.sort();
    out
}

/// The inode number a directory listing gives for `name` (`d_ino`).
fn listed_ino(dir: &Path, name: &str) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid path; the stream is closed below.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut found = None;
    loop {
        // SAFETY: `d` is an open directory stream; the entry is read before the next call.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: readdir returns a NUL-terminated name in the entry it returned.
        if unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes() == name.as_bytes() {
            // SAFETY: as above.
            found = Some(unsafe { (*e).d_ino });
        }
    }
    // SAFETY: `d` is open, and not used after.
    unsafe { libc::closedir(d) };
    found
}

/// A listing's ".." names the directory's parent, as `ls -ai` shows it, also after the directory
/// moved to another parent.
#[test]
fn dot_dot_in_a_listing_is_the_parent() {
    if !fuse_available("..") {
        return;
    }
    let (_cluster, mnt) = one_mount();
    fs::create_dir_all(mnt.path.join("a/b")).expect("mkdir");
    fs::create_dir(mnt.path.join("c")).expect("mkdir");
    let ino = |p: &str| fs::metadata(mnt.path.join(p)).expect("stat").ino();
    assert_eq!(listed_ino(&mnt.path.join("a/b"), ".."), Some(ino("a")));
    assert_eq!(listed_ino(&mnt.path.join("a"), ".."), Some(ino("")));
    fs::rename(mnt.path.join("a/b"), mnt.path.join("c/b")).expect("rename");
    assert_eq!(listed_ino(&mnt.path.join("c/b"), ".."), Some(ino("c")));
}

/// A directory stream read again from the start (`rewinddir`) lists the directory as it is now,
/// as POSIX asks: a name made since shows, and a name removed since does not come back (the kernel
/// would otherwise be handed an entry for a file that is gone, and `stat` would find it).
#[test]
fn a_rewound_directory_stream_lists_the_directory_as_it_is_now() {
    if !fuse_available("rewinddir") {
        return;
    }
    let (_cluster, mnt) = one_mount();
    let dir = mnt.path.join("d");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("a"), b"a").expect("a");
    fs::write(dir.join("b"), b"b").expect("b");
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid path; the stream is closed below.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null(), "opendir");
    assert_eq!(names_of(d), ["a", "b"]);
    fs::remove_file(dir.join("a")).expect("unlink");
    fs::write(dir.join("c"), b"c").expect("c");
    // SAFETY: `d` is open.
    unsafe { libc::rewinddir(d) };
    let again = names_of(d);
    // SAFETY: `d` is open, and not used after.
    unsafe { libc::closedir(d) };
    assert_eq!(again, ["b", "c"]);
    assert!(fs::symlink_metadata(dir.join("a")).is_err(), "the removed name is found again");
}

/// A directory removed while a process still has it (its working directory here: `ls` in it),
/// by rmdir or by a rename over it, opens and lists as empty, and has no links, as on Linux's file
/// systems, rather than failing with ENOENT: the kernel asks for the attributes of the inode it
/// holds after the metaserver has forgotten it.
#[test]
fn a_removed_directory_still_held_opens_and_lists_as_empty() {
    if !fuse_available("a removed directory") {
        return;
    }
    let (_cluster, mnt) = one_mount();
    for how in ["rmdir", "rename over it"] {
        let dir = mnt.path.join("gone");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("f"), b"f").expect("a file");
        let held = fs::File::open(&dir).expect("open the directory");
        fs::remove_file(dir.join("f")).expect("unlink");
        if how == "rmdir" {
            fs::remove_dir(&dir).expect("rmdir");
        } else {
            fs::create_dir(mnt.path.join("other")).expect("mkdir");
            fs::rename(mnt.path.join("other"), &dir).expect("rename over the empty directory");
        }
        let md = held.metadata().unwrap_or_else(|e| panic!("fstat after {how}: {e}"));
        assert_eq!(md.nlink(), 0, "after {how}");
        // What `ls` does in a removed working directory: open "." and read it.
        let dot = c".";
        // SAFETY: `held` is an open descriptor and `dot` a NUL-terminated path.
        let fd = unsafe { libc::openat(held.as_raw_fd(), dot.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd >= 0, "open . after {how}: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is an open directory descriptor, owned by the stream from here on.
        let d = unsafe { libc::fdopendir(fd) };
        assert!(!d.is_null(), "fdopendir");
        let names = names_of(d);
        // SAFETY: `d` is open, and not used after.
        unsafe { libc::closedir(d) };
        assert!(names.is_empty(), "a directory removed by {how} lists {names:?}");
        let _ = fs::remove_dir(&dir);
    }
}

/// A write moves the file's modification and change times at once, as on a local file system,
/// though the mount holds the data back and the metaserver records the times only when it lands:
/// an `fstat` right after the write, and a `stat` right after the close, show the new times.
#[test]
fn a_write_moves_the_times_before_its_data_lands() {
    if !fuse_available("times of a buffered write") {
        return;
    }
    let (_cluster, mnt) = one_mount();
    let path = mnt.path.join("f");
    fs::write(&path, b"first").expect("write");
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_modified(old).expect("set the modification time");
    let before = std::time::SystemTime::now();
    f.write_all_at(&[7u8; 100], 0).expect("a write the mount buffers");
    let m = f.metadata().expect("fstat");
    assert!(m.modified().expect("mtime") >= before, "mtime after the write: {:?}", m.modified());
    assert!(m.ctime() >= before.duration_since(std::time::UNIX_EPOCH).expect("now").as_secs() as i64 - 1);
    drop(f);
    let m = fs::metadata(&path).expect("stat");
    assert!(m.modified().expect("mtime") >= before, "mtime after the close: {:?}", m.modified());
}

/// Two processes on two mounts opening one new file with O_CREAT (no O_EXCL) at the same moment
/// both open it, as on a local file system: the mount whose create finds the name taken (the
/// other mount's create came between the kernel's lookup and its own) has its kernel open that
/// file after a fresh lookup instead of failing with EEXIST. Both writes land (each in a block of
/// its own: two mounts writing one block at once are not merged, and their appends are not atomic
/// with each other). The mounts' metrics count the creates that found the name taken (answered
/// ESTALE to the kernel), so the test races until at least one did: else it tested nothing.
#[test]
fn opens_with_o_creat_racing_on_two_mounts_both_succeed() {
    if !fuse_available("racing creates") {
        return;
    }
    let cluster = TestCluster::start(4, 512, 3);
    let ports = [free_port(), free_port()];
    let mount = |name: &str, port: u16| {
        let metrics = format!("127.0.0.1:{port}");
        Mount::start_with(&cluster, &cluster.dir.path().join(name), name, &["--metrics", &metrics])
    };
    let (a, b) = (mount("fsa", ports[0]), mount("fsb", ports[1]));
    let lost = || -> f64 {
        ports.iter().map(|&p| value(&scrape(p), r#"dfs_operation_errors_total{op="create",error="ESTALE"}"#)).sum()
    };
    // Rounds in batches, until a batch had a create find the name taken (bounded).
    let (batch, most) = (60, 600);
    let mut rounds = 0;
    while rounds == 0 || (lost() == 0.0 && rounds < most) {
        let start = Arc::new(std::sync::Barrier::new(2));
        let racer = |root: PathBuf, tag: &'static [u8], at: u64| {
            let start = start.clone();
            std::thread::spawn(move || {
                (rounds..rounds + batch)
                    .map(|i| {
                        start.wait();
                        OpenOptions::new()
                            .create(true)
                            .truncate(false)
                            .write(true)
                            .open(root.join(format!("f{i}")))
                            .and_then(|f| f.write_all_at(tag, at))
                            .map_err(|e| format!("round {i}: {e}"))
                    })
                    .collect::<Vec<_>>()
            })
        };
        // The cluster's blocks are 512 bytes.
        let (ra, rb) = (racer(a.path.clone(), b"a", 0), racer(b.path.clone(), b"b", 512));
        let failed: Vec<String> =
            [ra, rb].into_iter().flat_map(|t| t.join().expect("racer")).filter_map(Result::err).collect();
        assert!(failed.is_empty(), "opens with O_CREAT failed: {failed:?}");
        rounds += batch;
    }
    assert!(lost() > 0.0, "in {rounds} rounds no create found the name taken: the race never happened");
    for i in 0..rounds {
        let got = fs::read(a.path.join(format!("f{i}"))).expect("read");
        assert_eq!((got.len(), got[0], got[512]), (513, b'a', b'b'), "round {i}: both writes land");
    }
    // O_EXCL still refuses a name that is there.
    let excl = OpenOptions::new().write(true).create_new(true).open(b.path.join("f0"));
    assert_eq!(excl.map(|_| ()).map_err(|e| e.kind()), Err(std::io::ErrorKind::AlreadyExists));
}

/// `--ro` (and `-o ro`): everything reads, every change fails with EROFS, and nothing changes.
#[test]
fn a_read_only_mount_reads_and_refuses_every_change_with_erofs() {
    if !fuse_available("read-only mount") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let data = random_bytes(77, 10_000);
    {
        let rw = Mount::start(&cluster, &cluster.dir.path().join("rw"), "rw");
        std::fs::create_dir(rw.path.join("d")).expect("mkdir");
        std::fs::write(rw.path.join("d/f"), &data).expect("write");
        std::fs::create_dir(rw.path.join("empty")).expect("mkdir");
    }
    for flags in [&["--ro"][..], &["-o", "allow_other,ro"][..]] {
        let ro = Mount::start_with(&cluster, &cluster.dir.path().join("ro"), "ro", flags);
        let p = |s: &str| ro.path.join(s);
        assert_eq!(std::fs::read(p("d/f")).expect("read"), data, "{flags:?}");
        assert_eq!(std::fs::read_dir(p("d")).expect("readdir").count(), 1);
        let erofs = |what: &str, r: std::io::Result<()>| {
            let e = r.expect_err(&format!("{what} on a read-only mount ({flags:?})"));
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what} ({flags:?}): {e}");
        };
        erofs("open for writing", std::fs::OpenOptions::new().write(true).open(p("d/f")).map(drop));
        erofs("create", std::fs::write(p("d/new"), b"x"));
        erofs("mkdir", std::fs::create_dir(p("d2")));
        erofs("unlink", std::fs::remove_file(p("d/f")));
        erofs("rmdir", std::fs::remove_dir(p("empty")));
        erofs("rename", std::fs::rename(p("d/f"), p("d/g")));
        erofs("symlink", std::os::unix::fs::symlink("f", p("d/l")));
        erofs("link", std::fs::hard_link(p("d/f"), p("d/h")));
        erofs("chmod", std::fs::set_permissions(p("d/f"), std::fs::Permissions::from_mode(0o600)));
        erofs("truncate", nix::unistd::truncate(&p("d/f"), 0).map_err(std::io::Error::from));
        drop(ro);
    }
    let rw = Mount::start(&cluster, &cluster.dir.path().join("rw"), "rw2");
    assert_eq!(std::fs::read(rw.path.join("d/f")).expect("read"), data, "changed through a read-only mount");
    assert_eq!(std::fs::read_dir(rw.path.join("d")).expect("readdir").count(), 1);
}

#[test]
fn an_unknown_mount_option_is_refused_with_the_known_ones() {
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = cluster.dir.path().join("m");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mut args = vec!["-o".to_string(), "ro,noatime".to_string(), mnt.display().to_string()];
    args.push(cluster.meta_port.to_string());
    args.extend(cluster.ring_args());
    let out = secured(&mut Command::new(env!("CARGO_BIN_EXE_distributedfs")))
        .args(&args)
        .output()
        .expect("run distributedfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"noatime\"") && err.contains("known: ro, rw"), "{err}");
}

/// A name another mount replaced or removed opens what it names now, even while this mount's
/// kernel still holds the name (up to a second): the open answers ESTALE and the kernel looks the
/// name up again. Regression: the open went to the old inode, reading the replaced file's bytes
/// and appending to a file no name led to.
#[test]
fn an_open_through_a_name_replaced_or_removed_elsewhere_opens_what_it_names_now() {
    if !fuse_available("opens after another mount's rename") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    fs::write(a.path.join("x"), b"old").expect("write x");
    fs::write(a.path.join("y"), b"gone").expect("write y");
    assert_eq!(fs::read(b.path.join("x")).expect("read x"), b"old");
    assert_eq!(fs::read(b.path.join("y")).expect("read y"), b"gone");
    fs::write(a.path.join("x.new"), b"new").expect("write x.new");
    fs::rename(a.path.join("x.new"), a.path.join("x")).expect("replace x");
    fs::remove_file(a.path.join("y")).expect("remove y");
    assert_eq!(fs::read(b.path.join("x")).expect("read x again"), b"new");
    let mut y = OpenOptions::new().append(true).create(true).open(b.path.join("y")).expect("open y to append");
    y.write_all(b"more").expect("append");
    drop(y);
    assert_eq!(fs::read(a.path.join("y")).expect("read y through the other mount"), b"more");
    // The same where a listing of the directory was fetched ahead of lookups (by the stats of
    // many names in it), which holds the old inode under the name.
    fs::create_dir(a.path.join("d")).expect("mkdir");
    for i in 0..12 {
        fs::write(a.path.join(format!("d/f{i}")), format!("old {i}")).expect("write");
    }
    for i in 0..12 {
        fs::metadata(b.path.join(format!("d/f{i}"))).expect("stat");
    }
    fs::write(a.path.join("d/new"), b"new 5").expect("write");
    fs::rename(a.path.join("d/new"), a.path.join("d/f5")).expect("replace d/f5");
    assert_eq!(fs::read(b.path.join("d/f5")).expect("read d/f5 again"), b"new 5");
    // A file open here keeps opening after its removal, through /proc, as on Linux.
    fs::write(a.path.join("z"), b"kept").expect("write z");
    let z = fs::File::open(b.path.join("z")).expect("open z");
    fs::remove_file(a.path.join("z")).expect("remove z");
    let again = format!("/proc/self/fd/{}", z.as_raw_fd());
    assert_eq!(fs::read(&again).expect("reopen z through /proc"), b"kept");
}

/// `trusted.*` attributes are listed to root only, as Linux's own filesystems list them (the kernel
/// refuses their values to others itself, but passes a FUSE filesystem's list on as it is).
#[test]
fn trusted_attribute_names_are_listed_to_root_only() {
    if !fuse_available("listxattr as another user") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start_with(&cluster, &cluster.dir.path().join("mnt"), "fs", &["-o", "allow_other"]);
    let path = mnt.path.join("f");
    fs::write(&path, b"x").expect("create");
    for name in ["trusted.secret", "user.plain"] {
        xattr_calls::set(&path, name, b"1", 0).expect("setxattr");
    }
    let f = fs::File::open(&path).expect("open");
    let fd = f.as_raw_fd();
    let list = move || {
        let mut buf = vec![0u8; 4096];
        // SAFETY: a valid descriptor and a buffer of the length given.
        let n = unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
        buf.truncate(n as usize);
        buf.split(|&b| b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect()
    };
    let mut as_root: Vec<String> = list();
    as_root.sort();
    assert_eq!(as_root, ["trusted.secret", "user.plain"]);
    // setfsuid changes the calling thread's file system uid only, which is the uid FUSE passes on.
    let as_nobody = std::thread::spawn(move || {
        // SAFETY: setfsuid has no memory-safety preconditions.
        unsafe { libc::setfsuid(65534) };
        list()
    });
    assert_eq!(as_nobody.join().expect("as nobody"), ["user.plain"]);
}

mod xattr_calls {
    //! The xattr system calls on paths, answering Ok(bytes) or Err(errno).
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).expect("path")
    }
    fn n(name: &str) -> CString {
        CString::new(name).expect("name")
    }
    fn res(r: isize) -> Result<usize, i32> {
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r as usize)
        }
    }

    pub fn set(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
        // SAFETY: valid C strings and a buffer of the length given.
        let r = unsafe { libc::lsetxattr(c(p).as_ptr(), n(name).as_ptr(), value.as_ptr().cast(), value.len(), flags) };
        res(r as isize).map(drop)
    }

    /// The value, read with a buffer of `size` bytes (None: asked for the size first).
    pub fn get(p: &Path, name: &str, size: Option<usize>) -> Result<Vec<u8>, i32> {
        let size = match size {
            Some(s) => s,
            // SAFETY: a null buffer of length 0 asks for the size.
            None => res(unsafe { libc::lgetxattr(c(p).as_ptr(), n(name).as_ptr(), std::ptr::null_mut(), 0) })?,
        };
        let mut buf = vec![0u8; size];
        // SAFETY: the buffer has `size` bytes.
        let got = res(unsafe { libc::lgetxattr(c(p).as_ptr(), n(name).as_ptr(), buf.as_mut_ptr().cast(), size) })?;
        buf.truncate(got);
        Ok(buf)
    }

    /// The names, sorted (filesystems list in their own order).
    pub fn list(p: &Path) -> Result<Vec<String>, i32> {
        // SAFETY: a null buffer of length 0 asks for the size; then a buffer of that size.
        let size = res(unsafe { libc::llistxattr(c(p).as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size];
        let got = res(unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), size) })?;
        let mut names: Vec<String> = buf[..got]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            // Labels a security module adds by itself are not the test's.
            .filter(|s| s.starts_with("user.") || s.starts_with("trusted."))
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn remove(p: &Path, name: &str) -> Result<(), i32> {
        // SAFETY: valid C strings.
        res(unsafe { libc::lremovexattr(c(p).as_ptr(), n(name).as_ptr()) } as isize).map(drop)
    }
}

/// One script of xattr calls on a file, a directory and a symlink under `root`: what each answered.
fn xattr_script(root: &Path) -> Vec<String> {
    use xattr_calls::*;
    let (f, d, l) = (root.join("f"), root.join("d"), root.join("l"));
    std::fs::write(&f, b"data").expect("file");
    std::fs::create_dir(&d).expect("dir");
    std::os::unix::fs::symlink("f", &l).expect("symlink");
    let long = format!("user.{}", "n".repeat(251));
    let mut out = Vec::new();
    let mut note = |what: &str, r: String| out.push(format!("{what}: {r}"));
    note("set user.a", format!("{:?}", set(&f, "user.a", b"one", 0)));
    note("get user.a", format!("{:?}", get(&f, "user.a", None)));
    note("set user.a CREATE", format!("{:?}", set(&f, "user.a", b"two", libc::XATTR_CREATE)));
    note("set user.b REPLACE", format!("{:?}", set(&f, "user.b", b"x", libc::XATTR_REPLACE)));
    note("set user.a REPLACE", format!("{:?}", set(&f, "user.a", b"three", libc::XATTR_REPLACE)));
    note("get user.a", format!("{:?}", get(&f, "user.a", None)));
    note("get user.a small", format!("{:?}", get(&f, "user.a", Some(2))));
    note("set user.empty", format!("{:?}", set(&f, "user.empty", b"", 0)));
    note("get user.empty", format!("{:?}", get(&f, "user.empty", None)));
    note("set trusted.t", format!("{:?}", set(&f, "trusted.t", &[0, 1, 2, 255], 0)));
    note("get trusted.t", format!("{:?}", get(&f, "trusted.t", None)));
    note("list f", format!("{:?}", list(&f)));
    note("get user.missing", format!("{:?}", get(&f, "user.missing", None)));
    note("set 255-byte name", format!("{:?}", set(&f, &long[..255], b"v", 0)));
    note("set 256-byte name", format!("{:?}", set(&f, &long, b"v", 0)));
    note("set other.x", format!("{:?}", set(&f, "other.x", b"v", 0)));
    note("remove user.a", format!("{:?}", remove(&f, "user.a")));
    note("remove user.a again", format!("{:?}", remove(&f, "user.a")));
    note("list f", format!("{:?}", list(&f)));
    note("set dir user.d", format!("{:?}", set(&d, "user.d", b"dir", 0)));
    note("get dir user.d", format!("{:?}", get(&d, "user.d", None)));
    note("set symlink user.s", format!("{:?}", set(&l, "user.s", b"s", 0)));
    note("set symlink trusted.s", format!("{:?}", set(&l, "trusted.s", b"s", 0)));
    note("list symlink", format!("{:?}", list(&l)));
    std::fs::remove_file(&f).expect("unlink");
    std::fs::write(&f, b"new").expect("file again");
    note("list new f", format!("{:?}", list(&f)));
    out
}

/// A local temp dir that keeps user. attributes, and a mounted cluster; None (saying why) where
/// either cannot be had.
fn xattr_setup(test: &str) -> Option<(tempfile::TempDir, TestCluster, Mount)> {
    if !fuse_available(test) {
        return None;
    }
    let local = tempfile::tempdir().expect("tmp");
    if xattr_calls::set(local.path(), "user.probe", b"1", 0).is_err() {
        eprintln!("skipping {test}: {} keeps no user. attributes to compare with", local.path().display());
        return None;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    Some((local, cluster, mnt))
}

#[test]
fn extended_attributes_answer_as_on_a_local_filesystem() {
    let Some((local, cluster, mnt)) = xattr_setup("xattrs") else { return };
    let (l, m) = (local.path().join("t"), mnt.path.join("t"));
    std::fs::create_dir(&l).expect("mkdir");
    std::fs::create_dir(&m).expect("mkdir");
    let want = xattr_script(&l);
    let got = xattr_script(&m);
    assert_eq!(got, want, "DFS (left) and a local filesystem (right)");

    // Linux's limits: a 64 KiB value fits, a larger one the kernel refuses.
    let f = mnt.path.join("big");
    std::fs::write(&f, b"").expect("file");
    let value = random_bytes(5, 64 << 10);
    assert_eq!(xattr_calls::set(&f, "user.big", &value, 0), Ok(()));
    assert_eq!(xattr_calls::get(&f, "user.big", None), Ok(value.clone()));
    assert_eq!(xattr_calls::set(&f, "user.bigger", &random_bytes(6, (64 << 10) + 1), 0), Err(libc::E2BIG));
    // Not kept: file capabilities and POSIX ACLs.
    // A well-formed capability set (revision 2, no capabilities): the kernel checks its shape.
    let mut caps = [0u8; 20];
    caps[3] = 2;
    assert_eq!(xattr_calls::set(&f, "security.capability", &caps, 0), Err(libc::EOPNOTSUPP));
    assert_eq!(xattr_calls::get(&f, "security.capability", None), Err(libc::ENODATA));
    assert_eq!(xattr_calls::set(&f, "system.posix_acl_access", &[2, 0, 0, 0], 0), Err(libc::EOPNOTSUPP));

    // They survive a fresh mount (they are the metaserver's), and go with their file.
    drop(mnt);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs2");
    assert_eq!(xattr_calls::get(&mnt.path.join("big"), "user.big", None), Ok(value));
    assert_eq!(xattr_calls::get(&mnt.path.join("t/d"), "user.d", None), Ok(b"dir".to_vec()));
}

/// `ls -l` asks each file it lists for `security.selinux`, and `cp -a` lists each file's
/// attributes: for files with none, the mount answers from what the listing said of them, asking
/// the metaserver nothing (it was asked once per file per call). An attribute set on one mount is
/// seen there at once, and on another once the attributes it had of the file are a second old.
#[test]
fn files_without_extended_attributes_are_answered_by_the_mount() {
    if !fuse_available("files without xattrs") {
        return;
    }
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let cluster = TestCluster::start_full(4, 4096, 3, &[], &["--metrics", &metrics]);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    let asked = || {
        let text = scrape(port);
        value(&text, r#"dfs_operations_total{op="getxattr"}"#) + value(&text, r#"dfs_operations_total{op="listxattr"}"#)
    };
    fs::create_dir(a.path.join("d")).expect("mkdir");
    for i in 0..50 {
        fs::write(a.path.join(format!("d/f{i}")), b"x").expect("write");
    }
    xattr_calls::set(&a.path.join("d/f7"), "user.kept", b"7", 0).expect("setxattr");
    let before = asked();
    let out = Command::new("ls").arg("-l").arg(b.path.join("d")).output().expect("ls");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in (0..50).filter(|&i| i != 7) {
        let f = b.path.join(format!("d/f{i}"));
        assert_eq!(xattr_calls::get(&f, "user.x", None), Err(libc::ENODATA), "f{i}");
        assert_eq!(xattr_calls::list(&f), Ok(vec![]), "f{i}");
    }
    let after = asked();
    // The one file with an attribute is asked of the metaserver (by `ls`, then by the reads).
    assert!(after - before <= 3.0, "the metaserver was asked {} times", after - before);
    assert_eq!(xattr_calls::get(&b.path.join("d/f7"), "user.kept", None), Ok(b"7".to_vec()));

    // Set on one mount: seen there at once, and on the other within its attributes' time.
    let (fa, fb) = (a.path.join("d/f3"), b.path.join("d/f3"));
    assert_eq!(xattr_calls::get(&fa, "user.new", None), Err(libc::ENODATA));
    xattr_calls::set(&fa, "user.new", b"n", 0).expect("setxattr");
    assert_eq!(xattr_calls::get(&fa, "user.new", None), Ok(b"n".to_vec()));
    assert_eq!(xattr_calls::list(&fa), Ok(vec!["user.new".to_string()]));
    wait_until("the other mount sees the attribute", Duration::from_secs(5), || {
        xattr_calls::get(&fb, "user.new", None) == Ok(b"n".to_vec())
    });
    xattr_calls::remove(&fa, "user.new").expect("removexattr");
    assert_eq!(xattr_calls::get(&fa, "user.new", None), Err(libc::ENODATA));
}

/// `cp -a` and `tar --xattrs` carry attributes into DFS and out again.
#[test]
fn cp_a_and_tar_xattrs_round_trip_a_tree_with_attributes() {
    let Some((local, _cluster, mnt)) = xattr_setup("cp -a with xattrs") else { return };
    let src = local.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("a"), b"alpha").expect("write");
    std::fs::write(src.join("sub/b"), random_bytes(3, 20_000)).expect("write");
    for (p, name, v) in
        [("a", "user.color", &b"red"[..]), ("sub", "user.kind", b"dir"), ("sub/b", "trusted.x", b"\x00\xff")]
    {
        xattr_calls::set(&src.join(p), name, v, 0).expect("set on the local tree");
    }
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let attrs = |root: &Path| -> Vec<(String, Vec<String>, Vec<Vec<u8>>)> {
        ["a", "sub", "sub/b"]
            .iter()
            .map(|p| {
                let names = xattr_calls::list(&root.join(p)).expect("list");
                let values = names.iter().map(|n| xattr_calls::get(&root.join(p), n, None).expect("get")).collect();
                (p.to_string(), names, values)
            })
            .collect()
    };
    let want = attrs(&src);
    run(Command::new("cp").arg("-a").arg(&src).arg(mnt.path.join("in")));
    assert_eq!(attrs(&mnt.path.join("in")), want, "cp -a into DFS");
    run(Command::new("cp").arg("-a").arg(mnt.path.join("in")).arg(local.path().join("out")));
    assert_eq!(attrs(&local.path().join("out")), want, "cp -a out of DFS");
    let tar = local.path().join("t.tar");
    run(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "-cf"]).arg(&tar).arg("-C").arg(&src).arg("."));
    std::fs::create_dir(mnt.path.join("untar")).expect("mkdir");
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-xf"])
        .arg(&tar)
        .arg("-C")
        .arg(mnt.path.join("untar")));
    assert_eq!(attrs(&mnt.path.join("untar")), want, "tar --xattrs into DFS");
}

/// A punched hole gives the space of the blocks it covers whole back on every replica; the file
/// reads as zeros there and keeps the rest.
#[test]
fn punching_a_hole_gives_back_the_space_of_the_blocks_it_covers() {
    if !fuse_available("punch hole") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let c = cluster.client();
    let stored = || -> u64 { (0..4).map(|i| c.server_status(i).expect("rpc").expect("status").bytes).sum() };
    let path = mnt.path.join("f");
    let mut model = random_bytes(31, 1 << 20);
    std::fs::write(&path, &model).expect("write");
    let before = stored();
    assert!(before >= 3 << 20, "three copies of 1 MiB are stored: {before}");
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    let (off, len) = (1000u64, 800_000u64);
    // SAFETY: a valid descriptor.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    f.sync_all().expect("fsync");
    drop(f);
    model[off as usize..(off + len) as usize].fill(0);
    // Blocks 1..=195 lie wholly inside [1000, 801000): 195 blocks of 4 KiB on each of 3 replicas.
    let freed = 195 * 4096 * 3;
    let after = stored();
    assert!(
        after + freed <= before,
        "stored {before} bytes before the punch and {after} after; expected {freed} fewer"
    );
    assert!(std::fs::read(&path).expect("read") == model, "contents after the punch");
}

/// A file grown by fallocate reads as zeros to its new end through a mapping too: the mount's
/// reads plan against the new size (the kernel asks for no attributes before a fault).
#[test]
fn a_file_grown_by_fallocate_maps_as_zeros() {
    if !fuse_available("fallocate and mmap") {
        return;
    }
    let (_cluster, mnt) = one_mount();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mnt.path.join("f")).expect("f");
    nix::fcntl::posix_fallocate(&f, 0, 8192).expect("fallocate");
    // SAFETY: a shared read mapping of 8192 bytes of an open file, unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping is 8192 bytes long; a fault past the file's end would be SIGBUS.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 8192) }.to_vec();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, 8192) };
    assert!(bytes.iter().all(|&b| b == 0));
    assert_eq!(f.metadata().expect("fstat").len(), 8192);
}

/// fallocate never shrinks a file: not one that another client grew after this mount last saw
/// its size. Regression: it set the size to its range's end from that stale size, cutting what
/// the other client had written.
#[test]
fn fallocate_keeps_what_another_client_wrote_past_the_size_this_mount_saw() {
    if !fuse_available("fallocate after another client's write") {
        return;
    }
    let (cluster, mnt) = one_mount();
    let path = mnt.path.join("f");
    std::fs::write(&path, b"0123456789").expect("write");
    let f = OpenOptions::new().read(true).write(true).open(&path).expect("open");
    let c = cluster.client();
    let ino = c.resolve("/f").expect("resolve").ino;
    let theirs = random_bytes(47, 100_000);
    c.write(ino, 0, theirs.clone()).expect("the other client's write");
    nix::fcntl::posix_fallocate(&f, 0, 50_000).expect("fallocate");
    assert_eq!(c.getattr(ino).expect("getattr").size, 100_000, "fallocate shrank the file");
    drop(f);
    assert!(std::fs::read(&path).expect("read") == theirs, "the other client's bytes");
}

/// fallocate's modes against a model of the file: size and every byte after each call.
#[test]
fn fallocate_modes_grow_keep_punch_and_zero_as_linux_says() {
    if !fuse_available("fallocate") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let path = mnt.path.join("f");
    let mut model = random_bytes(21, 10_000);
    std::fs::write(&path, &model).expect("write");
    let f = OpenOptions::new().read(true).write(true).open(&path).expect("open");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let falloc = |mode: i32, off: u64, len: u64| -> Result<(), i32> {
        // SAFETY: a valid descriptor.
        let r = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    };
    let (keep, punch, zero) = (libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE);
    let steps: [(&str, i32, u64, u64); 7] = [
        ("allocate past the end", 0, 5_000, 20_000),
        ("allocate inside", 0, 0, 4_000),
        ("keep size past the end", keep, 30_000, 100),
        ("punch a hole across blocks", punch | keep, 100, 9_000),
        ("punch past the end", punch | keep, 24_000, 8_000),
        ("zero a range past the end", zero, 20_000, 7_000),
        ("zero with keep size", zero | keep, 26_000, 5_000),
    ];
    for (what, mode, off, len) in steps {
        assert_eq!(falloc(mode, off, len), Ok(()), "{what}");
        let end = (off + len) as usize;
        if mode & punch != 0 || mode & zero != 0 {
            let to = if mode & keep != 0 { end.min(model.len()) } else { end };
            if model.len() < to {
                model.resize(to, 0);
            }
            model[(off as usize).min(to)..to].fill(0);
        } else if mode & keep == 0 && model.len() < end {
            model.resize(end, 0);
        }
        let mut now = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut now).expect("read");
        (&f).seek(SeekFrom::Start(0)).expect("seek");
        assert_eq!(now.len(), model.len(), "size after {what}");
        assert!(now == model, "contents after {what}");
        assert_eq!(f.metadata().expect("stat").len(), model.len() as u64, "st_size after {what}");
    }
    let collapse = libc::FALLOC_FL_COLLAPSE_RANGE;
    assert_eq!(falloc(collapse, 0, 4096), Err(libc::EOPNOTSUPP), "collapse range");
    drop(f);
    // What it left is stored, not only in this mount.
    drop(mnt);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs2");
    assert!(std::fs::read(mnt.path.join("f")).expect("read") == model, "after a fresh mount");
}
