//! Client sessions, what they have open, and their advisory locks: state the namespace keeps
//! beside the tree, changed only by changes (so a group replicates it and a new leader has it).
//!
//! - A session is a mount (or another client that changes things). It says hello, then renews
//!   itself with a heartbeat about every second; the metaserver that leads expires one not renewed
//!   within its lease (see `Change::Expire`). An expired session's locks and requests go, and what
//!   it had open no longer holds anything.
//! - Each heartbeat reports the inodes the session has open, as it saw them after the previous
//!   heartbeat's answer. A file whose last name goes while other sessions live is *held*: its
//!   blocks are freed only once every live session has reported, after the removal, that it does
//!   not have it open (POSIX: an unlinked file lives until its last close, on every mount). The
//!   heartbeat's answer then hands it to the session that removed it (or, if that one is gone, to
//!   any) to free.
//! - Locks: see [`super::locks`]. A request that must wait is queued here; its client then asks
//!   for the request's state until it is granted (see `Query::LockState`).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::locks::{InodeLocks, Lock, LockType, Owner};
use super::{dec, enc, Namespace, Outcome};
use crate::shared::db::{Read, Writer};
use crate::shared::{FsError, FsResult};

/// Who a session is, for `dfsctl status`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClientInfo {
    pub host: String,
    pub pid: u32,
    /// The mount point, or what the client is (e.g. "dfsctl").
    pub mount: String,
}

/// A live session as the clients table keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct ClientRecord {
    info: ClientInfo,
    since: i64,
    renewed: i64,
    /// The inodes open in the session, as of its last report, taken after this time.
    report_after: i64,
    opens: Vec<u64>,
}

/// A live session, as `dfsctl status` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClientRow {
    pub session: u64,
    pub info: ClientInfo,
    pub since: i64,
    pub renewed: i64,
    pub opens: u32,
    pub locks: u32,
    pub waiting: u32,
}

/// An orphan's record: when its last name went, by which session (0: none), and whether it is
/// held for other sessions (else the session that removed it frees it itself).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
struct OrphanRecord {
    at: i64,
    by: u64,
    held: bool,
}

/// What a heartbeat answers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The metaserver's time of the heartbeat: the next report is taken after it.
    pub now: i64,
    /// Orphans nobody has open any more, for this session to free.
    pub free: Vec<u64>,
    /// Whether this session is the oldest live mount, which runs the background collector.
    pub collector: bool,
}

/// Where a lock request stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    Granted,
    Queued,
    /// Neither held nor waiting (cancelled, or its session expired).
    Gone,
}

/// A read about sessions, locks and what the collector may remove.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// The live sessions.
    Clients,
    /// The first lock of another owner that conflicts with `want` (`F_GETLK`).
    TestLock { ino: u64, want: Lock },
    /// Where a lock request stands; while it is queued, the metaserver waits up to `wait_ms` for
    /// it to be granted before answering.
    LockState { ino: u64, want: Lock, wait_ms: u32 },
    /// Orphans that no live session has open (see [`Namespace::freeable_by_anyone`]).
    Freeable,
    /// For each file id: its size and whether a live session has it open, or None if no such
    /// inode exists.
    Refs { inos: Vec<u64> },
    /// The value of an extended attribute.
    Xattr { ino: u64, name: Vec<u8> },
    /// The names of an inode's extended attributes.
    Xattrs { ino: u64 },
}

impl Query {
    /// Its kind, as the metrics count it.
    pub fn name(&self) -> &'static str {
        match self {
            Query::Clients => "clients",
            Query::TestLock { .. } => "test_lock",
            Query::LockState { .. } => "lock_state",
            Query::Freeable => "freeable",
            Query::Refs { .. } => "refs",
            Query::Xattr { .. } => "getxattr",
            Query::Xattrs { .. } => "listxattr",
        }
    }
}

/// What a file id refers to, for the collector.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRef {
    pub size: u64,
    pub open: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum QueryReply {
    Clients(Vec<ClientRow>),
    TestLock(Option<Lock>),
    LockState(LockState),
    Freeable(Vec<u64>),
    Refs(Vec<Option<FileRef>>),
    Xattr(Vec<u8>),
    Xattrs(Vec<Vec<u8>>),
}

/// Most file ids one `Refs` query may name.
pub const MAX_REFS: usize = 64 * 1024;

/// Most orphans one heartbeat hands out.
const FREE_BATCH: usize = 4096;

/// The key of owner `o`'s wait for inode `ino`: an owner may wait for several inodes at once
/// (a process's threads), each recorded until the owner waits there no more.
fn wait_key(o: Owner, ino: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&owner_key(o));
    k[16..].copy_from_slice(&ino.to_be_bytes());
    k
}

fn owner_key(o: Owner) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&o.session.to_be_bytes());
    k[8..].copy_from_slice(&o.owner.to_be_bytes());
    k
}

fn u64_key(k: &[u8]) -> Option<u64> {
    k.try_into().ok().map(u64::from_be_bytes)
}

impl Namespace {
    fn client(&self, r: &impl Read, session: u64) -> FsResult<Option<ClientRecord>> {
        r.get(self.clients, &session.to_be_bytes())?.map(dec).transpose()
    }

    fn all_clients(&self, r: &impl Read) -> FsResult<Vec<(u64, ClientRecord)>> {
        let mut out = Vec::new();
        for (k, v) in r.all(self.clients)? {
            out.push((u64_key(&k).ok_or_else(|| FsError::Io("bad session key".into()))?, dec(&v)?));
        }
        Ok(out)
    }

    fn inode_locks(&self, r: &impl Read, ino: u64) -> FsResult<InodeLocks> {
        Ok(r.get(self.locks, &ino.to_be_bytes())?.map(dec).transpose()?.unwrap_or_default())
    }

    /// Stores an inode's locks after a change, granting what can be granted first.
    fn put_locks(&self, w: &mut Writer, ino: u64, mut l: InodeLocks) -> FsResult<()> {
        for owner in l.grant() {
            if l.waiting(owner).is_none() {
                w.delete(self.waits, &wait_key(owner, ino))?;
            }
        }
        if l.is_empty() {
            w.delete(self.locks, &ino.to_be_bytes())?;
        } else {
            w.put(self.locks, &ino.to_be_bytes(), &enc(&l)?)?;
        }
        Ok(())
    }

    pub(crate) fn hello_in(&self, w: &mut Writer, session: u64, info: &ClientInfo, now: i64) -> FsResult<Outcome> {
        // A session said hello again (after it expired): it starts afresh.
        self.drop_session_in(w, session)?;
        let rec = ClientRecord { info: info.clone(), since: now, renewed: now, report_after: 0, opens: vec![] };
        w.put(self.clients, &session.to_be_bytes(), &enc(&rec)?)?;
        Ok(Outcome::Done)
    }

    pub(crate) fn heartbeat_in(
        &self,
        w: &mut Writer,
        session: u64,
        report_after: i64,
        opens: &Option<Vec<u64>>,
        now: i64,
    ) -> FsResult<Outcome> {
        let Some(mut rec) = self.client(w, session)? else { return Ok(Outcome::Gone) };
        rec.renewed = now;
        rec.report_after = report_after;
        if let Some(o) = opens {
            rec.opens = o.clone();
        }
        w.put(self.clients, &session.to_be_bytes(), &enc(&rec)?)?;
        let clients = self.all_clients(w)?;
        let free = self.freeable(w, session, &clients)?;
        let oldest = clients.iter().filter(|(_, c)| c.info.mount.starts_with('/')).min_by_key(|(id, c)| (c.since, *id));
        let collector = oldest.is_some_and(|(id, _)| *id == session);
        Ok(Outcome::Beat(Beat { now, free, collector }))
    }

    /// Orphans that `session` should free: held ones it removed (or whose remover is gone) and
    /// unheld ones whose remover is gone, that every live session reported closed after removal.
    fn freeable(&self, r: &impl Read, session: u64, clients: &[(u64, ClientRecord)]) -> FsResult<Vec<u64>> {
        let live: HashSet<u64> = clients.iter().map(|(id, _)| *id).collect();
        let mine = |o: &OrphanRecord| if live.contains(&o.by) { o.held && o.by == session } else { true };
        self.closed_everywhere(r, clients, mine, FREE_BATCH)
    }

    /// Up to `limit` orphans accepted by `which` that every live session in `clients` reported
    /// closed, in a report taken after the orphan's removal.
    fn closed_everywhere(
        &self,
        r: &impl Read,
        clients: &[(u64, ClientRecord)],
        which: impl Fn(&OrphanRecord) -> bool,
        limit: usize,
    ) -> FsResult<Vec<u64>> {
        let opens: Vec<(i64, HashSet<u64>)> =
            clients.iter().map(|(_, c)| (c.report_after, c.opens.iter().copied().collect())).collect();
        let mut out = Vec::new();
        for (k, v) in r.all(self.orphans)? {
            let (Some(ino), o) = (u64_key(&k), orphan_record(&v)) else { continue };
            if which(&o) && opens.iter().all(|(after, open)| *after > o.at && !open.contains(&ino)) {
                out.push(ino);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Records an inode that just lost its last name (in a change by `session`, 0 for none).
    /// Returns it for the caller to free if no other session lives, else 0: it is held until every
    /// session reported it closed.
    pub(crate) fn orphaned_in(&self, w: &mut Writer, ino: u64, session: u64, now: i64) -> FsResult<u64> {
        if ino == 0 {
            return Ok(0);
        }
        let others = self.another_session(w, session)?;
        let rec = OrphanRecord { at: now, by: session, held: others };
        w.put(self.orphans, &ino.to_be_bytes(), &enc(&rec)?)?;
        Ok(if others { 0 } else { ino })
    }

    pub(crate) fn bye_in(&self, w: &mut Writer, session: u64) -> FsResult<Outcome> {
        self.drop_session_in(w, session)?;
        Ok(Outcome::Done)
    }

    /// Expires `session` if it was not renewed within `lease_ns` of `now` (a heartbeat may have
    /// come in since the leader decided to expire it).
    pub(crate) fn expire_in(&self, w: &mut Writer, session: u64, lease_ns: i64, now: i64) -> FsResult<Outcome> {
        match self.client(w, session)? {
            Some(c) if now.saturating_sub(c.renewed) > lease_ns => {
                tracing::warn!(session = format_args!("{session:#x}"), host = %c.info.host, pid = c.info.pid,
                    mount = %c.info.mount, "session expired: its locks are released");
                self.drop_session_in(w, session)?;
                Ok(Outcome::Done)
            }
            _ => Ok(Outcome::Done),
        }
    }

    /// Forgets a session: its record, its locks and its requests (granting what they held up).
    fn drop_session_in(&self, w: &mut Writer, session: u64) -> FsResult<()> {
        w.delete(self.clients, &session.to_be_bytes())?;
        for (k, v) in w.all(self.locks)? {
            let mut l: InodeLocks = dec(&v)?;
            if l.held.iter().chain(&l.queue).any(|x| x.owner.session == session) {
                let ino = u64_key(&k).ok_or_else(|| FsError::Io("bad lock key".into()))?;
                for waiter in l.queue.iter().filter(|x| x.owner.session == session) {
                    w.delete(self.waits, &wait_key(waiter.owner, ino))?;
                    // As stores of an earlier version keyed it.
                    w.delete(self.waits, &owner_key(waiter.owner))?;
                }
                l.drop_session(session);
                self.put_locks(w, ino, l)?;
            }
        }
        Ok(())
    }

    /// Sets (`typ` Some) or releases (None) a lock. A request that conflicts is refused with
    /// `WouldBlock` unless `wait`; then it is queued, unless waiting would deadlock.
    pub(crate) fn lock_in(
        &self,
        w: &mut Writer,
        ino: u64,
        want: Lock,
        typ: Option<LockType>,
        wait: bool,
    ) -> FsResult<Outcome> {
        if self.client(w, want.owner.session)?.is_none() {
            return Ok(Outcome::Gone);
        }
        Self::inode(w, self.inodes, ino)?;
        if want.start > want.end {
            return Err(FsError::Invalid(format!("a lock range {}..={}", want.start, want.end)));
        }
        let mut l = self.inode_locks(w, ino)?;
        // Other calls of the owner leave its queued requests alone: one thread's unlock or close
        // does not withdraw another thread's wait, as on Linux (the wait goes on; a close by the
        // waiter's own open file cannot come while it waits).
        let Some(typ) = typ else {
            l.unlock(want.owner, want.start, want.end);
            self.put_locks(w, ino, l)?;
            return Ok(Outcome::Lock(LockState::Granted));
        };
        let want = Lock { typ, ..want };
        // The same request asked again to wait (after a failover, or by another thread) keeps
        // its place. Asked without waiting, it is answered on its own: another thread's wait
        // must not make a non-blocking request block.
        if wait && l.queued(&want).is_some() {
            return Ok(Outcome::Lock(LockState::Queued));
        }
        let blockers = l.blockers(&want, l.queue.len());
        if blockers.is_empty() {
            l.set(want);
            self.put_locks(w, ino, l)?;
            return Ok(Outcome::Lock(LockState::Granted));
        }
        if !wait {
            return Err(FsError::WouldBlock);
        }
        if self.would_deadlock(w, ino, &l, &want, blockers)? {
            return Err(FsError::Deadlock);
        }
        l.queue.push(want.clone());
        w.put(self.waits, &wait_key(want.owner, ino), &[])?;
        self.put_locks(w, ino, l)?;
        Ok(Outcome::Lock(LockState::Queued))
    }

    /// Whether `want`'s owner waiting for `blockers` closes a cycle: some owner it would wait for
    /// waits, directly or through others, for it.
    fn would_deadlock(
        &self,
        r: &impl Read,
        ino: u64,
        here: &InodeLocks,
        want: &Lock,
        mut stack: Vec<Owner>,
    ) -> FsResult<bool> {
        let mut seen = HashSet::new();
        while let Some(b) = stack.pop() {
            if b == want.owner {
                return Ok(true);
            }
            if !seen.insert(b) {
                continue;
            }
            let mut at = Vec::new();
            r.visit(self.waits, &wait_key(b, 0), &wait_key(b, u64::MAX), |k, _| {
                at.extend(k.get(16..).and_then(u64_key));
                true
            })?;
            // Every request of `b`'s, on every inode it waits for.
            for at in at {
                let l = if at == ino { here.clone() } else { self.inode_locks(r, at)? };
                for (i, q) in l.queue.iter().enumerate().filter(|(_, q)| q.owner == b) {
                    stack.extend(l.blockers(q, i));
                }
            }
        }
        Ok(false)
    }

    /// Withdraws a queued request. Answers whether the lock was granted before it could be.
    pub(crate) fn cancel_in(&self, w: &mut Writer, ino: u64, want: &Lock) -> FsResult<Outcome> {
        let mut l = self.inode_locks(w, ino)?;
        if let Some(i) = l.queued(want) {
            l.queue.remove(i);
            if l.waiting(want.owner).is_none() {
                w.delete(self.waits, &wait_key(want.owner, ino))?;
            }
            self.put_locks(w, ino, l)?;
            return Ok(Outcome::Lock(LockState::Gone));
        }
        Ok(Outcome::Lock(if l.holds(want) { LockState::Granted } else { LockState::Gone }))
    }

    /// Where `want` stands: held by its owner, still queued, or neither.
    pub fn lock_state(&self, ino: u64, want: &Lock) -> FsResult<LockState> {
        self.db.read(|r| {
            let l = self.inode_locks(r, ino)?;
            Ok(if l.holds(want) {
                LockState::Granted
            } else if l.queued(want).is_some() {
                LockState::Queued
            } else {
                LockState::Gone
            })
        })
    }

    /// The first held lock of another owner that conflicts with `want` (`F_GETLK`).
    pub fn test_lock(&self, ino: u64, want: &Lock) -> FsResult<Option<Lock>> {
        self.db.read(|r| Ok(self.inode_locks(r, ino)?.conflicting(want).cloned()))
    }

    /// The live sessions, with what each holds.
    pub fn clients(&self) -> FsResult<Vec<ClientRow>> {
        self.db.read(|r| {
            let mut locks: HashMap<u64, (u32, u32)> = HashMap::new();
            for (_, v) in r.all(self.locks)? {
                let l: InodeLocks = dec(&v)?;
                for h in &l.held {
                    locks.entry(h.owner.session).or_default().0 += 1;
                }
                for q in &l.queue {
                    locks.entry(q.owner.session).or_default().1 += 1;
                }
            }
            Ok(self
                .all_clients(r)?
                .into_iter()
                .map(|(session, c)| {
                    let (held, waiting) = locks.get(&session).copied().unwrap_or_default();
                    ClientRow {
                        session,
                        info: c.info,
                        since: c.since,
                        renewed: c.renewed,
                        opens: c.opens.len() as u32,
                        locks: held,
                        waiting,
                    }
                })
                .collect())
        })
    }

    /// Answers `q` (a `LockState` query without waiting).
    pub fn query(&self, q: &Query) -> FsResult<QueryReply> {
        Ok(match q {
            Query::Clients => QueryReply::Clients(self.clients()?),
            Query::TestLock { ino, want } => QueryReply::TestLock(self.test_lock(*ino, want)?),
            Query::LockState { ino, want, .. } => QueryReply::LockState(self.lock_state(*ino, want)?),
            Query::Freeable => QueryReply::Freeable(self.freeable_by_anyone()?),
            Query::Refs { inos } => {
                if inos.len() > MAX_REFS {
                    return Err(FsError::Invalid(format!("at most {MAX_REFS} file ids per query, got {}", inos.len())));
                }
                QueryReply::Refs(self.refs(inos)?)
            }
            Query::Xattr { ino, name } => QueryReply::Xattr(self.get_xattr(*ino, name)?),
            Query::Xattrs { ino } => QueryReply::Xattrs(self.list_xattrs(*ino)?),
        })
    }

    /// Orphans every live session reported closed after their removal, whoever removed them (for
    /// the collector: their remover may have died before freeing them).
    pub fn freeable_by_anyone(&self) -> FsResult<Vec<u64>> {
        self.db.read(|r| self.closed_everywhere(r, &self.all_clients(r)?, |_| true, usize::MAX))
    }

    fn refs(&self, inos: &[u64]) -> FsResult<Vec<Option<FileRef>>> {
        self.db.read(|r| {
            let open: HashSet<u64> = self.all_clients(r)?.into_iter().flat_map(|(_, c)| c.opens).collect();
            inos.iter()
                .map(|&ino| match Self::inode(r, self.inodes, ino) {
                    Ok(a) => Ok(Some(FileRef { size: a.size, open: open.contains(&ino) })),
                    Err(FsError::NotFound) => Ok(None),
                    Err(e) => Err(e),
                })
                .collect()
        })
    }

    /// Whether a live session other than `session` exists.
    fn another_session(&self, r: &impl Read, session: u64) -> FsResult<bool> {
        let mut other = false;
        r.visit(self.clients, &[0u8; 8], &[0xffu8; 9], |k, _| {
            other = u64_key(k) != Some(session);
            !other
        })?;
        Ok(other)
    }

    /// Sessions not renewed within `lease_ns` of `now` (the leader proposes their expiry).
    pub fn stale_sessions(&self, now: i64, lease_ns: i64) -> FsResult<Vec<u64>> {
        self.db.read(|r| {
            Ok(self
                .all_clients(r)?
                .into_iter()
                .filter(|(_, c)| now.saturating_sub(c.renewed) > lease_ns)
                .map(|(id, _)| id)
                .collect())
        })
    }
}

fn orphan_record(v: &[u8]) -> OrphanRecord {
    // Stores made before sessions kept an empty value: removed by nobody known, at time 0.
    postcard::from_bytes(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metaserver::namespace::Change;
    use crate::shared::{Kind, NewNode, ROOT};

    const ALL: u64 = i64::MAX as u64;

    fn ns() -> (tempfile::TempDir, Namespace) {
        let d = tempfile::tempdir().unwrap();
        let n = Namespace::open(d.path(), Some(8), Some(3)).unwrap();
        (d, n)
    }

    fn apply(n: &Namespace, c: Change, now: i64) -> FsResult<Outcome> {
        n.db.write(|w| n.apply_in(w, &c, now))
    }

    fn hello(n: &Namespace, s: u64, now: i64) {
        let info = ClientInfo { host: "h".into(), pid: s as u32, mount: format!("/m{s}") };
        apply(n, Change::Hello { session: s, info }, now).unwrap();
    }

    fn beat(n: &Namespace, s: u64, after: i64, opens: Vec<u64>, now: i64) -> Beat {
        match apply(n, Change::Heartbeat { session: s, report_after: after, opens: Some(opens) }, now).unwrap() {
            Outcome::Beat(b) => b,
            o => panic!("{o:?}"),
        }
    }

    fn lock(n: &Namespace, s: u64, ino: u64, typ: Option<LockType>, wait: bool) -> FsResult<Outcome> {
        let want = Lock { owner: Owner { session: s, owner: 1 }, typ: LockType::Read, start: 0, end: ALL, pid: 1 };
        apply(n, Change::Lock { ino, want, typ, wait }, 10)
    }

    fn file(n: &Namespace, name: &[u8]) -> u64 {
        n.mknod(ROOT, name, &NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 }).unwrap().ino
    }

    /// A namespace with sessions 1, 2 and 3 and a file "f" (its inode), for the lock tests.
    fn three_sessions_and_a_file() -> (tempfile::TempDir, Namespace, u64) {
        let (d, n) = ns();
        let f = file(&n, b"f");
        for s in 1..=3 {
            hello(&n, s, 1);
        }
        (d, n, f)
    }

    #[test]
    fn an_orphan_open_elsewhere_is_held_until_every_session_reported_it_closed() {
        let (_d, n) = ns();
        let f = file(&n, b"f");
        hello(&n, 1, 1);
        hello(&n, 2, 1);
        beat(&n, 2, 1, vec![f], 5);
        let unlink = Change::By { session: 1, change: Box::new(Change::Unlink { parent: ROOT, name: b"f".to_vec() }) };
        assert_eq!(apply(&n, unlink, 10), Ok(Outcome::Orphan(0)), "held: another session lives");
        assert!(beat(&n, 1, 11, vec![], 12).free.is_empty(), "session 2 has not reported since");
        assert!(beat(&n, 2, 11, vec![f], 13).free.is_empty(), "session 2 still has it open");
        assert!(beat(&n, 1, 12, vec![], 14).free.is_empty());
        assert!(beat(&n, 2, 9, vec![], 15).free.is_empty(), "a report taken before the removal says nothing");
        assert!(beat(&n, 2, 13, vec![], 16).free.is_empty(), "handed to the session that removed it");
        assert_eq!(beat(&n, 1, 14, vec![], 17).free, vec![f]);
    }

    #[test]
    fn the_orphans_of_a_session_that_expired_go_to_another() {
        let (_d, n) = ns();
        let f = file(&n, b"f");
        hello(&n, 1, 1);
        hello(&n, 2, 1);
        let unlink = Change::By { session: 1, change: Box::new(Change::Unlink { parent: ROOT, name: b"f".to_vec() }) };
        assert_eq!(apply(&n, unlink, 10), Ok(Outcome::Orphan(0)));
        beat(&n, 2, 11, vec![], 12);
        assert_eq!(apply(&n, Change::Expire { session: 1, lease_ns: 100 }, 50), Ok(Outcome::Done));
        assert_eq!(n.clients().unwrap().len(), 2, "renewed 49 ns ago: within its lease");
        apply(&n, Change::Expire { session: 1, lease_ns: 100 }, 200).unwrap();
        assert_eq!(n.clients().unwrap().len(), 1);
        assert_eq!(beat(&n, 2, 13, vec![], 201).free, vec![f]);
        assert_eq!(apply(&n, Change::Heartbeat { session: 1, report_after: 0, opens: None }, 202), Ok(Outcome::Gone));
    }

    #[test]
    fn a_lone_session_frees_its_own_orphans_at_once() {
        let (_d, n) = ns();
        let f = file(&n, b"f");
        hello(&n, 1, 1);
        let unlink = Change::By { session: 1, change: Box::new(Change::Unlink { parent: ROOT, name: b"f".to_vec() }) };
        assert_eq!(apply(&n, unlink, 10), Ok(Outcome::Orphan(f)));
        assert!(beat(&n, 1, 11, vec![], 12).free.is_empty(), "its own to free, not handed out again");
    }

    #[test]
    fn waiters_are_granted_in_order_and_an_expired_holder_lets_them_go() {
        let (_d, n, f) = three_sessions_and_a_file();
        let w = Some(LockType::Write);
        assert_eq!(lock(&n, 1, f, w, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(lock(&n, 2, f, w, false), Err(FsError::WouldBlock));
        assert_eq!(lock(&n, 2, f, w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(lock(&n, 3, f, Some(LockType::Read), true), Ok(Outcome::Lock(LockState::Queued)));
        let want = |s| Lock { owner: Owner { session: s, owner: 1 }, typ: LockType::Read, start: 0, end: ALL, pid: 1 };
        assert_eq!(n.test_lock(f, &want(3)).unwrap().map(|l| l.owner.session), Some(1));
        apply(&n, Change::Expire { session: 1, lease_ns: 0 }, 100).unwrap();
        assert_eq!(n.lock_state(f, &Lock { typ: LockType::Write, ..want(2) }), Ok(LockState::Granted));
        assert_eq!(n.lock_state(f, &want(3)), Ok(LockState::Queued));
        assert_eq!(lock(&n, 2, f, None, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(n.lock_state(f, &want(3)), Ok(LockState::Granted));
        let rows = n.clients().unwrap();
        assert_eq!(rows.iter().map(|r| (r.session, r.locks)).collect::<Vec<_>>(), vec![(2, 0), (3, 1)]);
    }

    /// One thread of a process waits; another thread of it locks and unlocks other bytes of the
    /// file: the wait keeps its place ahead of another mount's, as on Linux.
    #[test]
    fn another_call_of_the_owner_leaves_its_queued_request_in_place() {
        let (_d, n, f) = three_sessions_and_a_file();
        let at =
            |s: u64, start: u64, end: u64, typ| Lock { owner: Owner { session: s, owner: 1 }, typ, start, end, pid: 1 };
        let set = |want: Lock, typ, wait| apply(&n, Change::Lock { ino: f, want, typ, wait }, 10);
        let w = Some(LockType::Write);
        assert_eq!(set(at(1, 0, 9, LockType::Write), w, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(set(at(2, 0, 9, LockType::Write), w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(set(at(3, 0, 9, LockType::Write), w, true), Ok(Outcome::Lock(LockState::Queued)));
        // Session 2's other thread: a lock of other bytes, and an unlock of everything.
        assert_eq!(set(at(2, 50, 59, LockType::Write), w, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(set(at(2, 0, ALL, LockType::Write), None, false), Ok(Outcome::Lock(LockState::Granted)));
        // The same request again (a retry) keeps its place too; without waiting, it would block.
        assert_eq!(set(at(2, 0, 9, LockType::Write), w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(set(at(2, 0, 9, LockType::Write), w, false), Err(FsError::WouldBlock));
        assert_eq!(n.lock_state(f, &at(2, 0, 9, LockType::Write)), Ok(LockState::Queued));
        assert_eq!(set(at(1, 0, ALL, LockType::Write), None, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(n.lock_state(f, &at(2, 0, 9, LockType::Write)), Ok(LockState::Granted), "first in line");
        assert_eq!(n.lock_state(f, &at(3, 0, 9, LockType::Write)), Ok(LockState::Queued));
    }

    /// An owner whose threads wait for two files still waits for the first once the second is
    /// granted: a cycle through that wait is still found (the grant forgot both).
    #[test]
    fn an_owner_waiting_for_two_files_still_closes_a_cycle_through_the_one_left() {
        let (_d, n, f) = three_sessions_and_a_file();
        let (g, h) = (file(&n, b"g"), file(&n, b"h"));
        let w = Some(LockType::Write);
        // 1 holds f, 2 holds g, 3 holds h; 1 waits for g and for h.
        for (s, ino) in [(1, f), (2, g), (3, h)] {
            assert_eq!(lock(&n, s, ino, w, false), Ok(Outcome::Lock(LockState::Granted)));
        }
        assert_eq!(lock(&n, 1, g, w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(lock(&n, 1, h, w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(lock(&n, 3, h, None, false), Ok(Outcome::Lock(LockState::Granted)));
        let want = Lock { owner: Owner { session: 1, owner: 1 }, typ: LockType::Write, start: 0, end: ALL, pid: 1 };
        assert_eq!(n.lock_state(h, &want), Ok(LockState::Granted));
        assert_eq!(lock(&n, 2, f, w, true), Err(FsError::Deadlock), "2 waits for 1, which waits for 2");
    }

    /// A reader upgrading to a write lock does not wait for the writer queued for it, nor for a
    /// reader queued behind that writer (fairness only), as Linux grants such an upgrade.
    /// Regression: the reader queued behind the writer counted as a blocker, so the upgrade was
    /// answered EDEADLK (waiting) or EAGAIN.
    #[test]
    fn an_upgrade_waits_for_no_one_queued_behind_a_waiter_for_it() {
        let (_d, n, f) = three_sessions_and_a_file();
        let (r, w) = (Some(LockType::Read), Some(LockType::Write));
        assert_eq!(lock(&n, 1, f, r, false), Ok(Outcome::Lock(LockState::Granted)));
        assert_eq!(lock(&n, 2, f, w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(lock(&n, 3, f, r, true), Ok(Outcome::Lock(LockState::Queued)), "behind the writer");
        assert_eq!(lock(&n, 1, f, w, false), Ok(Outcome::Lock(LockState::Granted)), "the upgrade");
        // The writer and the reader behind it still wait, now for the writer that upgraded.
        let l = n.db.read(|r| n.inode_locks(r, f)).unwrap();
        assert_eq!(l.held.iter().map(|h| (h.owner.session, h.typ)).collect::<Vec<_>>(), vec![(1, LockType::Write)]);
        assert_eq!(l.queue.iter().map(|q| q.owner.session).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn a_cycle_of_waiters_across_files_is_refused_with_edeadlk() {
        let (_d, n) = ns();
        let (f, g) = (file(&n, b"f"), file(&n, b"g"));
        hello(&n, 1, 1);
        hello(&n, 2, 1);
        let w = Some(LockType::Write);
        lock(&n, 1, f, w, false).unwrap();
        lock(&n, 2, g, w, false).unwrap();
        assert_eq!(lock(&n, 1, g, w, true), Ok(Outcome::Lock(LockState::Queued)));
        assert_eq!(lock(&n, 2, f, w, true), Err(FsError::Deadlock));
        let want = Lock { owner: Owner { session: 1, owner: 1 }, typ: LockType::Write, start: 0, end: ALL, pid: 1 };
        assert_eq!(
            apply(&n, Change::CancelWait { ino: g, want: want.clone() }, 20),
            Ok(Outcome::Lock(LockState::Gone))
        );
        assert_eq!(n.lock_state(g, &want), Ok(LockState::Gone));
        assert_eq!(lock(&n, 2, f, w, true), Ok(Outcome::Lock(LockState::Queued)), "no cycle any more");
    }
}
