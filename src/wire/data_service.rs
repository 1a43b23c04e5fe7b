//! The dataserver's RPC adapter over its [`BlockStore`](crate::dataserver::blockstore::BlockStore).
//! A session is granted only to a caller whose ring equals ours, so a client or peer with another
//! port order can never place or fetch a block here.

use std::rc::Rc;

use capnp::Error;
use tracing::{error, warn};

use super::convert::{bad, read_block, read_claim, read_key, write_key};
use super::dfs_capnp::{block_reply, data_server, data_session};
use super::net::blocking;
use crate::dataserver::blockstore::{Cut, HintFor, StoreError};
use crate::dataserver::scrub::ScrubStatus;
use crate::dataserver::DataNode;
use crate::shared::block::BlockKey;
use crate::shared::db::DbError;
use crate::shared::layout::{ring_difference, validate_shape, Claim, MAX_BLOCK_SIZE};
use crate::shared::metrics;
use crate::shared::placement::holds;
use crate::shared::MAX_CUTS;

/// Most keys one get or list may name.
const MAX_KEYS: usize = 64 * 1024;
/// Gets of at most this many blocks are served inline.
const INLINE_GET_KEYS: usize = 4;
/// Most block bytes one reply may carry (below the 64 MiB message limit).
pub(crate) const MAX_REPLY_BYTES: usize = 48 << 20;

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::Db(DbError::NoSpace) => bad(format!("{} {e}", crate::shared::NO_SPACE_TAG)),
        e => bad(e.to_string()),
    }
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
        let claim = read_claim(params.get()?.get_layout()?)?;
        if let Some(diff) = ring_difference(&self.node.ring, claim.ring()) {
            // A client or peer with another ring: one of us was started with a wrong port list.
            error!(server = self.node.index, "refused a session to a caller whose ring differs: {diff}");
            return Err(bad(format!("dataserver {} refuses: {diff}", self.node.index)));
        }
        // A client says what blocks are; a peer names only the ring (it does not know the block
        // size) and writes only copies it read from another server: hand-overs, scrub repairs.
        let block_size = match claim {
            Claim::Layout(l) => {
                validate_shape(l.block_size, l.replicas).map_err(|e| bad(e.to_string()))?;
                Some(l.block_size)
            }
            Claim::Ring(_) => Some(MAX_BLOCK_SIZE),
        };
        let session = DataSessionImpl { node: self.node.clone(), block_size };
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
        let mut skipped = s.reborrow().init_rebuild_skipped(r.skipped.len() as u32);
        for (i, p) in r.skipped.iter().enumerate() {
            skipped.set(i as u32, *p as u32);
        }
        s.set_rebuild_nowhere(r.nowhere);
        let mut keys = s.reborrow().init_rebuild_nowhere_keys(r.nowhere_keys.len() as u32);
        for (i, k) in r.nowhere_keys.iter().enumerate() {
            let mut o = keys.reborrow().get(i as u32);
            o.set_file_id(k.file_id);
            o.set_index(k.index);
        }
        s.set_hints(self.node.store.hint_count().unwrap_or(0));
        s.set_catching_up(self.node.catching_up.get());
        write_scrub(s.reborrow().init_scrub(), &self.node.scrub.status());
        if let Some(fs) = fs {
            let frsize = fs.fragment_size();
            s.set_disk_total(fs.blocks() * frsize);
            // What it may still take for blocks: not the reserve, and free pages inside count.
            s.set_disk_free(self.node.room());
            s.set_disk_id(fs.filesystem_id());
        }
        Ok(())
    }

    async fn scrub(
        self: Rc<Self>,
        params: data_server::ScrubParams,
        mut results: data_server::ScrubResults,
    ) -> Result<(), Error> {
        if params.get()?.get_start() {
            self.node.scrub.start_now();
        }
        write_scrub(results.get().init_status(), &self.node.scrub.status());
        Ok(())
    }
}

fn write_scrub(mut b: super::dfs_capnp::scrub_status::Builder, s: &ScrubStatus) {
    b.set_running(s.running);
    b.set_passes(s.passes);
    b.set_started_at(s.started_at);
    b.set_finished_at(s.finished_at);
    b.set_checked(s.checked);
    b.set_total(s.total);
    b.set_corrupt(s.corrupt);
    b.set_repaired(s.repaired);
    b.set_pushed(s.pushed);
    b.set_ranges_differed(s.ranges_differed);
    b.set_rate(s.rate);
    b.set_unreachable(s.unreachable);
}

struct DataSessionImpl {
    node: Rc<DataNode>,
    /// The block size of the caller's layout; `None` for a read-only (rebuilding peer) session.
    block_size: Option<u32>,
}

impl DataSessionImpl {
    /// A server position named by a request, checked against the ring.
    fn in_ring(&self, i: u32) -> Result<usize, Error> {
        let n = self.node.ring.len();
        match usize::try_from(i) {
            Ok(i) if i < n => Ok(i),
            _ => Err(bad(format!("server {i} is not in a ring of {n}"))),
        }
    }
}

/// A block reply for a block held here.
fn write_found(mut o: block_reply::Builder, version: u64, replicas: u8, md5: &[u8], data: &[u8]) {
    o.set_found(true);
    o.set_version(version);
    o.set_replicas(replicas);
    o.set_md5(md5);
    o.set_data(data);
}

impl data_session::Server for DataSessionImpl {
    #[tracing::instrument(level = "debug", skip_all, fields(server = self.node.index))]
    async fn put(self: Rc<Self>, params: data_session::PutParams, _: data_session::PutResults) -> Result<(), Error> {
        let mut op = metrics::op("put");
        let block_size = self.block_size.ok_or_else(|| bad("this session may not write: no block size given"))?;
        let p = params.get()?;
        let repair = p.get_repair();
        let hint = p.get_hint().then_some(HintFor { me: self.node.index, n: self.node.ring.len() });
        let list = p.get_blocks()?;
        let n = self.node.ring.len();
        // Not sized by the request's count: a list of empty structs claims millions of elements.
        let mut blocks = Vec::new();
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
        let bytes: usize = blocks.iter().map(|b| b.data.len()).sum();
        let count = blocks.len();
        self.node.put(blocks, repair, hint).await.map_err(bad)?.map_err(store_err)?;
        if repair {
            metrics::repaired(count as u64);
        }
        op.ok(bytes);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(server = self.node.index))]
    async fn get(
        self: Rc<Self>,
        params: data_session::GetParams,
        mut results: data_session::GetResults,
    ) -> Result<(), Error> {
        let mut op = metrics::op("get");
        let list = params.get()?.get_keys()?;
        if list.len() as usize > MAX_KEYS {
            return Err(bad(format!("at most {MAX_KEYS} keys per get, got {}", list.len())));
        }
        let keys: Vec<BlockKey> = list.iter().map(read_key).collect();
        // A small read is answered on the RPC thread: an LMDB read is a copy out of the map, cheaper
        // than a hop to a worker thread and back. Large ones go to a worker, so that page faults on
        // cold data do not hold up this server's other calls.
        let found = if keys.len() <= INLINE_GET_KEYS {
            self.node.store.get_within(&keys, MAX_REPLY_BYTES)
        } else {
            let store = self.node.store.clone();
            let keys = keys.clone();
            blocking(move || store.get_within(&keys, MAX_REPLY_BYTES)).await?
        };
        let found = found
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad(format!("the reply would carry over {MAX_REPLY_BYTES} bytes; ask for fewer blocks")))?;
        // For the keys not held: whether a cut removed them, so that a reader comparing replicas
        // can tell a deleted block from a lost one.
        let missing: Vec<BlockKey> = keys.iter().zip(&found).filter(|(_, b)| b.is_none()).map(|(k, _)| *k).collect();
        let cut_versions = if missing.is_empty() {
            vec![]
        } else {
            self.node.store.cut_versions(&missing).map_err(|e| bad(e.to_string()))?
        };
        let mut cut_versions = cut_versions.into_iter();
        let bytes: usize = found.iter().flatten().map(|b| b.data.len()).sum();
        self.node.link.pass(bytes).await;
        let mut r = results.get();
        r.set_rebuilding(self.node.rebuild.borrow().active || self.node.catching_up.get());
        let mut out = r.init_blocks(found.len() as u32);
        for (i, b) in found.iter().enumerate() {
            if let Some(b) = b {
                write_found(out.reborrow().get(i as u32), b.version, b.replicas, &b.md5, &b.data);
            } else {
                out.reborrow().get(i as u32).set_cut_version(cut_versions.next().unwrap_or(0));
            }
        }
        op.ok(bytes);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(server = self.node.index))]
    async fn get_range(
        self: Rc<Self>,
        params: data_session::GetRangeParams,
        mut results: data_session::GetRangeResults,
    ) -> Result<(), Error> {
        let mut op = metrics::op("get");
        let p = params.get()?;
        let key = read_key(p.get_key()?);
        let (from, to) = (p.get_from() as usize, p.get_to() as usize);
        if from > to {
            return Err(bad(format!("a range from {from} to {to}")));
        }
        // One block, read from the map on the RPC thread (see `get`).
        let part = self.node.store.get_range(key, from, to).map_err(|e| bad(e.to_string()))?;
        let cut_version = match part {
            Some(_) => 0,
            None => self.node.store.cut_versions(&[key]).map_err(|e| bad(e.to_string()))?.pop().unwrap_or(0),
        };
        let bytes = part.as_ref().map_or(0, |p| p.data.len());
        self.node.link.pass(bytes).await;
        let mut r = results.get();
        r.set_rebuilding(self.node.rebuild.borrow().active || self.node.catching_up.get());
        if let Some(part) = part {
            r.set_offset(part.offset as u32);
            r.set_length(part.len as u32);
            r.set_page_md5s(&part.pages.concat());
            write_found(r.init_block(), part.version, part.replicas, &part.md5, &part.data);
        } else {
            r.init_block().set_cut_version(cut_version);
        }
        op.ok(bytes);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(server = self.node.index))]
    async fn truncate(
        self: Rc<Self>,
        params: data_session::TruncateParams,
        mut results: data_session::TruncateResults,
    ) -> Result<(), Error> {
        let mut op = metrics::op("truncate");
        self.block_size.ok_or_else(|| bad("this session may not write"))?;
        let p = params.get()?;
        let hint = p.get_hint().then_some(HintFor { me: self.node.index, n: self.node.ring.len() });
        let list = p.get_cuts()?;
        if list.len() as usize > MAX_CUTS {
            return Err(bad(format!("at most {MAX_CUTS} cuts per truncate, got {}", list.len())));
        }
        let cuts: Vec<Cut> = list
            .iter()
            .map(|c| Cut { file_id: c.get_file_id(), from_block: c.get_from_block(), version: c.get_version() })
            .collect();
        let store = self.node.store.clone();
        let settle = self.node.room_is_short();
        let n = blocking(move || {
            let n = store.truncate(&cuts, hint)?;
            if n > 0 && settle {
                store.settle()?;
            }
            Ok::<_, crate::shared::db::DbError>(n)
        })
        .await?
        .map_err(|e| store_err(e.into()))?;
        self.node.keep_reserve();
        results.get().set_removed(n);
        op.ok(0);
        Ok(())
    }

    async fn drop(
        self: Rc<Self>,
        params: data_session::DropParams,
        mut results: data_session::DropResults,
    ) -> Result<(), Error> {
        self.block_size.ok_or_else(|| bad("this session may not write"))?;
        let p = params.get()?;
        let (keys, versions) = (p.get_keys()?, p.get_versions()?);
        if keys.len() != versions.len() || keys.len() as usize > MAX_CUTS {
            return Err(bad(format!(
                "a drop names {} keys and {} versions (equal, at most {MAX_CUTS})",
                keys.len(),
                versions.len()
            )));
        }
        let list: Vec<_> = keys.iter().map(read_key).zip(versions.iter()).collect();
        let store = self.node.store.clone();
        let n = blocking(move || store.drop_if(&list)).await?.map_err(|e| bad(e.to_string()))?;
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

    #[tracing::instrument(level = "debug", skip_all, fields(server = self.node.index))]
    async fn list_for(
        self: Rc<Self>,
        params: data_session::ListForParams,
        mut results: data_session::ListForResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let n = self.node.ring.len();
        let target = self.in_ring(p.get_target())?;
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
        r.set_rebuilding(self.node.rebuild.borrow().active);
        let mut kl = r.reborrow().init_keys(keys.len() as u32);
        for (i, (k, ..)) in keys.iter().enumerate() {
            write_key(kl.reborrow().get(i as u32), *k);
        }
        let mut vl = r.reborrow().init_versions(keys.len() as u32);
        for (i, (_, v, _)) in keys.iter().enumerate() {
            vl.set(i as u32, *v);
        }
        r.set_md5s(&keys.iter().flat_map(|(.., md5)| *md5).collect::<Vec<u8>>());
        Ok(())
    }

    async fn versions(
        self: Rc<Self>,
        params: data_session::VersionsParams,
        mut results: data_session::VersionsResults,
    ) -> Result<(), Error> {
        let list = params.get()?.get_keys()?;
        if list.len() as usize > MAX_KEYS {
            return Err(bad(format!("at most {MAX_KEYS} keys per call, got {}", list.len())));
        }
        let keys: Vec<BlockKey> = list.iter().map(read_key).collect();
        let store = self.node.store.clone();
        let v = blocking(move || store.versions(&keys)).await?.map_err(|e| bad(e.to_string()))?;
        let mut out = results.get().init_versions(v.len() as u32);
        for (i, v) in v.into_iter().enumerate() {
            out.set(i as u32, v);
        }
        Ok(())
    }

    async fn digest(
        self: Rc<Self>,
        params: data_session::DigestParams,
        mut results: data_session::DigestResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let (peer, n) = (self.in_ring(p.get_peer())?, self.node.ring.len());
        let from = read_key(p.get_from()?);
        let to = if p.get_has_to() { Some(read_key(p.get_to()?)) } else { None };
        let store = self.node.store.clone();
        let (count, digest) = blocking(move || {
            store.digest(from, to, |k, replicas| holds(peer, k.file_id, k.index, usize::from(replicas), n))
        })
        .await?
        .map_err(|e| bad(e.to_string()))?;
        let mut r = results.get();
        r.set_count(count);
        r.set_digest(&digest);
        Ok(())
    }

    async fn list_cuts(
        self: Rc<Self>,
        params: data_session::ListCutsParams,
        mut results: data_session::ListCutsResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let (from, limit) = (p.get_from(), (p.get_limit() as usize).clamp(1, MAX_KEYS));
        let store = self.node.store.clone();
        let (cuts, done) = blocking(move || store.list_cuts(from, limit)).await?.map_err(|e| bad(e.to_string()))?;
        let mut r = results.get();
        r.set_done(done);
        super::convert::write_cuts(r.init_cuts(cuts.len() as u32), &cuts);
        Ok(())
    }

    async fn hints_for(
        self: Rc<Self>,
        params: data_session::HintsForParams,
        mut results: data_session::HintsForResults,
    ) -> Result<(), Error> {
        let (target, before) = (self.in_ring(params.get()?.get_target())?, params.get()?.get_before());
        let store = self.node.store.clone();
        let n = blocking(move || store.hints_for(target, before)).await?.map_err(|e| bad(e.to_string()))?;
        results.get().set_count(n);
        Ok(())
    }
}
