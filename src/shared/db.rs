//! The one adapter over LMDB (heed). Stores see named tables of byte keys and values, and run
//! closures in read or write transactions. A write transaction commits durably (LMDB's default
//! synchronous commit) before `write` returns, or not at all: a closure that returns an error aborts
//! it, so nothing is half-changed.

use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the store is full (LMDB map size reached)")]
    Full,
    /// The disk under the store has no room for the commit; nothing of it was kept.
    #[error("no space left on the store's disk")]
    NoSpace,
    #[error("storage error: {0}")]
    Other(String),
}

impl From<heed::Error> for DbError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => DbError::Full,
            heed::Error::Mdb(heed::MdbError::Other(libc::ENOSPC)) => DbError::NoSpace,
            heed::Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => DbError::NoSpace,
            e => DbError::Other(e.to_string()),
        }
    }
}

/// A table handle (cheap to copy).
#[derive(Clone, Copy)]
pub struct Table(Database<'static, Bytes, Bytes>);

/// How durable a commit is once it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On disk: LMDB syncs the data, then the meta page (two syncs).
    Full,
    /// One sync: the data is on disk, the meta page that makes it current is not yet, so a power
    /// failure may undo the last commit (never half of one; kill -9 undoes nothing). For stores
    /// that can redo their last commits from elsewhere (a Raft member's state machine, from its log).
    LastMayUndo,
}

pub struct Db {
    env: Env<WithoutTls>,
    tables: Vec<Table>,
}

/// Address space reserved for the map, at least; the file grows only as data is written.
const MAP_SIZE: usize = 256 << 30;

/// The map size for a store on a disk of `disk` bytes: never less than the disk, so that the map
/// can never fill before the disk does.
fn map_size(disk: u64) -> usize {
    let disk = usize::try_from(disk).unwrap_or(usize::MAX / 2);
    MAP_SIZE.max(disk.next_multiple_of(1 << 20))
}

impl Db {
    /// Opens (creating if needed) the environment in `dir` and the named tables.
    pub fn open<const N: usize>(dir: &Path, tables: [&str; N]) -> Result<(Db, [Table; N]), DbError> {
        Self::open_with(dir, tables, Durability::Full)
    }

    /// [`Db::open`] with the given durability of commits.
    pub fn open_with<const N: usize>(
        dir: &Path,
        tables: [&str; N],
        durability: Durability,
    ) -> Result<(Db, [Table; N]), DbError> {
        std::fs::create_dir_all(dir).map_err(|e| DbError::Other(format!("{}: {e}", dir.display())))?;
        // SAFETY: heed's contract for `open` is that the same environment is not opened twice in
        // one process and the file is not modified by other means; every server opens its own dir once.
        let env = unsafe {
            // Not MDB_WRITEMAP: measured slower here, as each commit then msyncs the whole map
            // (README, "Performance").
            let mut o = EnvOpenOptions::new().read_txn_without_tls();
            if durability == Durability::LastMayUndo {
                // SAFETY: NO_META_SYNC keeps LMDB's integrity (the data is synced before the meta
                // page is written); it only defers that page's sync, which is the point.
                o.flags(EnvFlags::NO_META_SYNC);
            }
            let disk = nix::sys::statvfs::statvfs(dir).map_or(0, |v| v.blocks() * v.fragment_size());
            o.map_size(map_size(disk)).max_dbs(16).max_readers(1024).open(dir)?
        };
        let wtxn = env.write_txn()?;
        let dbs = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                let mut dbs = Vec::with_capacity(N);
                for name in tables {
                    dbs.push(opener.create_database::<Bytes, Bytes>(wtxn, Some(name))?);
                }
                let dbs: [_; N] = dbs.try_into().map_err(|_| DbError::Other("table count".into()))?;
                Ok::<_, DbError>(CommitOrAbort::<_, ()>::Commit(dbs))
            })?
            .unwrap_commit();
        let tables = dbs.map(Table);
        Ok((Db { env, tables: tables.to_vec() }, tables))
    }

    pub fn read<T, E: From<DbError>>(&self, f: impl FnOnce(&Reader) -> Result<T, E>) -> Result<T, E> {
        let txn = self.env.read_txn().map_err(DbError::from)?;
        f(&Reader(txn))
    }

    /// Runs `f` in a write transaction and commits it durably if `f` succeeds.
    pub fn write<T, E: From<DbError>>(&self, f: impl FnOnce(&mut Writer) -> Result<T, E>) -> Result<T, E> {
        let txn = self.env.write_txn().map_err(DbError::from)?;
        let mut w = Writer { txn, env: &self.env };
        let out = f(&mut w)?;
        w.txn.commit().map_err(DbError::from)?;
        Ok(out)
    }

    /// Bytes the store occupies on disk.
    pub fn disk_size(&self) -> u64 {
        self.env.real_disk_size().unwrap_or(0)
    }

    /// The store's data file (LMDB's `data.mdb`).
    fn data_file(&self) -> std::path::PathBuf {
        self.env.path().join("data.mdb")
    }

    /// Keeps `bytes` of disk allocated past the end of the store's file, so that a commit that
    /// must grow the file (a delete on a full disk, or the first write after one: LMDB reuses the
    /// pages a commit freed only from the commit after next) finds them there. Allocates only
    /// what is missing; fails when the disk has no room for it.
    pub fn keep_tail(&self, bytes: u64) -> std::io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let f = std::fs::OpenOptions::new().write(true).open(self.data_file())?;
        let size = f.metadata()?.len();
        let (Ok(from), Ok(len)) = (i64::try_from(size), i64::try_from(bytes)) else {
            return Err(std::io::Error::other("file offset out of range"));
        };
        fallocate(&f, FallocateFlags::FALLOC_FL_KEEP_SIZE, from, len).map_err(std::io::Error::from)
    }

    /// Bytes allocated past the end of the store's file (see [`Db::keep_tail`]).
    pub fn tail(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.data_file()).map_or(0, |m| (m.blocks() * 512).saturating_sub(m.len()))
    }

    /// Bytes of the store's file that hold no data (pages freed by deletes, reused by later
    /// writes before the file grows).
    pub fn free_inside(&self) -> Result<u64, DbError> {
        let txn = self.env.read_txn()?;
        let mut used = 0u64;
        for t in &self.tables {
            let st = t.0.stat(&txn)?;
            used += ((st.branch_pages + st.leaf_pages + st.overflow_pages) as u64 + 1) * u64::from(st.page_size);
        }
        // The two meta pages and the catalogue of tables.
        used += 4 * 4096;
        Ok(self.disk_size().saturating_sub(used))
    }
}

/// A key and its value, copied out of the transaction.
pub type Entry = (Vec<u8>, Vec<u8>);

pub struct Reader<'e>(RoTxn<'e, WithoutTls>);
pub struct Writer<'e> {
    txn: RwTxn<'e>,
    env: &'e Env<WithoutTls>,
}

/// Reads, available in both kinds of transaction.
pub trait Read {
    fn txn(&self) -> &RoTxn<'_>;

    fn get(&self, t: Table, key: &[u8]) -> Result<Option<&[u8]>, DbError> {
        Ok(t.0.get(self.txn(), key)?)
    }

    /// Entries with `from <= key < to`, in key order, at most `limit` of them.
    fn scan(&self, t: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>, DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        let mut out = Vec::new();
        for item in t.0.range(self.txn(), &range)?.take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Visits entries with `from <= key < to` in key order, borrowed from the map (no copies),
    /// until `f` returns false.
    fn visit(&self, t: Table, from: &[u8], to: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) -> Result<(), DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        for item in t.0.range(self.txn(), &range)? {
            let (k, v) = item?;
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    /// Keys only, as `scan`.
    fn scan_keys(&self, t: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        let mut out = Vec::new();
        for item in t.0.lazily_decode_data().range(self.txn(), &range)?.take(limit) {
            out.push(item?.0.to_vec());
        }
        Ok(out)
    }

    /// Every entry of a table, in key order.
    fn all(&self, t: Table) -> Result<Vec<Entry>, DbError> {
        let mut out = Vec::new();
        for item in t.0.iter(self.txn())? {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The entry with the greatest key.
    fn last(&self, t: Table) -> Result<Option<Entry>, DbError> {
        Ok(t.0.last(self.txn())?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn len(&self, t: Table) -> Result<u64, DbError> {
        Ok(t.0.len(self.txn())?)
    }
}

impl Read for Reader<'_> {
    fn txn(&self) -> &RoTxn<'_> {
        &self.0
    }
}

impl Read for Writer<'_> {
    fn txn(&self) -> &RoTxn<'_> {
        &self.txn
    }
}

impl Writer<'_> {
    pub fn put(&mut self, t: Table, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        Ok(t.0.put(&mut self.txn, key, value)?)
    }

    pub fn delete(&mut self, t: Table, key: &[u8]) -> Result<bool, DbError> {
        Ok(t.0.delete(&mut self.txn, key)?)
    }

    /// Deletes every entry with `from <= key < to`; returns how many.
    pub fn delete_range(&mut self, t: Table, from: &[u8], to: &[u8]) -> Result<u64, DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        Ok(t.0.delete_range(&mut self.txn, &range)? as u64)
    }

    /// Empties a table.
    pub fn clear(&mut self, t: Table) -> Result<(), DbError> {
        Ok(t.0.clear(&mut self.txn)?)
    }

    /// Runs `f` in a transaction nested in this one: its changes become part of this one if `f`
    /// succeeds, and are undone (while this one goes on) if it fails.
    pub fn nested<T, E: From<DbError>>(&mut self, f: impl FnOnce(&mut Writer) -> Result<T, E>) -> Result<T, E> {
        let env = self.env;
        let txn = env.nested_write_txn(&mut self.txn).map_err(DbError::from)?;
        let mut inner = Writer { txn, env };
        match f(&mut inner) {
            Ok(v) => {
                inner.txn.commit().map_err(DbError::from)?;
                Ok(v)
            }
            Err(e) => {
                inner.txn.abort();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_nested_transaction_is_undone_and_the_outer_one_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, [t]) = Db::open(dir.path(), ["t"]).expect("open");
        db.write(|w| {
            w.put(t, b"outer", b"1")?;
            let r: Result<(), DbError> = w.nested(|n| {
                n.put(t, b"inner-failed", b"x")?;
                Err(DbError::Other("refused".into()))
            });
            assert!(r.is_err());
            w.nested(|n| n.put(t, b"inner-ok", b"2"))?;
            Ok::<_, DbError>(())
        })
        .expect("write");
        db.read(|r| {
            assert_eq!(r.get(t, b"outer")?, Some(&b"1"[..]));
            assert_eq!(r.get(t, b"inner-ok")?, Some(&b"2"[..]));
            assert_eq!(r.get(t, b"inner-failed")?, None);
            Ok::<_, DbError>(())
        })
        .expect("read");
    }
}
