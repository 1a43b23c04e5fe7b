//! What both servers do at start before they serve: take their data dir, and say clearly why
//! they could not.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The causes are in the messages and not given as `source` too: printed with its chain
    // (`{:#}`), an error would say its cause twice.
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("data dir {} is in use by {holder}; two servers cannot share a data dir (give --data-dir)", dir.display())]
    InUse { dir: PathBuf, holder: String },
    #[error("{what} {}: {error}", path.display())]
    Io { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("opening the store in {}: {error}", dir.display())]
    Store { dir: PathBuf, error: Box<dyn std::error::Error + Send + Sync> },
    #[error("dataserver {index} is not in a ring of {servers} servers")]
    NotInRing { index: usize, servers: usize },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
}

impl StartError {
    /// A store that would not open, with the dir it is in.
    pub fn store(dir: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StartError::Store { dir: dir.to_path_buf(), error: Box::new(e) }
    }
}

/// Raises this process's limit on open files to the most it may have: a server holds a socket per
/// connection, and the usual soft limit of 1,024 would let a thousand idle connections (or a
/// thousand honest clients) keep every other client out. Returns the limit now in effect.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, "could not raise the open files limit: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!("reading the open files limit: {e}");
            0
        }
    }
}

/// An exclusive lock on a data dir, held for the life of the process: two servers on one store
/// would each believe they own it.
pub struct DirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DirLock {
    /// Creates `dir` if needed and locks it for `who` (e.g. "dataserver 2"), or says which
    /// process holds it.
    pub fn acquire(dir: &Path, who: &str) -> Result<DirLock, StartError> {
        fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError {
            let path = path.to_path_buf();
            move |error| StartError::Io { what, path, error }
        }
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening", &path))?;
        let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                return Err(StartError::InUse { dir: dir.to_path_buf(), holder });
            }
            Err((_, e)) => return Err(io("locking", &path)(e.into())),
        };
        // Who holds it, for the message above.
        let note = |lock: &mut std::fs::File| {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{who} (pid {})", std::process::id())
        };
        note(&mut lock).map_err(io("writing", &path))?;
        Ok(DirLock { _lock: lock })
    }
}
