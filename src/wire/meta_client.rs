//! The client's [`MetaPort`] over capnp-rpc.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::time::Duration;

use capnp::ErrorKind;
use tracing::{debug, info, warn};

use super::convert::{errno_from_wire, kind_to_wire, read_attr, read_layout, write_ring, write_setattr};
use super::dfs_capnp::{attr, data_server, meta, Errno};
use super::net;
use crate::client::engine::Backoff;
use crate::client::ports::{MetaPort, RegisterError};
use crate::shared::layout::Layout;
use crate::shared::{Attr, FsError, FsResult, NewNode, SetAttr};

fn attr_result(err: Result<Errno, capnp::NotInSchema>, a: capnp::Result<attr::Reader>) -> FsResult<Attr> {
    errno_from_wire(err)?;
    read_attr(a.map_err(|e| FsError::Io(e.to_string()))?).map_err(|e| FsError::Io(e.to_string()))
}

/// The metaserver, reconnected on demand. While it cannot be reached, calls wait and retry with
/// backoff (as data calls wait for a down dataserver), logging which server they wait for once and
/// then every 10 s; the caller bounds the wait (a mount answers EINTR once its caller is signalled).
pub struct RpcMetaPort {
    addr: String,
    conn: RefCell<Option<meta::Client>>,
    backoff: Backoff,
    /// False while connecting: a metaserver that is not there at start is an error, not a wait.
    patient: Cell<bool>,
}

impl RpcMetaPort {
    pub fn new(addr: String, backoff: Backoff) -> Self {
        RpcMetaPort { addr, conn: RefCell::new(None), backoff, patient: Cell::new(true) }
    }

    /// Fails a call at once while the metaserver cannot be reached (for connecting: a metaserver
    /// that is not there at start is an error, not a wait).
    pub fn impatient(self) -> Self {
        self.patient.set(false);
        self
    }

    /// Waits and retries while the metaserver cannot be reached (the default).
    pub fn patient(self) -> Self {
        self.patient.set(true);
        self
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

    /// The metaserver's reply to a register: its layout, or why it refused ours.
    async fn register_ring(&self, ring: &[String]) -> FsResult<Result<Layout, String>> {
        self.call(|c| {
            let mut req = c.register_request();
            write_ring(req.get().init_layout(), ring);
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
}

impl MetaPort for RpcMetaPort {
    async fn register(&self, ring: &[String]) -> Result<Layout, RegisterError> {
        self.register_ring(ring).await?.map_err(RegisterError::Refused)
    }

    async fn layout(&self) -> FsResult<Layout> {
        self.call(|c| {
            let req = c.layout_request();
            async move { read_layout(req.send().promise.await?.get()?.get_layout()?) }
        })
        .await
    }

    async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
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

    async fn getattr(&self, ino: u64) -> FsResult<Attr> {
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

    async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
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

    async fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.call(|c| {
            let mut req = c.mknod_request();
            let mut p = req.get();
            p.set_parent(parent);
            p.set_name(name);
            p.set_kind(kind_to_wire(node.kind));
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

    async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
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

    async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
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

    async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
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

    async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
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

    async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.call(|c| {
            let mut req = c.rmdir_request();
            req.get().set_parent(parent);
            req.get().set_name(name);
            async move { Ok(errno_from_wire(req.send().promise.await?.get()?.get_err())) }
        })
        .await?
    }

    async fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], flags: u32) -> FsResult<u64> {
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

    async fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Attr)>> {
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

    async fn extend(&self, ino: u64, size: u64) -> FsResult<Attr> {
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

    async fn purge(&self, inos: &[u64]) -> FsResult<()> {
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

    async fn orphans(&self) -> FsResult<Vec<u64>> {
        self.call(|c| {
            let req = c.orphans_request();
            async move { Ok(req.send().promise.await?.get()?.get_inos()?.iter().collect()) }
        })
        .await
    }

    async fn inode_count(&self) -> FsResult<u64> {
        self.call(|c| {
            let req = c.stats_request();
            async move { Ok(req.send().promise.await?.get()?.get_inodes()) }
        })
        .await
    }
}
