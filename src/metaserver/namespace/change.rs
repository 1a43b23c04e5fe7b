//! A change to the namespace as one value: what a metaserver applies, and what a replicated log
//! records. The time of the change travels with it (chosen once, by the server that accepted it),
//! so that every replica that applies it makes the same inode.

use serde::{Deserialize, Serialize};

use super::locks::{Lock, LockType};
use super::sessions::{Beat, ClientInfo, LockState};
use super::Namespace;
use crate::shared::db::Writer;
use crate::shared::layout::Layout;
use crate::shared::{Attr, FsError, FsResult, NewNode, RegisterError, SetAttr};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Register {
        servers: Vec<String>,
    },
    Setattr {
        ino: u64,
        set: SetAttr,
    },
    Mknod {
        parent: u64,
        name: Vec<u8>,
        node: NewNode,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Link {
        ino: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
    },
    Extend {
        ino: u64,
        size: u64,
    },
    Purge {
        inos: Vec<u64>,
    },
    /// A change made by a client session: a removal then knows who removed the file.
    By {
        session: u64,
        #[serde(deserialize_with = "one_wrapping")]
        change: Box<Change>,
    },
    /// A session begins (or begins again after it expired).
    Hello {
        session: u64,
        info: ClientInfo,
    },
    /// A session renews itself, with the inodes it has open (None: as in its last report), as seen
    /// after the metaserver's time `report_after`.
    Heartbeat {
        session: u64,
        report_after: i64,
        opens: Option<Vec<u64>>,
    },
    /// A session ends: its locks go.
    Bye {
        session: u64,
    },
    /// The leader's verdict that a session was not renewed within `lease_ns`, checked again when
    /// applied.
    Expire {
        session: u64,
        lease_ns: i64,
    },
    /// Sets (`typ` Some) or releases (None) the lock `want` describes (its type is ignored).
    Lock {
        ino: u64,
        want: Lock,
        typ: Option<LockType>,
        wait: bool,
    },
    /// Withdraws a queued lock request.
    CancelWait {
        ino: u64,
        want: Lock,
    },
    /// Forgets the last answers kept for clients that changed nothing since `before`.
    ForgetReplies {
        before: i64,
    },
    /// Sets an extended attribute (`flags`: `setxattr(2)`'s XATTR_CREATE or XATTR_REPLACE).
    SetXattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        ino: u64,
        name: Vec<u8>,
    },
    /// A registration as a metaserver journals it ([`Namespace::with_shape`]): with the block
    /// size, replicas and quorums of the member that took it, which the first registration
    /// records on every member. So a group has one shape, whatever flags each member was started
    /// with (a member that was given others takes the group's, and is refused a restart with its
    /// own). Not taken from clients.
    RegisterAs {
        servers: Vec<String>,
        block_size: u32,
        replicas: u8,
        write_quorum: u8,
        read_quorum: u8,
    },
    /// Requests a group's leader took together, applied one after the other, each as an entry
    /// of its own would be: one log entry, so one sync on each member, for all of them. Not
    /// taken from clients.
    Batch {
        #[serde(deserialize_with = "no_batch_inside")]
        requests: Vec<Request>,
    },
}

/// A change as a replicated log records it: who asked (a client id and that client's sequence
/// number, so that a request resent after a failover is applied once), when the leader accepted
/// it (every member applies it with that time), and the change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub client: u64,
    pub seq: u64,
    pub now: i64,
    pub change: Change,
}

impl Change {
    /// Whether it adds a name (refused when the metaserver's disk is full; removals are not).
    pub fn creates(&self) -> bool {
        match self {
            Change::Mknod { .. } | Change::Symlink { .. } | Change::Link { .. } | Change::SetXattr { .. } => true,
            Change::By { change, .. } => change.creates(),
            _ => false,
        }
    }

    /// The change itself, out of the session's wrapping ([`Change::By`]) if it has one.
    pub fn inner(&self) -> &Change {
        match self {
            Change::By { change, .. } => change.inner(),
            c => c,
        }
    }

    /// The directories whose names it adds or removes (a client is sent their attributes with
    /// the answer: the kernel asks for them right after).
    pub fn dirs(&self) -> Vec<u64> {
        match self.inner() {
            Change::Mknod { parent, .. }
            | Change::Symlink { parent, .. }
            | Change::Unlink { parent, .. }
            | Change::Rmdir { parent, .. } => vec![*parent],
            Change::Link { new_parent, .. } => vec![*new_parent],
            Change::Rename { parent, new_parent, .. } if parent == new_parent => vec![*parent],
            Change::Rename { parent, new_parent, .. } => vec![*parent, *new_parent],
            _ => Vec::new(),
        }
    }

    /// Its kind, as the metrics count it (a session's change by what it does).
    pub fn name(&self) -> &'static str {
        match self {
            Change::Register { .. } | Change::RegisterAs { .. } => "register",
            Change::Setattr { .. } => "setattr",
            Change::Mknod { .. } => "mknod",
            Change::Symlink { .. } => "symlink",
            Change::Link { .. } => "link",
            Change::Unlink { .. } => "unlink",
            Change::Rmdir { .. } => "rmdir",
            Change::Rename { .. } => "rename",
            Change::Extend { .. } => "extend",
            Change::Purge { .. } => "purge",
            Change::By { change, .. } => change.name(),
            Change::Hello { .. } => "hello",
            Change::Heartbeat { .. } => "heartbeat",
            Change::Bye { .. } => "bye",
            Change::Expire { .. } => "expire",
            Change::Lock { .. } => "lock",
            Change::CancelWait { .. } => "cancel_wait",
            Change::ForgetReplies { .. } => "forget_replies",
            Change::SetXattr { .. } => "setxattr",
            Change::RemoveXattr { .. } => "removexattr",
            Change::Batch { .. } => "batch",
        }
    }
}

/// What a change answered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The inode made or changed.
    Attr(Attr),
    /// The inode orphaned by a removal or a replacing rename (0 if none).
    Orphan(u64),
    Done,
    Layout(Layout),
    /// A dataserver list that differs from the recorded one, with what differs.
    Refused(String),
    Beat(Beat),
    Lock(LockState),
    /// The session named is not live (it expired): the client says hello again.
    Gone,
    /// A rename that replaced an empty directory: its last attributes, with no links.
    ReplacedDir(Attr),
}

/// A registration's answer: the layout, or why the ring was refused (an answer too, recorded).
fn registered(r: Result<Layout, RegisterError>) -> FsResult<Outcome> {
    match r {
        Ok(l) => Ok(Outcome::Layout(l)),
        Err(RegisterError::Refused(why)) => Ok(Outcome::Refused(why)),
        Err(RegisterError::Fs(e)) => Err(e),
    }
}

impl Namespace {
    /// Applies `change` at time `now` inside the write transaction `w`. An error leaves `w` as it
    /// was only if the caller runs this in a transaction of its own (see [`Namespace::apply`]).
    pub(crate) fn apply_in(&self, w: &mut Writer, change: &Change, now: i64) -> FsResult<Outcome> {
        self.apply_by_in(w, 0, change, now)
    }

    /// [`Namespace::apply_in`] for client session `session` (0: none).
    fn apply_by_in(&self, w: &mut Writer, session: u64, change: &Change, now: i64) -> FsResult<Outcome> {
        Ok(match change {
            Change::Register { servers } => registered(self.register_in(w, servers, None, now))?,
            Change::RegisterAs { servers, block_size, replicas, write_quorum, read_quorum } => {
                let quorum = crate::shared::layout::Quorum { write: *write_quorum, read: *read_quorum };
                registered(self.register_in(w, servers, Some((*block_size, *replicas, quorum)), now))?
            }
            Change::Setattr { ino, set } => Outcome::Attr(self.setattr_in(w, *ino, set, now)?),
            Change::Mknod { parent, name, node } => Outcome::Attr(self.mknod_in(w, *parent, name, node, now)?),
            Change::Symlink { parent, name, target, uid, gid } => {
                Outcome::Attr(self.symlink_in(w, *parent, name, target, (*uid, *gid), now)?)
            }
            Change::Link { ino, new_parent, new_name } => {
                Outcome::Attr(self.link_in(w, *ino, *new_parent, new_name, now)?)
            }
            Change::Unlink { parent, name } => {
                let orphan = self.unlink_in(w, *parent, name, now)?;
                Outcome::Orphan(self.orphaned_in(w, orphan, session, now)?)
            }
            Change::Rmdir { parent, name } => Outcome::Attr(self.rmdir_in(w, *parent, name, now)?),
            Change::SetXattr { ino, name, value, flags } => {
                self.set_xattr_in(w, *ino, name, value, *flags, now)?;
                Outcome::Done
            }
            Change::RemoveXattr { ino, name } => {
                self.remove_xattr_in(w, *ino, name, now)?;
                Outcome::Done
            }
            Change::Rename { parent, name, new_parent, new_name, flags } => {
                match self.rename_in(w, (*parent, name), (*new_parent, new_name), *flags, now)? {
                    (_, Some(dir)) => Outcome::ReplacedDir(dir),
                    (orphan, None) => Outcome::Orphan(self.orphaned_in(w, orphan, session, now)?),
                }
            }
            Change::Extend { ino, size } => Outcome::Attr(self.extend_in(w, *ino, *size, now)?),
            Change::Purge { inos } => {
                self.purge_in(w, inos)?;
                Outcome::Done
            }
            Change::By { session, change } => match **change {
                Change::By { .. } => return Err(FsError::Invalid("a change by a session inside another".into())),
                ref c => self.apply_by_in(w, *session, c, now)?,
            },
            Change::Hello { session, info } => self.hello_in(w, *session, info, now)?,
            Change::Heartbeat { session, report_after, opens } => {
                self.heartbeat_in(w, *session, *report_after, opens, now)?
            }
            Change::Bye { session } => self.bye_in(w, *session)?,
            Change::Expire { session, lease_ns } => self.expire_in(w, *session, *lease_ns, now)?,
            Change::Lock { ino, want, typ, wait } => self.lock_in(w, *ino, want.clone(), *typ, *wait)?,
            Change::CancelWait { ino, want } => self.cancel_in(w, *ino, want)?,
            Change::ForgetReplies { before } => {
                let n = self.forget_replies_in(w, *before)?;
                tracing::debug!(forgotten = n, "clients' last answers forgotten");
                Outcome::Done
            }
            // Each of its requests has its own client, number and time, and its own answer.
            Change::Batch { .. } => return Err(FsError::Invalid("a batch is applied request by request".into())),
        })
    }

    /// Applies `change` now, in a durable transaction of its own.
    pub fn apply(&self, change: &Change) -> FsResult<Outcome> {
        let now = crate::shared::now_ns();
        self.write(|w| self.apply_in(w, change, now))
    }
}

impl Outcome {
    /// The attributes of an `Attr` outcome (anything else is a protocol error).
    pub fn attr(self) -> FsResult<Attr> {
        match self {
            Outcome::Attr(a) => Ok(a),
            o => Err(FsError::Io(format!("expected attributes, got {o:?}"))),
        }
    }

    /// The inode of an `Orphan` outcome.
    pub fn orphan(self) -> FsResult<u64> {
        match self {
            Outcome::Orphan(i) => Ok(i),
            Outcome::ReplacedDir(_) => Ok(0),
            o => Err(FsError::Io(format!("expected an orphan, got {o:?}"))),
        }
    }
}

/// The most bytes a client's encoded change or query may have. The largest a client sends is a
/// purge of `MAX_CUTS` inodes (under 640 KiB); decoded, a message takes up to eight times its size.
pub const MAX_ENCODED: usize = 2 << 20;

/// Decodes a change a client sent: at most [`MAX_ENCODED`] bytes, within [`within_limits`], and
/// wrapped by one `By` at most (see [`one_wrapping`]).
pub fn decode_client_change(bytes: &[u8]) -> Result<Change, String> {
    if bytes.len() > MAX_ENCODED {
        return Err(format!("a change of {} bytes (at most {MAX_ENCODED})", bytes.len()));
    }
    let change = postcard::from_bytes(bytes).map_err(|e| format!("a change that does not decode: {e}"))?;
    within_limits(&change)?;
    Ok(change)
}

thread_local! {
    /// How many `By` changes the decoder on this thread is inside.
    static BY_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// How many batches the decoder on this thread is inside.
    static BATCH_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes the change a `By` wraps, refusing another `By` inside it. Derived decoders recurse
/// without a depth limit, so a message of a million nested `By`s (a few bytes each, however they
/// are spelled) would overflow the stack; a session wraps its change once, and every stored or
/// replicated change is so.
fn one_wrapping<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Change>, D::Error> {
    once_deep(&BY_DEPTH, "a session's change wrapped in another session's (one wrapping only)", d)
}

/// Decodes a batch's requests, refusing a batch inside them, for the same reason as
/// [`one_wrapping`]: a leader batches requests, never batches.
fn no_batch_inside<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Request>, D::Error> {
    once_deep(&BATCH_DEPTH, "a batch inside a batch", d)
}

/// Decodes a `T` unless the decoder on this thread is inside one already, as `depth` counts.
fn once_deep<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    depth: &'static std::thread::LocalKey<std::cell::Cell<u32>>,
    refused: &'static str,
    d: D,
) -> Result<T, D::Error> {
    struct Leave(&'static std::thread::LocalKey<std::cell::Cell<u32>>);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.with(|c| c.set(c.get() - 1));
        }
    }
    let inside = depth.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let _leave = Leave(depth);
    if inside > 1 {
        return Err(serde::de::Error::custom(refused));
    }
    T::deserialize(d)
}

/// What one change may carry beyond the size of its message: a purge as many inodes as the purge
/// call takes, a client's description short strings (every heartbeat reads them back).
fn within_limits(c: &Change) -> Result<(), String> {
    const MAX_INFO: usize = 4096;
    match c {
        Change::By { change, .. } => within_limits(change),
        Change::RegisterAs { .. } => Err("a registration with a shape comes from a metaserver, not a client".into()),
        Change::Batch { .. } => Err("a batch of requests comes from a group's leader, not a client".into()),
        // A client's would end another's session (and its locks) or forget the answers kept for
        // retries, so that a retried create or rename ran twice.
        Change::Expire { .. } | Change::ForgetReplies { .. } => {
            Err(format!("{} is the metaserver's change, not a client's", c.name()))
        }
        // As a ring is given on a command line: addresses, each server once, however spelt. The
        // first registration becomes the cluster's ring, and every later one is compared with it.
        // (Sizes first: comparing spellings takes the square of the list's length.)
        Change::Register { servers } => {
            match sizes_within_limits(c).map(|()| crate::shared::layout::parse_ring(servers)) {
                Err(why) => Err(why),
                Ok(Ok(ring)) if ring == *servers => Ok(()),
                Ok(Ok(ring)) => {
                    Err(format!("dataserver list [{}] is not as written [{}]", servers.join(" "), ring.join(" ")))
                }
                Ok(Err(e)) => Err(format!("dataserver list: {e}")),
            }
        }
        Change::Purge { inos } if inos.len() > crate::shared::MAX_CUTS => {
            Err(format!("a purge of {} inodes (at most {})", inos.len(), crate::shared::MAX_CUTS))
        }
        Change::Hello { info, .. } if info.host.len() > MAX_INFO || info.mount.len() > MAX_INFO => {
            Err(format!("a client description over {MAX_INFO} bytes"))
        }
        _ => sizes_within_limits(c),
    }
}

/// Whether the names, targets, values and lists a change carries are of sizes a file system
/// could mean: checked before a change is journaled or proposed, so that megabytes of name are
/// neither synced to the log nor replicated only to be refused when applied. The bounds are well
/// above the file system's own (a name of 256 bytes to 1 MiB is still applied, and answered
/// ENAMETOOLONG, as a local file system answers).
pub fn sizes_within_limits(c: &Change) -> Result<(), String> {
    const MAX_FIELD: usize = 1 << 20;
    const MAX_ADDR: usize = 1024;
    let over =
        |what: &str, len: usize, max: usize| (len > max).then(|| format!("{what} of {len} bytes (at most {max})"));
    let why = match c {
        Change::By { change, .. } => return sizes_within_limits(change),
        Change::Register { servers } if servers.len() > crate::shared::layout::MAX_SERVERS => {
            Some(format!("a list of {} dataservers (at most {})", servers.len(), crate::shared::layout::MAX_SERVERS))
        }
        Change::Register { servers } => servers.iter().find_map(|s| over("a dataserver address", s.len(), MAX_ADDR)),
        Change::Mknod { name, .. } | Change::Unlink { name, .. } | Change::Rmdir { name, .. } => {
            over("a name", name.len(), MAX_FIELD)
        }
        Change::Link { new_name, .. } => over("a name", new_name.len(), MAX_FIELD),
        Change::Symlink { name, target, .. } => {
            over("a name", name.len(), MAX_FIELD).or_else(|| over("a link target", target.len(), MAX_FIELD))
        }
        Change::Rename { name, new_name, .. } => {
            over("a name", name.len(), MAX_FIELD).or_else(|| over("a name", new_name.len(), MAX_FIELD))
        }
        Change::SetXattr { name, value, .. } => over("an attribute name", name.len(), MAX_FIELD)
            .or_else(|| over("an attribute value", value.len(), MAX_FIELD)),
        Change::RemoveXattr { name, .. } => over("an attribute name", name.len(), MAX_FIELD),
        _ => None,
    };
    why.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::super::enc;
    use super::*;
    use crate::shared::db::Read;
    use crate::shared::{Kind, ROOT};

    /// A change whose name, target or value is of megabytes is refused before it is journaled or
    /// proposed, not synced to the log to be refused when applied; one merely over the file
    /// system's limits is still applied (and answered ENAMETOOLONG there). Regression: a name of
    /// up to the 2 MiB message bound went into the log.
    #[test]
    fn a_change_carrying_megabytes_of_name_is_refused_before_the_log() {
        let big = vec![b'n'; (1 << 20) + 1];
        let mknod = |name: Vec<u8>| Change::Mknod {
            parent: ROOT,
            name,
            node: NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 },
        };
        let huge = [
            mknod(big.clone()),
            Change::Symlink { parent: ROOT, name: b"l".to_vec(), target: big.clone(), uid: 0, gid: 0 },
            Change::Rename { parent: ROOT, name: b"a".to_vec(), new_parent: ROOT, new_name: big.clone(), flags: 0 },
            Change::SetXattr { ino: ROOT, name: b"user.a".to_vec(), value: big.clone(), flags: 0 },
            Change::Register { servers: vec![String::new(); 65] },
        ];
        for c in huge {
            let wrapped = Change::By { session: 1, change: Box::new(c.clone()) };
            assert!(sizes_within_limits(&wrapped).is_err(), "{:?}", std::mem::discriminant(&c));
            let bytes = postcard::to_allocvec(&wrapped).expect("encode");
            assert!(decode_client_change(&bytes).is_err(), "{:?}", std::mem::discriminant(&c));
        }
        assert!(sizes_within_limits(&mknod(vec![b'n'; 300])).is_ok(), "applied, and answered ENAMETOOLONG");
    }

    #[test]
    fn a_client_change_decodes_once_wrapped_never_twice_nor_oversized() {
        let by = |session, change| Change::By { session, change: Box::new(change) };
        let purge = Change::Purge { inos: vec![5, 6] };
        for session in [0, 300, u64::MAX] {
            let once = postcard::to_allocvec(&by(session, purge.clone())).expect("encode");
            assert_eq!(decode_client_change(&once).expect("decodes"), by(session, purge.clone()));
            let twice = postcard::to_allocvec(&by(session, by(7, purge.clone()))).expect("encode");
            // (postcard drops the message of a decoder's own error.)
            assert!(decode_client_change(&twice).unwrap_err().contains("does not decode"));
        }
        // Deep nesting is refused at the second level (it overflowed the stack of a 2 MiB thread),
        // also with the variant's index spelled as an over-long varint, which postcard accepts.
        let short = postcard::to_allocvec(&by(1, purge.clone())).expect("encode")[..2].to_vec();
        let long = vec![short[0] | 0x80, 0x00, 0x01];
        for unit in [short, long] {
            let deep = unit.repeat(300_000);
            let t = std::thread::Builder::new().stack_size(2 << 20).spawn(move || decode_client_change(&deep));
            let why = t.expect("thread").join().expect("no overflow").unwrap_err();
            assert!(why.contains("does not decode"), "{why}");
        }
        // The metaserver's own changes.
        for own in [Change::Expire { session: 9, lease_ns: -1 }, Change::ForgetReplies { before: i64::MAX }] {
            for change in [own.clone(), by(1, own)] {
                let why = decode_client_change(&postcard::to_allocvec(&change).expect("encode")).unwrap_err();
                assert!(why.contains("the metaserver's change, not a client's"), "{why}");
            }
        }
        // A ring as a command line gives it, and no other.
        let ring = |servers: &[&str]| Change::Register { servers: servers.iter().map(|s| s.to_string()).collect() };
        let good = ring(&["127.0.0.1:9001", "127.0.0.1:9002", "host:9003"]);
        assert_eq!(decode_client_change(&postcard::to_allocvec(&good).expect("encode")), Ok(good));
        for (bad, says) in [
            (ring(&["a", "b", "c"]), "neither a port nor HOST:PORT"),
            (ring(&["localhost:9001", "127.0.0.1:9001", "h:2"]), "listed twice"),
            (ring(&["9001", "9002"]), "is not as written"),
            (ring(&[]), "dataserver list"),
        ] {
            let why = decode_client_change(&postcard::to_allocvec(&bad).expect("encode")).unwrap_err();
            assert!(why.contains(says), "{bad:?}: {why}");
        }
        let big = Change::Purge { inos: vec![u64::MAX; 300_000] };
        assert!(decode_client_change(&postcard::to_allocvec(&big).expect("encode")).unwrap_err().contains("at most"));
        // Small in bytes, but more inodes than a purge call may name.
        let many = by(1, Change::Purge { inos: vec![1; crate::shared::MAX_CUTS + 1] });
        let why = decode_client_change(&postcard::to_allocvec(&many).expect("encode")).unwrap_err();
        assert!(why.contains("a purge of 65537 inodes"), "{why}");
    }

    #[test]
    fn a_batch_decodes_from_a_log_never_from_a_client_nor_inside_another() {
        let req = |change| Request { client: 1, seq: 2, now: 3, change };
        let purge = Change::Purge { inos: vec![5] };
        let by = Change::By { session: 4, change: Box::new(purge.clone()) };
        let batch = Change::Batch { requests: vec![req(purge.clone()), req(by)] };
        let bytes = postcard::to_allocvec(&batch).expect("encode");
        assert_eq!(postcard::from_bytes::<Change>(&bytes).expect("a log's batch decodes"), batch);
        assert!(decode_client_change(&bytes).unwrap_err().contains("not a client"));
        let inside = Change::Batch { requests: vec![req(batch)] };
        assert!(postcard::from_bytes::<Change>(&postcard::to_allocvec(&inside).expect("encode")).is_err());
        // Deep nesting is refused at the second level, without overflowing the stack.
        let unit = postcard::to_allocvec(&inside).expect("encode")[..5].to_vec();
        let deep = unit.repeat(300_000);
        let t = std::thread::Builder::new().stack_size(2 << 20).spawn(move || postcard::from_bytes::<Change>(&deep));
        assert!(t.expect("thread").join().expect("no overflow").is_err());
    }

    fn changes() -> Vec<Change> {
        let node = |kind| NewNode { kind, perm: 0o755, uid: 1, gid: 2, rdev: 0 };
        vec![
            Change::Mknod { parent: ROOT, name: b"d".to_vec(), node: node(Kind::Dir) },
            Change::Mknod { parent: ROOT, name: b"f".to_vec(), node: node(Kind::File) },
            Change::Extend { ino: 3, size: 100 },
            Change::Symlink { parent: 2, name: b"l".to_vec(), target: b"../f".to_vec(), uid: 1, gid: 2 },
            Change::Link { ino: 3, new_parent: 2, new_name: b"g".to_vec() },
            Change::Rename { parent: ROOT, name: b"f".to_vec(), new_parent: 2, new_name: b"g".to_vec(), flags: 0 },
            Change::Unlink { parent: 2, name: b"g".to_vec() },
            Change::Unlink { parent: ROOT, name: b"f".to_vec() },
            Change::Mknod { parent: ROOT, name: b"d".to_vec(), node: node(Kind::File) },
        ]
    }

    /// A retry is answered from the record while it is kept; once clients' old answers are
    /// forgotten, the same request is a new one. Records stored before they had a time count as old.
    #[test]
    fn old_answers_are_forgotten_and_recent_ones_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = Namespace::open(dir.path(), Some(4096), Some(3)).expect("open");
        let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
        let mk = |name: &[u8]| Change::Mknod { parent: ROOT, name: name.to_vec(), node: node.clone() };
        let once = |client, at, c: &Change| ns.db.write(|w| ns.apply_once_in(w, (client, 1), at, c)).expect("store");
        let (a, b) = (mk(b"a"), mk(b"b"));
        assert!(once(1, 10, &a).is_ok());
        let first_b = once(2, 100, &b);
        assert!(first_b.is_ok());
        // A record as stores made before kept it: without the time.
        let old = enc(&(1u64, Ok::<Outcome, FsError>(Outcome::Done))).expect("enc");
        ns.db.write(|w| w.put(ns.sessions, &3u64.to_be_bytes(), &old)).expect("put");
        assert_eq!(ns.db.write(|w| ns.apply_in(w, &Change::ForgetReplies { before: 50 }, 200)), Ok(Outcome::Done));
        assert_eq!(once(2, 300, &b), first_b, "a retry of a kept answer gets it again, not applied again");
        assert_eq!(once(1, 300, &a), Err(FsError::Exists), "forgotten: applied again");
        assert!(ns.db.read(|r| r.get(ns.sessions, &3u64.to_be_bytes()).map(|v| v.is_none())).expect("read"));
    }

    /// Every replica applies the log's changes with the log's times: the same changes must make
    /// the same namespace and the same answers, whenever and wherever they are applied.
    /// Members started with different flags: the first registration records the shape of the
    /// member that took it on every member, so they all answer one layout (a member with its own
    /// block size told new mounts to read files at other offsets).
    #[test]
    fn a_group_takes_the_shape_of_the_member_that_took_its_first_registration() {
        let (d1, d2) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        let leader = Namespace::open(d1.path(), Some(8), Some(3)).expect("open");
        let other = Namespace::open(d2.path(), Some(4096), Some(2)).expect("open");
        let ring: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        let change = leader.with_shape(Change::Register { servers: ring.clone() }).expect("shaped");
        assert!(matches!(change, Change::RegisterAs { block_size: 8, replicas: 3, .. }), "{change:?}");
        let answers: Vec<_> = [&leader, &other].iter().map(|n| n.db.write(|w| n.apply_in(w, &change, 1))).collect();
        assert_eq!(answers[0], answers[1]);
        assert!(matches!(&answers[0], Ok(Outcome::Layout(l)) if l.block_size == 8 && l.replicas == 3));
        assert_eq!(leader.layout().expect("layout"), other.layout().expect("layout"));
        // A later registration, shaped by a member that took the group's shape, answers the same.
        let again = other.with_shape(Change::Register { servers: ring }).expect("shaped");
        assert!(matches!(again, Change::RegisterAs { block_size: 8, replicas: 3, .. }), "{again:?}");
        drop(other);
        // Restarted with the flags it was first given, the member is refused; without them, it
        // has the group's shape.
        assert!(Namespace::open(d2.path(), Some(4096), None).is_err());
        let other = Namespace::open(d2.path(), None, None).expect("open");
        assert_eq!(other.layout().expect("layout").map(|l| l.block_size), Some(8));
        // So does a member started with others that catches up from a snapshot.
        let d3 = tempfile::tempdir().expect("temp dir");
        let third = Namespace::open(d3.path(), Some(16), Some(1)).expect("open");
        leader.checkpoint().expect("checkpoint");
        let dump = leader.dump().expect("dump");
        third.db.write(|w| third.restore_in(w, &dump.bytes)).expect("restore");
        assert_eq!(third.layout().expect("layout"), leader.layout().expect("layout"));
        // A client may not send the shape itself.
        let bytes = enc(&change).expect("encode");
        assert!(decode_client_change(&bytes).is_err());
    }

    /// Members of a group make their stores at different moments: their roots are the same once
    /// the first registration gave them their times (each member's clock gave each its own).
    #[test]
    fn members_made_apart_have_one_root_after_the_first_registration() {
        let make = || {
            let d = tempfile::tempdir().expect("temp dir");
            let n = Namespace::open(d.path(), Some(8), Some(3)).expect("open");
            std::thread::sleep(std::time::Duration::from_millis(2));
            (d, n)
        };
        let ((_d1, a), (_d2, b)) = (make(), make());
        let ring: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
        let change = a.with_shape(Change::Register { servers: ring }).expect("shaped");
        for n in [&a, &b] {
            n.db.write(|w| n.apply_in(w, &change, 5_000)).expect("register");
        }
        let root = a.getattr(ROOT).expect("root");
        assert_eq!((root.atime, root.mtime, root.ctime), (5_000, 5_000, 5_000));
        assert_eq!(root, b.getattr(ROOT).expect("root"));
    }

    #[test]
    fn the_same_changes_at_the_same_times_make_the_same_namespace() {
        let run = || {
            let dir = tempfile::tempdir().expect("temp dir");
            let ns = Namespace::open(dir.path(), Some(4096), Some(3)).expect("open");
            let answers: Vec<_> = changes()
                .iter()
                .enumerate()
                .map(|(i, c)| ns.db.write(|w| ns.apply_in(w, c, 1_000 + i as i64)))
                .collect();
            let tree = (ns.readdir(ROOT), ns.readdir(2), ns.orphans());
            (answers, tree)
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        // Renaming a name onto another link of the same file changes nothing (POSIX).
        assert_eq!(a.0[6], Ok(Outcome::Orphan(0)), "one link of the file is left");
        assert_eq!(a.0[7], Ok(Outcome::Orphan(3)), "the last link of the file went");
        assert_eq!(a.0[8], Err(FsError::Exists));
    }
}
