//! The types every role shares: inodes and their attributes, the POSIX errors, and the limits of
//! names, sizes and messages that both sides of the wire enforce.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::db::DbError;

pub const ROOT: u64 = 1;
/// Longest file name (ENAMETOOLONG beyond).
pub const NAME_MAX: usize = 255;
/// Longest symlink target, as Linux's PATH_MAX.
pub const TARGET_MAX: usize = 4096;
/// Largest file size: offsets are signed 64-bit in POSIX.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Most (file, first block) cuts one truncate or purge message may carry.
pub const MAX_CUTS: usize = 64 * 1024;

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    Perm,
    #[error("file too large")]
    TooBig,
    #[error("I/O error: {0}")]
    Io(String),
    /// The file was deleted, and its blocks reclaimed, while this client still had it open (another
    /// client removed its last name). Only a client says this; it is never sent.
    #[error("stale file handle: the file was deleted elsewhere")]
    Stale,
    /// A member of a metaserver group that cannot answer (not the leader, or no majority): the
    /// client asks another member. Only between a client and a group; never reaches a caller.
    #[error("the metaserver cannot answer here: {0}")]
    NotHere(String),
    /// The caller of a request that was waiting (for a down server) was signalled or went away.
    /// Only a client says this; it is never sent.
    #[error("interrupted")]
    Interrupted,
    /// A lock another owner holds (or waits for first) and the caller would not wait.
    #[error("the lock is held elsewhere")]
    WouldBlock,
    /// Waiting for the lock would close a cycle of owners waiting for each other.
    #[error("waiting for the lock would deadlock")]
    Deadlock,
    /// A disk (a dataserver's or the metaserver's) has no room for what was asked.
    #[error("no space left on device: {0}")]
    NoSpace(String),
    /// No extended attribute by that name.
    #[error("no such attribute")]
    NoData,
    /// A name or value out of the range allowed (an attribute name over 255 bytes).
    #[error("out of range: {0}")]
    Range(String),
    /// Not something this filesystem does (an attribute namespace it does not keep).
    #[error("not supported: {0}")]
    NotSupported(String),
}

impl From<DbError> for FsError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NoSpace => FsError::NoSpace(e.to_string()),
            e => FsError::Io(e.to_string()),
        }
    }
}

impl FsError {
    /// The one mapping of namespace errors to errno.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Perm => libc::EPERM,
            FsError::Stale => libc::ESTALE,
            FsError::TooBig => libc::EFBIG,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::Deadlock => libc::EDEADLK,
            FsError::Io(_) | FsError::NotHere(_) => libc::EIO,
            FsError::Interrupted => libc::EINTR,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::NoData => libc::ENODATA,
            FsError::Range(_) => libc::ERANGE,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
        }
    }

    /// The name of its errno (`ENOENT`), as the metrics label errors.
    pub fn errno_name(&self) -> &'static str {
        match self {
            FsError::NotFound => "ENOENT",
            FsError::Exists => "EEXIST",
            FsError::NotEmpty => "ENOTEMPTY",
            FsError::NotDir => "ENOTDIR",
            FsError::IsDir => "EISDIR",
            FsError::Invalid(_) => "EINVAL",
            FsError::NameTooLong => "ENAMETOOLONG",
            FsError::Perm => "EPERM",
            FsError::Stale => "ESTALE",
            FsError::TooBig => "EFBIG",
            FsError::WouldBlock => "EAGAIN",
            FsError::Deadlock => "EDEADLK",
            FsError::Io(_) | FsError::NotHere(_) => "EIO",
            FsError::Interrupted => "EINTR",
            FsError::NoSpace(_) => "ENOSPC",
            FsError::NoData => "ENODATA",
            FsError::Range(_) => "ERANGE",
            FsError::NotSupported(_) => "EOPNOTSUPP",
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// A directory's parent (for its ".."; the root's is the root) and its entries with their attributes.
pub type DirListing = (u64, Vec<(Vec<u8>, Attr)>);

/// What a rename replaced: the inode a replaced file left orphaned (0 if none), and a replaced
/// directory's last attributes, with no links (a process may still hold it).
pub type Renamed = (u64, Option<Attr>);

/// An inode as stored, with its number. Times are nanoseconds since the epoch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub rdev: u32,
    /// The parent of a directory (for the subtree check of rename); 0 for other kinds.
    pub parent: u64,
    /// The target of a symlink.
    pub target: Vec<u8>,
    /// Counts the changes to this inode: 1 when made, one more for each change to its attributes,
    /// its links, its entries (a directory) or its data (each completed write).
    pub version: u64,
    /// Whether the inode has extended attributes, where an answer says (lookups, getattrs and
    /// listings do): a mount answers a file with none from there. Not stored.
    #[serde(skip)]
    pub xattrs: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(i64),
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// What a new node is: its kind, permissions, owner and (for devices) rdev.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Checks a single path component.
pub fn validate_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid(format!("'{}' is not a valid file name", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// How a call to another server failed, chosen by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PortError {
    /// The server is down or the connection broke: back off and retry.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server rejected the request: retrying the same request cannot succeed.
    #[error("refused: {0}")]
    Refused(String),
    /// The server has no room for the blocks: retrying cannot succeed until space is freed.
    #[error("{0}")]
    NoSpace(String),
}

/// Opens the message of a dataserver's refusal for want of space, so that the client can tell it
/// from other refusals (a capnp error carries only text).
pub const NO_SPACE_TAG: &str = "no space left:";

/// A worker thread of [`blocking`] panicked or was cancelled.
#[derive(Debug, Clone, thiserror::Error)]
#[error("worker thread failed: {0}")]
pub struct WorkerLost(String);

/// Runs blocking work (an LMDB transaction) on tokio's blocking pool, so that a durable commit
/// does not hold up the calling thread's other tasks.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, WorkerLost> {
    tokio::task::spawn_blocking(f).await.map_err(|e| WorkerLost(e.to_string()))
}

/// Why a metaserver would not take a client's dataserver list.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    /// The metaserver records another list (or order): says what differs.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl From<DbError> for RegisterError {
    fn from(e: DbError) -> Self {
        RegisterError::Fs(e.into())
    }
}
