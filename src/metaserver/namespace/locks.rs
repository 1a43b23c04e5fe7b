//! Advisory locks of one inode: the ranges held and the requests waiting, with POSIX rules for
//! ranges and a fair queue. Pure data; the namespace stores one [`InodeLocks`] per locked inode and
//! applies these rules inside its transactions, so every member of a group makes the same grants.
//!
//! - A lock is (owner, type, first byte, last byte). Locks of one owner never conflict with each
//!   other; setting a range replaces what the owner held there (splitting its older ranges) and
//!   merges it with adjacent or overlapping ranges of the same type (POSIX `fcntl`).
//! - Two locks of different owners conflict when their ranges overlap and one is a write lock.
//! - Waiters are granted in arrival order: a request waits while a held lock conflicts with it or
//!   an earlier waiter does (so a stream of readers never starves a writer), unless that earlier
//!   waiter itself waits for the requester, directly or queued behind one that does (an upgrade
//!   by a reader the writer waits for is not made to wait behind it, which would deadlock).

use serde::{Deserialize, Serialize};

/// Who holds a lock: a client session and the lock owner the kernel names within it (a process's
/// open files for `fcntl` locks, one open file for `flock` and OFD locks).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub session: u64,
    pub owner: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockType {
    Read,
    Write,
}

/// A held lock or a request: bytes `start..=end` of the file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    pub owner: Owner,
    pub typ: LockType,
    pub start: u64,
    pub end: u64,
    /// The process that asked (what `F_GETLK` reports).
    pub pid: u32,
}

impl Lock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// Whether `self` and `other`, of different owners, exclude each other.
    pub fn conflicts(&self, other: &Lock) -> bool {
        self.owner != other.owner
            && self.overlaps(other.start, other.end)
            && (self.typ == LockType::Write || other.typ == LockType::Write)
    }

    /// Whether `self` (held) covers all of `want` with at least its strength.
    fn covers(&self, want: &Lock) -> bool {
        self.owner == want.owner
            && self.start <= want.start
            && want.end <= self.end
            && (self.typ == LockType::Write || want.typ == LockType::Read)
    }
}

/// The locks of one inode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct InodeLocks {
    pub held: Vec<Lock>,
    /// In arrival order.
    pub queue: Vec<Lock>,
}

impl InodeLocks {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.queue.is_empty()
    }

    /// The first held lock of another owner that conflicts with `want` (what `F_GETLK` answers).
    pub fn conflicting(&self, want: &Lock) -> Option<&Lock> {
        self.held.iter().find(|h| h.conflicts(want))
    }

    /// The owners `want` would wait for: holders of conflicting locks, and conflicting waiters
    /// queued before position `before` that do not themselves wait for `want`'s owner, directly
    /// (it holds a lock that conflicts with theirs) or behind an earlier such waiter whose request
    /// conflicts with theirs (a reader queued behind a writer that waits for `want`'s owner).
    pub fn blockers(&self, want: &Lock, before: usize) -> Vec<Owner> {
        let mut out: Vec<Owner> = self.held.iter().filter(|h| h.conflicts(want)).map(|h| h.owner).collect();
        let queue = &self.queue[..before.min(self.queue.len())];
        let mut behind_want = Vec::with_capacity(queue.len());
        for (i, w) in queue.iter().enumerate() {
            let waits_for_want = self.held.iter().any(|h| h.owner == want.owner && h.conflicts(w))
                || queue[..i].iter().zip(&behind_want).any(|(v, &behind)| behind && v.conflicts(w));
            behind_want.push(waits_for_want);
            if w.conflicts(want) && !waits_for_want {
                out.push(w.owner);
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether `owner` holds all of `want`'s range at least as strongly.
    pub fn holds(&self, want: &Lock) -> bool {
        // Ranges of one owner and type are merged, so one held lock covers it if any does.
        self.held.iter().any(|h| h.covers(want))
    }

    pub fn waiting(&self, owner: Owner) -> Option<usize> {
        self.queue.iter().position(|w| w.owner == owner)
    }

    /// Where request `want` (its owner, range and type) is queued. An owner may wait for several
    /// (a process's threads, each for its own range).
    pub fn queued(&self, want: &Lock) -> Option<usize> {
        self.queue
            .iter()
            .position(|w| w.owner == want.owner && (w.start, w.end, w.typ) == (want.start, want.end, want.typ))
    }

    /// Sets `lock` for its owner: replaces what the owner held in its range, then merges it with
    /// the owner's adjacent or overlapping ranges of the same type.
    pub fn set(&mut self, lock: Lock) {
        self.unlock(lock.owner, lock.start, lock.end);
        let mut merged = lock;
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            let touches = h.start <= merged.end.saturating_add(1) && merged.start <= h.end.saturating_add(1);
            if h.owner == merged.owner && h.typ == merged.typ && touches {
                merged.start = merged.start.min(h.start);
                merged.end = merged.end.max(h.end);
                self.held.swap_remove(i);
            } else {
                i += 1;
            }
        }
        self.held.push(merged);
        self.held.sort_by_key(|h| (h.start, h.owner));
    }

    /// Releases what `owner` holds in `start..=end`, splitting ranges that reach outside it.
    pub fn unlock(&mut self, owner: Owner, start: u64, end: u64) {
        let mut kept = Vec::with_capacity(self.held.len() + 1);
        for h in self.held.drain(..) {
            if h.owner != owner || !h.overlaps(start, end) {
                kept.push(h);
                continue;
            }
            if h.start < start {
                kept.push(Lock { end: start - 1, ..h.clone() });
            }
            if h.end > end {
                kept.push(Lock { start: end + 1, ..h });
            }
        }
        self.held = kept;
    }

    /// Drops every lock and request of `session` (an expired or closed session).
    pub fn drop_session(&mut self, session: u64) {
        self.held.retain(|h| h.owner.session != session);
        self.queue.retain(|w| w.owner.session != session);
    }

    /// Grants waiters, in arrival order, whose locks nothing holds or waits for before them.
    /// Returns the owners granted.
    pub fn grant(&mut self) -> Vec<Owner> {
        let mut granted = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let w = self.queue[i].clone();
            if self.blockers(&w, i).is_empty() {
                self.queue.remove(i);
                granted.push(w.owner);
                self.set(w);
                // A grant replaces what its owner held in its range: a read over the owner's own
                // write lowers it, which may unblock a waiter queued earlier. So look again from
                // the first.
                i = 0;
            } else {
                i += 1;
            }
        }
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = i64::MAX as u64;

    fn o(n: u64) -> Owner {
        Owner { session: n, owner: n }
    }

    fn lk(owner: u64, typ: LockType, start: u64, end: u64) -> Lock {
        Lock { owner: o(owner), typ, start, end, pid: owner as u32 }
    }

    use LockType::{Read, Write};

    #[test]
    fn ranges_split_and_merge_per_owner() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Write, 0, 99));
        l.unlock(o(1), 10, 19);
        assert_eq!(l.held, vec![lk(1, Write, 0, 9), lk(1, Write, 20, 99)]);
        l.set(lk(1, Read, 5, 25));
        assert_eq!(l.held, vec![lk(1, Write, 0, 4), lk(1, Read, 5, 25), lk(1, Write, 26, 99)]);
        l.set(lk(1, Write, 5, 25));
        assert_eq!(l.held, vec![lk(1, Write, 0, 99)], "adjacent ranges of one type merge");
        l.unlock(o(1), 0, ALL);
        assert!(l.is_empty());
    }

    #[test]
    fn readers_share_writers_exclude_owners_never_conflict_with_themselves() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Read, 0, 9));
        assert!(l.conflicting(&lk(2, Read, 0, 9)).is_none());
        assert_eq!(l.conflicting(&lk(2, Write, 9, 20)), Some(&lk(1, Read, 0, 9)));
        assert!(l.conflicting(&lk(2, Write, 10, 20)).is_none(), "no overlap");
        assert!(l.conflicting(&lk(1, Write, 0, 9)).is_none());
    }

    #[test]
    fn waiters_are_granted_in_arrival_order_and_readers_do_not_starve_a_writer() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Read, 0, ALL));
        l.queue.push(lk(2, Write, 0, ALL));
        // A new reader is compatible with the holder but queued behind the writer.
        assert_eq!(l.blockers(&lk(3, Read, 0, ALL), l.queue.len()), vec![o(2)]);
        l.queue.push(lk(3, Read, 0, ALL));
        l.queue.push(lk(4, Read, 0, ALL));
        assert!(l.grant().is_empty());
        l.unlock(o(1), 0, ALL);
        assert_eq!(l.grant(), vec![o(2)]);
        l.unlock(o(2), 0, ALL);
        assert_eq!(l.grant(), vec![o(3), o(4)], "readers behind it share");
    }

    #[test]
    fn a_reader_upgrading_is_not_queued_behind_a_writer_waiting_for_it() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Read, 0, ALL));
        l.queue.push(lk(2, Write, 0, ALL));
        assert!(l.blockers(&lk(1, Write, 0, ALL), l.queue.len()).is_empty());
    }

    /// A waiter granted a read over its own write (lowering it) unblocks a reader queued before
    /// it: that reader is granted at once, not when some later change looks at the queue again.
    #[test]
    fn a_grant_that_lowers_a_lock_unblocks_an_earlier_waiter() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Write, 0, 9));
        l.set(lk(3, Write, 20, 29));
        l.queue.push(lk(2, Read, 0, 9));
        l.queue.push(lk(1, Read, 0, 29));
        assert!(l.grant().is_empty());
        l.unlock(o(3), 0, ALL);
        assert_eq!(l.grant(), vec![o(1), o(2)]);
        assert!(l.queue.is_empty());
    }

    #[test]
    fn a_session_that_goes_takes_its_locks_and_requests() {
        let mut l = InodeLocks::default();
        l.set(lk(1, Write, 0, 9));
        l.queue.push(lk(2, Write, 0, 9));
        l.queue.push(lk(3, Read, 5, 5));
        l.drop_session(1);
        assert_eq!(l.grant(), vec![o(2)]);
        assert!(l.holds(&lk(2, Write, 0, 9)));
        assert_eq!(l.waiting(o(3)), Some(0));
    }
}
