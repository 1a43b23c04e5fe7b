//! A cluster started from a target profile: processes by PID, each logging to its own file, the mount,
//! and the fault injections. Dropping it stops everything and never leaves a mount behind.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Profile;

/// Set by SIGINT/SIGTERM: every wait gives up, and the lab cleans up and exits.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Polls `f` every 50 ms until it holds, `limit` passes, or the lab is interrupted.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted while waiting for {what}");
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port no server listens on, never the same twice in this run (a port is only taken when the
/// server binds it, so two asked for in a row could otherwise be the same).
fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

pub fn is_mounted(mp: &Path) -> bool {
    let mp = mp.display().to_string();
    std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some(&mp))
}

/// A started process: its own process group (so a Ctrl-C reaches only the lab, which then stops it
/// in order), its output in its own log file.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(argv: &[String], log: &Path, cwd: Option<&Path>) -> anyhow::Result<Proc> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        // Should the lab die without cleaning up (killed with SIGKILL), its servers die with it.
        // SAFETY: the closure runs between fork and exec and only makes the prctl system call.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", argv.join(" ")))?;
        Ok(Proc { child })
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL to the whole process group, then reap.
    pub fn kill9(&mut self) {
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

/// Fills a profile command's placeholders and splits it into words.
pub struct Vars {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub meta_port: u16,
    pub ports: Vec<u16>,
    pub mountpoint: PathBuf,
    pub block_size: u32,
    pub replicas: u8,
}

impl Vars {
    pub fn fill(&self, template: &str, index: Option<usize>, path: Option<&str>) -> String {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        let mut s = template
            .replace("{bin}", &self.bin.display().to_string())
            .replace("{data}", &self.data.display().to_string())
            .replace("{meta_port}", &self.meta_port.to_string())
            .replace("{ports}", &ports.join(" "))
            .replace("{mountpoint}", &self.mountpoint.display().to_string())
            .replace("{block_size}", &self.block_size.to_string())
            .replace("{replicas}", &self.replicas.to_string());
        if let Some(i) = index {
            s = s.replace("{index}", &i.to_string());
        }
        if let Some(p) = path {
            s = s.replace("{path}", &shlex::try_quote(p).map(|q| q.to_string()).unwrap_or_else(|_| p.to_string()));
        }
        s
    }

    pub fn argv(&self, template: &str, index: Option<usize>, path: Option<&str>) -> anyhow::Result<Vec<String>> {
        let s = self.fill(template, index, path);
        shlex::split(&s).ok_or_else(|| anyhow!("cannot split command: {s}"))
    }
}

pub struct LabCluster {
    pub profile: Profile,
    pub vars: Vars,
    pub logs: PathBuf,
    meta: Option<Proc>,
    servers: Vec<Option<Proc>>,
    mount: Option<Proc>,
    starts: usize,
}

impl LabCluster {
    /// Starts the metaserver and `n` dataservers under `dir`, waits for them to listen, and mounts.
    pub fn start(
        profile: &Profile,
        bin: &Path,
        dir: &Path,
        n: usize,
        block_size: u32,
        replicas: u8,
    ) -> anyhow::Result<Self> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)?;
        let vars = Vars {
            bin: bin.to_path_buf(),
            data: dir.join("data"),
            meta_port: free_port()?,
            ports: (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?,
            mountpoint,
            block_size,
            replicas,
        };
        std::fs::create_dir_all(&vars.data)?;
        let mut c = LabCluster {
            profile: profile.clone(),
            vars,
            logs,
            meta: None,
            servers: (0..n).map(|_| None).collect(),
            mount: None,
            starts: 0,
        };
        let argv = c.vars.argv(&c.profile.metaserver, None, None)?;
        c.meta = Some(Proc::spawn(&argv, &c.logs.join("metaserver.log"), None)?);
        for i in 0..n {
            c.restart(i)?;
        }
        c.wait_listening(c.vars.meta_port, "the metaserver")?;
        c.mount()?;
        for i in 0..n {
            c.wait_rebuilt(i, Duration::from_secs(60))?;
        }
        Ok(c)
    }

    fn wait_listening(&mut self, port: u16, what: &str) -> anyhow::Result<()> {
        wait_for(&format!("{what} to listen on port {port}"), Duration::from_secs(30), || {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
    }

    pub fn n(&self) -> usize {
        self.servers.len()
    }

    /// Starts (or restarts) dataserver `i` and waits until it listens.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.servers[i].as_mut().is_some_and(|p| p.running()) {
            return Ok(());
        }
        self.starts += 1;
        let argv = self.vars.argv(&self.profile.dataserver, Some(i), None)?;
        let log = self.logs.join(format!("dataserver{i}-start{}.log", self.starts));
        self.servers[i] = Some(Proc::spawn(&argv, &log, None)?);
        self.wait_listening(self.vars.ports[i], &format!("dataserver {i}"))
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.servers[i].take() {
            p.kill9();
        }
    }

    /// A lost disk: kill -9 and delete the server's data dir.
    pub fn wipe(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let dir = PathBuf::from(self.vars.fill(&self.profile.data_dir, Some(i), None));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn stopped(&mut self) -> Vec<usize> {
        (0..self.n()).filter(|&i| !self.servers[i].as_mut().is_some_and(|p| p.running())).collect()
    }

    /// Runs a profile command to completion (bounded); returns (success, output).
    pub fn tool(&self, template: &str, index: Option<usize>, path: Option<&str>) -> anyhow::Result<(bool, String)> {
        let argv = self.vars.argv(template, index, path)?;
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", argv.join(" ")))?;
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) || INTERRUPTED.load(Ordering::Relaxed) {
                let _ = child.kill();
                bail!("{} did not finish", argv.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text += &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    }

    pub fn is_rebuilt(&self, i: usize) -> anyhow::Result<bool> {
        let (_, out) = self.tool(&self.profile.status, None, None)?;
        let re = regex::Regex::new(&self.vars.fill(&self.profile.rebuilt, Some(i), None))?;
        Ok(out.lines().any(|l| re.is_match(l)))
    }

    pub fn wait_rebuilt(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        wait_for(&format!("dataserver {i}'s store to be complete"), limit, || self.is_rebuilt(i))
    }

    pub fn mountpoint(&self) -> &Path {
        &self.vars.mountpoint
    }

    pub fn mount(&mut self) -> anyhow::Result<()> {
        let argv = self.vars.argv(&self.profile.mount, None, None)?;
        let mut p = Proc::spawn(&argv, &self.logs.join("mount.log"), None)?;
        let mp = self.vars.mountpoint.clone();
        let r = wait_for("the mount", Duration::from_secs(30), || {
            if !p.running() {
                bail!("the mount command exited");
            }
            // A stale mount is listed but answers ENOTCONN; statfs always reaches the daemon.
            Ok(is_mounted(&mp) && nix::sys::statfs::statfs(&mp).is_ok())
        });
        self.mount = Some(p);
        r
    }

    pub fn unmount(&mut self) {
        if let Some(mut p) = self.mount.take() {
            p.stop(Duration::from_secs(10));
        }
        let mp = &self.vars.mountpoint;
        if is_mounted(mp) {
            let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Every log file of this cluster's processes.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(&self.logs).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        v.sort();
        v
    }

    pub fn shutdown(&mut self) {
        self.unmount();
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        if let Some(mut m) = self.meta.take() {
            m.kill9();
        }
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
