//! One member of a metaserver group: its stores, its Raft instance, and the two things the
//! service asks of it: apply a client's change through the log (on the leader), and read the
//! namespace linearizably (the leader confirms its term with a majority first, so a deposed
//! leader never answers from a stale namespace). A member that is not the leader says who is.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::log_store::LogStore;
use super::state_machine::{checkpoint, Checkpointed, StateMachine};
use super::{NodeId, Raft, Request, Response, TypeConfig};
use crate::metaserver::namespace::{Change, Namespace, OpenError, Outcome, MAX_ENCODED};
use crate::shared::FsResult;

/// Why a member could not answer a request; the client tries another member or waits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum GroupError {
    /// This member is not the leader; `leader` is the one it knows of, if any (during an
    /// election, none).
    #[error("not the leader (the leader is {})", leader.as_ref().map_or("unknown".to_string(), |(id, a)| format!("member {id} at {a}")))]
    NotLeader { leader: Option<(NodeId, String)> },
    /// The member cannot answer now (no majority, shutting down).
    #[error("the group cannot answer: {0}")]
    Unavailable(String),
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the metadata store: {0}")]
    Namespace(#[from] OpenError),
    #[error("the Raft log store: {0}")]
    Log(#[from] crate::shared::db::DbError),
    #[error("Raft: {0}")]
    Raft(String),
}

/// The Raft timing of a group: heartbeats every 50 ms. A follower stands for election once it has
/// heard no leader for its lease (the longest election timeout, 0.4 s) and then a random election
/// timeout (0.2-0.4 s): a dead leader is replaced within about a second.
pub fn raft_config() -> Config {
    Config {
        cluster_name: "dfs-metaservers".into(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        install_snapshot_timeout: 5_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
}

/// Most entries a leader sends a follower in one message. An entry holds a client's change (at
/// most [`MAX_ENCODED`] bytes) or a batch of them (at most [`BATCH_BYTES`]): sixteen of either,
/// twice over for the encodings around them, fit in a message.
const MAX_PAYLOAD_ENTRIES: u64 = 16;
const _: () = assert!(
    MAX_PAYLOAD_ENTRIES as usize * 2 * if MAX_ENCODED > BATCH_BYTES { MAX_ENCODED } else { BATCH_BYTES }
        <= crate::wire::net::MAX_MESSAGE_BYTES
);

/// A leader that has heard from no majority for this long stands aside: it answers no client (they
/// go to the others, who elect a new leader) until it hears from a majority again. openraft 0.9
/// keeps such a leader's role until it learns of a newer term; this keeps its clients from
/// waiting on it.
pub const ISOLATED_AFTER_MS: u64 = 1_000;

/// A leader answers reads from its own namespace while a majority acknowledged it this recently:
/// half the followers' leader lease (the longest election timeout), the other half a margin.
const LEASE_READ_MS: u64 = 200;

// A leader stands aside only after its lease reads have long stopped.
const _: () = assert!(ISOLATED_AFTER_MS > LEASE_READ_MS);

/// Longest a change waits for a majority on this member before the client is sent elsewhere.
/// Safe to retry: the client resends with the same sequence number, applied once.
const WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Member {
    pub id: NodeId,
    pub raft: Raft,
    sm: StateMachine,
    /// To the task that proposes clients' changes to the log (see [`propose`]).
    proposals: mpsc::UnboundedSender<Proposal>,
    /// When a majority last acknowledged this member as leader (see [`Member::acked_ago`]).
    acked: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// The log, for tests that hold up its syncs.
    #[cfg(test)]
    pub(super) log: LogStore,
}

/// What a client's change answered, or why the group could not answer it.
type Answered = Result<FsResult<Outcome>, GroupError>;

/// A client's change waiting to be proposed, its encoded size, and where its answer goes.
struct Proposal {
    req: Request,
    size: usize,
    answer: oneshot::Sender<Answered>,
}

/// Most entries of clients' changes proposed and not answered yet. openraft 0.9 syncs each
/// proposal on the leader before it takes the next (and before it sends it to the followers), so
/// changes that come while the ones before are in flight wait and go together, in one entry: one
/// sync on each member for all of them. Two in flight: one syncing on the leader, one on the
/// followers.
const IN_FLIGHT: usize = 2;

/// Most bytes of changes in one batch; a change larger than this goes alone. The leader sends
/// a follower that lags up to `max_payload_entries` entries in one message, which must stay well
/// within a message's limit (`wire::net::reader_options`).
const BATCH_BYTES: usize = 256 << 10;

/// Proposes the changes `rx` brings to `raft`'s log, in the order they came: one at a time while
/// fewer than [`IN_FLIGHT`] are in flight, and those that came meanwhile together.
async fn propose(raft: Raft, mut rx: mpsc::UnboundedReceiver<Proposal>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // A member that does not lead is answered at once (the leader's address): it takes no
        // slot, and waits for none.
        let leading = state(&raft.metrics()) == openraft::ServerState::Leader;
        let slot = match leading {
            true => match slots.clone().acquire_owned().await {
                Ok(slot) => Some(slot),
                Err(_) => return,
            },
            false => None,
        };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            if bytes + p.size > BATCH_BYTES {
                next = Some(p);
                break;
            }
            bytes += p.size;
            batch.push(p);
        }
        let (mut reqs, answers): (Vec<Request>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.answer)).unzip();
        let entry = match reqs.len() {
            // Alone, a change's entry is as it always was.
            1 => reqs.remove(0),
            _ => Request { client: 0, seq: 0, now: crate::shared::now_ns(), change: Change::Batch { requests: reqs } },
        };
        // Sent from this one task, one after the other, so the log takes them in this order.
        let answer = match raft.client_write_ff(entry).await {
            Ok(answer) => answer,
            Err(e) => {
                let why = GroupError::Unavailable(e.to_string());
                answers.into_iter().for_each(|a| drop(a.send(Err(why.clone()))));
                continue;
            }
        };
        tokio::spawn(async move {
            // openraft 0.9 may never answer a proposal: not one whose entry a snapshot from a new
            // leader replaced (this member was deposed while it was in flight). The slot is
            // given back when the caller stops waiting, so such an entry cannot hold it.
            let written = tokio::time::timeout(WRITE_LIMIT, answer).await;
            drop(slot);
            let results: Vec<Answered> = match written {
                Err(_) => {
                    let why = format!("no majority took the change within {WRITE_LIMIT:?}");
                    vec![Err(GroupError::Unavailable(why)); answers.len()]
                }
                Ok(Err(_)) => vec![Err(GroupError::Unavailable("the Raft core stopped".into())); answers.len()],
                Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => vec![Err(forwarded(&f)); answers.len()],
                Ok(Ok(Err(e))) => vec![Err(GroupError::Unavailable(e.to_string())); answers.len()],
                Ok(Ok(Ok(resp))) => match resp.data {
                    Response::Applied(r) if answers.len() == 1 => vec![Ok(r)],
                    Response::Many(rs) if rs.len() == answers.len() => rs.into_iter().map(Ok).collect(),
                    other => {
                        let why = format!("{} changes answered {other:?}", answers.len());
                        vec![Err(GroupError::Unavailable(why)); answers.len()]
                    }
                },
            };
            for (a, r) in answers.into_iter().zip(results) {
                let _ = a.send(r);
            }
        });
    }
}

type MembershipResult =
    Result<openraft::raft::ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>;

fn membership_result(r: MembershipResult) -> Result<(), GroupError> {
    match r {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(forwarded(&f)),
        Err(e) => Err(GroupError::Unavailable(e.to_string())),
    }
}

fn forwarded(f: &ForwardToLeader<NodeId, BasicNode>) -> GroupError {
    GroupError::NotLeader { leader: f.leader_id.zip(f.leader_node.as_ref().map(|n| n.addr.clone())) }
}

/// How often a member's namespace is checkpointed: at most this much applying is redone after a
/// crash.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Checkpoints the namespace every [`CHECKPOINT_EVERY`] while it is open.
async fn checkpoints(ns: std::sync::Weak<Namespace>, to: Checkpointed) {
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        let Some(ns) = ns.upgrade() else { return };
        let to = to.clone();
        match tokio::task::spawn_blocking(move || checkpoint(&ns, &to)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("checkpointing the namespace: {e}"),
            Err(e) => tracing::warn!("checkpointing the namespace: {e}"),
        }
    }
}

impl Member {
    /// Starts member `id` of the group `members` (addresses by id) with its stores under `dir`.
    /// The group forms itself: member 0 proposes the membership the first time it starts.
    pub async fn start<N: RaftNetworkFactory<TypeConfig>>(
        id: NodeId,
        members: &[String],
        dir: &Path,
        shape: crate::metaserver::namespace::Shape,
        network: N,
    ) -> Result<Member, StartError> {
        // Whatever the namespace applied since its last checkpoint can be applied again from the
        // log (the state machine records what it applied in the same commit), so applying need
        // not wait for the disk.
        let durability = crate::shared::db::Durability::Checkpointed;
        let ns = Arc::new(Namespace::open_with(&dir.join("meta"), shape, durability)?);
        crate::metaserver::warn_quorum(&ns);
        let log = LogStore::open(&dir.join("raft"))?;
        let weak = Arc::downgrade(&ns);
        let sm = StateMachine::new(ns);
        tokio::spawn(checkpoints(weak, sm.checkpointed().clone()));
        log.purge_only_behind(sm.checkpointed().subscribe(), sm.install_failed());
        let config = Arc::new(raft_config().validate().map_err(|e| StartError::Raft(e.to_string()))?);
        #[cfg(test)]
        let kept = log.clone();
        let raft =
            Raft::new(id, config, network, log, sm.clone()).await.map_err(|e| StartError::Raft(e.to_string()))?;
        if id == 0 && !raft.is_initialized().await.map_err(|e| StartError::Raft(e.to_string()))? {
            let all: BTreeMap<NodeId, BasicNode> =
                members.iter().enumerate().map(|(i, a)| (i as NodeId, BasicNode::new(a))).collect();
            raft.initialize(all).await.map_err(|e| StartError::Raft(e.to_string()))?;
        }
        let mut metrics = raft.metrics();
        let acked = Arc::new(std::sync::Mutex::new(None));
        let acks = acked.clone();
        tokio::spawn(async move {
            let mut known = None;
            while metrics.changed().await.is_ok() {
                let (leader, term, ago) = {
                    let m = metrics.borrow();
                    (m.current_leader, m.current_term, m.millis_since_quorum_ack)
                };
                // The metrics give the time since the last acknowledgement as of when they were
                // published; turned into an instant here, so that it ages while the Raft core
                // publishes nothing (waiting for its disk).
                let now = std::time::Instant::now();
                *acks.lock().unwrap_or_else(|p| p.into_inner()) =
                    ago.map(|ms| now.checked_sub(std::time::Duration::from_millis(ms)).unwrap_or(now));
                if leader != known {
                    known = leader;
                    match leader {
                        Some(l) => info!(member = id, leader = l, term, "the group's leader is member {l}"),
                        None => info!(member = id, term, "the group has no leader"),
                    }
                }
            }
        });
        let (proposals, rx) = mpsc::unbounded_channel();
        tokio::spawn(propose(raft.clone(), rx));
        Ok(Member {
            id,
            raft,
            sm,
            proposals,
            acked,
            #[cfg(test)]
            log: kept,
        })
    }

    /// Applies request `seq` of `client` through the log; answers once a majority has it and this
    /// member applied it. A request retried with the same numbers is answered, not applied again.
    pub async fn write(&self, client: u64, seq: u64, change: Change) -> Answered {
        self.check_not_isolated()?;
        let req = Request { client, seq, now: crate::shared::now_ns(), change };
        let size = postcard::experimental::serialized_size(&req).unwrap_or(usize::MAX);
        let (answer, answered) = oneshot::channel();
        let stopped = || GroupError::Unavailable("the Raft core stopped".into());
        self.proposals.send(Proposal { req, size, answer }).map_err(|_| stopped())?;
        tokio::time::timeout(WRITE_LIMIT, answered)
            .await
            .map_err(|_| GroupError::Unavailable(format!("no majority took the change within {WRITE_LIMIT:?}")))?
            .unwrap_or_else(|_| Err(stopped()))
    }

    /// Reads the namespace once this member has confirmed, with a majority, that it still leads
    /// and has applied everything committed before the read.
    pub async fn read<T>(&self, f: impl FnOnce(&Namespace) -> FsResult<T>) -> Result<FsResult<T>, GroupError> {
        self.check_not_isolated()?;
        if self.leases() {
            return Ok(f(self.sm.namespace()));
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(f(self.sm.namespace())),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(forwarded(&f)),
            Err(e) => Err(GroupError::Unavailable(e.to_string())),
        }
    }

    /// Adds the member `id` at `addr` at run time: first as a learner, which receives the log (or a
    /// snapshot) until it has caught up, then as a voter, through joint consensus. On the leader.
    pub async fn add(&self, id: NodeId, addr: &str) -> Result<(), GroupError> {
        let m = self.raft.metrics().borrow().clone();
        if m.membership_config.voter_ids().any(|v| v == id) {
            return Err(GroupError::Unavailable(format!("member {id} is a voter already")));
        }
        if let Some((_, n)) = m.membership_config.nodes().find(|(nid, n)| **nid != id && n.addr == addr) {
            return Err(GroupError::Unavailable(format!("{addr} is a member's address already ({})", n.addr)));
        }
        let learner = self.raft.add_learner(id, BasicNode::new(addr), true).await;
        membership_result(learner)?;
        info!(member = id, addr, "caught up as a learner; making it a voter");
        let ids: std::collections::BTreeSet<NodeId> = [id].into();
        membership_result(self.raft.change_membership(openraft::ChangeMembers::AddVoterIds(ids), false).await)
    }

    /// Takes the voter `id` out of the group, through joint consensus. On the leader.
    pub async fn remove(&self, id: NodeId) -> Result<(), GroupError> {
        let m = self.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
        if !voters.contains(&id) {
            return Err(GroupError::Unavailable(format!("member {id} is not a voter (voters: {voters:?})")));
        }
        if voters.len() == 1 {
            return Err(GroupError::Unavailable("the last voter cannot be removed".into()));
        }
        let ids: std::collections::BTreeSet<NodeId> = [id].into();
        membership_result(self.raft.change_membership(openraft::ChangeMembers::RemoveVoters(ids), false).await)?;
        info!(member = id, "removed from the group");
        Ok(())
    }

    /// The group's members as this member knows them: (id, address, voter).
    pub fn nodes(&self) -> Vec<(NodeId, String, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
        m.membership_config.nodes().map(|(id, n)| (*id, n.addr.clone(), voters.contains(id))).collect()
    }

    /// Whether this member may answer a read from its own namespace without asking the others (a
    /// leader lease): it leads, a majority acknowledged it within [`LEASE_READ_MS`] (measured from
    /// when it sent what they acknowledged), and it has applied an entry of its own term (so
    /// everything committed before it led). The followers that acknowledged refuse to vote for
    /// anyone else for their leader lease (the longest election timeout, 400 ms) after hearing
    /// from it, so no other leader can exist for at least the difference.
    fn leases(&self) -> bool {
        let rx = self.raft.metrics();
        if state(&rx) != openraft::ServerState::Leader {
            return false;
        }
        let m = rx.borrow();
        self.acked_ago().is_some_and(|ms| ms <= LEASE_READ_MS)
            && m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term)
    }

    /// How long ago, in ms, a majority last acknowledged this member as leader (None: never, or
    /// not leading). Not the metrics' own figure: openraft computes it when it publishes them, and
    /// publishes nothing while its core waits for the log's sync, so a leader whose disk stalled
    /// would go on reading a recent acknowledgement while the others elected another leader.
    fn acked_ago(&self) -> Option<u64> {
        let acked = *self.acked.lock().unwrap_or_else(|p| p.into_inner());
        acked.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether this member leads its group now (as far as it knows).
    pub fn is_leader(&self) -> bool {
        state(&self.raft.metrics()) == openraft::ServerState::Leader
    }

    /// This member's role as `dfsctl meta status` and the metrics name it: a leader cut off from
    /// the majority is "isolated".
    pub fn role(&self) -> &'static str {
        match state(&self.raft.metrics()) {
            openraft::ServerState::Leader if self.isolated_for_ms().is_some() => "isolated",
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        }
    }

    /// Copies this member's Raft role and positions into the metrics' gauges (see `--metrics`).
    pub fn publish_metrics(&self, crashed: bool) {
        use crate::shared::metrics::{set, set_state};
        const ROLES: [&str; 7] = ["leader", "follower", "candidate", "learner", "isolated", "shutdown", "crashed"];
        let role = if crashed { "crashed" } else { self.role() };
        set_state("dfs_raft_role", "This member's Raft role (1: the one it has)", &ROLES, role);
        let m = self.raft.metrics().borrow().clone();
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        set("dfs_raft_term", "This member's current Raft term", as_gauge(m.current_term));
        set(
            "dfs_raft_last_log_index",
            "The index of this member's last log entry",
            as_gauge(m.last_log_index.unwrap_or(0)),
        );
        set(
            "dfs_raft_applied_index",
            "The last committed log index this member has applied",
            as_gauge(m.last_applied.map_or(0, |l| l.index)),
        );
        set(
            "dfs_raft_snapshot_index",
            "The log index of this member's last snapshot",
            as_gauge(m.snapshot.map_or(0, |l| l.index)),
        );
        if let Ok(n) = self.local().inode_count() {
            set("dfs_inodes", "Inodes in the namespace (as this member has applied it)", as_gauge(n));
        }
    }

    /// How long this member has led without hearing from a majority, if longer than
    /// [`ISOLATED_AFTER_MS`] (cut off from the others: it stands aside).
    pub fn isolated_for_ms(&self) -> Option<u64> {
        // On every client call: borrow the metrics, do not copy them.
        let rx = self.raft.metrics();
        let leading = state(&rx) == openraft::ServerState::Leader;
        drop(rx);
        self.acked_ago().filter(|&ms| leading && ms > ISOLATED_AFTER_MS)
    }

    fn check_not_isolated(&self) -> Result<(), GroupError> {
        match self.isolated_for_ms() {
            Some(ms) => Err(GroupError::Unavailable(format!("this leader has heard from no majority for {ms} ms"))),
            None => Ok(()),
        }
    }

    /// The namespace as this member has applied it, without asking the group (possibly stale).
    pub fn local(&self) -> &Namespace {
        self.sm.namespace()
    }
}

/// The role in `metrics`, or Shutdown if the Raft core has stopped. A core that stops on an error
/// says so in its metrics, but one that panicked says nothing: it leaves its last metrics behind
/// (Leader, perhaps) and drops their sender.
fn state(metrics: &tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>) -> openraft::ServerState {
    if metrics.has_changed().is_err() {
        return openraft::ServerState::Shutdown;
    }
    metrics.borrow().state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_whose_core_died_leading_is_not_the_leader() {
        let mut m = openraft::RaftMetrics::new_initial(0);
        m.state = openraft::ServerState::Leader;
        let (tx, rx) = tokio::sync::watch::channel(m);
        assert_eq!(state(&rx), openraft::ServerState::Leader);
        drop(tx);
        assert_eq!(state(&rx), openraft::ServerState::Shutdown);
    }

    #[test]
    fn a_lease_read_ends_well_before_a_follower_may_vote_again() {
        let c = raft_config();
        assert!(LEASE_READ_MS * 2 <= c.election_timeout_max, "half the followers' lease is the margin");
    }
}
