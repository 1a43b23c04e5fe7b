//! What the binaries share at their edges: lines to stdout that end the program quietly when the
//! reader goes away (`dfsctl ls / | head -1`), and errors printed as one message chain rather than
//! a panic or a backtrace.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// `println!` for the binaries: a closed pipe ends the program quietly with status 0 (the reader
/// has what it wanted), instead of the panic `println!` gives.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::print_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::cli::print_line(format_args!($($arg)*)) };
}

/// Set by a program whose work matters more than its console (the lab, which writes its report
/// after the run): once stdout is closed, lines are dropped instead of ending the program.
static KEEP_GOING: AtomicBool = AtomicBool::new(false);
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Keep running when stdout is closed (see [`KEEP_GOING`]).
pub fn keep_going_without_stdout() {
    KEEP_GOING.store(true, Ordering::Relaxed);
}

/// Writes one line to stdout; see [`outln!`].
pub fn print_line(args: fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            if KEEP_GOING.load(Ordering::Relaxed) {
                CLOSED.store(true, Ordering::Relaxed);
                return;
            }
            std::process::exit(0);
        }
        eprintln!("cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Ends a binary's `main`: on error prints `<program>: <error: cause: cause>` to stderr (no
/// backtrace, whatever `RUST_BACKTRACE` says) and exits with status 1.
/// (`{:#}` is how an `anyhow::Error` prints its chain of causes on one line.)
pub fn exit<E: fmt::Display>(program: &str, r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info).
pub fn init_tracing() {
    init_tracing_at("info");
}

/// For a metaserver: openraft's own lines only from warnings up (at INFO it dumps its whole state
/// at every start); the member logs the group's leader changes itself.
pub fn init_tracing_metaserver() {
    init_tracing_with("info", &["openraft=warn"]);
}

/// For command-line tools, whose output is their answer: only warnings unless `RUST_LOG` says more.
pub fn init_tracing_quiet() {
    init_tracing_at("warn");
}

/// For the mount. fuser 0.18 unmounts again when its session ends, after `umount` already did:
/// its check for a live mount reads the dead connection's POLLERR as "mounted", so every clean
/// `umount` ended with "WARN Failed to umount filesystem: Invalid argument". Its session and mount
/// modules log only that at warning level; the mount logs failed unmounts of its own.
pub fn init_tracing_mount() {
    init_tracing_with("info", &["fuser::session=error", "fuser::mnt=error"]);
}

fn init_tracing_at(default: &str) {
    init_tracing_with(default, &[]);
}

fn init_tracing_with(default: &str, quiet: &[&str]) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    for d in quiet.iter().filter_map(|d| d.parse().ok()) {
        filter = filter.add_directive(d);
    }
    // Colours only on a terminal: logs that go to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// The cluster secret's flag, for a program that connects to a cluster.
#[derive(clap::Args, Debug)]
pub struct SecretArg {
    /// The cluster secret: a file of at least 16 bytes, the same for every process of the cluster;
    /// connections prove knowledge of it before anything is served (default: the file
    /// DFS_SECRET_FILE names; with neither, connections are not authenticated).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<std::path::PathBuf>,
}

impl SecretArg {
    /// Makes the secret this process's (before any connection).
    pub fn apply(&self) -> Result<(), String> {
        crate::wire::auth::init(self.secret_file.as_deref(), false)
    }
}

/// The cluster secret's flags, for a server.
#[derive(clap::Args, Debug)]
pub struct ServerSecurity {
    #[command(flatten)]
    pub secret: SecretArg,
    /// Serve on a non-loopback address without a cluster secret (anyone who reaches the port
    /// could read and change every file).
    #[arg(long)]
    pub insecure: bool,
}

impl ServerSecurity {
    /// Makes the secret this process's (before it listens or connects).
    pub fn apply(&self) -> Result<(), String> {
        crate::wire::auth::init(self.secret.secret_file.as_deref(), self.insecure)
    }
}

/// The `--metrics` flag of a server or a mount.
#[derive(clap::Args, Debug)]
pub struct MetricsArg {
    /// Serve Prometheus metrics at http://ADDR/metrics (ADDR: a port on 127.0.0.1, or HOST:PORT):
    /// operations, bytes, errors and latency by kind, repairs, and the role's gauges. Off unless
    /// given.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl MetricsArg {
    /// Starts serving the metrics, if asked: before the role starts, so that a taken port fails
    /// the start with a clear message instead of being found out later.
    pub fn start(&self) -> Result<(), String> {
        let Some(a) = &self.metrics else { return Ok(()) };
        let addr = crate::shared::layout::parse_addr(a).map_err(|e| format!("--metrics {a}: {e}"))?;
        crate::shared::metrics::serve(&addr).map_err(|e| format!("--metrics {addr}: {e}"))?;
        Ok(())
    }
}

/// For packaging: a first argument `--generate-man` prints the program's man page (roff), and
/// `--generate-completions SHELL` its completions for bash, zsh, fish, elvish or powershell.
/// Checked before the arguments are parsed (the program's own arguments may be required); returns
/// the exit code if it was one of them.
pub fn generated_docs<C: clap::CommandFactory>(name: &'static str) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let first = args.next()?;
    let mut cmd = C::command().name(name);
    let mut out = Vec::new();
    let r = match first.to_str()? {
        "--generate-man" => clap_mangen::Man::new(cmd).render(&mut out).map_err(|e| e.to_string()),
        "--generate-completions" => {
            let shell = args.next().and_then(|s| s.to_str().map(str::to_string)).unwrap_or_default();
            match shell.parse::<clap_complete::Shell>() {
                Ok(shell) => {
                    clap_complete::generate(shell, &mut cmd, name, &mut out);
                    Ok(())
                }
                Err(_) => Err(format!("--generate-completions '{shell}': one of bash, zsh, fish, elvish, powershell")),
            }
        }
        _ => return None,
    };
    let written = r.and_then(|()| match std::io::stdout().lock().write_all(&out) {
        // The reader had what it wanted (`| head`).
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
        _ => Ok(()),
    });
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
    })
}
