//! A full disk: four dataservers and the metaserver on one small tmpfs, written past its end
//! through the mount. Needs root (tmpfs, FUSE); skips, saying so, without.

mod common;
#[path = "../src/shared/tmpfs.rs"]
mod tmpfs;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::*;
use tmpfs::Tmpfs;

const DISK: u64 = 64 << 20;

/// (available, size) of the filesystem at `p`, in bytes.
fn df(p: &Path) -> (u64, u64) {
    let v = nix::sys::statvfs::statvfs(p).expect("statvfs");
    (v.blocks_available() * v.fragment_size(), v.blocks() * v.fragment_size())
}

/// Writes `len` bytes of `seed` to `path` in 1 MiB pieces, then fsyncs and closes: the first
/// error, if any.
fn write_file(path: &Path, seed: u64, len: usize) -> std::io::Result<()> {
    let data = random_bytes(seed, len);
    let mut f = std::fs::File::create(path)?;
    for piece in data.chunks(1 << 20) {
        f.write_all(piece)?;
    }
    f.sync_all()?;
    drop(f);
    Ok(())
}

/// A cluster on a disk of its own (a tmpfs of [`DISK`] bytes, the logs on it too) and a mount of
/// it; dropped in that order, the mount first.
struct OnSmallDisk {
    mnt: Mount,
    cluster: TestCluster,
    _disk: Tmpfs,
    base: tempfile::TempDir,
}

fn on_small_disk(what: &str) -> Option<OnSmallDisk> {
    if !fuse_available(what) {
        return None;
    }
    let base = tempfile::tempdir().expect("temp dir");
    let disk = Tmpfs::mount(base.path(), DISK)?;
    // Logs on the small disk too: they must not be what fills it first, so keep them short.
    let cluster = TestCluster::start_in(Some(base.path()), true, 4, 16384, 3, &[], &[]);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    Some(OnSmallDisk { mnt, cluster, _disk: disk, base })
}

/// Fills the disk under `dir` to its last `leave` bytes with a file of its own; returns it. The
/// servers may free room meanwhile (a journal segment dropped behind a checkpoint, which comes
/// once a second: a metaserver's is 4 MiB), so the file takes what is freed for two seconds.
fn fill(dir: &Path, leave: u64) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let f = std::fs::File::create(&filler).expect("filler");
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut len = 0;
    loop {
        let (avail, _) = df(dir);
        if avail > leave {
            len += avail - leave;
            nix::fcntl::posix_fallocate(&f, 0, len as i64).expect("fill the disk");
        }
        if std::time::Instant::now() >= until {
            return filler;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path).expect("open").read_to_end(&mut v).expect("read");
    v
}

#[test]
fn a_full_disk_gives_enospc_keeps_what_was_stored_and_deletes_make_room() {
    // Bound whole: a field left out of the pattern would be dropped at once.
    let Some(d) = on_small_disk("full disk") else { return };
    let (mnt, cluster, base) = (&d.mnt, &d.cluster, &d.base);
    let keep = mnt.path.join("keep");
    write_file(&keep, 1, 2 << 20).expect("a first file fits");
    let (avail_before, _) = df(&mnt.path);
    assert!(avail_before > 0 && avail_before < DISK, "df on the mount: {avail_before} bytes available");

    // 100 MiB into a 64 MiB disk holding three copies of everything.
    let big = mnt.path.join("big");
    let err = write_file(&big, 2, 100 << 20).expect_err("100 MiB fit on a 64 MiB disk");
    if err.raw_os_error() != Some(libc::ENOSPC) {
        let logs = cluster.logs();
        let warn: Vec<&str> = logs.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        panic!("the writer's error: {err}\n{}", warn.join("\n"));
    }
    let (avail_full, size_full) = df(&mnt.path);
    assert!(avail_full < 2 << 20, "df says {avail_full} bytes available on a full cluster");
    let stored = size_full - avail_full;
    assert!(stored >= 2 << 20, "df's used ({stored}) counts at least the first file");
    assert_eq!(read_file(&keep), random_bytes(1, 2 << 20), "a file stored before the disk filled changed");

    // Deleting makes room, and a write as large as df then says is free fits (df counts
    // conservatively: the fullest server, the pages a block takes, a shared disk shared).
    std::fs::remove_file(&big).expect("delete on a full disk");
    const AGAIN: usize = 1 << 20;
    let waited = procs_wait(Duration::from_secs(30), || df(&mnt.path).0 >= AGAIN as u64);
    if !waited {
        let st = cluster.dfsctl(&["status"]);
        panic!(
            "no room after the delete: df {:?}, disk {:?}\n{}\n{}",
            df(&mnt.path),
            df(base.path()),
            String::from_utf8_lossy(&st.stdout),
            cluster.logs().lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n")
        );
    }
    let again = mnt.path.join("again");
    if let Err(e) = write_file(&again, 3, AGAIN) {
        let logs = cluster.logs();
        let warn: Vec<&str> = logs.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        panic!(
            "a write after the delete: {e}; df {:?}, disk {:?}\n{}",
            df(&mnt.path),
            df(base.path()),
            warn.join("\n")
        );
    }
    assert_eq!(read_file(&again), random_bytes(3, AGAIN));
    assert_eq!(read_file(&keep), random_bytes(1, 2 << 20));
    let out = cluster.dfsctl(&["check", "/keep"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_metaserver_refuses_creates_on_a_full_disk_and_still_takes_removals() {
    if !fuse_available("full metaserver disk") {
        return;
    }
    let base = tempfile::tempdir().expect("temp dir");
    // Room for the four dataservers' reserves (4 MiB each) and the stores.
    let Some(_disk) = Tmpfs::mount(base.path(), 32 << 20) else { return };
    let cluster = TestCluster::start_in(Some(base.path()), false, 4, 16384, 3, &[], &[]);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    std::fs::create_dir(mnt.path.join("d")).expect("mkdir");
    std::fs::write(mnt.path.join("d/f"), b"kept").expect("a small file");

    // Something else fills the disk to its last 256 KiB.
    let filler = fill(base.path(), 256 << 10);

    let err = std::fs::create_dir(mnt.path.join("new")).expect_err("mkdir on a full disk");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "mkdir: {err}");
    let err = std::fs::File::create(mnt.path.join("d/g")).expect_err("create on a full disk");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "create: {err}");
    assert_eq!(std::fs::read(mnt.path.join("d/f")).expect("read"), b"kept");
    std::fs::remove_file(mnt.path.join("d/f")).expect("unlink on a full disk");
    std::fs::remove_dir(mnt.path.join("d")).expect("rmdir on a full disk");

    std::fs::remove_file(&filler).expect("free the disk");
    std::fs::create_dir(mnt.path.join("new")).expect("mkdir once the disk has room");
    std::fs::write(mnt.path.join("new/f"), b"again").expect("a file once the disk has room");
    assert_eq!(std::fs::read(mnt.path.join("new/f")).expect("read"), b"again");
}

/// A write that fails in the background (here for want of room) is reported to the writer's
/// fsync and close even when another process read the file in between: the read waits for the
/// write to land but does not take its failure (as on Linux, where a read never reports a failed
/// writeback). Before, the first call to look took it, and the writer's fsync returned 0.
#[test]
fn a_failed_background_write_reaches_the_writers_fsync_though_a_reader_came_first() {
    let Some(d) = on_small_disk("failed write and a reader") else { return };
    let (mnt, base) = (&d.mnt, &d.base);
    let path = mnt.path.join("w");
    let mut writer = std::fs::File::create(&path).expect("create");

    // Something else fills the disk to its last 256 KiB.
    let filler = fill(base.path(), 256 << 10);

    // Less than the mount buffers before it stores: the write is accepted, and stored (and
    // refused) only when something waits for it.
    writer.write_all(&random_bytes(4, 3 << 19)).expect("a buffered write");
    let mut reader = std::fs::File::open(&path).expect("open to read");
    let _ = reader.read_to_end(&mut Vec::new());
    let err = writer.sync_all().expect_err("the writer's fsync after its write failed");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "fsync: {err}");
    drop(writer);
    std::fs::remove_file(&filler).expect("free the disk");
}

fn procs_wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A log segment that does not fit on the disk fails without keeping what it wrote: on a disk
/// shared by several servers, a half-made segment would take the room the others counted on.
#[test]
fn a_log_segment_that_does_not_fit_leaves_no_file_behind() {
    let base = tempfile::tempdir().expect("temp dir");
    let Some(_disk) = Tmpfs::mount(base.path(), 1 << 20) else { return };
    let dir = base.path().join("log");
    let mut wal = dfs::shared::wal::Wal::open_sized(&dir, 4 << 20).expect("open");
    let err = wal.append(&[(1, b"a record".as_slice())]).expect_err("a 4 MiB segment on a 1 MiB disk");
    assert!(dfs::shared::wal::is_no_room_for_segment(&err), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // Polled: a process another test forks at that moment holds the file open until it execs.
    let freed = procs_wait(Duration::from_secs(10), || df(base.path()).0 > (1 << 20) / 2);
    assert!(freed, "{:?} (free, size) after the failure", df(base.path()));
}

/// A dataserver's journal that finds no room for a new segment is not given up: the changes in
/// the meantime are checkpointed (durable all the same), and once there is room again the journal
/// takes them again, without a restart.
#[test]
fn a_journal_without_room_is_taken_up_again_once_there_is_room() {
    use dfs::dataserver::blockstore::{BlockStore, JOURNAL_RETRY};
    use dfs::shared::block::{Block, BlockKey};
    let base = tempfile::tempdir().expect("temp dir");
    let store = base.path().join("store");
    let journal = store.join("journal");
    // Made by a first open, so that the journal's directory can then be a small disk of its own.
    drop(BlockStore::open(&store).expect("open"));
    std::fs::create_dir_all(&journal).expect("journal dir");
    let Some(_disk) = Tmpfs::mount(&journal, 1536 << 10) else { return };
    let (s, _) = BlockStore::open(&store).expect("reopen");
    let segments = || std::fs::read_dir(&journal).expect("list").filter_map(Result::ok).count();
    // 48 KiB puts (journaled): one 1 MiB segment holds about 21; the second does not fit.
    let put = |i: u64| {
        let blocks: Vec<Block> =
            (0..3).map(|k| Block::new(BlockKey { file_id: i, index: k }, 1, 3, vec![i as u8; 16 << 10])).collect();
        s.put(&blocks, false, None).expect("a put goes on without the journal");
    };
    for i in 1..=30 {
        put(i);
    }
    // 30 puts of 48 KiB did not fit in the one segment there is: the rest were checkpointed.
    let (free, _) = df(&journal);
    assert!(free < 1 << 20, "{free} bytes free: the journal was meant to run out of room");
    assert_eq!(segments(), 1, "a second segment fitted after all, or a half-made one was left");
    // Room again: the next put after the pause goes to the journal, in a new segment.
    nix::mount::mount(Some("tmpfs"), &journal, Some("tmpfs"), nix::mount::MsFlags::MS_REMOUNT, Some("size=8m"))
        .expect("remount larger");
    let mut last = 30;
    let taken_up = procs_wait(JOURNAL_RETRY * 5, || {
        last += 1;
        put(last);
        segments() == 2
    });
    assert!(taken_up, "the journal was not taken up again after {} more puts", last - 30);
    drop(s);
    // Everything stored survives a reopen (the journal redoes what the checkpoint lacks).
    let (s, _) = BlockStore::open(&store).expect("reopen");
    for i in 1..=last {
        let got = s.get(&[BlockKey { file_id: i, index: 2 }]).expect("get").pop().flatten().expect("stored");
        assert_eq!(got.data, vec![i as u8; 16 << 10]);
    }
}
