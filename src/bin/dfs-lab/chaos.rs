//! `dfs-lab chaos`: randomized file operations in the mount, every read checked against an
//! in-memory model of the files (fsx-style: writes past the end leave holes, truncates grow and
//! shrink, appends, renames over other files, unlinks, fsyncs, reads through mmap), while a
//! nemesis kills -9 and restarts, stops and resumes, wipes, corrupts and cuts off the network
//! dataservers and kills, crashes or cuts off metaservers, within the fault budget: at most R - 1 dataservers faulty at once (a block
//! lives on R of them), and a minority of the metaservers. At the end every server is back, every
//! file must read as the model says (through this mount and through a fresh one), the target's
//! check must pass for each, and no process the lab started may be left.
//!
//! One seed gives one sequence of operations and faults; timing still varies between runs.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::ValueEnum;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster::LabCluster;
use crate::config::Profile;
use crate::netcut::{PortCut, Server};
use crate::procs::INTERRUPTED;

const DATASERVERS: usize = 5;
const BLOCK_SIZE: u32 = 4096;
const MAX_FILES: usize = 8;
const MAX_FILE: u64 = 1 << 20;
/// The file the workload never renames or removes: the nemesis corrupts its blocks, and its reads
/// repair them.
const PINNED: &str = "pinned";
/// An operation that takes longer than this is a hang, not a slow server.
const STUCK: Duration = Duration::from_secs(120);
/// How long a restarted or resumed server counts as faulty at least: the hand-over of what it
/// missed runs every second.
const SETTLE: Duration = Duration::from_secs(3);

/// The kinds of fault the nemesis may start (`--faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// kill -9 a dataserver, then restart it
    Kill,
    /// SIGSTOP a dataserver, then SIGCONT
    Stop,
    /// kill -9 a dataserver, delete its data dir, restart it, wait for its rebuild
    Wipe,
    /// corrupt one replica of a block of the pinned file
    Corrupt,
    /// kill -9 a metaserver (group only), then restart it
    MetaKill,
    /// crash a metaserver through the testers' API (group only), then restore it
    MetaCrash,
    /// cut a dataserver's port off the network (iptables), then heal the cut
    Partition,
    /// cut a metaserver's port off the network (group only; iptables), then heal the cut
    MetaPartition,
}

/// A fault in effect, and what ends it.
#[derive(Clone, Debug, PartialEq)]
enum Fault {
    Killed(usize),
    Stopped(usize),
    /// Wiped and restarted; over when its store is complete again.
    Rebuilding(usize),
    /// Restarted or resumed: peers may still hold what it missed (hints), so it is not yet a good
    /// holder of everything; over when the target says it is complete, and not before `SETTLE`.
    Recovering(usize, Instant),
    /// A replica of the pinned file on this server was corrupted; over when the check passes.
    Corrupt(usize),
    MetaKilled(usize),
    MetaCrashed(usize),
    /// Its port cut off the network (see `netcut`).
    Partitioned(usize),
    MetaPartitioned(usize),
}

impl Fault {
    fn dataserver(&self) -> Option<usize> {
        match *self {
            Fault::Killed(i) | Fault::Stopped(i) | Fault::Rebuilding(i) | Fault::Corrupt(i) => Some(i),
            Fault::Recovering(i, _) | Fault::Partitioned(i) => Some(i),
            _ => None,
        }
    }
    fn kind(&self) -> Option<Kind> {
        Some(match self {
            Fault::Killed(_) => Kind::Kill,
            Fault::Stopped(_) => Kind::Stop,
            Fault::Rebuilding(_) => Kind::Wipe,
            Fault::Corrupt(_) => Kind::Corrupt,
            Fault::MetaKilled(_) => Kind::MetaKill,
            Fault::MetaCrashed(_) => Kind::MetaCrash,
            Fault::Partitioned(_) => Kind::Partition,
            Fault::MetaPartitioned(_) => Kind::MetaPartition,
            Fault::Recovering(..) => return None,
        })
    }
    fn metaserver(&self) -> Option<usize> {
        match *self {
            Fault::MetaKilled(i) | Fault::MetaCrashed(i) | Fault::MetaPartitioned(i) => Some(i),
            _ => None,
        }
    }
}

struct Nemesis {
    rng: StdRng,
    /// What it may start (empty: everything).
    kinds: Vec<Kind>,
    faults: Vec<Fault>,
    replicas: usize,
    started: Instant,
    events: BTreeMap<&'static str, usize>,
    /// Whether this machine can cut ports off (see `netcut`).
    partitions: bool,
    /// The cuts in effect, by port.
    cuts: BTreeMap<u16, PortCut>,
}

impl Nemesis {
    fn say(&self, what: String) {
        dfs::outln!("{:>7.1} s  {what}", self.started.elapsed().as_secs_f64());
    }

    /// One step: ends a fault that is over or due, or starts one the budget allows.
    fn step(&mut self, c: &mut LabCluster, pinned: &str) -> anyhow::Result<()> {
        if !self.faults.is_empty() && self.rng.random_bool(0.5) {
            let k = self.rng.random_range(0..self.faults.len());
            return self.heal(c, k, pinned);
        }
        let bad_data: Vec<usize> = self.faults.iter().filter_map(Fault::dataserver).collect();
        let bad_meta: Vec<usize> = self.faults.iter().filter_map(Fault::metaserver).collect();
        let m = c.metaservers();
        let mut options: Vec<Fault> = Vec::new();
        if bad_data.len() < self.replicas - 1 {
            for i in (0..c.n()).filter(|i| !bad_data.contains(i)) {
                options.extend([Fault::Killed(i), Fault::Stopped(i)]);
                if self.partitions {
                    options.push(Fault::Partitioned(i));
                }
                if c.profile.data_dir.is_some() {
                    options.push(Fault::Rebuilding(i));
                }
                // One corrupt copy at a time: the workload's reads find and repair it.
                let corrupting = self.faults.iter().any(|f| matches!(f, Fault::Corrupt(_)));
                if c.profile.corrupt.is_some() && c.profile.check.is_some() && !corrupting {
                    options.push(Fault::Corrupt(i));
                }
            }
        }
        if m > 1 && bad_meta.len() < (m - 1) / 2 {
            for i in (0..m).filter(|i| !bad_meta.contains(i)) {
                options.push(Fault::MetaKilled(i));
                if self.partitions {
                    options.push(Fault::MetaPartitioned(i));
                }
                if c.profile.meta_crash.is_some() && c.profile.meta_restore.is_some() {
                    options.push(Fault::MetaCrashed(i));
                }
            }
        }
        options.retain(|f| f.kind().is_none_or(|k| self.kinds.is_empty() || self.kinds.contains(&k)));
        if options.is_empty() {
            return Ok(());
        }
        let f = options.swap_remove(self.rng.random_range(0..options.len()));
        let what = match f {
            Fault::Killed(i) => {
                c.kill(i)?;
                format!("kill -9 dataserver {i}")
            }
            Fault::Stopped(i) => {
                c.signal(i, Signal::SIGSTOP);
                format!("SIGSTOP dataserver {i}")
            }
            Fault::Rebuilding(i) => {
                c.wipe(i)?;
                c.restart(i)?;
                format!("wipe dataserver {i} (kill -9, data dir deleted, restarted)")
            }
            Fault::Corrupt(i) => {
                let cmd = c.profile.corrupt.clone().ok_or_else(|| anyhow!("no corrupt command"))?;
                let (ok, text) = c.tool(&cmd, Some(i), Some(pinned))?;
                if !ok {
                    // The server may hold no block of the file at the moment: nothing happened.
                    self.say(format!("corrupt {pinned} on dataserver {i}: not done ({})", text.trim()));
                    return Ok(());
                }
                format!("corrupt a block of {pinned} on dataserver {i}")
            }
            Fault::MetaKilled(i) => {
                c.kill_meta(i)?;
                format!("kill -9 metaserver {i}")
            }
            Fault::MetaCrashed(i) => {
                c.crash_meta(i, true)?;
                format!("crash metaserver {i} (testers' API)")
            }
            Fault::Partitioned(i) => {
                let port = c.vars.ports[i];
                let gid = crate::netcut::gid(Server::Data(i)).ok_or_else(|| anyhow!("partitions not enabled"))?;
                self.cuts.insert(port, PortCut::cut(port, gid)?);
                format!("cut dataserver {i} off the network (port {port})")
            }
            Fault::MetaPartitioned(i) => {
                let port = c.vars.meta_ports[i];
                let gid = crate::netcut::gid(Server::Meta(i)).ok_or_else(|| anyhow!("partitions not enabled"))?;
                self.cuts.insert(port, PortCut::cut(port, gid)?);
                format!("cut metaserver {i} off the network (port {port})")
            }
            Fault::Recovering(..) => unreachable!("not offered"),
        };
        *self.events.entry(kind(&f)).or_default() += 1;
        self.say(what);
        self.faults.push(f);
        Ok(())
    }

    /// Ends fault `k` if it can end now (a rebuild or a repair is over when the cluster says so).
    fn heal(&mut self, c: &mut LabCluster, k: usize, pinned: &str) -> anyhow::Result<()> {
        let f = self.faults[k].clone();
        let what = match f {
            Fault::Killed(i) => {
                c.restart(i)?;
                self.faults[k] = Fault::Recovering(i, Instant::now());
                self.say(format!("restart dataserver {i}"));
                return Ok(());
            }
            Fault::Stopped(i) => {
                c.signal(i, Signal::SIGCONT);
                self.faults[k] = Fault::Recovering(i, Instant::now());
                self.say(format!("SIGCONT dataserver {i}"));
                return Ok(());
            }
            Fault::Recovering(i, since) => {
                if since.elapsed() < SETTLE || !c.is_rebuilt(i)? {
                    return Ok(());
                }
                format!("dataserver {i} caught up")
            }
            Fault::Rebuilding(i) => {
                if !c.is_rebuilt(i)? {
                    return Ok(());
                }
                format!("dataserver {i} rebuilt")
            }
            Fault::Corrupt(i) => {
                let check = c.profile.check.clone().ok_or_else(|| anyhow!("no check command"))?;
                if !c.tool(&check, None, Some(pinned))?.0 {
                    return Ok(());
                }
                format!("{pinned} checks again (dataserver {i}'s copy repaired)")
            }
            Fault::MetaKilled(i) => {
                c.restart_meta(i)?;
                format!("restart metaserver {i}")
            }
            Fault::MetaCrashed(i) => {
                c.crash_meta(i, false)?;
                format!("restore metaserver {i}")
            }
            Fault::Partitioned(i) => {
                self.heal_cut(c.vars.ports[i])?;
                self.faults[k] = Fault::Recovering(i, Instant::now());
                self.say(format!("dataserver {i} back on the network"));
                return Ok(());
            }
            Fault::MetaPartitioned(i) => {
                self.heal_cut(c.vars.meta_ports[i])?;
                format!("metaserver {i} back on the network")
            }
        };
        self.say(what);
        self.faults.remove(k);
        Ok(())
    }

    fn heal_cut(&mut self, port: u16) -> anyhow::Result<()> {
        match self.cuts.remove(&port) {
            Some(cut) => cut.heal(),
            None => bail!("no cut of port {port} to heal"),
        }
    }

    /// Ends every fault, waiting for rebuilds and repairs (bounded, and given up if the workload
    /// is `stuck`).
    fn heal_all(
        &mut self,
        c: &mut LabCluster,
        pinned: &str,
        limit: Duration,
        stuck: &dyn Fn() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.faults.is_empty() {
            if Instant::now() > deadline {
                bail!("faults still in effect {limit:?} after the faults stopped: {:?}", self.faults);
            }
            if stuck() {
                bail!("an operation has not finished in {STUCK:?} (faults in effect: {:?})", self.faults);
            }
            for k in (0..self.faults.len()).rev() {
                self.heal(c, k, pinned)?;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

fn kind(f: &Fault) -> &'static str {
    match f {
        Fault::Killed(_) => "dataserver kill -9",
        Fault::Stopped(_) => "dataserver SIGSTOP",
        Fault::Rebuilding(_) => "dataserver wipe",
        Fault::Recovering(..) => "dataserver catching up",
        Fault::Corrupt(_) => "block corrupted",
        Fault::MetaKilled(_) => "metaserver kill -9",
        Fault::MetaCrashed(_) => "metaserver crash",
        Fault::Partitioned(_) => "dataserver partition",
        Fault::MetaPartitioned(_) => "metaserver partition",
    }
}

/// The workload's files as they must read.
struct Model {
    dir: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    next: usize,
    /// The program that reads through a mapping (`dfs-lab`, run as `dfs-lab mmap-read`).
    helper: PathBuf,
}

/// What the workload did, and the first thing that went wrong.
#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, usize>,
    bytes_checked: u64,
}

impl Model {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn pick(&self, rng: &mut StdRng, movable: bool) -> Option<String> {
        let names: Vec<&String> = self.files.keys().filter(|n| !movable || n.as_str() != PINNED).collect();
        (!names.is_empty()).then(|| names[rng.random_range(0..names.len())].clone())
    }

    /// Compares `got`, what a read of `asked` bytes at `offset` of `name` returned, with the model
    /// (a read returns everything up to the end of the file: a short one is a mismatch too).
    fn expect(&self, name: &str, offset: u64, asked: usize, got: &[u8], how: &str) -> anyhow::Result<()> {
        let want = &self.files[name];
        let end = (offset as usize).saturating_add(asked).min(want.len());
        let want = want.get(offset as usize..end).unwrap_or(&[]);
        if want != got {
            let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
            bail!(
                "model mismatch: {how} of {name} at {offset}: {} bytes read, {} expected; first difference at byte {}",
                got.len(),
                want.len(),
                offset as usize + at
            );
        }
        Ok(())
    }

    fn read_range(&self, name: &str, offset: u64, len: usize, t: &mut Tally) -> anyhow::Result<()> {
        let f = fs::File::open(self.path(name)).with_context(|| format!("open {name}"))?;
        let mut buf = vec![0; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], offset + got as u64).with_context(|| format!("read {name}"))? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        t.bytes_checked += got as u64;
        self.expect(name, offset, len, &buf, "a read")
    }

    fn read_all(&self, name: &str, t: &mut Tally) -> anyhow::Result<()> {
        let got = fs::read(self.path(name)).with_context(|| format!("read {name}"))?;
        t.bytes_checked += got.len() as u64;
        if got.len() != self.files[name].len() {
            bail!("model mismatch: {name} is {} bytes, expected {}", got.len(), self.files[name].len());
        }
        self.expect(name, 0, got.len(), &got, "a whole-file read")
    }

    /// Reads through a mapping, made in a helper process (`dfs-lab mmap-read`). A page fault on a
    /// mapped file holds its process's memory map locked until the mount answers, and a process
    /// whose map is locked cannot start another (fork and posix_spawn both wait for that lock).
    /// Faulting in the lab itself once deadlocked a run: the mount's answer waited for a wiped
    /// dataserver, which the lab could not restart while the fault held its map.
    fn read_mmap(&self, name: &str, offset: u64, len: usize, t: &mut Tally) -> anyhow::Result<()> {
        let size = self.files[name].len() as u64;
        if size == 0 {
            return Ok(());
        }
        let offset = offset.min(size - 1) & !4095;
        let len = (len as u64).min(size - offset) as usize;
        // Touching a mapped page past the end of the file raises SIGBUS: a file shorter than
        // modelled is reported here instead.
        let real = fs::metadata(self.path(name)).with_context(|| format!("stat {name}"))?.len();
        if real != size {
            bail!("model mismatch: {name} is {real} bytes, expected {size}");
        }
        let out = std::process::Command::new(&self.helper)
            .arg("mmap-read")
            .arg(self.path(name))
            .args([offset.to_string(), len.to_string()])
            .stdin(std::process::Stdio::null())
            .output()
            .context("running dfs-lab mmap-read")?;
        if out.status.code() == Some(CANNOT_MAP.into()) {
            // A filesystem may not allow mapping (direct I/O): reads cover it then.
            return Ok(());
        }
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!("an mmap read of {name} at {offset} ({len} bytes) failed ({}): {}", out.status, err.trim());
        }
        t.bytes_checked += out.stdout.len() as u64;
        self.expect(name, offset, len, &out.stdout, "an mmap read")
    }

    /// One random operation, applied to the mount and the model alike. A file written to is
    /// closed explicitly: a write's error may come at its close, which dropping a `File` ignores.
    fn op(&mut self, rng: &mut StdRng, t: &mut Tally) -> anyhow::Result<()> {
        let data = |rng: &mut StdRng, n: usize| (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>();
        let r = rng.random_range(0..100);
        let name = self.pick(rng, false);
        let op = match (r, name) {
            (_, None) | (0..=5, Some(_)) if self.files.len() < MAX_FILES => {
                let name = format!("f{}", self.next);
                self.next += 1;
                fs::File::create(self.path(&name)).with_context(|| format!("create {name}"))?;
                self.files.insert(name, vec![]);
                "create"
            }
            (_, None) => return Ok(()),
            (0..=24, Some(name)) => {
                let len = self.files[&name].len() as u64;
                let offset = rng.random_range(0..=(len + 64 * 1024).min(MAX_FILE - 1));
                let n = rng.random_range(1..=(128 * 1024).min(MAX_FILE - offset) as usize);
                let d = data(rng, n);
                let f =
                    OpenOptions::new().write(true).open(self.path(&name)).with_context(|| format!("open {name}"))?;
                f.write_all_at(&d, offset).with_context(|| format!("write {n} bytes at {offset} of {name}"))?;
                close(f).with_context(|| format!("close after writing {n} bytes at {offset} of {name}"))?;
                let m = self.files.get_mut(&name).expect("modelled");
                if m.len() < offset as usize + n {
                    m.resize(offset as usize + n, 0);
                }
                m[offset as usize..offset as usize + n].copy_from_slice(&d);
                "write"
            }
            (25..=32, Some(name)) => {
                let len = self.files[&name].len() as u64;
                if len >= MAX_FILE {
                    return Ok(());
                }
                let n = rng.random_range(1..=(64 * 1024).min((MAX_FILE - len) as usize));
                let d = data(rng, n);
                let mut f =
                    OpenOptions::new().append(true).open(self.path(&name)).with_context(|| format!("open {name}"))?;
                std::io::Write::write_all(&mut f, &d).with_context(|| format!("append {n} bytes to {name}"))?;
                close(f).with_context(|| format!("close after appending {n} bytes to {name}"))?;
                self.files.get_mut(&name).expect("modelled").extend_from_slice(&d);
                "append"
            }
            (33..=40, Some(name)) => {
                let len = self.files[&name].len() as u64;
                let to = rng.random_range(0..=(len + 128 * 1024).min(MAX_FILE));
                let f =
                    OpenOptions::new().write(true).open(self.path(&name)).with_context(|| format!("open {name}"))?;
                f.set_len(to).with_context(|| format!("truncate {name} to {to}"))?;
                close(f).with_context(|| format!("close after truncating {name} to {to}"))?;
                self.files.get_mut(&name).expect("modelled").resize(to as usize, 0);
                "truncate"
            }
            (41..=70, Some(name)) => {
                let len = self.files[&name].len() as u64;
                let offset = rng.random_range(0..=len);
                self.read_range(&name, offset, rng.random_range(1..=256 * 1024), t)?;
                "read"
            }
            (71..=78, Some(name)) => {
                self.read_all(&name, t)?;
                "read whole"
            }
            (79..=84, Some(name)) => {
                let len = self.files[&name].len() as u64;
                self.read_mmap(&name, rng.random_range(0..=len), rng.random_range(1..=128 * 1024), t)?;
                "mmap read"
            }
            (85..=88, Some(name)) => {
                let f =
                    OpenOptions::new().write(true).open(self.path(&name)).with_context(|| format!("open {name}"))?;
                f.sync_all().with_context(|| format!("fsync {name}"))?;
                "fsync"
            }
            (89..=94, Some(_)) => {
                // Onto a new name or over another file (which then goes).
                let Some(from) = self.pick(rng, true) else { return Ok(()) };
                let to = match self.pick(rng, true) {
                    Some(other) if other != from && rng.random_bool(0.5) => other,
                    _ => {
                        self.next += 1;
                        format!("f{}", self.next - 1)
                    }
                };
                fs::rename(self.path(&from), self.path(&to)).with_context(|| format!("rename {from} to {to}"))?;
                let d = self.files.remove(&from).expect("modelled");
                self.files.insert(to, d);
                "rename"
            }
            (_, Some(_)) => {
                let Some(name) = self.pick(rng, true) else { return Ok(()) };
                fs::remove_file(self.path(&name)).with_context(|| format!("unlink {name}"))?;
                self.files.remove(&name);
                "unlink"
            }
        };
        *t.ops.entry(op).or_default() += 1;
        Ok(())
    }

    /// Every file reads as modelled, and the directory holds exactly the modelled names.
    fn verify(&self, t: &mut Tally) -> anyhow::Result<()> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let want: Vec<String> = self.files.keys().cloned().collect();
        if names != want {
            bail!("model mismatch: the directory holds {names:?}, expected {want:?}");
        }
        for name in self.files.keys() {
            self.read_all(name, t)?;
        }
        Ok(())
    }
}

/// Closes `f`, returning the error the close reports (a filesystem may report a failed write
/// only then), which dropping it would ignore.
fn close(f: fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    nix::unistd::close(f.into_raw_fd()).map_err(std::io::Error::from)
}

/// Runs the chaos test for `seconds` with `seed`; prints what happened and returns whether it passed.
/// With `keep`, a failed run's directory (the servers' data and logs) is left for inspection.
pub fn chaos(
    profile: &Profile,
    bin: &Path,
    seconds: u64,
    seed: u64,
    kinds: &[Kind],
    keep: bool,
) -> anyhow::Result<bool> {
    let tmp = tempfile::Builder::new().prefix("dfs-lab-chaos-").tempdir()?;
    let replicas = profile.default_replicas;
    let metaservers = if profile.group_metaserver.is_some() || profile.metaservers > 1 { 3 } else { 1 };
    dfs::outln!(
        "dfs-lab chaos: seed {seed}, {seconds} s, {DATASERVERS} dataservers (R={replicas}, block size {BLOCK_SIZE}), \
         {metaservers} metaserver(s), target {}",
        profile.name
    );
    if replicas < 2 {
        bail!("chaos needs R >= 2: with one replica every fault loses data");
    }
    // A fault asked for by name that the target cannot take is an error, not a run without it.
    for &k in kinds {
        let (group, p) = (metaservers > 1, profile);
        let why = match k {
            Kind::Wipe if p.data_dir.is_none() => Some("the target profile has no data_dir"),
            Kind::Corrupt if p.corrupt.is_none() || p.check.is_none() => {
                Some("the target profile has no corrupt or no check command")
            }
            Kind::MetaKill | Kind::MetaPartition if !group => Some("the target has one metaserver"),
            Kind::MetaCrash if !group || p.meta_crash.is_none() || p.meta_restore.is_none() => {
                Some("the target has one metaserver, or its profile no meta_crash or meta_restore")
            }
            _ => None,
        };
        if let Some(why) = why {
            let name = k.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
            bail!("--faults {name} asked for, but {why}");
        }
    }
    // Partitions need iptables: without it they are left out (or, asked for by name, an error).
    let asked = |k: Kind| kinds.is_empty() || kinds.contains(&k);
    let partitions = if asked(Kind::Partition) || asked(Kind::MetaPartition) {
        match crate::netcut::unavailable() {
            None => true,
            Some(why) if kinds.is_empty() => {
                dfs::outln!("no partitions in this run: {why}");
                false
            }
            Some(why) => bail!("partitions asked for, but this machine cannot cut ports off: {why}"),
        }
    } else {
        false
    };
    if partitions {
        crate::netcut::enable();
    }
    let mut c = LabCluster::start(profile, bin, tmp.path(), (DATASERVERS, metaservers), BLOCK_SIZE, (replicas, None))?;
    let started = Instant::now();
    let dir = c.mountpoint().join("chaos");
    let mut pids = std::collections::BTreeSet::from_iter(c.pids());
    let result = run(&mut c, &dir, (seconds, seed, kinds, partitions), started, &mut pids);
    pids.extend(c.pids());
    let mountpoint = c.mountpoint().to_path_buf();
    c.shutdown();
    // Every process was started in a group of its own: nothing of any group may be left.
    let left: Vec<u32> =
        pids.into_iter().filter(|&(p, started)| crate::procs::left_behind(p, started)).map(|(p, _)| p).collect();
    let leftovers = match (left.is_empty(), crate::procs::is_mounted(&mountpoint)) {
        (true, false) => Ok(()),
        (false, _) => Err(anyhow!("process groups left after shutdown: {left:?}")),
        (true, true) => Err(anyhow!("{} is still mounted after shutdown", mountpoint.display())),
    };
    match result.and_then(|summary| leftovers.map(|()| summary)) {
        Ok(summary) => {
            dfs::outln!("PASS  {summary}");
            Ok(true)
        }
        Err(e) => {
            dfs::outln!("FAIL  {e:#}");
            let only = kinds.iter().filter_map(|k| k.to_possible_value()).map(|v| v.get_name().to_string());
            let only = only.collect::<Vec<_>>().join(",");
            let faults = if only.is_empty() { String::new() } else { format!(" --faults {only}") };
            dfs::outln!("      re-run: dfs-lab chaos --seconds {seconds} --seed {seed}{faults}");
            if keep {
                dfs::outln!("      kept: {} (the servers' logs are in logs/)", tmp.keep().display());
            }
            Ok(false)
        }
    }
}

/// The workload and the nemesis; `pids` collects every process started meanwhile.
fn run(
    c: &mut LabCluster,
    dir: &Path,
    (seconds, seed, kinds, partitions): (u64, u64, &[Kind], bool),
    started: Instant,
    pids: &mut std::collections::BTreeSet<(u32, Option<u64>)>,
) -> anyhow::Result<String> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let helper = std::env::current_exe().context("finding dfs-lab for its mmap-read helper")?;
    let mut model = Model { dir: dir.to_path_buf(), files: BTreeMap::new(), next: 0, helper };
    let mut rng = StdRng::seed_from_u64(seed);
    // The pinned file, with a few blocks on every server for the nemesis to corrupt.
    let pinned: Vec<u8> = (0..BLOCK_SIZE as usize * DATASERVERS * 2).map(|_| rng.random()).collect();
    fs::write(model.path(PINNED), &pinned).context("writing the pinned file")?;
    model.files.insert(PINNED.to_string(), pinned);
    let pinned_path = format!("/chaos/{PINNED}");

    // The workload runs on its own thread, so that a hung operation is seen (and the cluster torn
    // down, which ends it) instead of hanging the lab.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let (s, p) = (stop.clone(), progress.clone());
    let mut wrng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (unshared_tx, unshared) = std::sync::mpsc::channel();
    let workload = std::thread::Builder::new().name("chaos-workload".into()).spawn(move || {
        let mut t = Tally::default();
        let mut r = own_file_table();
        let _ = unshared_tx.send(());
        while !s.load(Ordering::SeqCst) && r.is_ok() {
            r = model.op(&mut wrng, &mut t);
            p.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
        }
        (model, t, r)
    })?;
    // The workload's file table is a copy of this thread's as it was when the copy was made: made
    // while this thread started a process, it would keep that process's files (a pipe's write
    // end, which its reader waits on to close) open for good. So nothing is started until then.
    unshared.recv_timeout(Duration::from_secs(10)).context("the workload thread did not start")?;

    let mut nemesis = Nemesis {
        rng: StdRng::seed_from_u64(seed ^ 0x0e3e_5155),
        kinds: kinds.to_vec(),
        faults: vec![],
        replicas: usize::from(c.profile.default_replicas),
        started,
        events: BTreeMap::new(),
        partitions,
        cuts: BTreeMap::new(),
    };
    // The nemesis's own steps (a server that will not die, a tool that will not end) are watched
    // too: should one not finish in STUCK, every wait of the lab gives up, as on SIGINT.
    let beat = Arc::new(AtomicU64::new(0));
    let nemesis_stuck = Arc::new(AtomicBool::new(false));
    let (b, ns, s2) = (beat.clone(), nemesis_stuck.clone(), stop.clone());
    std::thread::Builder::new().name("chaos-watchdog".into()).spawn(move || {
        while !s2.load(Ordering::SeqCst) {
            let last = Duration::from_millis(b.load(Ordering::SeqCst));
            if started.elapsed().saturating_sub(last) > STUCK {
                ns.store(true, Ordering::SeqCst);
                INTERRUPTED.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })?;
    let alive = || beat.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
    // Milliseconds from `started` to the workload's latest finished operation.
    let stuck = || started.elapsed().saturating_sub(Duration::from_millis(progress.load(Ordering::SeqCst))) > STUCK;
    let deadline = started + Duration::from_secs(seconds);
    let mut failure = None;
    while Instant::now() < deadline && !workload.is_finished() {
        if INTERRUPTED.load(Ordering::Relaxed) {
            failure = Some(anyhow!("interrupted"));
            break;
        }
        if stuck() {
            failure =
                Some(anyhow!("an operation has not finished in {STUCK:?} (faults in effect: {:?})", nemesis.faults));
            break;
        }
        alive();
        let died = c.died();
        if !died.is_empty() {
            failure = Some(anyhow!("exited without being killed by the lab:\n{}", died.join("\n")));
            break;
        }
        if let Err(e) = nemesis.step(c, &pinned_path) {
            failure = Some(e.context("the nemesis"));
            break;
        }
        pids.extend(c.pids());
        std::thread::sleep(Duration::from_millis(nemesis.rng.random_range(500..2500)));
    }
    if failure.is_none() {
        // The workload goes on while the faults end (its reads repair the corrupted copy).
        let limit = c.profile.limit(Duration::from_secs(120));
        alive();
        failure = nemesis
            .heal_all(c, &pinned_path, limit, &|| {
                alive();
                // A workload that ended (on a mismatch) no longer repairs anything: stop waiting.
                workload.is_finished() || stuck()
            })
            .err();
        pids.extend(c.pids());
    }
    if failure.is_none() {
        let died = c.died();
        if !died.is_empty() {
            failure = Some(anyhow!("exited without being killed by the lab:\n{}", died.join("\n")));
        }
    }
    stop.store(true, Ordering::SeqCst);
    while failure.is_none() && !workload.is_finished() {
        if stuck() {
            failure = Some(anyhow!("the last operation has not finished in {STUCK:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if nemesis_stuck.load(Ordering::SeqCst) {
        let why = failure.map(|e| format!(" ({e:#})")).unwrap_or_default();
        failure = Some(anyhow!("a step of the nemesis did not finish in {STUCK:?}{why}"));
    }
    if let Some(e) = failure {
        // A workload that ended by itself ended on the first mismatch or error: that is the cause.
        let ended = workload.is_finished();
        // Tearing the cluster down ends a hung operation (with an error), so the thread returns.
        c.shutdown();
        return match workload.join() {
            Ok((_, _, Err(w))) if ended => Err(w),
            _ => Err(e),
        };
    }
    let (model, mut tally, r) = workload.join().map_err(|_| anyhow!("the workload thread panicked"))?;
    r?;
    // Everything back: every file reads as modelled, checks on every replica, and reads the same
    // through a fresh mount (nothing lived only in this mount's caches).
    model.verify(&mut tally)?;
    if let Some(check) = c.profile.check.clone() {
        for name in model.files.keys() {
            let (ok, text) = c.tool(&check, None, Some(&format!("/chaos/{name}")))?;
            if !ok {
                bail!("the check of /chaos/{name} failed after every server came back: {}", text.trim());
            }
        }
    }
    c.unmount();
    c.mount()?;
    pids.extend(c.pids());
    model.verify(&mut tally)?;
    if nemesis.events.is_empty() {
        bail!("no fault was injected in {seconds} s: nothing was tested under faults (run longer)");
    }
    let ops: usize = tally.ops.values().sum();
    let ops_list = tally.ops.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ");
    let faults = nemesis.events.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "{ops} operations ({ops_list}), {} MiB checked against the model, 0 mismatches; faults: {}; {} file(s) verified \
         after recovery and through a fresh mount",
        tally.bytes_checked >> 20,
        faults,
        model.files.len()
    ))
}

/// Gives the calling thread a file table of its own: the files of the mount it opens are then
/// not in the table of the lab's main thread, from which every server is started. A started
/// process gets a copy of each open file and closes it at exec, and the close of a file of the
/// mount waits for the file's buffered writes to land, which may wait for the very server being
/// started: a wiped dataserver's restart once hung that way until the run's outer timeout.
fn own_file_table() -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES).context("unshare(CLONE_FILES)")
}

/// The exit status of `dfs-lab mmap-read` for a file that cannot be mapped.
pub const CANNOT_MAP: u8 = 3;

/// `dfs-lab mmap-read`: copies `len` bytes at `offset` of `path`, read through a private read-only
/// mapping, to stdout (see [`Model::read_mmap`] for why in a process of its own).
pub fn mmap_read(path: &Path, offset: u64, len: usize) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let at = libc::off_t::try_from(offset).map_err(|_| anyhow!("offset {offset} is too large"))?;
    if len == 0 {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    // SAFETY: a fresh read-only private mapping of `len` bytes, only read through the slice below
    // and unmapped after it is written out. Touching a page past the file's end raises SIGBUS,
    // which ends this process: the caller sees the signal.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), at) };
    if p == libc::MAP_FAILED {
        eprintln!("dfs-lab mmap-read: mmap {}: {}", path.display(), std::io::Error::last_os_error());
        return Ok(std::process::ExitCode::from(CANNOT_MAP));
    }
    // SAFETY: as above; the mapping lives until the munmap below.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    let mut out = std::io::stdout().lock();
    let written = out.write_all(bytes).and_then(|()| out.flush());
    // SAFETY: the mapping made above, no longer borrowed.
    unsafe { libc::munmap(p, len) };
    written.context("writing the bytes out")?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    use super::{own_file_table, Model, Tally};
    use crate::procs::{left_behind, Proc};

    /// What the check after a chaos run counts as left behind: a process still there, not one
    /// reaped, and not another process that has its number (one started at another time).
    #[test]
    fn only_the_process_itself_or_its_group_counts_as_left_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sleep = std::process::Command::new("sleep");
        sleep.arg("30");
        let mut p = Proc::spawn(sleep, "sleep", &dir.path().join("log")).expect("spawn sleep");
        let (pid, started) = p.ident();
        assert!(started.is_some(), "its start time is read at spawn");
        assert!(left_behind(pid, started), "still running");
        assert!(!left_behind(pid, started.map(|t| t + 1)), "the number, but another start time");
        p.kill9();
        assert!(!left_behind(pid, started), "killed and reaped");
    }

    /// A process that exited and was reaped leaves nothing of its group behind at `kill9`: a
    /// background job it started is killed too.
    #[test]
    fn kill9_of_a_reaped_leader_kills_what_is_left_of_its_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", "sleep 30 & exit 0"]);
        let mut p = Proc::spawn(sh, "sh", &dir.path().join("log")).expect("spawn sh");
        let group = nix::unistd::Pid::from_raw(-(p.id() as i32));
        let exited = crate::procs::wait_for("sh to exit", std::time::Duration::from_secs(10), || Ok(!p.running()));
        exited.expect("sh exits at once");
        assert!(nix::sys::signal::kill(group, None).is_ok(), "its background sleep is left in its group");
        p.kill9();
        let gone = crate::procs::wait_for("the group to go", std::time::Duration::from_secs(10), || {
            Ok(nix::sys::signal::kill(group, None).is_err())
        });
        if gone.is_err() {
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        }
        assert!(gone.is_ok(), "the background sleep outlived kill9");
    }

    /// A file system whose reads and closes wait until the test lets them go: file `f` (ino 2,
    /// 64 KiB of 7s) in its root.
    struct HeldReads {
        open: Arc<(Mutex<bool>, Condvar)>,
        reads: Arc<AtomicUsize>,
    }

    const HELD_SIZE: u64 = 64 * 1024;

    fn held_attr(ino: u64) -> fuser::FileAttr {
        let (kind, perm, size) = match ino {
            1 => (fuser::FileType::Directory, 0o755, 0),
            _ => (fuser::FileType::RegularFile, 0o644, HELD_SIZE),
        };
        let t = std::time::UNIX_EPOCH;
        fuser::FileAttr {
            ino: fuser::INodeNo(ino),
            size,
            blocks: size / 512,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    impl HeldReads {
        /// Waits until the test lets requests go (at most 60 s, so that a failing test still ends).
        fn held(&self) {
            let (open, cv) = &*self.open;
            let held = open.lock().unwrap_or_else(|p| p.into_inner());
            let _held = cv.wait_timeout_while(held, Duration::from_secs(60), |open| !*open);
        }
    }

    impl fuser::Filesystem for HeldReads {
        fn lookup(&self, _: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, reply: fuser::ReplyEntry) {
            match (parent.0, name.to_str()) {
                (1, Some("f")) => reply.entry(&Duration::from_secs(60), &held_attr(2), fuser::Generation(0)),
                _ => reply.error(fuser::Errno::ENOENT),
            }
        }

        fn getattr(
            &self,
            _: &fuser::Request,
            ino: fuser::INodeNo,
            _: Option<fuser::FileHandle>,
            reply: fuser::ReplyAttr,
        ) {
            match ino.0 {
                1 | 2 => reply.attr(&Duration::from_secs(60), &held_attr(ino.0)),
                _ => reply.error(fuser::Errno::ENOENT),
            }
        }

        fn read(
            &self,
            _: &fuser::Request,
            _: fuser::INodeNo,
            _: fuser::FileHandle,
            offset: u64,
            size: u32,
            _: fuser::OpenFlags,
            _: Option<fuser::LockOwner>,
            reply: fuser::ReplyData,
        ) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.held();
            let len = u64::from(size).min(HELD_SIZE.saturating_sub(offset));
            reply.data(&vec![7u8; len as usize]);
        }

        /// A close waits as a close of a file with buffered writes waits for a server.
        fn flush(
            &self,
            _: &fuser::Request,
            _: fuser::INodeNo,
            _: fuser::FileHandle,
            _: fuser::LockOwner,
            reply: fuser::ReplyEmpty,
        ) {
            self.held();
            reply.ok();
        }
    }

    /// A mount of [`HeldReads`] in a temp dir, unmounted when dropped. Fields drop in order: the
    /// mount goes before its temp dir, which could not be removed while mounted (and whose removal
    /// would walk into the mount).
    struct Held {
        _mount: fuser::BackgroundSession,
        _dir: tempfile::TempDir,
        mnt: std::path::PathBuf,
        open: Arc<(Mutex<bool>, Condvar)>,
        reads: Arc<AtomicUsize>,
    }

    impl Held {
        /// None (the test skips) where mounting needs what is missing.
        fn mount() -> Option<Held> {
            if !std::path::Path::new("/dev/fuse").exists() || !nix::unistd::Uid::effective().is_root() {
                eprintln!("skipping: mounting needs /dev/fuse and root");
                return None;
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).expect("mount point");
            let open = Arc::new((Mutex::new(false), Condvar::new()));
            let reads = Arc::new(AtomicUsize::new(0));
            let fs = HeldReads { open: open.clone(), reads: reads.clone() };
            let mount = fuser::spawn_mount(fs, &mnt, &fuser::Config::default()).expect("mounting");
            Some(Held { _mount: mount, _dir: dir, mnt, open, reads })
        }

        fn let_go(&self) {
            *self.open.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.open.1.notify_all();
        }
    }

    /// Tests must leave no mount and no directory behind.
    #[test]
    fn a_held_mount_leaves_nothing_behind_when_dropped() {
        let Some(h) = Held::mount() else { return };
        let dir = h.mnt.parent().expect("the temp dir").to_path_buf();
        drop(h);
        assert!(!crate::procs::is_mounted(&dir.join("mnt")), "the mount outlived its session");
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }

    /// Starts `true` on a thread of its own (where a start is held up, it waits until the mount
    /// lets go); whether it ran within 10 s.
    fn starts_at_once() -> Result<std::io::Result<bool>, std::sync::mpsc::RecvTimeoutError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = std::process::Command::new("true").status();
            let _ = tx.send(started.map(|s| s.success()));
        });
        rx.recv_timeout(Duration::from_secs(10))
    }

    /// The chaos workload's mmap reads wait on the mount, and the mount may wait on a server the
    /// lab has to start: a read held up in the mount must not hold the lab up. (A page fault on a
    /// mapped file keeps its process's memory map locked, and neither fork nor posix_spawn can
    /// go ahead then.)
    #[test]
    fn an_mmap_read_held_up_in_the_mount_does_not_hold_up_starting_a_process() {
        let Some(h) = Held::mount() else { return };
        // This test runs from target/<profile>/deps; dfs-lab is built beside it by `cargo test`.
        let exe = std::env::current_exe().expect("the test's path");
        let helper = exe.parent().and_then(|d| d.parent()).expect("the target dir").join("dfs-lab");
        assert!(helper.exists(), "{} is not built (cargo build --bin dfs-lab)", helper.display());
        let model = Model {
            dir: h.mnt.clone(),
            files: BTreeMap::from([("f".to_string(), vec![7u8; HELD_SIZE as usize])]),
            next: 0,
            helper,
        };
        let reader = std::thread::spawn(move || model.read_mmap("f", 8192, 4096, &mut Tally::default()));
        let reads = h.reads.clone();
        let reached = crate::procs::wait_for("the read to reach the mount", Duration::from_secs(10), || {
            Ok(reads.load(Ordering::SeqCst) > 0)
        });
        // A read mapped in this process would keep the start waiting until the read is let go.
        let started = starts_at_once();
        h.let_go();
        let read = reader.join().expect("the reader thread");
        reached.expect("the read reached the mount");
        assert!(matches!(started, Ok(Ok(true))), "a process could not start while an mmap read waited: {started:?}");
        read.expect("the mmap read, once let go");
    }

    /// The same for a file of the mount the workload holds open: a process started meanwhile gets
    /// a copy of it (in the table of the thread that starts it) and closes it at exec, and that
    /// close may wait for a server that is down. The workload's own file table keeps it out.
    #[test]
    fn a_file_of_the_mount_the_workload_holds_open_does_not_hold_up_starting_a_process() {
        let Some(h) = Held::mount() else { return };
        let f = h.mnt.join("f");
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let (close_tx, close) = std::sync::mpsc::channel::<()>();
        let workload = std::thread::spawn(move || {
            own_file_table().expect("a file table of its own");
            let file = std::fs::File::open(&f).expect("open f");
            let _ = opened_tx.send(());
            let _ = close.recv_timeout(Duration::from_secs(30));
            drop(file);
        });
        opened.recv_timeout(Duration::from_secs(10)).expect("the workload opened f");
        let started = starts_at_once();
        h.let_go();
        let _ = close_tx.send(());
        workload.join().expect("the workload thread");
        assert!(matches!(started, Ok(Ok(true))), "a process could not start while f was open: {started:?}");
    }
}
