//! Directories' attributes as this client's own changes left them. A create, link, unlink, rmdir
//! or rename makes the kernel drop its cached attributes of the directory it changed, and its next
//! path walk through that directory asks for them again: one more round trip to the metaserver
//! after every such change (a loop of `rm` paid it each time). The metaserver sends the
//! directories' attributes with the answer to the change, and the mount answers that one getattr
//! from them.
//!
//! An entry serves once, and only for [`FRESH_FOR`] after its change was answered: the time the
//! kernel itself keeps attributes (the mount's TTL), so a change another mount makes meanwhile is
//! missed no longer than the kernel's own cache would miss it. A removal or rename of a directory
//! drops every entry (the directory gone may be one of them), and a change of a directory's own
//! attributes drops its entry; answers to changes sent before such a drop record nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::shared::Attr;

/// How long an entry may serve after its change was answered.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// More entries than this (directories changed within [`FRESH_FOR`]) and the oldest go.
const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub struct FreshDirs {
    entries: Mutex<HashMap<u64, (Attr, Instant)>>,
    /// Counts the forgets (changed under the entries' lock): an answer to a change sent before a
    /// forget may describe the directory as it was before the change that forgot it.
    forgets: AtomicU64,
}

impl FreshDirs {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Attr, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number to pass to [`FreshDirs::record`] for a change about to be sent.
    pub fn sending(&self) -> u64 {
        self.forgets.load(Ordering::Acquire)
    }

    /// Records directories' attributes from the answer to a change sent when [`FreshDirs::sending`]
    /// said `sent`. An entry is replaced only by a newer version: answers to concurrent changes may
    /// arrive in either order. Nothing is recorded if an entry was forgotten since the change was
    /// sent: the change that forgot it (a chmod of the directory, say) may have been applied after
    /// this one, and with no entry left to compare versions with, the older attributes would stay.
    pub fn record(&self, attrs: Vec<Attr>, sent: u64) {
        let now = Instant::now();
        let mut e = self.entries();
        if self.forgets.load(Ordering::Acquire) != sent {
            return;
        }
        if e.len() + attrs.len() > MAX_ENTRIES {
            e.retain(|_, (_, at)| now.duration_since(*at) < FRESH_FOR);
            if e.len() + attrs.len() > MAX_ENTRIES {
                e.clear();
            }
        }
        for a in attrs {
            match e.get(&a.ino) {
                Some((old, _)) if old.version > a.version => {}
                _ => {
                    e.insert(a.ino, (a, now));
                }
            }
        }
    }

    /// Drops the entry of `ino` (its attributes are about to change).
    pub fn forget(&self, ino: u64) {
        let mut e = self.entries();
        e.remove(&ino);
        self.forgets.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops every entry (a directory is about to go, and it may be any of them).
    pub fn forget_all(&self) {
        let mut e = self.entries();
        e.clear();
        self.forgets.fetch_add(1, Ordering::AcqRel);
    }

    /// The directory holding directory `ino`, if a change of this client's left `ino`'s
    /// attributes within [`FRESH_FOR`]; the entry stays.
    pub fn parent_of(&self, ino: u64) -> Option<u64> {
        let e = self.entries();
        let (a, at) = e.get(&ino)?;
        // 0: a server that does not send a directory's parent.
        (at.elapsed() < FRESH_FOR && a.parent != 0).then_some(a.parent)
    }

    /// The attributes of directory `ino` if a change of this client's left them within
    /// [`FRESH_FOR`], and how long they may still serve: the kernel is to keep them no longer, so
    /// that they are never older than its own cache's would be. The entry is used up.
    pub fn take(&self, ino: u64) -> Option<(Attr, Duration)> {
        let (a, at) = self.entries().remove(&ino)?;
        super::time_left(FRESH_FOR, at.elapsed()).map(|left| (a, left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::Kind;

    fn dir(ino: u64, version: u64) -> Attr {
        let (perm, nlink, uid, gid, size, rdev, parent, target) = (0o755, 2, 0, 0, 0, 0, 1, vec![]);
        let (atime, mtime, ctime) = (0, 0, 0);
        Attr {
            ino,
            kind: Kind::Dir,
            perm,
            nlink,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
            rdev,
            parent,
            target,
            version,
            xattrs: None,
        }
    }

    #[test]
    fn an_entry_serves_once_and_only_while_fresh() {
        let f = FreshDirs::default();
        f.record(vec![dir(5, 2)], f.sending());
        assert_eq!(f.parent_of(5), Some(1), "looking leaves it");
        assert_eq!(f.take(5).map(|(a, _)| a.version), Some(2));
        assert_eq!(f.take(5), None, "used up");
        f.entries().insert(6, (dir(6, 1), Instant::now() - FRESH_FOR));
        assert_eq!(f.take(6), None, "too old");
        // Taken 0.6 s after its change: the kernel may keep it only for what is left of the second.
        f.entries().insert(7, (dir(7, 1), Instant::now() - Duration::from_millis(600)));
        let (_, left) = f.take(7).expect("fresh");
        assert!(left <= Duration::from_millis(400), "{left:?}");
    }

    #[test]
    fn an_older_answer_arriving_late_does_not_replace_a_newer_one() {
        let f = FreshDirs::default();
        f.record(vec![dir(5, 4)], f.sending());
        f.record(vec![dir(5, 3)], f.sending());
        assert_eq!(f.take(5).map(|(a, _)| a.version), Some(4));
    }

    #[test]
    fn forgetting_drops_one_or_all() {
        let f = FreshDirs::default();
        f.record(vec![dir(5, 1), dir(6, 1), dir(7, 1)], f.sending());
        f.forget(5);
        assert_eq!(f.take(5), None);
        f.forget_all();
        assert_eq!(f.take(6), None);
        assert_eq!(f.take(7), None);
    }

    /// Regression: a chmod of a directory forgot its entry, and the answer to a create in it,
    /// applied before the chmod but arriving after, recorded the mode from before the chmod.
    #[test]
    fn an_answer_to_a_change_sent_before_a_forget_records_nothing() {
        let f = FreshDirs::default();
        let create = f.sending();
        f.forget(5);
        let chmod = f.sending();
        f.record(vec![dir(5, 3)], create);
        assert_eq!(f.take(5), None, "older than the change that forgot it");
        f.record(vec![dir(5, 4)], chmod);
        assert_eq!(f.take(5).map(|(a, _)| a.version), Some(4));
        let before = f.sending();
        f.forget_all();
        f.record(vec![dir(6, 1)], before);
        assert_eq!(f.take(6), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let f = FreshDirs::default();
        for i in 0..3 * MAX_ENTRIES as u64 {
            f.record(vec![dir(i, 1)], f.sending());
        }
        assert!(f.entries().len() <= MAX_ENTRIES);
    }
}
