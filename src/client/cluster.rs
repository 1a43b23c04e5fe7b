//! [`Cluster`]: the `Send + Sync` handle to a cluster that multi-threaded callers (FUSE workers,
//! dfsctl, the lab) use. capnp-rpc is `!Send`: each calling thread gets its own connections (the
//! wire's ports) in a tokio `LocalSet`, made on first use, and drives them itself for the duration
//! of a call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::LocalBoxFuture;
use futures::FutureExt;

use super::engine::{Backoff, Engine, Problems, VersionClock};
use super::files::Files;
use super::fresh_dirs::FreshDirs;
use super::interrupt::Caller;
use super::ports::{MetaPort, RegisterError, ServerStatus};
use crate::dataserver::scrub::ScrubStatus;
use crate::metaserver::group::{ConfigError, GroupConfig};
use crate::metaserver::namespace::sessions::{Query, QueryReply};
use crate::metaserver::namespace::{Change, Outcome};
use crate::shared::layout::{Layout, LayoutError, Quorum};
use crate::shared::{Attr, FsError, FsResult, NewNode, PortError, SetAttr};
use crate::wire::{RpcDataPort, RpcMetaPort};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("metaserver address: {0}")]
    Address(ConfigError),
    #[error("cannot start an RPC runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Metaserver(FsError),
    #[error("{0}")]
    Refused(String),
    #[error("the metaserver has no dataserver list yet: run `dfsctl --meta META init <dataservers...>`, or mount once with the list")]
    NoLayout,
    #[error("the recorded layout is invalid: {0}")]
    Layout(LayoutError),
    #[error("{0}")]
    NotTheGroup(String),
}

impl From<RegisterError> for ConnectError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::Refused(m) => ConnectError::Refused(m),
            RegisterError::Fs(e) => ConnectError::Metaserver(e),
        }
    }
}

/// Refuses a list of metaservers that names one outside the group (a typo, or another group's
/// member), saying what differs, as the first member that answers knows the group. Members the
/// list lacks are fine (the client finds them through the others).
fn check_group(addrs: &[String]) -> Result<(), ConnectError> {
    use std::net::ToSocketAddrs;
    let resolve = |a: &str| a.to_socket_addrs().map(|i| i.collect::<Vec<_>>()).unwrap_or_default();
    let Some(info) = addrs.iter().find_map(|a| crate::wire::admin::member_info(a).ok()) else {
        return Ok(()); // none answers (yet): nothing to compare with
    };
    let nodes: Vec<(u64, Vec<std::net::SocketAddr>)> = info.nodes.iter().map(|(id, a, _)| (*id, resolve(a))).collect();
    let outside: Vec<&String> = addrs
        .iter()
        .filter(|a| {
            let mine = resolve(a);
            !nodes.iter().any(|(_, theirs)| theirs.iter().any(|t| mine.contains(t)))
        })
        .collect();
    if outside.is_empty() || nodes.is_empty() {
        return Ok(());
    }
    let group: Vec<String> = info.nodes.iter().map(|(id, a, _)| format!("member {id} {a}")).collect();
    let outside: Vec<&str> = outside.iter().map(|a| a.as_str()).collect();
    Err(ConnectError::NotTheGroup(format!(
        "the metaservers named are not one group: {} {} not in it (the group: {})",
        outside.join(", "),
        if outside.len() == 1 { "is" } else { "are" },
        group.join(", ")
    )))
}

/// One thread's connections.
pub type Local = Files<RpcMetaPort, RpcDataPort>;

/// A thread's private RPC side: a current-thread runtime and `LocalSet` that the thread itself
/// drives while it waits for an answer.
struct ThreadClient {
    rt: tokio::runtime::Runtime,
    set: tokio::task::LocalSet,
    local: Rc<Local>,
}

struct Shared {
    id: usize,
    meta_addrs: Vec<String>,
    layout: Layout,
    backoff: Backoff,
    clock: Arc<VersionClock>,
    /// Every engine's "skip checksums" switch (a broken client for the lab's own tests).
    skip_checksums: Arc<AtomicBool>,
    /// This client's session with the metaserver (0: none; see `client::session`).
    session: Arc<AtomicU64>,
    /// Directories' attributes as this client's changes left them (every thread's port records).
    dirs: Arc<FreshDirs>,
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
    /// (checked every [`super::interrupt::POLL`] while the call waits).
    caller: Option<Caller>,
}

fn runtime() -> Result<(tokio::runtime::Runtime, tokio::task::LocalSet), ConnectError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ConnectError::Runtime)?;
    Ok((rt, tokio::task::LocalSet::new()))
}

impl Shared {
    /// A new set of connections, for the calling thread.
    fn local(&self, meta: RpcMetaPort) -> Rc<Local> {
        let engine = Engine::new(RpcDataPort::new(self.layout.clone()), &self.layout, self.backoff, self.clock.clone())
            .with_skip_checksums(self.skip_checksums.clone());
        Rc::new(Files::new(meta, engine))
    }
}

impl Cluster {
    /// Connects to the metaserver (`meta_addr`: one address, a group's members separated by commas,
    /// or `@FILE`, the group's config file). With `servers`, registers that ring (the first time) or checks it
    /// against the recorded one, refusing a different one with a message saying what differs.
    /// Without, uses the recorded layout.
    pub fn connect(meta_addr: &str, servers: Option<&[String]>, backoff: Backoff) -> Result<Cluster, ConnectError> {
        Self::connect_asking(meta_addr, servers, backoff, Quorum::default())
    }

    /// [`Cluster::connect`], with quorums stricter than the cluster's where `asked` names them (0:
    /// the cluster's). Looser ones are refused.
    pub fn connect_asking(
        meta_addr: &str,
        servers: Option<&[String]>,
        backoff: Backoff,
        asked: Quorum,
    ) -> Result<Cluster, ConnectError> {
        let meta_addrs = GroupConfig::parse_meta_arg(meta_addr).map_err(ConnectError::Address)?;
        if meta_addrs.len() > 1 {
            check_group(&meta_addrs)?;
        }
        let (rt, set) = runtime()?;
        let session: Arc<AtomicU64> = Arc::default();
        let dirs: Arc<FreshDirs> = Arc::default();
        // A metaserver that is not there at start is an error, not a wait.
        let meta = RpcMetaPort::new(meta_addrs.clone(), backoff)
            .impatient()
            .in_session(session.clone())
            .with_dirs(dirs.clone());
        let mut layout = set.block_on(&rt, async {
            match servers {
                Some(s) => {
                    let mut l = meta.register(s).await?;
                    // A group answers a registration as it recorded it, without the quorums.
                    l.quorum = meta.layout().await.map_err(ConnectError::Metaserver)?.quorum;
                    Ok::<_, ConnectError>(l)
                }
                None => match meta.layout().await.map_err(ConnectError::Metaserver)? {
                    l if l.servers.is_empty() => Err(ConnectError::NoLayout),
                    l => Ok(l),
                },
            }
        })?;
        layout.validate().map_err(ConnectError::Layout)?;
        layout.quorum =
            layout.quorum.stricter(asked, layout.replicas).map_err(|e| ConnectError::Refused(e.to_string()))?;
        let shared = Arc::new(Shared {
            id: NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed),
            meta_addrs,
            layout,
            backoff,
            clock: Arc::default(),
            skip_checksums: Arc::default(),
            session,
            dirs,
        });
        // This thread keeps the connection it just made.
        let tc = Rc::new(ThreadClient { rt, set, local: shared.local(meta.patient()) });
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
        let (rt, set) = runtime().map_err(|e| FsError::Io(e.to_string()))?;
        let sh = &self.shared;
        let port = RpcMetaPort::new(sh.meta_addrs.clone(), sh.backoff).in_session(sh.session.clone());
        let local = sh.local(port.with_dirs(sh.dirs.clone()));
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
                    tokio::time::sleep(super::interrupt::POLL).await;
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

    /// This client's session id (0: none yet).
    pub fn session(&self) -> u64 {
        self.shared.session.load(Ordering::Relaxed)
    }

    pub(crate) fn set_session(&self, id: u64) {
        self.shared.session.store(id, Ordering::Relaxed);
    }

    /// [`Cluster::run`] for a call that answers an [`FsResult`].
    pub(crate) fn call<T, Fut: Future<Output = FsResult<T>> + 'static>(
        &self,
        f: impl FnOnce(Rc<Local>) -> Fut,
    ) -> FsResult<T> {
        self.run(move |l| f(l).boxed_local())?
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let name = name.to_vec();
        self.call(move |l| async move { l.meta.lookup(parent, &name).await })
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.call(move |l| async move { l.meta.getattr(ino).await })
    }

    /// Directory `ino`'s attributes as a change of this client's left them within the kernel's
    /// attribute TTL, if one did (see [`FreshDirs`]), and how long the kernel may keep them; used
    /// once.
    pub fn fresh_dir(&self, ino: u64) -> Option<(Attr, std::time::Duration)> {
        self.shared.dirs.take(ino)
    }

    /// The directory holding directory `ino`, if a change of this client's just told it (see
    /// [`FreshDirs::parent_of`]).
    pub fn fresh_dir_parent(&self, ino: u64) -> Option<u64> {
        self.shared.dirs.parent_of(ino)
    }

    /// Changes attributes; a size change cuts the blocks first.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        self.call(move |l| async move { l.setattr(ino, &set).await })
    }

    /// Grows `ino` to at least `size`, never shrinking it (see [`Files::grow`]).
    pub fn grow(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.call(move |l| async move { l.grow(ino, size).await })
    }

    pub fn truncate(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.setattr(ino, SetAttr { size: Some(size), ..SetAttr::default() })
    }

    pub fn mknod(&self, parent: u64, name: &[u8], node: NewNode) -> FsResult<Attr> {
        let name = name.to_vec();
        self.call(move |l| async move { l.meta.mknod(parent, &name, &node).await })
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        let (name, target) = (name.to_vec(), target.to_vec());
        self.call(move |l| async move { l.meta.symlink(parent, &name, &target, uid, gid).await })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.call(move |l| async move { l.meta.readlink(ino).await })
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        let new_name = new_name.to_vec();
        self.call(move |l| async move { l.meta.link(ino, new_parent, &new_name).await })
    }

    /// Removes a name. Returns the inode orphaned by it (0 if none): call [`Cluster::reclaim`] on it
    /// once no one has it open.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        let name = name.to_vec();
        self.call(move |l| async move { l.meta.unlink(parent, &name).await })
    }

    /// Sets extended attribute `name` of `ino` (`flags`: XATTR_CREATE, XATTR_REPLACE or 0).
    pub fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        let change = Change::SetXattr { ino, name: name.to_vec(), value: value.to_vec(), flags };
        match self.call(move |l| async move { l.meta.apply(change).await })? {
            Outcome::Done => Ok(()),
            o => Err(FsError::Io(format!("setxattr answered {o:?}"))),
        }
    }

    pub fn remove_xattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        let change = Change::RemoveXattr { ino, name: name.to_vec() };
        match self.call(move |l| async move { l.meta.apply(change).await })? {
            Outcome::Done => Ok(()),
            o => Err(FsError::Io(format!("removexattr answered {o:?}"))),
        }
    }

    /// The value of extended attribute `name` of `ino` (NoData if none).
    pub fn xattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let q = Query::Xattr { ino, name: name.to_vec() };
        match self.call(move |l| async move { l.meta.query(q).await })? {
            QueryReply::Xattr(v) => Ok(v),
            r => Err(FsError::Io(format!("getxattr answered {r:?}"))),
        }
    }

    /// The names of `ino`'s extended attributes.
    pub fn xattrs(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let q = Query::Xattrs { ino };
        match self.call(move |l| async move { l.meta.query(q).await })? {
            QueryReply::Xattrs(v) => Ok(v),
            r => Err(FsError::Io(format!("listxattr answered {r:?}"))),
        }
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Option<Attr>> {
        let name = name.to_vec();
        self.call(move |l| async move { l.meta.rmdir(parent, &name).await })
    }

    /// Renames; returns the inode orphaned by a replaced file (0 if none), as `unlink`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<crate::shared::Renamed> {
        let (name, new_name) = (name.to_vec(), new_name.to_vec());
        self.call(move |l| async move { l.meta.rename(parent, &name, new_parent, &new_name, flags).await })
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(Vec<u8>, Attr)>> {
        self.listing(ino).map(|(_, entries)| entries)
    }

    /// [`Self::readdir`], with the directory's parent.
    pub fn listing(&self, ino: u64) -> FsResult<crate::shared::DirListing> {
        self.call(move |l| async move { l.meta.readdir(ino).await })
    }

    /// See [`Files::reclaim`].
    pub fn reclaim(&self, inos: Vec<u64>) -> FsResult<()> {
        self.call(move |l| async move { l.reclaim(&inos).await })
    }

    pub fn orphans(&self) -> FsResult<Vec<u64>> {
        self.call(move |l| async move { l.meta.orphans().await })
    }

    pub fn inode_count(&self) -> FsResult<u64> {
        self.call(move |l| async move { l.meta.inode_count().await })
    }

    /// See [`Files::read`].
    pub fn read(&self, ino: u64, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        self.call(move |l| async move { l.read(ino, offset, len).await })
    }

    /// See [`Files::read_at`].
    pub fn read_at(&self, ino: u64, offset: u64, len: u64, size: u64) -> FsResult<Vec<u8>> {
        self.call(move |l| async move { l.read_at(ino, offset, len, size).await })
    }

    /// See [`Files::write`].
    pub fn write(&self, ino: u64, offset: u64, data: Vec<u8>) -> FsResult<Attr> {
        self.call(move |l| async move { l.write(ino, offset, &data).await })
    }

    /// See [`Files::write_at`].
    pub fn write_at(&self, ino: u64, offset: u64, data: Vec<u8>, size: u64) -> FsResult<Attr> {
        self.call(move |l| async move { l.write_at(ino, offset, &data, size).await })
    }

    /// See [`Files::write_blocks`].
    pub fn write_blocks(&self, ino: u64, offset: u64, data: Vec<u8>, size: u64) -> FsResult<()> {
        self.call(move |l| async move { l.write_blocks(ino, offset, &data, size).await })
    }

    /// See [`Files::check`].
    pub fn check(&self, ino: u64) -> FsResult<Problems> {
        self.call(move |l| async move { l.check(ino).await })
    }

    pub fn server_status(&self, server: usize) -> FsResult<Result<ServerStatus, PortError>> {
        self.run(move |l| async move { l.engine.port().status(server).await }.boxed_local())
    }

    /// Starts a scrub pass on `server` if `start` (unless one runs); how its current or last pass went.
    pub fn scrub(&self, server: usize, start: bool) -> FsResult<Result<ScrubStatus, PortError>> {
        self.run(move |l| async move { l.engine.port().scrub(server, start).await }.boxed_local())
    }

    pub fn corrupt(&self, server: usize, ino: u64) -> FsResult<Result<Option<u64>, PortError>> {
        self.run(move |l| async move { l.engine.port().corrupt(server, ino).await }.boxed_local())
    }

    /// See [`Files::resolve`].
    pub fn resolve(&self, path: &str) -> FsResult<Attr> {
        let path = path.to_string();
        self.call(move |l| async move { l.resolve(&path).await })
    }
}
