//! Processes for the lab and the tests: started by PID in their own process group, each logging
//! to its own file, waited for by polling with a bound, stopped by PID, and never a mount left
//! behind. The one harness both use (the tests include this file).

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Set by SIGINT/SIGTERM: every wait gives up, and the lab cleans up and exits.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Polls `f` until it holds, `limit` passes, or the lab is interrupted: first after 1 ms, then
/// twice as long each time up to every 50 ms. A tool that ends in a few milliseconds (the check of
/// each file at rest runs one per file) is then not held for a whole 50 ms.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
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
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs `f` on a thread of its own and answers what it returns, or an error once `limit` passed
/// (or `f` panicked): for calls into a mount (a directory made, a tree listed, a file read),
/// which the kernel holds for as long as the target does not answer, in a state no signal ends.
/// The thread is left to return when the mount goes (at the latest when its daemon is killed).
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("dfs-lab-mount-call".into()).spawn(move || {
        let _ = tx.send(f());
    })?;
    rx.recv_timeout(limit).unwrap_or_else(|_| bail!("{what}: no answer within {limit:?}"))
}

/// A port no server listens on, never the same twice in this run (a port is only taken when the
/// server binds it, so two asked for in a row could otherwise be the same). It is picked below the
/// ephemeral range (`ip_local_port_range`), where the kernel never puts the local end of an
/// outgoing connection: a port from bind(0) could be taken by another process's connection (other
/// tests run at once) before the server binds it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::AtomicU32;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(4096, 65535);
    // The upper half below it (16384-32767 by default): above the well-known and registered ports
    // most services use.
    let from = low / 2;
    let span = low - from;
    // A pseudo-random walk, different in each process and call (GIVEN keeps one process from
    // handing a port out twice).
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = std::process::id().wrapping_mul(2_654_435_761) ^ nanos;
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (from + start.wrapping_add(k.wrapping_mul(7919)) % span) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free port between {from} and {low}")
}

pub fn is_mounted(mp: &Path) -> bool {
    let mp = mp.display().to_string();
    std::fs::read_to_string("/proc/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some(&mp))
}

/// A started process: its own process group (so a Ctrl-C reaches only the lab, which then stops it
/// in order), its output in its own log file.
pub struct Proc {
    pub child: Child,
    /// When it started (see [`start_time`]): with its number, it names this process and no other.
    started: Option<u64>,
}

/// When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`, field 22); None if
/// there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether anything of process `pid`, started at `started`, is left: the process itself (a number
/// reaped and handed out again names another process, started later), or members of its process
/// group without it (the kernel hands out no number still in use as a group's).
pub fn left_behind(pid: u32, started: Option<u64>) -> bool {
    match start_time(pid) {
        Some(t) => started.is_none_or(|s| s == t),
        None => kill(Pid::from_raw(-(pid as i32)), None).is_ok(),
    }
}

impl Proc {
    /// Starts `cmd` with its output in `log`; `what` names it in errors.
    pub fn spawn(mut cmd: Command, what: &str, log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        // Should the lab die without cleaning up (killed with SIGKILL), its servers die with it.
        // SAFETY: the closure runs between fork and exec and only makes the prctl system call.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        // Not reaped yet, so its /proc entry is there (a zombie's too).
        let started = start_time(child.id());
        Ok(Proc { child, started })
    }

    /// If the process has exited: how, with the last lines of its log.
    pub fn exited(&mut self, log: &Path) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        Some(format!("it exited ({status}); the end of {}:\n{}", log.display(), log_tail(log, 15)))
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL to the whole process group, then reap.
    ///
    /// Signals go by number, and a number is free again once its process is reaped: on a busy
    /// machine (CI runs several labs at once; `pid_max` is 32,768 here) it is soon another
    /// process's, such as another lab's or its servers'. So nothing is sent to a process already
    /// reaped (`running` reaps one that has just exited); until then its number stays its own.
    pub fn kill9(&mut self) {
        let group = Pid::from_raw(-(self.child.id() as i32));
        if self.running() {
            let _ = kill(group, Signal::SIGKILL);
            let _ = self.child.kill();
        } else if start_time(self.child.id()).is_none() {
            // Reaped, and its number is no process's: members of its group that outlived it (a
            // shell's background job) are still ours, as the kernel hands out no number that is
            // a live group's.
            let _ = kill(group, Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        // Not to a number that may be another process's by now (see `kill9`).
        if !self.running() {
            return self.child.try_wait().ok().flatten();
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        self.child.try_wait().ok().flatten()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its number and start time, for [`left_behind`].
    pub fn ident(&self) -> (u32, Option<u64>) {
        (self.child.id(), self.started)
    }
}

/// Runs `cmd` (`what`) to its end, its output (stdout and stderr as written) in `log`; returns its
/// exit status and output. Killed with its process group past `limit` (or once the lab is
/// interrupted), which is an error with its last words. The output goes to a file, not a pipe: a
/// process it leaves behind, or a copy of a pipe in another thread's file table, would keep a
/// pipe open after it ended, and its reader waiting.
pub fn run_to_end(cmd: Command, what: &str, log: &Path, limit: Duration) -> anyhow::Result<(ExitStatus, String)> {
    let mut p = Proc::spawn(cmd, what, log)?;
    if let Err(e) = wait_for(what, limit, || Ok(!p.running())) {
        p.kill9();
        bail!("{e}; its last words:\n{}", log_tail(log, 5));
    }
    let status = p.stop(Duration::ZERO).with_context(|| format!("{what}: no exit status"))?;
    Ok((status, std::fs::read_to_string(log).unwrap_or_default()))
}

/// The last `n` lines of a log file, indented.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
}

/// Waits until `port` accepts connections; fails at once, saying how, if `proc` exits meanwhile.
pub fn wait_listening(
    what: &str,
    port: u16,
    mut proc: Option<&mut Proc>,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    wait_for(&format!("{what} to listen on port {port}"), limit, || {
        if let Some(how) = proc.as_mut().and_then(|p| p.exited(log)) {
            bail!("{what} did not start: {how}");
        }
        Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
    })
}

/// Waits until a live mount answers at `mp`; fails at once if the mounting process exits.
pub fn wait_mounted(p: &mut Proc, mp: &Path, log: &Path, limit: Duration) -> anyhow::Result<()> {
    wait_for("the mount", limit, || {
        if let Some(how) = p.exited(log) {
            bail!("the mount command did not mount: {how}");
        }
        Ok(is_mounted(mp) && answers_as_mount(mp))
    })
}

/// Whether `mp` is a filesystem of its own (not its parent's) and answers. A stale mount (its
/// daemon killed) is still listed in /proc/mounts but answers ENOTCONN; statfs always reaches the
/// daemon, where stat may be answered from the kernel's cache. Once a new daemon has detached the
/// stale mount, and before it mounts, `mp` is the plain directory beneath, which answers too: only
/// its device, its parent's, tells it apart.
pub fn answers_as_mount(mp: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if nix::sys::statfs::statfs(mp).is_err() {
        return false;
    }
    let parent = mp.parent().unwrap_or(mp);
    match (std::fs::metadata(mp), std::fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        _ => false,
    }
}

/// Stops the mount's daemon (it unmounts by itself) and detaches the mount point if it is still
/// there (a daemon that was killed).
pub fn unmount(daemon: Option<Proc>, mp: &Path) {
    if let Some(mut p) = daemon {
        p.stop(Duration::from_secs(10));
    }
    if is_mounted(mp) {
        let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
    }
}
