//! The one adapter over LMDB (heed). Stores see named tables of byte keys and values, and run
//! closures in read or write transactions. A write transaction commits durably (LMDB's default
//! synchronous commit) before `write` returns, or not at all: a closure that returns an error aborts
//! it, so nothing is half-changed. A store that can redo its recent commits from a log of its own
//! may instead commit without syncing and make checkpoints (see [`Durability::Checkpointed`]).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

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
    /// No sync at all when a commit returns: a crash, of the process or of the machine, takes the
    /// store back to its last [`Db::checkpoint`], whole. For stores whose every change since can
    /// be redone from a durable log of their own (a Raft member's state machine).
    ///
    /// How: LMDB never overwrites a page that an open read transaction can see, so a read
    /// transaction held from one checkpoint to the next keeps every page of the checkpointed
    /// state as it was synced; the checkpoint also copies LMDB's two meta pages (which say where
    /// the current state's tree is) to a file. Opening the store writes that copy back over the
    /// meta pages first, so commits made after the checkpoint, synced or torn, are simply unused
    /// pages.
    Checkpointed,
}

pub struct Db {
    env: Env<WithoutTls>,
    tables: Vec<Table>,
    /// With [`Durability::Checkpointed`]: a read transaction no newer than the last checkpoint,
    /// which keeps LMDB from reusing its pages (see there).
    pinned: Option<Mutex<Option<RoTxn<'static, WithoutTls>>>>,
    /// The last transaction the last checkpoint holds.
    checkpointed: std::sync::atomic::AtomicUsize,
    /// The checkpoint file once this process has made it whole (or found it whole at open), and
    /// the sequence of its newest slot.
    checkpoint_file: Mutex<Option<(std::fs::File, u64)>>,
    /// A checkpoint's sync of the store failed. The kernel reports a failed write-back to one sync
    /// only and may mark the pages it could not write clean, so a later sync that succeeds says
    /// nothing of them: no checkpoint is taken after it (and nothing is dropped behind one) until
    /// the store is opened again, from the checkpoint before.
    tainted: std::sync::atomic::AtomicBool,
    /// Makes the next checkpoint's sync fail (tests).
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
    /// Makes the next write fail, before it changes anything (tests).
    #[cfg(test)]
    pub fail_next_write: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The copy of the meta pages a checkpoint makes, in the store's directory: two slots of the same
/// size, written in turn in place (an overwrite of bytes already on disk costs one `fdatasync`, 62-82
/// us here, where writing a new file and renaming it over the old costs a sync of each and of the
/// directory), so a write torn by a crash leaves the other slot whole. A slot: [`SLOT_MAGIC`],
/// sequence (8, LE), length of the copy (4, LE), CRC-32 of the sequence and the copy (4, LE), the
/// copy, and zeros up to a multiple of [`SECTOR`]: a disk writes whole sectors, and a write of one
/// slot torn in a sector the other slot shares would take both. A file of slots without the
/// zeros, or of just the copy (both as made before), is read too; the next checkpoint makes it
/// anew.
const CHECKPOINT: &str = "checkpoint";
const SLOT_MAGIC: &[u8; 8] = b"dfsckpt1";
const SLOT_HEADER: usize = 24;
/// LMDB's two meta pages are at most two of its largest pages.
const MAX_META: usize = 2 * 65536;
/// The largest unit a disk writes whole (4 KiB sectors; 512-byte ones divide it).
const SECTOR: usize = 4096;

/// The length of a slot holding a copy of `meta` bytes.
fn slot_len(meta: usize) -> usize {
    (SLOT_HEADER + meta).next_multiple_of(SECTOR)
}

fn slot_crc(seq: u64, meta: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(meta);
    h.finalize()
}

fn slot(seq: u64, meta: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(slot_len(meta.len()));
    s.extend_from_slice(SLOT_MAGIC);
    s.extend_from_slice(&seq.to_le_bytes());
    s.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    s.extend_from_slice(&slot_crc(seq, meta).to_le_bytes());
    s.extend_from_slice(meta);
    s.resize(slot_len(meta.len()), 0);
    s
}

/// The newest whole copy in a checkpoint file's bytes, and its sequence (0 for a file of just the
/// copy); `None` if there is none.
fn newest_copy(file: &[u8]) -> Option<(u64, &[u8])> {
    // Two pages of a size LMDB can have (4 to 64 KiB); a file with slots is never that long. Told
    // by its length, not by slot 0's magic, which a torn write of slot 0 may have damaged while
    // slot 1 is whole.
    if file.len().is_power_of_two() && !file.starts_with(SLOT_MAGIC) {
        return (2 * 4096..=MAX_META).contains(&file.len()).then_some((0, file));
    }
    file.chunks_exact((file.len() / 2).max(1))
        .filter_map(|s| {
            let (head, rest) = s.split_at_checked(SLOT_HEADER)?;
            let seq = u64::from_le_bytes(head[8..16].try_into().ok()?);
            let len = u32::from_le_bytes(head[16..20].try_into().ok()?) as usize;
            let crc = u32::from_le_bytes(head[20..24].try_into().ok()?);
            // The copy, then zeros to the end of the slot (none in a slot made before they were).
            let meta = rest.get(..len)?;
            let ok = head.starts_with(SLOT_MAGIC) && crc == slot_crc(seq, meta);
            ok.then_some((seq, meta))
        })
        .max_by_key(|&(seq, _)| seq)
}

/// A checkpoint file's bytes, each slot read on its own: a slot whose sectors a torn write left
/// unreadable (EIO) reads as zeros, which no slot check passes, and the other slot still counts.
fn read_checkpoint_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let len = usize::try_from(f.metadata()?.len()).unwrap_or(usize::MAX);
    if len > 2 * slot_len(MAX_META) {
        return Err(std::io::Error::other(format!("{len} bytes: too long for a checkpoint")));
    }
    let mut bytes = vec![0u8; len];
    if len < 2 || len.is_power_of_two() {
        f.read_exact_at(&mut bytes, 0)?;
        return Ok(bytes);
    }
    let half = len / 2;
    for (i, slot) in bytes.chunks_mut(half).enumerate() {
        if let Err(e) = f.read_exact_at(slot, (i * half) as u64) {
            tracing::warn!("{}: slot {i} unreadable: {e}", path.display());
            slot.fill(0);
        }
    }
    Ok(bytes)
}

/// Writes the last checkpoint's meta pages back over the store's, so that it opens as of then.
/// Returns the checkpoint file if it has slots, with its newest slot's sequence: the next
/// checkpoint writes it in place as before, for a new file needs room and a store on a full disk
/// must still open. It is synced first, so that the slot overwritten next (the other) is not the
/// only one on the disk (the newest may have been written and not synced when the last process
/// ended).
fn restore_checkpoint(dir: &Path) -> Result<Option<(std::fs::File, u64)>, DbError> {
    let io = |e: std::io::Error| DbError::Other(format!("restoring the checkpoint in {}: {e}", dir.display()));
    let copy = dir.join(CHECKPOINT);
    let data = dir.join("data.mdb");
    let file = match read_checkpoint_file(&copy) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if !data.exists() {
        // The store was removed (a wiped disk): its checkpoint goes with it.
        return std::fs::remove_file(&copy).map(|()| None).map_err(io);
    }
    let Some((seq, meta)) = newest_copy(&file) else {
        return Err(DbError::Other(format!("{}: no whole checkpoint in its {} bytes", copy.display(), file.len())));
    };
    let f = std::fs::OpenOptions::new().write(true).open(&data).map_err(io)?;
    f.write_all_at(meta, 0).map_err(io)?;
    f.sync_data().map_err(io)?;
    if seq == 0 {
        return Ok(None); // a copy from before slots: the first checkpoint makes the file anew
    }
    let slots = std::fs::OpenOptions::new().read(true).write(true).open(&copy).map_err(io)?;
    slots.sync_data().map_err(io)?;
    Ok(Some((slots, seq)))
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
        Self::open_reading_around(dir, tables, durability, true)
    }

    /// [`Db::open_with`]; without `read_around`, a fault on a page of the map that is not in
    /// memory reads that page alone (LMDB's `MDB_NORDAHEAD`), and the store's reads say what
    /// else to read (`dataserver::readahead`).
    pub fn open_reading_around<const N: usize>(
        dir: &Path,
        tables: [&str; N],
        durability: Durability,
        read_around: bool,
    ) -> Result<(Db, [Table; N]), DbError> {
        std::fs::create_dir_all(dir).map_err(|e| DbError::Other(format!("{}: {e}", dir.display())))?;
        let slots = if durability == Durability::Checkpointed { restore_checkpoint(dir)? } else { None };
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
            if durability == Durability::Checkpointed {
                // SAFETY: the store is consistent as of its last checkpoint whatever becomes of the
                // commits after it (see `Durability::Checkpointed`).
                o.flags(EnvFlags::NO_SYNC);
            }
            if !read_around {
                // SAFETY: only how the map is advised to the kernel (MADV_RANDOM).
                o.flags(EnvFlags::NO_READ_AHEAD);
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
        let pinned = (durability == Durability::Checkpointed).then(|| Mutex::new(None));
        let db = Db {
            env,
            tables: tables.to_vec(),
            pinned,
            checkpointed: Default::default(),
            checkpoint_file: Mutex::new(slots),
            tainted: Default::default(),
            #[cfg(test)]
            fail_next_sync: Default::default(),
            #[cfg(test)]
            fail_next_write: Default::default(),
        };
        db.checkpoint()?;
        Ok((db, tables))
    }

    /// Syncs the store's file.
    fn force_sync(&self) -> Result<(), DbError> {
        #[cfg(test)]
        if self.fail_next_sync.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Err(DbError::Other("a sync failed (made to, by a test)".into()));
        }
        Ok(self.env.force_sync()?)
    }

    pub fn read<T, E: From<DbError>>(&self, f: impl FnOnce(&Reader) -> Result<T, E>) -> Result<T, E> {
        let txn = self.env.read_txn().map_err(DbError::from)?;
        f(&Reader(&txn))
    }

    /// With [`Durability::Checkpointed`]: makes every commit so far durable, and the state they
    /// reached the one the store opens with after a crash. Otherwise nothing to do.
    pub fn checkpoint(&self) -> Result<(), DbError> {
        let Some(pinned) = &self.pinned else { return Ok(()) };
        let io = |e: std::io::Error| DbError::Other(format!("checkpoint: {e}"));
        if self.tainted.load(std::sync::atomic::Ordering::Acquire) {
            return Err(DbError::Other(
                "checkpoint: a sync of the store failed before; none is taken until it is opened again".into(),
            ));
        }
        let mut held = pinned.lock().unwrap_or_else(|p| p.into_inner());
        // A write transaction holds off commits while the meta pages are copied, so the copy is of
        // the last commit's state.
        let wtxn = self.env.write_txn()?;
        // The pin is that state too: taken under the write transaction (which reads without
        // thread-local slots allow), not before it, where a long write committing in between (a
        // snapshot's install) left the pin, and what `read_checkpointed` answers, a state behind
        // the copy. It keeps the state's pages (LMDB reuses only pages freed after the oldest
        // reader's snapshot).
        let pin = self.env.clone().static_read_txn()?;
        let last = self.env.info().last_txn_id;
        if held.is_some() && last == self.checkpointed.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(()); // nothing committed since
        }
        let page = self.tables.first().map_or(Ok(4096), |t| t.0.stat(&wtxn).map(|s| s.page_size))?;
        let mut meta = vec![0u8; 2 * page as usize];
        std::fs::File::open(self.data_file()).and_then(|f| f.read_exact_at(&mut meta, 0)).map_err(io)?;
        wtxn.abort();
        // Commits go on while the state is synced: that state's pages were all written before its
        // commit returned, so the sync covers them, and the pin keeps later commits off them. One
        // checkpoint then covers the commits made during the one before it (group commit).
        if let Err(e) = self.force_sync() {
            self.tainted.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        let mut file = self.checkpoint_file.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            Some((f, seq)) if f.metadata().map_err(io)?.len() == 2 * slot_len(meta.len()) as u64 => {
                let next = *seq + 1;
                let at = (next % 2) * slot_len(meta.len()) as u64;
                let written = f.write_all_at(&slot(next, &meta), at).and_then(|()| f.sync_data());
                if let Err(e) = written {
                    // The slot may be torn, and the other holds the checkpoint still in force: the
                    // next checkpoint must not overwrite that one, so it makes the file anew.
                    *file = None;
                    return Err(io(e));
                }
                *seq = next;
            }
            _ => {
                // A store whose copy has no slots yet (new, or kept before slots), whose slots
                // are not whole sectors (made before they were), or after a slot write that
                // failed: a new file, made whole before it replaces the old.
                let seq = read_checkpoint_file(&self.env.path().join(CHECKPOINT))
                    .ok()
                    .and_then(|b| newest_copy(&b).map(|(seq, _)| seq))
                    .unwrap_or(0)
                    + 1;
                let dir = self.env.path();
                let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                // Slot `s % 2` holds sequence `s`, so the next checkpoint overwrites the older.
                let (newer, older) = (slot(seq, &meta), slot(seq - 1, &meta));
                let both = if seq.is_multiple_of(2) { [newer, older] } else { [older, newer] }.concat();
                std::io::Write::write_all(&mut f, &both).map_err(io)?;
                f.sync_all().map_err(io)?;
                std::fs::rename(&tmp, dir.join(CHECKPOINT)).map_err(io)?;
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join(CHECKPOINT)).map_err(io)?;
                *file = Some((f, seq));
            }
        }
        // Only now may the pages of the previous checkpoint be reused.
        *held = Some(pin);
        self.checkpointed.store(last, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Reads the store as of its last checkpoint (or now, for a store without checkpoints): what
    /// a crash could not take back.
    pub fn read_checkpointed<T, E: From<DbError>>(&self, f: impl FnOnce(&Reader) -> Result<T, E>) -> Result<T, E> {
        let Some(pinned) = &self.pinned else { return self.read(f) };
        let held = pinned.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_ref() {
            Some(txn) => f(&Reader(txn)),
            None => Err(DbError::Other("no checkpoint yet".into()).into()),
        }
    }

    /// Runs `f` in a write transaction and commits it durably if `f` succeeds.
    pub fn write<T, E: From<DbError>>(&self, f: impl FnOnce(&mut Writer) -> Result<T, E>) -> Result<T, E> {
        #[cfg(test)]
        if self.fail_next_write.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Err(DbError::Other("a write failed (made to, by a test)".into()).into());
        }
        let txn = self.env.write_txn().map_err(DbError::from)?;
        let mut w = Writer { txn, env: &self.env, failed: Default::default() };
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

pub struct Reader<'t>(&'t RoTxn<'t, WithoutTls>);
pub struct Writer<'e> {
    txn: RwTxn<'e>,
    env: &'e Env<WithoutTls>,
    /// A call of this transaction failed in the store itself (see [`Writer::store_failed`]).
    failed: std::cell::Cell<bool>,
}

/// Reads, available in both kinds of transaction.
pub trait Read {
    fn txn(&self) -> &RoTxn<'_>;

    /// Notes a failure of the store (a writer remembers it); returns it.
    fn fail(&self, e: DbError) -> DbError {
        e
    }

    /// `r`, an LMDB call's result, its failure noted (see [`Read::fail`]).
    fn store<T>(&self, r: heed::Result<T>) -> Result<T, DbError> {
        r.map_err(|e| self.fail(e.into()))
    }

    fn get(&self, t: Table, key: &[u8]) -> Result<Option<&[u8]>, DbError> {
        self.store(t.0.get(self.txn(), key))
    }

    /// Entries with `from <= key < to`, in key order, at most `limit` of them.
    fn scan(&self, t: Table, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Entry>, DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        let mut out = Vec::new();
        for item in self.store(t.0.range(self.txn(), &range))?.take(limit) {
            let (k, v) = self.store(item)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Visits entries with `from <= key < to` in key order, borrowed from the map (no copies),
    /// until `f` returns false.
    fn visit(&self, t: Table, from: &[u8], to: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> bool) -> Result<(), DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        for item in self.store(t.0.range(self.txn(), &range))? {
            let (k, v) = self.store(item)?;
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
        for item in self.store(t.0.lazily_decode_data().range(self.txn(), &range))?.take(limit) {
            out.push(self.store(item)?.0.to_vec());
        }
        Ok(out)
    }

    /// Every entry of a table, in key order.
    fn all(&self, t: Table) -> Result<Vec<Entry>, DbError> {
        let mut out = Vec::new();
        for item in self.store(t.0.iter(self.txn()))? {
            let (k, v) = self.store(item)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The entry with the greatest key.
    fn last(&self, t: Table) -> Result<Option<Entry>, DbError> {
        Ok(self.store(t.0.last(self.txn()))?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn len(&self, t: Table) -> Result<u64, DbError> {
        self.store(t.0.len(self.txn()))
    }
}

impl Read for Reader<'_> {
    fn txn(&self) -> &RoTxn<'_> {
        self.0
    }
}

impl Read for Writer<'_> {
    fn txn(&self) -> &RoTxn<'_> {
        &self.txn
    }

    fn fail(&self, e: DbError) -> DbError {
        self.failed.set(true);
        e
    }
}

impl Writer<'_> {
    pub fn put(&mut self, t: Table, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let r = t.0.put(&mut self.txn, key, value);
        self.store(r)
    }

    /// Stores the concatenation of `parts` as one value, each part written straight into the map
    /// (LMDB's reserve): a large value is not first assembled in a buffer of its own.
    pub fn put_parts(&mut self, t: Table, key: &[u8], parts: &[&[u8]]) -> Result<(), DbError> {
        use std::io::Write;
        let len = parts.iter().map(|p| p.len()).sum();
        let r = t.0.put_reserved(&mut self.txn, key, len, |r| parts.iter().try_for_each(|p| r.write_all(p)));
        self.store(r)
    }

    pub fn delete(&mut self, t: Table, key: &[u8]) -> Result<bool, DbError> {
        let r = t.0.delete(&mut self.txn, key);
        self.store(r)
    }

    /// Deletes every entry with `from <= key < to`; returns how many.
    pub fn delete_range(&mut self, t: Table, from: &[u8], to: &[u8]) -> Result<u64, DbError> {
        let range = (std::ops::Bound::Included(from), std::ops::Bound::Excluded(to));
        let r = t.0.delete_range(&mut self.txn, &range);
        Ok(self.store(r)? as u64)
    }

    /// Empties a table.
    pub fn clear(&mut self, t: Table) -> Result<(), DbError> {
        let r = t.0.clear(&mut self.txn);
        self.store(r)
    }

    /// Runs `f` in a transaction nested in this one: its changes become part of this one if `f`
    /// succeeds, and are undone (while this one goes on) if it fails.
    pub fn nested<T, E: From<DbError>>(&mut self, f: impl FnOnce(&mut Writer) -> Result<T, E>) -> Result<T, E> {
        let env = self.env;
        let txn = env.nested_write_txn(&mut self.txn).map_err(DbError::from)?;
        let mut inner = Writer { txn, env, failed: Default::default() };
        let r = match f(&mut inner) {
            Ok(v) => match inner.txn.commit() {
                Ok(()) => Ok(v),
                Err(e) => {
                    inner.failed.set(true);
                    Err(DbError::from(e).into())
                }
            },
            Err(e) => {
                inner.txn.abort();
                Err(e)
            }
        };
        if inner.failed.get() {
            self.failed.set(true);
        }
        r
    }

    /// Whether a call of this transaction (or of one nested in it) failed in the store itself: a
    /// read or write LMDB refused, not an error of the caller's. A nested change that fails that
    /// way failed on this disk only, and must not be taken for the change's answer.
    pub fn store_failed(&self) -> bool {
        self.failed.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(round: u32, key: u32) -> Vec<u8> {
        format!("round {round} key {key} ").repeat(8).into_bytes()
    }

    /// Writes 500 keys in round `round`, in 20 commits.
    fn write_round(db: &Db, t: Table, round: u32) {
        for chunk in 0..20u32 {
            db.write(|w| {
                for k in chunk * 25..(chunk + 1) * 25 {
                    w.put(t, &k.to_be_bytes(), &value(round, k))?;
                }
                Ok::<_, DbError>(())
            })
            .expect("write");
        }
    }

    fn assert_round(db: &Db, t: Table, round: u32) {
        db.read(|r| {
            assert_eq!(r.len(t)?, 500);
            for k in 0..500u32 {
                assert_eq!(r.get(t, &k.to_be_bytes())?, Some(value(round, k).as_slice()), "key {k}");
            }
            Ok::<_, DbError>(())
        })
        .expect("read");
    }

    /// A nested transaction's error is the caller's, unless the store itself refused a call in
    /// it: a change's answer must not be a failure of one disk.
    #[test]
    fn a_store_failure_in_a_nested_transaction_is_told_from_the_callers_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
        db.write(|w| {
            let refused: Result<(), DbError> = w.nested(|_| Err(DbError::Other("refused by the caller".into())));
            assert!(refused.is_err() && !w.store_failed());
            let ok = w.nested(|n| n.put(t, b"k", b"v"));
            assert!(ok.is_ok() && !w.store_failed());
            // LMDB refuses an empty key.
            let failed = w.nested(|n| n.get(t, b"").map(|_| ()));
            assert!(failed.is_err() && w.store_failed());
            Ok::<_, DbError>(())
        })
        .expect("write");
    }

    /// A store whose disk filled up opens again: its first checkpoint writes the checkpoint
    /// file's slots in place, where a new file would need room.
    #[test]
    fn a_store_on_a_full_disk_opens_again() {
        let base = tempfile::tempdir().expect("temp dir");
        let Some(_disk) = crate::shared::tmpfs::Tmpfs::mount(base.path(), 8 << 20) else { return };
        let dir = base.path().join("db");
        {
            let (db, [t]) = Db::open_with(&dir, ["t"], Durability::Checkpointed).expect("open");
            write_round(&db, t, 1);
            db.checkpoint().expect("checkpoint");
        }
        let mut fill = std::fs::File::create(base.path().join("fill")).expect("filler");
        while std::io::Write::write_all(&mut fill, &[1u8; 64 << 10]).is_ok() {}
        let (db, [t]) = Db::open_with(&dir, ["t"], Durability::Checkpointed).expect("reopen on a full disk");
        assert_round(&db, t, 1);
        db.checkpoint().expect("a checkpoint on a full disk");
    }

    /// A checkpoint waiting for a long write (a snapshot's install) is of the state that write
    /// left, and so is what it answers as checkpointed.
    #[test]
    fn a_checkpoint_after_a_long_write_reads_as_what_it_copied() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
        let db = std::sync::Arc::new(db);
        let (writing, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || {
                db.write(|w| {
                    w.put(t, b"k", b"installed")?;
                    writing.0.send(()).expect("send");
                    go.1.recv().expect("go");
                    Ok::<_, DbError>(())
                })
                .expect("long write")
            })
        };
        writing.1.recv().expect("the write began");
        let checkpointer = {
            let db = db.clone();
            std::thread::spawn(move || db.checkpoint().expect("checkpoint"))
        };
        // Let the checkpoint reach its wait for the write lock, then let the write commit.
        std::thread::sleep(std::time::Duration::from_millis(200));
        go.0.send(()).expect("go");
        writer.join().expect("writer");
        checkpointer.join().expect("checkpointer");
        let got = db.read_checkpointed(|r| Ok::<_, DbError>(r.get(t, b"k")?.map(|v| v.to_vec()))).expect("read");
        assert_eq!(got.as_deref(), Some(&b"installed"[..]));
    }

    /// After a crash a checkpointed store opens as of its last checkpoint, even though the commits
    /// after it rewrote every key many times over (LMDB would reuse the checkpoint's pages for them
    /// if it were not held) and even if they reached the disk torn.
    #[test]
    fn a_checkpointed_store_reopens_as_of_its_last_checkpoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data.mdb");
        let last_page;
        {
            let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
            write_round(&db, t, 1);
            db.checkpoint().expect("checkpoint");
            write_round(&db, t, 2);
            db.checkpoint().expect("checkpoint");
            last_page = db.env.info().last_page_number;
            for round in 3..8 {
                write_round(&db, t, round);
            }
            assert_round(&db, t, 7);
        }
        // What a power loss could leave of the commits after the checkpoint: garbage in pages the
        // file gained since, and in the meta pages.
        let f = std::fs::OpenOptions::new().write(true).open(&data).expect("data file");
        let len = f.metadata().expect("size").len();
        let from = (last_page as u64 + 1) * 4096;
        if len > from {
            f.write_all_at(&vec![0xa5; (len - from) as usize], from).expect("garbage");
        }
        f.write_all_at(&[0x5a; 8192], 0).expect("garbage meta");
        drop(f);
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 2);
        // And it goes on from there.
        write_round(&db, t, 9);
        db.checkpoint().expect("checkpoint");
        drop(db);
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 9);
    }

    /// Regression: after a checkpoint's sync failed, the next checkpoint synced again, succeeded
    /// (the kernel reports a failed write-back once) and was trusted, though pages of the state it
    /// recorded may never have reached the disk; what a crash returns to must be the checkpoint
    /// before, so none is taken after a failed sync until the store is opened again.
    #[test]
    fn no_checkpoint_is_taken_after_a_failed_sync() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
            write_round(&db, t, 1);
            db.checkpoint().expect("checkpoint");
            write_round(&db, t, 2);
            db.fail_next_sync.store(true, std::sync::atomic::Ordering::Release);
            db.checkpoint().expect_err("the sync failed");
            write_round(&db, t, 3);
            let e = db.checkpoint().expect_err("a checkpoint after a failed sync");
            assert!(e.to_string().contains("failed before"), "{e}");
            assert_round(&db, t, 3);
        }
        // Opened again, it is as of the last good checkpoint, and takes checkpoints again.
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        write_round(&db, t, 4);
        db.checkpoint().expect("a checkpoint after reopening");
    }

    /// A checkpoint overwrites the older of the checkpoint file's two slots: one torn by a crash
    /// (its write never returned, so that checkpoint never counted) leaves the other whole, and
    /// the store opens as of it. A file of just the meta pages, as written before the slots, opens too.
    #[test]
    fn a_torn_checkpoint_slot_leaves_the_checkpoint_before() {
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join(CHECKPOINT);
        let next_slot;
        {
            let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
            write_round(&db, t, 1);
            db.checkpoint().expect("checkpoint");
            write_round(&db, t, 2);
            db.checkpoint().expect("checkpoint");
            write_round(&db, t, 3);
            let seq = db.checkpoint_file.lock().expect("lock").as_ref().expect("made").1;
            next_slot = (seq + 1) % 2;
        }
        let f = std::fs::OpenOptions::new().write(true).open(&copy).expect("checkpoint file");
        let slot_bytes = f.metadata().expect("size").len() / 2;
        f.write_all_at(&[0x5a; 100], next_slot * slot_bytes + 10).expect("torn");
        drop(f);
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 2);
        write_round(&db, t, 4);
        db.checkpoint().expect("checkpoint");
        // The copy alone, as the file was before it had slots.
        let file = std::fs::read(&copy).expect("read");
        let meta = newest_copy(&file).expect("a whole slot").1.to_vec();
        drop(db);
        std::fs::write(&copy, &meta).expect("write");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 4);
        // Slot 0 torn from its first byte (its magic gone), slot 1 whole: the file is still read
        // as slots.
        drop(db);
        let mut file = std::fs::read(&copy).expect("read");
        // The file made anew at that open: slot 1 holds the newest copy, so slot 0 is the next
        // one written.
        assert_eq!(newest_copy(&file).expect("a whole slot").0 % 2, 1);
        file[..100].fill(0x5a);
        std::fs::write(&copy, &file).expect("write");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 4);
        // Both slots torn: opening refuses rather than guess.
        drop(db);
        std::fs::write(&copy, [SLOT_MAGIC.as_slice(), &[0u8; 8192]].concat()).expect("write");
        assert!(Db::open_with(dir.path(), ["t"], Durability::Checkpointed).is_err());
        // So it does for a file of no bytes, or of one (damage from outside: a crash cannot leave
        // either); it panicked on the empty one.
        for damaged in [&[][..], &[7]] {
            std::fs::write(&copy, damaged).expect("write");
            assert!(Db::open_with(dir.path(), ["t"], Durability::Checkpointed).is_err());
        }
    }

    /// A disk writes whole sectors, so a slot write torn by a crash may leave garbage in every
    /// sector the write touched: the other slot shares none of them and still opens. Regression:
    /// slots were packed end to end, and the second began inside the first's last sector.
    #[test]
    fn a_slot_write_torn_anywhere_in_its_sectors_leaves_the_other_slot_whole() {
        for checkpoints in [2, 3] {
            let dir = tempfile::tempdir().expect("temp dir");
            let copy = dir.path().join(CHECKPOINT);
            let next_slot;
            {
                let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
                for round in 1..=checkpoints {
                    write_round(&db, t, round);
                    db.checkpoint().expect("checkpoint");
                }
                let seq = db.checkpoint_file.lock().expect("lock").as_ref().expect("made").1;
                next_slot = (seq + 1) % 2;
            }
            let f = std::fs::OpenOptions::new().write(true).open(&copy).expect("checkpoint file");
            let slot_bytes = f.metadata().expect("size").len() / 2;
            let first = next_slot * slot_bytes / SECTOR as u64 * SECTOR as u64;
            let end = ((next_slot + 1) * slot_bytes).next_multiple_of(SECTOR as u64);
            f.write_all_at(&vec![0x5a; (end - first) as usize], first).expect("torn");
            drop(f);
            let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
            assert_round(&db, t, checkpoints);
        }
    }

    /// A checkpoint file whose slots lie end to end (as made before slots were whole sectors)
    /// opens, and the next checkpoint makes it anew with whole-sector slots.
    #[test]
    fn slots_made_end_to_end_are_read_and_made_anew() {
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join(CHECKPOINT);
        {
            let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
            for round in 1..=2 {
                write_round(&db, t, round);
                db.checkpoint().expect("checkpoint");
            }
        }
        let file = std::fs::read(&copy).expect("read");
        let packed: Vec<u8> = file
            .chunks_exact(file.len() / 2)
            .flat_map(|s| {
                let len = u32::from_le_bytes(s[16..20].try_into().expect("4 bytes")) as usize;
                s[..SLOT_HEADER + len].to_vec()
            })
            .collect();
        assert!(packed.len() < file.len() && !packed.len().is_multiple_of(SECTOR));
        std::fs::write(&copy, &packed).expect("write");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 2);
        write_round(&db, t, 3);
        db.checkpoint().expect("checkpoint");
        assert_eq!(std::fs::metadata(&copy).expect("size").len(), file.len() as u64);
        drop(db);
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 3);
    }

    /// A slot write that fails leaves the slot in force alone: the next checkpoint does not take
    /// the failed one's sequence as written (it would then overwrite the slot in force) but makes
    /// the file anew.
    #[test]
    fn a_failed_checkpoint_write_does_not_advance_the_slots() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("open");
        write_round(&db, t, 1);
        db.checkpoint().expect("checkpoint");
        let in_force = db.checkpoint_file.lock().expect("lock").as_ref().expect("made").1;
        write_round(&db, t, 2);
        // A handle that cannot write: the slot write fails as a failing disk's would.
        let read_only = std::fs::File::open(dir.path().join(CHECKPOINT)).expect("open");
        db.checkpoint_file.lock().expect("lock").as_mut().expect("made").0 = read_only;
        assert!(db.checkpoint().is_err());
        let after = db.checkpoint_file.lock().expect("lock").as_ref().map(|(_, seq)| *seq);
        assert!(after.is_none_or(|seq| seq == in_force), "{after:?} after {in_force}");
        db.checkpoint().expect("checkpoint");
        drop(db);
        let (db, [t]) = Db::open_with(dir.path(), ["t"], Durability::Checkpointed).expect("reopen");
        assert_round(&db, t, 2);
    }

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
