//! Network partitions on one machine, with iptables. Every server the lab starts listens on
//! 127.0.0.1, so addresses cannot tell one server's packets from another's: its port tells what is
//! sent to it, and a group id of its own, given to its process when partitions are enabled, what
//! it sends (iptables' owner match). A cut drops both: nobody reaches the server, established
//! connections included (their packets vanish, they are not refused), and nothing it sends (its
//! replies, its own calls to other servers) arrives.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::Context;

/// The first of this lab's group ids (see `enable`).
static GIDS: OnceLock<u32> = OnceLock::new();

/// A server of the lab's cluster.
#[derive(Clone, Copy, Debug)]
pub enum Server {
    Data(usize),
    Meta(usize),
}

/// Gives every server started from now on a group id of its own, so that a cut can drop what it
/// sends. The ids are picked by this process's id, so that labs running at once do not share them.
pub fn enable() {
    GIDS.get_or_init(|| 2_000_000_000 + (std::process::id() % 1_000_000) * 64);
}

/// The group id of `server`, if partitions are enabled.
pub fn gid(server: Server) -> Option<u32> {
    let base = *GIDS.get()?;
    Some(match server {
        Server::Data(i) => base + (i as u32 % 32),
        Server::Meta(i) => base + 32 + (i as u32 % 32),
    })
}

/// Starts `cmd` with `server`'s group id, if partitions are enabled (root keeps its user id, and
/// with it access to every file).
pub fn tag(cmd: &mut Command, server: Server) {
    if let Some(g) = gid(server) {
        cmd.gid(g);
    }
}

/// The rules cutting one port off, removed when it heals or is dropped (a lab that stops early
/// leaves no rule behind; a lab killed with SIGKILL does: `iptables -S INPUT` shows them).
pub struct PortCut {
    rules: Vec<[String; 7]>,
}

/// How long one iptables run may take.
const IPTABLES_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `iptables op rule`. A run that does not end within [`IPTABLES_LIMIT`] is killed and, for
/// an insert or a delete, tried once more unless `-C` shows the killed one took effect: a CI run
/// once saw an insert hang (an `--gid-owner` rule, with chaos runs changing rules at the same
/// time), and the same rules ran in 74 ms at most in 1,900 inserts and deletes from two loops at
/// once here. What the killed run was waiting on goes into the log.
fn iptables(op: &str, rule: &[String]) -> anyhow::Result<()> {
    match run_iptables(op, rule) {
        Err(Run::Stuck(waiting)) if op == "-I" || op == "-D" => {
            tracing::warn!(
                op,
                rule = rule.join(" "),
                waiting,
                "iptables did not finish; checking and trying once more"
            );
            let present = run_iptables("-C", rule).is_ok();
            if present == (op == "-I") {
                return Ok(());
            }
            run_iptables(op, rule).map_err(|e| e.into_error(op, rule))
        }
        r => r.map_err(|e| e.into_error(op, rule)),
    }
}

/// Why an iptables run failed.
enum Run {
    /// Killed after [`IPTABLES_LIMIT`]; what it was waiting on (its wchan), if known.
    Stuck(String),
    Failed(anyhow::Error),
}

impl Run {
    fn into_error(self, op: &str, rule: &[String]) -> anyhow::Error {
        match self {
            Run::Stuck(waiting) => anyhow::anyhow!(
                "iptables {op} {} did not finish in {IPTABLES_LIMIT:?} (it was waiting on {waiting})",
                rule.join(" ")
            ),
            Run::Failed(e) => e,
        }
    }
}

fn run_iptables(op: &str, rule: &[String]) -> Result<(), Run> {
    // Its complaint goes to a file, not a pipe: waiting for the process is bounded, and nothing
    // that may inherit a pipe's end can hold the lab up.
    let err = tempfile::tempfile().context("a file for iptables' complaint").map_err(Run::Failed)?;
    let err_out = err.try_clone().context("a file for iptables' complaint").map_err(Run::Failed)?;
    let mut child = Command::new("iptables")
        // -w: wait for the xtables lock, which other labs or tests may hold for a moment.
        .args(["-w", "5", op])
        .args(rule)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_out)
        .spawn()
        .context("running iptables")
        .map_err(Run::Failed)?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for iptables").map_err(Run::Failed)? {
            break status;
        }
        if started.elapsed() > IPTABLES_LIMIT {
            let wchan = std::fs::read_to_string(format!("/proc/{}/wchan", child.id()))
                .unwrap_or_else(|e| format!("(unknown: {e})"));
            let _ = child.kill();
            let _ = child.wait();
            return Err(Run::Stuck(wchan));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    if !status.success() {
        let mut text = String::new();
        let mut err = err;
        use std::io::{Read, Seek};
        let _ = err.rewind().and_then(|()| err.read_to_string(&mut text));
        return Err(Run::Failed(anyhow::anyhow!("iptables {op} {}: {}", rule.join(" "), text.trim())));
    }
    Ok(())
}

/// Whether this machine lets the lab drop packets (iptables installed, and allowed to change the
/// rules): the reason if not.
pub fn unavailable() -> Option<String> {
    iptables("-S", &["INPUT".to_string()]).err().map(|e| format!("{e:#}"))
}

impl PortCut {
    /// Drops every TCP packet to `port`, and every packet sent by a process of group `gid`.
    pub fn cut(port: u16, gid: u32) -> anyhow::Result<PortCut> {
        let mut cut = PortCut { rules: Vec::new() };
        let to = ["INPUT", "-p", "tcp", "--dport", &port.to_string(), "-j", "DROP"].map(String::from);
        let from = ["OUTPUT", "-m", "owner", "--gid-owner", &gid.to_string(), "-j", "DROP"].map(String::from);
        for rule in [to, from] {
            iptables("-I", &rule)?; // on failure the rules made so far go with `cut`
            cut.rules.push(rule);
        }
        Ok(cut)
    }

    /// Removes the rules: the port is reachable again.
    pub fn heal(mut self) -> anyhow::Result<()> {
        while let Some(rule) = self.rules.pop() {
            if let Err(e) = iptables("-D", &rule) {
                self.rules.push(rule); // tried again on drop
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for PortCut {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = iptables("-D", rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    fn reaches(port: u16) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
    }

    /// Whether a process of group `gid` (any, if None) connects to `port` within half a second.
    fn reaches_as(gid: Option<u32>, port: u16) -> bool {
        let mut cmd = Command::new("timeout");
        cmd.args(["1", "bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")]);
        if let Some(g) = gid {
            cmd.gid(g);
        }
        cmd.stderr(Stdio::null()).status().expect("bash").success()
    }

    #[test]
    fn a_cut_drops_what_reaches_the_port_and_what_the_group_sends_until_healed() {
        if let Some(why) = unavailable() {
            eprintln!("skipping: {why}");
            return;
        }
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = server.local_addr().expect("addr").port();
        let other = TcpListener::bind("127.0.0.1:0").expect("bind");
        let other_port = other.local_addr().expect("addr").port();
        let gid = 2_000_000_000 + std::process::id() % 1_000_000 * 64 + 63;
        assert!(reaches(port) && reaches_as(Some(gid), other_port));
        let cut = PortCut::cut(port, gid).expect("cut");
        assert!(!reaches(port), "a connection to the cut port went through");
        assert!(!reaches_as(Some(gid), other_port), "the cut server's own call went out");
        assert!(reaches(other_port) && reaches_as(None, other_port), "the cut took others' packets too");
        cut.heal().expect("heal");
        assert!(reaches(port) && reaches_as(Some(gid), other_port), "still cut after healing");
        // Dropping a cut removes it as well.
        drop(PortCut::cut(port, gid).expect("cut"));
        assert!(reaches(port) && reaches_as(Some(gid), other_port), "still cut after the cut was dropped");
    }
}
