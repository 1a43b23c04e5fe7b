//! What a mount last told the kernel of each file (size and mtime), and the write-back's sink
//! that keeps it current. Reads plan against the size known here instead of asking the metaserver
//! each time; an open compares it with the metaserver's to notice another mount's changes
//! (close-to-open).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::statahead::Statahead;
use super::writeback::Sink;
use super::Cluster;
use crate::shared::FsResult;

/// (size, mtime) per inode, as last reported to the kernel, and when this mount last changed it.
///
/// An answer to a question (a getattr, a lookup, a listing) may have left the metaserver before
/// a write of this mount landed and arrive after it: recorded, it would set the size back, and
/// reads (which plan against it) would stop at the old end. So every recorded change is stamped
/// from a clock, a question takes a stamp when it is asked ([`Seen::asking`]), and its answer
/// is recorded only if nothing changed the file since and no later question's answer was
/// recorded ([`Seen::answered`]); the kernel guards its own copy the same way.
#[derive(Default)]
pub struct Seen {
    files: Mutex<HashMap<u64, Known>>,
    clock: AtomicU64,
}

#[derive(Clone, Copy)]
struct Known {
    size: u64,
    mtime: i64,
    /// The clock when this mount last changed the file (or recorded a change's answer).
    changed: u64,
    /// The clock stamp of the question whose answer this is (or of the change): an answer to an
    /// older question is older (the metaserver answers in order), and does not replace it.
    asked: u64,
}

impl Seen {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Known>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Forgets `ino` (the kernel forgot it, and nothing of it is open or on its way here): the
    /// table grows with every file the mount meets otherwise.
    pub fn forget(&self, ino: u64) {
        let mut map = self.map();
        if map.remove(&ino).is_some() {
            known(map.len());
        }
    }

    pub fn get(&self, ino: u64) -> Option<(u64, i64)> {
        self.map().get(&ino).map(|k| (k.size, k.mtime))
    }

    pub fn size(&self, ino: u64) -> Option<u64> {
        self.get(ino).map(|s| s.0)
    }

    /// A stamp of the clock for a question about to be asked of the metaserver (see
    /// [`Seen::answered`]); each question gets its own, so that their answers can be ordered.
    pub fn asking(&self) -> u64 {
        self.tick()
    }

    /// Records what a change's answer reported; returns what was recorded before.
    pub fn record(&self, ino: u64, size: u64, mtime: i64) -> Option<(u64, i64)> {
        // Stamped under the lock, so that the stamps of one file's records only grow.
        let mut map = self.map();
        let changed = self.tick();
        let before = map.insert(ino, Known { size, mtime, changed, asked: changed }).map(|k| (k.size, k.mtime));
        if before.is_none() {
            known(map.len());
        }
        before
    }

    /// Records the answer to a question asked at stamp `asked`, unless this mount changed the file
    /// since (the answer may be from before the change) or the answer to a later question was
    /// recorded (a listing kept for a while answers from when it was taken). The size recorded is
    /// at least `pending`, the end of this mount's writes not landed or not recorded yet: a stream
    /// of writes records its size once, so the metaserver's size may lag what landed, and later
    /// writes must not be planned against less. Returns what was recorded before, if this was
    /// recorded.
    pub fn answered(&self, ino: u64, size: u64, mtime: i64, asked: u64, pending: u64) -> Option<Option<(u64, i64)>> {
        self.answered_between(ino, size, mtime, (asked, asked), pending)
    }

    /// [`Seen::answered`] for an answer the metaserver read some time after the question was
    /// sent (at stamp `sent`) and that came back at stamp `received`: a lock's grant, read when
    /// the lock changed hands, perhaps seconds after the request. This mount's changes are
    /// compared with `sent` (one that landed since may be missing from the answer), other
    /// answers with `received` (one to a question asked while this one waited may be older than
    /// it, and must not replace it afterwards).
    pub fn answered_between(
        &self,
        ino: u64,
        size: u64,
        mtime: i64,
        (sent, received): (u64, u64),
        pending: u64,
    ) -> Option<Option<(u64, i64)>> {
        let size = size.max(pending);
        let mut map = self.map();
        let before = map.get(&ino).copied();
        if before.is_some_and(|k| k.changed > sent || k.asked > received) {
            return None;
        }
        let changed = before.map_or(0, |k| k.changed);
        map.insert(ino, Known { size, mtime, changed, asked: received });
        if before.is_none() {
            known(map.len());
        }
        Some(before.map(|k| (k.size, k.mtime)))
    }

    /// What to show the kernel of `ino` from an answer of `size` and `mtime`, and records it: a
    /// change's answer (`asked` None) always, a question's only as [`Seen::answered`] takes it
    /// (else the recorded values are shown). Either way the size is at
    /// least `pending`, the end of this mount's writes not landed yet: the kernel grew its size
    /// with them.
    pub fn shown(&self, ino: u64, size: u64, mtime: i64, asked: Option<u64>, pending: u64) -> (u64, i64) {
        let size = size.max(pending);
        match asked {
            None => {
                self.record(ino, size, mtime);
            }
            Some(t) => {
                if self.answered(ino, size, mtime, t, pending).is_none() {
                    let (kept, kept_mtime) = self.get(ino).unwrap_or((size, mtime));
                    return (kept.max(pending), kept_mtime);
                }
            }
        }
        (size, mtime)
    }

    /// After a write landed: the size only grows (writes land out of order), the mtime is the newest.
    fn landed(&self, ino: u64, size: u64, mtime: i64) {
        let mut map = self.map();
        let changed = self.tick();
        if let Some(k) = map.get_mut(&ino) {
            *k = Known { size: k.size.max(size), mtime: k.mtime.max(mtime), changed, asked: changed };
        }
    }
}

/// Publishes how many files the table holds.
fn known(n: usize) {
    crate::shared::metrics::set("dfs_files_known", "Files whose size and mtime this mount keeps", n as i64);
}

/// Where the write-back stores: every replica, then the new size on the metaserver; then the size
/// is recorded, so that later writes plan against it.
pub struct ClusterSink {
    pub c: Cluster,
    pub seen: Arc<Seen>,
    pub ahead: Arc<Statahead>,
}

impl Sink for ClusterSink {
    fn write_out(&self, ino: u64, start: u64, data: Vec<u8>, record_size: bool) -> FsResult<()> {
        let end = start + data.len() as u64;
        let r = match self.seen.size(ino) {
            Some(size) if !record_size => self.c.write_blocks(ino, start, data, size).map(|()| None),
            Some(size) => self.c.write_at(ino, start, data, size).map(Some),
            None => self.c.write(ino, start, data).map(Some),
        };
        self.ahead.changed();
        match r? {
            Some(a) => self.seen.landed(ino, a.size, a.mtime),
            // The size a later write records: planned against already (the mtime waits).
            None => self.seen.landed(ino, end, i64::MIN),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes land out of order: the size and the mtime recorded are the largest of their answers,
    /// so the next open does not take this mount's own writes for another mount's change.
    #[test]
    fn writes_landing_out_of_order_keep_the_largest_size_and_newest_mtime() {
        let seen = Seen::default();
        seen.record(7, 0, 10);
        seen.landed(7, 100, 20);
        seen.landed(7, 50, 15);
        assert_eq!(seen.get(7), Some((100, 20)));
    }

    /// A lock's grant, which the metaserver read when the lock changed hands, long after the
    /// request was sent, keeps its place among answers: the answer to a stat asked while the
    /// request waited (from before the other mount's writes) does not replace it afterwards. And a
    /// grant is not taken if this mount's own write landed while it waited (it may not hold it).
    #[test]
    fn a_grant_read_after_a_long_wait_keeps_its_place_among_answers() {
        let seen = Seen::default();
        seen.record(7, 10, 1);
        let sent = seen.asking();
        let stat = seen.asking();
        let received = seen.asking();
        assert_eq!(seen.answered_between(7, 500, 5, (sent, received), 0), Some(Some((10, 1))));
        assert_eq!(seen.answered(7, 10, 1, stat, 0), None, "an older answer recorded after the grant");
        assert_eq!(seen.get(7), Some((500, 5)));

        let sent = seen.asking();
        seen.landed(7, 800, 9);
        let received = seen.asking();
        assert_eq!(seen.answered_between(7, 500, 5, (sent, received), 0), None);
        assert_eq!(seen.get(7), Some((800, 9)));
    }

    /// A getattr asked before a write landed and answered after it does not set the size back; an
    /// answer asked after it (another mount cut the file since) is taken.
    #[test]
    fn an_answer_from_before_a_write_landed_does_not_set_the_size_back() {
        let seen = Seen::default();
        seen.record(7, 0, 10);
        let asked = seen.asking();
        seen.landed(7, 100, 20);
        assert_eq!(seen.answered(7, 0, 10, asked, 0), None);
        assert_eq!(seen.get(7), Some((100, 20)));
        let asked = seen.asking();
        assert_eq!(seen.answered(7, 50, 30, asked, 0), Some(Some((100, 20))));
        assert_eq!(seen.get(7), Some((50, 30)));
        // A file this mount never changed takes any answer.
        assert_eq!(seen.answered(8, 5, 1, 0, 0), Some(None));
    }

    /// A stream of writes records its size once: the metaserver answers an open's question with
    /// 2 MiB while writes to 4 MiB landed here and one to 6 MiB is on its way. Taking the answer
    /// as it came would plan a later partial-block write in 2-4 MiB against 2 MiB and write zeros
    /// over the landed bytes before it in that block.
    #[test]
    fn an_answer_behind_this_mounts_writes_does_not_lower_the_size_they_are_planned_against() {
        let seen = Seen::default();
        seen.record(7, 2 << 20, 10);
        seen.landed(7, 4 << 20, i64::MIN);
        let asked = seen.asking();
        assert_eq!(seen.answered(7, 2 << 20, 10, asked, 6 << 20), Some(Some((4 << 20, 10))));
        assert_eq!(seen.size(7), Some(6 << 20));
    }

    /// Another mount appended; a lookup here asked after it recorded the new size. A listing taken
    /// before it (kept for readdirplus, or fetched ahead) must not put the old size back: a file
    /// opened after the other mount's close would read short, and a write here would plan its
    /// partial block against the old size and cut the other mount's bytes.
    #[test]
    fn an_answer_to_an_older_question_does_not_replace_a_newer_one() {
        let seen = Seen::default();
        seen.record(7, 2, 10);
        let listing = seen.asking();
        assert_eq!(seen.answered(7, 7, 20, seen.asking(), 0), Some(Some((2, 10))));
        assert_eq!(seen.answered(7, 2, 10, listing, 0), None);
        assert_eq!(seen.get(7), Some((7, 20)));
        assert_eq!(seen.shown(7, 2, 10, Some(listing), 0), (7, 20));
    }

    /// Two writes past the end: the first lands while a getattr is on its way, the second is
    /// still buffered. The answer is not taken, and what is shown instead must keep the second's
    /// end (it showed the first's, and fsx saw a write's size undone).
    #[test]
    fn a_discarded_answer_still_shows_the_end_of_writes_not_landed() {
        let seen = Seen::default();
        seen.record(7, 100, 10);
        let asked = seen.asking();
        seen.landed(7, 200, 20);
        assert_eq!(seen.shown(7, 100, 10, Some(asked), 300), (300, 20));
        assert_eq!(seen.get(7), Some((200, 20)), "what landed stays recorded");
        // A taken answer and a change's answer show the pending end too, and record it.
        assert_eq!(seen.shown(7, 250, 30, Some(seen.asking()), 300), (300, 30));
        assert_eq!(seen.shown(7, 150, 40, None, 0), (150, 40));
        assert_eq!(seen.get(7), Some((150, 40)));
    }
}
