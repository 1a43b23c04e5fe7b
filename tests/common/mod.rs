//! A real cluster for tests: the built binaries on free ports, in a temp dir, on the lab's process
//! harness (`procs`): each process logging to its own file, every wait bounded and polling,
//! everything killed by PID on drop, no mount left behind.

#![allow(dead_code)]

#[path = "../../src/bin/dfs-lab/procs.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use dfs::client::engine::Backoff;
use dfs::client::Cluster;
#[allow(unused_imports)]
pub use procs::{answers_as_mount, is_mounted, Proc};

/// This test process's cluster secret: a file every process a test starts is given (through
/// `DFS_SECRET_FILE`), and the secret of the test's own connections. Tests run authenticated, as a
/// real cluster would.
pub fn secret_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        // In cargo's scratch dir for integration tests (under target/), one per test process.
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dfs-test-secret-{}", std::process::id()));
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path);
        std::io::Write::write_all(f.as_mut().expect("create the secret"), &key).expect("write the secret");
        let secret = dfs::wire::auth::Secret::from_file(&path).expect("read the secret");
        dfs::wire::auth::set(Some(secret), false).expect("one secret per test process");
        path
    })
}

/// `cmd`, given this test process's cluster secret.
pub fn secured(cmd: &mut Command) -> &mut Command {
    cmd.env(dfs::wire::auth::SECRET_ENV, secret_file())
}

/// A port no server listens on, never the same twice in this process (tests run in parallel).
pub fn free_port() -> u16 {
    procs::free_port().expect("free port")
}

/// Polls `f` until it returns true; fails the test once `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    procs::wait_for(what, limit, || Ok(f())).unwrap_or_else(|e| panic!("{e}"));
}

pub fn wait_port(port: u16) {
    procs::wait_listening(&format!("port {port}"), port, None, Path::new("-"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
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
    meta: Option<Proc>,
    data: Vec<Option<Proc>>,
    /// Dataserver and metaserver starts so far (each start logs to a file of its own).
    starts: usize,
    meta_starts: usize,
    /// Extra dataserver flags (e.g. --max-bandwidth).
    server_args: Vec<String>,
    /// Extra flags for one dataserver (e.g. its --metrics port), by index; used from its next start.
    pub server_flags: Vec<Vec<String>>,
    /// Extra metaserver flags (e.g. --session-lease).
    pub meta_flags: Vec<String>,
    /// Where the metaserver's store is, if not in `dir`.
    pub meta_dir: Option<PathBuf>,
    meta_tmp: Option<tempfile::TempDir>,
}

/// Starts `bin` with its output in `log` (it dies with the test process, even on an abort).
pub fn spawn(bin: &str, args: &[String], log: &Path) -> Proc {
    let mut cmd = Command::new(bin);
    secured(&mut cmd);
    cmd.args(args).env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    Proc::spawn(cmd, bin, log).unwrap_or_else(|e| panic!("{e:#}"))
}

impl TestCluster {
    pub fn start(n: usize, block_size: u32, replicas: u8) -> TestCluster {
        Self::start_with(n, block_size, replicas, &[])
    }

    pub fn start_with(n: usize, block_size: u32, replicas: u8, server_args: &[&str]) -> TestCluster {
        Self::start_full(n, block_size, replicas, server_args, &[])
    }

    /// A cluster whose metaserver gets `meta_flags` too.
    pub fn start_full(
        n: usize,
        block_size: u32,
        replicas: u8,
        server_args: &[&str],
        meta_flags: &[&str],
    ) -> TestCluster {
        Self::start_in(None, false, n, block_size, replicas, server_args, meta_flags)
    }

    /// [`TestCluster::start_full`] with the stores under `parent` (a small disk, in some tests);
    /// with `meta_apart`, the metaserver's is in a temp dir of its own.
    pub fn start_in(
        parent: Option<&Path>,
        meta_apart: bool,
        n: usize,
        block_size: u32,
        replicas: u8,
        server_args: &[&str],
        meta_flags: &[&str],
    ) -> TestCluster {
        let dir = match parent {
            Some(p) => tempfile::tempdir_in(p),
            None => tempfile::tempdir(),
        }
        .expect("temp dir");
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
            server_flags: vec![vec![]; n],
            meta_flags: meta_flags.iter().map(|s| s.to_string()).collect(),
            meta_dir: None,
            meta_tmp: None,
        };
        if meta_apart {
            let t = tempfile::tempdir().expect("temp dir");
            c.meta_dir = Some(t.path().join("meta"));
            c.meta_tmp = Some(t);
        }
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
        let mut v: Vec<String> = self.meta_flags.clone();
        v.extend([
            "--data-dir".into(),
            self.meta_dir
                .as_deref()
                .map_or_else(|| self.dir.path().join("meta"), Path::to_path_buf)
                .display()
                .to_string(),
            "--block-size".into(),
            self.block_size.to_string(),
            "--replicas".into(),
            self.replicas.to_string(),
            self.meta_port.to_string(),
        ]);
        v
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
            m.kill9();
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
        args.extend(self.server_flags[i].iter().cloned());
        args.extend(["--data-dir".into(), self.data_dir(i).display().to_string(), i.to_string()]);
        args.extend(ring.iter().cloned());
        self.starts += 1;
        let log = self.log_path(&format!("ds{i}-{}", self.starts));
        self.data[i] = Some(spawn(env!("CARGO_BIN_EXE_dataserver"), &args, &log));
        let what = format!("dataserver {i}");
        procs::wait_listening(&what, self.ports[i], self.data[i].as_mut(), &log, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILLs dataserver `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.data[i].take() {
            c.kill9();
        }
    }

    /// Sends dataserver `i` `signal` (SIGSTOP: it keeps its port and answers nothing).
    pub fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        let p = self.data[i].as_ref().expect("dataserver running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.child.id() as i32), signal).expect("signal");
    }

    /// Sends the metaserver `signal`.
    pub fn signal_meta(&self, signal: nix::sys::signal::Signal) {
        let p = self.meta.as_ref().expect("metaserver running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.child.id() as i32), signal).expect("signal");
    }

    /// Kills dataserver `i` and deletes its data dir: a replaced disk.
    pub fn wipe(&mut self, i: usize) {
        self.kill(i);
        std::fs::remove_dir_all(self.data_dir(i)).expect("wipe data dir");
    }

    pub fn client(&self) -> Cluster {
        secret_file();
        Cluster::connect(&self.meta_port.to_string(), Some(&self.ring()), fast_backoff()).expect("connect to cluster")
    }

    pub fn dfsctl(&self, args: &[&str]) -> Output {
        secured(&mut Command::new(env!("CARGO_BIN_EXE_dfsctl")))
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

/// A `distributedfs` mount of a test cluster; unmounted (never left behind) on drop.
pub struct Mount {
    pub path: PathBuf,
    daemon: Option<Proc>,
}

impl Mount {
    pub fn start(cluster: &TestCluster, path: &Path, name: &str) -> Mount {
        Self::start_with(cluster, path, name, &[])
    }

    /// A mount with `flags` before the mount point (e.g. `--ro`).
    pub fn start_with(cluster: &TestCluster, path: &Path, name: &str, flags: &[&str]) -> Mount {
        std::fs::create_dir_all(path).ok();
        let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        args.extend([path.display().to_string(), cluster.meta_port.to_string()]);
        args.extend(cluster.ring_args());
        let log = cluster.log_path(name);
        let mut daemon = spawn(env!("CARGO_BIN_EXE_distributedfs"), &args, &log);
        if let Err(e) = procs::wait_mounted(&mut daemon, path, &log, Duration::from_secs(20)) {
            panic!("{e}\n{}", cluster.logs());
        }
        Mount { path: path.to_path_buf(), daemon: Some(daemon) }
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// SIGKILLs the daemon, leaving a stale mount point as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            c.kill9();
        }
    }

    /// SIGTERM and wait: the daemon must unmount by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon.take()?.stop(Duration::from_secs(15))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        procs::unmount(self.daemon.take(), &self.path);
    }
}

/// Runs its closure when dropped (a stopped process continued however the test ends).
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Runs `f` on its own thread and fails the test if it does not finish within `limit`: a call that
/// should succeed while servers are down must not turn a regression into a hung test.
pub fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    procs::bounded(what, limit, move || Ok(f())).unwrap_or_else(|e| panic!("{e}"))
}

/// A command killed if it runs longer than `secs` (coreutils' timeout, which also kills what it started).
pub fn bounded(secs: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("timeout");
    secured(&mut c);
    c.args(["--kill-after=10", &secs.to_string()]).arg(program);
    c
}

/// The body of `GET /metrics` on 127.0.0.1:`port`.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (`name{labels}` as printed), 0 if absent.
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap_or_else(|_| panic!("{series}: '{v}' is not a number")))
}
