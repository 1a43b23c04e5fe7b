//! An append-only log of numbered records in segment files, for the Raft log: one `fdatasync` per
//! appended batch, where an LMDB commit costs two (its data, then its meta page). Measured on this
//! project's reference disk: an LMDB commit ~0.3–0.5 ms; an overwrite of already-written bytes with
//! `O_DSYNC` 62–82 us; a write that extends a file or fills a fallocated extent 170–230 us (the
//! file system journals the new size or extent). So a segment is written full of zeros when it is
//! made, and appends overwrite those zeros.
//!
//! A record is a 16-byte header (payload length, CRC-32 of the index and payload, the index) and
//! the payload. Indexes are consecutive within a segment. An append at an index already held
//! replaces it and everything after it (Raft overwrites a conflicting suffix); one past a gap
//! starts a new segment (openraft's storage suite asks for both). Reading stops at a zero length, a record that overruns its
//! segment, a CRC that does not match (a write torn by a crash: it was never acknowledged) or an
//! index out of sequence; what follows is zeroed, so a later append is never followed by stale
//! records.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The size a segment is made with unless the log is opened with another ([`Wal::open_sized`]); a
/// record larger than a fresh segment gets a segment of its own size.
pub const SEGMENT_SIZE: u64 = 4 << 20;
const HEADER: u64 = 16;

struct Segment {
    /// The index of its first record.
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    /// Offset and payload length of each record, in index order from `first`.
    records: Vec<(u64, u32)>,
    /// Where the next record goes.
    end: u64,
}

impl Segment {
    fn last(&self) -> Option<u64> {
        (!self.records.is_empty()).then(|| self.first + self.records.len() as u64 - 1)
    }
}

pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    segment_size: u64,
    sync: SyncFn,
    /// Runs before the next append, which fails if it does (tests).
    #[cfg(test)]
    pub before_append: Option<Box<dyn FnOnce() -> io::Result<()> + Send>>,
}

/// How a segment's appended bytes are made durable: `fdatasync`, or, in a test, a stand-in that
/// fails on purpose.
pub type SyncFn = Arc<dyn Fn(&File) -> io::Result<()> + Send + Sync>;

fn fdatasync() -> SyncFn {
    Arc::new(|f: &File| f.sync_data())
}

/// A purged segment kept to be made the next one: zeroing it in place allocates nothing, so the
/// log goes on when the disk is full (a metaserver must still take removals then).
const SPARE: &str = "spare";

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes zeros over `[from, to)` of `file`.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(CHUNK, |n| n.min(CHUNK));
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// An append that found no room on the disk for a new segment: nothing of it was written, and the
/// log is as it was, so appending may go on once there is room.
#[derive(Debug, thiserror::Error)]
#[error("no room for a new log segment: {0}")]
pub struct NoRoomForSegment(io::Error);

/// `e`, marked as [`NoRoomForSegment`] if it is ENOSPC.
fn no_room(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        io::Error::new(e.kind(), NoRoomForSegment(e))
    } else {
        e
    }
}

/// Whether an append failed only for want of room for a new segment (see [`NoRoomForSegment`]).
pub fn is_no_room_for_segment(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NoRoomForSegment>())
}

/// Reads a segment's valid records; returns them and where the valid part ends.
fn scan(bytes: &[u8], first: u64) -> (Vec<(u64, u32)>, u64) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some(h) = bytes.get(at..at + HEADER as usize) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sum = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let index = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let start = at + HEADER as usize;
        let Some(payload) = bytes.get(start..start + len as usize) else { break };
        if len == 0 || index != first + records.len() as u64 || crc(index, payload) != sum {
            break;
        }
        records.push((start as u64, len));
        at = start + len as usize;
    }
    (records, at as u64)
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, dropping whatever a crash left half-written.
    pub fn open(dir: &Path) -> io::Result<Wal> {
        Self::open_sized(dir, SEGMENT_SIZE)
    }

    /// [`Wal::open`], making new segments of `segment_size` bytes.
    pub fn open_sized(dir: &Path, segment_size: u64) -> io::Result<Wal> {
        std::fs::create_dir_all(dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".wal"))
                .and_then(|n| n.parse::<u64>().ok());
            match first {
                Some(first) => names.push((first, path)),
                // A segment being made when the process died (made under a temporary name).
                None if path.extension().is_some_and(|x| x == "tmp") => std::fs::remove_file(&path)?,
                None => {}
            }
        }
        names.sort();
        let mut segments: Vec<Segment> = Vec::new();
        let mut broken = false;
        for (first, path) in names {
            if broken {
                // A segment is begun only once the one before is synced: none can follow a torn one.
                std::fs::remove_file(&path)?;
                continue;
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let (records, end) = scan(&bytes, first);
            let size = bytes.len() as u64;
            if bytes.get(end as usize..).is_some_and(|rest| rest.iter().any(|&b| b != 0)) {
                zero(&file, end, size)?;
                file.sync_data()?;
                broken = true;
            }
            if records.is_empty() && !segments.is_empty() {
                std::fs::remove_file(&path)?;
                continue;
            }
            segments.push(Segment { first, path, file: Arc::new(file), size, records, end });
        }
        Ok(Wal {
            dir: dir.to_path_buf(),
            segments,
            segment_size,
            sync: fdatasync(),
            #[cfg(test)]
            before_append: None,
        })
    }

    /// The first and last index held, if any.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let first = self.segments.iter().find(|s| !s.records.is_empty())?.first;
        Some((first, self.segments.iter().rev().find_map(Segment::last)?))
    }

    /// The payload of record `index`.
    pub fn get(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(s) = self.segments.iter().rev().find(|s| s.first <= index) else { return Ok(None) };
        let Some(&(off, len)) = usize::try_from(index - s.first).ok().and_then(|i| s.records.get(i)) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        s.file.read_exact_at(&mut buf, off)?;
        Ok(Some(buf))
    }

    /// The payloads of the records held from `from` to `to` (inclusive), in index order.
    pub fn range(&self, from: u64, to: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for s in &self.segments {
            let Some(last) = s.last() else { continue };
            for i in from.max(s.first)..=to.min(last) {
                let (off, len) = s.records[(i - s.first) as usize];
                let mut buf = vec![0u8; len as usize];
                s.file.read_exact_at(&mut buf, off)?;
                out.push((i, buf));
            }
        }
        Ok(out)
    }

    /// A fresh segment starting at `first`, at least `need` bytes, full of zeros on disk: the spare
    /// if there is one and it is large enough, else a new file.
    fn new_segment(&self, first: u64, need: u64) -> io::Result<Segment> {
        let path = self.dir.join(segment_name(first));
        let spare = self.dir.join(SPARE);
        let reused = std::fs::metadata(&spare).ok().map(|m| m.len()).filter(|&len| len >= need);
        let (from, size) = match reused {
            Some(len) => (spare, len),
            None => (self.dir.join(format!("{first:020}.tmp")), self.segment_size.max(need)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(reused.is_none())
            .open(&from)
            .map_err(no_room)?;
        if let Err(e) = zero(&file, 0, size).and_then(|()| file.sync_all()) {
            // On a full disk the new file has taken what room there was: give it back (the
            // spare, already paid for, is kept).
            if reused.is_none() {
                let _ = std::fs::remove_file(&from);
            }
            return Err(no_room(e));
        }
        std::fs::rename(&from, &path)?;
        sync_dir(&self.dir)?;
        Ok(Segment { first, path, file: Arc::new(file), size, records: Vec::new(), end: 0 })
    }

    /// Appends `records` (index, payload), in index order, and returns the files to sync for them
    /// to be durable: see [`Wal::sync_files`]. A record at an index already held replaces it and all
    /// after it.
    pub fn append(&mut self, records: &[(u64, &[u8])]) -> io::Result<Vec<Arc<File>>> {
        #[cfg(test)]
        if let Some(f) = self.before_append.take() {
            f()?;
        }
        let mut touched: Vec<Arc<File>> = Vec::new();
        for &(index, payload) in records {
            let mut gap = false;
            if let Some((_, last)) = self.bounds() {
                if index <= last {
                    self.truncate(index)?;
                }
                gap = self.bounds().is_some_and(|(_, last)| index > last + 1);
            }
            let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("log record over 4 GiB"))?;
            let need = HEADER + u64::from(len);
            let fits = self.segments.last().is_some_and(|s| s.end + need <= s.size);
            if !fits || gap {
                // The segment before a new one is complete on disk first (see `open`).
                if let Some(s) = self.segments.last().filter(|s| !s.records.is_empty()) {
                    (self.sync)(&s.file)?;
                }
                // An empty last segment (everything in it truncated) is replaced, starting anew.
                if let Some(s) = self.segments.last().filter(|s| s.records.is_empty()) {
                    std::fs::remove_file(&s.path)?;
                    self.segments.pop();
                }
                let s = self.new_segment(index, need)?;
                self.segments.push(s);
            }
            let s = self.segments.last_mut().ok_or_else(|| io::Error::other("no segment"))?;
            if s.records.is_empty() {
                s.first = index;
                if s.path != self.dir.join(segment_name(index)) {
                    let path = self.dir.join(segment_name(index));
                    std::fs::rename(&s.path, &path)?;
                    s.path = path;
                    sync_dir(&self.dir)?;
                }
            }
            let mut buf = Vec::with_capacity(need as usize);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc(index, payload).to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(payload);
            s.file.write_all_at(&buf, s.end)?;
            s.records.push((s.end + HEADER, len));
            s.end += need;
            if !touched.iter().any(|f| Arc::ptr_eq(f, &s.file)) {
                touched.push(s.file.clone());
            }
        }
        Ok(touched)
    }

    /// Makes appended records durable: one `fdatasync` per file (the size of a segment never
    /// changes, so no file system metadata needs writing).
    pub fn sync_files(&self, files: &[Arc<File>]) -> io::Result<()> {
        files.iter().try_for_each(|f| (self.sync)(f))
    }

    /// How this log syncs a segment (for a caller that syncs the files [`Wal::append`] returned
    /// outside the log's lock).
    pub fn syncer(&self) -> SyncFn {
        self.sync.clone()
    }

    /// Makes this log sync its segments with `sync` (a test's failing stand-in).
    #[cfg(test)]
    pub fn sync_with(&mut self, sync: SyncFn) {
        self.sync = sync;
    }

    /// Removes the records from `index` on, durably.
    pub fn truncate(&mut self, index: u64) -> io::Result<()> {
        let sync = self.sync.clone();
        loop {
            let only = self.segments.len() == 1;
            let Some(s) = self.segments.last_mut() else { return Ok(()) };
            if s.first < index || (s.first == index && only) {
                let keep = usize::try_from(index.saturating_sub(s.first)).unwrap_or(usize::MAX);
                if keep < s.records.len() {
                    let cut = s.records[keep].0 - HEADER;
                    zero(&s.file, cut, s.end)?;
                    sync(&s.file)?;
                    s.records.truncate(keep);
                    s.end = cut;
                }
                return Ok(());
            }
            std::fs::remove_file(&s.path)?;
            self.segments.pop();
            sync_dir(&self.dir)?;
        }
    }

    /// Drops the segments whose records all come at or before `index` (the newest segment stays,
    /// so the log goes on where it was).
    pub fn purge(&mut self, index: u64) -> io::Result<()> {
        let mut dropped = false;
        while self.segments.len() > 1 && self.segments[0].last().is_none_or(|l| l <= index) {
            let spare = self.dir.join(SPARE);
            if spare.exists() {
                std::fs::remove_file(&self.segments[0].path)?;
            } else {
                std::fs::rename(&self.segments[0].path, spare)?;
            }
            self.segments.remove(0);
            dropped = true;
        }
        if dropped {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// A stand-in sync for tests of a sync that runs beside a failed one.
#[cfg(test)]
pub mod testing {
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::time::Duration;

    use super::SyncFn;

    #[derive(Default)]
    struct State {
        armed: bool,
        held: bool,
        released: bool,
        /// How the change waiting on the held sync was answered (true: success), once it was.
        answer: Option<bool>,
        /// What that answer was by the time the failing sync gave up waiting for it.
        answered_meanwhile: Option<bool>,
    }

    /// Once armed, the first sync (X's) is held until the next (Y's, of the same full segment),
    /// which lets X's go on to succeed (the kernel reported the failure to Y's alone), waits up
    /// to a second for X to be answered, notes whether it was, and fails with EIO.
    #[derive(Default)]
    pub struct HeldThenFailed {
        state: Mutex<State>,
        changed: Condvar,
    }

    impl HeldThenFailed {
        fn state(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap()
        }

        pub fn sync(self: &Arc<Self>) -> SyncFn {
            let me = self.clone();
            Arc::new(move |f: &std::fs::File| {
                let mut st = me.state();
                if !st.armed {
                    return f.sync_data();
                }
                if !st.held {
                    st.held = true;
                    me.changed.notify_all();
                    // Bounded: a test whose second sync never comes fails instead of hanging.
                    drop(me.changed.wait_timeout_while(st, Duration::from_secs(30), |st| !st.released).unwrap());
                    return f.sync_data();
                }
                st.released = true;
                me.changed.notify_all();
                let (mut st, _) =
                    me.changed.wait_timeout_while(st, Duration::from_secs(1), |st| st.answer.is_none()).unwrap();
                st.answered_meanwhile = st.answer;
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            })
        }

        pub fn arm(&self) {
            self.state().armed = true;
        }

        /// Waits until X's sync is held (at most 30 s: then the test fails).
        pub fn wait_held(&self) {
            let limit = Duration::from_secs(30);
            let (_st, waited) = self.changed.wait_timeout_while(self.state(), limit, |st| !st.held).unwrap();
            assert!(!waited.timed_out(), "X's sync did not come within {limit:?}");
        }

        /// Records how X was answered.
        pub fn answered(&self, ok: bool) {
            self.state().answer = Some(ok);
            self.changed.notify_all();
        }

        /// How X was answered, waiting up to `limit` for it.
        pub fn answer(&self, limit: Duration) -> Option<bool> {
            self.changed.wait_timeout_while(self.state(), limit, |st| st.answer.is_none()).unwrap().0.answer
        }

        /// How X was answered while Y's failure was being dealt with (None: it was not).
        pub fn answered_meanwhile(&self) -> Option<bool> {
            self.state().answered_meanwhile
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(w: &mut Wal, from: u64, n: u64, size: usize) {
        let payloads: Vec<Vec<u8>> = (from..from + n).map(|i| vec![(i % 251) as u8; size]).collect();
        let recs: Vec<(u64, &[u8])> = (from..).zip(payloads.iter().map(Vec::as_slice)).collect();
        let files = w.append(&recs).expect("append");
        w.sync_files(&files).expect("sync");
    }

    fn check(w: &Wal, from: u64, to: u64, size: usize) {
        assert_eq!(w.bounds(), Some((from, to)));
        for i in from..=to {
            assert_eq!(w.get(i).expect("get"), Some(vec![(i % 251) as u8; size]), "record {i}");
        }
        assert_eq!(w.get(to + 1).expect("get"), None);
    }

    #[test]
    fn records_survive_a_reopen_across_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = Wal::open(dir.path()).expect("open");
        assert_eq!(w.bounds(), None);
        // 3,000 records of 4 KiB fill three segments.
        append(&mut w, 5, 3_000, 4096);
        check(&w, 5, 3_004, 4096);
        assert!(w.segments.len() >= 3);
        drop(w);
        let w = Wal::open(dir.path()).expect("reopen");
        check(&w, 5, 3_004, 4096);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_zeroed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = Wal::open(dir.path()).expect("open");
        append(&mut w, 1, 10, 100);
        let (off, _) = w.segments[0].records[9];
        let path = w.segments[0].path.clone();
        drop(w);
        // A crash tore the last record's payload.
        let f = OpenOptions::new().write(true).open(&path).expect("segment");
        f.write_all_at(b"xx", off + 50).expect("tear");
        let mut w = Wal::open(dir.path()).expect("reopen");
        check(&w, 1, 9, 100);
        // The log goes on, and a shorter record in the torn one's place reads back after a reopen.
        append(&mut w, 10, 1, 10);
        drop(w);
        let w = Wal::open(dir.path()).expect("reopen");
        assert_eq!(w.bounds(), Some((1, 10)));
        assert_eq!(w.get(10).expect("get"), Some(vec![10u8; 10]));
    }

    #[test]
    fn truncate_and_purge_keep_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = Wal::open(dir.path()).expect("open");
        append(&mut w, 1, 3_000, 4096);
        w.truncate(2_500).expect("truncate");
        check(&w, 1, 2_499, 4096);
        // Records after a truncation are the new ones, also after a reopen.
        append(&mut w, 2_500, 10, 7);
        drop(w);
        let mut w = Wal::open(dir.path()).expect("reopen");
        assert_eq!(w.bounds(), Some((1, 2_509)));
        assert_eq!(w.get(2_505).expect("get"), Some(vec![(2_505 % 251) as u8; 7]));
        w.purge(2_000).expect("purge");
        let (first, last) = w.bounds().expect("records");
        assert!(first > 1 && first <= 2_001, "first {first}");
        assert_eq!(last, 2_509);
        assert_eq!(w.get(2_001).expect("get"), Some(vec![(2_001 % 251) as u8; 4096]));
        // Truncating everything leaves an empty log that takes any index next.
        w.truncate(first).expect("truncate all");
        assert_eq!(w.bounds(), None);
        append(&mut w, 9_000, 2, 3);
        drop(w);
        let w = Wal::open(dir.path()).expect("reopen");
        check(&w, 9_000, 9_001, 3);
    }

    /// A purged segment is kept and made the next one, zeroed in place: the log allocates no new
    /// disk space once it has a spare, and the spare's old records never read back.
    #[test]
    fn a_purged_segment_is_reused_for_the_next_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = Wal::open(dir.path()).expect("open");
        append(&mut w, 1, 2_000, 4096);
        let files = || std::fs::read_dir(dir.path()).expect("dir").count();
        let before = files();
        w.purge(1_500).expect("purge");
        assert!(dir.path().join(SPARE).exists(), "the first purged segment is kept as the spare");
        assert_eq!(files(), before, "the spare replaces the segment it was");
        let spare_inode =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.path().join(SPARE)).expect("spare"));
        // Enough records to need a new segment: it is the spare.
        append(&mut w, 2_001, 1_100, 4096);
        assert!(!dir.path().join(SPARE).exists());
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("segment"));
        assert!(w.segments.iter().any(|s| inode(&s.path) == spare_inode), "the spare became a segment");
        drop(w);
        let w = Wal::open(dir.path()).expect("reopen");
        let (first, last) = w.bounds().expect("records");
        assert!(first > 1 && last == 3_100, "{first}..{last}");
        for i in first..=last {
            assert_eq!(w.get(i).expect("get"), Some(vec![(i % 251) as u8; 4096]), "record {i}");
        }
    }

    #[test]
    fn an_append_replaces_what_it_overlaps_and_may_leave_a_gap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut w = Wal::open(dir.path()).expect("open");
        append(&mut w, 1, 5, 8);
        append(&mut w, 3, 1, 2);
        assert_eq!(w.bounds(), Some((1, 3)));
        assert_eq!(w.get(3).expect("get"), Some(vec![3u8; 2]));
        append(&mut w, 7, 2, 8);
        drop(w);
        let w = Wal::open(dir.path()).expect("reopen");
        assert_eq!(w.bounds(), Some((1, 8)));
        let held: Vec<u64> = w.range(0, 100).expect("range").into_iter().map(|(i, _)| i).collect();
        assert_eq!(held, vec![1, 2, 3, 7, 8]);
        assert_eq!(w.get(5).expect("get"), None);
    }
}
