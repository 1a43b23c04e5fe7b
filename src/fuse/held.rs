//! Which lock owners have locked through this mount, and through which open files: what a close
//! must release on the metaserver.
//!
//! The kernel names a lock owner by an address: a process's file table for fcntl locks, the open
//! file itself for flock and OFD locks. Those are released at the open file's last close, which
//! the kernel reports (RELEASE) in the background, after it may already have freed the open file.
//! The next open can then get the same address, and with it the same owner: a flock through it,
//! served before the old release, finds the lock already held by "its" owner and is granted, and
//! the old release, coming after, would unlock it under the new holder, letting another mount in
//! beside it. So a release unlocks an owner only when no other open file has locked under it since,
//! and a lock request for an owner whose release is on its way to the metaserver waits for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::client::interrupt::wait_until;
use crate::shared::FsResult;

/// (inode, lock owner).
type Key = (u64, u64);

#[derive(Default)]
struct Table {
    /// The open files (handles) each owner locked through.
    through: HashMap<Key, HashSet<u64>>,
    /// Owners whose unlock at a close is on its way to the metaserver.
    releasing: HashSet<Key>,
    /// The open files each owner was granted a lock through and has not unlocked since (a
    /// request refused or withdrawn leaves none).
    holding: HashMap<Key, HashSet<u64>>,
    /// Open files through which locks were held that the metaserver has since released, the
    /// session having expired (see [`Held::expired`]).
    lost: HashSet<u64>,
}

#[derive(Default)]
pub struct Held {
    table: Mutex<Table>,
    released: Condvar,
}

impl Held {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before `owner` asks for a lock on `ino` through open file `fh`: waits while a release of the
    /// same owner is on its way (answering `Interrupted` once `interrupted` says so), then notes
    /// the open file.
    pub fn locking(&self, ino: u64, owner: u64, fh: u64, interrupted: &dyn Fn() -> bool) -> FsResult<()> {
        let key = (ino, owner);
        let t = self.table();
        let mut t = wait_until(&self.table, &self.released, t, interrupted, |t| !t.releasing.contains(&key))?;
        t.through.entry(key).or_default().insert(fh);
        Ok(())
    }

    /// After `owner` was granted a lock on `ino` through open file `fh`: notes the open file again.
    /// A close by another thread of the process while the request was on its way (or waiting)
    /// dropped the note and released the process's locks; the lock granted after that is held
    /// all the same, and the process's next close must release it, as on Linux.
    pub fn granted(&self, ino: u64, owner: u64, fh: u64) {
        let mut t = self.table();
        t.through.entry((ino, owner)).or_default().insert(fh);
        t.holding.entry((ino, owner)).or_default().insert(fh);
        t.lost.remove(&fh);
    }

    /// `owner` unlocked through open file `fh` (a whole range or a part: either way it knows what
    /// it holds, and a lost lock is no longer its surprise).
    pub fn unlocked(&self, ino: u64, owner: u64, fh: u64) {
        let mut t = self.table();
        t.holding.remove(&(ino, owner));
        t.lost.remove(&fh);
    }

    /// A close by `owner` (a process closing any descriptor of `ino` releases its fcntl locks on
    /// it): whether it ever locked here, and so must be unlocked. If so, the unlock is on its way
    /// until [`Self::released`].
    pub fn close_owner(&self, ino: u64, owner: u64) -> bool {
        let mut t = self.table();
        t.holding.remove(&(ino, owner));
        let locked = t.through.remove(&(ino, owner)).is_some();
        if locked {
            t.releasing.insert((ino, owner));
        }
        locked
    }

    /// The last close of open file `fh`: the owners to unlock, those that locked through it and
    /// through no other open file since. Their unlocks are on their way until [`Self::released`].
    pub fn close_file(&self, ino: u64, fh: u64) -> Vec<u64> {
        let mut t = self.table();
        t.lost.remove(&fh);
        t.holding.retain(|&(i, _), fhs| {
            if i == ino {
                fhs.remove(&fh);
            }
            !fhs.is_empty()
        });
        let Table { through, releasing, .. } = &mut *t;
        let mut owners = Vec::new();
        through.retain(|&(i, owner), fhs| {
            if i != ino || !fhs.remove(&fh) {
                return true;
            }
            if fhs.is_empty() {
                owners.push(owner);
                releasing.insert((i, owner));
            }
            !fhs.is_empty()
        });
        owners
    }

    /// The session expired: the metaserver released every lock it held, and may have granted
    /// them to other mounts. The open files they were taken through are marked: a process that
    /// goes on reading and writing through one, believing it still holds its lock, is told
    /// ([`Held::lost`]) instead of racing the new holder unawares, as NFS tells of a lost lock.
    pub fn expired(&self) {
        let mut t = self.table();
        t.through.clear();
        let fhs: Vec<u64> = t.holding.drain().flat_map(|(_, fhs)| fhs).collect();
        t.lost.extend(fhs);
    }

    /// Whether a lock taken through open file `fh` was lost (see [`Held::expired`]), until the
    /// process locks or unlocks through it again or closes it.
    pub fn lost(&self, fh: u64) -> bool {
        self.table().lost.contains(&fh)
    }

    /// The unlock of `owner` on `ino` that a close started has been answered.
    pub fn released(&self, ino: u64, owner: u64) {
        self.table().releasing.remove(&(ino, owner));
        self.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::interrupt::POLL;
    use crate::shared::FsError;

    /// The race above: open file 1's flock owner is handed to open file 2 before file 1's release
    /// is served. The release must leave the lock to file 2.
    #[test]
    fn a_release_leaves_an_owner_that_locked_again_through_another_open_file() {
        let h = Held::default();
        h.locking(7, 42, 1, &|| false).expect("lock");
        h.locking(7, 42, 2, &|| false).expect("the same owner through the next open file");
        assert!(h.close_file(7, 1).is_empty(), "file 2 still holds the lock");
        assert_eq!(h.close_file(7, 2), vec![42]);
        h.released(7, 42);
        assert!(h.close_file(7, 2).is_empty(), "released once");
    }

    #[test]
    fn a_release_unlocks_only_owners_that_locked_through_the_file() {
        let h = Held::default();
        h.locking(7, 42, 1, &|| false).expect("lock");
        h.locking(7, 43, 2, &|| false).expect("lock");
        h.locking(8, 44, 1, &|| false).expect("another inode");
        assert_eq!(h.close_file(7, 1), vec![42]);
        assert_eq!(h.close_file(7, 2), vec![43]);
        assert_eq!(h.close_file(8, 1), vec![44]);
    }

    #[test]
    fn a_close_by_the_owner_unlocks_whatever_file_it_locked_through() {
        let h = Held::default();
        assert!(!h.close_owner(7, 42), "never locked: no call");
        h.locking(7, 42, 1, &|| false).expect("lock");
        h.locking(7, 42, 2, &|| false).expect("lock");
        assert!(h.close_owner(7, 42));
        h.released(7, 42);
        assert!(h.close_file(7, 1).is_empty() && h.close_file(7, 2).is_empty());
    }

    #[test]
    fn an_expired_sessions_locks_mark_the_files_they_were_taken_through_until_locked_again() {
        let h = Held::default();
        h.locking(7, 42, 1, &|| false).expect("lock");
        h.granted(7, 42, 1);
        h.locking(8, 43, 2, &|| false).expect("lock");
        h.granted(8, 43, 2);
        assert!(!h.lost(1));
        h.expired();
        assert!(h.lost(1) && h.lost(2) && !h.lost(3));
        assert!(h.close_file(7, 1).is_empty(), "nothing is held to unlock");
        assert!(!h.lost(1), "closed");
        h.unlocked(8, 43, 2);
        assert!(!h.lost(2), "unlocked again");
    }

    /// Regression: a file through which a lock was only asked for (refused, or given up) was
    /// marked too, and a process that held no lock got EIO.
    #[test]
    fn only_files_holding_a_lock_when_the_session_expired_are_marked() {
        let h = Held::default();
        h.locking(7, 42, 1, &|| false).expect("asked, refused");
        h.locking(7, 43, 2, &|| false).expect("asked");
        h.granted(7, 43, 2);
        h.unlocked(7, 43, 2);
        h.locking(7, 44, 3, &|| false).expect("asked");
        h.granted(7, 44, 3);
        h.expired();
        assert!(!h.lost(1) && !h.lost(2) && h.lost(3));
    }

    /// A lock request of an owner whose unlock is on its way waits for the answer (else the unlock
    /// could land after the new lock was granted, and undo it); interrupted, it gives up.
    #[test]
    fn a_lock_waits_for_the_same_owners_release_on_its_way() {
        let h = std::sync::Arc::new(Held::default());
        h.locking(7, 42, 1, &|| false).expect("lock");
        assert_eq!(h.close_file(7, 1), vec![42]);
        assert!(matches!(h.locking(7, 42, 2, &|| true), Err(FsError::Interrupted)));
        // Another owner does not wait.
        h.locking(7, 43, 3, &|| false).expect("another owner");
        let (tx, rx) = std::sync::mpsc::channel();
        let h2 = h.clone();
        let waiter = std::thread::spawn(move || {
            let r = h2.locking(7, 42, 2, &|| false);
            let _ = tx.send(());
            r
        });
        assert!(rx.recv_timeout(POLL * 3).is_err(), "the lock went ahead of the release");
        h.released(7, 42);
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the lock goes ahead once released");
        waiter.join().expect("waiter").expect("lock");
        assert_eq!(h.close_file(7, 2), vec![42]);
    }
}
