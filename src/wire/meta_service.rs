//! The metaserver's RPC adapter: decode, call the namespace (directly, or through the group's
//! Raft member), encode. Nothing else.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capnp::Error;
use tracing::debug;

use super::convert::{bad, errno_to_wire, read_setattr, write_attr, write_layout};
use super::dfs_capnp::meta;
use crate::metaserver::journal::Journal;
use crate::metaserver::namespace::sessions::{LockState, Query, QueryReply};
use crate::metaserver::namespace::{decode_client_change, Change, Namespace, Outcome, MAX_ENCODED};
use crate::metaserver::raft::member::{GroupError, Member};
use crate::shared::layout::{parse_ring, Layout};
use crate::shared::metrics;
use crate::shared::MAX_CUTS;
use crate::shared::{FsError, NewNode};

/// Where the namespace is: this process's own store, or a Raft group's, through this member.
enum Backend {
    Single(Arc<Journal>),
    Group { member: Arc<Member>, group: u64, crashed: Arc<AtomicBool> },
}

pub struct MetaService {
    backend: Backend,
}

/// What the `change` method answers: the change's outcome, or why this server did not take it
/// (not the group's leader, or no majority), so that the client asks another member.
pub type ChangeReply = Result<Result<Outcome, FsError>, GroupError>;

/// What the `query` method answers, as `change`'s reply.
pub type QueryWireReply = Result<Result<QueryReply, FsError>, GroupError>;

/// Longest a lock request's state is waited for in one call (the client asks again).
const MAX_LOCK_WAIT: Duration = Duration::from_secs(5);

impl MetaService {
    /// A metaserver on its own.
    pub fn new(journal: Arc<Journal>) -> Self {
        MetaService { backend: Backend::Single(journal) }
    }

    /// A member of group `group` (see `GroupConfig::id`), which answers nothing while `crashed`.
    pub fn group(member: Arc<Member>, group: u64, crashed: Arc<AtomicBool>) -> Self {
        MetaService { backend: Backend::Group { member, group, crashed } }
    }

    /// Refuses every call while a tester has this member crashed. (Overloaded: the client asks
    /// another member, as for one that is down.)
    fn alive(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Group { crashed, .. } if crashed.load(Ordering::Relaxed) => {
                Err(Error::overloaded("this metaserver is crashed (a tester's fault injection)".into()))
            }
            _ => Ok(()),
        }
    }

    /// This group member (an error for a metaserver on its own).
    fn group_member(&self) -> Result<&Arc<Member>, Error> {
        match &self.backend {
            Backend::Group { member, .. } => Ok(member),
            Backend::Single(_) => Err(bad("this metaserver is not a member of a group")),
        }
    }

    /// Answers a query (in a group, as the leader only).
    async fn query_once(&self, q: &Query) -> QueryWireReply {
        match &self.backend {
            Backend::Single(j) => Ok(j.namespace().query(q)),
            Backend::Group { member, .. } => member.read(|ns| ns.query(q)).await,
        }
    }

    /// Applies a change that creates an inode, unless the store's disk is short of room.
    async fn create(&self, change: Change) -> Result<crate::shared::Attr, FsError> {
        self.local().room_for_creates()?;
        journaled(self, change).await.and_then(Outcome::attr)
    }

    /// The attributes of a file a lock on it is granted on, from this server's namespace, which
    /// has applied the grant (and whatever came before it): a mount revalidates the file under the
    /// lock from them (it drops what it cached of a file another mount changed) without asking for
    /// them in another round trip.
    fn granted_attr(&self, ino: u64) -> Option<crate::shared::Attr> {
        self.local().getattr(ino).ok()
    }

    /// The namespace as this process has it (in a group, possibly behind the leader's).
    fn local(&self) -> &Namespace {
        match &self.backend {
            Backend::Single(j) => j.namespace(),
            Backend::Group { member, .. } => member.local(),
        }
    }
}

/// Runs a read-only namespace operation on the RPC thread: an LMDB read transaction takes
/// microseconds and never waits for the disk to sync, so a hop to a worker thread would cost more.
/// In a group, only the leader answers, once a majority confirmed it still leads.
async fn read<T>(svc: &MetaService, f: impl FnOnce(&Namespace) -> Result<T, FsError>) -> Result<T, FsError> {
    let r = match &svc.backend {
        Backend::Single(j) => f(j.namespace()),
        Backend::Group { member, .. } => member.read(f).await.unwrap_or_else(|e| Err(FsError::NotHere(e.to_string()))),
    };
    if let Err(e) = &r {
        debug!("namespace: {e}");
    }
    r
}

/// Applies a change taken by one of the per-operation methods (a group takes its changes through
/// the `change` method, which identifies the client).
async fn journaled(svc: &MetaService, change: Change) -> Result<Outcome, FsError> {
    let Backend::Single(j) = &svc.backend else {
        return Err(FsError::Invalid("a metaserver group takes changes through its change method".into()));
    };
    crate::metaserver::namespace::sizes_within_limits(&change).map_err(FsError::Invalid)?;
    let r = j.apply(None, change).await.unwrap_or_else(Err);
    if let Err(e) = &r {
        debug!("namespace: {e}");
    }
    r
}

/// Counts `r` under `op` in the metrics (an error by its errno's name).
fn counted<T>(mut op: metrics::Op, r: Result<T, FsError>) -> Result<T, FsError> {
    match &r {
        Ok(_) => op.ok(0),
        Err(e) => op.failed(e.errno_name()),
    }
    r
}

/// Counts a group's reply under `op` in the metrics; a member that cannot answer (not the
/// leader, no majority) counts as "unavailable".
fn counted_reply<T>(mut op: metrics::Op, r: &Result<Result<T, FsError>, GroupError>) {
    match r {
        Ok(Ok(_)) => op.ok(0),
        Ok(Err(e)) => op.failed(e.errno_name()),
        Err(_) => op.failed("unavailable"),
    }
}

macro_rules! reply_attr {
    ($results:expr, $r:expr) => {{
        let mut b = $results.get();
        match $r {
            Ok(a) => write_attr(b.init_attr(), &a),
            Err(e) => b.set_err(errno_to_wire(&e)),
        }
        Ok(())
    }};
}

macro_rules! reply_err {
    ($results:expr, $r:expr) => {{
        if let Err(e) = $r {
            $results.get().set_err(errno_to_wire(&e));
        }
        Ok(())
    }};
}

fn kind(r: Result<super::dfs_capnp::Kind, capnp::NotInSchema>) -> Result<crate::shared::Kind, Error> {
    Ok(super::convert::kind_from_wire(r.map_err(|_| bad("unknown inode kind"))?))
}

impl meta::Server for MetaService {
    async fn register(
        self: Rc<Self>,
        params: meta::RegisterParams,
        mut results: meta::RegisterResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let claim = super::convert::read_claim(params.get()?.get_layout()?)?;
        let servers = match parse_ring(claim.ring()) {
            Ok(s) => s,
            Err(e) => {
                results.get().set_err(format!("refused: {e}").as_str());
                return Ok(());
            }
        };
        let change = self.local().with_shape(Change::Register { servers }).map_err(|e| bad(e.to_string()))?;
        match journaled(&self, change).await {
            Ok(Outcome::Layout(l)) => write_layout(results.get().init_layout(), &l),
            Ok(Outcome::Refused(why)) => results.get().set_err(why.as_str()),
            Ok(o) => return Err(bad(format!("registering answered {o:?}"))),
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(())
    }

    async fn layout(self: Rc<Self>, _: meta::LayoutParams, mut results: meta::LayoutResults) -> Result<(), Error> {
        self.alive()?;
        let l = self.local().layout().map_err(|e| bad(e.to_string()))?;
        let l = l.unwrap_or(Layout {
            servers: vec![],
            block_size: self.local().block_size(),
            replicas: self.local().replicas(),
            quorum: self.local().quorum(),
        });
        write_layout(results.get().init_layout(), &l);
        Ok(())
    }

    async fn lookup(self: Rc<Self>, params: meta::LookupParams, mut results: meta::LookupResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name) = (p.get_parent(), p.get_name()?.to_vec());
        let r = read(&self, |ns| ns.lookup(parent, &name).and_then(|a| ns.noting_xattrs_of(a)));
        reply_attr!(results, counted(metrics::op("lookup"), r.await))
    }

    async fn getattr(
        self: Rc<Self>,
        params: meta::GetattrParams,
        mut results: meta::GetattrResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let ino = params.get()?.get_ino();
        let r = read(&self, |ns| ns.getattr(ino).and_then(|a| ns.noting_xattrs_of(a)));
        reply_attr!(results, counted(metrics::op("getattr"), r.await))
    }

    async fn setattr(
        self: Rc<Self>,
        params: meta::SetattrParams,
        mut results: meta::SetattrResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (ino, set) = (p.get_ino(), read_setattr(p.get_set()?)?);
        reply_attr!(results, journaled(&self, Change::Setattr { ino, set }).await.and_then(Outcome::attr))
    }

    async fn mknod(self: Rc<Self>, params: meta::MknodParams, mut results: meta::MknodResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name) = (p.get_parent(), p.get_name()?.to_vec());
        let node = NewNode {
            kind: kind(p.get_kind())?,
            perm: p.get_perm(),
            uid: p.get_uid(),
            gid: p.get_gid(),
            rdev: p.get_rdev(),
        };
        let change = Change::Mknod { parent, name, node };
        reply_attr!(results, self.create(change).await)
    }

    async fn symlink(
        self: Rc<Self>,
        params: meta::SymlinkParams,
        mut results: meta::SymlinkResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name, target) = (p.get_parent(), p.get_name()?.to_vec(), p.get_target()?.to_vec());
        let (uid, gid) = (p.get_uid(), p.get_gid());
        reply_attr!(results, self.create(Change::Symlink { parent, name, target, uid, gid }).await)
    }

    async fn readlink(
        self: Rc<Self>,
        params: meta::ReadlinkParams,
        mut results: meta::ReadlinkResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let ino = params.get()?.get_ino();
        let mut b = results.get();
        match counted(metrics::op("readlink"), read(&self, |ns| ns.readlink(ino)).await) {
            Ok(t) => b.set_target(&t),
            Err(e) => b.set_err(errno_to_wire(&e)),
        }
        Ok(())
    }

    async fn link(self: Rc<Self>, params: meta::LinkParams, mut results: meta::LinkResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (ino, np, nn) = (p.get_ino(), p.get_new_parent(), p.get_new_name()?.to_vec());
        reply_attr!(results, self.create(Change::Link { ino, new_parent: np, new_name: nn }).await)
    }

    async fn unlink(self: Rc<Self>, params: meta::UnlinkParams, mut results: meta::UnlinkResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name) = (p.get_parent(), p.get_name()?.to_vec());
        let mut b = results.get();
        match journaled(&self, Change::Unlink { parent, name }).await.and_then(Outcome::orphan) {
            Ok(orphan) => b.set_orphan(orphan),
            Err(e) => b.set_err(errno_to_wire(&e)),
        }
        Ok(())
    }

    async fn rmdir(self: Rc<Self>, params: meta::RmdirParams, mut results: meta::RmdirResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name) = (p.get_parent(), p.get_name()?.to_vec());
        reply_err!(results, journaled(&self, Change::Rmdir { parent, name }).await)
    }

    async fn rename(self: Rc<Self>, params: meta::RenameParams, mut results: meta::RenameResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (parent, name) = (p.get_parent(), p.get_name()?.to_vec());
        let (np, nn, flags) = (p.get_new_parent(), p.get_new_name()?.to_vec(), p.get_flags());
        let mut b = results.get();
        let change = Change::Rename { parent, name, new_parent: np, new_name: nn, flags };
        match journaled(&self, change).await.and_then(Outcome::orphan) {
            Ok(orphan) => b.set_orphan(orphan),
            Err(e) => b.set_err(errno_to_wire(&e)),
        }
        Ok(())
    }

    async fn readdir(
        self: Rc<Self>,
        params: meta::ReaddirParams,
        mut results: meta::ReaddirResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (ino, after) = (p.get_ino(), p.get_after()?.to_vec());
        // 0, from a client that reads the whole directory at once.
        let limit = match p.get_limit() {
            0 => usize::MAX,
            n => n as usize,
        };
        let mut b = results.get();
        let page = move |ns: &Namespace| {
            let ((parent, mut entries), more) = ns.listing_page(ino, &after, limit)?;
            ns.noting_xattrs(entries.iter_mut().map(|(_, a)| a))?;
            Ok(((parent, entries), more))
        };
        match counted(metrics::op("readdir"), read(&self, page).await) {
            Ok(((parent, entries), more)) => {
                b.set_parent(parent);
                b.set_more(more);
                let mut list = b.init_entries(entries.len() as u32);
                for (i, (name, attr)) in entries.iter().enumerate() {
                    let mut e = list.reborrow().get(i as u32);
                    e.set_name(name);
                    write_attr(e.init_attr(), attr);
                }
            }
            Err(e) => b.set_err(errno_to_wire(&e)),
        }
        Ok(())
    }

    async fn extend(self: Rc<Self>, params: meta::ExtendParams, mut results: meta::ExtendResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (ino, size) = (p.get_ino(), p.get_size());
        reply_attr!(results, journaled(&self, Change::Extend { ino, size }).await.and_then(Outcome::attr))
    }

    async fn purge(self: Rc<Self>, params: meta::PurgeParams, mut results: meta::PurgeResults) -> Result<(), Error> {
        self.alive()?;
        let list = params.get()?.get_inos()?;
        if list.len() as usize > MAX_CUTS {
            return Err(bad(format!("at most {MAX_CUTS} inodes per purge, got {}", list.len())));
        }
        let inos: Vec<u64> = list.iter().collect();
        reply_err!(results, journaled(&self, Change::Purge { inos }).await)
    }

    async fn orphans(self: Rc<Self>, _: meta::OrphansParams, mut results: meta::OrphansResults) -> Result<(), Error> {
        self.alive()?;
        // Served locally in a group too: a member behind the leader lists only inodes that were orphans,
        // and forgetting one that is already gone is a no-op.
        let inos = self.local().orphans().map_err(|e| bad(e.to_string()))?;
        let mut l = results.get().init_inos(inos.len() as u32);
        for (i, ino) in inos.iter().enumerate() {
            l.set(i as u32, *ino);
        }
        Ok(())
    }

    async fn stats(self: Rc<Self>, _: meta::StatsParams, mut results: meta::StatsResults) -> Result<(), Error> {
        self.alive()?;
        let n = self.local().inode_count().map_err(|e| bad(e.to_string()))?;
        results.get().set_inodes(n);
        Ok(())
    }

    async fn change(self: Rc<Self>, params: meta::ChangeParams, mut results: meta::ChangeResults) -> Result<(), Error> {
        self.alive()?;
        let p = params.get()?;
        let (client, seq) = (p.get_client(), p.get_seq());
        let change = decode_client_change(p.get_change()?).map_err(bad)?;
        let change = self.local().with_shape(change).map_err(|e| bad(e.to_string()))?;
        let op = metrics::op(change.name());
        // A create is refused on a full disk before it is applied (in a group, by the leader that
        // takes it: applying must not depend on one member's disk, and another member sends the
        // client on to the leader). A retry of a create that was applied is not refused: it gets
        // the answer its first try got.
        let takes = match &self.backend {
            Backend::Single(_) => true,
            Backend::Group { member, .. } => member.is_leader(),
        };
        if takes && change.creates() && !self.local().answered(client, seq).unwrap_or(false) {
            if let Err(e) = self.local().room_for_creates() {
                let reply: ChangeReply = Ok(Err(e));
                counted_reply(op, &reply);
                let bytes = postcard::to_allocvec(&reply).map_err(|e| bad(e.to_string()))?;
                results.get().set_reply(&bytes);
                return Ok(());
            }
        }
        let dirs = change.dirs();
        let locking = match change.inner() {
            Change::Lock { ino, typ: Some(_), .. } => Some(*ino),
            _ => None,
        };
        let reply: ChangeReply = match &self.backend {
            Backend::Single(j) => Ok(j.apply(Some((client, seq)), change).await.unwrap_or_else(Err)),
            Backend::Group { member, .. } => member.write(client, seq, change).await,
        };
        counted_reply(op, &reply);
        let bytes = postcard::to_allocvec(&reply).map_err(|e| bad(e.to_string()))?;
        results.get().set_reply(&bytes);
        if matches!(reply, Ok(Ok(_))) {
            // Read from this server's namespace, which has applied the change: a directory whose
            // names changed has had its cached attributes dropped by the kernel, which asks for
            // them on its next path walk through it; the client answers that from these.
            let attrs: Vec<_> = dirs.iter().filter_map(|&d| self.local().getattr(d).ok()).collect();
            let mut l = results.get().init_dirs(attrs.len() as u32);
            for (i, a) in attrs.iter().enumerate() {
                write_attr(l.reborrow().get(i as u32), a);
            }
        }
        if let (Some(ino), Ok(Ok(Outcome::Lock(LockState::Granted)))) = (locking, &reply) {
            if let Some(a) = self.granted_attr(ino) {
                write_attr(results.get().init_attr(), &a);
            }
        }
        Ok(())
    }

    async fn raft(self: Rc<Self>, params: meta::RaftParams, mut results: meta::RaftResults) -> Result<(), Error> {
        self.alive()?;
        let Backend::Group { member, group, .. } = &self.backend else {
            return Err(bad("this metaserver is not a member of a group"));
        };
        let p = params.get()?;
        if p.get_group() != *group {
            return Err(bad(format!(
                "a Raft message from another group ({:#x}; this is {group:#x}): check the members' config files",
                p.get_group()
            )));
        }
        let reply = super::raft_net::serve(&member.raft, p.get_kind(), p.get_message()?).await?;
        results.get().set_reply(&reply);
        Ok(())
    }

    async fn member(self: Rc<Self>, _: meta::MemberParams, mut results: meta::MemberResults) -> Result<(), Error> {
        let Backend::Group { member, crashed, .. } = &self.backend else {
            return Err(bad("this metaserver is not a member of a group"));
        };
        let m = member.raft.metrics().borrow().clone();
        let mut s = results.get().init_status();
        s.set_id(m.id);
        s.set_role(member.role());
        s.set_crashed(crashed.load(Ordering::Relaxed));
        s.set_leader(m.current_leader.map_or(-1, |l| l as i64));
        s.set_term(m.current_term);
        s.set_last_log_index(m.last_log_index.unwrap_or(0));
        s.set_applied(m.last_applied.map_or(0, |l| l.index));
        s.set_snapshot(m.snapshot.map_or(0, |l| l.index));
        let nodes = member.nodes();
        let mut list = s.init_nodes(nodes.len() as u32);
        for (k, (id, addr, voter)) in nodes.iter().enumerate() {
            let mut n = list.reborrow().get(k as u32);
            n.set_id(*id);
            n.set_addr(addr.as_str());
            n.set_voter(*voter);
        }
        Ok(())
    }

    async fn add_member(
        self: Rc<Self>,
        params: meta::AddMemberParams,
        mut results: meta::AddMemberResults,
    ) -> Result<(), Error> {
        self.alive()?;
        let member = self.group_member()?;
        let p = params.get()?;
        let addr = crate::shared::layout::parse_addr(p.get_addr()?.to_str()?).map_err(|e| bad(e.to_string()))?;
        if let Err(e) = member.add(p.get_id(), &addr).await {
            results.get().set_err(e.to_string().as_str());
        }
        Ok(())
    }

    async fn remove_member(
        self: Rc<Self>,
        params: meta::RemoveMemberParams,
        mut results: meta::RemoveMemberResults,
    ) -> Result<(), Error> {
        self.alive()?;
        if let Err(e) = self.group_member()?.remove(params.get()?.get_id()).await {
            results.get().set_err(e.to_string().as_str());
        }
        Ok(())
    }

    async fn crash(self: Rc<Self>, params: meta::CrashParams, _: meta::CrashResults) -> Result<(), Error> {
        let Backend::Group { crashed, member, .. } = &self.backend else {
            return Err(bad("this metaserver is not a member of a group"));
        };
        let on = params.get()?.get_crashed();
        crashed.store(on, Ordering::Relaxed);
        tracing::warn!(
            member = member.id,
            crashed = on,
            "{}",
            if on { "crashed by a tester" } else { "restored by a tester" }
        );
        Ok(())
    }

    async fn query(self: Rc<Self>, params: meta::QueryParams, mut results: meta::QueryResults) -> Result<(), Error> {
        self.alive()?;
        let q = params.get()?.get_query()?;
        if q.len() > MAX_ENCODED {
            return Err(bad(format!("a query of {} bytes (at most {MAX_ENCODED})", q.len())));
        }
        let q: Query = postcard::from_bytes(q).map_err(|e| bad(format!("a query that does not decode: {e}")))?;
        let op = metrics::op(q.name());
        let reply: QueryWireReply = match &q {
            Query::LockState { wait_ms, .. } => {
                // Wait for a queued request to be granted, watching every committed change, so
                // that a lock changes hands within one round trip of its release.
                let until = tokio::time::Instant::now() + Duration::from_millis((*wait_ms).into()).min(MAX_LOCK_WAIT);
                let mut epoch = self.local().epoch();
                loop {
                    epoch.borrow_and_update();
                    let r = self.query_once(&q).await;
                    let queued = matches!(r, Ok(Ok(QueryReply::LockState(LockState::Queued))));
                    if !queued || tokio::time::timeout_at(until, epoch.changed()).await.is_err() {
                        break r;
                    }
                }
            }
            _ => self.query_once(&q).await,
        };
        counted_reply(op, &reply);
        let bytes = postcard::to_allocvec(&reply).map_err(|e| bad(e.to_string()))?;
        results.get().set_reply(&bytes);
        if let (Query::LockState { ino, .. }, Ok(Ok(QueryReply::LockState(LockState::Granted)))) = (&q, &reply) {
            if let Some(a) = self.granted_attr(*ino) {
                write_attr(results.get().init_attr(), &a);
            }
        }
        Ok(())
    }

    async fn local_version(
        self: Rc<Self>,
        params: meta::LocalVersionParams,
        mut results: meta::LocalVersionResults,
    ) -> Result<(), Error> {
        let path = params.get()?.get_path()?.to_vec();
        let r = self.local().resolve(&path).map(|a| a.version);
        match r {
            Ok(v) => results.get().set_version(v),
            Err(e) => results.get().set_err(errno_to_wire(&e)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::client::ports::MetaPort;
    use crate::metaserver::namespace::Shape;
    use crate::shared::tmpfs::Tmpfs;
    use crate::shared::{Attr, Kind, ROOT};
    use crate::wire::meta_client::RpcMetaPort;

    /// Sends change `seq` of `client` as the client library does, and decodes the answer.
    async fn send(m: &meta::Client, client: u64, seq: u64, change: &Change) -> ChangeReply {
        let mut req = m.change_request();
        req.get().set_client(client);
        req.get().set_seq(seq);
        req.get().set_change(&postcard::to_allocvec(change).expect("encode"));
        let r = req.send().promise.await.expect("the change call");
        postcard::from_bytes(r.get().expect("reply").get_reply().expect("reply bytes")).expect("decode")
    }

    /// Starts a metaserver with its store in `dir`, serving until the process ends (as in the
    /// binary); its address.
    fn serve(dir: &std::path::Path) -> String {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let (d, a) = (dir.to_path_buf(), addr.clone());
        let shape = Shape { block_size: Some(4096), replicas: Some(3), quorum: Default::default() };
        std::thread::spawn(move || crate::metaserver::run(&d, shape, &a, crate::metaserver::DEFAULT_LEASE));
        addr
    }

    /// A connection to the metaserver at `addr`, once it is up (bounded).
    async fn connected(addr: &str) -> meta::Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match super::super::net::connect(addr).await {
                Ok(m) => return m,
                Err(e) if Instant::now() < deadline => {
                    debug!("metaserver not up yet: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("the metaserver did not come up: {e}"),
            }
        }
    }

    /// Runs `test` against a metaserver of its own, in a temp dir, once it is up: with its
    /// address and a connection to it.
    fn on_a_metaserver<F: std::future::Future<Output = ()>>(test: impl FnOnce(String, meta::Client) -> F) {
        let base = tempfile::tempdir().expect("temp dir");
        let addr = serve(&base.path().join("meta"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let m = connected(&addr).await;
            test(addr, m).await
        });
    }

    fn create(name: &[u8]) -> Change {
        Change::Mknod {
            parent: ROOT,
            name: name.to_vec(),
            node: NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 },
        }
    }

    /// A directory is listed a page at a time, each after the last name of the one before, and
    /// the client puts the pages together; a client that asks for no limit gets it whole.
    #[test]
    fn a_directory_is_listed_page_by_page() {
        on_a_metaserver(|addr, m| async move {
            // In name order, with names that begin with others.
            let names: Vec<Vec<u8>> = ["f0", "f1", "f1\x01", "f10", "f1a", "f2", "f3", "f4", "f5", "f6"]
                .map(|n| n.as_bytes().to_vec())
                .to_vec();
            for (seq, name) in names.iter().enumerate() {
                assert!(matches!(send(&m, 1, seq as u64 + 1, &create(name)).await, Ok(Ok(_))));
            }
            let page = |after: &[u8], limit| {
                let mut req = m.readdir_request();
                req.get().set_ino(ROOT);
                req.get().set_after(after);
                req.get().set_limit(limit);
                async move {
                    let r = req.send().promise.await.expect("readdir");
                    let r = r.get().expect("reply");
                    let got: Vec<Vec<u8>> = r
                        .get_entries()
                        .expect("entries")
                        .iter()
                        .map(|e| e.get_name().expect("name").to_vec())
                        .collect();
                    (got, r.get_more())
                }
            };
            assert_eq!(page(b"", 4).await, (names[..4].to_vec(), true));
            assert_eq!(page(b"f1", 2).await, (names[2..4].to_vec(), true));
            assert_eq!(page(b"f10", 4).await, (names[4..8].to_vec(), true));
            // After a name that is not there: from the next one.
            assert_eq!(page(b"f3a", 4).await, (names[7..].to_vec(), false));
            // Exactly as many left as asked for.
            assert_eq!(page(b"f2", 4).await, (names[6..].to_vec(), false));
            assert_eq!(page(b"", 0).await, (names.clone(), false));
            assert_eq!(page(b"", 10).await, (names.clone(), false));

            let port = RpcMetaPort::new(vec![addr.clone()], crate::client::fakes::fast_backoff()).with_readdir_page(3);
            let (parent, all) = port.readdir(ROOT).await.expect("readdir");
            assert_eq!(parent, ROOT);
            assert_eq!(all.into_iter().map(|(n, _)| n).collect::<Vec<_>>(), names);
        });
    }

    /// A lock granted comes with the file's attributes as the metaserver has them once it granted
    /// it, whether at once or found granted by a waiter's question; the mount revalidates the file
    /// from them instead of asking again. An unlock, a refusal and a wait still queued carry none.
    #[test]
    fn a_lock_granted_comes_with_the_files_attributes() {
        use crate::metaserver::namespace::locks::{Lock, LockType, Owner};
        use crate::metaserver::namespace::sessions::ClientInfo;
        on_a_metaserver(|addr, _| async move {
            let port = RpcMetaPort::new(vec![addr], crate::client::fakes::fast_backoff());
            let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
            let ino = port.mknod(ROOT, b"f", &node).await.expect("mknod").ino;
            port.extend(ino, 1234).await.expect("extend");
            for s in [1, 2] {
                let hello = Change::Hello { session: s, info: ClientInfo::default() };
                assert_eq!(port.apply(hello).await.expect("hello"), Outcome::Done);
            }
            let want = |session, typ| Lock { owner: Owner { session, owner: 1 }, typ, start: 0, end: u64::MAX, pid: 1 };
            let lock = |session, typ, wait| Change::Lock { ino, want: want(session, LockType::Write), typ, wait };

            let (o, attr) = port.apply_with_attr(lock(1, Some(LockType::Write), false)).await.expect("lock");
            assert_eq!(o, Outcome::Lock(LockState::Granted));
            // A grant does not say whether the file has extended attributes; a getattr does.
            let now = Attr { xattrs: None, ..port.getattr(ino).await.expect("getattr") };
            assert_eq!(attr, Some(now.clone()), "the attributes as of the grant");
            assert_eq!(now.size, 1234);

            // Another session waits; what it is told while queued carries nothing.
            let (o, attr) = port.apply_with_attr(lock(2, Some(LockType::Write), true)).await.expect("queued");
            assert_eq!((o, attr), (Outcome::Lock(LockState::Queued), None));
            let state = || Query::LockState { ino, want: want(2, LockType::Write), wait_ms: 0 };
            let (r, attr) = port.query_with_attr(state()).await.expect("state");
            assert_eq!((r, attr), (QueryReply::LockState(LockState::Queued), None));

            // The holder writes more and unlocks: the waiter's question finds it granted, with
            // the size the holder left.
            port.extend(ino, 5678).await.expect("extend");
            let (o, attr) = port.apply_with_attr(lock(1, None, false)).await.expect("unlock");
            assert_eq!((o, attr), (Outcome::Lock(LockState::Granted), None), "an unlock carries nothing");
            let (r, attr) = port.query_with_attr(state()).await.expect("state");
            assert_eq!(r, QueryReply::LockState(LockState::Granted));
            assert_eq!(attr.as_ref().map(|a| a.size), Some(5678));
            assert_eq!(attr, Some(Attr { xattrs: None, ..port.getattr(ino).await.expect("getattr") }));

            // Refused without waiting: nothing.
            let r = port.apply_with_attr(lock(1, Some(LockType::Read), false)).await;
            assert!(matches!(r, Err(FsError::WouldBlock)), "{r:?}");
        });
    }

    /// A create whose answer was lost is sent again with its number; meanwhile the metaserver's
    /// disk filled up. The retry must get the answer the create got, not ENOSPC: the create was
    /// applied, and a client told it failed would believe a file that exists was never made.
    #[test]
    fn a_retried_create_gets_its_first_answer_though_the_disk_filled_up_since() {
        let base = tempfile::tempdir().expect("temp dir");
        let Some(_disk) = Tmpfs::mount(base.path(), 16 << 20) else { return };
        let addr = serve(&base.path().join("meta"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let m = connected(&addr).await;
            let client = 0x5eed;
            let Ok(Ok(Outcome::Attr(made))) = send(&m, client, 1, &create(b"f")).await else {
                panic!("the first create failed")
            };

            // Something else fills the disk to its last 256 KiB.
            let filler = std::fs::File::create(base.path().join("filler")).expect("filler");
            let v = nix::sys::statvfs::statvfs(base.path()).expect("statvfs");
            let avail = v.blocks_available() * v.fragment_size();
            nix::fcntl::posix_fallocate(&filler, 0, (avail - (256 << 10)) as i64).expect("fill the disk");

            match send(&m, client, 1, &create(b"f")).await {
                Ok(Ok(Outcome::Attr(again))) => assert_eq!(again.ino, made.ino, "the retry made another file"),
                other => panic!("the retry of an applied create answered {other:?}"),
            }
            match send(&m, client, 2, &create(b"g")).await {
                Ok(Err(FsError::NoSpace(_))) => {}
                other => panic!("a new create on a full disk answered {other:?}"),
            }
        });
    }
}
