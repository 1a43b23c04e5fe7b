//! The client's two ports: what it needs from the metaserver ([`MetaPort`]) and from the
//! dataservers ([`DataPort`]). The file operations and the engine are written against these traits,
//! so they are unit-tested with in-memory fakes; `wire` implements them over the network. Futures
//! need not be `Send`: a client's ports live on one thread.

pub use crate::dataserver::blockstore::Cut;
pub use crate::dataserver::rebuild::ListPage;
use crate::metaserver::namespace::sessions::{Query, QueryReply};
use crate::metaserver::namespace::{Change, Outcome};
use crate::shared::block::{Block, BlockKey, Part};
use crate::shared::layout::Layout;
pub use crate::shared::RegisterError;
use crate::shared::{Attr, FsResult, NewNode, PortError, SetAttr};

/// The metaserver, as the client sees it.
///
/// Durable: every call that changes something has committed it before it answers.
/// Idempotent (safe to retry after a lost answer): `register`, `layout`, the reads (`lookup`,
/// `getattr`, `readlink`, `readdir`, `orphans`, `inode_count`), `setattr` with explicit values,
/// `extend` (the size only grows to a maximum) and `purge`. Not idempotent: `mknod`, `symlink`,
/// `link`, `unlink`, `rmdir` and `rename` (a retry may find its own effect: EEXIST or ENOENT).
#[allow(async_fn_in_trait)]
pub trait MetaPort {
    /// Records `ring` as the dataserver list the first time; afterwards checks it against the
    /// recorded one. Returns the layout (ring, block size, replicas).
    async fn register(&self, ring: &[String]) -> Result<Layout, RegisterError>;
    /// The recorded layout (an empty ring if none was registered yet).
    async fn layout(&self) -> FsResult<Layout>;
    async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr>;
    async fn getattr(&self, ino: u64) -> FsResult<Attr>;
    /// Changes attributes; a size here only records it (the blocks are the caller's).
    async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr>;
    async fn mknod(&self, parent: u64, name: &[u8], node: &NewNode) -> FsResult<Attr>;
    async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr>;
    async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>>;
    async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr>;
    /// Removes a name; returns the inode it orphaned (0 if none).
    async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64>;
    /// Removes an empty directory; returns its last attributes, with no links (`None` from a
    /// metaserver that does not send them).
    async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Option<Attr>>;
    /// Renames; returns the inode orphaned by a replaced file (0 if none).
    /// And a replaced directory's last attributes, with no links.
    async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<crate::shared::Renamed>;
    /// A directory's entries, with its parent.
    async fn readdir(&self, ino: u64) -> FsResult<crate::shared::DirListing>;
    /// Grows the size to at least `size` and sets mtime and ctime (a completed write).
    async fn extend(&self, ino: u64, size: u64) -> FsResult<Attr>;
    /// Forgets orphans whose blocks are gone (at most [`crate::shared::MAX_CUTS`]).
    async fn purge(&self, inos: &[u64]) -> FsResult<()>;
    async fn orphans(&self) -> FsResult<Vec<u64>>;
    async fn inode_count(&self) -> FsResult<u64>;
    /// Applies a change of the client sessions' state (hello, heartbeat, lock, ...).
    async fn apply(&self, change: Change) -> FsResult<Outcome>;
    /// Reads sessions and locks (see [`Query`]).
    async fn query(&self, q: Query) -> FsResult<QueryReply>;
    /// [`MetaPort::apply`], with the attributes of the file a lock was granted on, as the metaserver
    /// had them when it answered, if it sends them.
    async fn apply_with_attr(&self, change: Change) -> FsResult<(Outcome, Option<Attr>)> {
        Ok((self.apply(change).await?, None))
    }
    /// [`MetaPort::query`], with the attributes of the file a lock request was found granted on,
    /// as the metaserver had them when it answered, if it sends them.
    async fn query_with_attr(&self, q: Query) -> FsResult<(QueryReply, Option<Attr>)> {
        Ok((self.query(q).await?, None))
    }
}

/// What a dataserver answered to a read of some blocks.
#[derive(Debug, Clone, Default)]
pub struct GetReply {
    /// One entry per requested key, in order; `None` if the server does not hold it.
    pub blocks: Vec<Option<Block>>,
    /// The server lost its disk and is still rebuilding: its "not found" is not authoritative.
    pub rebuilding: bool,
    /// Per key not found: the version of the cut that removed it there (0: none recorded).
    pub cut_versions: Vec<u64>,
}

/// A dataserver's answer to [`DataPort::get_range`].
pub struct RangeReply {
    pub part: Option<Part>,
    /// As in [`GetReply`].
    pub rebuilding: bool,
}

/// The engine's view of the dataservers, addressed by ring index.
#[allow(async_fn_in_trait)]
pub trait DataPort {
    /// A name for logs, e.g. the server's address.
    fn name(&self, server: usize) -> String;
    /// Stores the blocks durably on `server` before returning (see `BlockStore::put` for `repair`
    /// and `hint`).
    async fn put(&self, server: usize, blocks: &[&Block], repair: bool, hint: bool) -> Result<(), PortError>;
    /// Reads blocks as the server holds them, unverified.
    async fn get(&self, server: usize, keys: &[BlockKey]) -> Result<GetReply, PortError>;
    /// Reads bytes [`from`, `to`) of one block as the server holds it, unverified: the pages that
    /// hold them with their MD5s, or the whole block (see `Part`). `None`: not held there.
    async fn get_range(&self, server: usize, key: BlockKey, from: u32, to: u32) -> Result<RangeReply, PortError>;
    /// Applies cuts on `server` (see `blockstore::Cut`), in one durable transaction. Idempotent.
    /// With `hint`, the server notes them for every other server.
    async fn truncate(&self, server: usize, cuts: &[Cut], hint: bool) -> Result<u64, PortError>;
    /// Up to `limit` of the blocks `server` holds, after `after` in key order, with their versions.
    async fn list(&self, server: usize, after: BlockKey, limit: u32) -> Result<ListPage, PortError>;
    /// Deletes on `server` each block held there with exactly the version given (see
    /// `BlockStore::drop_if`). Returns how many went.
    async fn drop_blocks(&self, server: usize, keys: &[(BlockKey, u64)]) -> Result<u64, PortError>;
}

/// What a dataserver reports of itself (`dfsctl status`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ServerStatus {
    pub index: u32,
    pub blocks: u64,
    pub bytes: u64,
    pub rebuilding: bool,
    pub rebuild_copied: u64,
    pub rebuild_listed: u64,
    pub rebuild_peers_left: u32,
    /// Peers the last rebuild finished without.
    pub rebuild_skipped: Vec<u32>,
    /// Blocks the last rebuild found intact on no holder, and the first of them.
    pub rebuild_nowhere: u64,
    pub rebuild_nowhere_keys: Vec<crate::shared::block::BlockKey>,
    pub disk_total: u64,
    pub disk_free: u64,
    pub disk_id: u64,
    /// The ring the server was started with.
    pub servers: Vec<String>,
    /// Blocks and cuts noted for peers that may lack them.
    pub hints: u64,
    /// Restarted, and peers still hold hints for it.
    pub catching_up: bool,
    pub scrub: crate::dataserver::scrub::ScrubStatus,
}
