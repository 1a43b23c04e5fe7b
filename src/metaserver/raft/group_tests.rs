//! A group of three members in one process, over an in-memory network that can cut members off:
//! election, forwarding hints, failover with a retried request applied once, and a partitioned
//! leader that answers no reads.

// openraft's network traits return its (large) RPCError by value.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, ServerState};

use super::member::{GroupError, Member};
use super::{NodeId, Raft, TypeConfig};
use crate::metaserver::namespace::{Change, Outcome};
use crate::shared::{Kind, NewNode, ROOT};

/// Every member's Raft by id, and the members cut off from all others.
#[derive(Clone, Default)]
struct Router {
    rafts: Arc<Mutex<HashMap<NodeId, Raft>>>,
    cut: Arc<Mutex<HashSet<NodeId>>>,
}

struct Link {
    from: NodeId,
    to: NodeId,
    router: Router,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

impl Link {
    fn target<E: std::error::Error>(&self) -> RpcResult<Raft, E> {
        let cut = self.router.cut.lock().expect("cut");
        let raft = self.router.rafts.lock().expect("rafts").get(&self.to).cloned();
        match raft {
            Some(r) if !cut.contains(&self.from) && !cut.contains(&self.to) => Ok(r),
            _ => Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other("cut off")))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let to = self.to;
        self.target()?.append_entries(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let to = self.to;
        self.target()?.install_snapshot(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let to = self.to;
        self.target()?.vote(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }
}

struct Links {
    from: NodeId,
    router: Router,
}

impl RaftNetworkFactory<TypeConfig> for Links {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _: &BasicNode) -> Link {
        Link { from: self.from, to: target, router: self.router.clone() }
    }
}

const ADDRS: [&str; 3] = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];

async fn group(router: &Router) -> (Vec<tempfile::TempDir>, Vec<Member>) {
    let mut dirs = Vec::new();
    let mut members = Vec::new();
    for id in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        members.push(start(router, id, dir.path()).await);
        dirs.push(dir);
    }
    (dirs, members)
}

/// Starts member `id` with its stores in `dir` (new, or a stopped member's), reachable by the
/// others.
async fn start(router: &Router, id: NodeId, dir: &std::path::Path) -> Member {
    let addrs: Vec<String> = ADDRS.iter().map(|s| s.to_string()).collect();
    let links = Links { from: id, router: router.clone() };
    let shape = crate::metaserver::namespace::Shape { block_size: Some(4096), replicas: Some(3), ..Default::default() };
    let m = Member::start(id, &addrs, dir, shape, links).await.expect("start");
    router.rafts.lock().expect("rafts").insert(id, m.raft.clone());
    m
}

/// Waits (bounded) until one of `among` leads and the others that can hear it agree.
async fn leader(members: &[Member], among: &[usize]) -> usize {
    let start = Instant::now();
    loop {
        for &i in among {
            let m = members[i].raft.metrics().borrow().clone();
            if m.state == ServerState::Leader
                && among.iter().all(|&j| members[j].raft.metrics().borrow().current_leader == Some(i as NodeId))
            {
                return i;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no leader among {among:?} after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn file(name: &str) -> Change {
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    Change::Mknod { parent: ROOT, name: name.as_bytes().to_vec(), node }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_fails_over_and_a_request_retried_on_the_new_leader_is_applied_once() {
    let router = Router::default();
    let (_dirs, members) = group(&router).await;
    let l = leader(&members, &[0, 1, 2]).await;
    let made = members[l].write(1, 1, file("a")).await.expect("the leader answers").expect("created");
    let Outcome::Attr(a) = &made else { panic!("{made:?}") };
    // A follower names the leader instead of answering.
    let f = (l + 1) % 3;
    let hint = Some((l as NodeId, ADDRS[l].to_string()));
    assert_eq!(members[f].write(1, 2, file("b")).await, Err(GroupError::NotLeader { leader: hint.clone() }));
    assert_eq!(members[f].read(|ns| ns.getattr(ROOT)).await.map(|_| ()), Err(GroupError::NotLeader { leader: hint }));

    // The leader dies; the client, which never saw its answer, retries on the new one.
    router.rafts.lock().expect("rafts").remove(&(l as NodeId));
    members[l].raft.shutdown().await.expect("shutdown");
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let n = leader(&members, &rest).await;
    let again = members[n].write(1, 1, file("a")).await.expect("the new leader answers").expect("same answer");
    assert_eq!(again, made, "a retried create must answer as the first time, not EEXIST");
    let names = members[n].read(|ns| ns.readdir(ROOT)).await.expect("read").expect("readdir");
    assert_eq!(names.len(), 1);
    assert_eq!(names[0].1.ino, a.ino);
    // And the group goes on.
    members[n].write(2, 1, file("b")).await.expect("answers").expect("created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_serves_no_reads_and_catches_up_when_healed() {
    let router = Router::default();
    let (_dirs, members) = group(&router).await;
    let old = leader(&members, &[0, 1, 2]).await;
    members[old].write(1, 1, file("a")).await.expect("answers").expect("created");
    router.cut.lock().expect("cut").insert(old as NodeId);
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = leader(&members, &rest).await;
    members[new].write(1, 2, file("b")).await.expect("answers").expect("created");
    // The old leader cannot confirm its term with a majority: no answer from it may be stale.
    let read = tokio::time::timeout(Duration::from_secs(5), members[old].read(|ns| ns.lookup(ROOT, b"b"))).await;
    assert!(!matches!(read, Ok(Ok(_))), "a cut-off leader answered a read: {read:?}");
    router.cut.lock().expect("cut").clear();
    let start = Instant::now();
    while members[old].local().lookup(ROOT, b"b").is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "the old leader never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(members[old].raft.metrics().borrow().state, ServerState::Leader);
}

/// Changes that come together go into the log together, fewer entries than changes, yet each is
/// answered as if alone, each client's in the order it sent them, and every member applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_come_together_share_entries_and_are_each_answered() {
    let router = Router::default();
    let (_dirs, members) = group(&router).await;
    let l = leader(&members, &[0, 1, 2]).await;
    let before = members[l].raft.metrics().borrow().last_log_index.unwrap_or(0);
    // Four clients, ten changes each, numbered in the order they are sent: a change applied out
    // of its client's order would be refused.
    let writes = (0..40u64).map(|i| members[l].write(100 + i % 4, 1 + i / 4, file(&format!("f{i}"))));
    let answers = futures::future::join_all(writes).await;
    let mut inos = HashSet::new();
    for (i, a) in answers.iter().enumerate() {
        let Ok(Ok(Outcome::Attr(attr))) = a else { panic!("change {i} answered {a:?}") };
        assert!(inos.insert(attr.ino), "change {i} answered another's inode");
    }
    let entries = members[l].raft.metrics().borrow().last_log_index.unwrap_or(0) - before;
    assert!(entries < 40, "40 changes took {entries} entries");
    let start = Instant::now();
    for m in &members {
        while m.local().readdir(ROOT).map_or(0, |n| n.len()) < 40 {
            assert!(start.elapsed() < Duration::from_secs(20), "member {} did not apply every change", m.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A leader whose log sync stalls stops sending heartbeats (openraft's core waits for the sync)
/// and the others elect another; meanwhile it must not answer reads from its own namespace on the
/// strength of the last acknowledgement its metrics showed before the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_stalls_serves_no_stale_reads() {
    let router = Router::default();
    let (_dirs, members) = group(&router).await;
    let old = leader(&members, &[0, 1, 2]).await;
    members[old].write(1, 1, file("a")).await.expect("answers").expect("created");
    let stall: crate::shared::wal::SyncFn = Arc::new(|f: &std::fs::File| {
        std::thread::sleep(Duration::from_secs(6));
        f.sync_data()
    });
    members[old].log.wal().sync_with(stall);
    // A change the old leader's core appends, then waits for the stalled sync.
    let held = tokio::time::timeout(Duration::from_millis(300), members[old].write(1, 2, file("held"))).await;
    assert!(held.is_err(), "a change was answered through a stalled sync: {held:?}");
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = leader(&members, &rest).await;
    members[new].write(2, 1, file("b")).await.expect("answers").expect("created");
    let read = tokio::time::timeout(Duration::from_secs(1), members[old].read(|ns| ns.lookup(ROOT, b"b"))).await;
    assert!(!matches!(read, Ok(Ok(_))), "a leader whose disk stalled answered a read: {read:?}");
}

/// A leader whose followers were both down for longer than a lease, and which led on meanwhile
/// unable to commit anything (every heartbeat refused), gives every session a whole lease once
/// they are back, as a new leader does. Regression: its grace had long run out, so at its first
/// look it expired every session, whose clients had never stopped heartbeating, and gave their
/// locks away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_could_commit_nothing_for_a_lease_expires_no_session_when_it_can_again() {
    let router = Router::default();
    let (dirs, members) = group(&router).await;
    let l = leader(&members, &[0, 1, 2]).await;
    let mut members: Vec<Option<Arc<Member>>> = members.into_iter().map(|m| Some(Arc::new(m))).collect();
    let leading = members[l].clone().expect("leader");
    let lease = Duration::from_secs(2);
    let info = crate::metaserver::namespace::sessions::ClientInfo { host: "h".into(), pid: 1, mount: "/m".into() };
    leading.write(1, 1, Change::Hello { session: 7, info }).await.expect("answers").expect("hello");
    // The client beats until the followers go, and again a while after they are back (a
    // client's retries back off, up to a second apart): sooner, it would hide the expiry.
    let beating = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beats = {
        let (leading, beating) = (leading.clone(), beating.clone());
        async move {
            for seq in 2.. {
                if beating.load(std::sync::atomic::Ordering::SeqCst) {
                    let beat = Change::Heartbeat { session: 7, report_after: 0, opens: None };
                    let _ = tokio::time::timeout(Duration::from_millis(500), leading.write(1, seq, beat)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let scenario = async {
        // Past the leader's first grace, with the session renewed all along.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let followers: Vec<usize> = (0..3).filter(|&i| i != l).collect();
        beating.store(false, std::sync::atomic::Ordering::SeqCst);
        for &f in &followers {
            let m = members[f].take().expect("follower");
            router.rafts.lock().expect("rafts").remove(&(f as NodeId));
            m.raft.shutdown().await.expect("shutdown");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(leading.isolated_for_ms().is_some(), "the leader heard from a majority with both followers down");
        for &f in &followers {
            members[f] = Some(Arc::new(start(&router, f as NodeId, dirs[f].path()).await));
        }
        let since = Instant::now();
        while leading.isolated_for_ms().is_some() {
            assert!(since.elapsed() < Duration::from_secs(20), "the followers never answered the leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The leader looks at the sessions every second; the client beats again within the lease.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        beating.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(leading.is_leader(), "the leader changed: the test shows nothing");
        let clients = leading.local().clients().expect("clients");
        assert_eq!(clients.iter().map(|c| c.session).collect::<Vec<_>>(), vec![7], "the session expired");
    };
    tokio::select! {
        () = crate::metaserver::expire_sessions_in_group(leading.clone(), lease) => unreachable!("it runs for good"),
        () = beats => unreachable!("it beats for good"),
        () = scenario => {}
    }
}
