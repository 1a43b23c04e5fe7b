//! Which pages of the block store's map a read brings in from disk.
//!
//! LMDB reads through a memory map, and a fault on a page that is not in memory makes the kernel
//! read the pages around it too (its read-around for maps: the device's read-ahead, centred on
//! the fault). A store holds the blocks of R consecutive replica positions interleaved, in the
//! order they were written, so a server asked for every R-th block of a range read all of it from
//! disk: a cold read of a file moved R times its size (and more) off the disk.
//!
//! The store's map is opened without that read-around (LMDB's `MDB_NORDAHEAD`), and reads say
//! what they need instead. A get of several blocks asks for just the pages of their values, with
//! neighbours merged into one read (the client asks each server for runs of blocks it holds one
//! after the other, so they lie together on its disk). A get of one block, and a scan of the store,
//! read around as the kernel would have: random reads and listings keep the pages near them, as
//! before. Pages already in memory cost no I/O either way.

use std::ops::Range;
use std::path::Path;

/// Values closer than this on disk are read as one span (and the gap with them).
const MERGE_GAP: usize = 64 << 10;
/// The read-around when the device's cannot be found (the kernel's default read-ahead).
const DEFAULT_WINDOW: usize = 128 << 10;

/// The store's map and the read-around to emulate. Only advice: any failure to find or use them
/// costs speed, never correctness.
#[derive(Debug)]
pub struct ReadAhead {
    /// The map's address range (empty when it was not found: no advice is given).
    map: Range<usize>,
    page: usize,
    window: usize,
}

impl ReadAhead {
    /// For the LMDB environment whose data file is `data` (already open and mapped).
    pub fn of(data: &Path) -> ReadAhead {
        // SAFETY: sysconf reads a constant of the system; it touches no memory of ours.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let map = find_map(data).unwrap_or(0..0);
        if map.is_empty() {
            tracing::warn!(file = %data.display(), "the store's map was not found; reads go without read-ahead advice");
        }
        ReadAhead { map, page, window: device_read_ahead(data).unwrap_or(DEFAULT_WINDOW) }
    }

    /// Reads in the pages of `values` (slices of the map) not yet in memory, each run of values
    /// that lie within [`MERGE_GAP`] of each other as one span.
    pub fn spans<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) {
        let spans =
            values.into_iter().filter(|v| !v.is_empty()).map(|v| v.as_ptr() as usize..v.as_ptr() as usize + v.len());
        self.advise(spans, MERGE_GAP);
    }

    /// Reads in the pages that hold the first `len` bytes of each value starting at the addresses
    /// `starts` (a scan that needs only the values' headers), each page on its own: the disk
    /// serves them together, and the data pages between them stay where they are.
    pub fn heads(&self, starts: &[usize], len: usize) {
        self.advise(starts.iter().map(|&at| at..at.saturating_add(len)), 0);
    }

    /// Asks for the pages of `ranges` (addresses in the map), those within `gap` of each other as
    /// one read.
    fn advise(&self, ranges: impl Iterator<Item = Range<usize>>, gap: usize) {
        for span in merged(ranges.map(|r| self.pages_of(r)).collect(), gap) {
            self.will_need(span);
        }
    }

    /// What the kernel's read-around would do for a fault on `value`'s first page: if that page is
    /// not in memory, reads in the window around it. `asked` is what was asked so far in the same
    /// pass (a scan, which goes up the store): nothing in it is asked again, and once the pass is
    /// within half a window of its end the next window is asked, so that the disk reads it while
    /// the pass goes through the pages before it (as the kernel's asynchronous read-ahead does).
    pub fn around(&self, value: &[u8], asked: &mut Range<usize>) {
        let at = value.as_ptr() as usize;
        if value.is_empty() || !self.map.contains(&at) {
            return;
        }
        let half = self.window / 2;
        if asked.contains(&at) {
            if at >= asked.end.saturating_sub(half) && asked.end < self.map.end {
                let next = self.pages_of(asked.end..asked.end.saturating_add(self.window));
                asked.end = next.end;
                self.will_need(next);
            }
            return;
        }
        if self.resident(at) {
            return;
        }
        let span = self.pages_of(at.saturating_sub(half)..at.saturating_add(half));
        *asked = span.clone();
        self.will_need(span);
    }

    /// The whole pages of the map that `r` touches.
    fn pages_of(&self, r: Range<usize>) -> Range<usize> {
        let start = r.start.max(self.map.start) / self.page * self.page;
        let end = r.end.min(self.map.end).div_ceil(self.page) * self.page;
        start..end.max(start)
    }

    fn resident(&self, at: usize) -> bool {
        let page = at / self.page * self.page;
        let mut vec = 0u8;
        // SAFETY: one page of the map, which stays mapped while the store is open; `vec` has room
        // for the one byte mincore writes per page.
        let r = unsafe { libc::mincore(page as *mut libc::c_void, self.page, &mut vec) };
        r == 0 && vec & 1 == 1
    }

    /// How many of the pages that `value` (a slice of the map) touches are in memory.
    #[cfg(test)]
    pub(crate) fn pages_in_memory(&self, value: &[u8]) -> usize {
        let span = self.pages_of(value.as_ptr() as usize..value.as_ptr() as usize + value.len());
        span.step_by(self.page).filter(|&p| self.resident(p)).count()
    }

    /// Whether the page at address `at` is in memory.
    #[cfg(test)]
    pub(crate) fn page_in_memory(&self, at: usize) -> bool {
        self.resident(at)
    }

    fn will_need(&self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        // SAFETY: MADV_WILLNEED only starts reads of file pages into the page cache; it changes
        // no memory, and the range lies within the store's map (clipped by `pages_of`).
        unsafe { libc::madvise(r.start as *mut libc::c_void, r.len(), libc::MADV_WILLNEED) };
    }
}

/// `spans` in address order, those within `gap` of each other (or overlapping) made one; empty
/// ones left out.
fn merged(mut spans: Vec<Range<usize>>, gap: usize) -> Vec<Range<usize>> {
    spans.retain(|r| !r.is_empty());
    spans.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for r in spans {
        match out.last_mut() {
            Some(m) if r.start <= m.end + gap => m.end = m.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The address range at which this process maps `data`, from `/proc/self/maps`.
fn find_map(data: &Path) -> Option<Range<usize>> {
    let data = std::fs::canonicalize(data).ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // start-end perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let path = fields.nth(4)?.trim_start();
        if Path::new(path) != data {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some(usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?)
    })
}

/// The read-ahead of the block device holding `file`, in bytes (its queue's `read_ahead_kb`, or
/// that of the disk a partition belongs to).
fn device_read_ahead(file: &Path) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    ["queue/read_ahead_kb", "../queue/read_ahead_kb"].iter().find_map(|q| {
        let kb: usize = std::fs::read_to_string(format!("{base}/{q}")).ok()?.trim().parse().ok()?;
        (kb > 0).then_some(kb << 10)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_close_on_disk_are_read_as_one_span_and_distant_ones_apart() {
        let g = MERGE_GAP;
        let spans = vec![5 * g..6 * g, 0..100, 100 + g..200 + g, 7 * g..7 * g, 150..300, 6 * g + g + 1..8 * g];
        assert_eq!(merged(spans.clone(), g), vec![0..200 + g, 5 * g..6 * g, 7 * g + 1..8 * g]);
        assert_eq!(merged(spans, 0), vec![0..100, 150..300, 100 + g..200 + g, 5 * g..6 * g, 7 * g + 1..8 * g]);
        assert_eq!(merged(vec![], g), Vec::<Range<usize>>::new());
    }

    #[test]
    fn a_mapped_file_is_found_and_its_spans_stay_inside_the_map() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("data.mdb");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        // SAFETY: a read-only mapping of a file this test owns.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let ra = ReadAhead::of(&path);
        assert_eq!(ra.map, p as usize..p as usize + (1 << 20));
        // A span reaching past the map is cut at its end; one before it, at its start.
        assert_eq!(ra.pages_of(p as usize + 100..p as usize + (2 << 20)), p as usize..p as usize + (1 << 20));
        assert_eq!(ra.pages_of(p as usize - 8192..p as usize + 1), p as usize..p as usize + ra.page);
        // SAFETY: the test's own slice of the mapping above.
        let v = unsafe { std::slice::from_raw_parts((p as usize + 5000) as *const u8, 10) };
        ra.spans([v, v]);
        let mut last = 0..0;
        ra.around(v, &mut last);
        assert!(last.is_empty() || (last.start >= ra.map.start && last.end <= ra.map.end));
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(p, 1 << 20) };
    }
}
