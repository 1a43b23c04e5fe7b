//! Runs one scenario: a fresh cluster, its steps in order, then the check of every file at rest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::LabCluster;
use crate::config::{LabDirs, Member, Profile, Scenario, Step};
use crate::procs::{bounded, wait_for};
use crate::workload::{self, Running};

/// Longest a workload may take (the 64 MiB file included).
const RUN_LIMIT: Duration = Duration::from_secs(600);
const REBUILD_LIMIT: Duration = Duration::from_secs(180);
/// Longest a metaserver group may take to elect a leader.
const ELECTION_LIMIT: Duration = Duration::from_secs(30);
/// Reads of a corrupted file until its bad copy is repaired: each read picks a random replica, so
/// 60 reads miss a given bad replica with odds below 1e-10 (at 3 replicas).
const HEAL_READS: usize = 60;
/// How long the lab's own listing of the mount, or one read of a file, may take.
const LIST_LIMIT: Duration = Duration::from_secs(120);

pub struct Options {
    pub replicas: Option<u8>,
    pub block_size: Option<u32>,
    pub keep: bool,
    pub results: PathBuf,
    pub bin: PathBuf,
    /// Longest a verification pass may take. Reads must work while servers are down: a pass that
    /// waits for one (as it must with a single replica) fails here.
    pub verify_limit: Duration,
    /// `--profile` as given, for the re-run command.
    pub profile_arg: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    /// The scenario, or a check, cannot apply to this target (its shapes or commands).
    NotApplicable,
    /// A check that could not run because an earlier step failed.
    NotRun,
}

/// How long replicas written with a write quorum below the replica count may take to converge
/// once every server is back, before the check at rest counts a file as failed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

/// One check of a scenario: a workload's output, a verification, a fault step, the data at rest.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    /// One line: why it failed, or why it did not apply.
    pub reason: String,
    /// The full diff against golden output, when there is one.
    pub diff_file: Option<PathBuf>,
    #[serde(skip)]
    pub diff: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, verdict: Verdict, reason: impl Into<String>, diff: Option<String>) -> Self {
        Check { name: name.into(), verdict, reason: reason.into(), diff_file: None, diff }
    }

    /// A check from a step's result.
    fn of(name: String, r: Result<(), Failure>) -> Self {
        match r {
            Ok(()) => Check::new(name, Verdict::Pass, "", None),
            Err(f) => Check::new(name, Verdict::Fail, f.msg, f.diff),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub description: String,
    pub category: String,
    pub servers: usize,
    pub block_size: u32,
    pub replicas: u8,
    pub verdict: Verdict,
    pub passed: bool,
    pub seconds: f64,
    /// The first failure (or why the scenario does not apply), one message.
    pub failure: Option<String>,
    pub checks: Vec<Check>,
    /// Where this scenario's logs were saved (on failure), and its kept directory (--keep).
    pub logs: Vec<PathBuf>,
    pub kept: Option<PathBuf>,
    /// The command that runs this scenario alone, as this run did.
    pub rerun: String,
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
        Some(d) => Err(Failure { msg: format!("output differs from {}", golden_path.display()), diff: Some(d) }),
    }
}

fn sleep(seconds: u64) -> Result<(), Failure> {
    let until = Instant::now() + Duration::from_secs(seconds);
    wait_for("a pause", Duration::from_secs(seconds + 1), || Ok(Instant::now() >= until))?;
    Ok(())
}

/// Fails if a server or mount exited without the lab killing it (see [`LabCluster::died`]).
fn unbidden_exits(c: &mut LabCluster) -> Result<(), Failure> {
    let died = c.died();
    if died.is_empty() {
        return Ok(());
    }
    fail(format!("exited without being killed by the lab:\n{}", died.join("\n")))
}

/// Every regular file under `root`, as a path from it. A directory that cannot be read is an
/// error: the check at rest must not pass by checking fewer files than there are.
fn regular_files(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let err = |e: std::io::Error| anyhow::anyhow!("listing {} for the check at rest: {e}", dir.display());
        for e in std::fs::read_dir(&dir).map_err(err)? {
            let e = e.map_err(err)?;
            let r = rel.join(e.file_name());
            let t = e.file_type().map_err(err)?;
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() {
                out.push(format!("/{}", r.display()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A scenario as it runs: its cluster, the checks so far, and the step it is at (usize::MAX while
/// the cluster starts).
struct ScenarioRun {
    cluster: Option<LabCluster>,
    checks: Vec<Check>,
    reached: usize,
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

    /// The quorums scenario `s` asks for (write defaulting to all replicas, read to one), if any.
    fn quorum(&self, s: &Scenario, replicas: u8) -> Option<(u8, u8)> {
        (s.write_quorum.is_some() || s.read_quorum.is_some())
            .then(|| (s.write_quorum.unwrap_or(replicas), s.read_quorum.unwrap_or(1)))
    }

    /// How many metaservers scenario `s` runs with: a group if it asks for one, else the profile's.
    fn metaservers(&self, s: &Scenario) -> usize {
        s.metaservers.unwrap_or(self.profile.metaservers)
    }

    /// Why scenario `s` cannot apply to the target (every reason), if it cannot.
    fn not_applicable(&self, s: &Scenario, block_size: u32, replicas: u8) -> Option<String> {
        if self.profile.is_local() && s.steps.iter().any(Step::is_fault) {
            return Some("the target is a local directory: it has no servers to fail".into());
        }
        let mut why: Vec<String> = self.profile.unsupported(s.servers, block_size, replicas).into_iter().collect();
        if self.profile.data_dir.is_none() && s.steps.iter().any(|st| matches!(st, Step::Wipe { .. })) {
            why.push("it wipes a server's disk, and the target profile has no data_dir".into());
        }
        let corrupts = s.steps.iter().any(|st| matches!(st, Step::Corrupt { .. } | Step::Heal { .. }));
        if corrupts && self.profile.corrupt.is_none() {
            why.push("it corrupts blocks, and the target profile has no corrupt command".into());
        }
        let heals = s.steps.iter().any(|st| matches!(st, Step::Heal { .. }));
        if heals && self.profile.check.is_none() {
            why.push("it checks that reads repair, and the target profile has no check command".into());
        }
        let p = self.profile;
        if let Some((w, q)) = self.quorum(s, replicas) {
            if !p.quorums {
                why.push("it sets quorums, and the target profile does not take them (quorums = true)".into());
            } else if w > replicas || q > replicas || w == 0 || q == 0 {
                why.push(format!("its quorums (W = {w}, Q = {q}) do not fit {replicas} replicas"));
            }
        }
        if self.metaservers(s) > 1 && p.metaservers == 1 && p.group_metaserver.is_none() {
            why.push("it needs a metaserver group, and the target profile has no group_metaserver".into());
        }
        let named =
            |role: &str| s.steps.iter().any(|st| st.member().is_some_and(|(m, _)| *m == Member::Role(role.into())));
        if (named("leader") || named("follower")) && p.meta_isleader.is_none() {
            why.push("it names the metaserver leader, and the target profile has no meta_isleader".into());
        }
        if s.steps.iter().any(|st| matches!(st, Step::WipeMeta { .. })) && p.meta_data_dir.is_none() {
            why.push("it wipes a metaserver's disk, and the target profile has no meta_data_dir".into());
        }
        let crashes = s.steps.iter().any(|st| matches!(st, Step::CrashMeta { .. } | Step::RestoreMeta { .. }));
        if crashes && (p.meta_crash.is_none() || p.meta_restore.is_none()) {
            why.push("it crashes a metaserver, and the target profile has no meta_crash or meta_restore".into());
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    pub fn run(&self, s: &Scenario, progress: &dyn Fn(String)) -> Outcome {
        let start = Instant::now();
        let (block_size, replicas) = self.shape(s);
        let mut rerun = format!("dfs-lab run {} --profile {}", s.name, self.opts.profile_arg);
        if let Some(r) = self.opts.replicas {
            rerun += &format!(" --replicas {r}");
        }
        if let Some(b) = self.opts.block_size {
            rerun += &format!(" --block-size {b}");
        }
        let faults = s.steps.iter().any(Step::is_fault);
        let mut out = Outcome {
            name: s.name.clone(),
            description: s.description.clone(),
            category: s.category.clone().unwrap_or_else(|| if faults { "faults" } else { "workloads" }.into()),
            servers: s.servers,
            block_size,
            replicas,
            verdict: Verdict::Fail,
            passed: false,
            seconds: 0.0,
            failure: None,
            checks: Vec::new(),
            logs: Vec::new(),
            kept: None,
            rerun,
        };
        if let Some(why) = self.not_applicable(s, block_size, replicas) {
            out.verdict = Verdict::NotApplicable;
            out.failure = Some(format!("not applicable: {why}"));
            return out;
        }
        let tmp = match tempfile::Builder::new().prefix(&format!("dfs-lab-{}-", s.name)).tempdir() {
            Ok(t) => t,
            Err(e) => {
                out.failure = Some(format!("cannot make a temp dir: {e}"));
                return out;
            }
        };
        let mut st = ScenarioRun { cluster: None, checks: Vec::new(), reached: usize::MAX };
        let r = self.steps(s, tmp.path(), block_size, replicas, &mut st, progress);
        let ScenarioRun { cluster, mut checks, reached } = st;
        let mut cluster = cluster;
        out.seconds = start.elapsed().as_secs_f64();
        if let Err(f) = r {
            // What stopped the scenario is a failed check of its own; the checks after it did not run.
            let name = match s.steps.get(reached) {
                Some(step) => format!("step {} ({})", reached + 1, step.describe()),
                None if reached == usize::MAX => "starting the cluster".into(),
                None => "the data at rest".into(),
            };
            checks.push(Check::new(name, Verdict::Fail, f.msg, f.diff));
            let later = s.steps.iter().enumerate().skip(reached.wrapping_add(1));
            for (k, step) in later.filter(|(_, st)| matches!(st, Step::Run { .. } | Step::Verify { .. } | Step::Finish))
            {
                let name = format!("step {} ({})", k + 1, step.describe());
                checks.push(Check::new(name, Verdict::NotRun, "an earlier step failed", None));
            }
        }
        let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
        out.passed = failed == 0;
        out.verdict = if out.passed { Verdict::Pass } else { Verdict::Fail };
        out.failure = checks.iter().find(|c| c.verdict == Verdict::Fail).map(|c| format!("{}: {}", c.name, c.reason));
        if let Some(mut c) = cluster.take() {
            c.shutdown();
        }
        if !out.passed {
            // The logs of every process, also when the cluster never came up.
            let logs = std::fs::read_dir(tmp.path().join("logs"))
                .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default();
            out.logs = self.save_logs(&s.name, &logs, &mut checks);
        }
        out.checks = checks;
        if self.opts.keep && !out.passed {
            out.kept = Some(tmp.keep());
        }
        out
    }

    /// Copies the logs, and each check's full diff, into the results; returns the logs' new paths.
    fn save_logs(&self, name: &str, logs: &[PathBuf], checks: &mut [Check]) -> Vec<PathBuf> {
        let dir = self.opts.results.join(name);
        let _ = std::fs::create_dir_all(&dir);
        for (k, c) in checks.iter_mut().enumerate() {
            if let Some(d) = &c.diff {
                let file = dir.join(format!("diff-{}.txt", k + 1));
                if std::fs::write(&file, d).is_ok() {
                    c.diff_file = Some(file);
                }
            }
        }
        let mut logs = logs.to_vec();
        logs.sort();
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
        st: &mut ScenarioRun,
        progress: &dyn Fn(String),
    ) -> Result<(), Failure> {
        let ScenarioRun { cluster: slot, checks, reached } = st;
        progress(format!("{}: starting {} dataservers", s.name, s.servers));
        let run_limit = self.profile.limit(RUN_LIMIT);
        let rebuild_limit = self.profile.limit(REBUILD_LIMIT);
        // A check whose failure does not stop the scenario: later steps do not depend on it.
        let mut record = |name: String, r: Result<(), Failure>| checks.push(Check::of(name, r));
        let shape = (s.servers, self.metaservers(s));
        let c = slot.insert(LabCluster::start(
            self.profile,
            &self.opts.bin,
            tmp,
            shape,
            block_size,
            (replicas, self.quorum(s, replicas)),
        )?);
        let election_limit = self.profile.limit(ELECTION_LIMIT);
        let mnt = c.mountpoint().to_path_buf();
        // A target without a mount command (a local directory) has one view of its files: the
        // workloads' `$OTHER` is then unset and they use their own directory for both.
        let two = s.mounts > 1 && self.profile.mount.is_some();
        if two {
            progress(format!("{}: mounting a second time", s.name));
            c.mount_other()?;
        }
        let other = two.then(|| c.other_mountpoint().to_path_buf());
        let other_dir = |w: &str| other.as_ref().map(|o| o.join(w));
        let outputs = tmp.join("outputs");
        std::fs::create_dir_all(&outputs)?;
        let mut background: Option<Running> = None;
        let n = s.servers;
        for (k, step) in s.steps.iter().enumerate() {
            *reached = k;
            progress(format!("{}: step {}/{}: {}", s.name, k + 1, s.steps.len(), step.describe()));
            let what = format!("step {} ({})", k + 1, step.describe());
            // A workload that ended before a fault meant to land while it runs: the scenario then
            // checked a quiet cluster, as a target fast enough (or a fault slow enough) makes it.
            if let Some(r) = background.as_mut().filter(|_| step.lands_during_the_workload()) {
                if r.finished() {
                    record(
                        format!("{what} during {}", r.name),
                        fail(format!(
                            "the background workload {} had already ended: the step did not land while it ran",
                            r.name
                        )),
                    );
                }
            }
            match step {
                Step::Run { workload: w } => {
                    let r = workload::run_with(
                        w,
                        &self.dirs.workload(w),
                        &mnt.join(w),
                        &outputs.join(format!("{k}-{w}.txt")),
                        run_limit,
                        other_dir(w).as_deref(),
                    )
                    .map_err(Failure::from)
                    .and_then(|text| compare(&self.dirs.golden(w), &text, &what));
                    record(what, r);
                }
                Step::Start { workload: w } => {
                    if background.is_some() {
                        return fail("a workload is already running");
                    }
                    background = Some(workload::start(
                        w,
                        &self.dirs.workload(w),
                        &mnt.join(w),
                        &outputs.join(format!("{k}-{w}.txt")),
                        other_dir(w).as_deref(),
                    )?);
                }
                Step::Finish => {
                    let Some(r) = background.take() else { return fail("no workload was started") };
                    let golden = self.dirs.golden(&r.name);
                    let checked = r.wait(run_limit).map_err(Failure::from).and_then(|t| compare(&golden, &t, &what));
                    record(what, checked);
                }
                Step::ExpectBlocked { seconds } => {
                    sleep(*seconds)?;
                    let Some(r) = background.as_mut() else { return fail("no workload was started") };
                    if r.finished() {
                        return fail(format!(
                            "the workload returned within {seconds} s, while servers it needs were down"
                        ));
                    }
                }
                Step::Verify { workload: w } => {
                    record(what.clone(), self.verify(w, &mnt, &outputs.join(format!("{k}-verify-{w}.txt")), &what));
                    // While a server is down, again through a mount of its own: what the
                    // servers hold, not what the writing client remembers (see `mount_reader`).
                    // Not otherwise: its reads would repair copies a later step means to find
                    // corrupted (seed-quorum-table), and the end reads through a fresh mount.
                    if self.profile.mount.is_some() && c.some_down() {
                        let fresh = format!("{what} through a fresh mount");
                        let r = c.mount_reader().map_err(Failure::from).and_then(|mp| {
                            self.verify(w, &mp, &outputs.join(format!("{k}-verify-{w}-fresh.txt")), &fresh)
                        });
                        c.unmount_reader();
                        record(fresh, r);
                    }
                }
                Step::Kill { server } => c.kill(*server)?,
                Step::Restart { server } => c.restart(*server)?,
                Step::Wipe { server } => c.wipe(*server)?,
                Step::WaitRebuilt { server } => c.wait_rebuilt(*server, rebuild_limit)?,
                Step::Isolate { server } => {
                    c.kill((server + n - 1) % n)?;
                    c.kill((server + 1) % n)?;
                }
                Step::Corrupt { server, workload: w, file } => {
                    let Some(corrupt) = &c.profile.corrupt else { return fail("the profile has no corrupt command") };
                    let path = format!("/{w}/{file}");
                    // What the check says before: a file already found bad (corrupted on another
                    // server before) must be found bad differently after, or this corruption
                    // may not have happened.
                    let before = match &c.profile.check {
                        Some(check) => Some(c.tool(check, None, Some(&path))?),
                        None => None,
                    };
                    let (ok, text) = c.tool(corrupt, Some(*server), Some(&path))?;
                    if !ok {
                        return fail(format!("the corrupt command failed: {text}"));
                    }
                    // A corruption the check does not see would make every later check vacuous.
                    if let (Some(check), Some((_, before))) = (&c.profile.check, before) {
                        let (ok, text) = c.tool(check, None, Some(&path))?;
                        if ok {
                            return fail(format!(
                                "after the corrupt command, the check still passes {path}: {}",
                                text.trim()
                            ));
                        }
                        if text.trim() == before.trim() {
                            return fail(format!(
                                "the check says the same of {path} before and after the corrupt command on \
                                 server {server}: {}",
                                text.trim()
                            ));
                        }
                    }
                }
                Step::Heal { workload: w, file } => self.heal(c, &mnt, w, file)?,
                Step::Sleep { seconds } => sleep(*seconds)?,
                Step::KillOtherMount => c.kill_other_mount()?,
                Step::KillMeta { member } => {
                    for i in c.members(member, election_limit)? {
                        c.kill_meta(i)?;
                    }
                }
                Step::WipeMeta { member } => {
                    for i in c.members(member, election_limit)? {
                        c.wipe_meta(i)?;
                    }
                }
                Step::RestartMeta { member } => {
                    for i in c.members(member, election_limit)? {
                        c.restart_meta(i)?;
                    }
                }
                Step::CrashMeta { member } | Step::RestoreMeta { member } => {
                    let crash = matches!(step, Step::CrashMeta { .. });
                    for i in c.members(member, election_limit)? {
                        c.crash_meta(i, crash)?;
                    }
                }
            }
            unbidden_exits(c)?;
        }
        if let Some(r) = background.take() {
            let golden = self.dirs.golden(&r.name);
            let checked =
                r.wait(run_limit).map_err(Failure::from).and_then(|t| compare(&golden, &t, "the background workload"));
            record("the background workload".into(), checked);
        }
        *reached = s.steps.len();
        unbidden_exits(c)?;
        // The data at rest: every server back, every rebuild done, every replica of every file good.
        progress(format!("{}: checking every file at rest", s.name));
        c.revive_metas()?;
        for i in c.stopped() {
            c.restart(i)?;
        }
        for i in 0..c.n() {
            c.wait_rebuilt(i, rebuild_limit)?;
        }
        // Every workload the scenario ran, verified again through a mount started afresh: a
        // client that kept files only in its own memory (never on the servers, or not all of
        // them) passes every read through the mount that wrote them, and a file lost by a fault
        // after its workload ended is seen only here.
        let mut verified: Vec<&str> = Vec::new();
        for st in &s.steps {
            if let Step::Verify { workload } | Step::Run { workload } | Step::Start { workload } = st {
                if !verified.contains(&workload.as_str()) {
                    verified.push(workload);
                }
            }
        }
        if c.profile.mount.is_some() && !verified.is_empty() {
            progress(format!("{}: verifying through a fresh mount", s.name));
            c.unmount();
            c.mount()?;
            for w in verified {
                let what = format!("verify {w} through a fresh mount");
                let r = self.verify(w, &mnt, &outputs.join(format!("rest-verify-{w}.txt")), &what);
                checks.push(Check::of(what, r));
            }
        }
        let Some(check) = &c.profile.check else {
            let why = "the target profile has no check command (files were read back by the workloads only)";
            checks.push(Check::new("the data at rest", Verdict::NotApplicable, why, None));
            return Ok(());
        };
        // With a write quorum below the replica count, a server that was down catches up by the
        // others' hand-over after it is back, with no read involved: give that a bounded time.
        let hinted = self.quorum(s, replicas).is_some_and(|(w, _)| w < replicas);
        let converge = c.profile.limit(CONVERGE_LIMIT);
        let mut bad = Vec::new();
        let root = mnt.clone();
        let files = bounded("the mount, listed for the check at rest", self.profile.limit(LIST_LIMIT), move || {
            regular_files(&root)
        })?;
        for path in files {
            let start = Instant::now();
            loop {
                let (ok, text) = c.tool(check, None, Some(&path))?;
                if ok {
                    break;
                }
                if !hinted || start.elapsed() > converge {
                    bad.push(format!("{path}: {}", text.trim()));
                    break;
                }
                sleep(1)?;
            }
        }
        let r = if bad.is_empty() {
            Ok(())
        } else {
            let shown = bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n");
            fail(format!("{} file(s) fail the check at rest:\n{shown}", bad.len()))
        };
        checks.push(Check::of("the data at rest".into(), r));
        Ok(())
    }

    /// Runs the verify script in workload `w`'s directory under `mnt` and compares its output,
    /// kept in `out`, with the golden one.
    fn verify(&self, w: &str, mnt: &Path, out: &Path, what: &str) -> Result<(), Failure> {
        workload::run(
            "verify",
            &self.dirs.verify_script(),
            &mnt.join(w),
            out,
            self.profile.limit(self.opts.verify_limit),
        )
        .map_err(Failure::from)
        .and_then(|text| compare(&self.dirs.golden_verify(w), &text, what))
    }

    /// Reads a corrupted file until the target's check passes: every read must return the golden
    /// content, and one of them must have repaired the bad copy.
    fn heal(&self, c: &LabCluster, mnt: &Path, w: &str, file: &str) -> Result<(), Failure> {
        let golden = std::fs::read_to_string(self.dirs.golden_verify(w))?;
        let want = golden
            .lines()
            .find(|l| l.ends_with(&format!(" ./{file}")))
            .ok_or_else(|| anyhow::anyhow!("{file} has no sha256 in {}", self.dirs.golden_verify(w).display()))?
            .to_string();
        for _ in 0..HEAL_READS {
            let (dir, name) = (mnt.join(w), format!("./{file}"));
            let out = bounded(&format!("the mount, reading {w}/{file}"), self.profile.limit(LIST_LIMIT), move || {
                Ok(std::process::Command::new("sha256sum").arg(name).current_dir(dir).output()?)
            })?;
            let got = crate::normalize::normalize(&String::from_utf8_lossy(&out.stdout), "").trim().to_string();
            if got != want {
                let err = String::from_utf8_lossy(&out.stderr);
                return fail(format!("a read of {w}/{file} returned wrong data or failed: {got} {err}"));
            }
            let Some(check) = &c.profile.check else { return fail("the profile has no check command") };
            if c.tool(check, None, Some(&format!("/{w}/{file}")))?.0 {
                return Ok(());
            }
        }
        fail(format!("after {HEAL_READS} correct reads, {w}/{file} still fails the check (not repaired)"))
    }
}
