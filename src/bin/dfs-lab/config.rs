//! The lab's inputs: scenarios (`lab/scenarios.toml`), target profiles (`lab/targets/*.toml`) and
//! workloads (`lab/workloads/*.sh`), loaded and checked before anything starts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dfs::shared::layout::MAX_BLOCK_SIZE;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    Run {
        workload: String,
    },
    Start {
        workload: String,
    },
    Finish,
    ExpectBlocked {
        seconds: u64,
    },
    Verify {
        workload: String,
    },
    Kill {
        server: usize,
    },
    Restart {
        server: usize,
    },
    Wipe {
        server: usize,
    },
    WaitRebuilt {
        server: usize,
    },
    Isolate {
        server: usize,
    },
    Corrupt {
        server: usize,
        workload: String,
        file: String,
    },
    Heal {
        workload: String,
        file: String,
    },
    Sleep {
        seconds: u64,
    },
    KillMeta {
        member: Member,
    },
    WipeMeta {
        member: Member,
    },
    RestartMeta {
        member: Member,
    },
    CrashMeta {
        member: Member,
    },
    RestoreMeta {
        member: Member,
    },
    /// kill -9 the second mount's daemon (scenarios with `mounts = 2`).
    KillOtherMount,
}

/// A metaserver named by a step: by id, or by what it is when the step runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Member {
    Id(usize),
    /// "leader" (found with the profile's meta_isleader command), "follower" (the lowest-numbered
    /// running member that is not the leader), "stopped" (every member not running) or "crashed"
    /// (every member the lab crashed and has not restored).
    Role(String),
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Member::Id(i) => write!(f, "metaserver {i}"),
            Member::Role(r) if r == "stopped" || r == "crashed" => write!(f, "every {r} metaserver"),
            Member::Role(r) => write!(f, "the metaserver {r}"),
        }
    }
}

impl Step {
    /// The step as a reader would name it: "run links", "kill dataserver 1".
    pub fn describe(&self) -> String {
        match self {
            Step::Run { workload } => format!("run {workload}"),
            Step::Start { workload } => format!("start {workload} in the background"),
            Step::Finish => "wait for the background workload".into(),
            Step::ExpectBlocked { seconds } => format!("the background workload still blocked after {seconds} s"),
            Step::Verify { workload } => format!("verify {workload}"),
            Step::Kill { server } => format!("kill -9 dataserver {server}"),
            Step::Restart { server } => format!("restart dataserver {server}"),
            Step::Wipe { server } => format!("wipe dataserver {server}'s disk"),
            Step::WaitRebuilt { server } => format!("wait for dataserver {server}'s rebuild"),
            Step::Isolate { server } => format!("stop both neighbours of dataserver {server}"),
            Step::Corrupt { server, workload, file } => format!("corrupt {workload}/{file} on dataserver {server}"),
            Step::Heal { workload, file } => format!("read {workload}/{file} until repaired"),
            Step::Sleep { seconds } => format!("sleep {seconds} s"),
            Step::KillMeta { member } => format!("kill -9 {member}"),
            Step::WipeMeta { member } => format!("wipe {member}'s disk"),
            Step::RestartMeta { member } => format!("restart {member}"),
            Step::CrashMeta { member } => format!("crash {member} (testers' API)"),
            Step::RestoreMeta { member } => format!("restore {member} (testers' API)"),
            Step::KillOtherMount => "kill -9 the second mount's daemon".into(),
        }
    }

    /// Whether the step injects or depends on a fault of a server.
    pub fn is_fault(&self) -> bool {
        !matches!(self, Step::Run { .. } | Step::Start { .. } | Step::Finish | Step::Verify { .. } | Step::Sleep { .. })
    }

    /// Whether the step is a fault that a background workload started before it must still be
    /// running through (else the scenario did not test what it says it does). Not a recovery: a
    /// workload that ends before a server comes back went through the fault all the same.
    pub fn lands_during_the_workload(&self) -> bool {
        matches!(
            self,
            Step::Kill { .. }
                | Step::Wipe { .. }
                | Step::Isolate { .. }
                | Step::KillMeta { .. }
                | Step::WipeMeta { .. }
                | Step::CrashMeta { .. }
                | Step::KillOtherMount
        )
    }

    fn servers(&self) -> Option<usize> {
        match self {
            Step::Kill { server }
            | Step::Restart { server }
            | Step::Wipe { server }
            | Step::WaitRebuilt { server }
            | Step::Isolate { server }
            | Step::Corrupt { server, .. } => Some(*server),
            _ => None,
        }
    }

    /// The metaserver a step names, and the roles it may name it by.
    pub fn member(&self) -> Option<(&Member, &'static [&'static str])> {
        match self {
            Step::KillMeta { member } | Step::WipeMeta { member } | Step::CrashMeta { member } => {
                Some((member, &["leader", "follower"]))
            }
            Step::RestartMeta { member } => Some((member, &["stopped"])),
            Step::RestoreMeta { member } => Some((member, &["crashed"])),
            _ => None,
        }
    }

    fn workload(&self) -> Option<&str> {
        match self {
            Step::Run { workload }
            | Step::Start { workload }
            | Step::Verify { workload }
            | Step::Corrupt { workload, .. }
            | Step::Heal { workload, .. } => Some(workload),
            _ => None,
        }
    }
}

/// The longest `sleep` or `expect_blocked` a scenario may ask for, in seconds.
pub const MAX_PAUSE: u64 = 3600;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub servers: usize,
    pub block_size: Option<u32>,
    pub replicas: Option<u8>,
    /// Replicas a write waits for and a read compares (default: all, and one). Only for targets
    /// whose profile says `quorums = true`.
    pub write_quorum: Option<u8>,
    pub read_quorum: Option<u8>,
    #[serde(default)]
    pub quick: bool,
    /// Needs replicas > 1 to pass.
    #[serde(default)]
    pub redundancy: bool,
    /// The report's category; default "faults" if a step fails a server, else "workloads".
    pub category: Option<String>,
    /// A metaserver group of this many members (default: the profile's metaservers).
    pub metaservers: Option<usize>,
    /// Mounts of the cluster (1 or 2): with 2, workloads find their directory through the second
    /// mount in `$OTHER`.
    #[serde(default = "one_mount")]
    pub mounts: usize,
    pub steps: Vec<Step>,
}

fn one_mount() -> usize {
    1
}

#[derive(Deserialize)]
struct ScenarioFile {
    scenario: Vec<Scenario>,
}

/// How to run one of a target's commands: a line split into words (no shell), or a table saying
/// where and how. Placeholders are filled in `run`, `cwd` and every `env` value.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetCommand {
    Line(String),
    Full(FullCommand),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullCommand {
    pub run: String,
    /// Working directory (created if missing): for servers that keep their store in it.
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Run with `sh -c` (pipes, `&&`, redirections) instead of splitting into words.
    #[serde(default)]
    pub shell: bool,
}

impl TargetCommand {
    pub fn full(&self) -> FullCommand {
        match self {
            TargetCommand::Line(run) => {
                FullCommand { run: run.clone(), cwd: None, env: Default::default(), shell: false }
            }
            TargetCommand::Full(f) => f.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Run once, in order, before each cluster starts; each must succeed.
    #[serde(default)]
    pub setup: Vec<TargetCommand>,
    /// The servers and the mount. A profile with none of them is a local directory target: the
    /// "mount" is a plain directory (the ceiling every workload must reach; faults do not apply).
    pub metaserver: Option<TargetCommand>,
    pub dataserver: Option<TargetCommand>,
    pub mount: Option<TargetCommand>,
    /// The directory a "lost disk" deletes (wipe scenarios are not applicable without it).
    pub data_dir: Option<String>,
    /// Optional: without it, corruption scenarios are reported not applicable.
    pub corrupt: Option<TargetCommand>,
    /// Optional: without it, the check of every file at rest is reported as not run.
    pub check: Option<TargetCommand>,
    /// Optional (with `rebuilt`): without them, the lab waits for a restarted or wiped server by
    /// reading through the mount instead.
    pub status: Option<TargetCommand>,
    pub rebuilt: Option<String>,
    pub default_block_size: u32,
    pub default_replicas: u8,
    /// The metaserver commands take {write_quorum} and {read_quorum}; without it, scenarios that
    /// set quorums are not applicable.
    #[serde(default)]
    pub quorums: bool,
    /// Block sizes the target supports (empty: any); a scenario asking for another is not applicable.
    #[serde(default)]
    pub block_sizes: Vec<u32>,
    /// Replica counts the target supports (empty: any).
    #[serde(default)]
    pub replica_counts: Vec<u8>,
    /// Ring sizes the target supports, inclusive (default 3..=64).
    pub min_servers: Option<usize>,
    pub max_servers: Option<usize>,
    /// Multiplies every time limit of the lab (a slow but correct target needs more).
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Metaservers to start: more than one is a replicated group. The lab writes the group's config
    /// file ({meta_config}, in the assignment's format) and starts the metaserver command once per
    /// member with {index} the member's id; {meta} is the members' ports, comma-separated.
    #[serde(default = "one_server")]
    pub metaservers: usize,
    /// A group member's command (with {index} and {meta_config}), for scenarios that ask for a
    /// group when the profile's metaserver is a single one.
    pub group_metaserver: Option<TargetCommand>,
    /// A metaserver's data directory ({index}: the member), which wiping a member deletes.
    pub meta_data_dir: Option<String>,
    /// Prints true if member {index} leads its group (scenarios that name the leader need it).
    pub meta_isleader: Option<TargetCommand>,
    /// The testers' API: crash and restore member {index}.
    pub meta_crash: Option<TargetCommand>,
    pub meta_restore: Option<TargetCommand>,
}

fn one_server() -> usize {
    1
}

fn one() -> f64 {
    1.0
}

impl Profile {
    /// A plain local directory, no servers.
    pub fn is_local(&self) -> bool {
        self.metaserver.is_none() && self.dataserver.is_none() && self.mount.is_none()
    }

    /// Why a scenario of this shape cannot run on this target, if it cannot.
    pub fn unsupported(&self, servers: usize, block_size: u32, replicas: u8) -> Option<String> {
        if !self.block_sizes.is_empty() && !self.block_sizes.contains(&block_size) {
            return Some(format!("the target supports block sizes {:?}, not {block_size}", self.block_sizes));
        }
        if !self.replica_counts.is_empty() && !self.replica_counts.contains(&replicas) {
            return Some(format!("the target supports replica counts {:?}, not {replicas}", self.replica_counts));
        }
        let (lo, hi) = (self.min_servers.unwrap_or(3), self.max_servers.unwrap_or(64));
        if !(lo..=hi).contains(&servers) {
            return Some(format!("the target supports {lo} to {hi} dataservers, not {servers}"));
        }
        None
    }

    /// A time limit of the lab, scaled for this target (`time_scale` is checked when loaded).
    /// At most a year: a longer limit is none, and added to the clock it could overflow.
    pub fn limit(&self, base: std::time::Duration) -> std::time::Duration {
        const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
        std::time::Duration::try_from_secs_f64(base.as_secs_f64() * self.time_scale).map_or(YEAR, |d| d.min(YEAR))
    }
}

/// Where the lab's files are.
pub struct LabDirs {
    pub lab: PathBuf,
    pub golden: PathBuf,
}

impl LabDirs {
    pub fn workload(&self, name: &str) -> PathBuf {
        self.lab.join("workloads").join(format!("{name}.sh"))
    }

    pub fn verify_script(&self) -> PathBuf {
        self.lab.join("workloads").join("verify.sh")
    }

    pub fn golden(&self, name: &str) -> PathBuf {
        self.golden.join(format!("{name}.out"))
    }

    pub fn golden_verify(&self, name: &str) -> PathBuf {
        self.golden.join(format!("{name}.verify.out"))
    }

    /// Every workload, by name (verify.sh is not one).
    pub fn workloads(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.lab.join("workloads");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "sh") {
                let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                if name != "verify" {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn scenarios(&self) -> anyhow::Result<Vec<Scenario>> {
        let path = self.lab.join("scenarios.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: ScenarioFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let workloads: BTreeSet<String> = self.workloads()?.into_iter().collect();
        let mut names = BTreeSet::new();
        for s in &file.scenario {
            if !names.insert(s.name.clone()) {
                bail!("{}: scenario {} is defined twice", path.display(), s.name);
            }
            // The name becomes a directory of the results and a temp dir's prefix.
            let named = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if s.name.is_empty() || s.name.len() > 100 || !s.name.chars().all(named) || s.name.starts_with('.') {
                bail!(
                    "{}: scenario name {:?} is not 1 to 100 letters, digits, '-', '_' or '.' (not first)",
                    path.display(),
                    s.name
                );
            }
            if !(3..=64).contains(&s.servers) {
                bail!("scenario {}: servers must be 3..=64", s.name);
            }
            let members = s.metaservers.unwrap_or(1);
            if !(1..=9).contains(&members) {
                bail!("scenario {}: metaservers must be 1..=9", s.name);
            }
            if !(1..=2).contains(&s.mounts) {
                bail!("scenario {}: mounts must be 1 or 2", s.name);
            }
            if let Some(b) = s.block_size.filter(|b| !(1..=MAX_BLOCK_SIZE).contains(b)) {
                bail!("scenario {}: block_size must be 1 to {MAX_BLOCK_SIZE} bytes, not {b}", s.name);
            }
            if let Some(r) = s.replicas.filter(|&r| r == 0 || r as usize > s.servers) {
                bail!("scenario {}: replicas must be 1 to its {} servers, not {r}", s.name, s.servers);
            }
            let most = s.replicas.map_or(s.servers, usize::from);
            for (what, q) in [("write_quorum", s.write_quorum), ("read_quorum", s.read_quorum)] {
                if let Some(q) = q.filter(|&q| q == 0 || q as usize > most) {
                    bail!("scenario {}: {what} must be 1 to its replicas, not {q}", s.name);
                }
            }
            for step in &s.steps {
                if let Step::Sleep { seconds } | Step::ExpectBlocked { seconds } = step {
                    if *seconds > MAX_PAUSE {
                        bail!("scenario {}: a pause of {seconds} s is more than the {MAX_PAUSE} s allowed", s.name);
                    }
                }
                if matches!(step, Step::KillOtherMount) && s.mounts < 2 {
                    bail!("scenario {}: kill_other_mount needs mounts = 2", s.name);
                }
                if let Some(i) = step.servers().filter(|&i| i >= s.servers) {
                    bail!("scenario {}: server {i} is outside its ring of {}", s.name, s.servers);
                }
                match step.member() {
                    Some((Member::Id(i), _)) if *i >= members && s.metaservers.is_some() => {
                        bail!("scenario {}: metaserver {i} is outside its group of {members}", s.name)
                    }
                    Some((Member::Role(r), roles)) if !roles.contains(&r.as_str()) => {
                        bail!(
                            "scenario {}: step \"{}\" names a metaserver {r:?}; it takes an id or one of {roles:?}",
                            s.name,
                            step.describe()
                        )
                    }
                    _ => {}
                }
                if let Some(w) = step.workload().filter(|w| !workloads.contains(*w)) {
                    bail!("scenario {}: no workload {w} in {}", s.name, self.lab.join("workloads").display());
                }
            }
        }
        Ok(file.scenario)
    }

    /// A profile by name (lab/targets/NAME.toml) or path.
    pub fn profile(&self, target: &str) -> anyhow::Result<Profile> {
        let path = if target.ends_with(".toml") || target.contains('/') {
            PathBuf::from(target)
        } else {
            self.lab.join("targets").join(format!("{target}.toml"))
        };
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("reading target profile {}", path.display()))?;
        let p: Profile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if !(1..=9).contains(&p.metaservers) {
            bail!("{}: metaservers is 1 to 9, not {}", path.display(), p.metaservers);
        }
        if !(p.time_scale.is_finite() && (0.1..=1000.0).contains(&p.time_scale)) {
            bail!("{}: time_scale is 0.1 to 1000, not {}", path.display(), p.time_scale);
        }
        if p.default_replicas == 0 || !(1..=MAX_BLOCK_SIZE).contains(&p.default_block_size) {
            bail!(
                "{}: default_replicas must be at least 1 and default_block_size 1 to {MAX_BLOCK_SIZE} bytes",
                path.display()
            );
        }
        if p.min_servers.unwrap_or(3) > p.max_servers.unwrap_or(64) {
            bail!("{}: min_servers is more than max_servers", path.display());
        }
        let given = [p.metaserver.is_some(), p.dataserver.is_some(), p.mount.is_some()];
        if given.iter().any(|&g| g) && !given.iter().all(|&g| g) {
            bail!(
                "{}: give metaserver, dataserver and mount (a cluster), or none of them (a local directory)",
                path.display()
            );
        }
        Ok(p)
    }
}

/// The lab directory: `--lab-dir`, else $DFS_LAB_DIR, else ./lab, else the source tree's.
pub fn find_lab(arg: Option<&Path>) -> LabDirs {
    let lab = arg
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("DFS_LAB_DIR").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from("lab")).filter(|p| p.join("scenarios.toml").exists()))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/lab")));
    // Workloads run with the mount as working directory: paths must not be relative.
    let lab = std::fs::canonicalize(&lab).unwrap_or(lab);
    let golden = lab.parent().unwrap_or(Path::new(".")).join("golden");
    LabDirs { lab, golden }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lab dir with one workload and `scenarios` as its scenarios.toml.
    fn lab_with(scenarios: &str) -> (tempfile::TempDir, LabDirs) {
        let dir = tempfile::tempdir().expect("temp dir");
        let lab = dir.path().join("lab");
        std::fs::create_dir_all(lab.join("workloads")).expect("mkdir");
        std::fs::write(lab.join("workloads/w.sh"), "echo hi\n").expect("workload");
        std::fs::write(lab.join("scenarios.toml"), scenarios).expect("scenarios");
        let dirs = LabDirs { lab, golden: dir.path().join("golden") };
        (dir, dirs)
    }

    fn scenario_error(shape: &str, steps: &str) -> String {
        let text = format!("[[scenario]]\nname = \"s\"\nservers = 4\n{shape}\nsteps = [{steps}]\n");
        let (_dir, dirs) = lab_with(&text);
        format!("{:#}", dirs.scenarios().expect_err(&text))
    }

    /// Shapes no cluster can have, and pauses past any time limit, are refused when the scenarios
    /// are read (a pause of u64::MAX seconds overflowed the clock and panicked the run).
    #[test]
    fn scenarios_with_impossible_shapes_or_pauses_are_refused_with_a_reason() {
        let run = r#"{ action = "run", workload = "w" }"#;
        assert!(scenario_error("block_size = 0", run).contains("block_size must be"));
        assert!(scenario_error("replicas = 0", run).contains("replicas must be"));
        assert!(scenario_error("replicas = 5", run).contains("replicas must be"));
        assert!(scenario_error("replicas = 3\nwrite_quorum = 4", run).contains("write_quorum must be"));
        assert!(scenario_error("read_quorum = 0", run).contains("read_quorum must be"));
        let pause = r#"{ action = "sleep", seconds = 18446744073709551615 }"#;
        assert!(scenario_error("", pause).contains("more than the 3600 s allowed"));
        let blocked = r#"{ action = "expect_blocked", seconds = 9223372036854775807 }"#;
        assert!(scenario_error("", blocked).contains("more than the 3600 s allowed"));
        let (_dir, dirs) =
            lab_with(&format!("[[scenario]]\nname = \"s\"\nservers = 4\nreplicas = 3\nsteps = [{run}]\n"));
        assert_eq!(dirs.scenarios().expect("a sound scenario").len(), 1);
    }

    /// A profile whose time scale is not a number, or whose defaults no cluster can have, is
    /// refused when read (a NaN scale panicked the first time limit).
    #[test]
    fn profiles_with_impossible_settings_are_refused_with_a_reason() {
        let (dir, dirs) = lab_with("");
        let base = "name = \"p\"\ndefault_block_size = 4096\n";
        let error = |extra: &str| {
            let path = dir.path().join("p.toml");
            std::fs::write(&path, format!("{base}{extra}\n")).expect("profile");
            dirs.profile(path.to_str().expect("utf8")).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(error("default_replicas = 1\ntime_scale = nan").expect_err("nan").contains("time_scale"));
        assert!(error("default_replicas = 1\ntime_scale = -1.0").expect_err("negative").contains("time_scale"));
        assert!(error("default_replicas = 0").expect_err("no replicas").contains("default_replicas"));
        let crossed = error("default_replicas = 1\nmin_servers = 8\nmax_servers = 4").expect_err("crossed");
        assert!(crossed.contains("min_servers"), "{crossed}");
        error("default_replicas = 1\ntime_scale = 2.0").expect("a sound profile");
        // The longest limit at the largest scale is bounded, not a panic.
        std::fs::write(dir.path().join("p.toml"), format!("{base}default_replicas = 1\ntime_scale = 1000.0\n"))
            .expect("p");
        let slow = dirs.profile(dir.path().join("p.toml").to_str().expect("utf8")).expect("a sound profile");
        let year = std::time::Duration::from_secs(365 * 86_400);
        assert_eq!(slow.limit(std::time::Duration::MAX), year);
        assert_eq!(slow.limit(std::time::Duration::from_secs(3)), std::time::Duration::from_secs(3000));
    }

    /// A scenario's name becomes a directory: a path is refused (".." put a failing scenario's
    /// logs beside the results).
    #[test]
    fn scenario_names_that_are_paths_are_refused() {
        let run = r#"{ action = "run", workload = "w" }"#;
        for name in ["..", "a/b", "", ".hidden", "x y"] {
            let text = format!("[[scenario]]\nname = {name:?}\nservers = 4\nsteps = [{run}]\n");
            let (_dir, dirs) = lab_with(&text);
            let why = format!("{:#}", dirs.scenarios().expect_err(name));
            assert!(why.contains("is not 1 to 100 letters"), "{name}: {why}");
        }
        let (_dir, dirs) =
            lab_with(&format!("[[scenario]]\nname = \"quorum-table_2.b\"\nservers = 4\nsteps = [{run}]\n"));
        assert_eq!(dirs.scenarios().expect("a sound name").len(), 1);
    }
}
