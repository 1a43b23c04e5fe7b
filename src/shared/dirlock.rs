//! The lock that keeps two servers off one data dir.

use std::path::Path;

use anyhow::Context;

/// An exclusive lock on a data dir, held for the life of the process: two servers on one store
/// would each believe they own it.
pub struct DirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DirLock {
    /// Creates `dir` if needed and locks it for `who` (e.g. "dataserver 2"), or says which
    /// process holds it.
    pub fn acquire(dir: &Path, who: &str) -> anyhow::Result<DirLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                anyhow::bail!(
                    "data dir {} is in use by {holder}; two servers cannot share a data dir (give --data-dir)",
                    dir.display()
                );
            }
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        };
        // Who holds it, for the message above.
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{who} (pid {})", std::process::id())?;
        Ok(DirLock { _lock: lock })
    }
}
