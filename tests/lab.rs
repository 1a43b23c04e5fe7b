//! The lab itself: its goldens are fresh, and it can fail — with one replica the fault
//! scenarios fail, and a workload whose output differs from golden fails with a readable diff.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn lab() -> Command {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_dfs-lab"));
    // Bounded from outside too; on SIGTERM the lab cleans up its clusters and mounts.
    let mut c = common::bounded(900, &exe);
    // The binaries beside dfs-lab are the ones cargo built for these tests.
    c.arg("--bin-dir").arg(exe.parent().expect("bin dir"));
    c
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Runs the lab on this repository's lab dir with `args`, results in `results`: (exit code, stdout).
fn run_lab(args: &[&std::ffi::OsStr], results: &Path) -> (Option<i32>, String) {
    run_lab_in(&repo("lab"), args, results)
}

/// [`run_lab`] on the lab dir `lab_dir`.
fn run_lab_in(lab_dir: &Path, args: &[&std::ffi::OsStr], results: &Path) -> (Option<i32>, String) {
    let out =
        lab().arg("--lab-dir").arg(lab_dir).arg("--results").arg(results).args(args).output().expect("run dfs-lab");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
}

fn report_json(results: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(results.join("report.json")).expect("report.json")).expect("json")
}

fn os<'a>(args: &[&'a str]) -> Vec<&'a std::ffi::OsStr> {
    args.iter().map(|a| std::ffi::OsStr::new(*a)).collect()
}

#[test]
fn committed_golden_outputs_match_a_fresh_local_run() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the permissions workload chowns files, which needs root");
        return;
    }
    let out = lab().args(["golden", "--lab-dir"]).arg(repo("lab")).output().expect("run dfs-lab golden");
    assert!(
        out.status.success(),
        "golden/ is stale; run `dfs-lab golden --update`:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn with_one_replica_exactly_the_redundancy_scenarios_fail() {
    if !common::fuse_available("lab with one replica") {
        return;
    }
    let results = tempfile::tempdir().expect("tmp");
    let (code, stdout) = run_lab(&os(&["--quick", "--replicas", "1", "--verify-timeout", "5"]), results.path());
    assert_eq!(code, Some(1), "the lab must exit 1:\n{stdout}");
    let report = report_json(results.path());
    let scenarios = std::fs::read_to_string(repo("lab/scenarios.toml")).expect("scenarios");
    let table: toml::Table = toml::from_str(&scenarios).expect("toml");
    let needs_redundancy =
        |name: &str| {
            table["scenario"].as_array().expect("list").iter().any(|s| {
                s["name"].as_str() == Some(name) && s.get("redundancy").and_then(|r| r.as_bool()) == Some(true)
            })
        };
    let mut failed = 0;
    for s in report["scenarios"].as_array().expect("scenarios") {
        let name = s["name"].as_str().expect("name");
        let passed = s["passed"].as_bool().expect("passed");
        assert_eq!(passed, !needs_redundancy(name), "scenario {name} with one replica:\n{stdout}");
        failed += usize::from(!passed);
    }
    assert!(failed >= 4, "{stdout}");
    assert!(results.path().join("junit.xml").exists());
}

/// The lab's own umask does not show in the outputs: a workload's directory is made as the
/// script's umask (022) would make it. Regression: under umask 077 the report's `stat .` said
/// 0700 and every report scenario failed, on a local directory as on any target.
#[test]
fn the_labs_umask_does_not_show_in_the_outputs() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the goldens were recorded as root");
        return;
    }
    let results = tempfile::tempdir().expect("tmp");
    let mut c = lab();
    c.arg("--lab-dir").arg(repo("lab")).arg("--results").arg(results.path());
    c.args(["--profile", "local", "run", "report-n4-bs8"]);
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = c.output().expect("run dfs-lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PASS  report-n4-bs8"), "{stdout}");
}

#[test]
fn output_that_differs_from_golden_fails_with_a_readable_diff() {
    if !common::fuse_available("lab golden diff") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = |from: &str, to: &Path| {
        let st = Command::new("cp").arg("-r").arg(repo(from)).arg(to).status().expect("cp");
        assert!(st.success());
    };
    copy("lab", &tmp.path().join("lab"));
    copy("golden", &tmp.path().join("golden"));
    let g = tmp.path().join("golden/report_script.out");
    let text = std::fs::read_to_string(&g).expect("golden");
    std::fs::write(&g, text.replace("world how are you", "world how are YOU")).expect("edit golden");
    let results = tmp.path().join("results");
    let out = lab()
        .arg("--lab-dir")
        .arg(tmp.path().join("lab"))
        .arg("--results")
        .arg(&results)
        .args(["run", "report-n4-bs8"])
        .output()
        .expect("run dfs-lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL  report-n4-bs8"), "{stdout}");
    assert!(
        stdout.contains("-world how are YOU") && stdout.contains("+world how are you"),
        "no readable diff:\n{stdout}"
    );
    let diff = std::fs::read_to_string(results.join("report-n4-bs8/diff-1.txt")).expect("diff-1.txt");
    assert!(diff.contains("+world how are you"));
    assert!(results.join("report-n4-bs8/mount.log").exists(), "the failed scenario's logs are kept");
    // The failed run does not hide the verification after it, and the report says how to re-run.
    let md = std::fs::read_to_string(results.join("report.md")).expect("report.md");
    assert!(md.contains("- FAIL step 1 (run report_script): output differs"), "{md}");
    assert!(md.contains("- PASS step 2 (verify report_script)"), "{md}");
    assert!(md.contains("([diff](report-n4-bs8/diff-1.txt))"), "{md}");
    assert!(md.contains("Re-run: `dfs-lab run report-n4-bs8 --profile dfs`"), "{md}");
}

/// A profile written the way a grader writes one for another implementation: a working directory
/// and environment per server, a shell form, setup steps, declared shapes, no check or status
/// command. What it cannot check is said, never passed.
fn grader_profile(dir: &Path, dataserver: &str) -> PathBuf {
    let profile = format!(
        r#"name = "graded"
description = "dfs driven the way a grader drives a submission"
setup = [{{ run = "mkdir -p {{data}}/made-by-setup", shell = true }}]
metaserver = {{ run = "exec {{bin}}/metaserver --block-size {{block_size}} --replicas {{replicas}} {{meta_port}}", cwd = "{{data}}/meta", shell = true }}
dataserver = {dataserver}
mount = "{{bin}}/distributedfs {{mountpoint}} {{meta_port}} {{ports}}"
data_dir = "{{data}}/ds{{index}}"
default_block_size = 8
default_replicas = 3
block_sizes = [8]
replica_counts = [3]
time_scale = 2.0
"#
    );
    let path = dir.join("graded.toml");
    std::fs::write(&path, profile).expect("write profile");
    path
}

#[test]
fn a_graders_profile_runs_with_working_dirs_and_says_what_it_could_not_check() {
    if !common::fuse_available("lab grader profile") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // The dataserver keeps its store in its working directory (./dfs-data/ds<index>), as many do.
    let ds = r#"{ run = "{bin}/dataserver {index} {ports}", cwd = "{data}/ds{index}", env = { RUST_LOG = "debug" } }"#;
    let profile = grader_profile(tmp.path(), ds);
    let results = tmp.path().join("results");
    let mut args = vec![std::ffi::OsStr::new("--profile"), profile.as_os_str()];
    args.extend(os(&["run", "report-n4-bs8", "report-n5-bs512", "corruption"]));
    let (code, stdout) = run_lab(&args, &results);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("PASS  report-n4-bs8"), "{stdout}");
    // Block size 512 is not among the profile's; the corruption scenario needs commands it lacks.
    assert!(stdout.contains("N/A   report-n5-bs512") && stdout.contains("not 512"), "{stdout}");
    assert!(stdout.contains("N/A   corruption") && stdout.contains("no corrupt command"), "{stdout}");
    let md = std::fs::read_to_string(results.join("report.md")).expect("report.md");
    assert!(md.contains("N/A the data at rest: the target profile has no check command"), "{md}");
    assert!(!md.contains("PASS the data at rest"), "{md}");
}

#[test]
fn a_server_that_dies_at_start_is_reported_at_once_with_its_log() {
    if !common::fuse_available("lab startup failure") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = r#"{ run = "echo 'IndexError: list index out of range' >&2; exit 3", shell = true }"#;
    let profile = grader_profile(tmp.path(), ds);
    let results = tmp.path().join("results");
    let start = std::time::Instant::now();
    let (code, stdout, _) = run_broken(&profile, "report-n4-bs8", &results);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "noticed only after a timeout:\n{stdout}");
    assert!(stdout.contains("dataserver 0 did not start") && stdout.contains("exit status: 3"), "{stdout}");
    assert!(stdout.contains("IndexError"), "{stdout}");
    assert!(results.join("report-n4-bs8/dataserver0-start1.log").exists(), "{stdout}");
    assert!(stdout.contains("NOT RUN step 1 (run report_script)"), "{stdout}");
}

#[test]
fn a_local_directory_passes_every_workload_and_no_fault_scenario_applies() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the permissions workload chowns files, which needs root");
        return;
    }
    let results = tempfile::tempdir().expect("tmp");
    let (code, stdout) = run_lab(&os(&["--profile", "local"]), results.path());
    assert_eq!(code, Some(0), "{stdout}");
    let report = report_json(results.path());
    let table: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo("lab/scenarios.toml")).expect("scenarios")).expect("toml");
    let harmless = ["run", "start", "finish", "verify", "sleep"];
    let has_faults = |name: &str| {
        let s = table["scenario"].as_array().expect("list").iter().find(|s| s["name"].as_str() == Some(name));
        let steps = s.and_then(|s| s["steps"].as_array()).expect("steps");
        steps.iter().any(|st| !harmless.contains(&st["action"].as_str().unwrap_or("")))
    };
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    for s in scenarios {
        let (name, verdict) = (s["name"].as_str().expect("name"), s["verdict"].as_str().expect("verdict"));
        let faults = has_faults(name);
        let want = if faults { "not_applicable" } else { "pass" };
        assert_eq!(verdict, want, "{name}:\n{stdout}");
        if faults {
            assert!(s["failure"].as_str().unwrap_or("").contains("local directory"), "{name}: {s}");
        }
    }
    assert!(scenarios.iter().filter(|s| s["verdict"] == "pass").count() >= 3, "{stdout}");
    assert!(scenarios.iter().filter(|s| s["verdict"] == "not_applicable").count() >= 3, "{stdout}");
}

/// This project's profile with one command changed (a broken variant of DFS).
fn broken_profile(dir: &Path, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo("lab/targets/dfs.toml")).expect("dfs.toml");
    assert!(text.contains(from), "dfs.toml has no {from}");
    let path = dir.join("broken.toml");
    std::fs::write(&path, text.replace(from, to).replace("name = \"dfs\"", "name = \"broken\"")).expect("write");
    path
}

/// This project's profile with a client that does not verify checksums.
fn skip_checksums_profile(dir: &Path) -> PathBuf {
    broken_profile(dir, "{bin}/distributedfs {mountpoint}", "{bin}/distributedfs --debug-skip-checksums {mountpoint}")
}

/// The report.md a run left in `results` (empty if none).
fn report_md(results: &Path) -> String {
    std::fs::read_to_string(results.join("report.md")).unwrap_or_default()
}

/// Runs one scenario against `profile`; returns (exit code, stdout, report.md).
fn run_broken(profile: &Path, scenario: &str, results: &Path) -> (Option<i32>, String, String) {
    let args = [std::ffi::OsStr::new("--profile"), profile.as_os_str(), "run".as_ref(), scenario.as_ref()];
    let (code, stdout) = run_lab(&args, results);
    (code, stdout, report_md(results))
}

#[test]
fn broken_variants_of_dfs_fail_for_the_right_reason() {
    if !common::fuse_available("lab broken variants") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // A client that does not verify checksums returns a corrupted replica's bytes.
    let p = skip_checksums_profile(tmp.path());
    let (code, stdout, md) = run_broken(&p, "corruption", &tmp.path().join("r1"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("read data_files/numbers.txt until repaired") && md.contains("returned wrong data"), "{md}");
    // A dataserver that does not rebuild a lost disk: with its neighbours down, its share is missing.
    let p =
        broken_profile(tmp.path(), "{bin}/dataserver --data-dir", "{bin}/dataserver --debug-skip-rebuild --data-dir");
    let (code, stdout, md) = run_broken(&p, "lost-disk", &tmp.path().join("r2"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("- FAIL step 6 (verify data_files)"), "{md}");
    // The broken server claims its rebuild is done: the wait passes, the reads then fail.
    assert!(!md.contains("FAIL step 4") && !md.contains("NOT RUN step 6"), "{md}");
}

/// A profile whose dataservers are handed to a process the lab did not start (a wrapper that
/// daemonizes them): the lab's kill reaches the wrapper only, and the servers go on. A scenario
/// that kills servers must fail saying so, not pass without its faults. Regression: it passed.
#[test]
fn a_kill_that_leaves_the_server_answering_fails_the_scenario() {
    if !common::fuse_available("lab kill check") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(repo("lab/targets/dfs.toml")).expect("dfs.toml");
    let line = text.lines().find(|l| l.starts_with("dataserver = ")).expect("a dataserver line").to_string();
    let wrapped = "dataserver = { run = \"setsid -f {bin}/dataserver --data-dir {data}/ds{index} {index} {ports} \
        >>{data}/ds{index}.out 2>&1; exec sleep 100000\", shell = true }";
    let profile = tmp.path().join("wrapped.toml");
    std::fs::write(&profile, text.replace(&line, wrapped).replace("name = \"dfs\"", "name = \"wrapped\""))
        .expect("write");
    // The lab's clusters live under TMPDIR: here, so that the servers that outlive the run are
    // known by their data dirs.
    let results = tmp.path().join("r");
    let out = lab()
        .env("TMPDIR", tmp.path())
        .args(["--lab-dir".as_ref(), repo("lab").as_os_str(), "--results".as_ref(), results.as_os_str()])
        .args(["--profile".as_ref(), profile.as_os_str(), "run".as_ref(), "two-of-four-down".as_ref()])
        .output()
        .expect("run dfs-lab");
    let md = report_md(&results);
    // End the daemonized servers before any assertion can fail.
    for p in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(&tmp.path().display().to_string()) && cmdline.contains("dataserver") {
            if let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() {
                // SAFETY: a signal to a dataserver this test's lab run started (its data dir is ours).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(md.contains("still answers on port") && md.contains("after the lab killed"), "{md}");
}

/// A corrupt command that does nothing on some servers: a file already corrupted on another one
/// still fails the check, so only a change in what the check says shows the corruption
/// happened. Regression: seed-quorum-table passed, its later corruptions unproven.
#[test]
fn a_corruption_that_changes_nothing_fails_even_on_a_file_already_bad() {
    if !common::fuse_available("lab corrupt check") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let p = broken_profile(
        tmp.path(),
        "corrupt = \"{bin}/dfsctl --meta {meta} corrupt {index} {path}\"",
        "corrupt = { run = \"[ {index} -ge 2 ] || {bin}/dfsctl --meta {meta} corrupt {index} {path}\", shell = true }",
    );
    let (code, stdout, md) = run_broken(&p, "seed-quorum-table", &tmp.path().join("r"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("before and after the corrupt command on server 2"), "{md}");
}

/// A profile whose `data_dir` is not where the servers keep their data, but a directory the lab
/// makes (the servers' working directory): the wipe of lost-disk deleted an empty directory, the
/// server came back whole without a rebuild, and the scenario passed. Regression: only a
/// `data_dir` that did not exist was refused.
#[test]
fn a_wipe_of_a_directory_the_server_keeps_nothing_in_is_refused() {
    if !common::fuse_available("lab wipe of an empty directory") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let p = broken_profile(
        tmp.path(),
        "dataserver = \"{bin}/dataserver --data-dir {data}/ds{index} {index} {ports}\"",
        "dataserver = { run = \"{bin}/dataserver --data-dir {data}/ds{index} {index} {ports}\", cwd = \"{data}/wd{index}\" }",
    );
    let text = std::fs::read_to_string(&p).expect("profile");
    std::fs::write(&p, text.replace("data_dir = \"{data}/ds{index}\"", "data_dir = \"{data}/wd{index}\""))
        .expect("write");
    let (code, stdout, md) = run_broken(&p, "lost-disk", &tmp.path().join("r"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("is empty: is it where the server keeps its data?"), "{md}");
}

/// A crash command that does nothing: the crashed leader goes on leading, and the scenario
/// tested a group that lost no member. Regression: only the command's exit status was looked at,
/// and meta-crash-restore passed.
#[test]
fn a_crash_that_leaves_the_leader_leading_fails_the_scenario() {
    if !common::fuse_available("lab crash that does nothing") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let p = broken_profile(
        tmp.path(),
        "meta_crash = \"{bin}/dfsctl --meta {meta} meta crash {index}\"",
        "meta_crash = \"true\"",
    );
    let (code, stdout, md) = run_broken(&p, "meta-crash-restore", &tmp.path().join("r"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("still says it leads after the meta_crash command"), "{md}");
}

/// A "mount" that keeps every file in its own memory (a tmpfs) and nothing on the servers, in a
/// profile without a check command: every read through it passes, and only the reads through a
/// mount started afresh, at the end of the scenario, can see that the files are nowhere else.
#[test]
fn a_client_that_keeps_files_only_in_its_memory_fails_the_reads_through_a_fresh_mount() {
    if !common::fuse_available("lab client keeping files in memory") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(repo("lab/targets/dfs.toml")).expect("dfs.toml");
    let (mount, check) = ("mount = \"{bin}/distributedfs {mountpoint} {meta} {ports}\"", "\ncheck = ");
    assert!(text.contains(mount) && text.contains(check), "{text}");
    // The metaserver learns the dataservers from a mount: this one tells it with dfsctl.
    let tmpfs = "mount = { run = \"{bin}/dfsctl --meta {meta} init {ports}; \
                 mount -t tmpfs tmpfs {mountpoint} && exec sleep 600\", shell = true }";
    let profile = tmp.path().join("in-memory.toml");
    std::fs::write(&profile, text.replace(mount, tmpfs).replace(check, "\n# check = ")).expect("write profile");
    let (code, stdout, md) = run_broken(&profile, "report-n4-bs8", &tmp.path().join("r"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("- PASS step 2 (verify report_script)"), "{md}");
    assert!(md.contains("- FAIL verify report_script through a fresh mount"), "{md}");
    // The log of the mount that ran the steps is kept beside the fresh one's.
    let logs = tmp.path().join("r/report-n4-bs8");
    assert!(logs.join("mount.log").exists() && logs.join("mount-start2.log").exists(), "{md}");
    // Also where the scenario runs workloads without verifying them in its steps. Regression:
    // only verified workloads were read again through a fresh mount, and this scenario passed.
    let (code, stdout, md) = run_broken(&profile, "posix-n5-default", &tmp.path().join("r2"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("- FAIL verify links through a fresh mount"), "{md}");
}

/// A client that answered reads from what it kept while writing would pass two-of-four-down's
/// reads through the mount that wrote the files with one replica (half the blocks on no live
/// server) and no check command, its servers all back before the end's fresh mount reads. So a
/// verification while servers are down reads through a mount started for it too: here it is
/// made, and with one replica it fails. (DFS's own mount does not answer from its cache there:
/// its reads through the writing mount time out as well.)
#[test]
fn verifications_during_a_fault_read_through_a_fresh_mount_too() {
    if !common::fuse_available("lab verifications through a fresh mount") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let p = broken_profile(tmp.path(), "\ncheck = ", "\n# check = ");
    let results = tmp.path().join("r");
    let mut args = vec![std::ffi::OsStr::new("--profile"), p.as_os_str()];
    args.extend(os(&["--replicas", "1", "--verify-timeout", "5", "run", "two-of-four-down"]));
    let (code, stdout) = run_lab(&args, &results);
    let md = report_md(&results);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("- FAIL step 4 (verify data_files) through a fresh mount"), "{md}");
}

#[test]
fn the_lab_runs_its_scenarios_against_a_metaserver_group() {
    if !common::fuse_available("lab against a metaserver group") {
        return;
    }
    let results = tempfile::tempdir().expect("tmp");
    let args = os(&["--profile", "dfs-group", "run", "report-n4-bs8", "kill-restart"]);
    let (code, stdout) = run_lab(&args, results.path());
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("PASS  report-n4-bs8") && stdout.contains("PASS  kill-restart"), "{stdout}");
    let report = report_json(results.path());
    assert_eq!(report["scenarios"].as_array().expect("scenarios").len(), 2);
}

#[test]
fn scenarios_that_ask_for_a_group_kill_wipe_and_restart_its_members() {
    if !common::fuse_available("lab metaserver group scenarios") {
        return;
    }
    let results = tempfile::tempdir().expect("tmp");
    let names = ["meta-leader-kill", "meta-minority-down", "meta-wiped-member"];
    let mut args = os(&["run"]);
    args.extend(os(&names));
    let (code, stdout) = run_lab(&args, results.path());
    assert_eq!(code, Some(0), "{stdout}");
    for name in names {
        assert!(stdout.contains(&format!("PASS  {name}")), "{stdout}");
    }
    // Without the testers' commands, a scenario that names the leader cannot run: it says so.
    let profile = broken_profile(results.path(), "meta_isleader =", "# meta_isleader =");
    let (code, stdout, _) = run_broken(&profile, "meta-leader-kill", &results.path().join("r2"));
    // And, nothing else asked for, the run tested nothing: it fails.
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("N/A   meta-leader-kill") && stdout.contains("no meta_isleader"), "{stdout}");
    assert!(stdout.contains("nothing was tested"), "{stdout}");
}

/// Runs `dfs-lab chaos` with `args` (and `--profile` first if given): (exit code, stdout, and
/// stderr if it failed).
fn run_chaos(profile: Option<&Path>, args: &[&str]) -> (Option<i32>, String) {
    let mut c = lab();
    c.arg("--lab-dir").arg(repo("lab"));
    if let Some(p) = profile {
        c.arg("--profile").arg(p);
    }
    let out = c.arg("chaos").args(args).output().expect("run dfs-lab chaos");
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        text += &format!("\n-- stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code(), text)
}

#[test]
fn short_chaos_runs_with_two_seeds_pass() {
    if !common::fuse_available("chaos") {
        return;
    }
    for seed in ["1", "2"] {
        let (code, stdout) = run_chaos(None, &["--seconds", "15", "--seed", seed]);
        assert_eq!(code, Some(0), "seed {seed}:\n{stdout}");
        assert!(stdout.contains("PASS  ") && stdout.contains("through a fresh mount"), "seed {seed}:\n{stdout}");
        // Faults were injected, and the operations were checked.
        assert!(stdout.contains("faults: ") && !stdout.contains("faults: none"), "seed {seed}:\n{stdout}");
        assert!(stdout.lines().filter(|l| l.contains(" s  ")).count() >= 3, "seed {seed}:\n{stdout}");
    }
}

#[test]
fn chaos_cuts_servers_off_the_network_and_the_files_survive() {
    if !common::fuse_available("chaos with partitions") {
        return;
    }
    let iptables = std::process::Command::new("iptables").args(["-w", "5", "-S", "INPUT"]).output();
    if !iptables.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: iptables cannot change the rules here (install iptables; needs CAP_NET_ADMIN)");
        return;
    }
    let (code, stdout) = run_chaos(None, &["--seconds", "15", "--seed", "3", "--faults", "partition,meta-partition"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("PASS  ") && stdout.contains("through a fresh mount"), "{stdout}");
    assert!(stdout.contains(" off the network (port "), "{stdout}");
    assert!(stdout.contains(" back on the network"), "{stdout}");
    assert!(!stdout.contains("kill -9") && !stdout.contains("SIGSTOP"), "only partitions were asked: {stdout}");
}

#[test]
fn chaos_fails_a_client_that_does_not_verify_checksums() {
    if !common::fuse_available("chaos against a broken variant") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let p = skip_checksums_profile(tmp.path());
    // Only corruption: the broken client reads the bad copy, or never repairs it.
    let (code, stdout) = run_chaos(Some(&p), &["--seconds", "15", "--seed", "1", "--faults", "corrupt"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("corrupt a block of /chaos/pinned"), "{stdout}");
    assert!(stdout.contains("re-run: dfs-lab chaos --seconds 15 --seed 1 --faults corrupt"), "{stdout}");
    // It read the corrupted copy, or the copy was never repaired (its reads never noticed).
    let why = stdout.lines().find(|l| l.starts_with("FAIL  ")).expect("a FAIL line");
    assert!(why.contains("model mismatch") || why.contains("faults still in effect"), "{stdout}");
}

/// The group member command of this project's profile, run through `sh` so that member 2 is
/// killed by `timeout` after `seconds`: a server that dies on its own while the others carry on.
fn member_2_dies_after(dir: &Path, seconds: u32) -> PathBuf {
    let text = std::fs::read_to_string(repo("lab/targets/dfs.toml")).expect("dfs.toml");
    let line = text.lines().find(|l| l.starts_with("group_metaserver = ")).expect("group_metaserver");
    let cmd = line.trim_start_matches("group_metaserver = ").trim_matches('"');
    let wrapped = format!(
        "group_metaserver = {{ run = \"if [ {{index}} = 2 ]; then exec timeout -s KILL {seconds} {cmd}; else exec {cmd}; fi\", shell = true }}"
    );
    broken_profile(dir, line, &wrapped)
}

/// A lab dir (this repository's, copied) with one more scenario.
fn lab_dir_with(dir: &Path, scenario: &str) -> PathBuf {
    for d in ["lab", "golden"] {
        let st = Command::new("cp").arg("-r").arg(repo(d)).arg(dir.join(d)).status().expect("cp");
        assert!(st.success());
    }
    let path = dir.join("lab/scenarios.toml");
    let mut text = std::fs::read_to_string(&path).expect("scenarios");
    text += scenario;
    std::fs::write(&path, text).expect("write scenarios");
    dir.join("lab")
}

/// A mount that stops answering (its metaserver gone for good) fails the scenario in bounded
/// time, and the lab goes on and cleans up. Regression: the lab made the next workload's
/// directory itself, in a call the kernel holds while the mount does not answer, and hung for
/// good (in a state no signal ends).
#[test]
fn a_mount_that_stops_answering_fails_the_scenario_without_hanging_the_lab() {
    if !common::fuse_available("lab with a mount that does not answer") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let lab_dir = lab_dir_with(
        tmp.path(),
        r#"
[[scenario]]
name = "metaserver-gone"
description = "The metaserver killed, then a workload: the mount waits for it"
servers = 4
steps = [
  { action = "run", workload = "write_one" },
  { action = "kill_meta", member = 0 },
  { action = "run", workload = "data_files" },
]
"#,
    );
    let results = tmp.path().join("r");
    let (code, stdout) = run_lab_in(&lab_dir, &os(&["run", "metaserver-gone"]), &results);
    let md = report_md(&results);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(md.contains("the mount, making") && md.contains("no answer within"), "{md}");
}

/// A server that exits without the lab killing it fails the scenario, though the others carried
/// on (a majority of the group) and the lab starts every server again before the check at rest.
#[test]
fn a_server_that_dies_on_its_own_fails_the_scenario() {
    if !common::fuse_available("lab unbidden exit") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let lab_dir = lab_dir_with(
        tmp.path(),
        r#"
[[scenario]]
name = "member-dies"
description = "A group member dies on its own during a pause"
servers = 4
metaservers = 3
steps = [
  { action = "run", workload = "write_one" },
  { action = "sleep", seconds = 8 },
  { action = "verify", workload = "write_one" },
]
"#,
    );
    let profile = member_2_dies_after(tmp.path(), 4);
    let args = [std::ffi::OsStr::new("--profile"), profile.as_os_str(), "run".as_ref(), "member-dies".as_ref()];
    let (code, stdout) = run_lab_in(&lab_dir, &args, &tmp.path().join("results"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("exited without being killed by the lab") && stdout.contains("metaserver 2"), "{stdout}");
}

/// Checks that cannot fail make a lab that cannot fail: a corrupt command that corrupts nothing
/// the check sees, and a leader question every member answers yes to, are errors of the run.
#[test]
fn a_corruption_the_check_does_not_see_and_two_leaders_fail() {
    if !common::fuse_available("lab vacuous checks") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let corrupt = "corrupt = \"{bin}/dfsctl --meta {meta} corrupt {index} {path}\"";
    let p = broken_profile(tmp.path(), corrupt, "corrupt = \"true\"");
    let (code, stdout, _) = run_broken(&p, "corruption", &tmp.path().join("r1"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("after the corrupt command, the check still passes"), "{stdout}");

    let isleader = "meta_isleader = \"{bin}/dfsctl --meta {meta} meta isleader {index}\"";
    // Scaled down: the lab waits for one leader for 30 s times the scale.
    let p = broken_profile(tmp.path(), isleader, "meta_isleader = \"echo true\"\ntime_scale = 0.2");
    let (code, stdout, _) = run_broken(&p, "meta-leader-kill", &tmp.path().join("r2"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("all say they lead"), "{stdout}");
}

/// A run that tested nothing is not a success: every scenario not applicable, or a chaos run
/// asked for a fault the target cannot take.
#[test]
fn a_run_that_tests_nothing_fails() {
    let results = tempfile::tempdir().expect("tmp");
    let (code, stdout) = run_lab(&os(&["--profile", "local", "run", "kill-restart"]), results.path());
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("nothing was tested"), "{stdout}");

    let tmp = tempfile::tempdir().expect("tmp");
    let p = broken_profile(tmp.path(), "data_dir = \"{data}/ds{index}\"", "# no data_dir");
    let out =
        lab().arg("--profile").arg(&p).args(["chaos", "--seconds", "5", "--faults", "wipe"]).output().expect("chaos");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("--faults wipe asked for, but the target profile has no data_dir"), "{text}");
}

/// A fault meant to land while a background workload runs, which comes after the workload ended,
/// tested a quiet cluster: the scenario fails and says so (as it would on a target or machine fast
/// enough to finish the workload before the fault).
#[test]
fn a_fault_after_the_background_workload_ended_fails_the_scenario() {
    if !common::fuse_available("lab fault after the workload") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let lab_dir = lab_dir_with(
        tmp.path(),
        r#"
[[scenario]]
name = "kill-after-the-end"
description = "A kill that comes after the workload it should interrupt"
servers = 4
steps = [
  { action = "start", workload = "write_one" },
  { action = "sleep", seconds = 3 },
  { action = "kill", server = 1 },
  { action = "finish" },
  { action = "verify", workload = "write_one" },
]
"#,
    );
    let (code, stdout) = run_lab_in(&lab_dir, &os(&["run", "kill-after-the-end"]), &tmp.path().join("results"));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("the background workload write_one had already ended"), "{stdout}");
}
