//! A real cluster for tests: the built binaries on free ports, in a temp dir, each process logging to
//! its own file, every wait bounded and polling, everything killed by PID on drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dfs::client::engine::Backoff;
use dfs::client::Cluster;

/// A port no server listens on, never the same twice in this process: tests run in parallel, and a
/// port is only taken when the server binds it, so two clusters could otherwise be handed one port
/// (one cluster's ring would then name another's server, which refuses it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_port(port: u16) {
    wait_until(&format!("port {port}"), Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// Seeded pseudo-random bytes (the seed is part of every test's name or message).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub meta_port: u16,
    pub ports: Vec<u16>,
    pub block_size: u32,
    pub replicas: u8,
    meta: Option<Child>,
    data: Vec<Option<Child>>,
    /// Dataserver and metaserver starts so far (each start logs to a file of its own).
    starts: usize,
    meta_starts: usize,
    /// Extra dataserver flags (e.g. --max-bandwidth).
    server_args: Vec<String>,
}

pub fn spawn(bin: &str, args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // If the test process dies without running Drop (an abort), its servers must not outlive it.
    // SAFETY: the closure runs between fork and exec and only makes the prctl system call.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("start {bin}: {e}"))
}

impl TestCluster {
    pub fn start(n: usize, block_size: u32, replicas: u8) -> TestCluster {
        Self::start_with(n, block_size, replicas, &[])
    }

    pub fn start_with(n: usize, block_size: u32, replicas: u8, server_args: &[&str]) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let mut c = TestCluster {
            dir,
            meta_port: free_port(),
            ports: (0..n).map(|_| free_port()).collect(),
            block_size,
            replicas,
            meta: None,
            data: (0..n).map(|_| None).collect(),
            starts: 0,
            meta_starts: 0,
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
        };
        c.start_meta();
        for i in 0..n {
            c.start_server(i);
        }
        wait_port(c.meta_port);
        // New stores first copy from their peers (a server cannot tell a new disk from a replaced
        // one); that is instant on an empty cluster, but tests start from a settled one.
        let client = c.client();
        wait_until("every dataserver's store complete", Duration::from_secs(30), || {
            (0..n).all(|i| matches!(client.server_status(i), Ok(Ok(s)) if !s.rebuilding))
        });
        c
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("ds{i}"))
    }

    pub fn ring_args(&self) -> Vec<String> {
        self.ports.iter().map(|p| p.to_string()).collect()
    }

    pub fn ring(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// The metaserver's command line.
    pub fn meta_args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.dir.path().join("meta").display().to_string(),
            "--block-size".into(),
            self.block_size.to_string(),
            "--replicas".into(),
            self.replicas.to_string(),
            self.meta_port.to_string(),
        ]
    }

    /// Starts (or restarts) the metaserver; does not wait for it to listen.
    pub fn start_meta(&mut self) {
        assert!(self.meta.is_none(), "the metaserver is already running");
        self.meta_starts += 1;
        let log = self.log_path(&format!("meta-{}", self.meta_starts));
        self.meta = Some(spawn(env!("CARGO_BIN_EXE_metaserver"), &self.meta_args(), &log));
    }

    /// SIGKILLs the metaserver and reaps it.
    pub fn kill_meta(&mut self) {
        if let Some(mut m) = self.meta.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    /// Starts (or restarts) dataserver `i` and waits until it listens.
    pub fn start_server(&mut self, i: usize) {
        let ring = self.ring_args();
        self.start_server_with_ring(i, &ring);
    }

    /// Starts dataserver `i` with the ring given on its command line (a wrong one, in some tests).
    pub fn start_server_with_ring(&mut self, i: usize, ring: &[String]) {
        assert!(self.data[i].is_none(), "dataserver {i} is already running");
        let mut args = self.server_args.clone();
        args.extend(["--data-dir".into(), self.data_dir(i).display().to_string(), i.to_string()]);
        args.extend(ring.iter().cloned());
        self.starts += 1;
        let log = self.log_path(&format!("ds{i}-{}", self.starts));
        self.data[i] = Some(spawn(env!("CARGO_BIN_EXE_dataserver"), &args, &log));
        wait_port(self.ports[i]);
    }

    /// SIGKILLs dataserver `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.data[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills dataserver `i` and deletes its data dir: a replaced disk.
    pub fn wipe(&mut self, i: usize) {
        self.kill(i);
        std::fs::remove_dir_all(self.data_dir(i)).expect("wipe data dir");
    }

    pub fn client(&self) -> Cluster {
        Cluster::connect(&self.meta_port.to_string(), Some(&self.ring()), fast_backoff()).expect("connect to cluster")
    }

    pub fn dfsctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dfsctl"))
            .arg("--meta")
            .arg(self.meta_port.to_string())
            .args(args)
            .output()
            .expect("run dfsctl")
    }

    /// Whether `dfsctl status` reports dataserver `i` up with its store complete.
    pub fn server_complete(&self, i: usize) -> bool {
        let out = self.dfsctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .any(|l| l.starts_with(&format!("dataserver {i} ")) && l.contains(" up ") && l.ends_with("complete"))
    }

    /// Every log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("logs")) {
            for e in rd.flatten() {
                s +=
                    &format!("--- {}\n{}\n", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        s
    }
}

pub fn fast_backoff() -> Backoff {
    Backoff { first: Duration::from_millis(20), max: Duration::from_millis(200) }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.data.len() {
            self.kill(i);
        }
        self.kill_meta();
        if std::thread::panicking() && std::env::var_os("DFS_TEST_LOGS").is_some() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Whether FUSE tests can run here; prints why not if they cannot.
pub fn fuse_available(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping {test}: /dev/fuse is absent");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: mounting without fusermount3 needs root");
        return false;
    }
    true
}

pub fn is_mounted(mp: &Path) -> bool {
    let mp = mp.display().to_string();
    std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some(&mp))
}

/// A `distributedfs` mount of a test cluster; unmounted (never left behind) on drop.
pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    pub fn start(cluster: &TestCluster, path: &Path, name: &str) -> Mount {
        std::fs::create_dir_all(path).ok();
        let mut args = vec![path.display().to_string(), cluster.meta_port.to_string()];
        args.extend(cluster.ring_args());
        let child = spawn(env!("CARGO_BIN_EXE_distributedfs"), &args, &cluster.log_path(name));
        let mut m = Mount { path: path.to_path_buf(), child: Some(child) };
        let start = Instant::now();
        // A stale mount (daemon killed) is listed too, but answers ENOTCONN: wait for a live one.
        // (statfs always reaches the daemon; stat may be answered from the kernel's cache.)
        while !(is_mounted(path) && nix::sys::statfs::statfs(path).is_ok()) {
            if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!("distributedfs exited with {status}:\n{}", cluster.logs());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "mount did not appear:\n{}", cluster.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the daemon, leaving a stale mount point as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the daemon must unmount by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        if is_mounted(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Runs `f` on its own thread and fails the test if it does not finish within `limit`: a call that
/// should succeed while servers are down must not turn a regression into a hung test.
pub fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// A command killed if it runs longer than `secs` (coreutils' timeout, which also kills what it started).
pub fn bounded(secs: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=10", &secs.to_string()]).arg(program);
    c
}
