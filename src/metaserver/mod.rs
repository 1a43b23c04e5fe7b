//! The metaserver: the namespace (inodes, directory entries, orphans and the cluster layout) in
//! one LMDB store, served over the wire by `wire::meta_service`.

pub mod group;
pub mod journal;
pub mod namespace;
pub mod raft;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::shared::start::{DirLock, StartError};
use group::GroupConfig;
use namespace::{Namespace, Shape};

/// Logs the quorums in effect, with a warning when a read may miss the latest write.
pub(crate) fn warn_quorum(ns: &Namespace) {
    let (q, r) = (ns.quorum(), ns.replicas());
    info!(write_quorum = q.w(r), read_quorum = q.q(r), replicas = r, "quorums");
    if q.may_miss(r) {
        warn!(
            "write quorum {} + read quorum {} <= {r} replicas: a read may miss the latest write until the \
             replicas converge",
            q.w(r),
            q.q(r)
        );
    }
}

/// How long a client session lives without a heartbeat, unless the metaserver is told otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// Runs the metaserver on `addr` with its store in `dir`, until the process ends; client sessions
/// not renewed within `lease` expire.
pub fn run(dir: &Path, shape: Shape, addr: &str, lease: Duration) -> Result<(), StartError> {
    let listener = crate::wire::bind(addr)?;
    let _lock = DirLock::acquire(dir, &format!("the metaserver on {addr}"))?;
    let journal = journal::Journal::open(dir, shape).map_err(|e| StartError::store(dir, e))?;
    let ns = journal.namespace();
    info!(dir = %dir.display(), block_size = ns.block_size(), replicas = ns.replicas(), "metaserver store open");
    warn_quorum(ns);
    crate::wire::serve_metaserver(listener, journal, addr, lease)
}

/// When sessions may be expired: once the server has served for a whole lease (a restarted
/// metaserver, or a new leader, gives every session a full lease to reach it first), counted
/// again from the end of any stretch in which it stood still (the process stopped, its machine
/// paused, its store stalled): no client could renew meanwhile, and their heartbeats wait in its
/// sockets, to be applied after an expiry decided on the renewals from before.
struct Grace {
    since: Instant,
    last: Instant,
}

/// A gap between two of the expirer's looks (one a second) longer than this is standing still
/// (less for a lease shorter than twice as long, but more than the look's own second).
const STILL: Duration = Duration::from_secs(3);

fn still(lease: Duration) -> Duration {
    STILL.min(lease / 2).max(Duration::from_millis(1500))
}

impl Grace {
    fn new(now: Instant) -> Grace {
        Grace { since: now, last: now }
    }

    /// The expirer looks at `now`: whether a whole lease has passed since it started or last
    /// stood still.
    fn look(&mut self, now: Instant, lease: Duration) -> bool {
        if now.saturating_duration_since(self.last) > still(lease) {
            self.since = now;
        }
        self.last = now;
        now.saturating_duration_since(self.since) >= lease
    }
}

/// Which sessions to expire now (see [`Grace`]).
fn stale(ns: &Namespace, grace: &mut Grace, lease: Duration) -> Vec<u64> {
    if !grace.look(Instant::now(), lease) {
        return vec![];
    }
    let lease_ns = i64::try_from(lease.as_nanos()).unwrap_or(i64::MAX);
    ns.stale_sessions(crate::shared::now_ns(), lease_ns).unwrap_or_else(|e| {
        warn!("reading the sessions: {e}");
        vec![]
    })
}

fn expire_change(session: u64, lease: Duration) -> namespace::Change {
    namespace::Change::Expire { session, lease_ns: i64::try_from(lease.as_nanos()).unwrap_or(i64::MAX) }
}

/// How long the answer to a client's last change is kept for a retry of it.
const KEEP_REPLIES: Duration = Duration::from_secs(24 * 3600);
/// How often answers older than that are forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(3600);

fn forget_change() -> namespace::Change {
    let keep = i64::try_from(KEEP_REPLIES.as_nanos()).unwrap_or(i64::MAX);
    namespace::Change::ForgetReplies { before: crate::shared::now_ns().saturating_sub(keep) }
}

/// Expires the sessions of a metaserver on its own, checking every second, and forgets old
/// clients' last answers every hour.
pub async fn expire_sessions(journal: Arc<journal::Journal>, lease: Duration) {
    let mut grace = Grace::new(Instant::now());
    let mut forgot = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A journal held up by its disk stands still too, though this task goes on looking: the
        // heartbeats wait behind the commit under way.
        if journal.busy_for() > Duration::from_secs(1) {
            grace = Grace::new(Instant::now());
            continue;
        }
        for s in stale(journal.namespace(), &mut grace, lease) {
            if let Err(e) = journal.apply(None, expire_change(s, lease)).await.unwrap_or_else(Err) {
                warn!(session = format_args!("{s:#x}"), "expiring a session: {e}");
            }
            // An expiry that waited long: the others are looked at again after a new grace.
            if !grace.look(Instant::now(), lease) {
                break;
            }
        }
        if forgot.elapsed() >= FORGET_EVERY {
            forgot = Instant::now();
            if let Err(e) = journal.apply(None, forget_change()).await.unwrap_or_else(Err) {
                warn!("forgetting old clients' answers: {e}");
            }
        }
    }
}

/// Expires the sessions of a group while this member leads it, checking every second, and forgets
/// old clients' last answers every hour.
pub async fn expire_sessions_in_group(member: Arc<raft::member::Member>, lease: Duration) {
    let mut leading: Option<Grace> = None;
    let mut forgot = Instant::now();
    // The expiries are changes of this member's own client, numbered from the clock so that a
    // restarted member's numbers still grow.
    let client: u64 = rand::random();
    let mut seq = crate::shared::now_ns().max(0) as u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A leader that hears from no majority commits nothing, heartbeats included: as a
        // journal held up by its disk, it stands still, and its sessions get a whole lease again
        // once it can commit (openraft leaves it leading while both its followers are down).
        if !member.is_leader() || member.isolated_for_ms().is_some() {
            leading = None;
            continue;
        }
        let grace = leading.get_or_insert_with(|| Grace::new(Instant::now()));
        let mut write = |change: namespace::Change| {
            seq += 1;
            let what = format!("{change:?}");
            let done = member.write(client, seq, change);
            async move {
                match done.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!("{what}: {e}"),
                    Err(e) => warn!("{what}: {e}"),
                }
            }
        };
        for s in stale(member.local(), grace, lease) {
            write(expire_change(s, lease)).await;
            // As a metaserver on its own: an expiry that waited long stops the others.
            if !grace.look(Instant::now(), lease) {
                break;
            }
        }
        if forgot.elapsed() >= FORGET_EVERY {
            forgot = Instant::now();
            write(forget_change()).await;
        }
    }
}

/// Runs member `id` of the metaserver group `group` with its stores in `dir`, until the process
/// ends. The group forms itself the first time its member 0 starts.
pub fn run_member(dir: &Path, shape: Shape, group: &GroupConfig, id: usize, lease: Duration) -> Result<(), StartError> {
    let addr = group.member(id).map_err(|e| StartError::store(dir, e))?.to_string();
    let listener = crate::wire::bind(&addr)?;
    let _lock = DirLock::acquire(dir, &format!("metaserver group member {id} on {addr}"))?;
    info!(dir = %dir.display(), member = id, members = group.members.len(), "metaserver group member starting");
    crate::wire::serve_metaserver_member(listener, dir, shape, group, id, lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_only_a_whole_lease_after_the_server_started_or_stood_still() {
        let lease = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = Grace::new(t0);
        assert!(!g.look(at(1), lease));
        assert!((2..10).all(|s| !g.look(at(s), lease)));
        assert!(g.look(at(10), lease));
        assert!(g.look(at(11), lease));
        // Stood still from 11 s to 30 s (nothing looked): a whole lease again from 30 s.
        assert!(!g.look(at(30), lease));
        assert!((31..40).all(|s| !g.look(at(s), lease)));
        assert!(g.look(at(40), lease));
        // Looks a few seconds apart (a slow expiry in between) are not standing still.
        assert!(g.look(at(43), lease));
        // With a lease of 2 s, a pause of 2 s is standing still.
        let short = Duration::from_secs(2);
        let mut g = Grace::new(t0);
        assert!(!g.look(at(1), short) && g.look(at(2), short) && g.look(at(3), short));
        assert!(!g.look(at(6), short), "a gap of 3 s with a lease of 2 s");
    }
}
