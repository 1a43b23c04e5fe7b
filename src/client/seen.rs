//! What a mount last told the kernel of each file (size and mtime), and the write-back's sink
//! that keeps it current. Reads plan against the size known here instead of asking the metaserver
//! each time; an open compares it with the metaserver's to notice another mount's changes
//! (close-to-open).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::statahead::Statahead;
use super::writeback::Sink;
use super::Cluster;
use crate::shared::FsResult;

/// (size, mtime) per inode, as last reported to the kernel.
#[derive(Default)]
pub struct Seen(Mutex<HashMap<u64, (u64, i64)>>);

impl Seen {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, (u64, i64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<(u64, i64)> {
        self.map().get(&ino).copied()
    }

    pub fn size(&self, ino: u64) -> Option<u64> {
        self.get(ino).map(|s| s.0)
    }

    /// Records what was reported; returns what was recorded before.
    pub fn record(&self, ino: u64, size: u64, mtime: i64) -> Option<(u64, i64)> {
        self.map().insert(ino, (size, mtime))
    }

    /// After a write landed: the size only grows (writes land out of order), the mtime is the newest.
    fn landed(&self, ino: u64, size: u64, mtime: i64) {
        if let Some(s) = self.map().get_mut(&ino) {
            *s = (s.0.max(size), s.1.max(mtime));
        }
    }
}

/// Where the write-back stores: every replica, then the new size on the metaserver; then the size
/// is recorded, so that later writes plan against it.
pub struct ClusterSink {
    pub c: Cluster,
    pub seen: Arc<Seen>,
    pub ahead: Arc<Statahead>,
}

impl Sink for ClusterSink {
    fn write_out(&self, ino: u64, start: u64, data: Vec<u8>) -> FsResult<()> {
        let r = match self.seen.size(ino) {
            Some(size) => self.c.write_at(ino, start, data, size),
            None => self.c.write(ino, start, data),
        };
        self.ahead.changed();
        let a = r?;
        self.seen.landed(ino, a.size, a.mtime);
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
}
