# The wire protocol of DFS: client <-> metaserver, client <-> dataserver, dataserver <-> dataserver.
#
# Regenerate the committed Rust code (src/wire/dfs_capnp.rs) after editing this file with:
#   DFS_REGENERATE_SCHEMA=1 cargo test --test schema_fresh
@0xd2a1f4c6b8e39a71;

# The cluster layout. Dataserver addresses are "host:port", in ring order.
struct Layout {
  servers @0 :List(Text);
  blockSize @1 :UInt32;   # 0 = not known to the sender (a dataserver rebuilding from its peers)
  replicas @2 :UInt8;     # 0 = not known to the sender
  writeQuorum @3 :UInt8;  # replicas a write waits for; 0 = all (as before quorums existed)
  readQuorum @4 :UInt8;   # replicas a read compares; 0 = one
}

# Namespace errors. `ok` means success; the others map one-to-one to POSIX errno values.
enum Errno {
  ok @0;
  noEnt @1;
  exist @2;
  notEmpty @3;
  notDir @4;
  isDir @5;
  inval @6;
  nameTooLong @7;
  perm @8;
  noData @9;
  fbig @10;
  io @11;
  # A member of a metaserver group that cannot answer (not the leader, or no majority): ask
  # another member.
  notHere @12;
  # No room on a disk for what was asked (a dataserver's or the metaserver's).
  noSpace @13;
}

enum Kind {
  file @0;
  dir @1;
  symlink @2;
  fifo @3;
  socket @4;
  charDev @5;
  blockDev @6;
}

struct Attr {
  ino @0 :UInt64;
  kind @1 :Kind;
  perm @2 :UInt16;
  nlink @3 :UInt32;
  uid @4 :UInt32;
  gid @5 :UInt32;
  size @6 :UInt64;
  atimeNs @7 :Int64;
  mtimeNs @8 :Int64;
  ctimeNs @9 :Int64;
  rdev @10 :UInt32;
  # Counts the changes to the inode (metadata changes and completed writes).
  version @11 :UInt64;
  # The directory holding a directory; 0 for other kinds (and from servers that do not say).
  parent @12 :UInt64;
  # Whether the inode has extended attributes: 1 none, 2 some; 0 not said (the answers to changes,
  # and servers that do not say).
  xattrs @13 :UInt8;
}

enum TimeSet {
  keep @0;
  now @1;
  at @2;
}

# A setattr request: each `setX` flag says whether field X is to be changed.
struct SetAttr {
  setPerm @0 :Bool;
  perm @1 :UInt16;
  setUid @2 :Bool;
  uid @3 :UInt32;
  setGid @4 :Bool;
  gid @5 :UInt32;
  setSize @6 :Bool;
  size @7 :UInt64;
  atime @8 :TimeSet;
  atimeNs @9 :Int64;
  mtime @10 :TimeSet;
  mtimeNs @11 :Int64;
}

struct DirEntry {
  name @0 :Data;
  attr @1 :Attr;
}

# Names are raw bytes (Linux file names need not be UTF-8).
interface Meta {
  # Records `layout` if the store has none yet; refuses (err non-empty, saying what differs) if it differs.
  register @0 (layout :Layout) -> (layout :Layout, err :Text);
  layout @1 () -> (layout :Layout);
  lookup @2 (parent :UInt64, name :Data) -> (err :Errno, attr :Attr);
  getattr @3 (ino :UInt64) -> (err :Errno, attr :Attr);
  setattr @4 (ino :UInt64, set :SetAttr) -> (err :Errno, attr :Attr);
  # Files, directories, FIFOs, sockets and device nodes.
  mknod @5 (parent :UInt64, name :Data, kind :Kind, perm :UInt16, uid :UInt32, gid :UInt32, rdev :UInt32)
      -> (err :Errno, attr :Attr);
  symlink @6 (parent :UInt64, name :Data, target :Data, uid :UInt32, gid :UInt32) -> (err :Errno, attr :Attr);
  readlink @7 (ino :UInt64) -> (err :Errno, target :Data);
  link @8 (ino :UInt64, newParent :UInt64, newName :Data) -> (err :Errno, attr :Attr);
  # `orphan` is the inode whose last link went (0 if none): its blocks are to be deleted, then `purge` called.
  unlink @9 (parent :UInt64, name :Data) -> (err :Errno, orphan :UInt64);
  rmdir @10 (parent :UInt64, name :Data) -> (err :Errno);
  # flags: 1 = RENAME_NOREPLACE, 2 = RENAME_EXCHANGE (Linux values).
  rename @11 (parent :UInt64, name :Data, newParent :UInt64, newName :Data, flags :UInt32)
      -> (err :Errno, orphan :UInt64);
  # `parent`: the directory's own parent (the root's is the root), for its ".." entry. A page of
  # the entries in name order: those after the name `after` (empty: from the first), at most
  # `limit` of them (0: every one, which a directory of some 190,000 long names no longer fits in
  # one message); `more` says that entries follow the last one given.
  readdir @12 (ino :UInt64, after :Data, limit :UInt32)
      -> (err :Errno, entries :List(DirEntry), parent :UInt64, more :Bool);
  # After a write that ended at `size`: size = max(size, given), mtime and ctime = now.
  extend @13 (ino :UInt64, size :UInt64) -> (err :Errno, attr :Attr);
  # Forgets orphans whose blocks are gone, in one durable transaction; an inode that still has
  # links is left alone. At most 65536 per call.
  purge @14 (inos :List(UInt64)) -> (err :Errno);
  orphans @15 () -> (inos :List(UInt64));
  stats @16 () -> (inodes :UInt64);
  # Any change to the namespace, applied once per (client, seq): a request resent with the same
  # numbers (after a lost answer or a failover) is answered as the first time. `change` is a
  # postcard-encoded `Change`; `reply` a postcard-encoded `ChangeReply` (see wire/meta_service.rs).
  # `dirs`: after a change that added or removed names, the attributes of the directories that
  # hold them, as the server has them once it applied the change (the kernel asks for them next).
  # `attr`: after a lock granted, the locked file's attributes as the server has them once it
  # granted it (the mount revalidates the file under the lock from them instead of asking again).
  change @17 (client :UInt64, seq :UInt64, change :Data) -> (reply :Data, dirs :List(Attr), attr :Attr);
  # Raft's own messages between members of a group (postcard-encoded openraft messages); `group`
  # identifies the group, so a member of another one is refused.
  raft @18 (group :UInt64, kind :UInt8, message :Data) -> (reply :Data);
  # A group member's own state, for operators and testers. Answers even while crashed.
  member @19 () -> (status :MemberStatus);
  # Testers' fault injection: a crashed member stays up but answers every client and Raft call
  # with an error and changes nothing; restoring it (crashed = false) resumes it as a follower.
  crash @20 (crashed :Bool) -> ();
  # The version of the inode at `path` (absolute, in the namespace) as this member's own store has
  # it, without asking the leader. Answers even while crashed (a tester compares members).
  localVersion @21 (path :Data) -> (err :Errno, version :UInt64);
  # Membership at run time, on the leader (elsewhere: an error naming the leader). addMember makes
  # the member at `addr` (started with id `id`) a learner, waits until it has caught up, then a voter;
  # removeMember takes a voter out. Both through Raft's joint consensus. `err` is empty on success.
  addMember @22 (id :UInt64, addr :Text) -> (err :Text);
  removeMember @23 (id :UInt64) -> (err :Text);
  # Reads about client sessions and locks: `query` is a postcard-encoded `Query`, `reply` a
  # postcard-encoded `QueryReply` (see wire/meta_service.rs). In a group, only the leader answers.
  # `attr`: when the query found a lock request granted, the locked file's attributes (as `change`).
  query @24 (query :Data) -> (reply :Data, attr :Attr);
}

struct MemberStatus {
  id @0 :UInt64;
  # leader, follower, candidate, learner, or isolated (a leader that has heard from no majority
  # for a second: it answers no client until it does, or learns of a newer leader).
  role @1 :Text;
  crashed @2 :Bool;
  # The leader this member knows of, or -1.
  leader @3 :Int64;
  term @4 :UInt64;
  lastLogIndex @5 :UInt64;
  applied @6 :UInt64;
  snapshot @7 :UInt64;
  # The group's members as this member knows them (its latest membership), voters and learners.
  nodes @8 :List(GroupNode);
}

struct GroupNode {
  id @0 :UInt64;
  addr @1 :Text;
  voter @2 :Bool;
}

struct Cut {
  fileId @0 :UInt64;
  fromBlock @1 :UInt64;
  # Only blocks older than this go, and the server keeps the cut so that such a copy arriving later
  # is refused. 0: every block from fromBlock on goes and nothing is kept.
  version @2 :UInt64;
}

struct BlockKey {
  fileId @0 :UInt64;
  index @1 :UInt64;
}

struct Block {
  fileId @0 :UInt64;
  index @1 :UInt64;
  version @2 :UInt64;
  replicas @3 :UInt8;
  md5 @4 :Data;
  data @5 :Data;
  # The MD5 of each 4 KiB page of data (16 bytes each), for a block of more than one page; absent,
  # the server computes them. Kept as sent (see the dataserver's `verify_and_page`).
  pageMd5s @6 :Data;
}

struct BlockReply {
  found @0 :Bool;
  version @1 :UInt64;
  md5 @2 :Data;
  data @3 :Data;
  replicas @4 :UInt8;
  cutVersion @5 :UInt64;      # not found: the version of the cut that removed it (0: none known)
}

# A dataserver's scrubber: the pass running or the last one.
struct ScrubStatus {
  running @0 :Bool;
  passes @1 :UInt64;          # passes finished since the server started
  startedAt @2 :Int64;        # unix seconds; 0 = never
  finishedAt @3 :Int64;       # unix seconds; 0 = not yet
  checked @4 :UInt64;         # blocks whose MD5 was verified
  total @5 :UInt64;           # blocks held when the pass began
  corrupt @6 :UInt64;         # corrupt copies found here
  repaired @7 :UInt64;        # copies here replaced with a good or newer one
  pushed @8 :UInt64;          # blocks or cuts sent to peers that lacked them
  rangesDiffered @9 :UInt64;  # key ranges whose digest differed from a peer's
  rate @10 :UInt64;           # bytes per second it may read
  unreachable @11 :UInt32;    # peers that could not be compared with in this pass
}

struct ServerStatus {
  index @0 :UInt32;
  servers @1 :List(Text);
  blocks @2 :UInt64;
  bytes @3 :UInt64;
  rebuilding @4 :Bool;
  rebuildDone @5 :UInt64;     # blocks copied so far
  rebuildListed @6 :UInt64;   # blocks found on peers so far
  rebuildPeersLeft @7 :UInt32;
  diskTotal @8 :UInt64;
  diskFree @9 :UInt64;        # bytes this server may still take on its disk
  diskId @10 :UInt64;         # the filesystem id of its disk: servers sharing a disk share its free space
  hints @11 :UInt64;          # blocks and cuts noted for peers that may lack them
  scrub @12 :ScrubStatus;
  catchingUp @13 :Bool;       # restarted, and peers still hold hints for it: its answers do not count yet
  rebuildSkipped @14 :List(UInt32);  # peers a rebuild finished without (copied from when they answer)
  rebuildNowhere @15 :UInt64;        # blocks a peer listed that no holder reached had intact
  rebuildNowhereKeys @16 :List(BlockKey);  # the first of them
}

# The bootstrap interface of a dataserver. Block operations need a session, and a session is only
# granted to a caller whose ring (ordered server list) equals the server's own.
interface DataServer {
  connect @0 (layout :Layout) -> (session :DataSession);
  status @1 () -> (status :ServerStatus);
  # Starts a scrub pass now (`start`) unless one runs; answers how the current or last one went.
  scrub @2 (start :Bool) -> (status :ScrubStatus);
}

interface DataSession {
  # Durable before it returns. `repair`: only replace a block that is missing, corrupt or older.
  # `hint`: the writer may not wait for every replica, so note each block for its other holders.
  put @0 (blocks :List(Block), repair :Bool, hint :Bool) -> ();
  # `rebuilding`: the server lost its disk and is still copying, or was restarted and its peers
  # still hold hints for it: its answers (found or not) may be stale, so a quorum does not count them.
  get @1 (keys :List(BlockKey)) -> (blocks :List(BlockReply), rebuilding :Bool);
  # Per cut, deletes that file's blocks with index >= fromBlock; all cuts in one durable
  # transaction (a batch of deleted files costs one commit). At most 65536 cuts per call.
  # `hint`: note each cut for every other server (the writer may not wait for all of them).
  truncate @2 (cuts :List(Cut), hint :Bool) -> (removed :UInt64);
  # Flips a byte of one block of the file held here; returns its index, or -1 if none is held.
  corrupt @3 (fileId :UInt64) -> (index :Int64);
  # Keys of blocks held here of which server `target` holds a replica too, in key order after `after`,
  # with the version and MD5 held of each (`md5s`: 16 bytes a key). `rebuilding`: this server is
  # rebuilding its own store, so what it lists may fall short of its share.
  listFor @4 (target :UInt32, after :BlockKey, limit :UInt32) -> (keys :List(BlockKey), versions :List(UInt64), done :Bool, md5s :Data, rebuilding :Bool);
  # Deletes each block listed that is held here with exactly the version given (a collector decides
  # on a listing; a block written again since keeps its newer version and stays). One durable
  # transaction; at most 65536 keys per call.
  drop @5 (keys :List(BlockKey), versions :List(UInt64)) -> (removed :UInt64);
  # The version held of each key (0: none). At most 65536 keys per call.
  versions @6 (keys :List(BlockKey)) -> (versions :List(UInt64));
  # How many blocks in [from, to) (to absent: to the end) are held here of which server `peer`
  # holds a replica too, and an MD5 over their keys, versions and MD5s: equal digests, equal writes.
  digest @7 (from :BlockKey, to :BlockKey, hasTo :Bool, peer :UInt32) -> (count :UInt64, digest :Data);
  # How many hints this server keeps for server `target` (what `target` may still lack): of
  # versions below `before` (a client's clock, nanoseconds), or all with 0.
  hintsFor @8 (target :UInt32, before :UInt64) -> (count :UInt64);
  # Bytes [from, to) of one block, as the whole 4 KiB pages that hold them, each with its MD5
  # (`pageMd5s`, 16 bytes each): a small read moves and hashes only those pages. `offset`: where
  # the pages begin in the block; `length`: the block's stored length. A block kept without page
  # checksums comes whole (offset 0, no pageMd5s), to be checked against its md5.
  getRange @9 (key :BlockKey, from :UInt32, to :UInt32) -> (block :BlockReply, offset :UInt32, length :UInt32, pageMd5s :Data, rebuilding :Bool);
  # The cuts kept here (see Cut's version) of up to `limit` files, from file id `from` on in id
  # order; `done`: no later file has one. A rebuilding server takes them with the blocks.
  listCuts @10 (from :UInt64, limit :UInt32) -> (cuts :List(Cut), done :Bool);
}
