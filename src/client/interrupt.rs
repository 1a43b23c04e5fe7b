//! Whether the process behind a FUSE request still waits for the answer.
//!
//! A request may wait a long time: a write while a dataserver is down, any metadata call while the
//! metaserver is. The kernel tells a FUSE daemon that the caller got a signal with FUSE_INTERRUPT,
//! but fuser 0.18 drops that message. Once a request has reached the daemon, the kernel waits for
//! its answer uninterruptibly (state D), even on SIGKILL; so a daemon that never answers makes its
//! callers unkillable. Instead, a waiting request asks the kernel about its caller every
//! [`POLL`]: a signal pending that the caller does not block, the caller killed (closing its files
//! as it exits by a signal), or the caller gone, and the request is answered EINTR. A caller that
//! exits on its own still waits: its close at exit is a close like any other.
//!
//! The answer comes from `/proc/<tid>/status`: `SigPnd`, `ShdPnd` and `SigBlk` for signals, and the
//! memory lines for an exiting task (a task closing its files at exit has already released its
//! memory, so `VmSize` is gone; the kernel's own threads, which have none, make no requests). A
//! FUSE request names the calling thread, whose `/proc` entry exists even though only the
//! thread-group leader is listed. `/proc/<tid>/stat` is read only for how an exiting task exits:
//! a read of it can block behind the caller's own memory locks (seen: a reader of a
//! multi-threaded process's stat stuck in D state while the process waited for this daemon), and
//! a daemon that blocks on its caller deadlocks with it; a task that has released its memory holds
//! none.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::shared::{FsError, FsResult};

/// How often a waiting request checks on its caller.
pub const POLL: Duration = Duration::from_millis(100);

/// Waits on `cv` (notified under `mutex`) until `done` holds, checking every [`POLL`] whether
/// the caller went away (then `Interrupted`). The check runs with `mutex` unlocked: it reads
/// `/proc`, and whoever makes `done` true must be able to go on meanwhile.
pub fn wait_until<'a, T>(
    mutex: &'a Mutex<T>,
    cv: &Condvar,
    mut guard: MutexGuard<'a, T>,
    interrupted: &dyn Fn() -> bool,
    done: impl Fn(&T) -> bool,
) -> FsResult<MutexGuard<'a, T>> {
    while !done(&guard) {
        let (g, timeout) = cv.wait_timeout(guard, POLL).unwrap_or_else(|p| p.into_inner());
        guard = g;
        if timeout.timed_out() && !done(&guard) {
            drop(guard);
            if interrupted() {
                return Err(FsError::Interrupted);
            }
            guard = mutex.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
    Ok(guard)
}

/// The thread behind a FUSE request (its id as the request names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub u32);

impl Caller {
    /// Whether the caller has been signalled, is exiting or is gone.
    pub fn interrupted(self) -> bool {
        requester_interrupted(self.0)
    }
}

/// Whether thread `tid` has been signalled, is being killed or is gone. Thread 0 (requests the
/// kernel makes on its own, such as a release after the last close) is never interrupted.
fn requester_interrupted(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // Gone: nobody waits for the answer.
        return true;
    };
    match state_of(&status) {
        Life::Gone => true,
        // Signals still pending will never be delivered; how it exits decides. A process that
        // writes a file and exits without closing it (a shell's `printf ... >> f` as its last
        // command) closes it here: that close waits for the data to land, as its own close would,
        // or another mount could open the file after this process ended and miss the data.
        Life::Exiting => !exits_normally(tid),
        Life::Running => signalled(&status),
    }
}

enum Life {
    Running,
    /// Closing its files at exit.
    Exiting,
    /// A zombie or dead: it has closed everything.
    Gone,
}

/// What `/proc/<tid>/status` says of a task: a task closing its files at exit has already
/// released its memory (no `VmSize`); a zombie or a dead task has closed them.
fn state_of(status: &str) -> Life {
    let state = status.lines().find_map(|l| l.strip_prefix("State:")).unwrap_or("").trim_start();
    if state.starts_with('Z') || state.starts_with('X') {
        Life::Gone
    } else if !status.lines().any(|l| l.starts_with("VmSize:")) {
        Life::Exiting
    } else {
        Life::Running
    }
}

/// Whether exiting task `tid` exits on its own (`exit`), not killed by a signal: its exit status
/// (`/proc/<tid>/stat` field 52, set before the task releases its memory) names no signal. Read
/// only once the task has released its memory, so the read has none of the task's locks to wait
/// behind (see the module's notes). Unreadable, it counts as killed. (A daemon not allowed to
/// trace the caller reads 0 there, which counts as exiting on its own.)
fn exits_normally(tid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap_or_default();
    exit_status(&stat).is_some_and(|code| code & 0x7f == 0)
}

/// Field 52 of a `/proc/<tid>/stat` line: the exit status as `waitpid` reports it.
fn exit_status(stat: &str) -> Option<i64> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(49)?.parse().ok()
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
    fn a_task_without_memory_is_exiting_and_a_zombie_is_gone() {
        let none = "0000000000000000";
        let live = format!("{}VmSize:\t  12345 kB\n", status(none, none, none));
        assert!(matches!(state_of(&live), Life::Running));
        // Closing its files at exit: its memory is gone.
        assert!(matches!(state_of(&status(none, none, none)), Life::Exiting));
        assert!(matches!(state_of(&live.replace("D (disk sleep)", "Z (zombie)")), Life::Gone));
    }

    #[test]
    fn the_exit_status_is_field_52_of_stat() {
        // 49 fields after the command name, then exit_code: 256 is exit(1), 9 is SIGKILL.
        let fields = |code: &str| format!("4242 (sh (odd) name) D {} {code}\n", vec!["0"; 48].join(" "));
        assert_eq!(exit_status(&fields("256")), Some(256));
        assert_eq!(exit_status(&fields("9")), Some(9));
        assert_eq!(exit_status("4242 (sh) D 1 2"), None);
        assert_eq!(exit_status(""), None);
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
