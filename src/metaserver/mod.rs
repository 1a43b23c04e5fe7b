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

/// Which sessions to expire now: none until this server has served for a whole lease (a restarted
/// metaserver, or a new leader, gives every session a full lease to reach it first).
fn stale(ns: &Namespace, serving_since: Instant, lease: Duration) -> Vec<u64> {
    if serving_since.elapsed() < lease {
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
    let since = Instant::now();
    let mut forgot = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for s in stale(journal.namespace(), since, lease) {
            if let Err(e) = journal.apply(None, expire_change(s, lease)).await.unwrap_or_else(Err) {
                warn!(session = format_args!("{s:#x}"), "expiring a session: {e}");
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
    let mut leading: Option<Instant> = None;
    let mut forgot = Instant::now();
    // The expiries are changes of this member's own client, numbered from the clock so that a
    // restarted member's numbers still grow.
    let client: u64 = rand::random();
    let mut seq = crate::shared::now_ns().max(0) as u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !member.is_leader() {
            leading = None;
            continue;
        }
        let since = *leading.get_or_insert_with(Instant::now);
        let mut changes: Vec<namespace::Change> =
            stale(member.local(), since, lease).into_iter().map(|s| expire_change(s, lease)).collect();
        if forgot.elapsed() >= FORGET_EVERY {
            forgot = Instant::now();
            changes.push(forget_change());
        }
        for change in changes {
            seq += 1;
            let what = format!("{change:?}");
            match member.write(client, seq, change).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("{what}: {e}"),
                Err(e) => warn!("{what}: {e}"),
            }
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
