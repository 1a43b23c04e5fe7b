//! Raft's messages between the members of a metaserver group, over the `raft` method of the
//! metaserver's interface. openraft calls its network from its own (Send) tasks, while capnp-rpc
//! lives on the RPC thread: [`RpcRaftNetwork`] hands each message over a channel to
//! [`transport`], which runs on that thread and keeps one connection per member.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode, RPCTypes};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::convert::bad;
use super::dfs_capnp::meta;
use super::net;
use crate::metaserver::raft::{NodeId, Raft, TypeConfig};

const APPEND: u8 = 0;
const VOTE: u8 = 1;
const SNAPSHOT: u8 = 2;

/// One message for another member, and where its answer goes.
pub struct Envelope {
    addr: String,
    group: u64,
    kind: u8,
    message: Vec<u8>,
    /// How long openraft waits for the answer: a call still unanswered then drops its connection.
    ttl: Duration,
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// The network openraft sees: a handle that any thread may use.
#[derive(Clone)]
pub struct RpcRaftNetwork {
    pub from: NodeId,
    pub group: u64,
    pub tx: mpsc::UnboundedSender<Envelope>,
    /// A crashed member (a tester's fault injection) sends nothing either.
    pub crashed: Arc<AtomicBool>,
}

pub struct RpcRaftLink {
    net: RpcRaftNetwork,
    to: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for RpcRaftNetwork {
    type Network = RpcRaftLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> RpcRaftLink {
        RpcRaftLink { net: self.clone(), to: target, addr: node.addr.clone() }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

impl RpcRaftLink {
    async fn call<Req, Resp, E>(&self, kind: u8, action: RPCTypes, req: &Req, ttl: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let message = postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (reply, answer) = oneshot::channel();
        let unreachable = |why: String| RPCError::Unreachable(Unreachable::from(AnyError::error(why)));
        if self.net.crashed.load(Ordering::Relaxed) {
            return Err(unreachable("this member is crashed".into()));
        }
        let envelope = Envelope { addr: self.addr.clone(), group: self.net.group, kind, message, ttl, reply };
        self.net.tx.send(envelope).map_err(|_| unreachable("the RPC thread stopped".into()))?;
        let bytes = match tokio::time::timeout(ttl, answer).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout { action, id: self.net.from, target: self.to, timeout: ttl }))
            }
            Ok(Err(_)) => return Err(unreachable("the RPC thread dropped the message".into())),
            Ok(Ok(Err(why))) => return Err(unreachable(why)),
            Ok(Ok(Ok(bytes))) => bytes,
        };
        match postcard::from_bytes::<Result<Resp, E>>(&bytes) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.to, remote))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for RpcRaftLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.call(APPEND, RPCTypes::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(SNAPSHOT, RPCTypes::InstallSnapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.call(VOTE, RPCTypes::Vote, &rpc, option.hard_ttl()).await
    }
}

/// Delivers the members' messages until the channel closes, connecting from the local address
/// `from` if given. Runs on the RPC thread.
pub async fn transport(mut rx: mpsc::UnboundedReceiver<Envelope>, from: Option<std::net::IpAddr>) {
    let conns: Rc<RefCell<HashMap<String, meta::Client>>> = Rc::default();
    while let Some(env) = rx.recv().await {
        let conns = conns.clone();
        tokio::task::spawn_local(async move {
            let answer = deliver(&conns, &env, from).await;
            let _ = env.reply.send(answer);
        });
    }
}

async fn deliver(
    conns: &RefCell<HashMap<String, meta::Client>>,
    env: &Envelope,
    from: Option<std::net::IpAddr>,
) -> Result<Vec<u8>, String> {
    let cached = conns.borrow().get(&env.addr).cloned();
    let client = match cached {
        Some(c) => c,
        None => {
            let c: meta::Client = net::connect_from(&env.addr, from).await.map_err(|e| format!("{}: {e}", env.addr))?;
            conns.borrow_mut().insert(env.addr.clone(), c.clone());
            c
        }
    };
    let mut req = client.raft_request();
    req.get().set_group(env.group);
    req.get().set_kind(env.kind);
    req.get().set_message(&env.message);
    let call = async { Ok::<_, capnp::Error>(req.send().promise.await?.get()?.get_reply()?.to_vec()) };
    // A connection whose calls go unanswered (a peer cut off by the network, whose packets vanish)
    // is dropped, so the next call connects afresh instead of queueing behind TCP's retransmits.
    let answer = match tokio::time::timeout(env.ttl, call).await {
        Ok(a) => a,
        Err(_) => Err(capnp::Error::disconnected(format!("no answer in {:?}", env.ttl))),
    };
    // Any failure forgets the connection, whatever its kind: a connection that TCP gave up on
    // (keepalive, user timeout) fails every later call with "Overloaded: Connection timed out",
    // and kept, it would cut the member off from that peer for good. A live peer that answered
    // with an error (a crashed member) costs only a reconnect.
    answer.map_err(|e| {
        conns.borrow_mut().remove(&env.addr);
        format!("{}: {e}", env.addr)
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, capnp::Error> {
    postcard::to_allocvec(v).map_err(|e| bad(e.to_string()))
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, capnp::Error> {
    postcard::from_bytes(b).map_err(|e| bad(format!("a Raft message that does not decode: {e}")))
}

/// Hands a member's message to this member's Raft and encodes its answer.
pub async fn serve(raft: &Raft, kind: u8, message: &[u8]) -> Result<Vec<u8>, capnp::Error> {
    match kind {
        APPEND => {
            let req: AppendEntriesRequest<TypeConfig> = decode(message)?;
            sane(&req.vote, true)?;
            encode(&raft.append_entries(req).await)
        }
        VOTE => {
            let req: VoteRequest<NodeId> = decode(message)?;
            sane(&req.vote, false)?;
            encode(&raft.vote(req).await)
        }
        SNAPSHOT => {
            let req: InstallSnapshotRequest<TypeConfig> = decode(message)?;
            sane(&req.vote, true)?;
            encode(&raft.install_snapshot(req).await)
        }
        k => Err(bad(format!("unknown Raft message kind {k}"))),
    }
}

/// Refuses a vote no member sends: a leader's messages carry its committed vote, a candidate's
/// request an uncommitted one, and no term is the last (the next election adds one). openraft
/// asserts these rather than checking them. Beyond its vote a Raft message is trusted: a holder
/// of the cluster secret can act as a member.
fn sane(vote: &openraft::Vote<NodeId>, from_leader: bool) -> Result<(), capnp::Error> {
    if vote.is_committed() != from_leader || vote.leader_id().term == u64::MAX {
        return Err(bad(format!("a Raft message with vote {vote} that no member sends")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// A member that answers every Raft message with an error of the kind a dead connection gives.
    struct Failing;

    impl meta::Server for Failing {
        async fn raft(self: Rc<Self>, _: meta::RaftParams, _: meta::RaftResults) -> Result<(), capnp::Error> {
            Err(capnp::Error::overloaded("Connection timed out (os error 110)".into()))
        }
    }

    #[test]
    fn a_connection_whose_call_failed_is_not_kept() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            let server: meta::Client = capnp_rpc::new_client(Failing);
            tokio::task::spawn_local(net::serve(listener, server.client));
            let conns: RefCell<HashMap<String, meta::Client>> = RefCell::default();
            let (reply, _answer) = oneshot::channel();
            let env = Envelope {
                addr: addr.clone(),
                group: 1,
                kind: VOTE,
                message: vec![],
                ttl: Duration::from_secs(5),
                reply,
            };
            let r = deliver(&conns, &env, None).await;
            assert!(r.as_ref().is_err_and(|e| e.contains("timed out")), "{r:?}");
            assert!(!conns.borrow().contains_key(&addr), "the failed connection was kept for the next message");
        });
    }
}
