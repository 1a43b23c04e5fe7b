//! The engine's [`DataPort`] over capnp-rpc, one kept session per dataserver, plus the
//! dataservers' admin calls (`status`, `corrupt`).

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use capnp::ErrorKind;

use super::convert::{bad, read_block_replies, read_md5, write_key, write_keys, write_layout};
use super::dfs_capnp::{data_server, data_session};
use super::net;
use crate::client::ports::{Cut, DataPort, GetReply, ListPage, RangeReply, ServerStatus};
use crate::dataserver::scrub::ScrubStatus;
use crate::shared::block::{Block, BlockKey, Part};
use crate::shared::layout::Layout;
use crate::shared::PortError;

/// A call to a dataserver that takes longer than this is treated as a lost connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A status call does no I/O: a server that does not answer it within this is reported down
/// (a stopped process still accepts connections, and would hold `dfsctl status` forever).
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn port_err(e: capnp::Error) -> PortError {
    if e.extra.contains(crate::shared::NO_SPACE_TAG) {
        return PortError::NoSpace(e.extra);
    }
    match e.kind {
        ErrorKind::Disconnected | ErrorKind::Overloaded => PortError::Unreachable(e.to_string()),
        _ => PortError::Refused(e.to_string()),
    }
}

/// The engine's port to the dataservers over capnp-rpc, one cached session per server.
pub struct RpcDataPort {
    layout: Layout,
    /// One connection per server, kept: a connection is only closed by its peer or by an error.
    servers: RefCell<Vec<Option<data_server::Client>>>,
    sessions: RefCell<Vec<Option<data_session::Client>>>,
}

impl RpcDataPort {
    pub fn new(layout: Layout) -> Self {
        let n = layout.n();
        RpcDataPort { layout, servers: RefCell::new(vec![None; n]), sessions: RefCell::new(vec![None; n]) }
    }

    async fn server(&self, s: usize) -> Result<data_server::Client, PortError> {
        if let Some(c) = self.servers.borrow()[s].clone() {
            return Ok(c);
        }
        let server: data_server::Client = net::connect(&self.layout.servers[s]).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => PortError::Refused(e.to_string()),
            _ => PortError::Unreachable(e.to_string()),
        })?;
        self.servers.borrow_mut()[s] = Some(server.clone());
        Ok(server)
    }

    /// Forgets server `s`'s connection after it broke, so that the next call reconnects.
    fn forget(&self, s: usize) {
        self.servers.borrow_mut()[s] = None;
        self.sessions.borrow_mut()[s] = None;
    }

    async fn session(&self, s: usize) -> Result<data_session::Client, PortError> {
        if let Some(c) = self.sessions.borrow()[s].clone() {
            return Ok(c);
        }
        let server = self.server(s).await?;
        let mut req = server.connect_request();
        write_layout(req.get().init_layout(), &self.layout);
        let reply = req.send().promise.await.map_err(port_err);
        let session = reply.and_then(|r| r.get().and_then(|r| r.get_session()).map_err(port_err));
        if let Err(PortError::Unreachable(_)) = &session {
            self.forget(s);
        }
        let session = session?;
        self.sessions.borrow_mut()[s] = Some(session.clone());
        Ok(session)
    }

    /// Runs one call on server `s`'s session, forgetting the session if the connection broke.
    async fn on<T, Fut>(&self, s: usize, f: impl FnOnce(data_session::Client) -> Fut) -> Result<T, PortError>
    where
        Fut: Future<Output = Result<T, capnp::Error>>,
    {
        let session = self.session(s).await?;
        let r = match tokio::time::timeout(CALL_TIMEOUT, f(session)).await {
            Ok(r) => r.map_err(port_err),
            Err(_) => Err(PortError::Unreachable(format!("no answer in {CALL_TIMEOUT:?}"))),
        };
        if let Err(PortError::Unreachable(_)) = &r {
            self.forget(s);
        }
        r
    }

    pub async fn status(&self, s: usize) -> Result<ServerStatus, PortError> {
        // A kept connection may belong to a server process that has since restarted: on a broken
        // one, try once more on a fresh connection before calling the server down.
        let mut attempt = 0;
        let reply = loop {
            let server = self.server(s).await?;
            let call = tokio::time::timeout(STATUS_TIMEOUT, server.status_request().send().promise);
            let r = call
                .await
                .unwrap_or_else(|_| Err(capnp::Error::disconnected(format!("no answer in {STATUS_TIMEOUT:?}"))));
            match r.map_err(port_err) {
                Err(PortError::Unreachable(_)) if attempt == 0 => {
                    self.forget(s);
                    attempt += 1;
                }
                Err(e @ PortError::Unreachable(_)) => {
                    self.forget(s);
                    return Err(e);
                }
                r => break r?,
            }
        };
        let r = reply.get().and_then(|r| r.get_status()).map_err(port_err)?;
        Ok(ServerStatus {
            hints: r.get_hints(),
            catching_up: r.get_catching_up(),
            scrub: r.get_scrub().map(read_scrub).map_err(port_err)?,
            index: r.get_index(),
            blocks: r.get_blocks(),
            bytes: r.get_bytes(),
            rebuilding: r.get_rebuilding(),
            rebuild_copied: r.get_rebuild_done(),
            rebuild_listed: r.get_rebuild_listed(),
            rebuild_peers_left: r.get_rebuild_peers_left(),
            rebuild_skipped: r.get_rebuild_skipped().map_err(port_err)?.iter().collect(),
            rebuild_nowhere: r.get_rebuild_nowhere(),
            rebuild_nowhere_keys: r
                .get_rebuild_nowhere_keys()
                .map_err(port_err)?
                .iter()
                .map(|k| crate::shared::block::BlockKey { file_id: k.get_file_id(), index: k.get_index() })
                .collect(),
            disk_total: r.get_disk_total(),
            disk_free: r.get_disk_free(),
            disk_id: r.get_disk_id(),
            servers: r
                .get_servers()
                .map_err(port_err)?
                .iter()
                .map(|s| Ok(s?.to_string()?))
                .collect::<capnp::Result<_>>()
                .map_err(port_err)?,
        })
    }

    /// Starts a scrub pass on server `s` if `start` (unless one runs); how its current or last
    /// pass went.
    pub async fn scrub(&self, s: usize, start: bool) -> Result<ScrubStatus, PortError> {
        let server = self.server(s).await?;
        let mut req = server.scrub_request();
        req.get().set_start(start);
        let r = match tokio::time::timeout(CALL_TIMEOUT, req.send().promise).await {
            Ok(r) => r.map_err(port_err),
            Err(_) => Err(PortError::Unreachable(format!("no answer in {CALL_TIMEOUT:?}"))),
        };
        if let Err(PortError::Unreachable(_)) = &r {
            self.forget(s);
        }
        r?.get().and_then(|r| r.get_status()).map(read_scrub).map_err(port_err)
    }

    pub async fn corrupt(&self, s: usize, file_id: u64) -> Result<Option<u64>, PortError> {
        self.on(s, |c| {
            let mut req = c.corrupt_request();
            req.get().set_file_id(file_id);
            async move {
                let i = req.send().promise.await?.get()?.get_index();
                Ok(u64::try_from(i).ok())
            }
        })
        .await
    }
}

impl DataPort for RpcDataPort {
    fn name(&self, server: usize) -> String {
        self.layout.servers.get(server).cloned().unwrap_or_default()
    }

    async fn put(&self, server: usize, blocks: &[&Block], repair: bool, hint: bool) -> Result<(), PortError> {
        self.on(server, |c| super::convert::put_blocks(&c, blocks.iter().copied(), repair, hint)).await
    }

    async fn get(&self, server: usize, keys: &[BlockKey]) -> Result<GetReply, PortError> {
        self.on(server, |c| {
            let mut req = c.get_request();
            write_keys(req.get().init_keys(keys.len() as u32), keys);
            async move {
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                let list = r.get_blocks()?;
                let cut_versions = list.iter().map(|b| b.get_cut_version()).collect();
                Ok(GetReply { blocks: read_block_replies(keys, list)?, rebuilding: r.get_rebuilding(), cut_versions })
            }
        })
        .await
    }

    async fn get_range(&self, server: usize, key: BlockKey, from: u32, to: u32) -> Result<RangeReply, PortError> {
        self.on(server, |c| {
            let mut req = c.get_range_request();
            write_key(req.get().init_key(), key);
            req.get().set_from(from);
            req.get().set_to(to);
            async move {
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                let b = r.get_block()?;
                let part = if b.get_found() {
                    let pages = r.get_page_md5s()?;
                    if pages.len() % 16 != 0 {
                        return Err(bad(format!("page checksums of {} bytes", pages.len())));
                    }
                    Some(Part {
                        version: b.get_version(),
                        replicas: b.get_replicas(),
                        md5: read_md5(b.get_md5()?)?,
                        len: r.get_length() as usize,
                        offset: r.get_offset() as usize,
                        data: b.get_data()?.to_vec(),
                        pages: pages.chunks_exact(16).map(read_md5).collect::<Result<_, _>>()?,
                    })
                } else {
                    None
                };
                Ok(RangeReply { part, rebuilding: r.get_rebuilding() })
            }
        })
        .await
    }

    async fn truncate(&self, server: usize, cuts: &[Cut], hint: bool) -> Result<u64, PortError> {
        self.on(server, |c| {
            let mut req = c.truncate_request();
            req.get().set_hint(hint);
            super::convert::write_cuts(req.get().init_cuts(cuts.len() as u32), cuts);
            async move { Ok(req.send().promise.await?.get()?.get_removed()) }
        })
        .await
    }

    async fn list(&self, server: usize, after: BlockKey, limit: u32) -> Result<ListPage, PortError> {
        // A server holds a replica of everything it holds: listing for itself lists it all.
        self.on(server, |c| super::convert::list_for(c, server, after, limit)).await
    }

    async fn drop_blocks(&self, server: usize, keys: &[(BlockKey, u64)]) -> Result<u64, PortError> {
        self.on(server, |c| {
            let mut req = c.drop_request();
            let mut kl = req.get().init_keys(keys.len() as u32);
            for (i, (k, _)) in keys.iter().enumerate() {
                write_key(kl.reborrow().get(i as u32), *k);
            }
            let mut vl = req.get().init_versions(keys.len() as u32);
            for (i, (_, v)) in keys.iter().enumerate() {
                vl.set(i as u32, *v);
            }
            async move { Ok(req.send().promise.await?.get()?.get_removed()) }
        })
        .await
    }
}

fn read_scrub(r: super::dfs_capnp::scrub_status::Reader) -> ScrubStatus {
    ScrubStatus {
        running: r.get_running(),
        passes: r.get_passes(),
        started_at: r.get_started_at(),
        finished_at: r.get_finished_at(),
        checked: r.get_checked(),
        total: r.get_total(),
        corrupt: r.get_corrupt(),
        repaired: r.get_repaired(),
        pushed: r.get_pushed(),
        ranges_differed: r.get_ranges_differed(),
        rate: r.get_rate(),
        unreachable: r.get_unreachable(),
    }
}
