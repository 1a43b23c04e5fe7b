//! Client sessions through real mounts: fcntl and flock locks across mounts (exclusion, sharing,
//! FIFO order, a killed holder, the same answers as a local directory), a file removed on one
//! mount while open on another, and the collector after a client killed mid-write. Needs
//! /dev/fuse and root; skips, saying so, where they are absent.
//!
//! fcntl locks belong to a process, so each party here is a process of its own: this test binary
//! run again as `lock_helper`, taking commands on stdin and answering on stdout.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use dfs::client::ports::MetaPort;
use futures::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long an answer that should come may take.
const ANSWER: Duration = Duration::from_secs(20);
/// How long an answer that should not come is waited for.
const NO_ANSWER: Duration = Duration::from_millis(700);

/// A process holding one open file, locking as told.
struct Locker {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
    pid: u32,
}

impl Locker {
    fn start(path: &Path) -> Locker {
        Self::start_two(path, path)
    }

    /// A locker with a second file open too (commands ending in `@2` act on it).
    fn start_two(path: &Path, second: &Path) -> Locker {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "lock_helper", "--ignored", "--nocapture", "--test-threads=1"])
            .env("DFS_LOCK_HELPER", path)
            .env("DFS_LOCK_HELPER2", second)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a lock helper");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                // The harness's "test lock_helper ... " precedes the first answer on its line.
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        let mut l = Locker { child, stdin, answers, pid: 0 };
        l.pid = l.ask("pid").parse().expect("a pid");
        l
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("to the lock helper");
        self.stdin.flush().expect("flush");
    }

    fn answer(&mut self, limit: Duration) -> Option<String> {
        self.answers.recv_timeout(limit).ok()
    }

    fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.answer(ANSWER).unwrap_or_else(|| panic!("no answer to '{cmd}' within {ANSWER:?}"))
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // Bounded: a killed process whose request the mount never answers stays (state D) until
        // the mount goes, which comes after this.
        let start = Instant::now();
        while start.elapsed() < ANSWER && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The lock helper's side (see [`Locker`]): not a test of its own, only run by the others.
#[test]
#[ignore = "a helper process the other tests start"]
fn lock_helper() {
    let Some(path) = std::env::var_os("DFS_LOCK_HELPER") else { return };
    let second = std::env::var_os("DFS_LOCK_HELPER2").unwrap_or_else(|| path.clone());
    let open = || fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the locked file");
    let mut file = open();
    let file2 = fs::OpenOptions::new().read(true).write(true).open(&second).expect("open the second file");
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: a handler that does nothing, installed without SA_RESTART: SIGUSR1 interrupts a
    // waiting fcntl or flock with EINTR instead of killing the helper.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let say = |s: String| println!("@@ {s}");
    for line in std::io::stdin().lines().map_while(Result::ok) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<i64>().ok()).unwrap_or(0);
        let typ = |s: &str| match s {
            "r" => libc::F_RDLCK,
            "w" => libc::F_WRLCK,
            _ => libc::F_UNLCK,
        };
        let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let fd = if w.last() == Some(&"@2") { file2.as_raw_fd() } else { file.as_raw_fd() };
        match w.first().copied() {
            Some("pid") => say(std::process::id().to_string()),
            // SAFETY: gettid has no preconditions.
            Some("tid") => say(unsafe { libc::gettid() }.to_string()),
            Some(cmd @ ("setlk" | "setlkw" | "getlk" | "ofdsetlk")) => {
                // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = typ(w[1]) as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = num(2);
                fl.l_len = num(3);
                let op = match cmd {
                    "setlk" => libc::F_SETLK,
                    "ofdsetlk" => libc::F_OFD_SETLK,
                    "setlkw" => libc::F_SETLKW,
                    _ => libc::F_GETLK,
                };
                // SAFETY: fcntl with a valid descriptor and a pointer to a live flock.
                let r = unsafe { libc::fcntl(fd, op, &mut fl) };
                say(match (r, cmd) {
                    (-1, _) => format!("err {}", errno()),
                    (_, "getlk") if i32::from(fl.l_type) == libc::F_UNLCK => "unlocked".into(),
                    (_, "getlk") => format!(
                        "{} {} {} pid {}",
                        if i32::from(fl.l_type) == libc::F_WRLCK { "w" } else { "r" },
                        fl.l_start,
                        fl.l_len,
                        fl.l_pid
                    ),
                    _ => "ok".into(),
                });
            }
            // The same, on a thread of its own: the answer comes when the call returns, and the
            // process takes other commands meanwhile.
            Some("bgsetlkw") => {
                let (t, start, len) = (typ(w[1]) as i16, num(2), num(3));
                std::thread::spawn(move || {
                    // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
                    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                    (fl.l_type, fl.l_whence, fl.l_start, fl.l_len) = (t, libc::SEEK_SET as i16, start, len);
                    // SAFETY: fcntl with a descriptor open for the helper's life and a live flock.
                    let r = unsafe { libc::fcntl(fd, libc::F_SETLKW, &mut fl) };
                    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    println!("@@ {}", if r == -1 { format!("err {e}") } else { "ok".into() });
                });
            }
            Some("flock") => {
                let mut op = match w[1] {
                    "sh" => libc::LOCK_SH,
                    "ex" => libc::LOCK_EX,
                    _ => libc::LOCK_UN,
                };
                if w.get(2) == Some(&"nb") {
                    op |= libc::LOCK_NB;
                }
                // SAFETY: flock on a valid descriptor.
                let r = unsafe { libc::flock(fd, op) };
                say(if r == -1 { format!("err {}", errno()) } else { "ok".into() });
            }
            Some("close") => {
                // Another descriptor of the file, closed: POSIX drops this process's fcntl locks.
                drop(open());
                say("ok".into());
            }
            Some("reopen") => {
                file = open();
                say("ok".into());
            }
            Some("write") => {
                let text = w.get(1).copied().unwrap_or_default();
                let r = std::os::unix::fs::FileExt::write_all_at(&file, text.as_bytes(), 0);
                say(r.map_or_else(|e| format!("err {e}"), |()| "ok".into()));
            }
            _ => say(format!("unknown command {line}")),
        }
    }
}

fn cluster_with_lease(lease: u64) -> TestCluster {
    TestCluster::start_full(4, 4096, 3, &[], &["--session-lease", &lease.to_string()])
}

/// A cluster (10 s leases) mounted twice, at `a` and `b`. Bind the three in this order: the mounts
/// then go (unmount) before the cluster.
fn two_mounts() -> (TestCluster, Mount, Mount) {
    let cluster = cluster_with_lease(10);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    (cluster, a, b)
}

/// Waits until the metaserver has `n` lock requests queued.
fn wait_queued(c: &dfs::client::Cluster, n: u32) {
    wait_until(&format!("{n} lock requests queued"), Duration::from_secs(20), || {
        c.clients().expect("clients").iter().map(|r| r.waiting).sum::<u32>() == n
    });
}

#[test]
fn two_mounts_exclude_share_and_see_each_others_locks() {
    if !fuse_available("locks across mounts") {
        return;
    }
    let (_cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"0123456789abcdefghij").expect("create f");
    fs::write(a.path.join("g"), b"").expect("create g");
    let (mut pa, mut pb) = (Locker::start(&a.path.join("f")), Locker::start(&b.path.join("f")));
    let eagain = format!("err {}", libc::EAGAIN);

    // fcntl: a write lock excludes, F_GETLK names its holder, other bytes are free.
    assert_eq!(pa.ask("setlk w 0 10"), "ok");
    assert_eq!(pb.ask("setlk w 5 10"), eagain);
    assert_eq!(pb.ask("setlk r 9 1"), eagain);
    assert_eq!(pb.ask("getlk w 5 10"), format!("w 0 10 pid {}", pa.pid));
    assert_eq!(pb.ask("setlk r 10 10"), "ok");
    assert_eq!(pa.ask("getlk w 0 0"), format!("r 10 10 pid {}", pb.pid));
    // Read locks share; a write lock waits for both.
    assert_eq!(pa.ask("setlk r 0 10"), "ok", "downgrade");
    assert_eq!(pb.ask("setlk r 0 5"), "ok");
    assert_eq!(pb.ask("getlk r 0 10"), "unlocked");
    assert_eq!(pb.ask("setlk w 0 5"), eagain);
    // Closing any descriptor of the file drops the process's fcntl locks there.
    assert_eq!(pa.ask("close"), "ok");
    assert_eq!(pb.ask("setlk w 0 10"), "ok");
    assert_eq!(pa.ask("getlk r 0 1"), format!("w 0 10 pid {}", pb.pid));

    // An open file description's lock (OFD) goes with its last close.
    assert_eq!(pb.ask("setlk u 0 0"), "ok");
    assert_eq!(pa.ask("ofdsetlk w 0 5"), "ok");
    assert_eq!(pb.ask("setlk w 0 1"), eagain);
    assert_eq!(pa.ask("reopen"), "ok");
    wait_until("the OFD lock goes with its file", Duration::from_secs(10), || pb.ask("setlk w 0 1") == "ok");

    // flock: exclusive excludes, shared shares, non-blocking attempts get EWOULDBLOCK.
    let (mut fa, mut fb) = (Locker::start(&a.path.join("g")), Locker::start(&b.path.join("g")));
    assert_eq!(fa.ask("flock ex nb"), "ok");
    assert_eq!(fb.ask("flock ex nb"), eagain);
    assert_eq!(fb.ask("flock sh nb"), eagain);
    assert_eq!(fa.ask("flock sh nb"), "ok", "converted to shared");
    assert_eq!(fb.ask("flock sh nb"), "ok", "shared shares");
    assert_eq!(fa.ask("flock ex nb"), eagain);
    // A blocking request waits for the holder, and gets the lock when it goes.
    fb.send("flock ex");
    assert_eq!(fb.answer(NO_ANSWER), None, "granted while another mount holds it shared");
    assert_eq!(fa.ask("flock un"), "ok");
    assert_eq!(fb.answer(ANSWER).as_deref(), Some("ok"));
    // The process exits: its open file's flock goes with the release the kernel sends after the
    // last close, which comes on its own.
    drop(fb);
    wait_until("the exited process's flock goes", Duration::from_secs(10), || fa.ask("flock ex nb") == "ok");
}

/// A waiting request is interrupted by a signal (EINTR) and withdrawn; a wait that would close a
/// cycle of waiters across mounts is refused (EDEADLK) instead of hanging both.
#[test]
fn a_signal_interrupts_a_wait_and_a_deadlock_across_mounts_is_refused() {
    if !fuse_available("EINTR and EDEADLK") {
        return;
    }
    let (cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"").expect("create f");
    fs::write(a.path.join("g"), b"").expect("create g");
    let c = cluster.client();
    let mut pa = Locker::start_two(&a.path.join("f"), &a.path.join("g"));
    let mut pb = Locker::start_two(&b.path.join("f"), &b.path.join("g"));
    assert_eq!(pa.ask("setlk w 0 0"), "ok");
    // The signal goes to the thread that waits: one sent to the process may be taken by another.
    let tid: libc::pid_t = pb.ask("tid").parse().expect("a thread id");
    pb.send("setlkw w 0 0");
    wait_queued(&c, 1);
    // SAFETY: tgkill with a live child's pid and one of its threads.
    assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, pb.pid as libc::pid_t, tid, libc::SIGUSR1) }, 0);
    assert_eq!(pb.answer(ANSWER), Some(format!("err {}", libc::EINTR)));
    wait_queued(&c, 0);
    // Across two files: a holds f and waits for g; b holds g and asks for f.
    assert_eq!(pb.ask("setlk w 0 0 @2"), "ok");
    pa.send("setlkw w 0 0 @2");
    wait_queued(&c, 1);
    assert_eq!(pb.ask("setlkw w 0 0"), format!("err {}", libc::EDEADLK));
    assert_eq!(pb.ask("setlk u 0 0 @2"), "ok");
    assert_eq!(pa.answer(ANSWER).as_deref(), Some("ok"), "a gets g once b lets go");
}

/// An unlock is never answered EINTR, nor reported done before it is: one asked while the
/// metaserver is down goes on when it is back, whatever signal its caller gets meanwhile. (It was
/// withdrawn like a waiting request and answered from whether the lock was still held: "done",
/// with the lock kept.)
#[test]
fn an_unlock_interrupted_while_the_metaserver_is_down_is_done_once_it_is_back() {
    if !fuse_available("an interrupted unlock") {
        return;
    }
    let (mut cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"").expect("create f");
    let (mut pa, mut pb) = (Locker::start(&a.path.join("f")), Locker::start(&b.path.join("f")));
    assert_eq!(pa.ask("setlk w 0 0"), "ok");
    let tid: libc::pid_t = pa.ask("tid").parse().expect("a thread id");
    cluster.kill_meta();
    pa.send("setlk u 0 0");
    assert_eq!(pa.answer(NO_ANSWER), None, "answered while the metaserver is down");
    // SAFETY: tgkill with a live child's pid and one of its threads.
    assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, pa.pid as libc::pid_t, tid, libc::SIGUSR1) }, 0);
    assert_eq!(pa.answer(NO_ANSWER), None, "answered while the metaserver is down");
    cluster.start_meta();
    assert_eq!(pa.answer(ANSWER).as_deref(), Some("ok"));
    assert_eq!(pb.ask("setlk w 0 0"), "ok", "the unlocked range is free");
}

/// A process killed while it holds an fcntl lock and the metaserver is down ends at once, and its
/// lock goes once the metaserver is back, after what it wrote under the lock has landed. The
/// close of a dying process (which the kernel waits for) released the lock through the
/// metaserver, waiting for it to come back: the process could not end meanwhile.
#[test]
fn a_process_killed_holding_a_lock_while_the_metaserver_is_down_ends_at_once() {
    if !fuse_available("a killed lock holder") {
        return;
    }
    let (mut cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"old").expect("create f");
    let (mut pa, mut pb) = (Locker::start(&a.path.join("f")), Locker::start(&b.path.join("f")));
    assert_eq!(pa.ask("setlk w 0 0"), "ok");
    // Written under the lock, and not landed: every dataserver is down.
    assert_eq!(pa.ask("write new"), "ok");
    for i in 0..4 {
        cluster.kill(i);
    }
    cluster.kill_meta();
    pa.child.kill().expect("SIGKILL the holder");
    let killed = Instant::now();
    while !matches!(pa.child.try_wait(), Ok(Some(_))) {
        assert!(killed.elapsed() < Duration::from_secs(5), "the killed holder did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.start_meta();
    pb.send("setlkw w 0 0");
    assert_eq!(pb.answer(NO_ANSWER), None, "the lock went before the holder's writes landed");
    for i in 0..4 {
        cluster.start_server(i);
    }
    assert_eq!(pb.answer(ANSWER).as_deref(), Some("ok"), "the killed holder's lock went");
    assert_eq!(fs::read(b.path.join("f")).expect("read"), b"new");
}

/// A process's fcntl lock granted after another of its threads closed a descriptor of the file
/// (which released the process's locks and withdrew its waiting request, sent again by the mount)
/// goes at the process's next close, as on Linux. It used to outlive every close.
#[test]
fn a_lock_granted_after_another_thread_closed_the_file_goes_at_the_next_close() {
    if !fuse_available("a lock granted after a close") {
        return;
    }
    let (cluster, a, b) = two_mounts();
    fs::write(a.path.join("f"), b"").expect("create f");
    let c = cluster.client();
    let (mut pa, mut pb) = (Locker::start(&a.path.join("f")), Locker::start(&b.path.join("f")));
    let eagain = format!("err {}", libc::EAGAIN);
    assert_eq!(pb.ask("setlk w 0 0"), "ok");
    pa.send("bgsetlkw w 0 0");
    wait_queued(&c, 1);
    assert_eq!(pa.ask("close"), "ok");
    // The close withdrew the waiting request; the mount asks again.
    wait_queued(&c, 1);
    assert_eq!(pb.ask("setlk u 0 0"), "ok");
    assert_eq!(pa.answer(ANSWER).as_deref(), Some("ok"), "the waiting thread gets the lock");
    assert_eq!(pb.ask("setlk w 0 0"), eagain);
    assert_eq!(pa.ask("close"), "ok");
    assert_eq!(pb.ask("setlk w 0 0"), "ok", "the lock outlived the process's close");
}

/// Takes (`lock`) or gives up a whole-file write lock on `f`: `flock`, an OFD lock, or the
/// process's fcntl lock; waits for it.
fn whole_file(f: &fs::File, kind: &str, lock: bool) {
    let fd = f.as_raw_fd();
    let r = if kind == "flock" {
        // SAFETY: flock on a valid descriptor.
        unsafe { libc::flock(fd, if lock { libc::LOCK_EX } else { libc::LOCK_UN }) }
    } else {
        // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        let op = if kind == "ofd" { libc::F_OFD_SETLKW } else { libc::F_SETLKW };
        // SAFETY: fcntl with a valid descriptor and a pointer to a live flock.
        unsafe { libc::fcntl(fd, op, &mut fl) }
    };
    assert_eq!(r, 0, "{kind} lock={lock}: {}", std::io::Error::last_os_error());
}

/// A lock hands a file over between mounts: a counter in a file, read and rewritten under a lock
/// by a thread on each mount, counts every increment, whether the lock is a `flock` or an OFD
/// lock given up while the file stays open, or a process's fcntl lock that goes with the close.
/// Regression: an unlock (and a close's) reached the metaserver before the writes made under the
/// lock had landed, and the next holder read what its kernel had cached: about half of the
/// increments were lost.
#[test]
fn writes_made_under_a_lock_are_what_the_next_holder_on_another_mount_reads() {
    if !fuse_available("locks handing a file over") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let (_cluster, a, b) = two_mounts();
    const EACH: u64 = 60;
    for kind in ["flock", "ofd", "fcntl-close"] {
        fs::write(a.path.join("n"), format!("{:16}\n", 0)).expect("reset the counter");
        let count = |path: std::path::PathBuf| {
            std::thread::spawn(move || {
                let open = || fs::OpenOptions::new().read(true).write(true).open(&path).expect("open the counter");
                let mut kept = (kind != "fcntl-close").then(open);
                for _ in 0..EACH {
                    let f = kept.take().unwrap_or_else(open);
                    whole_file(&f, kind, true);
                    let mut buf = [0u8; 17];
                    f.read_exact_at(&mut buf, 0).expect("read the counter");
                    let n: u64 = String::from_utf8_lossy(&buf).trim().parse().expect("a number");
                    f.write_all_at(format!("{:16}\n", n + 1).as_bytes(), 0).expect("write the counter");
                    if kind != "fcntl-close" {
                        whole_file(&f, kind, false);
                        kept = Some(f);
                    }
                }
            })
        };
        let (ta, tb) = (count(a.path.join("n")), count(b.path.join("n")));
        ta.join().expect("the counter on a");
        tb.join().expect("the counter on b");
        let n = fs::read_to_string(b.path.join("n")).expect("read the counter");
        assert_eq!(n.trim(), (2 * EACH).to_string(), "{kind}: increments lost");
    }
}

#[test]
fn waiters_on_three_mounts_are_granted_in_arrival_order() {
    if !fuse_available("FIFO locks") {
        return;
    }
    let cluster = cluster_with_lease(10);
    let mounts: Vec<Mount> =
        ["a", "b", "c"].iter().map(|m| Mount::start(&cluster, &cluster.dir.path().join(m), m)).collect();
    fs::write(mounts[0].path.join("f"), b"").expect("create");
    let c = cluster.client();
    let mut holder = Locker::start(&mounts[0].path.join("f"));
    assert_eq!(holder.ask("flock ex"), "ok");
    // A writer, then a reader, then a writer, each from another mount; the reader must not pass
    // the first writer although it is compatible with nothing held after the holder goes.
    let mut w: Vec<Locker> = (0..3).map(|i| Locker::start(&mounts[(i + 1) % 3].path.join("f"))).collect();
    for (i, cmd) in ["flock ex", "flock sh", "flock ex"].iter().enumerate() {
        w[i].send(cmd);
        wait_queued(&c, i as u32 + 1);
    }
    assert_eq!(holder.ask("flock un"), "ok");
    for i in 0..3 {
        assert_eq!(w[i].answer(ANSWER).as_deref(), Some("ok"), "waiter {i} granted");
        for (j, later) in w.iter_mut().enumerate().skip(i + 1) {
            assert_eq!(later.answer(NO_ANSWER), None, "waiter {j} granted before waiter {i} let go");
        }
        assert_eq!(w[i].ask("flock un"), "ok");
    }
}

/// Requests that wait do not hold the mount's worker threads: with two of them, three processes
/// waiting for a lock leave the holder's unlock served, and each waiter gets
/// the lock in turn. Regression: each waiter held a worker, and the holder's unlock never came.
#[test]
fn waiters_leave_the_mounts_threads_to_the_holder() {
    if !fuse_available("lock waits and the mount's threads") {
        return;
    }
    let cluster = cluster_with_lease(10);
    let m = Mount::start_with(&cluster, &cluster.dir.path().join("a"), "a", &["--threads", "2"]);
    fs::write(m.path.join("f"), b"").expect("create");
    let c = cluster.client();
    let mut holder = Locker::start(&m.path.join("f"));
    let mut waiters: Vec<Locker> = (0..3).map(|_| Locker::start(&m.path.join("f"))).collect();
    assert_eq!(holder.ask("flock ex"), "ok");
    for (i, w) in waiters.iter_mut().enumerate() {
        w.send("flock ex");
        wait_queued(&c, i as u32 + 1);
    }
    // Answered only if a worker is free (the waiters are killed at the end either way, which
    // ends their waits and frees the workers they held).
    assert_eq!(holder.ask("flock un"), "ok");
    for (i, w) in waiters.iter_mut().enumerate() {
        assert_eq!(w.answer(ANSWER).as_deref(), Some("ok"), "waiter {i} granted");
        assert_eq!(w.ask("flock un"), "ok");
    }
}

#[test]
fn a_killed_holders_locks_go_within_its_lease_and_the_waiter_proceeds() {
    if !fuse_available("killed lock holder") {
        return;
    }
    let lease = 3;
    let cluster = cluster_with_lease(lease);
    let mut a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    fs::write(a.path.join("f"), b"x").expect("create");
    let mut holder = Locker::start(&a.path.join("f"));
    assert_eq!(holder.ask("setlk w 0 0"), "ok");
    let mut waiter = Locker::start(&b.path.join("f"));
    waiter.send("setlkw w 0 0");
    wait_queued(&cluster.client(), 1);
    let killed = Instant::now();
    a.kill9();
    assert_eq!(waiter.answer(Duration::from_secs(lease + 10)).as_deref(), Some("ok"));
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(lease + 2), "granted {took:?} after the holder's mount died");
    drop(holder);
}

/// A metaserver that stood still for longer than a lease (stopped, or its machine paused) gives
/// every session a whole lease again before it expires any: the mounts could not renew meanwhile,
/// and their heartbeats wait in its sockets.
#[test]
fn a_metaserver_that_stood_still_past_a_lease_expires_no_live_session() {
    if !fuse_available("a metaserver that stood still") {
        return;
    }
    let lease = 2;
    let cluster = cluster_with_lease(lease);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    fs::write(a.path.join("f"), b"x").expect("create");
    let fa = fs::File::open(a.path.join("f")).expect("open on a");
    whole_file(&fa, "flock", true);
    cluster.signal_meta(nix::sys::signal::Signal::SIGSTOP);
    let stopped = OnDrop(|| cluster.signal_meta(nix::sys::signal::Signal::SIGCONT));
    std::thread::sleep(Duration::from_secs(lease * 3));
    drop(stopped);
    // Past another lease the live mount has renewed, and still holds its lock.
    let fb = fs::File::open(b.path.join("f")).expect("open on b");
    let until = Instant::now() + Duration::from_secs(lease + 2);
    while Instant::now() < until {
        // SAFETY: flock on a valid descriptor.
        let got = unsafe { libc::flock(fb.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        assert!(!got, "the lock went with a live session's: {}", cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    whole_file(&fa, "flock", false);
    drop((fa, fb));
}

/// A mount cut off for longer than its session's lease loses its locks to the other mounts. A
/// process there that goes on writing through the file it locked, believing it still holds the
/// lock, is told (EIO) instead of racing the new holder unawares, until it locks or unlocks again.
#[test]
fn a_write_through_a_lock_that_went_with_an_expired_session_is_refused_until_unlocked() {
    if !fuse_available("a lock lost with its session") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let lease = 2;
    let cluster = cluster_with_lease(lease);
    let a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    fs::write(a.path.join("f"), b"0123456789").expect("create");
    let fa = fs::OpenOptions::new().read(true).write(true).open(a.path.join("f")).expect("open on a");
    whole_file(&fa, "flock", true);
    fa.write_all_at(b"a", 0).expect("a write under the lock");
    // The mount's daemon stops renewing its session (and answering): the session expires.
    let pid = a.pid().expect("a's daemon") as i32;
    // SAFETY: signals to a child process this test started; `stopped` continues it.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = OnDrop(|| {
        let _ = unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let fb = fs::OpenOptions::new().read(true).write(true).open(b.path.join("f")).expect("open on b");
    wait_until("the lock to go with the expired session", Duration::from_secs(lease + 20), || {
        // SAFETY: flock on a valid descriptor.
        unsafe { libc::flock(fb.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    });
    drop(stopped);
    wait_until("a write through the lost lock to be refused", Duration::from_secs(20), || {
        fa.write_all_at(b"a", 0).err().and_then(|e| e.raw_os_error()) == Some(libc::EIO)
    });
    assert_eq!(fa.write_all_at(b"a", 0).map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "refused again");
    whole_file(&fa, "flock", false);
    fa.write_all_at(b"a", 0).expect("a write after the process unlocked");
    drop((fa, fb));
}

/// The same random sequence of fcntl locks, unlocks and tests from two processes gives the same
/// answers on a local directory and across two mounts (holders' pids named by party).
#[test]
fn byte_range_locks_answer_as_on_a_local_directory() {
    if !fuse_available("lock differential") {
        return;
    }
    let (cluster, a, b) = two_mounts();
    let local = cluster.dir.path().join("local");
    fs::create_dir_all(&local).expect("local dir");
    fs::write(local.join("f"), b"").expect("local file");
    fs::write(a.path.join("f"), b"").expect("dfs file");
    let mut rng = StdRng::seed_from_u64(20261202);
    let ops: Vec<(usize, String)> = (0..150)
        .map(|_| {
            let (start, len) = (rng.random_range(0..40), rng.random_range(0..12));
            let op = match rng.random_range(0..10) {
                0..=3 => format!("setlk w {start} {len}"),
                4..=6 => format!("setlk r {start} {len}"),
                7 => format!("setlk u {start} {len}"),
                _ => format!("getlk {} {start} {len}", if rng.random_bool(0.5) { "w" } else { "r" }),
            };
            (rng.random_range(0..2), op)
        })
        .collect();
    let run = |paths: [&Path; 2]| -> Vec<String> {
        let mut p = [Locker::start(paths[0]), Locker::start(paths[1])];
        let names: HashMap<u32, &str> = [(p[0].pid, "A"), (p[1].pid, "B")].into_iter().collect();
        ops.iter()
            .map(|(who, op)| {
                let a = p[*who].ask(op);
                let a = match a.rsplit_once("pid ") {
                    Some((head, pid)) => format!("{head}pid {}", names.get(&pid.parse().unwrap_or(0)).unwrap_or(&"?")),
                    None => a,
                };
                format!("{} {op}: {a}", if *who == 0 { "A" } else { "B" })
            })
            .collect()
    };
    let here = run([&local.join("f"), &local.join("f")]);
    let there = run([&a.path.join("f"), &b.path.join("f")]);
    for (l, d) in here.iter().zip(&there) {
        assert_eq!(l, d, "local directory vs two mounts");
    }
    assert!(
        here.iter().any(|l| l.contains("pid B")) && here.iter().any(|l| l.ends_with(&format!("err {}", libc::EAGAIN)))
    );
}

/// POSIX, unlike NFS: a file removed through one mount stays readable and writable through a
/// descriptor open on another until that closes; then its blocks are freed.
#[test]
fn a_file_removed_on_one_mount_lives_while_open_on_another() {
    if !fuse_available("removed while open") {
        return;
    }
    let (cluster, a, b) = two_mounts();
    let c = cluster.client();
    let blocks = || -> u64 { (0..4).map(|i| c.server_status(i).expect("rpc").expect("status").blocks).sum() };
    let before = blocks();
    let data = random_bytes(3, 3 * 4096);
    fs::write(a.path.join("f"), &data).expect("write on a");
    let f = fs::OpenOptions::new().read(true).write(true).open(b.path.join("f")).expect("open on b");
    let ino = f.metadata().expect("fstat").ino();
    fs::remove_file(a.path.join("f")).expect("unlink on a");
    // Both mounts report their open files every second: give them time to hand the orphan out
    // if they (wrongly) would.
    std::thread::sleep(Duration::from_secs(3));
    use std::os::unix::fs::FileExt;
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).expect("read the removed file on b");
    assert_eq!(back, data);
    f.write_all_at(b"still here", 4096).expect("write the removed file on b");
    f.sync_all().expect("fsync");
    let mut part = vec![0u8; 10];
    f.read_exact_at(&mut part, 4096).expect("read back");
    assert_eq!(&part, b"still here");
    assert_eq!(c.orphans().expect("orphans"), vec![ino]);
    drop(f);
    wait_until("the removed file's blocks are freed after its last close", Duration::from_secs(30), || {
        blocks() == before && c.orphans().expect("orphans").is_empty()
    });
}

/// A client killed while writing leaves blocks no inode references (past the sizes it recorded);
/// once its session expired, `dfsctl gc` removes exactly those: afterwards nothing unreferenced is
/// left and every file reads back whole, every replica present.
#[test]
fn gc_after_a_client_killed_mid_write_removes_only_unreferenced_blocks() {
    if !fuse_available("gc after a killed writer") {
        return;
    }
    let cluster = cluster_with_lease(2);
    let mut a = Mount::start(&cluster, &cluster.dir.path().join("a"), "fsa");
    let keep = random_bytes(9, 5 * 4096 + 17);
    fs::write(a.path.join("keep"), &keep).expect("write keep");
    // Writers that never stop, killed with their mount.
    let mut writers: Vec<std::process::Child> = (0..4)
        .map(|i| {
            Command::new("dd")
                .args(["if=/dev/urandom", &format!("of={}/w{i}", a.path.display()), "bs=64k", "count=100000"])
                .stderr(Stdio::null())
                .spawn()
                .expect("dd")
        })
        .collect();
    let c = cluster.client();
    wait_until("the writers wrote", Duration::from_secs(30), || {
        (0..4).all(|i| fs::metadata(a.path.join(format!("w{i}"))).map(|m| m.len() > 1 << 20).unwrap_or(false))
    });
    a.kill9();
    for w in &mut writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    wait_until("the killed client's session expired", Duration::from_secs(30), || {
        c.clients().expect("clients").is_empty()
    });
    // Which replicas each file lacks (a client killed between a block's replicas may leave some
    // short), then what it reads as. A read repairs short blocks, so afterwards a file may lack
    // fewer replicas, never more: the collector removes none within a file's size.
    let files: Vec<u64> =
        ["keep", "w0", "w1", "w2", "w3"].iter().map(|n| c.resolve(&format!("/{n}")).expect("resolve").ino).collect();
    let lacking = || -> Vec<std::collections::BTreeSet<String>> {
        files
            .iter()
            .map(|&ino| {
                let problems = c.check(ino).expect("check");
                problems.iter().flat_map(|(b, rs)| rs.iter().map(move |(s, st)| format!("{b}/{s}/{st:?}"))).collect()
            })
            .collect()
    };
    let contents = || -> Vec<Vec<u8>> {
        files.iter().map(|&ino| c.read(ino, 0, c.getattr(ino).expect("getattr").size).expect("read")).collect()
    };
    let (short_before, read_before) = (lacking(), contents());
    // The failures the collector is for, made on purpose too (a kill does not always leave them):
    // a truncate whose blocks were not cut (5 blocks of `cut` past its recorded size), and a file
    // forgotten before its blocks were freed (`lost`, 4 blocks).
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    fs::write(b.path.join("cut"), random_bytes(4, 6 * 4096)).expect("write cut");
    fs::write(b.path.join("lost"), random_bytes(5, 4 * 4096)).expect("write lost");
    drop(b);
    let (cut, lost) = (c.resolve("/cut").expect("cut").ino, c.resolve("/lost").expect("lost").ino);
    c.run(move |l| {
        async move {
            let set = dfs::shared::SetAttr { size: Some(4096), ..Default::default() };
            l.meta.setattr(cut, &set).await.expect("record a smaller size only");
            l.meta.unlink(dfs::shared::ROOT, b"lost").await.expect("unlink");
            l.meta.purge(&[lost]).await.expect("forget it, its blocks left behind");
        }
        .boxed_local()
    })
    .expect("run");
    wait_until("the second mount's session ended", Duration::from_secs(30), || {
        c.clients().expect("clients").is_empty()
    });
    // Nothing is older than a year: a collection with that window only counts.
    let dry = c.collect(Duration::from_secs(365 * 86_400)).expect("count");
    assert!(dry.blocks_too_young >= 3 * (5 + 4), "{dry:?}");
    assert_eq!(dry.blocks_removed, 0);
    let out = cluster.dfsctl(&["gc", "--window", "0"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "dfsctl gc: {text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("dfsctl gc after the kill:\n{text}");
    assert!(text.contains(&format!("blocks unreferenced: {0} (removed: {0})", dry.blocks_too_young)), "{text}");
    let again = c.collect(Duration::ZERO).expect("collect");
    assert_eq!((again.blocks_unreferenced, again.blocks_too_young), (0, 0), "{again:?}");
    assert_eq!(c.read(cut, 0, 4096).expect("read cut"), random_bytes(4, 6 * 4096)[..4096].to_vec());
    assert!(read_before == contents(), "the collector changed what a file reads");
    for (i, (after, before)) in lacking().iter().zip(&short_before).enumerate() {
        assert!(after.is_subset(before), "file {i} lacks replicas it had before collecting: {after:?} vs {before:?}");
    }
    let b = Mount::start(&cluster, &cluster.dir.path().join("b"), "fsb");
    assert_eq!(fs::read(b.path.join("keep")).expect("read keep"), keep);
    drop(b);
}
