//! Runs one scenario: a fresh cluster, its steps in order, then the check of every file at rest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{wait_for, LabCluster};
use crate::config::{LabDirs, Profile, Scenario, Step};
use crate::workload::{self, Running};

/// Longest a workload may take (the 64 MiB file included).
const RUN_LIMIT: Duration = Duration::from_secs(600);
const REBUILD_LIMIT: Duration = Duration::from_secs(180);
/// Reads of a corrupted file until its bad copy is repaired: each read picks a random replica, so
/// 60 reads miss a given bad replica with odds below 1e-10 (at 3 replicas).
const HEAL_READS: usize = 60;

pub struct Options {
    pub replicas: Option<u8>,
    pub block_size: Option<u32>,
    pub keep: bool,
    pub results: PathBuf,
    pub bin: PathBuf,
    /// Longest a verification pass may take. Reads must work while servers are down: a pass that
    /// waits for one (as it must with a single replica) fails here.
    pub verify_limit: Duration,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub description: String,
    pub servers: usize,
    pub block_size: u32,
    pub replicas: u8,
    pub passed: bool,
    pub seconds: f64,
    pub failure: Option<String>,
    pub diff: Option<String>,
    /// Where this scenario's logs were saved (on failure), and its kept directory (--keep).
    pub logs: Vec<PathBuf>,
    pub kept: Option<PathBuf>,
}

struct Failure {
    msg: String,
    diff: Option<String>,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { msg: format!("{:#}", e.into()), diff: None }
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure { msg: msg.into(), diff: None })
}

fn compare(golden_path: &Path, actual: &str, what: &str) -> Result<(), Failure> {
    let golden = std::fs::read_to_string(golden_path).map_err(|e| Failure {
        msg: format!("{}: {e} (run `dfs-lab golden --update`)", golden_path.display()),
        diff: None,
    })?;
    match workload::diff(&golden_path.display().to_string(), &golden, what, actual) {
        None => Ok(()),
        Some(d) => {
            Err(Failure { msg: format!("{what}: output differs from {}", golden_path.display()), diff: Some(d) })
        }
    }
}

fn sleep(seconds: u64) -> Result<(), Failure> {
    let until = Instant::now() + Duration::from_secs(seconds);
    wait_for("a pause", Duration::from_secs(seconds + 1), || Ok(Instant::now() >= until))?;
    Ok(())
}

fn regular_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else { continue };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(r),
                Ok(t) if t.is_file() => out.push(format!("/{}", r.display())),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

pub struct Runner<'a> {
    pub dirs: &'a LabDirs,
    pub profile: &'a Profile,
    pub opts: &'a Options,
}

impl Runner<'_> {
    pub fn shape(&self, s: &Scenario) -> (u32, u8) {
        let bs = self.opts.block_size.or(s.block_size).unwrap_or(self.profile.default_block_size);
        let r = self.opts.replicas.or(s.replicas).unwrap_or(self.profile.default_replicas);
        (bs, r)
    }

    pub fn run(&self, s: &Scenario, progress: &dyn Fn(String)) -> Outcome {
        let start = Instant::now();
        let (block_size, replicas) = self.shape(s);
        let mut out = Outcome {
            name: s.name.clone(),
            description: s.description.clone(),
            servers: s.servers,
            block_size,
            replicas,
            passed: false,
            seconds: 0.0,
            failure: None,
            diff: None,
            logs: Vec::new(),
            kept: None,
        };
        let tmp = match tempfile::Builder::new().prefix(&format!("dfs-lab-{}-", s.name)).tempdir() {
            Ok(t) => t,
            Err(e) => {
                out.failure = Some(format!("cannot make a temp dir: {e}"));
                return out;
            }
        };
        let mut cluster = None;
        let r = self.steps(s, tmp.path(), block_size, replicas, &mut cluster, progress);
        out.seconds = start.elapsed().as_secs_f64();
        match r {
            Ok(()) => out.passed = true,
            Err(f) => {
                out.failure = Some(f.msg);
                out.diff = f.diff;
            }
        }
        if let Some(mut c) = cluster.take() {
            c.shutdown();
            if !out.passed {
                out.logs = self.save_logs(&s.name, &c.log_files(), out.diff.as_deref());
            }
        }
        if self.opts.keep && !out.passed {
            out.kept = Some(tmp.keep());
        }
        out
    }

    fn save_logs(&self, name: &str, logs: &[PathBuf], diff: Option<&str>) -> Vec<PathBuf> {
        let dir = self.opts.results.join(name);
        let _ = std::fs::create_dir_all(&dir);
        if let Some(d) = diff {
            let _ = std::fs::write(dir.join("diff.txt"), d);
        }
        logs.iter()
            .filter_map(|l| {
                let to = dir.join(l.file_name()?);
                std::fs::copy(l, &to).ok().map(|_| to)
            })
            .collect()
    }

    fn steps(
        &self,
        s: &Scenario,
        tmp: &Path,
        block_size: u32,
        replicas: u8,
        slot: &mut Option<LabCluster>,
        progress: &dyn Fn(String),
    ) -> Result<(), Failure> {
        progress(format!("{}: starting {} dataservers", s.name, s.servers));
        let c = slot.insert(LabCluster::start(self.profile, &self.opts.bin, tmp, s.servers, block_size, replicas)?);
        let mnt = c.mountpoint().to_path_buf();
        let outputs = tmp.join("outputs");
        std::fs::create_dir_all(&outputs)?;
        let mut background: Option<Running> = None;
        let n = s.servers;
        for (k, step) in s.steps.iter().enumerate() {
            progress(format!("{}: step {}/{}: {step:?}", s.name, k + 1, s.steps.len()));
            let what = format!("step {} ({step:?})", k + 1);
            match step {
                Step::Run { workload: w } => {
                    let text = workload::run(
                        w,
                        &self.dirs.workload(w),
                        &mnt.join(w),
                        &outputs.join(format!("{k}-{w}.txt")),
                        RUN_LIMIT,
                    )?;
                    compare(&self.dirs.golden(w), &text, &what)?;
                }
                Step::Start { workload: w } => {
                    if background.is_some() {
                        return fail(format!("{what}: a workload is already running"));
                    }
                    background = Some(workload::start(
                        w,
                        &self.dirs.workload(w),
                        &mnt.join(w),
                        &outputs.join(format!("{k}-{w}.txt")),
                    )?);
                }
                Step::Finish => {
                    let Some(r) = background.take() else { return fail(format!("{what}: no workload was started")) };
                    let golden = self.dirs.golden(&r.name);
                    let text = r.wait(RUN_LIMIT)?;
                    compare(&golden, &text, &what)?;
                }
                Step::ExpectBlocked { seconds } => {
                    sleep(*seconds)?;
                    let Some(r) = background.as_mut() else { return fail(format!("{what}: no workload was started")) };
                    if r.finished() {
                        return fail(format!(
                            "{what}: the workload returned within {seconds} s, while a dataserver was down"
                        ));
                    }
                }
                Step::Verify { workload: w } => {
                    let text = workload::run(
                        "verify",
                        &self.dirs.verify_script(),
                        &mnt.join(w),
                        &outputs.join(format!("{k}-verify-{w}.txt")),
                        self.opts.verify_limit,
                    )?;
                    compare(&self.dirs.golden_verify(w), &text, &what)?;
                }
                Step::Kill { server } => c.kill(*server),
                Step::Restart { server } => c.restart(*server)?,
                Step::Wipe { server } => c.wipe(*server)?,
                Step::WaitRebuilt { server } => c.wait_rebuilt(*server, REBUILD_LIMIT)?,
                Step::Isolate { server } => {
                    c.kill((server + n - 1) % n);
                    c.kill((server + 1) % n);
                }
                Step::Corrupt { server, workload: w, file } => {
                    let (ok, text) = c.tool(&c.profile.corrupt, Some(*server), Some(&format!("/{w}/{file}")))?;
                    if !ok {
                        return fail(format!("{what}: the corrupt command failed: {text}"));
                    }
                }
                Step::Heal { workload: w, file } => self.heal(c, &mnt, w, file, &what)?,
                Step::Sleep { seconds } => sleep(*seconds)?,
            }
        }
        if let Some(r) = background.take() {
            let golden = self.dirs.golden(&r.name);
            compare(&golden, &r.wait(RUN_LIMIT)?, "the background workload")?;
        }
        // The data at rest: every server back, every rebuild done, every replica of every file good.
        progress(format!("{}: checking every file at rest", s.name));
        for i in c.stopped() {
            c.restart(i)?;
        }
        for i in 0..n {
            c.wait_rebuilt(i, REBUILD_LIMIT)?;
        }
        let mut bad = Vec::new();
        for path in regular_files(&mnt) {
            let (ok, text) = c.tool(&c.profile.check, None, Some(&path))?;
            if !ok {
                bad.push(format!("{path}: {}", text.trim()));
            }
        }
        if !bad.is_empty() {
            let shown = bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n");
            return fail(format!("{} file(s) fail the check at rest:\n{shown}", bad.len()));
        }
        Ok(())
    }

    /// Reads a corrupted file until the target's check passes: every read must return the golden
    /// content, and one of them must have repaired the bad copy.
    fn heal(&self, c: &LabCluster, mnt: &Path, w: &str, file: &str, what: &str) -> Result<(), Failure> {
        let golden = std::fs::read_to_string(self.dirs.golden_verify(w))?;
        let want = golden
            .lines()
            .find(|l| l.ends_with(&format!(" ./{file}")))
            .ok_or_else(|| anyhow::anyhow!("{what}: {file} has no sha256 in {}", self.dirs.golden_verify(w).display()))?
            .to_string();
        for _ in 0..HEAL_READS {
            let out =
                std::process::Command::new("sha256sum").arg(format!("./{file}")).current_dir(mnt.join(w)).output()?;
            let got = dfs::normalize::normalize(&String::from_utf8_lossy(&out.stdout), "").trim().to_string();
            if got != want {
                let err = String::from_utf8_lossy(&out.stderr);
                return fail(format!("{what}: a read of {w}/{file} returned wrong data or failed: {got} {err}"));
            }
            if c.tool(&c.profile.check, None, Some(&format!("/{w}/{file}")))?.0 {
                return Ok(());
            }
        }
        fail(format!("{what}: after {HEAL_READS} correct reads, {w}/{file} still fails the check (not repaired)"))
    }
}
