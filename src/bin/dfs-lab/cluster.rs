//! A cluster started from a target profile: processes by PID, each logging to its own file, the mount,
//! and the fault injections. Dropping it stops everything and never leaves a mount behind.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::config::{Member, Profile, TargetCommand};
use crate::procs::{free_port, run_to_end, unmount, wait_for, wait_listening, wait_mounted, Proc};

/// Longest a profile command (check, status, corrupt, setup) may take, before the time scale.
const TOOL_LIMIT: Duration = Duration::from_secs(60);

/// Fills a profile command's placeholders and makes it a process to run.
#[derive(Clone)]
pub struct Vars {
    pub bin: PathBuf,
    pub data: PathBuf,
    /// The metaserver's port, or each group member's.
    pub meta_ports: Vec<u16>,
    pub ports: Vec<u16>,
    pub mountpoint: PathBuf,
    pub block_size: u32,
    pub replicas: u8,
    /// (write, read) quorums.
    pub quorum: (u8, u8),
}

impl Vars {
    pub fn fill(&self, template: &str, index: Option<usize>, path: Option<&str>) -> String {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        let mut s = template
            .replace("{bin}", &self.bin.display().to_string())
            .replace("{data}", &self.data.display().to_string())
            .replace("{meta_port}", &self.meta_ports[0].to_string())
            .replace("{meta}", &self.meta_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","))
            .replace("{meta_config}", &self.meta_config().display().to_string())
            .replace("{ports}", &ports.join(" "))
            .replace("{mountpoint}", &self.mountpoint.display().to_string())
            .replace("{block_size}", &self.block_size.to_string())
            .replace("{replicas}", &self.replicas.to_string())
            .replace("{write_quorum}", &self.quorum.0.to_string())
            .replace("{read_quorum}", &self.quorum.1.to_string());
        if let Some(i) = index {
            s = s.replace("{index}", &i.to_string());
        }
        if let Some(p) = path {
            s = s.replace("{path}", &shlex::try_quote(p).map(|q| q.to_string()).unwrap_or_else(|_| p.to_string()));
        }
        s
    }

    /// A metaserver group's config file.
    pub fn meta_config(&self) -> PathBuf {
        self.data.join("group.conf")
    }

    /// The process for a profile command, with its placeholders filled, and a description of it.
    pub fn command(
        &self,
        c: &TargetCommand,
        index: Option<usize>,
        path: Option<&str>,
    ) -> anyhow::Result<(Command, String)> {
        let c = c.full();
        let line = self.fill(&c.run, index, path);
        let mut cmd = if c.shell {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(&line);
            cmd
        } else {
            let argv = shlex::split(&line).ok_or_else(|| anyhow!("cannot split command: {line}"))?;
            let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
            let mut cmd = Command::new(prog);
            cmd.args(args);
            cmd
        };
        if let Some(dir) = &c.cwd {
            let dir = PathBuf::from(self.fill(dir, index, path));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            cmd.current_dir(dir);
        }
        for (k, v) in &c.env {
            cmd.env(k, self.fill(v, index, path));
        }
        Ok((cmd, line))
    }
}

pub struct LabCluster {
    pub profile: Profile,
    pub vars: Vars,
    pub logs: PathBuf,
    metas: Vec<Option<Proc>>,
    /// Each metaserver's log of its latest start.
    meta_logs: Vec<PathBuf>,
    /// The metaserver command this cluster runs (a group member's when it has more than one).
    meta_cmd: Option<TargetCommand>,
    /// Members the lab crashed through the testers' API and has not restored.
    crashed: std::collections::BTreeSet<usize>,
    servers: Vec<Option<Proc>>,
    /// Each dataserver's log of its latest start.
    server_logs: Vec<PathBuf>,
    mount: Option<Proc>,
    /// The mount's log: `mount.log` for the first, numbered for the later ones (the first's is
    /// kept for the report).
    mount_log: PathBuf,
    mounts: usize,
    /// A second mount of the same cluster, and where it is.
    other: Option<Proc>,
    other_mountpoint: PathBuf,
    /// A mount started for one verification, and where it is (see [`Self::mount_reader`]).
    reader: Option<Proc>,
    reader_mountpoint: PathBuf,
    readers: usize,
    starts: usize,
}

impl LabCluster {
    /// Starts `metaservers` metaservers (one, or a group's members) and `n` dataservers under
    /// `dir`, waits for them to listen, and mounts.
    pub fn start(
        profile: &Profile,
        bin: &Path,
        dir: &Path,
        (n, metaservers): (usize, usize),
        block_size: u32,
        (replicas, quorum): (u8, Option<(u8, u8)>),
    ) -> anyhow::Result<Self> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)?;
        let vars = Vars {
            bin: bin.to_path_buf(),
            data: dir.join("data"),
            meta_ports: (0..metaservers).map(|_| free_port()).collect::<anyhow::Result<_>>()?,
            ports: (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?,
            mountpoint,
            block_size,
            replicas,
            quorum: quorum.unwrap_or((replicas, 1)),
        };
        std::fs::create_dir_all(&vars.data)?;
        let mut c = LabCluster {
            profile: profile.clone(),
            vars,
            logs,
            metas: Vec::new(),
            meta_logs: Vec::new(),
            meta_cmd: None,
            crashed: Default::default(),
            servers: (0..n).map(|_| None).collect(),
            server_logs: vec![PathBuf::new(); n],
            mount: None,
            mount_log: PathBuf::new(),
            mounts: 0,
            other: None,
            other_mountpoint: dir.join("mnt2"),
            reader: None,
            reader_mountpoint: dir.join("mnt-fresh"),
            readers: 0,
            starts: 0,
        };
        for (k, setup) in c.profile.setup.clone().iter().enumerate() {
            let (ok, text) = c.tool(setup, None, None).with_context(|| format!("setup step {}", k + 1))?;
            if !ok {
                bail!("setup step {} failed:\n{text}", k + 1);
            }
        }
        let Some(mut meta) = c.profile.metaserver.clone() else {
            // A local directory: nothing to start.
            c.servers.clear();
            return Ok(c);
        };
        if metaservers > 1 && c.profile.metaservers == 1 {
            meta = c.profile.group_metaserver.clone().ok_or_else(|| anyhow!("the profile has no group_metaserver"))?;
        }
        c.meta_cmd = Some(meta.clone());
        if c.vars.meta_ports.len() > 1 {
            let mut config = format!("M: {}\n", c.vars.meta_ports.len());
            for (i, p) in c.vars.meta_ports.iter().enumerate() {
                config += &format!("metadata{i}: 127.0.0.1:{p}\n");
            }
            std::fs::write(c.vars.meta_config(), config)?;
        }
        for i in 0..c.vars.meta_ports.len() {
            // A group's members are numbered; a single metaserver's command has no {index}.
            let (mut cmd, line) = c.vars.command(&meta, Some(i), None)?;
            crate::netcut::tag(&mut cmd, crate::netcut::Server::Meta(i));
            let log = c.new_meta_log(i);
            c.metas.push(Some(Proc::spawn(cmd, &line, &log)?));
        }
        for i in 0..n {
            c.restart(i)?;
        }
        for i in 0..c.vars.meta_ports.len() {
            c.wait_listening(c.vars.meta_ports[i], Err(i))?;
        }
        c.mount()?;
        for i in 0..n {
            c.wait_rebuilt(i, c.profile.limit(Duration::from_secs(60)))?;
        }
        Ok(c)
    }

    /// Waits until dataserver `i` (`Ok(i)`) or metaserver `i` (`Err(i)`) listens; fails at once,
    /// saying how, if the process exits meanwhile.
    fn wait_listening(&mut self, port: u16, server: Result<usize, usize>) -> anyhow::Result<()> {
        let (what, log) = match server {
            Err(i) => (format!("metaserver {i}"), self.meta_logs[i].clone()),
            Ok(i) => (format!("dataserver {i}"), self.server_log(i)),
        };
        let limit = self.profile.limit(Duration::from_secs(30));
        let p = match server {
            Err(i) => self.metas[i].as_mut(),
            Ok(i) => self.servers[i].as_mut(),
        };
        wait_listening(&what, port, p, &log, limit)
    }

    /// A log for metaserver `i`'s next start (each start logs to its own file).
    fn new_meta_log(&mut self, i: usize) -> PathBuf {
        // Numbered by this member's starts (dataservers' logs count theirs on their own).
        let n = (1..).find(|n| !self.meta_log_name(i, *n).exists()).unwrap_or(1);
        let log = self.meta_log_name(i, n);
        match self.meta_logs.get_mut(i) {
            Some(l) => *l = log.clone(),
            None => self.meta_logs.push(log.clone()),
        }
        log
    }

    fn meta_running(&mut self, i: usize) -> bool {
        self.metas[i].as_mut().is_some_and(|p| p.running())
    }

    /// Starts metaserver `i` again (same data dir) and waits until it listens.
    pub fn restart_meta(&mut self, i: usize) -> anyhow::Result<()> {
        if self.meta_running(i) {
            return Ok(());
        }
        let meta = self.meta_cmd.clone().ok_or_else(|| anyhow!("the target has no metaserver"))?;
        let (mut cmd, line) = self.vars.command(&meta, Some(i), None)?;
        crate::netcut::tag(&mut cmd, crate::netcut::Server::Meta(i));
        let log = self.new_meta_log(i);
        self.metas[i] = Some(Proc::spawn(cmd, &line, &log)?);
        self.crashed.remove(&i);
        self.wait_listening(self.vars.meta_ports[i], Err(i))
    }

    fn meta_log_name(&self, i: usize, n: usize) -> PathBuf {
        match self.vars.meta_ports.len() {
            1 => self.logs.join(format!("metaserver-start{n}.log")),
            _ => self.logs.join(format!("metaserver{i}-start{n}.log")),
        }
    }

    pub fn kill_meta(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.metas[i].take() {
            p.kill9();
        }
        gone(&format!("metaserver {i}"), self.vars.meta_ports[i])
    }

    /// A metaserver's lost disk: kill -9 and delete its data dir.
    pub fn wipe_meta(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_meta(i)?;
        self.delete_data_dir(self.profile.meta_data_dir.as_deref(), "meta_data_dir", i)
    }

    /// Deletes server `i`'s data dir, named by the profile's `template` (called `what` there).
    fn delete_data_dir(&self, template: Option<&str>, what: &str, i: usize) -> anyhow::Result<()> {
        let template = template.ok_or_else(|| anyhow!("the target profile has no {what}"))?;
        let dir = PathBuf::from(self.vars.fill(template, Some(i), None));
        if !dir.exists() {
            // The server keeps its data elsewhere: a wipe here would test nothing.
            bail!("the profile's {what} {} does not exist: is it where the server keeps its data?", dir.display());
        }
        // The lab makes a server's working directory before it starts it, which may be this one.
        if std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.next().is_none() {
            bail!("the profile's {what} {} is empty: is it where the server keeps its data?", dir.display());
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))
    }

    /// Crashes (or restores) member `i` through the testers' API.
    pub fn crash_meta(&mut self, i: usize, crash: bool) -> anyhow::Result<()> {
        let (what, cmd) = match crash {
            true => ("meta_crash", &self.profile.meta_crash),
            false => ("meta_restore", &self.profile.meta_restore),
        };
        let cmd = cmd.clone().ok_or_else(|| anyhow!("the profile has no {what} command"))?;
        let leads = |c: &Self| {
            let ask = c.profile.meta_isleader.as_ref()?;
            Some(c.tool(ask, Some(i), None).is_ok_and(|(ok, out)| ok && out.trim() == "true"))
        };
        let led = crash && leads(self) == Some(true);
        let (ok, text) = self.tool(&cmd, Some(i), None)?;
        if !ok {
            bail!("the {what} command failed for metaserver {i}: {}", text.trim());
        }
        // A crashed leader leads no more: a crash command that did nothing would leave the
        // scenario testing a group that lost no member.
        if led {
            let limit = self.profile.limit(CRASH_LIMIT);
            wait_for(&format!("crashed metaserver {i} to stop leading"), limit, || Ok(leads(self) != Some(true)))
                .with_context(|| format!("metaserver {i} still says it leads after the meta_crash command"))?;
        }
        match crash {
            true => self.crashed.insert(i),
            false => self.crashed.remove(&i),
        };
        Ok(())
    }

    /// The member that says it leads (asked with the profile's meta_isleader), waiting while the
    /// group elects one. Every member is asked: while two say they lead (a deposed leader that has
    /// not heard of the new one yet) it waits, and if that lasts, it is an error (two leaders).
    pub fn leader(&mut self, limit: Duration) -> anyhow::Result<usize> {
        let ask = self.profile.meta_isleader.clone().ok_or_else(|| anyhow!("the profile has no meta_isleader"))?;
        let candidates: Vec<usize> =
            (0..self.metas.len()).filter(|&i| self.meta_running(i) && !self.crashed.contains(&i)).collect();
        let mut leading = Vec::new();
        let waited = wait_for("a metaserver to lead", limit, || {
            leading = candidates
                .iter()
                .copied()
                .filter(|&i| self.tool(&ask, Some(i), None).is_ok_and(|(ok, out)| ok && out.trim() == "true"))
                .collect();
            Ok(leading.len() == 1)
        });
        match (waited, leading.as_slice()) {
            (Ok(()), &[i]) => Ok(i),
            (_, many) if many.len() > 1 => bail!("metaservers {many:?} all say they lead, for {limit:?}"),
            (r, _) => r.and_then(|()| Err(anyhow!("no leader"))),
        }
    }

    /// The metaservers a step names.
    pub fn members(&mut self, m: &Member, limit: Duration) -> anyhow::Result<Vec<usize>> {
        let all = 0..self.metas.len();
        Ok(match m {
            Member::Id(i) if *i < self.metas.len() => vec![*i],
            Member::Id(i) => bail!("metaserver {i} is outside the group of {}", self.metas.len()),
            Member::Role(r) => match r.as_str() {
                "leader" => vec![self.leader(limit)?],
                "follower" => {
                    let leader = self.leader(limit)?;
                    let f = all.clone().find(|&i| i != leader && self.meta_running(i) && !self.crashed.contains(&i));
                    vec![f.ok_or_else(|| anyhow!("no running metaserver follows the leader"))?]
                }
                "stopped" => all.filter(|&i| !self.meta_running(i)).collect(),
                "crashed" => self.crashed.iter().copied().collect(),
                r => bail!("no metaserver role {r:?}"),
            },
        })
    }

    /// The log of dataserver `i`'s latest start (each start logs to its own file).
    fn server_log(&self, i: usize) -> PathBuf {
        self.logs.join(format!("dataserver{i}-start{}.log", self.starts))
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
        let ds = self.profile.dataserver.clone().ok_or_else(|| anyhow!("the target has no dataservers"))?;
        let (mut cmd, line) = self.vars.command(&ds, Some(i), None)?;
        crate::netcut::tag(&mut cmd, crate::netcut::Server::Data(i));
        let log = self.server_log(i);
        self.servers[i] = Some(Proc::spawn(cmd, &line, &log)?);
        self.server_logs[i] = log;
        self.wait_listening(self.vars.ports[i], Ok(i))
    }

    /// The servers and mounts that exited without the lab killing them: each, how, and the end of
    /// its log. That is a failure however well the others carried on (a quorum, a majority): left
    /// alone, the server would be started again before the check at rest and never be noticed. A
    /// member the lab crashed through the testers' API is left out (a target may crash it so).
    pub fn died(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in self.servers.iter_mut().enumerate() {
            if let Some(how) = p.as_mut().and_then(|p| p.exited(&self.server_logs[i])) {
                out.push(format!("dataserver {i}: {how}"));
            }
        }
        for (i, p) in self.metas.iter_mut().enumerate() {
            if self.crashed.contains(&i) {
                continue;
            }
            if let Some(how) = p.as_mut().and_then(|p| p.exited(&self.meta_logs[i])) {
                out.push(format!("metaserver {i}: {how}"));
            }
        }
        let other_log = self.logs.join("mount2.log");
        let mounts =
            [(&mut self.mount, &self.mount_log, "the mount"), (&mut self.other, &other_log, "the second mount")];
        for (p, log, what) in mounts {
            if let Some(how) = p.as_mut().and_then(|p| p.exited(log)) {
                out.push(format!("{what}: {how}"));
            }
        }
        out
    }

    /// Sends `sig` to dataserver `i` (SIGSTOP and SIGCONT: a server that hangs, then resumes).
    pub fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) {
        // Not to a server already reaped: its number may be another process's (see `Proc::kill9`).
        // To its process group, as kill -9 goes: a server started by a shell is in it too.
        if let Some(p) = self.servers[i].as_mut() {
            if p.running() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-(p.id() as i32)), sig);
            }
        }
    }

    /// Every server and mount the lab started and still tracks: number and start time.
    pub fn pids(&self) -> Vec<(u32, Option<u64>)> {
        let procs = self.servers.iter().chain(self.metas.iter()).chain([&self.mount, &self.other]);
        procs.flatten().map(Proc::ident).collect()
    }

    pub fn metaservers(&self) -> usize {
        self.vars.meta_ports.len()
    }

    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill9(i);
        gone(&format!("dataserver {i}"), self.vars.ports[i])
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.servers[i].take() {
            p.kill9();
        }
    }

    /// A lost disk: kill -9 and delete the server's data dir.
    pub fn wipe(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i)?;
        self.delete_data_dir(self.profile.data_dir.as_deref(), "data_dir", i)
    }

    /// Brings every metaserver back: restarts the stopped ones, restores the crashed ones.
    pub fn revive_metas(&mut self) -> anyhow::Result<()> {
        for i in 0..self.metas.len() {
            self.restart_meta(i)?;
        }
        for i in std::mem::take(&mut self.crashed) {
            self.crash_meta(i, false)?;
        }
        Ok(())
    }

    /// Whether a server of the cluster is down: a dataserver or metaserver killed and not
    /// started again, or a member crashed and not restored.
    pub fn some_down(&mut self) -> bool {
        let metas_down = (0..self.metas.len()).any(|i| !self.meta_running(i)) || !self.crashed.is_empty();
        metas_down || !self.stopped().is_empty()
    }

    pub fn stopped(&mut self) -> Vec<usize> {
        (0..self.n()).filter(|&i| !self.servers[i].as_mut().is_some_and(|p| p.running())).collect()
    }

    /// Runs a profile command to completion (bounded); returns (success, output).
    pub fn tool(&self, c: &TargetCommand, index: Option<usize>, path: Option<&str>) -> anyhow::Result<(bool, String)> {
        let (cmd, line) = self.vars.command(c, index, path)?;
        let (status, text) = run_to_end(cmd, &line, &self.logs.join("tool.log"), self.profile.limit(TOOL_LIMIT))?;
        Ok((status.success(), text))
    }

    /// Whether dataserver `i`'s store is complete: the profile's `status` output has a line
    /// matching `rebuilt`; a profile without them gives only "it listens".
    pub fn is_rebuilt(&self, i: usize) -> anyhow::Result<bool> {
        let (Some(status), Some(rebuilt)) = (&self.profile.status, &self.profile.rebuilt) else {
            return Ok(TcpStream::connect(("127.0.0.1", self.vars.ports[i])).is_ok());
        };
        let (_, out) = self.tool(status, None, None)?;
        let re = regex::Regex::new(&self.vars.fill(rebuilt, Some(i), None))?;
        Ok(out.lines().any(|l| re.is_match(l)))
    }

    pub fn wait_rebuilt(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        wait_for(&format!("dataserver {i}'s store to be complete"), limit, || self.is_rebuilt(i))
    }

    pub fn mountpoint(&self) -> &Path {
        &self.vars.mountpoint
    }

    pub fn mount(&mut self) -> anyhow::Result<()> {
        let m = self.profile.mount.clone().ok_or_else(|| anyhow!("the target has no mount command"))?;
        let (cmd, line) = self.vars.command(&m, None, None)?;
        self.mounts += 1;
        let log = match self.mounts {
            1 => self.logs.join("mount.log"),
            n => self.logs.join(format!("mount-start{n}.log")),
        };
        self.mount_log = log.clone();
        let mut p = Proc::spawn(cmd, &line, &log)?;
        let r = wait_mounted(&mut p, &self.vars.mountpoint, &log, self.profile.limit(Duration::from_secs(30)));
        self.mount = Some(p);
        r
    }

    pub fn unmount(&mut self) {
        self.unmount_reader();
        unmount(self.other.take(), &self.other_mountpoint);
        unmount(self.mount.take(), &self.vars.mountpoint);
    }

    /// Mounts the cluster afresh (a process of its own, which has read nothing yet) for one
    /// verification, and answers where: a client that keeps what it wrote in its own memory
    /// would answer every read through the mount that wrote it while the servers lost it.
    pub fn mount_reader(&mut self) -> anyhow::Result<PathBuf> {
        self.unmount_reader();
        let m = self.profile.mount.clone().ok_or_else(|| anyhow!("the target has no mount command"))?;
        std::fs::create_dir_all(&self.reader_mountpoint)?;
        let vars = Vars { mountpoint: self.reader_mountpoint.clone(), ..self.vars.clone() };
        let (cmd, line) = vars.command(&m, None, None)?;
        self.readers += 1;
        let log = self.logs.join(format!("mount-fresh{}.log", self.readers));
        let mut p = Proc::spawn(cmd, &line, &log)?;
        let r = wait_mounted(&mut p, &self.reader_mountpoint, &log, self.profile.limit(Duration::from_secs(30)));
        self.reader = Some(p);
        r.map(|()| self.reader_mountpoint.clone())
    }

    /// Unmounts what [`Self::mount_reader`] mounted.
    pub fn unmount_reader(&mut self) {
        if self.reader.is_some() {
            unmount(self.reader.take(), &self.reader_mountpoint);
        }
    }

    /// Mounts the cluster a second time (its own process and session), at [`Self::other_mountpoint`].
    pub fn mount_other(&mut self) -> anyhow::Result<()> {
        let m = self.profile.mount.clone().ok_or_else(|| anyhow!("the target has no mount command"))?;
        std::fs::create_dir_all(&self.other_mountpoint)?;
        let vars = Vars { mountpoint: self.other_mountpoint.clone(), ..self.vars.clone() };
        let (cmd, line) = vars.command(&m, None, None)?;
        let log = self.logs.join("mount2.log");
        let mut p = Proc::spawn(cmd, &line, &log)?;
        let r = wait_mounted(&mut p, &self.other_mountpoint, &log, self.profile.limit(Duration::from_secs(30)));
        self.other = Some(p);
        r
    }

    pub fn other_mountpoint(&self) -> &Path {
        &self.other_mountpoint
    }

    /// kill -9 the second mount's daemon (its mount point is left stale, as a crash leaves it).
    pub fn kill_other_mount(&mut self) -> anyhow::Result<()> {
        let mut p = self.other.take().ok_or_else(|| anyhow!("the scenario has no second mount running"))?;
        p.kill9();
        Ok(())
    }

    pub fn shutdown(&mut self) {
        self.unmount();
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
        for m in self.metas.iter_mut() {
            if let Some(mut m) = m.take() {
                m.kill9();
            }
        }
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How long a crashed leader may take to stop saying it leads.
const CRASH_LIMIT: Duration = Duration::from_secs(30);

/// How long a killed server's port may take to close.
const GONE_LIMIT: Duration = Duration::from_secs(10);

/// Waits (bounded) until nothing answers on `port`, where `who` was just killed: a fault the lab
/// injects must have happened, or a scenario would pass without testing what it names. The lab
/// kills the process group it started; a profile whose command hands the server to something
/// else (a daemon that forks away, a container manager) leaves it running.
fn gone(who: &str, port: u16) -> anyhow::Result<()> {
    wait_for(&format!("{who} to stop answering on port {port} once killed"), GONE_LIMIT, || {
        Ok(TcpStream::connect(("127.0.0.1", port)).is_err())
    })
    .with_context(|| {
        format!(
            "{who} still answers on port {port} after the lab killed the process group it started: \
             the profile's command must run the server in that group, not hand it to another"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_tool_gives_its_status_and_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (status, text) =
            run_to_end(sh("echo out; echo err >&2; exit 3"), "t", &dir.path().join("t.log"), Duration::from_secs(20))
                .expect("finished");
        assert_eq!(status.code(), Some(3));
        assert_eq!(text, "out\nerr\n");
    }

    /// Regression: a tool's output was read from pipes until they closed, and a copy of a pipe's
    /// write end in the chaos workload's file table once kept one open for good. A tool that leaves
    /// a process holding its output (the same wait) is done when it exits.
    #[test]
    fn a_tool_that_leaves_a_process_holding_its_output_is_done_when_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 60 & echo $! > {}; echo started", pid_file.display());
        let start = Instant::now();
        let r = run_to_end(sh(&script), "leaves a sleep behind", &dir.path().join("t.log"), Duration::from_secs(20));
        let took = start.elapsed();
        if let Ok(pid) = std::fs::read_to_string(&pid_file).unwrap_or_default().trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let (status, text) = r.expect("done");
        assert!(status.success());
        assert_eq!(text, "started\n");
        assert!(took < Duration::from_secs(15), "took {took:?}");
    }

    #[test]
    fn a_tool_past_its_limit_is_killed_and_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e =
            run_to_end(sh("echo waiting; sleep 60"), "a slow tool", &dir.path().join("t.log"), Duration::from_secs(1))
                .expect_err("past the limit");
        let e = e.to_string();
        assert!(e.contains("timed out") && e.contains("waiting"), "{e}");
    }
}
