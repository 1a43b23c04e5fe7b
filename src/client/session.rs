//! A client's session with the metaserver, and what hangs on it: advisory locks, the report of
//! open files that keeps a file removed elsewhere alive until its last close here, and the
//! background collector (run by the oldest live mount).
//!
//! A thread renews the session every [`HEARTBEAT`], reporting the inodes open here when they
//! changed. The answer hands back orphans this client should free (see
//! `metaserver::namespace::sessions`). A session the metaserver expired (this client was cut off
//! for longer than its lease) says hello again: its locks are gone, which is logged and told to
//! the host (a mount refuses reads and writes through the files they were taken through).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::gc::Collected;
use super::ports::MetaPort;
use super::Cluster;
use crate::metaserver::namespace::locks::{Lock, LockType, Owner};
use crate::metaserver::namespace::sessions::{Beat, ClientInfo, ClientRow, LockState, Query, QueryReply};
use crate::metaserver::namespace::{Change, Outcome};
use crate::shared::{Attr, FsError, FsResult};

/// How often a session renews itself (its lease, a metaserver flag, is 10 s by default).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long one call waits for a queued lock before asking again.
const LOCK_POLL_MS: u32 = 1000;

/// What a session needs from the client that owns it.
pub trait SessionHost: Send + Sync + 'static {
    /// The inodes open here now, with a number that changes whenever that set may have changed.
    fn opens(&self) -> (u64, Vec<u64>);
    /// Orphans that nobody has open any more: free their blocks, then forget them.
    fn free(&self, inos: Vec<u64>);
    /// The metaserver expired the session: the locks it held are gone.
    fn expired(&self) {}
}

/// The host of a session that keeps no files open (dfsctl, tests): nothing to report or free.
pub struct NoOpens;

impl SessionHost for NoOpens {
    fn opens(&self) -> (u64, Vec<u64>) {
        (0, vec![])
    }

    fn free(&self, _: Vec<u64>) {}
}

/// When the collector runs in the background (on the oldest live mount only).
#[derive(Clone, Copy, Debug)]
pub struct Collection {
    pub every: Duration,
    pub window: Duration,
}

impl Default for Collection {
    fn default() -> Self {
        Collection { every: Duration::from_secs(600), window: Duration::from_secs(600) }
    }
}

/// A live session; dropping it ends the session (its locks are released at once).
pub struct Session {
    c: Cluster,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Cluster {
    fn apply(&self, change: Change) -> FsResult<Outcome> {
        self.call(move |l| async move { l.meta.apply(change).await })
    }

    fn query(&self, q: Query) -> FsResult<QueryReply> {
        self.call(move |l| async move { l.meta.query(q).await })
    }

    /// Begins (or begins again) session `id`.
    pub fn hello(&self, id: u64, info: &ClientInfo) -> FsResult<()> {
        match self.apply(Change::Hello { session: id, info: info.clone() })? {
            Outcome::Done => {
                self.set_session(id);
                Ok(())
            }
            o => Err(FsError::Io(format!("expected a hello's answer, got {o:?}"))),
        }
    }

    /// Renews the session; `None` if the metaserver no longer knows it (it expired).
    fn heartbeat(&self, id: u64, report_after: i64, opens: Option<Vec<u64>>) -> FsResult<Option<Beat>> {
        match self.apply(Change::Heartbeat { session: id, report_after, opens })? {
            Outcome::Beat(b) => Ok(Some(b)),
            Outcome::Gone => Ok(None),
            o => Err(FsError::Io(format!("expected a heartbeat's answer, got {o:?}"))),
        }
    }

    /// Ends this client's session: its locks go.
    pub fn bye(&self) -> FsResult<()> {
        let id = self.session();
        if id != 0 {
            self.apply(Change::Bye { session: id })?;
            self.set_session(0);
        }
        Ok(())
    }

    fn want(&self, owner: u64, start: u64, end: u64, pid: u32) -> FsResult<Lock> {
        let session = self.session();
        if session == 0 {
            return Err(FsError::Io("locks need a session with the metaserver".into()));
        }
        Ok(Lock { owner: Owner { session, owner }, typ: LockType::Read, start, end, pid })
    }

    /// Sets (`typ` Some) or releases (None) a lock of `owner` on bytes `start..=end` of `ino`.
    /// With `wait`, waits until it is granted (in arrival order); else a conflict is
    /// [`FsError::WouldBlock`]. A wait that would deadlock is [`FsError::Deadlock`]. An
    /// interrupted wait leaves the request queued: [`Cluster::cancel_lock`] withdraws it. A lock
    /// granted may come with the file's attributes as the metaserver had them when it answered (see
    /// [`MetaPort::apply_with_attr`]).
    #[allow(clippy::too_many_arguments)]
    pub fn lock(
        &self,
        ino: u64,
        owner: u64,
        (start, end): (u64, u64),
        typ: Option<LockType>,
        pid: u32,
        wait: bool,
    ) -> FsResult<Option<Attr>> {
        let want = self.want(owner, start, end, pid)?;
        self.call(move |l| async move {
            loop {
                let change = Change::Lock { ino, want: want.clone(), typ, wait };
                match l.meta.apply_with_attr(change).await? {
                    (Outcome::Lock(LockState::Granted), attr) => return Ok(attr),
                    (Outcome::Lock(LockState::Queued), _) => {}
                    (Outcome::Gone, _) => return Err(FsError::Io("this client's session expired; try again".into())),
                    (o, _) => return Err(FsError::Io(format!("expected a lock's state, got {o:?}"))),
                }
                let want = Lock { typ: typ.unwrap_or(LockType::Read), ..want.clone() };
                loop {
                    let q = Query::LockState { ino, want: want.clone(), wait_ms: LOCK_POLL_MS };
                    match l.meta.query_with_attr(q).await? {
                        (QueryReply::LockState(LockState::Granted), attr) => return Ok(attr),
                        (QueryReply::LockState(LockState::Queued), _) => continue,
                        // Dropped (the session expired and began again): ask again, at the end.
                        (QueryReply::LockState(LockState::Gone), _) => break,
                        (r, _) => return Err(FsError::Io(format!("expected a lock's state, got {r:?}"))),
                    }
                }
            }
        })
    }

    /// Withdraws a queued request; `Ok(true)` if it was granted before it could be.
    pub fn cancel_lock(&self, ino: u64, owner: u64, (start, end): (u64, u64), typ: LockType) -> FsResult<bool> {
        let want = Lock { typ, ..self.want(owner, start, end, 0)? };
        match self.apply(Change::CancelWait { ino, want })? {
            Outcome::Lock(s) => Ok(s == LockState::Granted),
            o => Err(FsError::Io(format!("expected a lock's state, got {o:?}"))),
        }
    }

    /// The first lock of another owner that conflicts with `typ` on `start..=end` (`F_GETLK`).
    pub fn test_lock(&self, ino: u64, owner: u64, (start, end): (u64, u64), typ: LockType) -> FsResult<Option<Lock>> {
        let want = Lock { typ, ..self.want(owner, start, end, 0)? };
        match self.query(Query::TestLock { ino, want })? {
            QueryReply::TestLock(l) => Ok(l),
            r => Err(FsError::Io(format!("expected a lock, got {r:?}"))),
        }
    }

    /// The live client sessions.
    pub fn clients(&self) -> FsResult<Vec<ClientRow>> {
        match self.query(Query::Clients)? {
            QueryReply::Clients(c) => Ok(c),
            r => Err(FsError::Io(format!("expected the clients, got {r:?}"))),
        }
    }

    /// Runs the collector once (see `client::gc`).
    pub fn collect(&self, window: Duration) -> FsResult<Collected> {
        self.call(move |l| async move { l.collect(window, crate::shared::now_ns()).await })
    }
}

/// This host's name, for `dfsctl status`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}

impl Session {
    /// Says hello and starts renewing the session in the background.
    pub fn start(c: &Cluster, info: ClientInfo, host: Arc<dyn SessionHost>, gc: Collection) -> FsResult<Session> {
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        c.hello(id, &info)?;
        info!(session = format_args!("{id:#x}"), "session with the metaserver begun");
        let stop: Arc<(Mutex<bool>, Condvar)> = Arc::default();
        let (bg, st) = (c.clone(), stop.clone());
        // The heartbeat thread is not joined: at the end it may be waiting for a metaserver that
        // is down; it stops at its next wake-up.
        std::thread::Builder::new()
            .name("dfs-session".into())
            .spawn(move || renew(&bg, id, &info, host.as_ref(), gc, &st))
            .map_err(|e| FsError::Io(format!("cannot start the session thread: {e}")))?;
        Ok(Session { c: c.clone(), stop })
    }
}

/// How long ending a session waits for the metaserver (a down one must not hold up an unmount:
/// the session then expires by its lease).
const BYE_WAIT: Duration = Duration::from_secs(2);

impl Drop for Session {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop.1.notify_all();
        let (c, (tx, rx)) = (self.c.clone(), std::sync::mpsc::channel());
        let bye = move || {
            let _ = tx.send(c.bye());
        };
        if std::thread::Builder::new().name("dfs-bye".into()).spawn(bye).is_err() {
            return;
        }
        match rx.recv_timeout(BYE_WAIT) {
            Ok(Ok(())) => debug!("session ended"),
            Ok(Err(e)) => debug!("ending the session: {e}"),
            Err(_) => info!("the metaserver did not answer within {BYE_WAIT:?}: the session ends with its lease"),
        }
    }
}

/// The session thread: a heartbeat every [`HEARTBEAT`] until stopped.
fn renew(
    c: &Cluster,
    id: u64,
    info: &ClientInfo,
    host: &dyn SessionHost,
    gc: Collection,
    stop: &(Mutex<bool>, Condvar),
) {
    let mut report_after = 0i64;
    let mut sent: Option<u64> = None;
    let collecting = Arc::new(AtomicBool::new(false));
    let mut last_gc = Instant::now();
    let mut failing = false;
    loop {
        {
            let stopped = stop.0.lock().unwrap_or_else(|p| p.into_inner());
            let (stopped, _) = stop.1.wait_timeout(stopped, HEARTBEAT).unwrap_or_else(|p| p.into_inner());
            if *stopped {
                return;
            }
        }
        let (generation, opens) = host.opens();
        let report = (sent != Some(generation)).then_some(opens);
        match c.heartbeat(id, report_after, report) {
            Ok(Some(beat)) => {
                if failing {
                    info!("session renewed again");
                    failing = false;
                }
                sent = Some(generation);
                report_after = beat.now;
                if !beat.free.is_empty() {
                    debug!(orphans = beat.free.len(), "freeing orphans nobody has open");
                    host.free(beat.free);
                }
                if beat.collector && last_gc.elapsed() >= gc.every && !collecting.swap(true, Ordering::AcqRel) {
                    last_gc = Instant::now();
                    let (c, busy) = (c.clone(), collecting.clone());
                    let run = move || {
                        match c.collect(gc.window) {
                            Ok(r) => info!(?r, "background collection done"),
                            Err(e) => warn!("background collection failed: {e}"),
                        }
                        busy.store(false, Ordering::Release);
                    };
                    if std::thread::Builder::new().name("dfs-collect".into()).spawn(run).is_err() {
                        collecting.store(false, Ordering::Release);
                    }
                }
            }
            // Ended meanwhile (the mount is going): not begun again.
            Ok(None) if *stop.0.lock().unwrap_or_else(|p| p.into_inner()) => return,
            Ok(None) => {
                warn!(
                    session = format_args!("{id:#x}"),
                    "the metaserver expired this client's session (cut off longer than its lease): \
                     its locks were released; beginning it again"
                );
                (sent, report_after) = (None, 0);
                host.expired();
                if let Err(e) = c.hello(id, info) {
                    warn!("beginning the session again failed: {e}");
                }
            }
            Err(e) => {
                sent = None;
                if !failing {
                    warn!("renewing the session failed: {e}");
                    failing = true;
                }
            }
        }
    }
}
