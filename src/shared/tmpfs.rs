//! A small disk for tests that fill one: a tmpfs of a given size (unit tests here; tests/full_disk.rs
//! includes this file too).

/// A tmpfs of `size` bytes at `at`, detached on drop; `None` (the test skips) where this process
/// may not mount one.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, size: u64) -> Option<Tmpfs> {
        use nix::mount::{mount, MsFlags};
        let opts = format!("size={size}");
        match mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), Some(opts.as_str())) {
            Ok(()) => Some(Tmpfs(at.to_path_buf())),
            Err(e) => {
                eprintln!("skipping: cannot mount a tmpfs at {}: {e}", at.display());
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
