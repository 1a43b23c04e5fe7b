//! The client's file operations that need both the metaserver and the dataservers: truncating,
//! reading and writing a file, checking its replicas, and reclaiming deleted files. Written once
//! over the two ports, so the same code runs in a mount, in `dfsctl` and in the unit tests below.

use crate::shared::{Attr, FsError, FsResult, Kind, SetAttr, MAX_CUTS, ROOT};

use super::engine::{Engine, EngineError, Problems};
use super::ports::{DataPort, MetaPort};

impl From<EngineError> for FsError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => FsError::Invalid(m),
            EngineError::TooBig => FsError::TooBig,
            // Corrupt everywhere, or refused by a server: the caller can only report an I/O error.
            e @ (EngineError::Corrupt { .. } | EngineError::Refused { .. }) => FsError::Io(e.to_string()),
            e @ EngineError::NoSpace { .. } => FsError::NoSpace(e.to_string()),
        }
    }
}

/// One client's connections: the metaserver and the engine over the dataservers.
pub struct Files<M, D> {
    pub meta: M,
    pub engine: Engine<D>,
}

impl<M: MetaPort, D: DataPort> Files<M, D> {
    pub fn new(meta: M, engine: Engine<D>) -> Self {
        Files { meta, engine }
    }

    /// Changes attributes. A size change cuts (or zero-extends) the blocks first, then records the
    /// size: a crash in between leaves the old size over fewer blocks, which reads as zeros, and so
    /// does a caller interrupted in between (it is answered EINTR; the cut may have reached only
    /// some replicas, and the scrubbers carry it to the others, the newer version).
    #[tracing::instrument(level = "debug", skip(self, set), fields(size = ?set.size))]
    pub async fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        if let Some(size) = set.size {
            let old = self.meta.getattr(ino).await?;
            match old.kind {
                Kind::File => self.engine.truncate(ino, old.size, size).await?,
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("only regular files have a size to set".into())),
            }
        }
        self.meta.setattr(ino, set).await
    }

    /// Grows the file to at least `size` (`fallocate`'s default mode), never shrinking it: the
    /// size it has on the metaserver now counts, not one this client saw before, which another
    /// client may have grown past `size` since. The blocks past the old end are cut first, as a
    /// truncate that grows a file cuts them, so the new range reads as zeros.
    pub async fn grow(&self, ino: u64, size: u64) -> FsResult<Attr> {
        let old = self.meta.getattr(ino).await?;
        match old.kind {
            Kind::File if size <= old.size => Ok(old),
            Kind::File => {
                self.engine.truncate(ino, old.size, size).await?;
                self.meta.extend(ino, size).await
            }
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid("only regular files have a size to set".into())),
        }
    }

    /// Reads up to `len` bytes at `offset`, the file's size taken from the metaserver.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn read(&self, ino: u64, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        let a = self.meta.getattr(ino).await?;
        if a.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        Ok(self.engine.read(ino, offset, len, a.size).await?)
    }

    /// Reads with a size the caller already knows (a mount with the file open). A block missing
    /// everywhere is a hole, unless the file itself is gone: another client deleted it and its
    /// blocks were reclaimed while this one had it open. That is an error (`Stale`), never zeros.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn read_at(&self, ino: u64, offset: u64, len: u64, size: u64) -> FsResult<Vec<u8>> {
        let (data, holes) = self.engine.read_noting_holes(ino, offset, len, size).await?;
        // Only a definite "no such inode" makes it stale: a metaserver that cannot answer must
        // not fail a read that the dataservers could serve (holes read as zeros).
        if holes && matches!(self.meta.getattr(ino).await, Err(FsError::NotFound)) {
            return Err(FsError::Stale);
        }
        Ok(data)
    }

    /// Writes `data` at `offset` to every replica, then records the new size and mtime.
    #[tracing::instrument(level = "debug", skip(self, data), fields(len = data.len()))]
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<Attr> {
        let a = self.meta.getattr(ino).await?;
        match a.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("not a regular file".into())),
        }
        self.write_at(ino, offset, data, a.size).await
    }

    /// Writes to a regular file whose size the caller knows (a mount, revalidated at open: a
    /// concurrent writer on another mount is not seen before the next open, as with NFS). The
    /// blocks and the new size are sent together; this returns once every replica and the
    /// metaserver have them. A client that dies in between may leave the size grown over zeros,
    /// never a torn block.
    #[tracing::instrument(level = "debug", skip(self, data), fields(len = data.len()))]
    pub async fn write_at(&self, ino: u64, offset: u64, data: &[u8], size: u64) -> FsResult<Attr> {
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::TooBig)?;
        let (written, extended) =
            futures::join!(self.engine.write(ino, offset, data, size), self.meta.extend(ino, end));
        written?;
        extended
    }

    /// [`Files::write_at`] without recording the new size on the metaserver: a later write of
    /// the same stream will (see `client::writeback`).
    pub async fn write_blocks(&self, ino: u64, offset: u64, data: &[u8], size: u64) -> FsResult<()> {
        Ok(self.engine.write(ino, offset, data, size).await?)
    }

    /// Deletes the blocks of orphans (inodes whose last link went and that nobody here has open),
    /// then forgets them: one commit per server, and one on the metaserver per [`MAX_CUTS`].
    #[tracing::instrument(level = "debug", skip_all, fields(inodes = inos.len()))]
    pub async fn reclaim(&self, inos: &[u64]) -> FsResult<()> {
        self.engine.delete(inos).await?;
        for chunk in inos.chunks(MAX_CUTS) {
            self.meta.purge(chunk).await?;
        }
        Ok(())
    }

    /// Per block with a problem, the replicas that are not fine.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn check(&self, ino: u64) -> FsResult<Problems> {
        let a = self.meta.getattr(ino).await?;
        Ok(self.engine.check(ino, a.size).await)
    }

    /// Resolves an absolute path inside the filesystem, without following symlinks.
    pub async fn resolve(&self, path: &str) -> FsResult<Attr> {
        let mut a = self.meta.getattr(ROOT).await?;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            a = self.meta.lookup(a.ino, part.as_bytes()).await?;
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::ReplicaState;
    use super::super::fakes::{block_on, files, FakeMeta};
    use super::*;
    use crate::shared::NewNode;

    fn new_file(f: &Files<FakeMeta, super::super::fakes::FakeData>, name: &str) -> u64 {
        let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
        block_on(f.meta.mknod(ROOT, name.as_bytes(), &node)).expect("mknod").ino
    }

    #[test]
    fn a_write_lands_on_every_replica_and_grows_the_size() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        let a = block_on(f.write(ino, 4, b"hello, world")).expect("write");
        assert_eq!(a.size, 16);
        assert_eq!(block_on(f.read(ino, 0, 100)).expect("read"), b"\0\0\0\0hello, world");
        // Two blocks, three replicas each.
        assert_eq!(f.engine.port().blocks_of(ino), 6);
        assert!(block_on(f.check(ino)).expect("check").is_empty());
    }

    #[test]
    fn truncate_cuts_the_blocks_before_recording_the_size() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        block_on(f.write(ino, 0, b"0123456789abcdef")).expect("write");
        let set = |size| SetAttr { size: Some(size), ..SetAttr::default() };
        block_on(f.setattr(ino, &set(3))).expect("shrink");
        block_on(f.setattr(ino, &set(16))).expect("grow");
        assert_eq!(block_on(f.read(ino, 0, 100)).expect("read"), b"012\0\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(f.engine.port().blocks_of(ino), 3, "only the first block is left");
    }

    /// Regression: `fallocate` set the size to its range's end from the size the mount had seen,
    /// cutting what another client had written past it since.
    #[test]
    fn growing_a_file_never_shrinks_it_and_reads_the_new_range_as_zeros() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        block_on(f.write(ino, 0, b"0123456789abcdef")).expect("write");
        assert_eq!(block_on(f.grow(ino, 10)).expect("grow").size, 16, "a smaller size changes nothing");
        assert_eq!(block_on(f.read(ino, 0, 100)).expect("read"), b"0123456789abcdef");
        let set = SetAttr { size: Some(3), ..SetAttr::default() };
        block_on(f.setattr(ino, &set)).expect("shrink");
        assert_eq!(block_on(f.grow(ino, 12)).expect("grow").size, 12);
        assert_eq!(block_on(f.read(ino, 0, 100)).expect("read"), b"012\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn size_changes_of_directories_and_symlinks_are_refused_before_any_block_is_touched() {
        let f = files(4, 8);
        let dir = NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 };
        let d = block_on(f.meta.mknod(ROOT, b"d", &dir)).expect("mkdir").ino;
        let l = block_on(f.meta.symlink(ROOT, b"l", b"d", 0, 0)).expect("symlink").ino;
        let set = SetAttr { size: Some(0), ..SetAttr::default() };
        assert_eq!(block_on(f.setattr(d, &set)), Err(FsError::IsDir));
        assert!(matches!(block_on(f.setattr(l, &set)), Err(FsError::Invalid(_))));
        assert_eq!(f.engine.port().truncates(), 0);
    }

    #[test]
    fn a_hole_in_a_file_deleted_elsewhere_is_stale_but_a_silent_metaserver_reads_zeros() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        block_on(f.write(ino, 0, b"01234567")).expect("write");
        block_on(f.meta.unlink(ROOT, b"a")).expect("unlink");
        block_on(f.reclaim(&[ino])).expect("reclaim");
        assert_eq!(f.engine.port().blocks_of(ino), 0);
        assert_eq!(block_on(f.read_at(ino, 0, 8, 8)), Err(FsError::Stale));
        // The metaserver does not answer (an I/O error, not NotFound): holes stay zeros.
        f.meta.fail_with(Some(FsError::Io("unreachable".into())));
        assert_eq!(block_on(f.read_at(ino, 0, 8, 8)).expect("read"), vec![0; 8]);
    }

    #[test]
    fn reads_go_around_a_server_that_is_down() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        block_on(f.write(ino, 0, b"0123456789abcdef")).expect("write");
        f.engine.port().set_up(1, false);
        assert_eq!(block_on(f.read_at(ino, 0, 16, 16)).expect("read"), b"0123456789abcdef");
        let problems = block_on(f.check(ino)).expect("check");
        assert!(!problems.is_empty());
        assert!(problems.iter().all(|(_, r)| r.iter().all(|&(s, ref st)| s == 1 && *st == ReplicaState::Unreachable)));
    }

    #[test]
    fn a_refused_ring_fails_a_write_with_an_io_error_that_says_so() {
        let f = files(4, 8);
        let ino = new_file(&f, "a");
        f.engine.port().set_refusing(2, true);
        let e = block_on(f.write(ino, 0, b"0123456789abcdef")).expect_err("refused");
        assert!(matches!(&e, FsError::Io(m) if m.contains("fake2") && m.contains("server list differs")), "{e:?}");
    }

    #[test]
    fn metaserver_errors_come_back_unchanged() {
        let f = files(4, 8);
        assert_eq!(block_on(f.read(99, 0, 1)), Err(FsError::NotFound));
        assert_eq!(block_on(f.resolve("/no/such")), Err(FsError::NotFound));
        let ino = new_file(&f, "a");
        assert_eq!(block_on(f.resolve("/a")).expect("resolve").ino, ino);
        assert_eq!(block_on(f.write(ROOT, 0, b"x")), Err(FsError::IsDir));
        assert_eq!(block_on(f.write_at(ino, u64::MAX, b"x", 0)), Err(FsError::TooBig));
    }

    #[test]
    fn reclaim_deletes_every_replica_then_purges_the_orphans() {
        let f = files(5, 8);
        let inos: Vec<u64> = (0..3).map(|i| new_file(&f, &format!("f{i}"))).collect();
        for &ino in &inos {
            block_on(f.write(ino, 0, &[7; 40])).expect("write");
            block_on(f.meta.unlink(ROOT, format!("f{}", ino - inos[0]).as_bytes())).expect("unlink");
        }
        assert_eq!(block_on(f.meta.orphans()).expect("orphans").len(), 3);
        block_on(f.reclaim(&inos)).expect("reclaim");
        assert!(inos.iter().all(|&i| f.engine.port().blocks_of(i) == 0));
        assert!(block_on(f.meta.orphans()).expect("orphans").is_empty());
    }
}
