//! Translation between domain types and their Cap'n Proto form. Every reader here validates what it
//! reads: a malformed message becomes a `capnp::Error`, never a panic.

use capnp::Error;

use super::dfs_capnp::{
    attr, block, block_key, block_reply, layout, set_attr, Errno, Kind as WireKind, TimeSet as WireTime,
};
use crate::shared::block::{page_count, Block, BlockKey, Checksum, PAGE};
use crate::shared::layout::{Claim, Layout, Quorum, MAX_SERVERS};
use crate::shared::{Attr, FsError, Kind, SetAttr, TimeSet};

pub fn bad(msg: impl Into<String>) -> Error {
    Error::failed(msg.into())
}

pub fn write_layout(mut b: layout::Builder, l: &Layout) {
    b.set_block_size(l.block_size);
    b.set_replicas(l.replicas);
    b.set_write_quorum(l.quorum.write);
    b.set_read_quorum(l.quorum.read);
    let mut s = b.init_servers(l.servers.len() as u32);
    for (i, a) in l.servers.iter().enumerate() {
        s.set(i as u32, a.as_str());
    }
}

/// A ring without a shape: on the wire, a layout whose block size and replicas are 0.
pub fn write_ring(b: layout::Builder, ring: &[String]) {
    write_layout(b, &Layout { servers: ring.to_vec(), ..Layout::default() });
}

/// A layout, or only a ring (see [`write_ring`]).
pub fn read_claim(r: layout::Reader) -> Result<Claim, Error> {
    let l = read_layout(r)?;
    Ok(if l.block_size == 0 && l.replicas == 0 { Claim::Ring(l.servers) } else { Claim::Layout(l) })
}

pub fn read_layout(r: layout::Reader) -> Result<Layout, Error> {
    let servers = r.get_servers()?;
    if servers.len() as usize > MAX_SERVERS {
        return Err(bad(format!("a layout lists {} servers", servers.len())));
    }
    let servers = servers
        .iter()
        .map(|t| Ok(t?.to_str().map_err(|_| bad("server address is not UTF-8"))?.to_string()))
        .collect::<Result<Vec<String>, Error>>()?;
    let quorum = Quorum { write: r.get_write_quorum(), read: r.get_read_quorum() };
    Ok(Layout { servers, block_size: r.get_block_size(), replicas: r.get_replicas(), quorum })
}

pub fn kind_to_wire(k: Kind) -> WireKind {
    match k {
        Kind::File => WireKind::File,
        Kind::Dir => WireKind::Dir,
        Kind::Symlink => WireKind::Symlink,
        Kind::Fifo => WireKind::Fifo,
        Kind::Socket => WireKind::Socket,
        Kind::CharDev => WireKind::CharDev,
        Kind::BlockDev => WireKind::BlockDev,
    }
}

pub fn kind_from_wire(k: WireKind) -> Kind {
    match k {
        WireKind::File => Kind::File,
        WireKind::Dir => Kind::Dir,
        WireKind::Symlink => Kind::Symlink,
        WireKind::Fifo => Kind::Fifo,
        WireKind::Socket => Kind::Socket,
        WireKind::CharDev => Kind::CharDev,
        WireKind::BlockDev => Kind::BlockDev,
    }
}

pub fn write_attr(mut b: attr::Builder, a: &Attr) {
    b.set_ino(a.ino);
    b.set_kind(kind_to_wire(a.kind));
    b.set_perm(a.perm);
    b.set_nlink(a.nlink);
    b.set_uid(a.uid);
    b.set_gid(a.gid);
    b.set_size(a.size);
    b.set_atime_ns(a.atime);
    b.set_mtime_ns(a.mtime);
    b.set_ctime_ns(a.ctime);
    b.set_rdev(a.rdev);
    b.set_version(a.version);
    b.set_parent(a.parent);
    b.set_xattrs(match a.xattrs {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    });
}

pub fn read_attr(r: attr::Reader) -> Result<Attr, Error> {
    Ok(Attr {
        ino: r.get_ino(),
        kind: kind_from_wire(r.get_kind().map_err(|_| bad("unknown inode kind"))?),
        perm: r.get_perm(),
        nlink: r.get_nlink(),
        uid: r.get_uid(),
        gid: r.get_gid(),
        size: r.get_size(),
        atime: r.get_atime_ns(),
        mtime: r.get_mtime_ns(),
        ctime: r.get_ctime_ns(),
        rdev: r.get_rdev(),
        parent: r.get_parent(),
        target: Vec::new(),
        version: r.get_version(),
        xattrs: match r.get_xattrs() {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        },
    })
}

pub fn errno_to_wire(e: &FsError) -> Errno {
    match e {
        FsError::NotFound | FsError::Stale => Errno::NoEnt,
        FsError::Exists => Errno::Exist,
        FsError::NotEmpty => Errno::NotEmpty,
        FsError::NotDir => Errno::NotDir,
        FsError::IsDir => Errno::IsDir,
        FsError::Invalid(_) => Errno::Inval,
        FsError::NameTooLong => Errno::NameTooLong,
        FsError::Perm => Errno::Perm,
        FsError::TooBig => Errno::Fbig,
        FsError::Io(_) | FsError::Interrupted | FsError::WouldBlock | FsError::Deadlock => Errno::Io,
        FsError::NotHere(_) => Errno::NotHere,
        FsError::NoSpace(_) => Errno::NoSpace,
        FsError::NoData => Errno::NoData,
        // Only the change and query paths carry these, and they carry the error itself.
        FsError::Range(_) | FsError::NotSupported(_) => Errno::Inval,
    }
}

/// `Ok(())` for `ok`, else the error (detail strings do not travel; the server logs them).
pub fn errno_from_wire(e: Result<Errno, capnp::NotInSchema>) -> Result<(), FsError> {
    Err(match e.map_err(|_| FsError::Io("unknown error code from metaserver".into()))? {
        Errno::Ok => return Ok(()),
        Errno::NoEnt => FsError::NotFound,
        Errno::Exist => FsError::Exists,
        Errno::NotEmpty => FsError::NotEmpty,
        Errno::NotDir => FsError::NotDir,
        Errno::IsDir => FsError::IsDir,
        Errno::Inval => FsError::Invalid("refused by the metaserver".into()),
        Errno::NameTooLong => FsError::NameTooLong,
        Errno::Perm => FsError::Perm,
        Errno::NoData | Errno::Io => FsError::Io("metaserver I/O error".into()),
        Errno::Fbig => FsError::TooBig,
        Errno::NotHere => FsError::NotHere("not the group's leader".into()),
        Errno::NoSpace => FsError::NoSpace("the metaserver's disk is full".into()),
    })
}

fn time_to_wire(t: Option<TimeSet>) -> (WireTime, i64) {
    match t {
        None => (WireTime::Keep, 0),
        Some(TimeSet::Now) => (WireTime::Now, 0),
        Some(TimeSet::At(ns)) => (WireTime::At, ns),
    }
}

fn time_from_wire(t: Result<WireTime, capnp::NotInSchema>, ns: i64) -> Result<Option<TimeSet>, Error> {
    Ok(match t.map_err(|_| bad("unknown time setting"))? {
        WireTime::Keep => None,
        WireTime::Now => Some(TimeSet::Now),
        WireTime::At => Some(TimeSet::At(ns)),
    })
}

pub fn write_setattr(mut b: set_attr::Builder, s: &SetAttr) {
    if let Some(p) = s.perm {
        b.set_set_perm(true);
        b.set_perm(p);
    }
    if let Some(u) = s.uid {
        b.set_set_uid(true);
        b.set_uid(u);
    }
    if let Some(g) = s.gid {
        b.set_set_gid(true);
        b.set_gid(g);
    }
    if let Some(sz) = s.size {
        b.set_set_size(true);
        b.set_size(sz);
    }
    let (t, ns) = time_to_wire(s.atime);
    b.set_atime(t);
    b.set_atime_ns(ns);
    let (t, ns) = time_to_wire(s.mtime);
    b.set_mtime(t);
    b.set_mtime_ns(ns);
}

pub fn read_setattr(r: set_attr::Reader) -> Result<SetAttr, Error> {
    Ok(SetAttr {
        perm: r.get_set_perm().then(|| r.get_perm()),
        uid: r.get_set_uid().then(|| r.get_uid()),
        gid: r.get_set_gid().then(|| r.get_gid()),
        size: r.get_set_size().then(|| r.get_size()),
        atime: time_from_wire(r.get_atime(), r.get_atime_ns())?,
        mtime: time_from_wire(r.get_mtime(), r.get_mtime_ns())?,
    })
}

pub fn write_key(mut b: block_key::Builder, k: BlockKey) {
    b.set_file_id(k.file_id);
    b.set_index(k.index);
}

pub fn read_key(r: block_key::Reader) -> BlockKey {
    BlockKey { file_id: r.get_file_id(), index: r.get_index() }
}

pub fn read_md5(d: &[u8]) -> Result<Checksum, Error> {
    d.try_into().map_err(|_| bad(format!("a checksum is 16 bytes, got {}", d.len())))
}

pub fn write_block(mut b: block::Builder, blk: &Block) {
    write_key_fields(&mut b, blk.key);
    b.set_version(blk.version);
    b.set_replicas(blk.replicas);
    b.set_md5(&blk.md5);
    b.set_data(&blk.data);
    if !blk.pages.is_empty() {
        b.set_page_md5s(&blk.pages.concat());
    }
}

fn write_key_fields(b: &mut block::Builder, k: BlockKey) {
    b.set_file_id(k.file_id);
    b.set_index(k.index);
}

/// Reads a block, refusing one larger than `max_len` bytes, or with page checksums that are not
/// one per page of a block of more than one page.
pub fn read_block(r: block::Reader, max_len: usize) -> Result<Block, Error> {
    let data = r.get_data()?;
    if data.len() > max_len {
        return Err(bad(format!("a block of {} bytes exceeds the block size {max_len}", data.len())));
    }
    let pages = r.get_page_md5s()?;
    if !pages.is_empty() && (data.len() <= PAGE || pages.len() != 16 * page_count(data.len())) {
        return Err(bad(format!("{} bytes of page checksums for a block of {} bytes", pages.len(), data.len())));
    }
    Ok(Block {
        key: BlockKey { file_id: r.get_file_id(), index: r.get_index() },
        version: r.get_version(),
        replicas: r.get_replicas(),
        md5: read_md5(r.get_md5()?)?,
        data: data.to_vec(),
        pages: pages.chunks_exact(16).map(read_md5).collect::<Result<_, _>>()?,
    })
}

/// Fills a request's list of keys.
/// Asks `session` for a page of the keys it holds that server `target` holds too (see `listFor`).
pub async fn list_for(
    session: super::dfs_capnp::data_session::Client,
    target: usize,
    after: BlockKey,
    limit: u32,
) -> Result<crate::dataserver::rebuild::ListPage, Error> {
    let mut req = session.list_for_request();
    req.get().set_target(target as u32);
    req.get().set_limit(limit);
    write_key(req.get().init_after(), after);
    let reply = req.send().promise.await?;
    let r = reply.get()?;
    let keys: Vec<(BlockKey, u64)> = r.get_keys()?.iter().map(read_key).zip(r.get_versions()?.iter()).collect();
    // A peer that does not send MD5s (an older build) sends none at all.
    let md5s = r.get_md5s()?;
    if !md5s.is_empty() && md5s.len() != 16 * keys.len() {
        return Err(bad(format!("{} bytes of MD5s for {} keys", md5s.len(), keys.len())));
    }
    let md5s = md5s.chunks_exact(16).map(read_md5).collect::<Result<_, _>>()?;
    Ok(crate::dataserver::rebuild::ListPage { keys, md5s, done: r.get_done(), rebuilding: r.get_rebuilding() })
}

pub fn write_keys(mut list: capnp::struct_list::Builder<block_key::Owned>, keys: &[BlockKey]) {
    for (i, k) in keys.iter().enumerate() {
        write_key(list.reborrow().get(i as u32), *k);
    }
}

/// The blocks of a get reply, one per key asked for; `None` where the server has none.
pub fn read_block_replies(
    keys: &[BlockKey],
    list: capnp::struct_list::Reader<block_reply::Owned>,
) -> Result<Vec<Option<Block>>, Error> {
    let mut out = Vec::with_capacity(keys.len());
    for (k, b) in keys.iter().zip(list.iter()) {
        out.push(if b.get_found() {
            Some(Block {
                key: *k,
                version: b.get_version(),
                replicas: b.get_replicas(),
                md5: read_md5(b.get_md5()?)?,
                data: b.get_data()?.to_vec(),
                pages: vec![],
            })
        } else {
            None
        });
    }
    Ok(out)
}

/// Cuts in their wire form.
pub fn write_cuts(
    mut list: capnp::struct_list::Builder<super::dfs_capnp::cut::Owned>,
    cuts: &[crate::dataserver::blockstore::Cut],
) {
    for (i, c) in cuts.iter().enumerate() {
        let mut b = list.reborrow().get(i as u32);
        b.set_file_id(c.file_id);
        b.set_from_block(c.from_block);
        b.set_version(c.version);
    }
}

/// A put of `blocks` on a data session, built now, sent when the returned future runs.
pub fn put_blocks<'a>(
    session: &super::dfs_capnp::data_session::Client,
    blocks: impl ExactSizeIterator<Item = &'a Block>,
    repair: bool,
    hint: bool,
) -> impl std::future::Future<Output = Result<(), Error>> {
    let mut req = session.put_request();
    req.get().set_repair(repair);
    req.get().set_hint(hint);
    let mut list = req.get().init_blocks(blocks.len() as u32);
    for (i, b) in blocks.enumerate() {
        write_block(list.reborrow().get(i as u32), b);
    }
    async move {
        req.send().promise.await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a directory's parent was left out, and a mount's listings fetched ahead kept
    /// the old attributes of a directory it had removed a name from (see `Statahead::removed`).
    #[test]
    fn a_directorys_attributes_cross_the_wire_whole() {
        let a = Attr {
            ino: 7,
            kind: Kind::Dir,
            perm: 0o1755,
            nlink: 3,
            uid: 1000,
            gid: 100,
            size: 4096,
            atime: -5,
            mtime: 1_700_000_000_123_456_789,
            ctime: 1_700_000_001_000_000_000,
            rdev: 9,
            parent: 5,
            target: Vec::new(),
            version: 42,
            xattrs: Some(false),
        };
        let mut m = capnp::message::Builder::new_default();
        write_attr(m.init_root::<attr::Builder>(), &a);
        let back = read_attr(m.get_root_as_reader::<attr::Reader>().expect("reader")).expect("read");
        assert_eq!(back, a);
    }
}
