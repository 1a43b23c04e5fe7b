//! The client's [`MetaPort`] over capnp-rpc, to one metaserver or to the members of a group.
//!
//! Every change goes through the `change` method with this client's id and a sequence number
//! that a retry keeps, so a change resent after a lost answer or a failover is applied once. A
//! member that is not the group's leader says so (and, when it knows, who is); the client then
//! asks that member, or the next one.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capnp::ErrorKind;
use tracing::{debug, info, warn};

use super::convert::{errno_from_wire, read_attr, read_layout};
use super::dfs_capnp::{attr, data_server, meta, Errno};
use super::meta_service::{ChangeReply, QueryWireReply};
use super::net;
use crate::client::engine::Backoff;
use crate::client::fresh_dirs::FreshDirs;
use crate::client::ports::{MetaPort, RegisterError};
use crate::metaserver::namespace::sessions::{Query, QueryReply};
use crate::metaserver::namespace::{Change, Outcome};
use crate::metaserver::raft::member::GroupError;
use crate::shared::layout::{same_server, Layout};
use crate::shared::{Attr, FsError, FsResult, Kind, NewNode, SetAttr};

/// How long a call waits for a metaserver group before it says so.
const WARN_AFTER: Duration = Duration::from_secs(2);

fn attr_result(err: Result<Errno, capnp::NotInSchema>, a: capnp::Result<attr::Reader>) -> FsResult<Attr> {
    errno_from_wire(err)?;
    read_attr(a.map_err(|e| FsError::Io(e.to_string()))?).map_err(|e| FsError::Io(e.to_string()))
}

/// The metaserver (or the group's members), reconnected on demand. While none can answer, calls
/// wait and retry with backoff (as data calls wait for a down dataserver), logging which server
/// they wait for once and then every 10 s; the caller bounds the wait (a mount answers EINTR once
/// its caller is signalled).
pub struct RpcMetaPort {
    /// The members known: those given, and leaders named by members' hints.
    addrs: RefCell<Vec<String>>,
    /// The member calls go to: the leader, once found.
    current: Cell<usize>,
    conn: RefCell<Option<meta::Client>>,
    backoff: Backoff,
    /// False while connecting: a metaserver that is not there at start is an error, not a wait.
    patient: Cell<bool>,
    /// This client's id in the metaserver's sessions, and the number of its last change.
    client: u64,
    seq: Cell<u64>,
    /// The client session this port's changes belong to (0: none): a removal says who removed.
    session: Arc<AtomicU64>,
    /// Where the directories' attributes that answers to changes carry go.
    dirs: Arc<FreshDirs>,
    /// Entries asked for in one readdir call ([`READDIR_PAGE`]; fewer in tests).
    readdir_page: Cell<u32>,
}

/// Entries a readdir call asks for at once: some 1.5 MB of the longest names and their
/// attributes, well within a message, and a round trip per 4,096 entries.
pub const READDIR_PAGE: u32 = 4096;

impl RpcMetaPort {
    /// A client of the metaserver at `addrs[0]`, or of the group whose members are `addrs`.
    pub fn new(addrs: Vec<String>, backoff: Backoff) -> Self {
        RpcMetaPort {
            addrs: RefCell::new(addrs),
            current: Cell::new(0),
            conn: RefCell::new(None),
            backoff,
            patient: Cell::new(true),
            client: rand::random(),
            seq: Cell::new(0),
            session: Arc::default(),
            dirs: Arc::default(),
            readdir_page: Cell::new(READDIR_PAGE),
        }
    }

    /// Asks for `n` entries per readdir call instead of [`READDIR_PAGE`].
    #[cfg(test)]
    pub(crate) fn with_readdir_page(self, n: u32) -> Self {
        self.readdir_page.set(n);
        self
    }

    /// Records the directories' attributes that answers to this port's changes carry in `dirs`.
    pub fn with_dirs(mut self, dirs: Arc<FreshDirs>) -> Self {
        self.dirs = dirs;
        self
    }

    /// Marks this port's removals as made by the session in `session` (0: none).
    pub fn in_session(mut self, session: Arc<AtomicU64>) -> Self {
        self.session = session;
        self
    }

    /// Fails a call at once while no metaserver can be reached (for connecting: a metaserver that
    /// is not there at start is an error, not a wait).
    pub fn impatient(self) -> Self {
        self.patient.set(false);
        self
    }

    /// Waits and retries while no metaserver can be reached (the default).
    pub fn patient(self) -> Self {
        self.patient.set(true);
        self
    }

    fn addr(&self) -> String {
        let addrs = self.addrs.borrow();
        addrs[self.current.get() % addrs.len()].clone()
    }

    fn members(&self) -> usize {
        self.addrs.borrow().len()
    }

    /// Connects to the member calls go to or, in a group, to whichever member answers first: the
    /// others are tried too, each 100 ms after the one before, so that a member that does not
    /// answer (cut off by the network) costs no connect timeout, and a member that does is the
    /// only one connected to.
    async fn connect(&self) -> std::io::Result<meta::Client> {
        use futures::FutureExt;
        let addrs = self.addrs.borrow().clone();
        let n = addrs.len();
        let first = self.current.get() % n;
        let tries = (0..n).map(|k| {
            let i = (first + k) % n;
            let addr = addrs[i].clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100) * k as u32).await;
                net::connect::<meta::Client>(&addr).await.map(|c| (i, c))
            }
            .boxed_local()
        });
        let ((i, c), _) = futures::future::select_ok(tries).await?;
        self.current.set(i);
        *self.conn.borrow_mut() = Some(c.clone());
        Ok(c)
    }

    /// Sends the next calls to `addr` if it is one of ours (a member's hint of the leader).
    fn go_to(&self, addr: &str) {
        // A leader not among the addresses given (a client given one member's, or a member
        // added since) is learnt: else the client would ask the same follower for good.
        let i = {
            let mut addrs = self.addrs.borrow_mut();
            // Compared as the layout compares servers: a member given as `localhost:P` that hints
            // `127.0.0.1:P` is the one given, not a second member to try when it is down.
            addrs.iter().position(|a| same_server(a, addr)).unwrap_or_else(|| {
                addrs.push(addr.to_string());
                addrs.len() - 1
            })
        };
        if i != self.current.get() {
            self.current.set(i);
            self.conn.borrow_mut().take();
        }
    }

    fn next_member(&self) {
        self.current.set((self.current.get() + 1) % self.members());
        self.conn.borrow_mut().take();
    }

    /// The error for an address that answers, but not a metaserver's calls: says what it is, if it
    /// is one of ours.
    async fn not_a_metaserver(&self, e: capnp::Error) -> FsError {
        let addr = self.addr();
        let dataserver = async {
            let c: data_server::Client = net::connect(&addr).await.ok()?;
            c.status_request().send().promise.await.ok().map(|_| ())
        };
        FsError::Io(match dataserver.await {
            Some(()) => format!("{addr} is a dataserver, not a metaserver: name the metaserver's address"),
            None => format!("{addr} does not answer as a metaserver: {e}"),
        })
    }

    /// Runs `f` on a connection, moving to another member while the one asked is not the group's
    /// leader, and reconnecting and retrying while none can be reached.
    async fn call<T, Fut>(&self, f: impl Fn(meta::Client) -> Fut) -> FsResult<T>
    where
        Fut: Future<Output = Result<FsResult<T>, capnp::Error>>,
    {
        let mut delay = self.backoff.first;
        let mut waited = Duration::ZERO;
        let mut fresh = false;
        let mut failed = 0;
        // A group that answers but has no leader yet (electing, or a majority down) is waited for
        // even while connecting; only one that nobody answers for is an error then.
        let mut answered = false;
        loop {
            let cached = self.conn.borrow().clone();
            let reused = cached.is_some();
            let asked = self.current.get();
            let attempt = match cached {
                Some(c) => Ok(c),
                None => self.connect().await,
            };
            let why = match attempt {
                Ok(client) => match f(client).await {
                    Ok(Err(FsError::NotHere(why))) => {
                        answered = true;
                        why
                    }
                    Ok(r) => {
                        if waited > Duration::ZERO {
                            info!(server = %self.addr(), waited = ?waited, "metaserver is back");
                        }
                        return r;
                    }
                    // Overloaded: a member crashed by a tester; like one that is down.
                    Err(e) if matches!(e.kind, ErrorKind::Disconnected | ErrorKind::Overloaded) => {
                        self.conn.borrow_mut().take();
                        e.to_string()
                    }
                    Err(e) if e.kind == ErrorKind::Unimplemented => return Err(self.not_a_metaserver(e).await),
                    Err(e) => return Err(FsError::Io(format!("metaserver {}: {e}", self.addr()))),
                },
                // Another secret does not get better by retrying.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(FsError::Io(format!("metaserver {e}")));
                }
                // Every member was tried.
                Err(e) => {
                    failed += self.members() - 1;
                    e.to_string()
                }
            };
            failed += 1;
            if !self.patient.get() && !answered && failed >= self.members() {
                return Err(FsError::Io(format!("metaserver {} unreachable: {why}", self.addrs.borrow().join(","))));
            }
            // A kept connection to a metaserver that has since restarted: reconnect at once.
            if reused && !fresh && self.members() == 1 {
                fresh = true;
                debug!(server = %self.addr(), "metaserver connection broke ({why}); reconnecting");
                continue;
            }
            // Another member, unless the one asked named the leader.
            if self.current.get() == asked {
                self.next_member();
            }
            if failed % self.members() != 0 {
                continue;
            }
            // Warned at once for a single metaserver; for a group once it lasts (a failover takes
            // about a second); then every 10 s.
            let (before, after) = (waited, waited + delay);
            let first = match self.members() {
                1 => before == Duration::ZERO,
                _ => before < WARN_AFTER && after >= WARN_AFTER,
            };
            if first || before.as_secs() / 10 != after.as_secs() / 10 {
                warn!(servers = %self.addrs.borrow().join(","), waited = ?after, "waiting for the metaserver: {why}");
            } else {
                debug!(servers = %self.addrs.borrow().join(","), waited = ?after, "waiting for the metaserver: {why}");
            }
            tokio::time::sleep(delay).await;
            waited += delay;
            delay = (delay * 2).min(self.backoff.max);
        }
    }

    /// A group member's answer: what it says, or, if it is not the leader, a `NotHere` that sends
    /// the call on to the leader it names (or to the next member).
    fn answered<T>(&self, reply: Result<FsResult<T>, GroupError>) -> FsResult<T> {
        match reply {
            Ok(answer) => answer,
            Err(GroupError::NotLeader { leader: Some((_, addr)) }) => {
                self.go_to(&addr);
                Err(FsError::NotHere(format!("the leader is {addr}")))
            }
            Err(e) => Err(FsError::NotHere(e.to_string())),
        }
    }

    /// Applies a change; a retry of it (after a lost answer or a failover) keeps its number.
    async fn change(&self, change: Change) -> FsResult<Outcome> {
        Ok(self.change_with_attr(change).await?.0)
    }

    /// [`Self::change`], with the attributes the answer carries of the file a lock was granted on
    /// (`None` from a metaserver that does not send them).
    async fn change_with_attr(&self, change: Change) -> FsResult<(Outcome, Option<Attr>)> {
        let session = self.session.load(Ordering::Relaxed);
        let change = match change {
            c @ (Change::Unlink { .. } | Change::Rename { .. }) if session != 0 => {
                Change::By { session, change: Box::new(c) }
            }
            c => c,
        };
        // Before the change is sent: an entry must not outlive what it describes. And again once
        // it is answered: a change sent meanwhile may have been applied before it, and its answer
        // recorded with the attributes from before it.
        let forget = || match change.inner() {
            Change::Rmdir { .. } | Change::Rename { .. } => {
                self.dirs.forget_all();
                true
            }
            Change::Setattr { ino, .. } | Change::SetXattr { ino, .. } | Change::RemoveXattr { ino, .. } => {
                self.dirs.forget(*ino);
                true
            }
            _ => false,
        };
        forget();
        let sent = self.dirs.sending();
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let bytes = postcard::to_allocvec(&change).map_err(|e| FsError::Io(e.to_string()))?;
        self.call(|c| {
            let mut req = c.change_request();
            req.get().set_client(self.client);
            req.get().set_seq(seq);
            req.get().set_change(&bytes);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                let reply: ChangeReply = decode_reply(r.get_reply()?)?;
                // Such a change records nothing itself: with its forget, an answer to another
                // change recorded meanwhile (newer, perhaps) went, and there is nothing left to
                // compare its versions with. The kernel's next getattr asks the metaserver.
                if !forget() && r.has_dirs() {
                    let dirs = r.get_dirs()?.iter().map(read_attr).collect::<Result<Vec<_>, _>>()?;
                    self.dirs.record(dirs.into_iter().filter(|a| a.kind == Kind::Dir).collect(), sent);
                }
                let attr = lock_attr(r.has_attr(), r.get_attr());
                Ok(self.answered(reply).map(|o| (o, attr)))
            }
        })
        .await
    }
}

/// The attributes a lock's grant came with, if any. An aid only: attributes that do not read are
/// asked for again, not an error for a change that was applied.
fn lock_attr(has: bool, attr: capnp::Result<super::dfs_capnp::attr::Reader>) -> Option<Attr> {
    has.then(|| attr.ok().and_then(|a| read_attr(a).ok())).flatten()
}

fn decode_reply<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, capnp::Error> {
    postcard::from_bytes(bytes).map_err(|e| capnp::Error::failed(format!("a reply that does not decode: {e}")))
}

fn done(o: Outcome) -> FsResult<()> {
    match o {
        Outcome::Done => Ok(()),
        o => Err(FsError::Io(format!("expected no answer, got {o:?}"))),
    }
}

impl MetaPort for RpcMetaPort {
    async fn register(&self, ring: &[String]) -> Result<Layout, RegisterError> {
        match self.change(Change::Register { servers: ring.to_vec() }).await? {
            Outcome::Layout(l) => Ok(l),
            Outcome::Refused(why) => Err(RegisterError::Refused(why)),
            o => Err(FsError::Io(format!("expected a layout, got {o:?}")).into()),
        }
    }

    async fn layout(&self) -> FsResult<Layout> {
        self.call(|c| {
            let req = c.layout_request();
            async move { Ok(Ok(read_layout(req.send().promise.await?.get()?.get_layout()?)?)) }
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
        .await
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
        .await
    }

    async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.change(Change::Setattr { ino, set: set.clone() }).await?.attr()
    }

    async fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr> {
        self.change(Change::Mknod { parent, name: name.to_vec(), node: node.clone() }).await?.attr()
    }

    async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        let change = Change::Symlink { parent, name: name.to_vec(), target: target.to_vec(), uid, gid };
        self.change(change).await?.attr()
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
        .await
    }

    async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        self.change(Change::Link { ino, new_parent, new_name: new_name.to_vec() }).await?.attr()
    }

    async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        self.change(Change::Unlink { parent, name: name.to_vec() }).await?.orphan()
    }

    async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Option<Attr>> {
        match self.change(Change::Rmdir { parent, name: name.to_vec() }).await? {
            Outcome::Attr(a) => Ok(Some(a)),
            o => done(o).map(|()| None),
        }
    }

    async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<crate::shared::Renamed> {
        let change = Change::Rename { parent, name: name.to_vec(), new_parent, new_name: new_name.to_vec(), flags };
        match self.change(change).await? {
            Outcome::ReplacedDir(a) => Ok((0, Some(a))),
            o => Ok((o.orphan()?, None)),
        }
    }

    /// Page by page (see [`READDIR_PAGE`]): a directory changed between two pages lists each
    /// name it kept throughout once, as `readdir(3)` does.
    async fn readdir(&self, ino: u64) -> FsResult<crate::shared::DirListing> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or_else(Vec::new, |(name, _): &(Vec<u8>, Attr)| name.clone());
            let (p, page, more) = self
                .call(|c| {
                    let mut req = c.readdir_request();
                    req.get().set_ino(ino);
                    req.get().set_after(&after);
                    req.get().set_limit(self.readdir_page.get());
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
                        Ok(Ok((r.get_parent(), out, r.get_more())))
                    }
                })
                .await?;
            // Only names past the last page's: a member built before pages answers the whole
            // directory (a leader changed while a group was upgraded). A page that adds none
            // cannot go on (a server that answers `more` forever).
            let before = all.len();
            all.extend(page.into_iter().filter(|(name, _)| after.is_empty() || *name > after));
            if !more || all.len() == before {
                return Ok((p, all));
            }
        }
    }

    async fn extend(&self, ino: u64, size: u64) -> FsResult<Attr> {
        self.change(Change::Extend { ino, size }).await?.attr()
    }

    async fn purge(&self, inos: &[u64]) -> FsResult<()> {
        done(self.change(Change::Purge { inos: inos.to_vec() }).await?)
    }

    async fn orphans(&self) -> FsResult<Vec<u64>> {
        self.call(|c| {
            let req = c.orphans_request();
            async move { Ok(Ok(req.send().promise.await?.get()?.get_inos()?.iter().collect())) }
        })
        .await
    }

    async fn inode_count(&self) -> FsResult<u64> {
        self.call(|c| {
            let req = c.stats_request();
            async move { Ok(Ok(req.send().promise.await?.get()?.get_inodes())) }
        })
        .await
    }

    async fn apply(&self, change: Change) -> FsResult<Outcome> {
        self.change(change).await
    }

    async fn query(&self, q: Query) -> FsResult<QueryReply> {
        Ok(self.query_with_attr(q).await?.0)
    }

    async fn apply_with_attr(&self, change: Change) -> FsResult<(Outcome, Option<Attr>)> {
        self.change_with_attr(change).await
    }

    async fn query_with_attr(&self, q: Query) -> FsResult<(QueryReply, Option<Attr>)> {
        let bytes = postcard::to_allocvec(&q).map_err(|e| FsError::Io(e.to_string()))?;
        self.call(|c| {
            let mut req = c.query_request();
            req.get().set_query(&bytes);
            async move {
                let r = req.send().promise.await?;
                let r = r.get()?;
                let reply: QueryWireReply = decode_reply(r.get_reply()?)?;
                let attr = lock_attr(r.has_attr(), r.get_attr());
                Ok(self.answered(reply).map(|q| (q, attr)))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hinted_leader_given_under_another_spelling_is_the_member_given() {
        let c = RpcMetaPort::new(vec!["localhost:9001".into(), "127.0.0.1:9002".into()], Backoff::default());
        c.go_to("127.0.0.1:9002");
        assert_eq!((c.members(), c.addr()), (2, "127.0.0.1:9002".to_string()));
        c.go_to("127.0.0.1:9001");
        assert_eq!((c.members(), c.addr()), (2, "localhost:9001".to_string()));
        // One it was not given is learnt.
        c.go_to("127.0.0.1:9003");
        assert_eq!((c.members(), c.addr()), (3, "127.0.0.1:9003".to_string()));
    }
}
