//! `dfs-lab`: starts clusters, runs shell workloads in the mount, injects faults, and diffs what it
//! sees against golden outputs recorded on a local filesystem. Exits non-zero on any failure.

mod bench;
mod chaos;
mod cluster;
mod config;
mod failover;
mod netcut;
mod normalize;
mod plot;
// Shared with the tests (tests/common), which use parts the lab does not.
#[allow(dead_code)]
mod procs;
mod runner;
mod workload;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{find_lab, LabDirs, Scenario};
use crate::procs::INTERRUPTED;
use crate::runner::{Options, Outcome, Runner, Verdict};

/// The DFS lab. With no command, runs the full acceptance suite against fresh clusters.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Run the quick subset (the scenarios marked quick = true; about 15 s once built; what CI runs).
    #[arg(long, global = true)]
    quick: bool,
    /// Override every scenario's replica count (e.g. 1, to see the fault scenarios fail).
    #[arg(long, global = true, value_parser = clap::value_parser!(u8).range(1..=64))]
    replicas: Option<u8>,
    /// Override every scenario's block size in bytes.
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    block_size: Option<u32>,
    /// Keep a failed scenario's or chaos run's directories (data, logs, mount point) for inspection.
    #[arg(long, global = true)]
    keep: bool,
    /// Where report.json, junit.xml and failed scenarios' diffs and logs go.
    #[arg(long, global = true, default_value = "lab-results")]
    results: PathBuf,
    /// Target profile (the implementation under test): a name in lab/targets/ or a path to a .toml file.
    #[arg(long, global = true, default_value = "dfs")]
    profile: String,
    /// The lab directory (workloads, scenarios, targets); golden/ is its sibling.
    #[arg(long, global = true)]
    lab_dir: Option<PathBuf>,
    /// How long one verification pass (reading every file of a workload) may take, in seconds.
    #[arg(long, global = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    verify_timeout: u64,
    /// Where the target's binaries are ({bin} in profiles); default: beside dfs-lab.
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the scenarios (quick ones marked).
    List,
    /// Runs the named scenarios.
    Run {
        #[arg(required = true)]
        scenarios: Vec<String>,
    },
    /// Records each workload's output on a local filesystem and compares it with golden/ (or, with
    /// --update, writes it there).
    Golden {
        #[arg(long)]
        update: bool,
    },
    /// The mount benchmark: sequential and random I/O, small files, tree walks; a table of medians.
    Bench {
        /// Benchmark this directory instead of a fresh DFS mount (a local one gives the ceiling).
        #[arg(long, value_name = "DIR")]
        target: Option<PathBuf>,
        /// Benchmark a fresh DFS cluster for each run and this directory (e.g. another
        /// filesystem's mount) in alternate runs, and print both medians and their ratio.
        #[arg(long, value_name = "DIR", conflicts_with = "target")]
        compare: Option<PathBuf>,
        /// With --compare: a shell command run before each of the compared filesystem's runs,
        /// which starts it and returns once DIR is its mount, ready.
        #[arg(long, value_name = "CMD", requires = "compare", requires = "peer_stop")]
        peer_start: Option<String>,
        /// With --compare: a shell command run after each of the compared filesystem's runs,
        /// which stops every process of it, so that none takes CPU from DFS's runs (DFS's own
        /// cluster runs only during its runs).
        #[arg(long, value_name = "CMD", requires = "compare", requires = "peer_start")]
        peer_stop: Option<String>,
        /// Runs per figure (the table shows medians).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// Instead: small-file creates, stats and deletes with one metaserver and with a group of
        /// three, side by side (one worker and eight).
        #[arg(long, conflicts_with = "target")]
        metadata: bool,
        /// Instead: writes and cold reads with one dataserver's bandwidth capped, at write quorum 3
        /// and 2 side by side (R = 3).
        #[arg(long, conflicts_with_all = ["target", "metadata"])]
        quorum: bool,
        /// Instead: writes and cold reads with every scrubber running at its default rate against
        /// scrubbers off.
        #[arg(long, conflicts_with_all = ["target", "metadata", "quorum"])]
        scrub: bool,
        /// Instead: aggregate write and cold read throughput with every dataserver's bandwidth
        /// capped, for N = 4, 6 and 8, against the ideal (N x cap / R for writes, N x cap for
        /// reads).
        #[arg(long, conflicts_with_all = ["target", "compare", "metadata", "quorum", "scrub"])]
        striping: bool,
        /// Also draw the medians (beside the compared directory's, with --compare; beside the
        /// ideal, with --striping) as bars in this SVG file.
        #[arg(long, value_name = "FILE.svg", conflicts_with_all = ["metadata", "quorum", "scrub"])]
        plot: Option<PathBuf>,
    },
    /// Randomized file operations checked against a model while servers are killed, stopped,
    /// wiped and corrupted within the fault budget; PASS or FAIL, and the re-run command.
    Chaos {
        /// How long the workload and the faults run.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: u64,
        /// Seeds the operations and the faults.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only these kinds of fault (comma-separated; default: all the target supports).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<chaos::Kind>,
    },
    /// Copies bytes of a file, read through a mapping, to stdout (the chaos workload's mmap reads
    /// run in this helper process).
    #[command(hide = true)]
    MmapRead {
        path: PathBuf,
        offset: u64,
        #[arg(value_parser = clap::value_parser!(u64).range(..=1 << 30))]
        len: u64,
    },
    /// A metaserver group's failover time: the leader killed again and again under a client
    /// creating files; the time from each kill to the next completed create, and the median.
    Failover {
        /// How many times the leader is killed.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
        kills: u64,
    },
}

/// Blocks SIGINT/SIGTERM and turns them into the INTERRUPTED flag: every wait gives up, and the
/// current scenario cleans up (processes, mount, temp dirs) before the lab exits.
fn handle_signals() -> anyhow::Result<()> {
    let set = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
    set.thread_block()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(sig) = set.wait() {
            eprintln!("\ndfs-lab: {sig:?}: cleaning up");
            INTERRUPTED.store(true, Ordering::Relaxed);
        }
    })?;
    Ok(())
}

/// When started by `cargo run`, builds the sibling binaries too (cargo builds only the one it runs).
fn ensure_binaries(bin: &Path) -> anyhow::Result<()> {
    if let (Some(cargo), Ok(manifest)) = (std::env::var_os("CARGO"), std::env::var("CARGO_MANIFEST_DIR")) {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--bins", "--quiet", "--manifest-path"]).arg(Path::new(&manifest).join("Cargo.toml"));
        if bin.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().context("building the binaries")?;
        if !st.success() {
            bail!("cargo build --bins failed");
        }
    }
    Ok(())
}

/// The directory of the target's binaries ({bin}): `--bin-dir`, else the one dfs-lab runs from,
/// whose sibling binaries are built first when they are ours and `needed`.
fn binaries(profile: &config::Profile, bin_dir: Option<PathBuf>, needed: bool) -> anyhow::Result<PathBuf> {
    if let Some(b) = bin_dir {
        return Ok(b);
    }
    let bin = std::env::current_exe()?.parent().ok_or_else(|| anyhow!("no binary directory"))?.to_path_buf();
    if needed && profile.name == "dfs" {
        ensure_binaries(&bin)?;
    }
    Ok(bin)
}

fn golden(dirs: &LabDirs, update: bool) -> anyhow::Result<bool> {
    let tmp = tempfile::tempdir()?;
    let mut ok = true;
    for w in dirs.workloads()? {
        let dir = tmp.path().join(&w);
        let out = workload::run(
            &w,
            &dirs.workload(&w),
            &dir,
            &tmp.path().join(format!("{w}.out")),
            Duration::from_secs(600),
        )?;
        let ver = workload::run(
            "verify",
            &dirs.verify_script(),
            &dir,
            &tmp.path().join(format!("{w}.verify")),
            Duration::from_secs(600),
        )?;
        for (path, text) in [(dirs.golden(&w), out), (dirs.golden_verify(&w), ver)] {
            if update {
                std::fs::create_dir_all(&dirs.golden)?;
                std::fs::write(&path, &text)?;
                dfs::outln!("recorded {}", path.display());
                continue;
            }
            let old = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(d) = workload::diff(&path.display().to_string(), &old, "a fresh local run", &text) {
                ok = false;
                dfs::outln!("STALE {}\n{d}", path.display());
            }
        }
    }
    if !update && ok {
        dfs::outln!("golden outputs match a fresh local run of every workload");
    }
    Ok(ok)
}

/// Lines of a diff shown on the console; the whole diff is in the results.
const DIFF_LINES: usize = 40;

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
        Verdict::NotApplicable => "N/A",
        Verdict::NotRun => "NOT RUN",
    }
}

fn report(outcomes: &[Outcome], results: &Path, target: &str, seconds: f64) -> anyhow::Result<()> {
    std::fs::create_dir_all(results)?;
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    let json = serde_json::json!({
        "target": target,
        "passed": count(Verdict::Pass),
        "failed": count(Verdict::Fail),
        "not_applicable": count(Verdict::NotApplicable),
        "seconds": seconds,
        "scenarios": outcomes,
    });
    std::fs::write(results.join("report.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(results.join("report.md"), report_md(outcomes, results, target, seconds))?;
    let mut suite = quick_junit::TestSuite::new(format!("dfs-lab ({target})"));
    for o in outcomes {
        let status = match o.verdict {
            Verdict::Pass => quick_junit::TestCaseStatus::success(),
            Verdict::NotApplicable | Verdict::NotRun => {
                let mut s = quick_junit::TestCaseStatus::skipped();
                s.set_message(o.failure.clone().unwrap_or_default());
                s
            }
            Verdict::Fail => {
                let mut s = quick_junit::TestCaseStatus::non_success(quick_junit::NonSuccessKind::Failure);
                s.set_message(o.failure.clone().unwrap_or_default());
                let diffs: Vec<&str> = o.checks.iter().filter_map(|c| c.diff.as_deref()).collect();
                if !diffs.is_empty() {
                    s.set_description(diffs.join("\n"));
                }
                s
            }
        };
        let mut case = quick_junit::TestCase::new(o.name.clone(), status);
        case.set_time(Duration::from_secs_f64(o.seconds));
        suite.add_test_case(case);
    }
    let mut rep = quick_junit::Report::new("dfs-lab");
    rep.add_test_suite(suite);
    std::fs::write(results.join("junit.xml"), rep.to_string()?)?;
    Ok(())
}

/// The grading report for people: a summary by category, then each scenario's checks with a
/// one-line reason, where the full diffs and logs are, and how to re-run it.
fn report_md(outcomes: &[Outcome], results: &Path, target: &str, seconds: f64) -> String {
    use std::fmt::Write as _;
    let mut md =
        format!("# dfs-lab report: target `{target}`\n\n{} scenario(s) in {seconds:.0} s.\n\n", outcomes.len());
    md += "| category | passed | failed | not applicable |\n| --- | ---: | ---: | ---: |\n";
    let mut cats: Vec<&str> = outcomes.iter().map(|o| o.category.as_str()).collect();
    cats.dedup();
    cats.sort();
    cats.dedup();
    for cat in cats {
        let n = |v: Verdict| outcomes.iter().filter(|o| o.category == cat && o.verdict == v).count();
        let _ = writeln!(md, "| {cat} | {} | {} | {} |", n(Verdict::Pass), n(Verdict::Fail), n(Verdict::NotApplicable));
    }
    for o in outcomes {
        let _ = write!(
            md,
            "\n## {} {}\n\n{} (N={}, block size {}, R={}; {:.1} s)\n\n",
            verdict_word(o.verdict),
            o.name,
            o.description,
            o.servers,
            o.block_size,
            o.replicas,
            o.seconds
        );
        if o.verdict == Verdict::NotApplicable {
            let _ = writeln!(md, "{}", o.failure.as_deref().unwrap_or(""));
            continue;
        }
        for c in &o.checks {
            let reason = c.reason.lines().next().unwrap_or("");
            let _ = write!(md, "- {} {}", verdict_word(c.verdict), c.name);
            if !reason.is_empty() {
                let _ = write!(md, ": {reason}");
            }
            if let Some(f) = &c.diff_file {
                let rel = f.strip_prefix(results).unwrap_or(f);
                let _ = write!(md, " ([diff]({}))", rel.display());
            }
            md += "\n";
        }
        if !o.logs.is_empty() {
            let names: Vec<String> =
                o.logs.iter().map(|l| l.strip_prefix(results).unwrap_or(l).display().to_string()).collect();
            let _ = writeln!(md, "\nLogs: {}", names.join(", "));
        }
        let _ = writeln!(md, "\nRe-run: `{}`", o.rerun);
    }
    md
}

fn print_outcome(o: &Outcome) {
    let shape = format!("N={} bs={} R={}", o.servers, o.block_size, o.replicas);
    dfs::outln!("{:<5} {:<26} {:>7.1} s  {shape}", verdict_word(o.verdict), o.name, o.seconds);
    if o.verdict == Verdict::NotApplicable {
        dfs::outln!("      {}", o.failure.as_deref().unwrap_or(""));
        return;
    }
    if o.passed {
        return;
    }
    for c in o.checks.iter().filter(|c| c.verdict != Verdict::Pass) {
        let mut lines = c.reason.lines();
        dfs::outln!("      {} {}: {}", verdict_word(c.verdict), c.name, lines.next().unwrap_or(""));
        for l in lines {
            dfs::outln!("        {l}");
        }
        if let Some(d) = &c.diff {
            let all: Vec<&str> = d.lines().collect();
            for l in all.iter().take(DIFF_LINES) {
                dfs::outln!("        {l}");
            }
            if all.len() > DIFF_LINES {
                let whole = c.diff_file.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
                dfs::outln!("        ... {} more lines: {whole}", all.len() - DIFF_LINES);
            }
        }
    }
    for log in &o.logs {
        dfs::outln!("      log: {}", log.display());
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(8)..] {
            dfs::outln!("        | {l}");
        }
    }
    if let Some(k) = &o.kept {
        dfs::outln!("      kept: {}", k.display());
    }
    dfs::outln!("      re-run: {}", o.rerun);
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The report is written after the run: `dfs-lab | head` must not lose it.
    dfs::cli::keep_going_without_stdout();
    let dirs = find_lab(args.lab_dir.as_deref());
    let scenarios = dirs.scenarios()?;
    let chosen: Vec<Scenario> = match &args.cmd {
        Some(Cmd::List) => {
            for s in &scenarios {
                let quick = if s.quick { "quick" } else { "" };
                let redundancy = if s.redundancy { "needs R>1" } else { "" };
                dfs::outln!("{:<26} {quick:<5} {redundancy:<9} N={:<2} {}", s.name, s.servers, s.description);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Golden { update }) => {
            return Ok(if golden(&dirs, *update)? { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Some(Cmd::Bench { target, compare, peer_start, peer_stop, runs, metadata, quorum, scrub, striping, plot }) => {
            let profile = dirs.profile(&args.profile)?;
            // Benchmarking a plain directory starts no servers.
            let bin = binaries(&profile, args.bin_dir.clone(), target.is_none())?;
            handle_signals()?;
            if *metadata {
                bench::bench_metadata(&profile, &bin, *runs as usize, args.block_size)?;
                return Ok(ExitCode::SUCCESS);
            }
            if *quorum {
                bench::bench_quorum(&profile, &bin, *runs as usize, args.block_size)?;
                return Ok(ExitCode::SUCCESS);
            }
            if *scrub {
                bench::bench_scrub(&profile, &bin, *runs as usize, args.block_size)?;
                return Ok(ExitCode::SUCCESS);
            }
            if *striping {
                bench::bench_striping(&profile, &bin, *runs as usize, args.block_size, plot.as_deref())?;
                return Ok(ExitCode::SUCCESS);
            }
            let dirs = (target.clone(), compare.clone());
            let peer = bench::PeerCommands { start: peer_start.clone(), stop: peer_stop.clone() };
            bench::bench(&profile, &bin, dirs, &peer, *runs as usize, args.block_size, plot.as_deref())?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Chaos { seconds, seed, faults }) => {
            let profile = dirs.profile(&args.profile)?;
            let bin = binaries(&profile, args.bin_dir.clone(), true)?;
            handle_signals()?;
            let passed = chaos::chaos(&profile, &bin, *seconds, *seed, faults, args.keep)?;
            return Ok(if passed { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Some(Cmd::Failover { kills }) => {
            let profile = dirs.profile(&args.profile)?;
            let bin = binaries(&profile, args.bin_dir.clone(), true)?;
            handle_signals()?;
            failover::failover(&bin, *kills as usize)?;
            return Ok(ExitCode::SUCCESS);
        }
        // Served by `main` before any of the lab's setup.
        Some(Cmd::MmapRead { .. }) => bail!("mmap-read runs on its own"),
        Some(Cmd::Run { scenarios: names }) => names
            .iter()
            .map(|n| {
                scenarios
                    .iter()
                    .find(|s| &s.name == n)
                    .cloned()
                    .ok_or_else(|| anyhow!("no scenario named {n} (see `dfs-lab list`)"))
            })
            .collect::<anyhow::Result<_>>()?,
        None => scenarios.into_iter().filter(|s| s.quick || !args.quick).collect(),
    };
    if !nix::unistd::geteuid().is_root()
        && !Path::new("/usr/bin/fusermount3").exists()
        && !Path::new("/bin/fusermount3").exists()
    {
        bail!("mounting needs root or fusermount3");
    }
    let profile = dirs.profile(&args.profile)?;
    let bin = binaries(&profile, args.bin_dir.clone(), true)?;
    handle_signals()?;
    let opts = Options {
        replicas: args.replicas,
        block_size: args.block_size,
        keep: args.keep,
        results: args.results.clone(),
        bin,
        verify_limit: Duration::from_secs(args.verify_timeout),
        profile_arg: args.profile.clone(),
    };
    let runner = Runner { dirs: &dirs, profile: &profile, opts: &opts };
    // On a terminal, one spinner line cut to the terminal's width; elsewhere (CI logs, pipes),
    // one line per step on stderr.
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    dfs::outln!(
        "dfs-lab: {} scenario(s) against target {}: {} ({})",
        chosen.len(),
        profile.name,
        profile.description,
        opts.bin.display()
    );
    let start = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for (i, s) in chosen.iter().enumerate() {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        let total = chosen.len();
        let o = runner.run(s, &|m| {
            let line = format!("[{}/{total}] {m}", i + 1);
            if terminal {
                bar.set_message(line);
            } else {
                eprintln!("[{:>4.0} s] {line}", start.elapsed().as_secs_f64());
            }
        });
        bar.suspend(|| print_outcome(&o));
        outcomes.push(o);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    report(&outcomes, &opts.results, &profile.name, secs)?;
    let failed = outcomes.iter().filter(|o| o.verdict == Verdict::Fail).count();
    let na = outcomes.iter().filter(|o| o.verdict == Verdict::NotApplicable).count();
    dfs::outln!(
        "\n{} passed, {failed} failed, {na} not applicable, {:.0} s; report: {r}/report.md ({r}/report.json, {r}/junit.xml)",
        outcomes.len() - failed - na,
        secs,
        r = opts.results.display(),
    );
    if INTERRUPTED.load(Ordering::Relaxed) {
        dfs::outln!("interrupted");
        return Ok(ExitCode::from(130));
    }
    // A run in which nothing applied tested nothing (a typo in a profile, say): not a success.
    let passed = outcomes.len() - failed - na;
    if passed == 0 && failed == 0 && !outcomes.is_empty() {
        dfs::outln!("no scenario applied to the target: nothing was tested");
        return Ok(ExitCode::from(1));
    }
    Ok(if failed == 0 && outcomes.len() == chosen.len() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Gives every process the lab starts (servers, mounts, tools: they inherit the environment) and
/// the lab's own connections one fresh cluster secret, as a cluster run for real would have;
/// unless `DFS_SECRET_FILE` names one already. Called while the lab is one thread. The file lives
/// in the returned directory, removed when it drops.
fn lab_secret() -> anyhow::Result<Option<tempfile::TempDir>> {
    use rand::RngCore;
    if std::env::var_os(dfs::wire::auth::SECRET_ENV).is_some_and(|v| !v.is_empty()) {
        return Ok(None);
    }
    let dir = tempfile::Builder::new().prefix("dfs-lab-secret-").tempdir()?;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.path().join("secret");
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    std::io::Write::write_all(&mut f, hex.as_bytes())?;
    std::env::set_var(dfs::wire::auth::SECRET_ENV, &path);
    Ok(Some(dir))
}

fn main() -> ExitCode {
    if let Some(code) = dfs::cli::generated_docs::<Args>("dfs-lab") {
        return code;
    }
    let args = Args::parse();
    dfs::cli::init_tracing_quiet();
    if let Some(Cmd::MmapRead { path, offset, len }) = &args.cmd {
        return chaos::mmap_read(path, *offset, *len as usize).unwrap_or_else(|e| {
            eprintln!("dfs-lab mmap-read: {e:#}");
            ExitCode::from(2)
        });
    }
    let _secret = match lab_secret() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("dfs-lab: writing the cluster secret: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dfs-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}
