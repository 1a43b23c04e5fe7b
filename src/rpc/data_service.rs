//! The dataserver's RPC adapter over its [`BlockStore`], and the rebuild of a lost disk from the
//! ring neighbours. A session is granted only to a caller whose ring equals ours, so a
//! client or peer with another port order can never place or fetch a block here.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::Error;
use tracing::{error, info, warn};

use super::convert::{bad, read_block, read_key, read_layout, write_key};
use super::dfs_capnp::{data_server, data_session};
use super::net::{self, blocking};
use crate::block::{Block, BlockKey};
use crate::blockstore::{BlockStore, StoreError};
use crate::engine::MAX_CUTS;
use crate::layout::{ring_difference, validate_shape, Layout, MAX_BLOCK_SIZE};
use crate::placement::holds;

/// Most keys one get or list may name.
const MAX_KEYS: usize = 64 * 1024;
/// Gets of at most this many blocks are served inline.
const INLINE_GET_KEYS: usize = 4;
/// Most block bytes one reply may carry (below the 64 MiB message limit).
const MAX_REPLY_BYTES: usize = 48 << 20;

#[derive(Clone, Debug, Default)]
pub struct RebuildProgress {
    pub active: bool,
    pub copied: u64,
    pub listed: u64,
    pub peers_left: u32,
}

/// What every connection to this dataserver shares.
pub struct DataNode {
    pub store: Arc<BlockStore>,
    pub index: usize,
    pub ring: Vec<String>,
    pub data_dir: PathBuf,
    pub rebuild: RefCell<RebuildProgress>,
    /// The server's bandwidth cap (`--max-bandwidth`), charged for block bytes in and out.
    pub link: crate::throttle::Throttle,
}

fn store_err(e: StoreError) -> Error {
    bad(e.to_string())
}

pub struct DataServerImpl {
    pub node: Rc<DataNode>,
}

impl data_server::Server for DataServerImpl {
    async fn connect(
        self: Rc<Self>,
        params: data_server::ConnectParams,
        mut results: data_server::ConnectResults,
    ) -> Result<(), Error> {
        let layout = read_layout(params.get()?.get_layout()?)?;
        if let Some(diff) = ring_difference(&self.node.ring, &layout.servers) {
            // A client or peer with another ring: one of us was started with a wrong port list.
            error!(server = self.node.index, "refused a session to a caller whose ring differs: {diff}");
            return Err(bad(format!("dataserver {} refuses: {diff}", self.node.index)));
        }
        // A session that writes must say what blocks are; a rebuilding peer (shape 0) only reads.
        let writable = layout.block_size != 0;
        if writable {
            validate_shape(layout.block_size, layout.replicas).map_err(bad)?;
        }
        let session = DataSessionImpl { node: self.node.clone(), block_size: writable.then_some(layout.block_size) };
        results.get().set_session(capnp_rpc::new_client(session));
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _: data_server::StatusParams,
        mut results: data_server::StatusResults,
    ) -> Result<(), Error> {
        let store = self.node.store.clone();
        let (blocks, bytes) = blocking(move || store.stats()).await?.map_err(|e| bad(e.to_string()))?;
        let fs = nix::sys::statvfs::statvfs(&self.node.data_dir).ok();
        let mut s = results.get().init_status();
        s.set_index(self.node.index as u32);
        let mut list = s.reborrow().init_servers(self.node.ring.len() as u32);
        for (i, a) in self.node.ring.iter().enumerate() {
            list.set(i as u32, a.as_str());
        }
        s.set_blocks(blocks);
        s.set_bytes(bytes);
        let r = self.node.rebuild.borrow().clone();
        s.set_rebuilding(r.active);
        s.set_rebuild_done(r.copied);
        s.set_rebuild_listed(r.listed);
        s.set_rebuild_peers_left(r.peers_left);
        if let Some(fs) = fs {
            let frsize = fs.fragment_size();
            s.set_disk_total(fs.blocks() * frsize);
            s.set_disk_free(fs.blocks_available() * frsize);
            s.set_disk_id(fs.filesystem_id());
        }
        Ok(())
    }
}

struct DataSessionImpl {
    node: Rc<DataNode>,
    /// The block size of the caller's layout; `None` for a read-only (rebuilding peer) session.
    block_size: Option<u32>,
}

impl data_session::Server for DataSessionImpl {
    async fn put(self: Rc<Self>, params: data_session::PutParams, _: data_session::PutResults) -> Result<(), Error> {
        let block_size = self.block_size.ok_or_else(|| bad("this session may not write: no block size given"))?;
        let p = params.get()?;
        let repair = p.get_repair();
        let list = p.get_blocks()?;
        let n = self.node.ring.len();
        let mut blocks = Vec::with_capacity(list.len() as usize);
        for r in list.iter() {
            let b = read_block(r, block_size as usize)?;
            if b.replicas == 0 || usize::from(b.replicas) > n {
                return Err(bad(format!(
                    "block {}/{}: {} replicas in a ring of {n}",
                    b.key.file_id, b.key.index, b.replicas
                )));
            }
            if !holds(self.node.index, b.key.file_id, b.key.index, usize::from(b.replicas), n) {
                return Err(bad(format!(
                    "block {}/{} does not belong on dataserver {}",
                    b.key.file_id, b.key.index, self.node.index
                )));
            }
            blocks.push(b);
        }
        self.node.link.pass(blocks.iter().map(|b| b.data.len()).sum()).await;
        let store = self.node.store.clone();
        blocking(move || store.put(&blocks, repair)).await?.map_err(store_err)?;
        Ok(())
    }

    async fn get(
        self: Rc<Self>,
        params: data_session::GetParams,
        mut results: data_session::GetResults,
    ) -> Result<(), Error> {
        let list = params.get()?.get_keys()?;
        if list.len() as usize > MAX_KEYS {
            return Err(bad(format!("at most {MAX_KEYS} keys per get, got {}", list.len())));
        }
        let keys: Vec<BlockKey> = list.iter().map(read_key).collect();
        // A small read is answered on the RPC thread: an LMDB read is a copy out of the map, cheaper
        // than a hop to a worker thread and back. Large ones go to a worker, so that page faults on
        // cold data do not hold up this server's other calls.
        let found = if keys.len() <= INLINE_GET_KEYS {
            self.node.store.get(&keys)
        } else {
            let store = self.node.store.clone();
            blocking(move || store.get(&keys)).await?
        };
        let found = found.map_err(|e| bad(e.to_string()))?;
        let bytes: usize = found.iter().flatten().map(|b| b.data.len()).sum();
        if bytes > MAX_REPLY_BYTES {
            return Err(bad(format!("the reply would carry {bytes} bytes; ask for fewer blocks")));
        }
        self.node.link.pass(bytes).await;
        let mut r = results.get();
        r.set_rebuilding(self.node.rebuild.borrow().active);
        let mut out = r.init_blocks(found.len() as u32);
        for (i, b) in found.iter().enumerate() {
            if let Some(b) = b {
                let mut o = out.reborrow().get(i as u32);
                o.set_found(true);
                o.set_version(b.version);
                o.set_replicas(b.replicas);
                o.set_md5(&b.md5);
                o.set_data(&b.data);
            }
        }
        Ok(())
    }

    async fn truncate(
        self: Rc<Self>,
        params: data_session::TruncateParams,
        mut results: data_session::TruncateResults,
    ) -> Result<(), Error> {
        self.block_size.ok_or_else(|| bad("this session may not write"))?;
        let list = params.get()?.get_cuts()?;
        if list.len() as usize > MAX_CUTS {
            return Err(bad(format!("at most {MAX_CUTS} cuts per truncate, got {}", list.len())));
        }
        let cuts: Vec<(u64, u64)> = list.iter().map(|c| (c.get_file_id(), c.get_from_block())).collect();
        let store = self.node.store.clone();
        let n = blocking(move || store.truncate(&cuts)).await?.map_err(|e| bad(e.to_string()))?;
        results.get().set_removed(n);
        Ok(())
    }

    async fn corrupt(
        self: Rc<Self>,
        params: data_session::CorruptParams,
        mut results: data_session::CorruptResults,
    ) -> Result<(), Error> {
        let fid = params.get()?.get_file_id();
        let store = self.node.store.clone();
        let hit = blocking(move || store.corrupt(fid)).await?.map_err(|e| bad(e.to_string()))?;
        if let Some(i) = hit {
            warn!(file_id = fid, block = i, "corrupted a block on request");
        }
        results.get().set_index(hit.map(|i| i as i64).unwrap_or(-1));
        Ok(())
    }

    async fn list_for(
        self: Rc<Self>,
        params: data_session::ListForParams,
        mut results: data_session::ListForResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let n = self.node.ring.len();
        let target = p.get_target() as usize;
        if target >= n {
            return Err(bad(format!("server {target} is not in a ring of {n}")));
        }
        let limit = (p.get_limit() as usize).clamp(1, MAX_KEYS);
        let after = read_key(p.get_after()?);
        let store = self.node.store.clone();
        let (keys, done) = blocking(move || {
            store.list(after, limit, |k, replicas| holds(target, k.file_id, k.index, usize::from(replicas), n))
        })
        .await?
        .map_err(|e| bad(e.to_string()))?;
        let mut r = results.get();
        r.set_done(done);
        let mut kl = r.reborrow().init_keys(keys.len() as u32);
        for (i, (k, _)) in keys.iter().enumerate() {
            write_key(kl.reborrow().get(i as u32), *k);
        }
        let mut vl = r.init_versions(keys.len() as u32);
        for (i, (_, v)) in keys.iter().enumerate() {
            vl.set(i as u32, *v);
        }
        Ok(())
    }
}

/// Asks every peer for its ring and logs an ERROR for each whose ring differs from this server's
/// (a server started with its ports in another order, or with a typo, would otherwise look healthy
/// while refusing every client). A peer that is down is asked again until it answers.
pub async fn compare_rings(node: Rc<DataNode>) {
    let me = node.index;
    let mut waiting: Vec<usize> = (0..node.ring.len()).filter(|&j| j != me).collect();
    let mut delay = Duration::from_millis(200);
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for peer in waiting {
            match peer_ring(&node.ring[peer]).await {
                Ok(theirs) => match ring_difference(&theirs, &node.ring) {
                    Some(diff) => error!(
                        server = me,
                        peer, "this server's ring differs from that of dataserver {peer} ({}): {diff}", node.ring[peer]
                    ),
                    None => tracing::debug!(server = me, peer, "same ring as dataserver {peer}"),
                },
                Err(_) => still.push(peer),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// The ring a dataserver at `addr` was started with.
async fn peer_ring(addr: &str) -> Result<Vec<String>, Error> {
    let server: data_server::Client = net::connect(addr).await.map_err(|e| Error::disconnected(e.to_string()))?;
    let reply = tokio::time::timeout(Duration::from_secs(10), server.status_request().send().promise)
        .await
        .map_err(|_| Error::disconnected(format!("{addr}: no answer")))??;
    let list = reply.get()?.get_status()?.get_servers()?;
    list.iter().map(|s| Ok(s?.to_string()?)).collect()
}

/// Copies from every peer the blocks this server should hold. Serves meanwhile; keeps
/// retrying a peer that is down, since it may hold the only other copy. Completion is recorded in
/// the store, so a server killed mid-rebuild resumes the rebuild when restarted.
pub async fn rebuild(node: Rc<DataNode>) {
    let n = node.ring.len();
    let me = node.index;
    // Nearest peers first: with R replicas only those within R-1 positions share blocks with us.
    let mut peers: Vec<usize> = (0..n).filter(|&j| j != me).collect();
    peers.sort_by_key(|&j| {
        let d = (j + n - me) % n;
        d.min(n - d)
    });
    {
        let mut p = node.rebuild.borrow_mut();
        p.active = true;
        p.peers_left = peers.len() as u32;
    }
    info!(server = me, peers = peers.len(), "store is new or incomplete; rebuilding from the peers");
    for peer in peers {
        let mut after = BlockKey { file_id: 0, index: 0 };
        let mut delay = Duration::from_millis(100);
        // One connection per peer, kept across retries until it breaks.
        let mut conn: Option<data_server::Client> = None;
        loop {
            match rebuild_from(&node, peer, &mut after, &mut conn).await {
                Ok(()) => break,
                Err(e) => {
                    if e.kind == capnp::ErrorKind::Disconnected {
                        conn = None;
                    }
                    warn!(server = me, peer, addr = %node.ring[peer], "rebuild: peer {peer}: {e}; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        let p = {
            let mut p = node.rebuild.borrow_mut();
            p.peers_left -= 1;
            p.clone()
        };
        info!(
            "rebuild: peer {peer} done; {} blocks copied of {} listed, {} peers left",
            p.copied, p.listed, p.peers_left
        );
    }
    let store = node.store.clone();
    match blocking(move || store.mark_complete()).await {
        Ok(Ok(())) => {
            let copied = node.rebuild.borrow().copied;
            node.rebuild.borrow_mut().active = false;
            info!(server = me, copied, "rebuild complete");
        }
        Ok(Err(e)) => warn!("rebuild: cannot record completion: {e}"),
        Err(e) => warn!("rebuild: cannot record completion: {e}"),
    }
}

/// Copies from `peer`, page by page, every block this server should hold, resuming after `after`
/// (advanced as pages are done, so that a retry after a lost connection does not start over).
async fn rebuild_from(
    node: &DataNode,
    peer: usize,
    after: &mut BlockKey,
    conn: &mut Option<data_server::Client>,
) -> Result<(), Error> {
    const PAGE: u32 = 1024;
    let server = match conn {
        Some(c) => c.clone(),
        None => {
            let c: data_server::Client =
                net::connect(&node.ring[peer]).await.map_err(|e| Error::disconnected(e.to_string()))?;
            conn.insert(c).clone()
        }
    };
    let mut req = server.connect_request();
    super::convert::write_layout(
        req.get().init_layout(),
        &Layout { servers: node.ring.clone(), block_size: 0, replicas: 0 },
    );
    let session = req.send().pipeline.get_session();
    loop {
        let mut req = session.list_for_request();
        req.get().set_target(node.index as u32);
        req.get().set_limit(PAGE);
        write_key(req.get().init_after(), *after);
        let reply = req.send().promise.await?;
        let r = reply.get()?;
        let keys: Vec<BlockKey> = r.get_keys()?.iter().map(read_key).collect();
        let versions: Vec<u64> = r.get_versions()?.iter().collect();
        let done = r.get_done();
        node.rebuild.borrow_mut().listed += keys.len() as u64;
        let store = node.store.clone();
        let ks = keys.clone();
        let local = blocking(move || store.get(&ks)).await?.map_err(|e| bad(e.to_string()))?;
        let wanted: Vec<BlockKey> = keys
            .iter()
            .zip(&versions)
            .zip(&local)
            .filter(|((_, v), l)| l.as_ref().is_none_or(|l| l.version < **v || !l.verifies()))
            .map(|((k, _), _)| *k)
            .collect();
        for chunk in wanted.chunks(64) {
            let mut req = session.get_request();
            let mut kl = req.get().init_keys(chunk.len() as u32);
            for (i, k) in chunk.iter().enumerate() {
                write_key(kl.reborrow().get(i as u32), *k);
            }
            let reply = req.send().promise.await?;
            let mut blocks = Vec::new();
            for (k, b) in chunk.iter().zip(reply.get()?.get_blocks()?.iter()) {
                if !b.get_found() {
                    continue; // deleted meanwhile
                }
                let blk = Block {
                    key: *k,
                    version: b.get_version(),
                    replicas: b.get_replicas(),
                    md5: super::convert::read_md5(b.get_md5()?)?,
                    data: b.get_data()?.to_vec(),
                };
                if blk.data.len() > MAX_BLOCK_SIZE as usize || blk.replicas == 0 {
                    continue;
                }
                if blk.verifies() {
                    blocks.push(blk);
                } else {
                    warn!(
                        "rebuild: peer {peer} holds a corrupt copy of {}/{}; another peer may have it",
                        k.file_id, k.index
                    );
                }
            }
            let count = blocks.len() as u64;
            let store = node.store.clone();
            blocking(move || store.put(&blocks, true)).await?.map_err(store_err)?;
            node.rebuild.borrow_mut().copied += count;
        }
        if let Some(last) = keys.last() {
            *after = *last;
        }
        if done {
            return Ok(());
        }
    }
}
