//! Freeing deleted files' blocks. A file whose last name went is an orphan on the metaserver; its
//! blocks are freed once nobody here has it open (POSIX: an unlinked file stays readable while
//! open), by a background thread, so that unlink does not wait for every dataserver. Orphans
//! queued together go in one batch: a batch costs one commit per server, so a burst of deletes
//! does not put several commits per file on the disks behind the unlinks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::shared::FsResult;

/// Most orphans freed together.
pub const BATCH: usize = 4096;
/// How long the first orphan of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Open handles per inode, and the orphans waiting for their last close.
pub struct Reclaim {
    opens: Mutex<HashMap<u64, u32>>,
    /// Changes whenever the set of open inodes may have (for the session's reports).
    generation: AtomicU64,
    doomed: Mutex<HashSet<u64>>,
    queue: Mutex<mpsc::Sender<u64>>,
    /// Orphans handed over by the metaserver and not freed yet (it hands them again until then).
    offered: Arc<Mutex<HashSet<u64>>>,
}

/// An orphan whose last handle here closed: [`Freeing::free`] queues it (once its writes landed).
pub struct Freeing {
    ino: u64,
    queue: mpsc::Sender<u64>,
}

impl Freeing {
    pub fn free(self) {
        let _ = self.queue.send(self.ino);
    }
}

/// How long a batch that failed waits before it is tried again; the wait doubles with each
/// failure, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// A batch that failed, to be tried again at `due`.
struct Failed {
    inos: Vec<u64>,
    due: Instant,
    wait: Duration,
}

impl Reclaim {
    /// Starts the thread that frees queued orphans, in batches, with `free` (delete the blocks,
    /// then forget the orphans). A batch that fails is tried again on its own (so that one orphan
    /// that keeps failing holds up no other), after a wait that doubles each time: the metaserver
    /// offers an orphan again only once its remover's session is gone, so without this a delete
    /// that met a full disk or a dataserver's error kept its blocks until a collection.
    pub fn start(free: impl Fn(Vec<u64>) -> FsResult<()> + Send + 'static) -> std::io::Result<Reclaim> {
        let (tx, rx) = mpsc::channel::<u64>();
        let offered: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let done = offered.clone();
        std::thread::Builder::new().name("dfs-reclaim".into()).spawn(move || {
            let mut failed: Vec<Failed> = Vec::new();
            let run = |inos: Vec<u64>, wait: Duration, failed: &mut Vec<Failed>| {
                let (count, first) = (inos.len(), inos[0]);
                match free(inos.clone()) {
                    Ok(()) => debug!(inodes = count, "reclaimed"),
                    Err(e) => {
                        warn!(inodes = count, first, "reclaiming failed: {e}; tried again in {wait:?}");
                        let next = (wait * 2).min(RETRY_MAX);
                        failed.push(Failed { inos, due: Instant::now() + wait, wait: next });
                        return;
                    }
                }
                let mut offered = lock(&done);
                for ino in inos {
                    offered.remove(&ino);
                }
            };
            loop {
                let next = match failed.iter().map(|f| f.due).min() {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(due) => rx.recv_timeout(due.saturating_duration_since(Instant::now())),
                };
                match next {
                    Ok(first) => {
                        let mut batch = vec![first];
                        let until = Instant::now() + LINGER;
                        while batch.len() < BATCH {
                            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                                Ok(ino) => batch.push(ino),
                                Err(_) => break,
                            }
                        }
                        run(batch, RETRY_FIRST, &mut failed);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // The mount is going: what failed stays orphaned, and the metaserver offers it
                    // to the other sessions once this one is gone.
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                let now = Instant::now();
                while let Some(k) = failed.iter().position(|f| f.due <= now) {
                    let f = failed.swap_remove(k);
                    run(f.inos, f.wait, &mut failed);
                }
            }
        })?;
        Ok(Reclaim {
            opens: Mutex::default(),
            generation: AtomicU64::new(0),
            doomed: Mutex::default(),
            queue: Mutex::new(tx),
            offered,
        })
    }

    pub fn opened(&self, ino: u64) {
        let mut opens = lock(&self.opens);
        *opens.entry(ino).or_default() += 1;
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// How many handles of `ino` are open here.
    pub fn open_count(&self, ino: u64) -> u32 {
        lock(&self.opens).get(&ino).copied().unwrap_or(0)
    }

    /// The inodes open here, and a number that changes whenever the set may have changed.
    pub fn open_inodes(&self) -> (u64, Vec<u64>) {
        let opens = lock(&self.opens);
        (self.generation.load(Ordering::Relaxed), opens.keys().copied().collect())
    }

    /// Orphans the metaserver says nobody has open: freed (at their last close here, if one was
    /// opened here since), unless already on their way.
    pub fn offered(&self, inos: Vec<u64>) {
        for ino in inos {
            if lock(&self.offered).insert(ino) {
                self.orphaned(ino);
            }
        }
    }

    /// A handle of `ino` closed. On its last close here, runs `last` (under the lock, so that no
    /// open comes in between) and, if the file was orphaned while open, returns it for freeing.
    pub fn closed(&self, ino: u64, last: impl FnOnce()) -> Option<Freeing> {
        {
            let mut opens = lock(&self.opens);
            let n = opens.entry(ino).or_default();
            *n = n.saturating_sub(1);
            if *n > 0 {
                return None;
            }
            opens.remove(&ino);
            self.generation.fetch_add(1, Ordering::Relaxed);
            last();
        }
        lock(&self.doomed).remove(&ino).then(|| Freeing { ino, queue: lock(&self.queue).clone() })
    }

    /// `ino` lost its last name (0: nothing was orphaned): freed now, or at its last close here.
    pub fn orphaned(&self, ino: u64) {
        if ino == 0 {
            return;
        }
        // Doomed under the opens lock: a last close between the look and the mark would find it
        // not doomed, and nothing would free it (the test widens that gap).
        let opens = lock(&self.opens);
        if opens.get(&ino).copied().unwrap_or(0) > 0 {
            #[cfg(test)]
            std::thread::sleep(Duration::from_micros(20));
            lock(&self.doomed).insert(ino);
        } else {
            drop(opens);
            let _ = lock(&self.queue).send(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::FsError;

    /// A reclaimer whose batches arrive on the returned channel; batches containing `fail` fail.
    fn reclaimer(fail: u64) -> (Reclaim, mpsc::Receiver<Vec<u64>>) {
        reclaimer_failing(move |batch| batch.contains(&fail))
    }

    /// A reclaimer whose batches arrive on the returned channel; those `fails` says fail.
    fn reclaimer_failing(fails: impl Fn(&[u64]) -> bool + Send + 'static) -> (Reclaim, mpsc::Receiver<Vec<u64>>) {
        let (tx, rx) = mpsc::channel();
        let r = Reclaim::start(move |batch| {
            let failed = fails(&batch);
            let _ = tx.send(batch);
            if failed {
                Err(FsError::Io("dataserver down".into()))
            } else {
                Ok(())
            }
        })
        .expect("start");
        (r, rx)
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_burst_of_orphans_is_freed_in_one_batch() {
        let (r, rx) = reclaimer(0);
        for ino in [7, 8, 9] {
            r.orphaned(ino);
        }
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![7, 8, 9]);
        assert!(rx.recv_timeout(LINGER * 4).is_err(), "one batch only");
    }

    #[test]
    fn an_open_orphan_is_freed_only_after_its_last_close() {
        let (r, rx) = reclaimer(0);
        r.opened(5);
        r.opened(5);
        r.orphaned(5);
        assert!(rx.recv_timeout(LINGER * 4).is_err(), "freed while open");
        let mut ran = false;
        assert!(r.closed(5, || ran = true).is_none());
        assert!(!ran, "not the last close");
        let freeing = r.closed(5, || ran = true).expect("the last close frees it");
        assert!(ran);
        assert!(rx.recv_timeout(LINGER * 4).is_err(), "freed before its writes landed");
        freeing.free();
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![5]);
    }

    /// The last close and the removal racing: the orphan is freed exactly once either way, never
    /// left behind (the removal saw it open, the close had not yet seen it doomed).
    #[test]
    fn a_last_close_racing_the_removal_frees_the_orphan() {
        let (r, rx) = reclaimer(0);
        let r = Arc::new(r);
        const ROUNDS: u64 = 2_000;
        let (r2, go) = (r.clone(), Arc::new(std::sync::Barrier::new(2)));
        let go2 = go.clone();
        let closer = std::thread::spawn(move || {
            let mut freed = 0;
            for ino in 1..=ROUNDS {
                go2.wait();
                if let Some(f) = r2.closed(ino, || {}) {
                    f.free();
                    freed += 1;
                }
            }
            freed
        });
        for ino in 1..=ROUNDS {
            r.opened(ino);
            go.wait();
            r.orphaned(ino);
        }
        closer.join().expect("closer");
        let mut seen = HashSet::new();
        while seen.len() < ROUNDS as usize {
            let Ok(batch) = rx.recv_timeout(WAIT) else { break };
            seen.extend(batch);
        }
        let left: Vec<u64> = (1..=ROUNDS).filter(|i| !seen.contains(i)).take(5).collect();
        assert!(left.is_empty(), "orphans never freed, such as {left:?}");
    }

    #[test]
    fn closing_a_file_that_still_has_a_name_frees_nothing() {
        let (r, rx) = reclaimer(0);
        r.opened(5);
        assert!(r.closed(5, || {}).is_none());
        r.orphaned(0);
        assert!(rx.recv_timeout(LINGER * 4).is_err());
    }

    /// A batch that failed is tried again, on its own, and freed once freeing works: nothing else
    /// would free it while its remover's session lives.
    #[test]
    fn a_failed_batch_is_tried_again_until_it_is_freed() {
        // Freeing 3 fails twice.
        let tries = AtomicU64::new(0);
        let (r, rx) = reclaimer_failing(move |batch| batch.contains(&3) && tries.fetch_add(1, Ordering::Relaxed) < 2);
        r.offered(vec![3]);
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![3]);
        let failed = Instant::now();
        r.orphaned(4);
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![4], "new orphans go on their own");
        assert_eq!(rx.recv_timeout(WAIT).expect("the first retry"), vec![3]);
        assert!(failed.elapsed() >= RETRY_FIRST / 2, "tried again at once: {:?}", failed.elapsed());
        let failed = Instant::now();
        assert_eq!(rx.recv_timeout(WAIT).expect("the second retry"), vec![3]);
        assert!(failed.elapsed() >= RETRY_FIRST * 3 / 2, "the wait did not double: {:?}", failed.elapsed());
        // Freed: no longer on its way, so the metaserver's next offer would queue it again.
        let freed = Instant::now() + WAIT;
        while lock(&r.offered).contains(&3) && Instant::now() < freed {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!lock(&r.offered).contains(&3), "a freed orphan is still marked on its way");
    }

    #[test]
    fn a_failed_batch_does_not_stop_the_next() {
        let (r, rx) = reclaimer(3);
        r.orphaned(3);
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![3]);
        r.orphaned(4);
        assert_eq!(rx.recv_timeout(WAIT).expect("a batch"), vec![4]);
    }
}
