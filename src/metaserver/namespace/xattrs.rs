//! Extended attributes, kept with the namespace: one record per attribute in the `xattrs` table,
//! keyed by inode (8 bytes, big-endian) and name, so that an inode's attributes are one key range,
//! listed in name order and dropped with the inode.
//!
//! Linux's rules and limits: names in the `user.`, `trusted.` and `security.` namespaces (stored as
//! data; the kernel checks who may touch which), at most 255 bytes; values at most 64 KiB; an
//! inode's names together at most 64 KiB (so that a list fits one `listxattr` call). `system.`
//! names (POSIX ACLs among them) and file capabilities (`security.capability`) are not supported. Permissions are the kernel's (the mount uses
//! `default_permissions`).

use super::Namespace;
use crate::shared::db::{Read, Writer};
use crate::shared::{Attr, FsError, FsResult};

/// Longest name (`XATTR_NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Largest value (`XATTR_SIZE_MAX`).
pub const MAX_VALUE: usize = 64 << 10;
/// Most bytes of names (each with its terminating NUL) one inode may have (`XATTR_LIST_MAX`).
pub const MAX_LIST: usize = 64 << 10;
/// `setxattr` flags.
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

const NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// File capabilities, which are not kept: the kernel asks a FUSE mount for this attribute before
/// every write, and a mount answers that at once, without asking the metaserver.
pub const CAPABILITY: &[u8] = b"security.capability";

fn key(ino: u64, name: &[u8]) -> Vec<u8> {
    let mut k = ino.to_be_bytes().to_vec();
    k.extend_from_slice(name);
    k
}

/// The key range of one inode's attributes.
fn range(ino: u64) -> ([u8; 8], Vec<u8>) {
    let to = match ino.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    };
    (ino.to_be_bytes(), to)
}

/// Checks a name as Linux would: too long is ERANGE, an unknown or `system.` namespace EOPNOTSUPP.
pub fn validate_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(FsError::Range(format!("an attribute name of {} bytes (1 to {MAX_NAME})", name.len())));
    }
    if name.contains(&0) {
        return Err(FsError::Invalid("an attribute name with a NUL byte".into()));
    }
    if name == CAPABILITY {
        return Err(FsError::NotSupported("file capabilities (security.capability) are not kept".into()));
    }
    match NAMESPACES.iter().find(|p| name.starts_with(p)) {
        Some(p) if name.len() > p.len() => Ok(()),
        Some(_) => Err(FsError::Invalid("an attribute name that is only its namespace".into())),
        None => Err(FsError::NotSupported(format!(
            "attribute {:?}: only user., trusted. and security. attributes are kept",
            String::from_utf8_lossy(name)
        ))),
    }
}

impl Namespace {
    /// Sets attribute `name` of `ino` (see `setxattr(2)` for `flags`), counting it as a change of
    /// the inode (its version and ctime).
    pub(crate) fn set_xattr_in(
        &self,
        w: &mut Writer,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
        now: i64,
    ) -> FsResult<()> {
        validate_name(name)?;
        if value.len() > MAX_VALUE {
            return Err(FsError::Range(format!("an attribute value of {} bytes (at most {MAX_VALUE})", value.len())));
        }
        // Both flags at once are taken as Linux's file systems take them: EEXIST if the attribute
        // is there, ENODATA if not.
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return Err(FsError::Invalid(format!("setxattr flags {flags:#x}")));
        }
        let mut a = Self::inode(w, self.inodes, ino)?;
        let k = key(ino, name);
        let exists = w.get(self.xattrs, &k)?.is_some();
        if exists && flags & XATTR_CREATE != 0 {
            return Err(FsError::Exists);
        }
        if !exists && flags & XATTR_REPLACE != 0 {
            return Err(FsError::NoData);
        }
        if !exists {
            let listed: usize = self.xattr_names_in(w, ino)?.iter().map(|n| n.len() + 1).sum();
            if listed + name.len() + 1 > MAX_LIST {
                return Err(FsError::NoSpace(format!(
                    "the names of inode {ino}'s attributes would pass {MAX_LIST} bytes"
                )));
            }
        }
        w.put(self.xattrs, &k, value)?;
        a.ctime = now;
        self.put_inode(w, &mut a)
    }

    /// Removes attribute `name` of `ino` (ENODATA if it has none by that name).
    pub(crate) fn remove_xattr_in(&self, w: &mut Writer, ino: u64, name: &[u8], now: i64) -> FsResult<()> {
        validate_name(name)?;
        let mut a = Self::inode(w, self.inodes, ino)?;
        if !w.delete(self.xattrs, &key(ino, name))? {
            return Err(FsError::NoData);
        }
        a.ctime = now;
        self.put_inode(w, &mut a)
    }

    /// Drops every attribute of `ino` (the inode is going).
    pub(crate) fn forget_xattrs_in(&self, w: &mut Writer, ino: u64) -> FsResult<()> {
        let (from, to) = range(ino);
        w.delete_range(self.xattrs, &from, &to)?;
        Ok(())
    }

    fn xattr_names_in(&self, r: &impl Read, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let (from, to) = range(ino);
        let mut names = Vec::new();
        r.visit(self.xattrs, &from, &to, |k, _| {
            names.push(k[8..].to_vec());
            true
        })?;
        Ok(names)
    }

    /// The value of attribute `name` of `ino` (ENODATA if none).
    pub fn get_xattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        validate_name(name)?;
        self.db.read(|r| {
            Self::inode(r, self.inodes, ino)?;
            r.get(self.xattrs, &key(ino, name))?.map(<[u8]>::to_vec).ok_or(FsError::NoData)
        })
    }

    /// The names of `ino`'s attributes, in byte order.
    pub fn list_xattrs(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        self.db.read(|r| {
            Self::inode(r, self.inodes, ino)?;
            self.xattr_names_in(r, ino)
        })
    }

    /// `a`, saying whether its inode has extended attributes (see [`Attr::xattrs`]).
    pub fn noting_xattrs_of(&self, mut a: Attr) -> FsResult<Attr> {
        self.noting_xattrs([&mut a])?;
        Ok(a)
    }

    /// `attrs`, each saying whether its inode has extended attributes (see [`Attr::xattrs`]).
    pub fn noting_xattrs<'a>(&self, attrs: impl IntoIterator<Item = &'a mut Attr>) -> FsResult<()> {
        self.db.read(|r| {
            for a in attrs {
                let (from, to) = range(a.ino);
                a.xattrs = Some(!r.scan_keys(self.xattrs, &from, &to, 1)?.is_empty());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metaserver::namespace::Change;
    use crate::shared::{Kind, NewNode, ROOT};

    #[test]
    fn attributes_go_with_their_inode_and_travel_in_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let n = Namespace::open(d.path(), Some(8), Some(3)).unwrap();
        let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
        let f = n.mknod(ROOT, b"f", &node).unwrap();
        let g = n.mknod(ROOT, b"g", &node).unwrap();
        let set = |ino, name: &[u8], value: &[u8], flags| {
            n.apply(&Change::SetXattr { ino, name: name.to_vec(), value: value.to_vec(), flags })
        };
        set(f.ino, b"user.a", b"1", 0).unwrap();
        set(f.ino, b"user.b", b"2", 0).unwrap();
        set(g.ino, b"user.a", b"3", 0).unwrap();
        assert_eq!(n.getattr(f.ino).unwrap().version, f.version + 2, "each set is a change of the inode");
        assert_eq!(set(f.ino, b"user.a", b"x", XATTR_CREATE), Err(FsError::Exists));
        assert_eq!(set(f.ino, b"user.c", b"x", XATTR_REPLACE), Err(FsError::NoData));
        // Both at once, as on Linux (this answered EINVAL before).
        assert_eq!(set(f.ino, b"user.a", b"x", XATTR_CREATE | XATTR_REPLACE), Err(FsError::Exists));
        assert_eq!(set(f.ino, b"user.c", b"x", XATTR_CREATE | XATTR_REPLACE), Err(FsError::NoData));
        assert!(matches!(set(f.ino, b"system.posix_acl_access", b"x", 0), Err(FsError::NotSupported(_))));
        assert_eq!(n.list_xattrs(f.ino).unwrap(), vec![b"user.a".to_vec(), b"user.b".to_vec()]);

        // A snapshot of the store carries them to another.
        let dump = n.dump().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let n2 = Namespace::open(d2.path(), Some(8), Some(3)).unwrap();
        n2.db.write(|w| n2.restore_in(w, &dump.bytes)).unwrap();
        assert_eq!(n2.get_xattr(g.ino, b"user.a").unwrap(), b"3");

        // Unlinked and purged, the file's attributes go; the other file keeps its own.
        let orphan = n.unlink(ROOT, b"f").unwrap();
        n.purge(&[orphan]).unwrap();
        let (from, to) = range(f.ino);
        assert_eq!(n.db.read(|r| r.scan(n.xattrs, &from, &to, 10)).unwrap(), vec![]);
        assert_eq!(n.get_xattr(g.ino, b"user.a").unwrap(), b"3");
    }
}
