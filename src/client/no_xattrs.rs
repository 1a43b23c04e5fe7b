//! Files known to have no extended attributes. `ls -l` asks each file it lists for
//! `security.selinux`, and `cp -a`, `rsync -X` and `tar --xattrs` list each file's attributes:
//! a round trip to the metaserver per file, for files that nearly all have none. The metaserver
//! says with each lookup, getattr and listing whether the inode has any (see [`Attr::xattrs`]),
//! and the mount answers a file that has none from that, for as long as the kernel keeps the same
//! answer's attributes: a change another mount makes is missed no longer than the attributes'.
//!
//! This mount's own changes are never missed: an answer counts only if it was asked after this
//! mount's last change of any inode's extended attributes was answered (on the clock of
//! [`super::seen::Seen`]), and such a change drops the inode's record at once.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::shared::Attr;

/// More records than this, and the expired ones go (then all, if none had).
const MAX_RECORDS: usize = 1 << 16;

#[derive(Default)]
struct State {
    /// Inode, and until when it is known to have none.
    until: HashMap<u64, Instant>,
    /// The clock stamp taken once this mount's last change of extended attributes was answered.
    changed: u64,
}

#[derive(Default)]
pub struct NoXattrs {
    state: Mutex<State>,
}

impl NoXattrs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes what attributes `a`, the answer to a question asked at stamp `asked`, say: for `left`
    /// more, if they say the inode has none.
    pub fn noted(&self, a: &Attr, asked: u64, left: Duration) {
        let mut st = self.state();
        match a.xattrs {
            Some(false) if asked > st.changed && !left.is_zero() => {
                let now = Instant::now();
                if st.until.len() >= MAX_RECORDS {
                    st.until.retain(|_, until| *until > now);
                    if st.until.len() >= MAX_RECORDS {
                        st.until.clear();
                    }
                }
                st.until.insert(a.ino, now + left);
            }
            Some(true) => {
                st.until.remove(&a.ino);
            }
            _ => {}
        }
    }

    /// Whether inode `ino` is known to have no extended attributes.
    pub fn none(&self, ino: u64) -> bool {
        self.state().until.get(&ino).is_some_and(|until| *until > Instant::now())
    }

    /// Before this mount changes `ino`'s extended attributes.
    pub fn changing(&self, ino: u64) {
        self.state().until.remove(&ino);
    }

    /// Once this mount's change of `ino`'s extended attributes was answered, `stamp` a stamp taken
    /// then: what answers asked before it say no longer counts.
    pub fn changed(&self, ino: u64, stamp: u64) {
        let mut st = self.state();
        st.until.remove(&ino);
        st.changed = st.changed.max(stamp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, xattrs: Option<bool>) -> Attr {
        Attr { xattrs, ..crate::client::fakes::file_attr(ino) }
    }

    const LEFT: Duration = Duration::from_secs(1);

    #[test]
    fn a_file_said_to_have_none_is_known_so_until_its_time_is_up() {
        let n = NoXattrs::default();
        n.noted(&attr(5, Some(false)), 1, LEFT);
        assert!(n.none(5));
        assert!(!n.none(6), "never said");
        n.noted(&attr(6, None), 1, LEFT);
        assert!(!n.none(6), "a server that does not say");
        n.noted(&attr(7, Some(false)), 1, Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!n.none(7), "its time is up");
        n.noted(&attr(5, Some(true)), 2, LEFT);
        assert!(!n.none(5), "a later answer says it has some");
    }

    /// An answer asked before this mount's change of attributes was answered may be older than
    /// the change: it does not count, whatever its inode.
    #[test]
    fn an_answer_asked_before_this_mounts_change_does_not_count() {
        let n = NoXattrs::default();
        n.noted(&attr(5, Some(false)), 1, LEFT);
        n.changing(5);
        assert!(!n.none(5), "dropped as the change goes");
        // Asked at 2, answered after the change (answered at 3): it may say none all the same.
        n.changed(5, 3);
        n.noted(&attr(5, Some(false)), 2, LEFT);
        assert!(!n.none(5));
        n.noted(&attr(9, Some(false)), 3, LEFT);
        assert!(!n.none(9), "asked no later than the change's answer");
        n.noted(&attr(5, Some(false)), 4, LEFT);
        assert!(n.none(5), "asked after");
    }
}
