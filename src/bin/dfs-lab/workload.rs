//! Running workloads (shell scripts) in a directory, bounded in time, and comparing their normalized
//! output with golden output.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use similar::TextDiff;

use crate::procs::INTERRUPTED;

/// A workload running in the background; its output goes to a file.
pub struct Running {
    child: Child,
    out: std::path::PathBuf,
    dir: std::path::PathBuf,
    pub name: String,
}

/// How long the lab waits for the mount to make a workload's directory, and for a killed
/// workload to go.
const DIR_LIMIT: Duration = Duration::from_secs(30);

/// Starts `script` with `dir` as working directory: bash, a fixed umask and locale, stderr merged
/// into stdout, in its own process group (so a timeout kills everything it started). With `other`
/// (the same directory through a second mount), the script finds it in `$OTHER`.
pub fn start(name: &str, script: &Path, dir: &Path, out: &Path, other: Option<&Path>) -> anyhow::Result<Running> {
    if !script.is_absolute() || !script.is_file() {
        bail!("workload script {} is not an existing absolute path", script.display());
    }
    let d = dir.to_path_buf();
    crate::procs::bounded(&format!("the mount, making {}", dir.display()), DIR_LIMIT, move || {
        if !d.exists() {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            // As the script's own umask would make it, whatever the lab's is: the goldens show it.
            std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", d.display()))?;
        }
        Ok(())
    })?;
    let file = std::fs::File::create(out)?;
    let mut cmd = Command::new("bash");
    if let Some(o) = other {
        cmd.env("OTHER", o);
    }
    let child = cmd
        .arg("-c")
        // The script changes into its directory itself: a spawn that did it would wait, with
        // the lab, for as long as the mount does not answer.
        .arg("umask 022; exec 2>&1; cd -- \"$1\" || exit 1; shift; . \"$0\"")
        .arg(script)
        .arg(dir)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .stdout(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting workload {}", script.display()))?;
    Ok(Running { child, out: out.to_path_buf(), dir: dir.to_path_buf(), name: name.to_string() })
}

impl Running {
    pub fn finished(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) and returns the normalized output.
    pub fn wait(mut self, limit: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        while !self.finished() {
            if start.elapsed() > limit || INTERRUPTED.load(Ordering::Relaxed) {
                self.kill();
                let partial = std::fs::read_to_string(&self.out).unwrap_or_default();
                bail!("workload {} did not finish within {limit:?}; its output so far:\n{partial}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read(&self.out).with_context(|| format!("reading {}", self.out.display()))?;
        Ok(crate::normalize::normalize(&String::from_utf8_lossy(&text), &self.dir.display().to_string()))
    }

    pub fn kill(&mut self) {
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        // Bounded: a killed process whose call the mount never answers stays until the mount
        // goes, which comes after this.
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < DIR_LIMIT {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished() {
            self.kill();
        }
    }
}

pub fn run(name: &str, script: &Path, dir: &Path, out: &Path, limit: Duration) -> anyhow::Result<String> {
    run_with(name, script, dir, out, limit, None)
}

/// [`run`] with the directory through a second mount in `$OTHER`.
pub fn run_with(
    name: &str,
    script: &Path,
    dir: &Path,
    out: &Path,
    limit: Duration,
    other: Option<&Path>,
) -> anyhow::Result<String> {
    start(name, script, dir, out, other)?.wait(limit)
}

/// A readable unified diff of golden against actual output, or None if they are equal.
pub fn diff(golden_name: &str, golden: &str, actual_name: &str, actual: &str) -> Option<String> {
    if golden == actual {
        return None;
    }
    let d = TextDiff::from_lines(golden, actual);
    Some(d.unified_diff().context_radius(3).header(golden_name, actual_name).to_string())
}
