//! Whether the process behind a FUSE request still waits for the answer.
//!
//! A request may wait a long time: a write while a dataserver is down, any metadata call while the
//! metaserver is. The kernel tells a FUSE daemon that the caller got a signal with FUSE_INTERRUPT,
//! but fuser 0.18 drops that message. Once a request has reached the daemon, the kernel waits for
//! its answer uninterruptibly (state D), even on SIGKILL; so a daemon that never answers makes its
//! callers unkillable. Instead, a waiting request asks the kernel about its caller every
//! [`POLL`]: a signal pending that the caller does not block, the caller exiting (a killed process
//! closing its files), or the caller gone, and the request is answered EINTR.
//!
//! The answer comes from `/proc/<tid>/status` alone: `SigPnd`, `ShdPnd` and `SigBlk` for signals,
//! and the memory lines for an exiting task (a task closing its files at exit has already released
//! its memory, so `VmSize` is gone; the kernel's own threads, which have none, make no requests). A
//! FUSE request names the calling thread, whose `/proc` entry exists even though only the
//! thread-group leader is listed. Not `/proc/<tid>/stat`, which would say `PF_EXITING` directly: its
//! read can block behind the caller's own locks (seen: a reader of a multi-threaded process's
//! stat stuck in D state while the process waited for this daemon), and a daemon that blocks on
//! its caller deadlocks with it.

use std::time::Duration;

/// How often a waiting request checks on its caller.
pub const POLL: Duration = Duration::from_millis(100);

/// The thread behind a FUSE request (its id as the request names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub u32);

impl Caller {
    /// Whether the caller has been signalled, is exiting or is gone.
    pub fn interrupted(self) -> bool {
        requester_interrupted(self.0)
    }
}

/// Whether thread `tid` has been signalled, is exiting or is gone. Thread 0 (requests the kernel
/// makes on its own, such as a release after the last close) is never interrupted.
fn requester_interrupted(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => exiting(&status) || signalled(&status),
        // Gone: nobody waits for the answer.
        Err(_) => true,
    }
}

/// Whether `/proc/<tid>/status` shows a task that is exiting (its memory released), a zombie or
/// dead.
fn exiting(status: &str) -> bool {
    let state = status.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("").trim_start();
    state.starts_with('Z') || state.starts_with('X') || !status.lines().any(|l| l.starts_with("VmSize:"))
}

/// Whether `/proc/<tid>/status` shows a signal pending (to the thread or its process) that the
/// thread does not block. SIGKILL and SIGSTOP cannot be blocked.
fn signalled(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    let unblockable = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));
    let blocked = field("SigBlk:") & !unblockable;
    pending & !blocked != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pnd: &str, shd: &str, blk: &str) -> String {
        format!("Name:\tdd\nState:\tD (disk sleep)\nSigPnd:\t{pnd}\nShdPnd:\t{shd}\nSigBlk:\t{blk}\nSigIgn:\t0000000000000000\n")
    }

    #[test]
    fn a_pending_unblocked_signal_interrupts() {
        let none = "0000000000000000";
        assert!(!signalled(&status(none, none, none)));
        // SIGINT (2) pending for the process.
        assert!(signalled(&status(none, "0000000000000002", none)));
        // ... but blocked by the thread.
        assert!(!signalled(&status(none, "0000000000000002", "0000000000000002")));
        // SIGKILL (9) pending for the thread, even with everything blocked.
        assert!(signalled(&status("0000000000000100", none, "ffffffffffffffff")));
    }

    #[test]
    fn an_exiting_task_is_interrupted() {
        let none = "0000000000000000";
        let live = format!("{}VmSize:\t  12345 kB\n", status(none, none, none));
        assert!(!exiting(&live));
        // Closing its files at exit: its memory is gone.
        assert!(exiting(&status(none, none, none)));
        assert!(exiting(&live.replace("D (disk sleep)", "Z (zombie)")));
    }

    #[test]
    fn this_thread_is_not_interrupted_and_a_gone_one_is() {
        let me = nix::unistd::gettid().as_raw() as u32;
        assert!(!requester_interrupted(me));
        assert!(!requester_interrupted(0));
        // Beyond pid_max (at most 2^22): never a live task.
        assert!(requester_interrupted(u32::MAX - 1));
    }
}
