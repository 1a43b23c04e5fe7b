//! Names: links, unlinks, rmdir and rename (with RENAME_NOREPLACE and RENAME_EXCHANGE), the
//! operations that move link counts and may orphan an inode.

use super::{dir_range, dirent_key, Namespace};
use crate::shared::db::{Read, Writer};
use crate::shared::{now_ns, validate_name, Attr, FsError, FsResult, Kind, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT};

impl Namespace {
    #[tracing::instrument(level = "debug", skip(self, new_name), fields(new_name = %String::from_utf8_lossy(new_name)))]
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        self.db.write(|w| self.link_in(w, ino, new_parent, new_name, now_ns()))
    }

    /// [`Self::link`] inside a write transaction at time `now`.
    pub(crate) fn link_in(
        &self,
        w: &mut Writer,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
        now: i64,
    ) -> FsResult<Attr> {
        validate_name(new_name)?;
        let mut a = Self::inode(w, self.inodes, ino)?;
        if a.kind == Kind::Dir {
            return Err(FsError::Perm);
        }
        if a.nlink == 0 {
            return Err(FsError::NotFound);
        }
        self.dir(w, new_parent)?;
        if self.entry(w, new_parent, new_name)?.is_some() {
            return Err(FsError::Exists);
        }
        w.put(self.dirents, &dirent_key(new_parent, new_name), &ino.to_be_bytes())?;
        a.nlink += 1;
        a.ctime = now;
        self.put_inode(w, &mut a)?;
        self.touch_dir(w, new_parent, 0, now)?;
        Ok(a)
    }

    /// Removes a non-directory entry. Returns the inode orphaned by it, or 0.
    #[tracing::instrument(level = "debug", skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<u64> {
        self.db.write(|w| self.unlink_in(w, parent, name, now_ns()))
    }

    /// [`Self::unlink`] inside a write transaction at time `now`.
    pub(crate) fn unlink_in(&self, w: &mut Writer, parent: u64, name: &[u8], now: i64) -> FsResult<u64> {
        validate_name(name)?;
        self.dir(w, parent)?;
        let ino = self.entry(w, parent, name)?.ok_or(FsError::NotFound)?;
        if Self::inode(w, self.inodes, ino)?.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        w.delete(self.dirents, &dirent_key(parent, name))?;
        self.touch_dir(w, parent, 0, now)?;
        self.drop_link(w, ino, now)
    }

    fn is_empty_dir(&self, r: &impl Read, ino: u64) -> FsResult<bool> {
        let (from, to) = dir_range(ino);
        Ok(r.scan_keys(self.dirents, &from, &to, 1)?.is_empty())
    }

    #[tracing::instrument(level = "debug", skip(self, name), fields(name = %String::from_utf8_lossy(name)))]
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.db.write(|w| self.rmdir_in(w, parent, name, now_ns()))
    }

    /// [`Self::rmdir`] inside a write transaction at time `now`. Returns the directory's last
    /// attributes, with no links: a process may still hold it (see the mount's `rmdir`).
    pub(crate) fn rmdir_in(&self, w: &mut Writer, parent: u64, name: &[u8], now: i64) -> FsResult<Attr> {
        validate_name(name)?;
        self.dir(w, parent)?;
        let ino = self.entry(w, parent, name)?.ok_or(FsError::NotFound)?;
        let mut gone = self.dir(w, ino)?;
        if !self.is_empty_dir(w, ino)? {
            return Err(FsError::NotEmpty);
        }
        w.delete(self.dirents, &dirent_key(parent, name))?;
        w.delete(self.inodes, &ino.to_be_bytes())?;
        self.forget_xattrs_in(w, ino)?;
        self.touch_dir(w, parent, -1, now)?;
        gone.nlink = 0;
        gone.ctime = now;
        Ok(gone)
    }

    /// Whether directory `ino` is `ancestor` or lies below it.
    fn is_within(&self, r: &impl Read, mut ino: u64, ancestor: u64) -> FsResult<bool> {
        // Bounded by the tree's depth; the bound guards against a corrupt parent chain.
        for _ in 0..1_000_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT {
                return Ok(false);
            }
            ino = Self::inode(r, self.inodes, ino)?.parent;
        }
        Err(FsError::Io("directory parent chain does not reach the root".into()))
    }

    /// Renames with POSIX's replace rules. Returns the inode orphaned by a replaced file, or 0; and
    /// a replaced (empty) directory's last attributes, with no links, as [`Self::rmdir`] does.
    #[tracing::instrument(level = "debug", skip(self, name, new_name), fields(name = %String::from_utf8_lossy(name), new_name = %String::from_utf8_lossy(new_name)))]
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<crate::shared::Renamed> {
        self.db.write(|w| self.rename_in(w, (parent, name), (new_parent, new_name), flags, now_ns()))
    }

    /// [`Self::rename`] inside a write transaction at time `now`, from (parent, name) to
    /// (new parent, new name).
    pub(crate) fn rename_in(
        &self,
        w: &mut Writer,
        (parent, name): (u64, &[u8]),
        (new_parent, new_name): (u64, &[u8]),
        flags: u32,
        now: i64,
    ) -> FsResult<crate::shared::Renamed> {
        validate_name(name)?;
        validate_name(new_name)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || flags == RENAME_NOREPLACE | RENAME_EXCHANGE {
            return Err(FsError::Invalid(format!("rename flags {flags:#x}")));
        }
        self.dir(w, parent)?;
        self.dir(w, new_parent)?;
        let src_ino = self.entry(w, parent, name)?.ok_or(FsError::NotFound)?;
        let mut src = Self::inode(w, self.inodes, src_ino)?;
        let dst_ino = self.entry(w, new_parent, new_name)?;
        if flags & RENAME_EXCHANGE != 0 {
            let dst_ino = dst_ino.ok_or(FsError::NotFound)?;
            return self.exchange(w, (parent, name, src), (new_parent, new_name, dst_ino), now).map(|_| (0, None));
        }
        // As Linux: whatever the target is (even another name of the source, or the source's
        // own name), an existing one fails RENAME_NOREPLACE before any other check.
        if dst_ino.is_some() && flags & RENAME_NOREPLACE != 0 {
            return Err(FsError::Exists);
        }
        if src.kind == Kind::Dir && new_parent != parent && self.is_within(w, new_parent, src_ino)? {
            return Err(FsError::Invalid("cannot move a directory into its own subtree".into()));
        }
        let mut orphan = 0;
        let mut replaced_dir = 0;
        let mut gone = None;
        if let Some(dst_ino) = dst_ino {
            if dst_ino == src_ino {
                return Ok((0, None)); // two links to one inode: POSIX says do nothing
            }
            let dst = Self::inode(w, self.inodes, dst_ino)?;
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    if !self.is_empty_dir(w, dst_ino)? {
                        return Err(FsError::NotEmpty);
                    }
                    w.delete(self.inodes, &dst_ino.to_be_bytes())?;
                    self.forget_xattrs_in(w, dst_ino)?;
                    replaced_dir = 1;
                    gone = Some(Attr { nlink: 0, ctime: now, ..dst });
                }
                (false, false) => orphan = self.drop_link(w, dst_ino, now)?,
            }
        }
        w.delete(self.dirents, &dirent_key(parent, name))?;
        w.put(self.dirents, &dirent_key(new_parent, new_name), &src_ino.to_be_bytes())?;
        let moved_dir = src.kind == Kind::Dir && parent != new_parent;
        if moved_dir {
            src.parent = new_parent;
        }
        src.ctime = now;
        self.put_inode(w, &mut src)?;
        // Each parent is touched once (one change, one version), with its link count's net change:
        // a moved directory's ".." leaves one and joins the other; a replaced directory's goes.
        let moved = i32::from(moved_dir);
        if parent == new_parent {
            self.touch_dir(w, parent, -replaced_dir, now)?;
        } else {
            self.touch_dir(w, parent, -moved, now)?;
            self.touch_dir(w, new_parent, moved - replaced_dir, now)?;
        }
        Ok((orphan, gone))
    }

    /// RENAME_EXCHANGE: swaps two entries atomically.
    fn exchange(&self, w: &mut Writer, a: (u64, &[u8], Attr), b: (u64, &[u8], u64), now: i64) -> FsResult<()> {
        let (pa, na, mut ia) = a;
        let (pb, nb, ino_b) = b;
        let mut ib = Self::inode(w, self.inodes, ino_b)?;
        if ia.ino == ib.ino {
            return Ok(());
        }
        if pa != pb {
            if ia.kind == Kind::Dir && self.is_within(w, pb, ia.ino)? {
                return Err(FsError::Invalid("cannot move a directory into its own subtree".into()));
            }
            if ib.kind == Kind::Dir && self.is_within(w, pa, ib.ino)? {
                return Err(FsError::Invalid("cannot move a directory into its own subtree".into()));
            }
        }
        w.put(self.dirents, &dirent_key(pa, na), &ib.ino.to_be_bytes())?;
        w.put(self.dirents, &dirent_key(pb, nb), &ia.ino.to_be_bytes())?;
        let (da, db) = (i32::from(ia.kind == Kind::Dir), i32::from(ib.kind == Kind::Dir));
        if ia.kind == Kind::Dir {
            ia.parent = pb;
        }
        if ib.kind == Kind::Dir {
            ib.parent = pa;
        }
        ia.ctime = now;
        ib.ctime = now;
        self.put_inode(w, &mut ia)?;
        self.put_inode(w, &mut ib)?;
        if pa == pb {
            self.touch_dir(w, pa, 0, now)
        } else {
            self.touch_dir(w, pa, db - da, now)?;
            self.touch_dir(w, pb, da - db, now)
        }
    }
}
