//! Attributes and times as the kernel wants them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::shared::{Attr, Kind};

pub fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Nanoseconds since the epoch, clamped to what an i64 holds (about 1677 to 2262): a time past
/// that is kept as the last one it holds, not wrapped round to another century.
pub fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

pub fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// The kernel's view of `a`, with `size` (which may include writes not yet landed) and the I/O
/// size to announce.
pub fn file_attr(a: &Attr, size: u64, blksize: u32) -> FileAttr {
    let (size, blocks) = match a.kind {
        Kind::Dir => (4096, 8),
        _ => (size, size.div_ceil(512)),
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size,
        blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `touch -d 2300-01-01` stored a time wrapped round to about 1715.
    #[test]
    fn times_outside_what_nanoseconds_hold_are_clamped_not_wrapped() {
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(time_ns(UNIX_EPOCH + year * 330), i64::MAX);
        assert_eq!(time_ns(UNIX_EPOCH - year * 330), i64::MIN);
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(time(time_ns(t)), t);
        let before = UNIX_EPOCH - Duration::from_nanos(5);
        assert_eq!(time(time_ns(before)), before);
    }
}
