//! Statahead (Lustre's name for it): a run of lookups in one directory (`stat` of each file by
//! name, a build checking its sources, `ls` without readdirplus) costs a metaserver round trip
//! each. After [`AHEAD_AFTER`] of them in a row in one directory, its entries and their attributes
//! are fetched in one call and answer lookups of names in it for the TTL the kernel may cache the
//! same answers anyway. Any change made through this mount discards every listing (see
//! [`Statahead::changed`]) but the removal of a file's last name, which edits them instead (see
//! [`Statahead::removed`]); a name not in the listing is still looked up, so that files created
//! elsewhere show at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::debug;

use crate::shared::{Attr, FsResult};

/// Lookups in a row in one directory after which its whole listing is fetched.
pub const AHEAD_AFTER: u32 = 8;
/// Directories whose listings are kept at once.
pub const AHEAD_DIRS: usize = 16;
/// Removals kept to take out of a listing being fetched; past this, a removal voids every listing.
const MAX_REMOVED_MEANWHILE: usize = 4096;

/// What a listing fetched ahead says of a name.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The name's attributes, the time left until the listing expires (the kernel may cache the
    /// answer that long, and no longer), and the stamp of [`super::seen::Seen`]'s clock the
    /// listing was asked at (the question this is the answer to).
    Found(Attr, Duration, u64),
    /// A fresh listing lacks the name: ask the metaserver (another mount may have just made it),
    /// but do not count towards fetching the listing again.
    Missing,
    NoListing,
}

struct Listed {
    at: Instant,
    /// The clock stamp the fetch was asked at (see [`Answer::Found`]).
    asked: u64,
    /// The epoch before the fetch: the listing is stale once it moved.
    epoch: u64,
    names: HashMap<Vec<u8>, Attr>,
}

#[derive(Default)]
struct State {
    /// The directory of the last lookup that went to the metaserver, how many did in a row, and the
    /// epoch they saw (a change in between starts a new run: creating files also looks up each name
    /// first, and a listing would be void at the next create).
    streak: (u64, u32, u64),
    /// A directory whose listing is being fetched (one at a time).
    fetching: Option<u64>,
    /// Removals made while it is (see [`Statahead::removed`]): (directory, name, its parent).
    removed_meanwhile: Vec<(u64, Vec<u8>, u64)>,
    listed: HashMap<u64, Listed>,
}

/// A mount's listings fetched ahead, and the epoch of its changes.
pub struct Statahead {
    ttl: Duration,
    clock: Box<dyn Fn() -> Instant + Send + Sync>,
    /// Moves on every change made through this mount (after it is made), so that listings taken
    /// before it are not used.
    epoch: AtomicU64,
    /// Moves on every change made through this mount, removals included (see [`Self::changes`]).
    changes: AtomicU64,
    state: Mutex<State>,
}

impl Statahead {
    /// Listings answer for `ttl` after their fetch began.
    pub fn new(ttl: Duration) -> Self {
        Self::with_clock(ttl, Instant::now)
    }

    /// As [`Statahead::new`], reading the time from `clock` (for tests).
    pub fn with_clock(ttl: Duration, clock: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Statahead {
            ttl,
            clock: Box::new(clock),
            epoch: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that this mount changed something (called after the change, whatever its outcome).
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// How many changes this mount made, removals included: what was read before one may be
    /// stale after it (the mount's directory handles use this; the listings here keep their
    /// epoch across removals, which they edit).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Records that this mount removed `name` from directory `parent` and that it was the inode's
    /// last name; `grandparent` is the directory holding `parent` (from `parent`'s attributes, if
    /// known). Unlike other changes this keeps the listings, and the run of lookups in `parent`
    /// goes on: a loop of removals (`rm` of many files) looks each name up first, and would
    /// otherwise never have a listing to answer from. What the removal changed goes: the name from
    /// `parent`'s listing (the inode had no other name, so no other listing holds it) and the
    /// listing holding `parent` itself (its times changed). A listing being fetched may have been
    /// read before the removal: the same is taken out of it when it comes. (Voiding every listing
    /// instead made a loop of removals in a large directory fetch its whole listing again every
    /// few removals, each fetch void on arrival.)
    pub fn removed(&self, parent: u64, name: &[u8], grandparent: Option<u64>) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        let mut st = self.state();
        let full = st.removed_meanwhile.len() >= MAX_REMOVED_MEANWHILE;
        let Some(grandparent) = grandparent.filter(|_| st.fetching.is_none() || !full) else {
            drop(st);
            return self.changed();
        };
        if st.fetching.is_some() {
            st.removed_meanwhile.push((parent, name.to_vec(), grandparent));
        }
        if let Some(l) = st.listed.get_mut(&parent) {
            l.names.remove(name);
        }
        st.listed.remove(&grandparent);
    }

    /// What a listing of `parent` says of `name`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Answer {
        let epoch = self.epoch.load(Ordering::Acquire);
        let now = (self.clock)();
        let st = self.state();
        let Some(l) = st.listed.get(&parent).filter(|l| l.epoch == epoch) else { return Answer::NoListing };
        let age = now.saturating_duration_since(l.at);
        let Some(left) = super::time_left(self.ttl, age) else { return Answer::NoListing };
        match l.names.get(name) {
            Some(a) => Answer::Found(a.clone(), left, l.asked),
            None => Answer::Missing,
        }
    }

    /// Counts a lookup in `parent` that went to the metaserver. True when the caller should now
    /// fetch `parent`'s listing (with [`Statahead::fetch`]).
    pub fn count_lookup(&self, parent: u64) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut st = self.state();
        if st.streak.0 == parent && st.streak.2 == epoch {
            st.streak.1 += 1;
        } else {
            st.streak = (parent, 1, epoch);
        }
        if st.streak.1 < AHEAD_AFTER || st.fetching.is_some() {
            return false;
        }
        st.fetching = Some(parent);
        st.removed_meanwhile.clear();
        st.streak.1 = 0;
        true
    }

    /// Fetches `parent`'s listing with `list`, a question asked at clock stamp `asked`, and keeps
    /// it (after [`Statahead::count_lookup`] said so).
    pub fn fetch(&self, parent: u64, asked: u64, list: impl FnOnce() -> FsResult<Vec<(Vec<u8>, Attr)>>) {
        // Taken before the call, so that a change made meanwhile (or any time after) voids it.
        let (at, epoch) = ((self.clock)(), self.epoch.load(Ordering::Acquire));
        let r = list();
        let now = (self.clock)();
        let mut st = self.state();
        st.fetching = None;
        let meanwhile = std::mem::take(&mut st.removed_meanwhile);
        let entries = match r {
            Ok(e) => e,
            Err(e) => return debug!(dir = parent, "statahead: {e}"),
        };
        // A directory in it lost a name meanwhile: its times in the listing may be the old ones.
        if meanwhile.iter().any(|&(_, _, grandparent)| grandparent == parent) {
            return;
        }
        let mut names: HashMap<Vec<u8>, Attr> = entries.into_iter().collect();
        for (_, name, _) in meanwhile.iter().filter(|&&(dir, ..)| dir == parent) {
            names.remove(name);
        }
        let ttl = self.ttl;
        st.listed.retain(|_, l| now.saturating_duration_since(l.at) < ttl);
        if st.listed.len() >= AHEAD_DIRS {
            if let Some(oldest) = st.listed.iter().min_by_key(|(_, l)| l.at).map(|(d, _)| *d) {
                st.listed.remove(&oldest);
            }
        }
        st.listed.insert(parent, Listed { at, asked, epoch, names });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::client::fakes::file_attr as attr;
    use crate::shared::FsError;

    const TTL: Duration = Duration::from_secs(1);

    /// A statahead whose clock moves only when the test says.
    fn statahead() -> (Statahead, Arc<Mutex<Instant>>) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock = now.clone();
        (Statahead::with_clock(TTL, move || *clock.lock().expect("clock")), now)
    }

    fn advance(now: &Mutex<Instant>, d: Duration) {
        *now.lock().expect("clock") += d;
    }

    fn listing() -> FsResult<Vec<(Vec<u8>, Attr)>> {
        Ok(vec![(b"a".to_vec(), attr(10)), (b"b".to_vec(), attr(11))])
    }

    /// Counts lookups in `dir` until one says to fetch; returns how many that took.
    fn lookups_until_fetch(s: &Statahead, dir: u64) -> u32 {
        (1..=100).find(|_| s.count_lookup(dir)).expect("a fetch is due")
    }

    #[test]
    fn a_removal_keeps_the_listing_without_the_name_and_the_run_goes_on() {
        let (s, _) = statahead();
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, listing);
        s.removed(5, b"a", Some(1));
        assert_eq!(s.lookup(5, b"a"), Answer::Missing, "the name removed");
        assert!(matches!(s.lookup(5, b"b"), Answer::Found(a, ..) if a.ino == 11), "the others stay");
        // Lookups and removals taking turns (a loop of `rm`) still make a run.
        let (s, _) = statahead();
        let mut n = 0;
        while !s.count_lookup(7) {
            s.removed(7, format!("f{n}").as_bytes(), Some(1));
            n += 1;
            assert!(n < 100, "no fetch with removals in between");
        }
        assert_eq!(n + 1, AHEAD_AFTER as usize);
    }

    #[test]
    fn a_removal_drops_the_listing_holding_the_directory() {
        let (s, _) = statahead();
        lookups_until_fetch(&s, 1);
        s.fetch(1, 0, || Ok(vec![(b"d".to_vec(), attr(5))]));
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, listing);
        s.removed(5, b"a", Some(1));
        assert_eq!(s.lookup(1, b"d"), Answer::NoListing, "the directory's times changed");
        assert!(matches!(s.lookup(5, b"b"), Answer::Found(..)));
    }

    #[test]
    fn a_removal_with_no_grandparent_voids_every_listing() {
        let (s, _) = statahead();
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, listing);
        s.removed(5, b"a", None);
        assert_eq!(s.lookup(5, b"b"), Answer::NoListing);
    }

    /// A listing read before a removal made while it was fetched must not answer for the name
    /// removed, and keeps the others. Every listing was voided: a loop of removals in a directory
    /// of 40,000 files fetched its listing again every few removals, each fetch void on arrival
    /// (10,000 removals, 5,763 pages of 4,096 entries read).
    #[test]
    fn a_removal_during_a_fetch_is_taken_out_of_the_listing_it_brings() {
        let (s, _) = statahead();
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, || {
            s.removed(5, b"a", Some(1));
            listing()
        });
        assert_eq!(s.lookup(5, b"a"), Answer::Missing, "the name removed");
        assert!(matches!(s.lookup(5, b"b"), Answer::Found(a, ..) if a.ino == 11), "the others stay");
        // A listing of the directory that lost a name meanwhile holds its old times: not kept.
        let (s, _) = statahead();
        lookups_until_fetch(&s, 1);
        s.fetch(1, 0, || {
            s.removed(5, b"a", Some(1));
            Ok(vec![(b"d".to_vec(), attr(5))])
        });
        assert_eq!(s.lookup(1, b"d"), Answer::NoListing);
        // Past the bound of removals kept meanwhile, every listing is voided.
        let (s, _) = statahead();
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, || {
            for n in 0..=MAX_REMOVED_MEANWHILE {
                s.removed(5, format!("f{n}").as_bytes(), Some(1));
            }
            listing()
        });
        assert_eq!(s.lookup(5, b"b"), Answer::NoListing);
    }

    #[test]
    fn a_run_of_lookups_in_one_directory_fetches_its_listing_once() {
        let (s, _) = statahead();
        assert_eq!(lookups_until_fetch(&s, 5), AHEAD_AFTER);
        // While that fetch runs, no other starts.
        assert!((0..2 * AHEAD_AFTER).all(|_| !s.count_lookup(5)));
        s.fetch(5, 0, listing);
        assert!(matches!(s.lookup(5, b"a"), Answer::Found(..)));
        // A change voids the listing and starts the run over.
        s.changed();
        assert_eq!(lookups_until_fetch(&s, 5), AHEAD_AFTER);
    }

    #[test]
    fn lookups_in_other_directories_or_across_a_change_break_the_run() {
        let (s, _) = statahead();
        for _ in 0..AHEAD_AFTER - 1 {
            assert!(!s.count_lookup(5));
        }
        assert!(!s.count_lookup(6));
        assert!(!s.count_lookup(5), "the run in 5 started over");
        for _ in 0..AHEAD_AFTER - 2 {
            assert!(!s.count_lookup(5));
        }
        s.changed();
        assert!(!s.count_lookup(5), "a change starts the run over");
    }

    #[test]
    fn a_listing_answers_until_its_ttl_ends_and_no_longer() {
        let (s, now) = statahead();
        // Its answers carry the stamp of the question it answers (Seen orders answers by it).
        s.fetch(5, 42, listing);
        advance(&now, Duration::from_millis(300));
        assert_eq!(s.lookup(5, b"a"), Answer::Found(attr(10), Duration::from_millis(700), 42));
        assert_eq!(s.lookup(5, b"zz"), Answer::Missing);
        assert_eq!(s.lookup(6, b"a"), Answer::NoListing);
        advance(&now, Duration::from_millis(700));
        assert_eq!(s.lookup(5, b"a"), Answer::NoListing);
    }

    #[test]
    fn a_change_through_this_mount_voids_every_listing_even_one_being_fetched() {
        let (s, _) = statahead();
        s.fetch(5, 0, listing);
        s.changed();
        assert_eq!(s.lookup(5, b"a"), Answer::NoListing);
        s.fetch(5, 0, || {
            s.changed();
            listing()
        });
        assert_eq!(s.lookup(5, b"a"), Answer::NoListing);
    }

    #[test]
    fn a_failed_fetch_keeps_nothing_and_allows_the_next() {
        let (s, _) = statahead();
        lookups_until_fetch(&s, 5);
        s.fetch(5, 0, || Err(FsError::Io("down".into())));
        assert_eq!(s.lookup(5, b"a"), Answer::NoListing);
        assert_eq!(lookups_until_fetch(&s, 5), AHEAD_AFTER);
    }

    #[test]
    fn at_most_a_bounded_number_of_listings_are_kept() {
        let (s, now) = statahead();
        for dir in 0..AHEAD_DIRS as u64 + 4 {
            s.fetch(dir, 0, listing);
            advance(&now, Duration::from_millis(1));
        }
        let kept = (0..AHEAD_DIRS as u64 + 4).filter(|&d| s.lookup(d, b"a") != Answer::NoListing).count();
        assert_eq!(kept, AHEAD_DIRS);
        assert_eq!(s.lookup(0, b"a"), Answer::NoListing, "the oldest went first");
    }
}
