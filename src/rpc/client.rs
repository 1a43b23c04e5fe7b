//! The client side of the wire: the metaserver client, the engine's [`DataPort`] over capnp, and
//! [`Cluster`], the `Send + Sync` handle that multi-threaded callers (FUSE workers, dfsctl, the lab)
//! use. capnp-rpc is `!Send`: each calling thread has its own connections in a tokio `LocalSet`.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use capnp::ErrorKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use tracing::{debug, info, warn};

use super::convert::{
    errno_from_wire, read_attr, read_layout, read_md5, write_block, write_key, write_layout, write_setattr,
};
use super::dfs_capnp::{attr, data_server, data_session, meta, Errno};
use super::net;
use crate::block::{Block, BlockKey};
use crate::engine::{Backoff, DataPort, Engine, EngineError, GetReply, PortError, Problems, VersionClock, MAX_CUTS};
use crate::interrupt::Caller;
use crate::layout::{parse_addr, Layout};
use crate::namespace::{Attr, FsError, FsResult, Kind, NewNode, SetAttr, ROOT};

/// A call to a dataserver that takes longer than this is treated as a lost connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn attr_result(err: Result<Errno, capnp::NotInSchema>, a: capnp::Result<attr::Reader>) -> FsResult<Attr> {
    errno_from_wire(err)?;
    read_attr(a.map_err(|e| FsError::Io(e.to_string()))?).map_err(|e| FsError::Io(e.to_string()))
}

/// The metaserver, reconnected on demand. While it cannot be reached, calls wait and retry with
/// backoff (as data calls wait for a down dataserver), logging which server they wait for once and
/// then every 10 s; the caller bounds the wait (a mount answers EINTR once its caller is signalled).
pub struct MetaClient {
    addr: String,
    conn: RefCell<Option<meta::Client>>,
    backoff: Backoff,
    /// False while connecting: a metaserver that is not there at start is an error, not a wait.
    patient: std::cell::Cell<bool>,
}

impl MetaClient {
    pub fn new(addr: String, backoff: Backoff) -> Self {
        MetaClient { addr, conn: RefCell::new(None), backoff, patient: std::cell::Cell::new(true) }
    }

    /// The error for an address that answers, but not a metaserver's calls: says what it is, if it
    /// is one of ours.
    async fn not_a_metaserver(&self, e: capnp::Error) -> FsError {
        let dataserver = async {
            let c: data_server::Client = net::connect(&self.addr).await.ok()?;
            c.status_request().send().promise.await.ok().map(|_| ())
        };
        FsError::Io(match dataserver.await {
            Some(()) => format!("{} is a dataserver, not a metaserver: name the metaserver's address", self.addr),
            None => format!("{} does not answer as a metaserver: {e}", self.addr),
        })
    }

    /// Runs `f` on a connection, reconnecting and retrying while the metaserver is unreachable.
    ///
    /// A call is retried only when its connection failed; one that the metaserver may have applied
    /// before its connection broke is retried too, so a retried create may find its own file (the
    /// price of waiting instead of failing; a replicated metaserver removes it with per-client
    /// sequence numbers).
    async fn call<T, Fut>(&self, f: impl Fn(meta::Client) -> Fut) -> FsResult<T>
    where
        Fut: Future<Output = Result<T, capnp::Error>>,
    {
        let mut delay = self.backoff.first;
        let mut waited = Duration::ZERO;
        let mut fresh = false;
        loop {
            let cached = self.conn.borrow().clone();
            let reused = cached.is_some();
            let attempt = match cached {
                Some(c) => Ok(c),
                None => net::connect::<meta::Client>(&self.addr).await.inspect(|c| {
                    *self.conn.borrow_mut() = Some(c.clone());
                }),
            };
            let why = match attempt {
                Ok(client) => match f(client).await {
                    Ok(v) => {
                        if waited > Duration::ZERO {
                            info!(server = %self.addr, waited = ?waited, "metaserver is back");
                        }
                        return Ok(v);
                    }
                    Err(e) if e.kind == ErrorKind::Disconnected => {
                        self.conn.borrow_mut().take();
                        e.to_string()
                    }
                    Err(e) if e.kind == ErrorKind::Unimplemented => return Err(self.not_a_metaserver(e).await),
                    Err(e) => return Err(FsError::Io(format!("metaserver {}: {e}", self.addr))),
                },
                Err(e) => e.to_string(),
            };
            if !self.patient.get() {
                return Err(FsError::Io(format!("metaserver {} unreachable: {why}", self.addr)));
            }
            // A kept connection to a metaserver that has since restarted: reconnect at once.
            if reused && !fresh {
                fresh = true;
                debug!(server = %self.addr, "metaserver connection broke ({why}); reconnecting");
                continue;
            }
            if waited == Duration::ZERO || waited.as_secs() / 10 != (waited + delay).as_secs() / 10 {
                warn!(server = %self.addr, waited = ?waited, "waiting for the metaserver: {why}");
            }
            tokio::time::sleep(delay).await;
            waited += delay;
            delay = (delay * 2).min(self.backoff.max);
        }
    }

    pub async fn register(&self, servers: &[String]) -> FsResult<Result<Layout, String>> {
        let l = Layout { servers: servers.to_vec(), block_size: 0, replicas: 0 };
        self.call(|c| {
            let mut req = c.register_request();
            write_layout(req.get().init_layout(), &l);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                let err = r.get_err()?.to_string()?;
                if !err.is_empty() {
                    return Ok(Err(err));
                }
                Ok(Ok(read_layout(r.get_layout()?)?))
            }
        })
        .await
    }

    pub async fn layout(&self) -> FsResult<Layout> {
        self.call(|c| {
            let req = c.layout_request();
            async move { read_layout(req.send().promise.await?.get()?.get_layout()?) }
        })
        .await
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.lookup_request();
            req.get().set_parent(parent);
            req.get().set_name(name);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.getattr_request();
            req.get().set_ino(ino);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.setattr_request();
            req.get().set_ino(ino);
            write_setattr(req.get().init_set(), set);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.mknod_request();
            let mut p = req.get();
            p.set_parent(parent);
            p.set_name(name);
            p.set_kind(super::convert::kind_to_wire(node.kind));
            p.set_perm(node.perm);
            p.set_uid(node.uid);
            p.set_gid(node.gid);
            p.set_rdev(node.rdev);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.symlink_request();
            let mut p = req.get();
            p.set_parent(parent);
            p.set_name(name);
            p.set_target(target);
            p.set_uid(uid);
            p.set_gid(gid);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.call(|c| {
            let mut req = c.readlink_request();
            req.get().set_ino(ino);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(errno_from_wire(r.get_err()).map(|_| r.get_target().map(|t| t.to_vec()).unwrap_or_default()))
            }
        })
        .await?
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.link_request();
            req.get().set_ino(ino);
            req.get().set_new_parent(new_parent);
            req.get().set_new_name(new_name);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        self.call(|c| {
            let mut req = c.unlink_request();
            req.get().set_parent(parent);
            req.get().set_name(name);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(errno_from_wire(r.get_err()).map(|_| r.get_orphan()))
            }
        })
        .await?
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.call(|c| {
            let mut req = c.rmdir_request();
            req.get().set_parent(parent);
            req.get().set_name(name);
            async move { Ok(errno_from_wire(req.send().promise.await?.get()?.get_err())) }
        })
        .await?
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<u64> {
        self.call(|c| {
            let mut req = c.rename_request();
            let mut p = req.get();
            p.set_parent(parent);
            p.set_name(name);
            p.set_new_parent(new_parent);
            p.set_new_name(new_name);
            p.set_flags(flags);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(errno_from_wire(r.get_err()).map(|_| r.get_orphan()))
            }
        })
        .await?
    }

    pub async fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Attr)>> {
        self.call(|c| {
            let mut req = c.readdir_request();
            req.get().set_ino(ino);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                if let Err(e) = errno_from_wire(r.get_err()) {
                    return Ok(Err(e));
                }
                let mut out = Vec::new();
                for e in r.get_entries()?.iter() {
                    out.push((e.get_name()?.to_vec(), read_attr(e.get_attr()?)?));
                }
                Ok(Ok(out))
            }
        })
        .await?
    }

    pub async fn extend(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.extend_request();
            req.get().set_ino(ino);
            req.get().set_size(size);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                Ok(attr_result(r.get_err(), r.get_attr()))
            }
        })
        .await?
    }

    /// Forgets orphans whose blocks are gone (at most [`MAX_CUTS`]).
    pub async fn purge(&self, inos: &[u64]) -> FsResult<()> {
        self.call(|c| {
            let mut req = c.purge_request();
            let mut list = req.get().init_inos(inos.len() as u32);
            for (i, &ino) in inos.iter().enumerate() {
                list.set(i as u32, ino);
            }
            async move { Ok(errno_from_wire(req.send().promise.await?.get()?.get_err())) }
        })
        .await?
    }

    pub async fn orphans(&self) -> FsResult<Vec<u64>> {
        self.call(|c| {
            let req = c.orphans_request();
            async move { Ok(req.send().promise.await?.get()?.get_inos()?.iter().collect()) }
        })
        .await
    }

    pub async fn inode_count(&self) -> FsResult<u64> {
        self.call(|c| {
            let req = c.stats_request();
            async move { Ok(req.send().promise.await?.get()?.get_inodes()) }
        })
        .await
    }
}

fn port_err(e: capnp::Error) -> PortError {
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
        let server: data_server::Client =
            net::connect(&self.layout.servers[s]).await.map_err(|e| PortError::Unreachable(e.to_string()))?;
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
            match server.status_request().send().promise.await.map_err(port_err) {
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
            index: r.get_index(),
            blocks: r.get_blocks(),
            bytes: r.get_bytes(),
            rebuilding: r.get_rebuilding(),
            rebuild_copied: r.get_rebuild_done(),
            rebuild_listed: r.get_rebuild_listed(),
            rebuild_peers_left: r.get_rebuild_peers_left(),
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

    async fn put(&self, server: usize, blocks: &[&Block], repair: bool) -> Result<(), PortError> {
        self.on(server, |c| {
            let mut req = c.put_request();
            req.get().set_repair(repair);
            let mut list = req.get().init_blocks(blocks.len() as u32);
            for (i, b) in blocks.iter().enumerate() {
                write_block(list.reborrow().get(i as u32), b);
            }
            async move {
                req.send().promise.await?;
                Ok(())
            }
        })
        .await
    }

    async fn get(&self, server: usize, keys: &[BlockKey]) -> Result<GetReply, PortError> {
        self.on(server, |c| {
            let mut req = c.get_request();
            let mut list = req.get().init_keys(keys.len() as u32);
            for (i, k) in keys.iter().enumerate() {
                write_key(list.reborrow().get(i as u32), *k);
            }
            async move {
                let reply = req.send().promise.await?;
                let r = reply.get()?;
                let mut blocks = Vec::with_capacity(keys.len());
                for (k, b) in keys.iter().zip(r.get_blocks()?.iter()) {
                    blocks.push(if b.get_found() {
                        Some(Block {
                            key: *k,
                            version: b.get_version(),
                            replicas: b.get_replicas(),
                            md5: read_md5(b.get_md5()?)?,
                            data: b.get_data()?.to_vec(),
                        })
                    } else {
                        None
                    });
                }
                Ok(GetReply { blocks, rebuilding: r.get_rebuilding() })
            }
        })
        .await
    }

    async fn truncate(&self, server: usize, cuts: &[(u64, u64)]) -> Result<u64, PortError> {
        self.on(server, |c| {
            let mut req = c.truncate_request();
            let mut list = req.get().init_cuts(cuts.len() as u32);
            for (i, &(file_id, from_block)) in cuts.iter().enumerate() {
                let mut cut = list.reborrow().get(i as u32);
                cut.set_file_id(file_id);
                cut.set_from_block(from_block);
            }
            async move { Ok(req.send().promise.await?.get()?.get_removed()) }
        })
        .await
    }
}

#[derive(Clone, Debug, Default)]
pub struct ServerStatus {
    pub index: u32,
    pub blocks: u64,
    pub bytes: u64,
    pub rebuilding: bool,
    pub rebuild_copied: u64,
    pub rebuild_listed: u64,
    pub rebuild_peers_left: u32,
    pub disk_total: u64,
    pub disk_free: u64,
    pub disk_id: u64,
    /// The ring the server was started with.
    pub servers: Vec<String>,
}

/// One thread's connections: its metaserver client and its engine (with its dataserver sessions).
pub struct Local {
    pub meta: MetaClient,
    pub engine: Engine<RpcDataPort>,
}

/// A thread's private RPC side: a current-thread runtime and `LocalSet` that the thread itself
/// drives while it waits for an answer.
struct ThreadClient {
    rt: tokio::runtime::Runtime,
    set: tokio::task::LocalSet,
    local: Rc<Local>,
}

struct Shared {
    id: usize,
    meta_addr: String,
    layout: Layout,
    backoff: Backoff,
    clock: Arc<VersionClock>,
    /// Every engine's "skip checksums" switch (a broken client for the lab's own tests).
    skip_checksums: Arc<std::sync::atomic::AtomicBool>,
}

/// This thread's clients, one per `Cluster`.
#[derive(Default)]
struct Clients(HashMap<usize, Rc<ThreadClient>>);

impl Drop for Clients {
    /// At thread exit tokio's own thread-locals may already be gone, and dropping a runtime then
    /// aborts the process. A thread's connections live as long as the thread (FUSE workers live as
    /// long as the mount), so they are left for the process's exit to close.
    fn drop(&mut self) {
        for (_, tc) in self.0.drain() {
            std::mem::forget(tc);
        }
    }
}

thread_local! {
    static CLIENTS: RefCell<Clients> = RefCell::new(Clients::default());
}

static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(1);

/// A connected client of the cluster: cheap to clone, usable from any thread.
///
/// capnp-rpc is `!Send`, so each calling thread gets its own connections and runtime, made on first
/// use, and drives them itself for the duration of a call. (Handing every call to one RPC thread
/// over a channel cost two thread wake-ups, 38 us per call measured on the reference machine, more
/// than a metaserver round trip itself; see README, "Performance".) A call that waits, such as a
/// write retrying for a down server, holds only its own thread.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    /// Ends a call early with [`FsError::Interrupted`] once this caller is signalled or gone
    /// (checked every [`crate::interrupt::POLL`] while the call waits).
    caller: Option<Caller>,
}

fn engine_err(e: EngineError) -> FsError {
    match e {
        EngineError::Invalid(m) => FsError::Invalid(m),
        EngineError::TooBig => FsError::TooBig,
        e => FsError::Io(e.to_string()),
    }
}

fn runtime() -> Result<(tokio::runtime::Runtime, tokio::task::LocalSet), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an RPC runtime: {e}"))?;
    Ok((rt, tokio::task::LocalSet::new()))
}

impl Cluster {
    /// Connects to the metaserver. With `servers`, registers that ring (the first time) or checks it
    /// against the recorded one, refusing a different one with a message saying what differs.
    /// Without, uses the recorded layout.
    pub fn connect(meta_addr: &str, servers: Option<&[String]>, backoff: Backoff) -> Result<Cluster, String> {
        let meta_addr = parse_addr(meta_addr).map_err(|e| format!("metaserver address: {e}"))?;
        let (rt, set) = runtime()?;
        let meta = MetaClient::new(meta_addr.clone(), backoff);
        meta.patient.set(false);
        let layout = set.block_on(&rt, async {
            match servers {
                Some(s) => meta.register(s).await.map_err(|e| e.to_string()).and_then(|r| r),
                None => meta.layout().await.map_err(|e| e.to_string()).and_then(|l| {
                    if l.servers.is_empty() {
                        Err("the metaserver has no dataserver list yet: mount once with the list".into())
                    } else {
                        Ok(l)
                    }
                }),
            }
        })?;
        meta.patient.set(true);
        layout.validate()?;
        let shared = Arc::new(Shared {
            id: NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed),
            meta_addr,
            layout,
            backoff,
            clock: Arc::default(),
            skip_checksums: Arc::default(),
        });
        // This thread keeps the connection it just made.
        let engine =
            Engine::new(RpcDataPort::new(shared.layout.clone()), &shared.layout, backoff, shared.clock.clone())
                .with_skip_checksums(shared.skip_checksums.clone());
        let tc = Rc::new(ThreadClient { rt, set, local: Rc::new(Local { meta, engine }) });
        CLIENTS.with(|c| c.borrow_mut().0.insert(shared.id, tc));
        Ok(Cluster { shared, caller: None })
    }

    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// Makes this client broken on purpose: reads no longer verify checksums. Only for testing
    /// that the lab fails such a client (`distributedfs --debug-skip-checksums`).
    pub fn debug_skip_checksums(&self) {
        self.shared.skip_checksums.store(true, Ordering::Relaxed);
    }

    fn thread_client(&self) -> Result<Rc<ThreadClient>, FsError> {
        if let Some(tc) = CLIENTS.with(|c| c.borrow().0.get(&self.shared.id).cloned()) {
            return Ok(tc);
        }
        let (rt, set) = runtime().map_err(FsError::Io)?;
        let sh = &self.shared;
        let engine = Engine::new(RpcDataPort::new(sh.layout.clone()), &sh.layout, sh.backoff, sh.clock.clone())
            .with_skip_checksums(sh.skip_checksums.clone());
        let local = Rc::new(Local { meta: MetaClient::new(sh.meta_addr.clone(), sh.backoff), engine });
        let tc = Rc::new(ThreadClient { rt, set, local });
        CLIENTS.with(|c| c.borrow_mut().0.insert(sh.id, tc.clone()));
        Ok(tc)
    }

    /// This cluster, with calls that give up (answering [`FsError::Interrupted`]) once `caller`
    /// no longer waits. A call dropped that way may still have been applied.
    pub fn interruptible(&self, caller: Caller) -> Cluster {
        Cluster { shared: self.shared.clone(), caller: Some(caller) }
    }

    /// Runs `f` with this thread's connections and waits for its result (or for the interrupt).
    /// Must not be called from inside another call (or any tokio runtime) on the same thread.
    pub fn run<T>(&self, f: impl FnOnce(Rc<Local>) -> LocalBoxFuture<'static, T>) -> Result<T, FsError> {
        let tc = self.thread_client()?;
        let call = f(tc.local.clone());
        let Some(caller) = self.caller else { return Ok(tc.set.block_on(&tc.rt, call)) };
        tc.set.block_on(&tc.rt, async {
            let watch = async {
                loop {
                    tokio::time::sleep(crate::interrupt::POLL).await;
                    if caller.interrupted() {
                        return;
                    }
                }
            };
            tokio::select! {
                v = call => Ok(v),
                () = watch => Err(FsError::Interrupted),
            }
        })
    }

    fn meta<T, Fut: Future<Output = FsResult<T>> + 'static>(&self, f: impl FnOnce(Rc<Local>) -> Fut) -> FsResult<T> {
        self.run(move |l| f(l).boxed_local())?
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let name = name.to_vec();
        self.meta(move |l| async move { l.meta.lookup(parent, &name).await })
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.meta(move |l| async move { l.meta.getattr(ino).await })
    }

    /// Changes attributes; a size change goes through [`Cluster::truncate`] first.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        self.meta(move |l| async move {
            if let Some(size) = set.size {
                let old = l.meta.getattr(ino).await?;
                if old.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                if old.kind != Kind::File {
                    return Err(FsError::Invalid("only regular files have a size to set".into()));
                }
                l.engine.truncate(ino, old.size, size).await.map_err(engine_err)?;
            }
            l.meta.setattr(ino, &set).await
        })
    }

    pub fn truncate(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.setattr(ino, SetAttr { size: Some(size), ..SetAttr::default() })
    }

    pub fn mknod(&self, parent: u64, name: &[u8], node: NewNode) -> FsResult<Attr> {
        let name = name.to_vec();
        self.meta(move |l| async move { l.meta.mknod(parent, &name, &node).await })
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        let (name, target) = (name.to_vec(), target.to_vec());
        self.meta(move |l| async move { l.meta.symlink(parent, &name, &target, uid, gid).await })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.meta(move |l| async move { l.meta.readlink(ino).await })
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        let new_name = new_name.to_vec();
        self.meta(move |l| async move { l.meta.link(ino, new_parent, &new_name).await })
    }

    /// Removes a name. Returns the inode orphaned by it (0 if none): call [`Cluster::reclaim`] on it
    /// once no one has it open.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        let name = name.to_vec();
        self.meta(move |l| async move { l.meta.unlink(parent, &name).await })
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let name = name.to_vec();
        self.meta(move |l| async move { l.meta.rmdir(parent, &name).await })
    }

    /// Renames; returns the inode orphaned by a replaced file (0 if none), as `unlink`.
    pub fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], flags: u32) -> FsResult<u64> {
        let (name, new_name) = (name.to_vec(), new_name.to_vec());
        self.meta(move |l| async move { l.meta.rename(parent, &name, new_parent, &new_name, flags).await })
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Attr)>> {
        self.meta(move |l| async move { l.meta.readdir(ino).await })
    }

    /// Deletes the blocks of orphans (inodes whose last link went and that nobody here has open),
    /// then forgets them: one commit per server and one on the metaserver for the whole batch.
    pub fn reclaim(&self, inos: Vec<u64>) -> FsResult<()> {
        self.meta(move |l| async move {
            l.engine.delete(&inos).await.map_err(engine_err)?;
            for chunk in inos.chunks(MAX_CUTS) {
                l.meta.purge(chunk).await?;
            }
            Ok(())
        })
    }

    pub fn orphans(&self) -> FsResult<Vec<u64>> {
        self.meta(move |l| async move { l.meta.orphans().await })
    }

    pub fn inode_count(&self) -> FsResult<u64> {
        self.meta(move |l| async move { l.meta.inode_count().await })
    }

    /// Reads up to `len` bytes at `offset`, the file's size taken from the metaserver.
    pub fn read(&self, ino: u64, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        self.meta(move |l| async move {
            let a = l.meta.getattr(ino).await?;
            if a.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            l.engine.read(ino, offset, len, a.size).await.map_err(engine_err)
        })
    }

    /// Reads with a size the caller already knows (a FUSE client with the file open). A block missing
    /// everywhere is a hole, unless the file itself is gone: another client deleted it and its blocks
    /// were reclaimed while this one had it open. That is an error (`Stale`), never zeros.
    pub fn read_at(&self, ino: u64, offset: u64, len: u64, size: u64) -> FsResult<Vec<u8>> {
        self.meta(move |l| async move {
            let (data, holes) = l.engine.read_noting_holes(ino, offset, len, size).await.map_err(engine_err)?;
            // Only a definite "no such inode" makes it stale: a metaserver that cannot answer must
            // not fail a read that the dataservers could serve (holes read as zeros).
            if holes && matches!(l.meta.getattr(ino).await, Err(FsError::NotFound)) {
                return Err(FsError::Stale);
            }
            Ok(data)
        })
    }

    /// Writes `data` at `offset` to every replica, then records the new size and mtime.
    pub fn write(&self, ino: u64, offset: u64, data: Vec<u8>) -> FsResult<Attr> {
        self.meta(move |l| async move {
            let a = l.meta.getattr(ino).await?;
            if a.kind != Kind::File {
                return Err(if a.kind == Kind::Dir { FsError::IsDir } else { FsError::Invalid("not a file".into()) });
            }
            l.engine.write(ino, offset, &data, a.size).await.map_err(engine_err)?;
            l.meta.extend(ino, offset + data.len() as u64).await
        })
    }

    /// Writes to a regular file whose size the caller knows (a mount, revalidated at open: a
    /// concurrent writer on another mount is not seen before the next open, as with NFS). The blocks
    /// and the new size are sent together; this returns once every replica and the metaserver have
    /// them. A client that dies in between may leave the size grown over zeros, never a torn block.
    pub fn write_at(&self, ino: u64, offset: u64, data: Vec<u8>, size: u64) -> FsResult<Attr> {
        self.meta(move |l| async move {
            let end = offset.checked_add(data.len() as u64).ok_or(FsError::TooBig)?;
            let (written, extended) = futures::join!(l.engine.write(ino, offset, &data, size), l.meta.extend(ino, end));
            written.map_err(engine_err)?;
            extended
        })
    }

    /// Per block with a problem, the replicas that are not fine.
    pub fn check(&self, ino: u64) -> FsResult<Problems> {
        self.meta(move |l| async move {
            let a = l.meta.getattr(ino).await?;
            Ok(l.engine.check(ino, a.size).await)
        })
    }

    pub fn server_status(&self, server: usize) -> FsResult<Result<ServerStatus, PortError>> {
        self.run(move |l| async move { l.engine.port().status(server).await }.boxed_local())
    }

    pub fn corrupt(&self, server: usize, ino: u64) -> FsResult<Result<Option<u64>, PortError>> {
        self.run(move |l| async move { l.engine.port().corrupt(server, ino).await }.boxed_local())
    }

    /// Resolves an absolute path inside the filesystem, without following symlinks.
    pub fn resolve(&self, path: &str) -> FsResult<Attr> {
        let mut a = self.getattr(ROOT)?;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            a = self.lookup(a.ino, part.as_bytes())?;
        }
        Ok(a)
    }
}
