//! A dataserver's [`PeerPort`] over capnp-rpc: one kept session per peer, opened by naming only
//! our ring (so a peer started with another ring refuses it). Through it a server reads from its
//! peers (rebuild, scrub) and gives them copies and cuts they lack (hand-over, scrub).

use std::cell::RefCell;
use std::time::Duration;

use super::convert::{read_block_replies, write_key, write_keys, write_ring};
use super::data_client::port_err;
use super::dfs_capnp::{data_server, data_session};
use super::net;
use crate::dataserver::blockstore::Cut;
use crate::dataserver::rebuild::{ListPage, PeerPort};
use crate::shared::block::{Block, BlockKey, Checksum};
use crate::shared::PortError;

/// A peer that takes longer than this to answer is treated as unreachable.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RpcPeers {
    ring: Vec<String>,
    sessions: RefCell<Vec<Option<data_session::Client>>>,
}

impl RpcPeers {
    pub fn new(ring: Vec<String>) -> Self {
        let n = ring.len();
        RpcPeers { ring, sessions: RefCell::new(vec![None; n]) }
    }

    async fn server(&self, peer: usize) -> Result<data_server::Client, PortError> {
        net::connect(&self.ring[peer]).await.map_err(|e| PortError::Unreachable(e.to_string()))
    }

    /// Runs `f` on `peer`'s session (opened if needed), bounded in time; forgets the session when
    /// the call failed, so the next one reconnects.
    async fn on<T, F>(&self, peer: usize, f: impl FnOnce(data_session::Client) -> F) -> Result<T, PortError>
    where
        F: std::future::Future<Output = Result<T, capnp::Error>>,
    {
        let cached = self.sessions.borrow()[peer].clone();
        let session = match cached {
            Some(s) => s,
            None => {
                let mut req = self.server(peer).await?.connect_request();
                write_ring(req.get().init_layout(), &self.ring);
                let s = req.send().pipeline.get_session();
                self.sessions.borrow_mut()[peer] = Some(s.clone());
                s
            }
        };
        let r = match tokio::time::timeout(PEER_TIMEOUT, f(session)).await {
            Ok(r) => r.map_err(port_err),
            Err(_) => Err(PortError::Unreachable(format!("no answer in {PEER_TIMEOUT:?}"))),
        };
        if r.is_err() {
            self.sessions.borrow_mut()[peer] = None;
        }
        r
    }
}

impl PeerPort for RpcPeers {
    async fn ring(&self, peer: usize) -> Result<Vec<String>, PortError> {
        let server = self.server(peer).await?;
        let reply = tokio::time::timeout(PEER_TIMEOUT, server.status_request().send().promise)
            .await
            .map_err(|_| PortError::Unreachable("no answer".into()))?
            .map_err(port_err)?;
        let read = || -> capnp::Result<Vec<String>> {
            let list = reply.get()?.get_status()?.get_servers()?;
            list.iter().map(|s| Ok(s?.to_string()?)).collect()
        };
        read().map_err(port_err)
    }

    async fn list_for(&self, peer: usize, target: usize, after: BlockKey, limit: u32) -> Result<ListPage, PortError> {
        self.on(peer, |s| super::convert::list_for(s, target, after, limit)).await
    }

    async fn get(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, PortError> {
        self.on(peer, |s| {
            let mut req = s.get_request();
            write_keys(req.get().init_keys(keys.len() as u32), keys);
            async move { read_block_replies(keys, req.send().promise.await?.get()?.get_blocks()?) }
        })
        .await
    }

    async fn put(&self, peer: usize, blocks: &[Block]) -> Result<(), PortError> {
        self.on(peer, |s| super::convert::put_blocks(&s, blocks.iter(), true, false)).await
    }

    async fn truncate(&self, peer: usize, cuts: &[Cut]) -> Result<(), PortError> {
        self.on(peer, |s| {
            let mut req = s.truncate_request();
            super::convert::write_cuts(req.get().init_cuts(cuts.len() as u32), cuts);
            async move {
                req.send().promise.await?;
                Ok(())
            }
        })
        .await
    }

    async fn cuts(&self, peer: usize, from: u64, limit: u32) -> Result<(Vec<Cut>, bool), PortError> {
        self.on(peer, |s| {
            let mut req = s.list_cuts_request();
            req.get().set_from(from);
            req.get().set_limit(limit);
            async move {
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                let cuts = r
                    .get_cuts()?
                    .iter()
                    .map(|c| Cut { file_id: c.get_file_id(), from_block: c.get_from_block(), version: c.get_version() })
                    .collect();
                Ok((cuts, r.get_done()))
            }
        })
        .await
    }

    async fn hints_for(&self, peer: usize, target: usize, before: u64) -> Result<u64, PortError> {
        self.on(peer, |s| {
            let mut req = s.hints_for_request();
            req.get().set_target(target as u32);
            req.get().set_before(before);
            async move { Ok(req.send().promise.await?.get()?.get_count()) }
        })
        .await
    }

    async fn versions(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<u64>, PortError> {
        self.on(peer, |s| {
            let mut req = s.versions_request();
            write_keys(req.get().init_keys(keys.len() as u32), keys);
            async move {
                let reply = req.send().promise.await?;
                let v: Vec<u64> = reply.get()?.get_versions()?.iter().collect();
                if v.len() != keys.len() {
                    return Err(capnp::Error::failed("answered a different number of versions".into()));
                }
                Ok(v)
            }
        })
        .await
    }

    async fn digest(
        &self,
        peer: usize,
        from: BlockKey,
        to: Option<BlockKey>,
        shared_with: usize,
    ) -> Result<(u64, Checksum), PortError> {
        self.on(peer, |s| {
            let mut req = s.digest_request();
            write_key(req.get().init_from(), from);
            if let Some(to) = to {
                write_key(req.get().init_to(), to);
                req.get().set_has_to(true);
            }
            req.get().set_peer(shared_with as u32);
            async move {
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                let d: Checksum =
                    r.get_digest()?.try_into().map_err(|_| capnp::Error::failed("a digest is 16 bytes".into()))?;
                Ok((r.get_count(), d))
            }
        })
        .await
    }
}
