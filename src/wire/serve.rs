//! The servers' processes on the wire: bind, then serve the store until the process ends.

use std::rc::Rc;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use super::data_service::DataServerImpl;
use super::dfs_capnp::{data_server, meta};
use super::meta_service::MetaService;
use super::net;
use super::peer::RpcPeers;
use super::raft_net::{self, RpcRaftNetwork};
use crate::dataserver::rebuild::{compare_rings, rebuild};
use crate::dataserver::DataNode;
use crate::metaserver::group::GroupConfig;
use crate::metaserver::raft::member::Member;
use crate::metaserver::raft::NodeId;
use crate::shared::start::StartError;

fn runtime() -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Runtime)
}

/// Binds `addr` before anything is created on disk: a server that cannot listen leaves no store.
pub fn bind(addr: &str) -> Result<std::net::TcpListener, StartError> {
    let open_files = crate::shared::start::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    let listen = |error| StartError::Listen { addr: addr.to_string(), error };
    let l = std::net::TcpListener::bind(addr).map_err(listen)?;
    let ip = l.local_addr().map_err(listen)?.ip();
    super::auth::check_listen(ip)
        .map_err(|why| listen(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)))?;
    l.set_nonblocking(true).map_err(listen)?;
    Ok(l)
}

/// Serves the namespace on `listener` (bound to `addr`) forever.
pub fn serve_metaserver(
    listener: std::net::TcpListener,
    journal: crate::metaserver::journal::Journal,
    addr: &str,
    lease: std::time::Duration,
) -> Result<(), StartError> {
    let journal = Arc::new(journal);
    let ns = journal.namespace().clone();
    let client: meta::Client = capnp_rpc::new_client(MetaService::new(journal.clone()));
    let rt = runtime()?;
    tokio::task::LocalSet::new().block_on(&rt, async move {
        if crate::shared::metrics::enabled() {
            let ns = ns.clone();
            tokio::task::spawn_local(async move {
                loop {
                    if let Ok(n) = ns.inode_count() {
                        let n = i64::try_from(n).unwrap_or(i64::MAX);
                        crate::shared::metrics::set("dfs_inodes", "Inodes in the namespace", n);
                    }
                    tokio::time::sleep(PUBLISH_EVERY).await;
                }
            });
        }
        tokio::task::spawn_local(crate::metaserver::expire_sessions(journal, lease));
        let listener = TcpListener::from_std(listener).map_err(StartError::Runtime)?;
        info!(addr, "metaserver listening");
        net::serve(listener, client.client).await;
        Ok(())
    })
}

/// Runs member `id` of a metaserver group: its Raft instance, the service and the members'
/// transport, all on this one thread. Nothing there waits for the disk (the log is synced by a
/// thread of its own, the namespace commits without syncing, snapshots are built and installed on
/// the blocking pool), and a change takes about ten hand-offs between these tasks: on one thread
/// each is a queue push, across threads a wake-up. Measured with the Raft instance on two worker
/// threads instead: a create took 1.4 ms (median) on disk and 1.0-1.9 ms on tmpfs; on this thread,
/// 1.1 ms and 0.38 ms.
pub fn serve_metaserver_member(
    listener: std::net::TcpListener,
    dir: &std::path::Path,
    shape: crate::metaserver::namespace::Shape,
    group: &GroupConfig,
    id: usize,
    lease: std::time::Duration,
) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Runtime)?;
    let (members, group_id) = (group.members.clone(), group.id());
    // Talk to the other members from the address this member listens on (unless that is any address).
    let from = listener.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified());
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::task::spawn_local(raft_net::transport(rx, from));
        let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let net = RpcRaftNetwork { from: id as NodeId, group: group_id, tx, crashed: crashed.clone() };
        let member =
            Member::start(id as NodeId, &members, dir, shape, net).await.map_err(|e| StartError::store(dir, e))?;
        let member = Arc::new(member);
        tokio::task::spawn_local(crate::metaserver::expire_sessions_in_group(member.clone(), lease));
        if crate::shared::metrics::enabled() {
            let (member, crashed) = (member.clone(), crashed.clone());
            tokio::task::spawn_local(async move {
                loop {
                    member.publish_metrics(crashed.load(std::sync::atomic::Ordering::Relaxed));
                    tokio::time::sleep(PUBLISH_EVERY).await;
                }
            });
        }
        let client: meta::Client = capnp_rpc::new_client(MetaService::group(member, group_id, crashed));
        let listener = TcpListener::from_std(listener).map_err(StartError::Runtime)?;
        info!(member = id, addr = %members[id], "metaserver group member listening");
        net::serve(listener, client.client).await;
        Ok(())
    })
}

/// How often a server copies its state into the metrics' gauges.
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves a dataserver's store on `listener` forever; compares rings with the peers and, if the
/// store is not `complete`, rebuilds it from them meanwhile.
pub fn serve_dataserver(
    listener: std::net::TcpListener,
    node: DataNode,
    complete: bool,
    hand_over: bool,
) -> Result<(), StartError> {
    let node = Rc::new(node);
    let client: data_server::Client = capnp_rpc::new_client(DataServerImpl { node: node.clone() });
    let rt = runtime()?;
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let listener = TcpListener::from_std(listener).map_err(StartError::Runtime)?;
        info!(server = node.index, addr = %node.ring[node.index], "dataserver listening");
        let n = node.clone();
        tokio::task::spawn_local(async move { compare_rings(&n, &RpcPeers::new(n.ring.clone())).await });
        let n = node.clone();
        tokio::task::spawn_local(
            async move { crate::dataserver::scrub::run(&n, &RpcPeers::new(n.ring.clone())).await },
        );
        let n = node.clone();
        tokio::task::spawn_local(async move {
            crate::dataserver::handoff::catch_up(&n, &RpcPeers::new(n.ring.clone())).await
        });
        if hand_over {
            let n = node.clone();
            tokio::task::spawn_local(async move {
                let settle = crate::dataserver::handoff::EVERY;
                crate::dataserver::handoff::run(&n, &RpcPeers::new(n.ring.clone()), settle).await
            });
        }
        if crate::shared::metrics::enabled() {
            let n = node.clone();
            tokio::task::spawn_local(async move {
                loop {
                    n.publish_metrics();
                    tokio::time::sleep(PUBLISH_EVERY).await;
                }
            });
        }
        if !complete {
            tokio::task::spawn_local(async move { rebuild(&node, &RpcPeers::new(node.ring.clone())).await });
        }
        net::serve(listener, client.client).await;
        Ok(())
    })
}
