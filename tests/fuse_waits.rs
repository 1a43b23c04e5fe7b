//! What a user meets in the mount around buffered writes and down servers: explicit times survive
//! the flush at close, a process waiting for a down server can be killed or interrupted, and
//! metadata calls wait for a metaserver that is down instead of failing. Needs /dev/fuse and root;
//! skips, saying so, where they are absent.

mod common;

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use nix::sys::pthread::pthread_kill;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use std::os::unix::thread::JoinHandleExt;

/// 2001-01-01 00:00:00 UTC, and a second, different time for atime.
const T2001: i64 = 978_307_200;
const T1999: i64 = 915_148_800;

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

/// Forgets the kernel's cached attributes, so the next stat asks the mount.
fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}

fn times(p: &Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.mtime(), m.atime())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Waits up to `limit` for `child` to exit; true if it did.
fn exits_within(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().expect("wait").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn explicit_times_survive_the_flush_at_close_on_this_mount_and_another() {
    if !fuse_available("explicit times") {
        return;
    }
    let cluster = TestCluster::start(4, 512, 3);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    let local = tempfile::tempdir().expect("tmp");

    // futimens on an open file with buffered writes, then close.
    let mut f = File::create(a.path.join("futimens")).expect("create");
    f.write_all(&random_bytes(1, 3000)).expect("write");
    f.set_times(FileTimes::new().set_modified(at(T2001)).set_accessed(at(T1999))).expect("futimens");
    drop(f);

    // cp -p of a local file with old times.
    let src = local.path().join("src");
    fs::write(&src, random_bytes(2, 5000)).expect("write src");
    File::options()
        .write(true)
        .open(&src)
        .expect("open")
        .set_times(FileTimes::new().set_modified(at(T2001)).set_accessed(at(T1999)))
        .expect("set src times");
    run(Command::new("cp").arg("-p").arg(&src).arg(a.path.join("copied")));

    // tar -x of a tree whose files have set times.
    let tree = local.path().join("tree");
    fs::create_dir_all(tree.join("sub")).expect("mkdir");
    for (name, seed) in [("one", 3), ("sub/two", 4)] {
        fs::write(tree.join(name), random_bytes(seed, 2000)).expect("write");
        File::options().write(true).open(tree.join(name)).expect("open").set_modified(at(T2001)).expect("mtime");
    }
    let tarball = local.path().join("t.tar");
    run(Command::new("tar").arg("-cf").arg(&tarball).arg("-C").arg(&tree).arg("."));
    fs::create_dir(a.path.join("x")).expect("mkdir x");
    run(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(a.path.join("x")));

    // touch -d on a file that is open with buffered writes.
    let mut open = File::create(a.path.join("touched")).expect("create");
    open.write_all(b"buffered").expect("write");
    run(Command::new("touch").args(["-d", "2001-01-01 00:00:00 UTC"]).arg(a.path.join("touched")));
    drop(open);

    drop_caches();
    for root in [&a.path, &b.path] {
        assert_eq!(times(&root.join("futimens")), (T2001, T1999), "futimens before close, seen in {}", root.display());
        assert_eq!(times(&root.join("copied")), (T2001, T1999), "cp -p, seen in {}", root.display());
        assert_eq!(times(&root.join("x/one")).0, T2001, "tar -x, seen in {}", root.display());
        assert_eq!(times(&root.join("x/sub/two")).0, T2001, "tar -x, seen in {}", root.display());
        assert_eq!(times(&root.join("touched")).0, T2001, "touch -d, seen in {}", root.display());
    }
    // The data is all there too.
    assert_eq!(fs::read(b.path.join("copied")).expect("read"), random_bytes(2, 5000));
    assert_eq!(fs::read(b.path.join("x/sub/two")).expect("read"), random_bytes(4, 2000));
    assert_eq!(fs::read(b.path.join("touched")).expect("read"), b"buffered");
}

/// A writer blocked on a down dataserver dies at once on SIGKILL (in `write` or in the flush at
/// close), a thread in `fsync` is interrupted by a signal it handles; the mount keeps serving, and what the
/// killed writer had written lands once the server is back.
#[test]
fn a_writer_blocked_on_a_down_server_can_be_killed_and_the_mount_keeps_working() {
    if !fuse_available("killable writer") {
        return;
    }
    let mut cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    fs::write(mnt.path.join("other"), b"readable").expect("write other");
    cluster.kill(0);

    // Large enough to fill the write-back's jobs: blocks in write(2).
    let big = mnt.path.join("big");
    let mut dd = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", big.display()), "bs=1M", "count=64"])
        .stderr(Stdio::null())
        .spawn()
        .expect("dd");
    // Small (but over every server): everything is buffered, so it blocks in the flush at close.
    let small = mnt.path.join("small");
    let hello = "hello\n".repeat(3000);
    let mut echo = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3>{p}; printf 'hello\\n%.0s' {{1..3000}} >&3; exec 3>&-", p = small.display()))
        .spawn()
        .expect("bash");
    // And a thread blocked in fsync, interrupted by a signal it handles (as Ctrl-C is by a shell
    // or an editor): fsync must return EINTR.
    extern "C" fn ignore(_: i32) {}
    let handler = SigAction::new(SigHandler::Handler(ignore), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(Signal::SIGUSR2, &handler) }.expect("sigaction");
    let (tx, rx) = std::sync::mpsc::channel();
    let synced = mnt.path.join("synced");
    let fsyncer = std::thread::spawn(move || {
        let mut f = File::create(&synced).expect("create synced");
        f.write_all(&random_bytes(6, 256 << 10)).expect("write synced");
        // Not File::sync_all: the standard library retries fsync on EINTR.
        let r = nix::unistd::fsync(&f).map_err(|e| e as i32);
        let _ = tx.send(r);
        // The close that follows waits until the server is back (nobody kills this thread).
    });
    std::thread::sleep(Duration::from_millis(1500));
    for (name, c) in [("dd", &mut dd), ("bash", &mut echo)] {
        assert!(c.try_wait().expect("status").is_none(), "{name} returned while a replica was down");
    }
    assert!(rx.try_recv().is_err(), "fsync returned while a replica was down");
    for c in [&dd, &echo] {
        kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL).expect("signal");
    }
    pthread_kill(fsyncer.as_pthread_t(), Signal::SIGUSR2).expect("pthread_kill");
    for (name, c) in [("dd", &mut dd), ("bash", &mut echo)] {
        assert!(exits_within(c, Duration::from_secs(2)), "{name} survived SIGKILL:\n{}", cluster.logs());
    }
    let fsynced = rx.recv_timeout(Duration::from_secs(2)).expect("fsync still blocked after a signal");
    assert_eq!(fsynced, Err(libc::EINTR));
    // The mount still serves.
    let ls = bounded(10, "ls").arg("-l").arg(&mnt.path).output().expect("ls");
    assert!(ls.status.success(), "ls after the kills");
    assert_eq!(fs::read(mnt.path.join("other")).expect("read other"), b"readable");
    let log = fs::read_to_string(cluster.log_path("fs")).expect("log");
    assert!(log.contains("WARN") && log.contains("waits for dataserver 0"), "no warning names the server:\n{log}");

    // Once the server is back, the data the killed writers handed over lands.
    cluster.start_server(0);
    wait_until("the small file's data to land", Duration::from_secs(60), || {
        fs::read(&small).map(|d| d == hello.as_bytes()).unwrap_or(false)
    });
    let size = fs::metadata(&big).expect("stat big").len();
    assert!(size > 0 && size.is_multiple_of(1 << 20), "big: {size} bytes");
    let ctl = cluster.dfsctl(&["check", "/small"]);
    assert!(ctl.status.success(), "{}", String::from_utf8_lossy(&ctl.stdout));
    within("the interrupted file's close", Duration::from_secs(60), move || fsyncer.join().expect("fsync thread"));
    assert_eq!(fs::read(mnt.path.join("synced")).expect("read synced"), random_bytes(6, 256 << 10));
}

/// A process that exits with the file still open (a shell script's last write) closes it as it
/// exits: that close waits for the data to land as any close does, so once the process has ended,
/// another mount finds the data (close-to-open). Killed, it does not wait (see above).
#[test]
fn a_process_exiting_with_the_file_open_ends_only_once_its_data_landed() {
    if !fuse_available("close at exit") {
        return;
    }
    let mut cluster = TestCluster::start(4, 512, 3);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    cluster.kill(0);
    // 3,000 bytes: six blocks, some of them on dataserver 0. Its stdout is the file, open until
    // it exits (a redirection of one command would be closed when the command is done).
    let hello = "hello\n".repeat(500);
    let f = a.path.join("f");
    let mut writer = Command::new("bash")
        .arg("-c")
        .arg(format!("exec >>{p}; printf 'hello\\n%.0s' {{1..500}}; exit 0", p = f.display()))
        .spawn()
        .expect("bash");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(writer.try_wait().expect("status").is_none(), "the writer ended while its data could not land");
    cluster.start_server(0);
    assert!(exits_within(&mut writer, Duration::from_secs(60)), "the writer did not end:\n{}", cluster.logs());
    assert!(writer.wait().expect("status").success());
    assert_eq!(fs::read(b.path.join("f")).expect("read on b"), hello.as_bytes());
}

#[test]
fn metadata_calls_wait_for_a_down_metaserver_and_can_be_killed() {
    if !fuse_available("metaserver down") {
        return;
    }
    let mut cluster = TestCluster::start(4, 512, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    fs::create_dir(mnt.path.join("src")).expect("mkdir");
    fs::write(mnt.path.join("src/f"), b"x").expect("write");
    cluster.kill_meta();

    // A listing (opendir always reaches the mount) waits, and completes when the metaserver is back.
    let mut ls = Command::new("ls").arg(mnt.path.join("src")).stdout(Stdio::piped()).spawn().expect("ls");
    // A create waits too; this one is killed while it waits.
    let mut touch = Command::new("touch").arg(mnt.path.join("src/new")).spawn().expect("touch");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ls.try_wait().expect("status").is_none(), "ls returned while the metaserver was down");
    assert!(touch.try_wait().expect("status").is_none(), "touch returned while the metaserver was down");
    kill(Pid::from_raw(touch.id() as i32), Signal::SIGKILL).expect("kill");
    assert!(exits_within(&mut touch, Duration::from_secs(2)), "touch survived SIGKILL");
    let log = fs::read_to_string(cluster.log_path("fs")).expect("log");
    assert!(log.contains("waiting for the metaserver"), "no warning names the metaserver:\n{log}");

    cluster.start_meta();
    assert!(exits_within(&mut ls, Duration::from_secs(30)), "ls did not finish after the metaserver returned");
    let out = ls.wait_with_output().expect("ls output");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains('f'), "{}", String::from_utf8_lossy(&out.stdout));
    // And the mount works normally again.
    fs::write(mnt.path.join("src/after"), b"y").expect("write after");
    assert_eq!(fs::read(mnt.path.join("src/after")).expect("read"), b"y");
    let mut f = OpenOptions::new().append(true).open(mnt.path.join("src/f")).expect("open");
    f.write_all(b"z").expect("append");
}

/// A mount whose metaserver is down still unmounts on SIGTERM: ending its session waits for the
/// metaserver only briefly (the session then ends with its lease).
#[test]
fn a_mount_unmounts_on_sigterm_while_its_metaserver_is_down() {
    if !fuse_available("unmount with the metaserver down") {
        return;
    }
    let mut cluster = TestCluster::start(4, 512, 3);
    let mut mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    fs::write(mnt.path.join("f"), b"x").expect("write");
    cluster.kill_meta();
    let status = mnt.stop();
    assert!(status.is_some_and(|s| s.success()), "the mount did not exit by itself within 15 s: {status:?}");
    let mounts = fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(!mounts.contains(&mnt.path.display().to_string()), "still mounted");
}
