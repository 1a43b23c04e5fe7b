//! A dataserver's block store: blocks keyed by (file id, block index), each with its MD5
//! and version, persisted in LMDB. Every changing call is one transaction, durable when the call
//! returns, so a batch of blocks costs one commit: made durable by the journal for a small change,
//! by a checkpoint of the store for the others (see `dataserver::journal`).
//!
//! Beside the blocks it keeps two small tables. **Cuts** (tombstones): a truncate or delete records,
//! per file, "blocks from index b on older than version v are gone", so that a copy of such a block
//! arriving later (from a server that missed the cut, by hand-over or scrub) is refused instead of
//! brought back. **Hints**: when a client writes with a write quorum below the replica count it
//! asks the servers that store a block to remember which other holders may still lack that version
//! (and every other server a cut); `dataserver::handoff` hands them over and forgets them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use super::journal::{self, Change, Journal};
use super::readahead::ReadAhead;
use crate::shared::block::{page_count, sums_with_pages, Block, BlockKey, Checksum, Part, PAGE};
use crate::shared::db::{Db, DbError, Durability, Read, Table, Writer};
use crate::shared::placement::replica_servers;
use crate::shared::wal::{self, Wal};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is malformed; nothing was stored. Retrying it cannot succeed.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A block as checked where it is stored: its version, whether its data matches its MD5, its
/// replica count.
pub type Checked = (u64, bool, u8);

/// A block as a listing gives it: its key, version and MD5.
pub type Listed = (BlockKey, u64, Checksum);

/// Value layout: version (8, LE) | replicas (1) | md5 (16) | data (see [`Stored`]).
const HEADER: usize = 8 + 1 + 16;
/// Where in the header the block's MD5 lies.
const MD5_AT: std::ops::Range<usize> = 9..HEADER;
/// A header followed by its check (see [`header_ok`]).
const CHECKED_HEADER: usize = HEADER + 4;
/// Blocks whose headers a cut asks the disk for at once (see `BlockStore::visit_heads`).
const HEADS_AT_ONCE: usize = 1024;
/// The key under which `meta` records that the store holds its full share (no rebuild needed).
const COMPLETE: &[u8] = b"complete";
/// A key in `meta` rewritten after a truncate that freed pages (see `BlockStore::truncate`).
const SETTLED: &[u8] = b"settled";
/// The key in `meta` of the last journal record the store holds.
const APPLIED: &[u8] = b"journal";
/// The journal's directory, in the store's.
const JOURNAL: &str = "journal";
/// How often the store is checkpointed while small changes come (and the journal behind it dropped).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long the journal is left alone after it found no room for a new segment.
pub const JOURNAL_RETRY: Duration = Duration::from_secs(1);

pub struct BlockStore {
    db: Db,
    blocks: Table,
    meta: Table,
    /// (target server, kind, file id, index or first block) -> version: what `target` may lack.
    hints: Table,
    /// file id -> the cuts that removed its blocks: pairs (first block, version).
    cuts: Table,
    journal: Mutex<Journal>,
    /// Taken by the caller that syncs the journal for all waiting.
    syncing: Mutex<()>,
    /// The journal's records up to this index are durable.
    synced: AtomicU64,
    /// How often small changes are checkpointed ([`CHECKPOINT_EVERY`]; tests take longer).
    checkpoint_every: Duration,
    journal_dir: PathBuf,
    /// What reads bring in from disk besides what they touch.
    read_ahead: ReadAhead,
}

/// A truncate or delete of one file on one server: its blocks with index >= `from_block` and a
/// version below `version` go. Version 0 is a cut without a version (from an older client): every
/// block from `from_block` on goes and no tombstone is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub file_id: u64,
    pub from_block: u64,
    pub version: u64,
}

/// Something another server may lack: a block at a version, or a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    Block { key: BlockKey, version: u64 },
    Cut(Cut),
}

/// The kind byte of a cut's hint key (a block's is 0).
const CUT_HINT: u8 = 1;

impl Hint {
    pub fn version(&self) -> u64 {
        match self {
            Hint::Block { version, .. } => *version,
            Hint::Cut(c) => c.version,
        }
    }

    fn key(&self, target: usize) -> [u8; 19] {
        let (kind, file_id, index) = match self {
            Hint::Block { key, .. } => (0u8, key.file_id, key.index),
            Hint::Cut(c) => (CUT_HINT, c.file_id, c.from_block),
        };
        let mut k = [0u8; 19];
        k[..2].copy_from_slice(&(target as u16).to_be_bytes());
        k[2] = kind;
        k[3..11].copy_from_slice(&file_id.to_be_bytes());
        k[11..].copy_from_slice(&index.to_be_bytes());
        k
    }

    fn decode(k: &[u8], v: &[u8]) -> Option<(usize, Hint)> {
        let k: &[u8; 19] = k.try_into().ok()?;
        let target = u16::from_be_bytes([k[0], k[1]]) as usize;
        let file_id = u64::from_be_bytes(k[3..11].try_into().ok()?);
        let index = u64::from_be_bytes(k[11..].try_into().ok()?);
        let version = u64::from_le_bytes(v.try_into().ok()?);
        Some((
            target,
            match k[2] {
                0 => Hint::Block { key: BlockKey { file_id, index }, version },
                _ => Hint::Cut(Cut { file_id, from_block: index, version }),
            },
        ))
    }
}

/// Who stores hints, and for whom: this server's ring index and the ring's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintFor {
    pub me: usize,
    pub n: usize,
}

fn decode_cuts(v: &[u8]) -> Vec<(u64, u64)> {
    v.chunks_exact(16)
        .map(|c| {
            let (a, b) = c.split_at(8);
            (u64::from_le_bytes(a.try_into().unwrap_or_default()), u64::from_le_bytes(b.try_into().unwrap_or_default()))
        })
        .collect()
}

fn encode_cuts(cuts: &[(u64, u64)]) -> Vec<u8> {
    cuts.iter().flat_map(|&(b, v)| b.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
}

/// The version of the newest cut among `cuts` that removes block `index` at `version`, if any.
fn covering(cuts: &[(u64, u64)], index: u64, version: u64) -> Option<u64> {
    cuts.iter().filter(|&&(b, v)| index >= b && version < v).map(|&(_, v)| v).max()
}

/// A stored value, parsed in place. Layout: version (8, LE) | replicas (1) | md5 (16) | data; when
/// the replicas byte has [`CHECKED`] set, the header check (4) follows the md5, then when it has
/// [`PAGED`] set, a page count (2, LE) and the MD5 of each 4 KiB page of the data (16 each), before
/// the data.
struct Stored<'a> {
    version: u64,
    replicas: u8,
    md5: &'a [u8],
    /// The pages' MD5s, 16 bytes each; empty for a block kept without them.
    pages: &'a [u8],
    data: &'a [u8],
    /// Where the data begins in the value.
    data_at: usize,
}

/// The replicas byte's flag for "page checksums follow". A block's replica count is below it
/// (`put` refuses more), so a value from before page checksums never has it set.
const PAGED: u8 = 0x80;
/// The replicas byte's flag for "a header check follows the md5": 4 bytes of the MD5 of the
/// header before it (version, replicas byte, md5). The block's MD5 covers only its data, and a
/// version damaged upwards on disk would otherwise stand as the newest copy: refusing every later
/// write of the block, winning quorum reads and spreading through repairs. Values written before
/// it have no check, and are read as before.
const CHECKED: u8 = 0x40;
/// The most replicas a stored value can record (its byte also holds the flags).
const MAX_REPLICAS: u8 = crate::shared::layout::MAX_REPLICAS;
const _: () = assert!(MAX_REPLICAS < CHECKED);

/// The header check of a value whose header is `h` (its first [`HEADER`] bytes).
fn header_check(h: &[u8]) -> [u8; 4] {
    let sum = crate::shared::checksum::checksum(h);
    [sum[0], sum[1], sum[2], sum[3]]
}

/// Whether the value's header can be trusted: whole, and matching its check if it has one.
fn header_ok(v: &[u8]) -> bool {
    match v.get(8) {
        Some(flags) if flags & CHECKED == 0 => v.len() >= HEADER,
        Some(_) => v.get(HEADER..CHECKED_HEADER).is_some_and(|c| *c == header_check(&v[..HEADER])),
        None => false,
    }
}

fn parse(v: &[u8]) -> Option<Stored<'_>> {
    if !header_ok(v) {
        return None;
    }
    let version = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let (flags, md5) = (*v.get(8)?, v.get(MD5_AT)?);
    let head = if flags & CHECKED == 0 { HEADER } else { CHECKED_HEADER };
    let (pages, data_at) = if flags & PAGED == 0 {
        (&[][..], head)
    } else {
        let count = usize::from(u16::from_le_bytes(v.get(head..head + 2)?.try_into().ok()?));
        let at = head + 2 + 16 * count;
        (v.get(head + 2..at)?, at)
    };
    let data = v.get(data_at..)?;
    if !pages.is_empty() && pages.len() / 16 != page_count(data.len()) {
        return None;
    }
    Some(Stored { version, replicas: flags & !(PAGED | CHECKED), md5, pages, data, data_at })
}

/// A value [`parse`] cannot read (damaged on disk: too short, or its page count wrong), read as
/// far as it goes: its data will not match its MD5 (or it is marked damaged by
/// [`stored_verifies`]), so reads, repairs and the scrubber treat it as a corrupt copy and replace
/// it, instead of failing every call that meets it.
fn damaged(v: &[u8]) -> Stored<'_> {
    const NONE: [u8; 16] = [0; 16];
    Stored {
        version: stored_version(v),
        replicas: stored_replicas(v),
        md5: v.get(MD5_AT).unwrap_or(&NONE),
        pages: &[],
        data: v.get(HEADER..).unwrap_or_default(),
        data_at: HEADER,
    }
}

impl Stored<'_> {
    /// (whether the data matches its MD5, whether each page matches its page MD5), all hashed
    /// in one pass.
    fn check(&self) -> (bool, bool) {
        let (sums, pages) = sums_with_pages(&[self.data], |_| !self.pages.is_empty());
        (sums[0] == self.md5, pages[0].concat() == self.pages)
    }

    /// The pages' MD5s, one each.
    fn page_sums(&self) -> Vec<Checksum> {
        self.pages.chunks_exact(16).map(read_md5).collect()
    }
}

/// `b`'s stored form but its data, which follows it; `pages`: its pages' MD5s (empty: kept
/// without them). The data is written into the map separately (`Writer::put_parts`), not copied
/// here first.
fn header(b: &Block, pages: &[Checksum]) -> Vec<u8> {
    let paged = !pages.is_empty();
    let mut v = Vec::with_capacity(CHECKED_HEADER + 2 + 16 * pages.len());
    v.extend_from_slice(&b.version.to_le_bytes());
    v.push(if paged { b.replicas | PAGED | CHECKED } else { b.replicas | CHECKED });
    v.extend_from_slice(&b.md5);
    let check = header_check(&v);
    v.extend_from_slice(&check);
    if paged {
        v.extend_from_slice(&(pages.len() as u16).to_le_bytes());
        pages.iter().for_each(|p| v.extend_from_slice(p));
    }
    v
}

fn decode(key: BlockKey, v: &[u8]) -> Result<Block, DbError> {
    let s = parse(v).unwrap_or_else(|| damaged(v));
    Ok(Block {
        key,
        version: s.version,
        replicas: s.replicas,
        md5: read_md5(s.md5),
        data: s.data.to_vec(),
        pages: vec![],
    })
}

fn read_md5(b: &[u8]) -> Checksum {
    let mut md5: Checksum = [0; 16];
    md5.copy_from_slice(b);
    md5
}

/// Whether a stored block verifies (its pages too), without copying it.
fn stored_verifies(v: &[u8]) -> bool {
    parse(v).is_some_and(|s| s.check() == (true, true))
}

/// Whether a repair carrying `version` and `md5` replaces the stored value `old`: a missing or
/// damaged copy, or one whose data fails its MD5, is replaced by any good copy; one whose data is
/// good only by a newer write (see [`stored_order`]: of two writes of one version, the one with
/// the larger MD5), or (its page checksums alone damaged) by the same write, so that a repair from
/// a replica that missed the latest write never replaces it.
fn repair_replaces(old: &[u8], version: u64, md5: &Checksum) -> bool {
    match parse(old).map(|s| s.check()) {
        Some((true, pages)) => {
            let (stored, repair) = (stored_order(old), (version, *md5));
            stored < repair || (stored == repair && !pages)
        }
        _ => true,
    }
}

/// The version and replica count of a stored block, read from its header with one check; `None`
/// if the header is damaged (see [`header_ok`]).
fn stored_head(v: &[u8]) -> Option<(u64, u8)> {
    let version = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    header_ok(v).then(|| (version, v[8] & !(PAGED | CHECKED)))
}

/// The replica count a stored block was written with (0 for a value whose header is damaged).
fn stored_replicas(v: &[u8]) -> u8 {
    stored_head(v).map_or(0, |(_, replicas)| replicas)
}

/// Whether a block of more than one page needs its pages' MD5s computed here: its writer did not
/// send them.
fn unpaged(b: &Block) -> bool {
    b.data.len() > PAGE && b.pages.is_empty()
}

/// Checks each block against its MD5 and computes the MD5s of the pages of those that span more
/// than one and came without them, all in one multi-buffer pass; returns each block's page MD5s.
/// A writer's page MD5s are kept as sent: checking them would cost each server another pass over
/// the data, and a wrong one cannot return wrong data (a read that fails a page check falls back
/// to the whole block, checked against its MD5, and mends the copy; a repair or a copy from a
/// peer comes without page MD5s, so they are computed here). `Err`: the first block that does
/// not verify.
fn verify_and_page(blocks: &[Block]) -> Result<Vec<Vec<Checksum>>, usize> {
    let datas: Vec<&[u8]> = blocks.iter().map(|b| b.data.as_slice()).collect();
    let (sums, computed) = sums_with_pages(&datas, |i| unpaged(&blocks[i]));
    if let Some(i) = blocks.iter().zip(&sums).position(|(b, s)| b.md5 != *s) {
        return Err(i);
    }
    Ok(blocks
        .iter()
        .zip(computed)
        .map(|(b, computed)| if b.data.len() > PAGE && !unpaged(b) { b.pages.clone() } else { computed })
        .collect())
}

/// Where a stored block stands among writes of its key: by version, and of two writes with the
/// same version (two clients writing at the same instant), by MD5, so that every replica keeps the
/// same one whatever order the two came in. Keeping the later arrival would leave replicas holding
/// different data under one version for good, and a read would take either. (A replica that missed
/// one of the two writes, under a write quorum below R, is brought to the same one by the scrubber,
/// which compares the same order.) A damaged header stands below every write.
fn stored_order(v: &[u8]) -> (u64, Checksum) {
    stored_head(v).map_or((0, Checksum::default()), |(version, _)| (version, stored_md5(v)))
}

/// The MD5 in a value's header (zeros if the value is too short to hold one).
fn stored_md5(v: &[u8]) -> Checksum {
    v.get(MD5_AT).and_then(|m| Checksum::try_from(m).ok()).unwrap_or_default()
}

/// The version of a stored block; a value whose header is damaged on disk (too short, or not
/// matching its check) counts as the oldest, so that any write, repair or cut replaces it.
fn stored_version(v: &[u8]) -> u64 {
    stored_head(v).map_or(0, |(version, _)| version)
}

fn file_range(file_id: u64, from_block: u64) -> ([u8; 16], Vec<u8>) {
    let from = BlockKey { file_id, index: from_block }.to_bytes();
    // Every key of this file is below the 8-byte prefix of the next file id, or (for the last id)
    // below the 17-byte key that extends the largest possible 16-byte key.
    let to = match file_id.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 17],
    };
    (from, to)
}

impl BlockStore {
    /// Opens the store in `dir`, going back to its last checkpoint and applying again the
    /// changes its journal holds after it. Returns whether it already held its full share: false
    /// for a new or wiped disk, and for one whose rebuild had not finished.
    pub fn open(dir: &Path) -> Result<(BlockStore, bool), DbError> {
        let io = |e: std::io::Error| DbError::Other(format!("the journal in {}: {e}", dir.display()));
        if !dir.join("data.mdb").exists() {
            // A new or wiped store: a journal left beside it belongs to what is gone.
            match std::fs::remove_dir_all(dir.join(JOURNAL)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        let tables = ["blocks", "meta", "hints", "cuts"];
        let (db, t) = Db::open_reading_around(dir, tables, Durability::Checkpointed, false)?;
        let read_ahead = ReadAhead::of(&dir.join("data.mdb"));
        let wal = Wal::open_sized(&dir.join(JOURNAL), journal::SEGMENT).map_err(io)?;
        let journal =
            Journal { wal, next: 0, last: None, checkpointed: Instant::now(), broken: false, paused_until: None };
        let store = BlockStore {
            db,
            blocks: t[0],
            meta: t[1],
            hints: t[2],
            cuts: t[3],
            journal: Mutex::new(journal),
            syncing: Mutex::new(()),
            synced: AtomicU64::new(0),
            checkpoint_every: CHECKPOINT_EVERY,
            journal_dir: dir.join(JOURNAL),
            read_ahead,
        };
        let mut applied = store.applied()?;
        let mut j = store.lock_journal();
        let redo = j.wal.range(applied.saturating_add(1), u64::MAX).map_err(io)?;
        for (i, record) in &redo {
            let change = journal::decode(record)
                .ok_or_else(|| DbError::Other(format!("journal record {i} in {} does not read", dir.display())))?;
            store.db.write(|w| {
                store.apply(w, &change)?;
                w.put(store.meta, APPLIED, &i.to_le_bytes())
            })?;
            applied = *i;
        }
        if !redo.is_empty() {
            tracing::info!(dir = %dir.display(), changes = redo.len(), "changes after the last checkpoint applied again");
        }
        j.next = j.wal.bounds().map_or(0, |(_, last)| last).max(applied) + 1;
        store.checkpoint(&mut j)?;
        drop(j);
        let complete = store.db.read(|r| Ok::<_, DbError>(r.get(store.meta, COMPLETE)?.is_some()))?;
        Ok((store, complete))
    }

    /// The last journal record the store holds.
    fn applied(&self) -> Result<u64, DbError> {
        self.db.read(|r| Ok(r.get(self.meta, APPLIED)?.and_then(|v| v.try_into().ok()).map_or(0, u64::from_le_bytes)))
    }

    fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a journaled change (as when it was first made).
    fn apply(&self, w: &mut Writer, change: &Change) -> Result<(), DbError> {
        match change {
            Change::Put { blocks, repair, hint } => {
                self.put_in(w, blocks.iter().map(|(b, p)| (b, p.as_slice())), *repair, *hint).map(drop)
            }
            Change::Cut { cuts, hint } => self.cut_in(w, cuts, *hint).map(drop),
            Change::DropIf(keys) => self.drop_if_in(w, keys).map(drop),
        }
    }

    /// Runs `apply` in one transaction and makes it durable before returning: with `record`, by
    /// appending it to the journal and syncing that (one sync for every change waiting); without
    /// (and once a second), by a checkpoint of the store.
    fn commit<T, E: From<DbError>>(
        &self,
        record: Option<Vec<u8>>,
        apply: impl FnOnce(&mut Writer) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut j = self.lock_journal();
        let now = Instant::now();
        if j.paused_until.is_some_and(|t| now >= t) && !self.journal_has_room() {
            // Not tried while a segment would not fit: each try would fill the disk for a moment.
            j.paused_until = Some(now + JOURNAL_RETRY);
        }
        let open = !j.broken && j.paused_until.is_none_or(|t| now >= t);
        let record = record.filter(|_| open);
        let index = j.next;
        // A change without a record leaves the journal's position where it was.
        let applied = if record.is_some() { index } else { index - 1 };
        let out = self.db.write(|w| {
            let out = apply(w)?;
            w.put(self.meta, APPLIED, &applied.to_le_bytes())?;
            Ok::<_, E>(out)
        })?;
        if let Some(r) = &record {
            match j.wal.append(&[(index, r)]) {
                Ok(files) => {
                    j.last = files.last().cloned();
                    j.next += 1;
                    j.paused_until = None;
                }
                Err(e) => {
                    // The change is made durable by a checkpoint instead, and it must not claim the
                    // record. Under the journal's lock, so that no other change takes the journal
                    // up again (or syncs a segment whose failed sync this append met) before it.
                    if let Err(back) = self.db.write(|w| w.put(self.meta, APPLIED, &(index - 1).to_le_bytes())) {
                        // The store still claims the record, and a checkpoint taken meanwhile may
                        // hold that claim: a later change's record must not take this index (a
                        // reopen from that checkpoint would skip it). Every later change is
                        // checkpointed instead.
                        j.broken = true;
                        return Err(back.into());
                    }
                    let checkpointed = self.checkpoint(&mut j);
                    // Nothing was appended if only a new segment lacked room: tried again once
                    // deletes may have made some.
                    let until = if wal::is_no_room_for_segment(&e) && checkpointed.is_ok() {
                        j.paused_until = Some(Instant::now() + JOURNAL_RETRY);
                        format!("for {JOURNAL_RETRY:?}")
                    } else {
                        j.broken = true;
                        "until a restart".to_string()
                    };
                    tracing::warn!("appending to the journal: {e}; changes are checkpointed instead {until}");
                    checkpointed?;
                    return Ok(out);
                }
            }
        } else {
            // Not under the journal's lock: other changes apply while this one's checkpoint
            // syncs, and the next checkpoint covers them all.
            let upto = j.next - 1;
            drop(j);
            self.db.checkpoint()?;
            self.checkpointed(&mut self.lock_journal(), upto);
            return Ok(out);
        }
        if j.checkpointed.elapsed() >= self.checkpoint_every {
            match self.checkpoint(&mut j) {
                Ok(()) => return Ok(out),
                Err(e) => {
                    // The change is in the journal: its sync below makes it durable. Tried again
                    // in a second.
                    j.checkpointed = Instant::now();
                    tracing::warn!("checkpointing the block store: {e}; the journal keeps the changes since");
                }
            }
        }
        drop(j);
        self.sync_to(index)?;
        Ok(out)
    }

    /// Makes the journal's records up to `index` durable: one caller syncs for all those waiting.
    fn sync_to(&self, index: u64) -> Result<(), DbError> {
        let _turn = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.synced.load(Ordering::Acquire) >= index {
            return Ok(());
        }
        let (upto, last, sync) = {
            let j = self.lock_journal();
            (j.next - 1, j.last.clone(), j.wal.syncer())
        };
        if let Some(Err(e)) = last.map(|f| sync(&f)) {
            // The failed pages may be marked clean, so a later sync of the segment could succeed
            // with a hole in it: nothing more goes to the journal, and a checkpoint makes every
            // change so far durable instead.
            tracing::warn!("syncing the journal: {e}; changes are checkpointed instead until a restart");
            let mut j = self.lock_journal();
            j.broken = true;
            return self.checkpoint(&mut j);
        }
        // An append that begins a new segment syncs the one before under the journal's lock. If
        // that sync failed while this one ran, this one may have succeeded over the failed pages;
        // the append then marks the journal broken once its checkpoint made every change so far
        // durable, and lets go of the lock only after. So, under the lock: a broken journal
        // vouches for nothing, and only a checkpoint since does.
        let mut j = self.lock_journal();
        if j.broken {
            if self.synced.load(Ordering::Acquire) >= index {
                return Ok(());
            }
            return self.checkpoint(&mut j);
        }
        drop(j);
        self.synced.fetch_max(upto, Ordering::Release);
        Ok(())
    }

    /// Whether the journal's disk has room for a new segment, and as much again for whatever else
    /// shares the disk.
    fn journal_has_room(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.journal_dir)
            .is_ok_and(|v| v.blocks_available() * v.fragment_size() >= 2 * journal::SEGMENT)
    }

    /// Makes every change so far durable in the store itself, and drops the journal behind it.
    fn checkpoint(&self, j: &mut Journal) -> Result<(), DbError> {
        self.db.checkpoint()?;
        self.checkpointed(j, j.next - 1);
        Ok(())
    }

    /// After a checkpoint that began once the journal's records up to `upto` were applied: they
    /// are durable without the journal.
    fn checkpointed(&self, j: &mut Journal, upto: u64) {
        j.checkpointed = Instant::now();
        self.synced.fetch_max(upto, Ordering::Release);
        if let Err(e) = j.wal.purge(upto) {
            tracing::warn!("dropping the journal behind the checkpoint: {e}");
        }
    }

    /// Records that the store holds its full share: a restart after this needs no rebuild.
    pub fn mark_complete(&self) -> Result<(), DbError> {
        self.commit(None, |w| w.put(self.meta, COMPLETE, b"1"))
    }

    /// Stores a batch in one durable transaction. Every block must verify against its checksum, or
    /// nothing is stored. A normal write replaces an equal or older version (retries are
    /// idempotent; concurrent writers converge on the highest version). A `repair` write only fills
    /// a missing or corrupt block or replaces an older one. A block that a recorded cut removed
    /// (an older version than the cut's) is not stored. With `hint`, each block stored is noted
    /// for the block's other holders. Returns how many blocks were written.
    pub fn put(&self, blocks: &[Block], repair: bool, hint: Option<HintFor>) -> Result<usize, StoreError> {
        let pages = verify_and_page(blocks).map_err(|i| {
            StoreError::BadRequest(format!(
                "block {}/{} does not match its checksum",
                blocks[i].key.file_id, blocks[i].key.index
            ))
        })?;
        if let Some(b) = blocks.iter().find(|b| b.replicas == 0 || b.replicas > MAX_REPLICAS) {
            return Err(StoreError::BadRequest(format!(
                "block {}/{} has {} replicas (1 to {MAX_REPLICAS} may be stored)",
                b.key.file_id, b.key.index, b.replicas,
            )));
        }
        let bytes: usize = blocks.iter().map(|b| b.data.len()).sum();
        let record = (bytes <= journal::SMALL_PUT).then(|| journal::put_record(blocks, &pages, repair, hint));
        self.commit(record, |w| self.put_in(w, blocks.iter().zip(pages.iter().map(Vec::as_slice)), repair, hint))
            .map_err(StoreError::from)
    }

    /// [`BlockStore::put`]'s change, in `w`: each block with the page MD5s it is stored with.
    fn put_in<'b>(
        &self,
        w: &mut Writer,
        blocks: impl Iterator<Item = (&'b Block, &'b [Checksum])>,
        repair: bool,
        hint: Option<HintFor>,
    ) -> Result<usize, DbError> {
        let mut written = 0;
        let mut cuts_of: Option<(u64, Vec<(u64, u64)>)> = None;
        let mut asked = 0..0;
        for (b, pages) in blocks {
            if cuts_of.as_ref().is_none_or(|(f, _)| *f != b.key.file_id) {
                cuts_of = Some((b.key.file_id, self.cuts_in(w, b.key.file_id)?));
            }
            if cuts_of.as_ref().is_some_and(|(_, c)| covering(c, b.key.index, b.version).is_some()) {
                continue; // removed by a cut that came first
            }
            let key = b.key.to_bytes();
            let old = w.get(self.blocks, &key)?;
            if let Some(old) = old {
                self.read_ahead.around(old, &mut asked);
            }
            let replace = match old {
                None => true,
                Some(old) if repair => repair_replaces(old, b.version, &b.md5),
                Some(old) => stored_order(old) <= (b.version, b.md5),
            };
            if replace {
                w.put_parts(self.blocks, &key, &[&header(b, pages), &b.data])?;
                written += 1;
                if let Some(h) = hint {
                    for t in replica_servers(b.key.file_id, b.key.index, usize::from(b.replicas), h.n) {
                        if t != h.me {
                            self.note(w, t, Hint::Block { key: b.key, version: b.version })?;
                        }
                    }
                }
            }
        }
        Ok(written)
    }

    /// Records hint `h` for `target`, unless a newer one is kept already.
    fn note(&self, w: &mut Writer, target: usize, h: Hint) -> Result<(), DbError> {
        let k = h.key(target);
        let newer = w.get(self.hints, &k)?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes);
        if newer.is_none_or(|v| v < h.version()) {
            w.put(self.hints, &k, &h.version().to_le_bytes())?;
        }
        Ok(())
    }

    /// The stored values of `keys`, borrowed from the map, with their pages asked of the disk at
    /// once (see `dataserver::readahead`).
    fn values<'t>(&self, r: &'t impl Read, keys: &[BlockKey]) -> Result<Vec<Option<&'t [u8]>>, DbError> {
        let values = keys.iter().map(|k| r.get(self.blocks, &k.to_bytes())).collect::<Result<Vec<_>, _>>()?;
        match values.as_slice() {
            [Some(v)] => self.read_ahead.around(v, &mut (0..0)),
            _ => self.read_ahead.spans(values.iter().flatten().copied()),
        }
        Ok(values)
    }

    fn cuts_in(&self, r: &impl Read, file_id: u64) -> Result<Vec<(u64, u64)>, DbError> {
        Ok(r.get(self.cuts, &file_id.to_be_bytes())?.map(decode_cuts).unwrap_or_default())
    }

    /// Reads blocks as stored, corrupt or not: verifying is the reader's job.
    pub fn get(&self, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, DbError> {
        Ok(self.get_within(keys, usize::MAX)?.unwrap_or_default())
    }

    /// [`BlockStore::get`], or `None` as soon as the blocks' data passes `max_bytes`: a request
    /// naming one large block many times stops there instead of copying it each time.
    pub fn get_within(&self, keys: &[BlockKey], max_bytes: usize) -> Result<Option<Vec<Option<Block>>>, DbError> {
        self.db.read(|r| {
            let values = self.values(r, keys)?;
            let (mut out, mut bytes) = (Vec::with_capacity(keys.len()), 0usize);
            for (k, v) in keys.iter().zip(values) {
                let b = v.map(|v| decode(*k, v)).transpose()?;
                bytes = bytes.saturating_add(b.as_ref().map_or(0, |b| b.data.len()));
                if bytes > max_bytes {
                    return Ok(None);
                }
                out.push(b);
            }
            Ok(Some(out))
        })
    }

    /// Flips a byte of the stored checksum of page `page` of a block (for tests of the paths
    /// that must notice and mend it).
    #[cfg(test)]
    pub(crate) fn damage_page_checksum(&self, key: BlockKey, page: usize) {
        self.edit_stored(key, |v| {
            let at = parse(v).map(|s| s.data_at - s.pages.len() + 16 * page).expect("a stored block with pages");
            v[at] ^= 1
        });
    }

    /// Changes a block's stored value in place, as damage on disk would (for tests).
    #[cfg(test)]
    fn edit_stored(&self, key: BlockKey, edit: impl FnOnce(&mut Vec<u8>)) {
        self.commit(None, |w| {
            let mut v = w.get(self.blocks, &key.to_bytes())?.expect("a stored block").to_vec();
            edit(&mut v);
            w.put(self.blocks, &key.to_bytes(), &v)
        })
        .unwrap();
    }

    /// Bytes [`from`, `to`) of a block, as the whole pages that hold them with their MD5s, unverified
    /// (see [`Part`]). A block kept without page checksums comes whole.
    pub fn get_range(&self, key: BlockKey, from: usize, to: usize) -> Result<Option<Part>, DbError> {
        self.db.read(|r| {
            let Some(v) = r.get(self.blocks, &key.to_bytes())? else { return Ok(None) };
            self.read_ahead.around(v, &mut (0..0));
            let s = parse(v).unwrap_or_else(|| damaged(v));
            Ok(Some(Part::of(s.version, s.replicas, read_md5(s.md5), s.data, &s.page_sums(), from, to)))
        })
    }

    /// Each block's version, whether its data matches its MD5 (checked where it is stored: a
    /// rebuild looks at a page of 1,024 blocks it may hold, which copied out would take up to
    /// 16 GiB at the largest block size), and its replica count.
    pub fn versions_checked(&self, keys: &[BlockKey]) -> Result<Vec<Option<Checked>>, DbError> {
        self.db.read(|r| {
            let mut out = Vec::with_capacity(keys.len());
            for v in self.values(r, keys)? {
                out.push(v.map(|v| {
                    let s = parse(v).unwrap_or_else(|| damaged(v));
                    (s.version, crate::shared::checksum::checksum(s.data).as_slice() == s.md5, s.replicas)
                }));
            }
            Ok(out)
        })
    }

    /// [`BlockStore::get`], with whether each block verifies against its MD5 and its pages' MD5s
    /// (a scrub's check: a damaged page checksum is damage too).
    pub fn get_verified(&self, keys: &[BlockKey]) -> Result<Vec<Option<(Block, bool)>>, DbError> {
        self.db.read(|r| {
            let mut out = Vec::with_capacity(keys.len());
            for (k, v) in keys.iter().zip(self.values(r, keys)?) {
                out.push(match v {
                    Some(v) => Some((decode(*k, v)?, stored_verifies(v))),
                    None => None,
                });
            }
            Ok(out)
        })
    }

    /// Applies cuts (see [`Cut`]), all in one durable transaction, recording each versioned cut as
    /// the file's tombstone. With `hint`, each cut is noted for every other server. Returns how many
    /// blocks went; on a disk short of room, follow with [`BlockStore::settle`].
    pub fn truncate(&self, cuts: &[Cut], hint: Option<HintFor>) -> Result<u64, DbError> {
        self.commit(Some(journal::cut_record(cuts, hint)), |w| self.cut_in(w, cuts, hint))
    }

    /// Makes the pages the last commit freed usable by the next one. LMDB reuses the pages a
    /// commit freed only from the commit after next: this small commit lets the next put take
    /// them instead of growing the file, on a disk that may be full. It costs a durable commit,
    /// so it is made only when room is short.
    pub fn settle(&self) -> Result<(), DbError> {
        self.commit(None, |w| w.put(self.meta, SETTLED, b""))
    }

    fn cut_in(&self, w: &mut Writer, cuts: &[Cut], hint: Option<HintFor>) -> Result<u64, DbError> {
        let mut removed = 0;
        for c in cuts {
            let (from, to) = file_range(c.file_id, c.from_block);
            if c.version == 0 {
                removed += w.delete_range(self.blocks, &from, &to)?;
                continue;
            }
            let mut older = Vec::new();
            self.visit_heads(w, &from, &to, |k, v| {
                if stored_version(v) < c.version {
                    older.push(k.to_vec());
                }
            })?;
            for k in &older {
                w.delete(self.blocks, k)?;
            }
            removed += older.len() as u64;
            let mut kept = self.cuts_in(w, c.file_id)?;
            if !kept.iter().any(|&(b, v)| b <= c.from_block && v >= c.version) {
                kept.retain(|&(b, v)| !(b >= c.from_block && v <= c.version));
                kept.push((c.from_block, c.version));
                w.put(self.cuts, &c.file_id.to_be_bytes(), &encode_cuts(&kept))?;
            }
            if let Some(h) = hint {
                for t in (0..h.n).filter(|&t| t != h.me) {
                    self.note(w, t, Hint::Cut(*c))?;
                }
            }
        }
        Ok(removed)
    }

    /// Visits the blocks with keys in `[from, to)`, in key order, reading from the disk only each
    /// block's header: the pages that hold the headers of a batch of blocks are asked for at
    /// once, then the batch is walked again to read them (reading around each header, as the
    /// kernel does for a fault, would read every block's data).
    fn visit_heads(&self, w: &Writer, from: &[u8], to: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<(), DbError> {
        let mut next = from.to_vec();
        loop {
            let (mut heads, mut last) = (Vec::new(), None);
            w.visit(self.blocks, &next, to, |k, v| {
                heads.push(v.as_ptr() as usize);
                if heads.len() < HEADS_AT_ONCE {
                    return true;
                }
                last = Some(k.to_vec());
                false
            })?;
            self.read_ahead.heads(&heads, CHECKED_HEADER);
            let end = last.as_ref().map_or_else(|| to.to_vec(), |k| [k.as_slice(), &[0]].concat());
            w.visit(self.blocks, &next, &end, |k, v| {
                f(k, v);
                true
            })?;
            match last {
                Some(k) => next = [k.as_slice(), &[0]].concat(),
                None => return Ok(()),
            }
        }
    }

    /// For each key, the version of a recorded cut that removed it (0: none), so that a reader
    /// comparing replicas can tell a block deleted from one lost.
    pub fn cut_versions(&self, keys: &[BlockKey]) -> Result<Vec<u64>, DbError> {
        self.db.read(|r| {
            keys.iter().map(|k| Ok(covering(&self.cuts_in(r, k.file_id)?, k.index, 0).unwrap_or(0))).collect()
        })
    }

    /// The versions held of `keys` (0: none, or a damaged record).
    pub fn versions(&self, keys: &[BlockKey]) -> Result<Vec<u64>, DbError> {
        Ok(self.versions_sized(keys)?.into_iter().map(|(v, _)| v).collect())
    }

    /// The versions held of `keys` (0: none, or a damaged record), and the bytes each is stored
    /// in (0: none), known without reading the blocks' data.
    pub fn versions_sized(&self, keys: &[BlockKey]) -> Result<Vec<(u64, usize)>, DbError> {
        let mut asked = 0..0;
        self.db.read(|r| {
            keys.iter()
                .map(|k| {
                    let v = r.get(self.blocks, &k.to_bytes())?;
                    v.inspect(|v| self.read_ahead.around(v, &mut asked));
                    Ok(v.map_or((0, 0), |v| (stored_version(v), v.len())))
                })
                .collect()
        })
    }

    /// Visits the hints for server `target` (key, value) while `f` says go on.
    fn visit_hints_of(&self, target: usize, f: impl FnMut(&[u8], &[u8]) -> bool) -> Result<(), DbError> {
        let from = (target as u16).to_be_bytes();
        let to = (target as u32 + 1).to_be_bytes();
        self.db.read(|r| r.visit(self.hints, &from, &to[2..], f))
    }

    /// Visits the cut hints kept for server `target`, in key order, while `f` says go on.
    fn visit_cut_hints_of(
        &self,
        r: &impl Read,
        target: usize,
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), DbError> {
        let t = (target as u16).to_be_bytes();
        r.visit(self.hints, &[t[0], t[1], CUT_HINT], &[t[0], t[1], CUT_HINT + 1], f)
    }

    /// Up to `limit` of the hints for server `target`: its cuts first. A server back from a long
    /// absence must learn of the deletions before its peers' tombstones of them age out (see
    /// [`Self::prune_cuts`]), however many written blocks wait for it too.
    pub fn hints_of(&self, target: usize, limit: usize) -> Result<Vec<(usize, Hint)>, DbError> {
        let mut out = Vec::new();
        self.db.read(|r| {
            self.visit_cut_hints_of(r, target, |k, v| {
                out.extend(Hint::decode(k, v));
                out.len() < limit
            })
        })?;
        if out.len() < limit {
            self.visit_hints_of(target, |k, v| {
                if k.get(2) != Some(&CUT_HINT) {
                    out.extend(Hint::decode(k, v));
                }
                out.len() < limit
            })?;
        }
        Ok(out)
    }

    /// How many hints are kept for server `target`: of versions below `before`, or all with 0.
    pub fn hints_for(&self, target: usize, before: u64) -> Result<u64, DbError> {
        let mut n = 0;
        self.visit_hints_of(target, |_, v| {
            let version = v.try_into().map(u64::from_le_bytes).unwrap_or(0);
            if before == 0 || version < before {
                n += 1;
            }
            true
        })?;
        Ok(n)
    }

    /// How many hints are kept.
    pub fn hint_count(&self) -> Result<u64, DbError> {
        self.db.read(|r| r.len(self.hints))
    }

    /// Forgets hints that were handed over, each only if it was not renewed (a newer version noted)
    /// since it was read. One durable transaction.
    pub fn forget_hints(&self, done: &[(usize, Hint)]) -> Result<(), DbError> {
        self.commit(None, |w| {
            for (t, h) in done {
                let k = h.key(*t);
                let held = w.get(self.hints, &k)?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes);
                if held == Some(h.version()) {
                    w.delete(self.hints, &k)?;
                }
            }
            Ok(())
        })
    }

    /// The cuts recorded for `file_id`, as (first block, version).
    pub fn cuts_of(&self, file_id: u64) -> Result<Vec<(u64, u64)>, DbError> {
        self.db.read(|r| self.cuts_in(r, file_id))
    }

    /// The tombstones kept here, as cuts, of up to `limit` files from file id `from` on in id
    /// order; and whether no file after them has one. A rebuilt store takes its peers' (its own
    /// went with its disk), so that a copy a peer still holds of a block cut elsewhere is not
    /// taken as current.
    pub fn list_cuts(&self, from: u64, limit: usize) -> Result<(Vec<Cut>, bool), DbError> {
        self.db.read(|r| {
            let mut out = Vec::new();
            let mut files = 0;
            let mut done = true;
            r.visit(self.cuts, &from.to_be_bytes(), &[0xff; 9], |k, v| {
                if files == limit {
                    done = false;
                    return false;
                }
                let Some(file_id) = k.try_into().ok().map(u64::from_be_bytes) else { return true };
                let cuts = decode_cuts(v);
                // Only files with cuts count, so a page that is not the last has some.
                files += usize::from(!cuts.is_empty());
                out.extend(cuts.into_iter().map(|(from_block, version)| Cut { file_id, from_block, version }));
                true
            })?;
            Ok((out, done))
        })
    }

    /// Forgets tombstones whose version (a client's clock, in nanoseconds) is below `before`,
    /// but for files with a cut still waiting here to be handed over; returns how many went. By
    /// then every server has long had the cut (or the collector has removed what it missed).
    pub fn prune_cuts(&self, before: u64) -> Result<u64, DbError> {
        self.commit(None, |w| {
            // A file's tombstone stays while a cut of it waits here to be handed over: the server
            // it waits for may still hold the file's blocks, and once back, it must not find them
            // missing here as if they had never been written, and hand them back.
            let mut waiting = std::collections::HashSet::new();
            for t in 0..crate::shared::layout::MAX_SERVERS {
                self.visit_cut_hints_of(w, t, |k, v| {
                    if let Some((_, Hint::Cut(c))) = Hint::decode(k, v) {
                        waiting.insert(c.file_id);
                    }
                    true
                })?;
            }
            let mut changed = Vec::new();
            w.visit(self.cuts, &[0], &[0xff; 9], |k, v| {
                if k.try_into().map(u64::from_be_bytes).is_ok_and(|f| waiting.contains(&f)) {
                    return true;
                }
                let kept = decode_cuts(v);
                if kept.iter().any(|&(_, v)| v < before) {
                    changed.push((k.to_vec(), kept.into_iter().filter(|&(_, v)| v >= before).collect::<Vec<_>>()));
                }
                true
            })?;
            let mut gone = 0;
            for (k, kept) in changed {
                if kept.is_empty() {
                    w.delete(self.cuts, &k)?;
                    gone += 1;
                } else {
                    w.put(self.cuts, &k, &encode_cuts(&kept))?;
                }
            }
            Ok(gone)
        })
    }

    /// How many blocks in `[from, to)` for which `wanted(key, replicas)` holds, and a digest of
    /// their keys, versions and MD5s: two servers with equal digests over a range hold the same
    /// writes (two writes of one version differ in their MD5s).
    pub fn digest(
        &self,
        from: BlockKey,
        to: Option<BlockKey>,
        wanted: impl Fn(BlockKey, u8) -> bool,
    ) -> Result<(u64, Checksum), DbError> {
        let to = to.map_or(vec![0xff; 17], |k| k.to_bytes().to_vec());
        let mut h = Md5::new();
        let mut n = 0;
        let mut asked = 0..0;
        self.db.read(|r| {
            r.visit(self.blocks, &from.to_bytes(), &to, |k, v| {
                self.read_ahead.around(v, &mut asked);
                if let Some(key) = BlockKey::from_bytes(k) {
                    if let Some((version, _)) = stored_head(v).filter(|&(_, r)| wanted(key, r)) {
                        h.update(k);
                        h.update(version.to_le_bytes());
                        h.update(stored_md5(v));
                        n += 1;
                    }
                }
                true
            })
        })?;
        Ok((n, h.finalize().into()))
    }

    /// Deletes each listed block that is held with exactly the version given, in one durable
    /// transaction; a block written again since it was listed stays. Returns how many went.
    pub fn drop_if(&self, keys: &[(BlockKey, u64)]) -> Result<u64, DbError> {
        self.commit(Some(journal::drop_if_record(keys)), |w| self.drop_if_in(w, keys))
    }

    fn drop_if_in(&self, w: &mut Writer, keys: &[(BlockKey, u64)]) -> Result<u64, DbError> {
        let mut removed = 0;
        let mut asked = 0..0;
        for &(key, version) in keys {
            let k = key.to_bytes();
            let held = w.get(self.blocks, &k)?;
            held.inspect(|v| self.read_ahead.around(v, &mut asked));
            let held = held.filter(|v| v.len() >= HEADER).map(stored_version);
            if held == Some(version) && w.delete(self.blocks, &k)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Flips one byte of the first block of the file held here. Returns its index.
    pub fn corrupt(&self, file_id: u64) -> Result<Option<u64>, DbError> {
        let (from, to) = file_range(file_id, 0);
        self.commit(None, |w| {
            let Some((k, mut v)) = w.scan(self.blocks, &from, &to, 1)?.pop() else {
                return Ok(None);
            };
            // Flip a data byte if there is one, else a checksum byte: either way the MD5 no longer matches.
            let at = parse(&v).filter(|s| !s.data.is_empty()).map_or(9, |s| s.data_at);
            v[at] ^= 0xff;
            w.put(self.blocks, &k, &v)?;
            Ok(BlockKey::from_bytes(&k).map(|k| k.index))
        })
    }

    /// Up to `limit` keys (with versions and MD5s) after `after`, in key order, of blocks for which
    /// `wanted(key, replicas)` holds; and whether the scan reached the end. Reads only each block's
    /// header, in place: listing a store copies no block data.
    pub fn list(
        &self,
        after: BlockKey,
        limit: usize,
        wanted: impl Fn(BlockKey, u8) -> bool,
    ) -> Result<(Vec<Listed>, bool), DbError> {
        let mut from = after.to_bytes().to_vec();
        from.push(0); // strictly after `after`
        self.list_bytes(&from, &[0xffu8; 17], limit, wanted)
    }

    /// [`Self::list`] from `from` itself on, and below `to` (absent: to the end).
    pub fn list_from(
        &self,
        from: BlockKey,
        to: Option<BlockKey>,
        limit: usize,
        wanted: impl Fn(BlockKey, u8) -> bool,
    ) -> Result<(Vec<Listed>, bool), DbError> {
        let to = to.map_or(vec![0xff; 17], |k| k.to_bytes().to_vec());
        self.list_bytes(&from.to_bytes(), &to, limit, wanted)
    }

    fn list_bytes(
        &self,
        from: &[u8],
        to: &[u8],
        limit: usize,
        wanted: impl Fn(BlockKey, u8) -> bool,
    ) -> Result<(Vec<Listed>, bool), DbError> {
        let mut out = Vec::new();
        let mut reached_end = true;
        let mut asked = 0..0;
        self.db.read(|r| {
            r.visit(self.blocks, from, to, |k, v| {
                self.read_ahead.around(v, &mut asked);
                let Some(key) = BlockKey::from_bytes(k) else { return true };
                if let Some((version, _)) = stored_head(v).filter(|&(_, r)| wanted(key, r)) {
                    out.push((key, version, stored_md5(v)));
                    if out.len() >= limit {
                        reached_end = false;
                        return false;
                    }
                }
                true
            })
        })?;
        Ok((out, reached_end))
    }

    /// (blocks held, bytes they take on disk).
    pub fn stats(&self) -> Result<(u64, u64), DbError> {
        let n = self.db.read(|r| r.len(self.blocks))?;
        Ok((n, self.db.disk_size().saturating_sub(self.db.free_inside()?)))
    }

    /// Bytes of the store's file free for new blocks (see `Db::free_inside`).
    pub fn free_inside(&self) -> Result<u64, DbError> {
        self.db.free_inside()
    }

    /// See [`Db::keep_tail`].
    pub fn keep_tail(&self, bytes: u64) -> std::io::Result<()> {
        self.db.keep_tail(bytes)
    }

    /// See [`Db::tail`].
    pub fn tail(&self) -> u64 {
        self.db.tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(f: u64, i: u64, v: u64, data: &[u8]) -> Block {
        Block::new(BlockKey { file_id: f, index: i }, v, 3, data.to_vec())
    }

    fn cuts(c: &[(u64, u64)]) -> Vec<Cut> {
        c.iter().map(|&(file_id, from_block)| Cut { file_id, from_block, version: 0 }).collect()
    }

    fn open() -> (tempfile::TempDir, BlockStore) {
        let d = tempfile::tempdir().unwrap();
        let (s, complete) = BlockStore::open(d.path()).unwrap();
        assert!(!complete);
        (d, s)
    }

    /// Two writes of a block with the same version (two clients at the same instant) leave every
    /// replica holding the same one, whichever order they came in. Regression: each replica kept
    /// the one that came last, so replicas that got them in different orders disagreed for good.
    #[test]
    fn replicas_given_two_writes_of_one_version_in_either_order_keep_the_same_one() {
        let (x, y) = (blk(1, 0, 5, b"from one client"), blk(1, 0, 5, b"from another"));
        let (_d1, first) = open();
        let (_d2, second) = open();
        first.put(std::slice::from_ref(&x), false, None).unwrap();
        first.put(std::slice::from_ref(&y), false, None).unwrap();
        second.put(std::slice::from_ref(&y), false, None).unwrap();
        second.put(std::slice::from_ref(&x), false, None).unwrap();
        let key = BlockKey { file_id: 1, index: 0 };
        let held = |s: &BlockStore| s.get(&[key]).unwrap().pop().flatten().expect("held").data;
        assert_eq!(held(&first), held(&second));
        // A newer version still replaces either, and an older one neither.
        let newer = blk(1, 0, 6, b"newer");
        first.put(std::slice::from_ref(&newer), false, None).unwrap();
        first.put(std::slice::from_ref(&x), false, None).unwrap();
        assert_eq!(held(&first), b"newer");
    }

    /// A store on disk holding blocks 0..256 of file 1 (16 KiB of 7s each), none of its pages in
    /// memory (synced, dropped from the page cache, never mapped); `None` on a tmpfs, which keeps
    /// every page in memory (the test then has nothing to look at and skips).
    fn on_disk_out_of_memory() -> Option<(tempfile::TempDir, BlockStore, Vec<u8>)> {
        let (d, s) = open();
        let on_tmpfs =
            nix::sys::statfs::statfs(d.path()).is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if on_tmpfs {
            eprintln!("skipping: a tmpfs keeps every page in memory");
            return None;
        }
        let data = vec![7u8; 16384];
        let blocks: Vec<Block> = (0..256).map(|i| blk(1, i, 1, &data)).collect();
        s.put(&blocks, false, None).unwrap();
        s.db.checkpoint().unwrap();
        let file = std::fs::File::open(d.path().join("data.mdb")).unwrap();
        nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        Some((d, s, data))
    }

    /// A get of several blocks reads their pages in from the disk, and not those of the blocks
    /// stored between them (the kernel's read-around for maps would read a window around the
    /// first page touched: 8 MiB on a disk whose read-ahead is 8 MiB).
    #[test]
    fn a_get_of_several_blocks_reads_their_pages_and_not_the_ones_between() {
        let Some((_d, s, data)) = on_disk_out_of_memory() else { return };
        let key = |index| BlockKey { file_id: 1, index };
        let in_memory = |i| {
            let v = s.db.read(|r| {
                Ok::<_, DbError>(s.read_ahead.pages_in_memory(r.get(s.blocks, &key(i).to_bytes())?.unwrap()))
            });
            v.unwrap()
        };
        assert_eq!(in_memory(100), 0);
        let asked: Vec<BlockKey> = (0..8).chain(248..256).map(key).collect();
        let got = s.get(&asked).unwrap();
        assert!(got.iter().all(|b| b.as_ref().is_some_and(|b| b.data == data)));
        assert!(in_memory(0) > 0 && in_memory(255) > 0);
        assert_eq!(in_memory(100), 0, "block 100, 2 MiB from the first block asked, was read in");
    }

    /// A cut reads from the disk the header of each block it looks at, not the block's data (the
    /// kernel's read-around, or a read of the windows around them, would read it all).
    #[test]
    fn a_cut_reads_the_headers_of_the_blocks_it_looks_at_and_not_their_data() {
        let Some((_d, s, _)) = on_disk_out_of_memory() else { return };
        // Where block 100 starts in the map (its pages untouched), and a page of its data.
        let at = s.db.read(|r| {
            Ok::<_, DbError>(
                r.get(s.blocks, &BlockKey { file_id: 1, index: 100 }.to_bytes())?.unwrap().as_ptr() as usize
            )
        });
        let at = at.unwrap();
        assert!(!s.read_ahead.page_in_memory(at));
        let cut = Cut { file_id: 1, from_block: 0, version: 2 };
        assert_eq!(s.truncate(&[cut], None).unwrap(), 256);
        assert!(s.read_ahead.page_in_memory(at), "the header of block 100 was read");
        assert!(!s.read_ahead.page_in_memory(at + 8192), "a page of block 100's data was read");
    }

    #[test]
    fn a_damaged_short_value_is_replaced_not_a_panic() {
        let (_d, s) = open();
        let key = BlockKey { file_id: 7, index: 0 };
        for short in [&b""[..], b"\x01\x02\x03"] {
            s.db.write(|w| w.put(s.blocks, &key.to_bytes(), short)).unwrap();
            // Listing it (what a rebuilding peer asks) and a plain write of it must not panic.
            s.list(BlockKey { file_id: 0, index: 0 }, 10, |_, _| true).unwrap();
            s.put(&[blk(7, 0, 1, b"fresh")], false, None).unwrap();
            assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().data, b"fresh");
        }
        // And the repair path.
        s.db.write(|w| w.put(s.blocks, &key.to_bytes(), b"\x09")).unwrap();
        s.put(&[blk(7, 0, 1, b"again")], true, None).unwrap();
        assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().data, b"again");
    }

    /// Bytes 0, 1, 2... of a `len`-byte block, so that every page differs.
    fn counting(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_range_comes_as_the_pages_holding_it_each_with_its_md5() {
        let (_d, s) = open();
        let data = counting(3 * PAGE + 100);
        let key = BlockKey { file_id: 4, index: 0 };
        s.put(&[blk(4, 0, 2, &data)], false, None).unwrap();
        for (from, to, offset, end) in [
            (PAGE + 10, PAGE + 20, PAGE, 2 * PAGE),
            (PAGE - 1, PAGE + 1, 0, 2 * PAGE),
            (3 * PAGE + 50, 4 * PAGE, 3 * PAGE, data.len()),
            (0, data.len(), 0, data.len()),
            // Past the stored end: the last (short) page, which says where the block ends.
            (5 * PAGE, 6 * PAGE, 3 * PAGE, data.len()),
        ] {
            let p = s.get_range(key, from, to).unwrap().unwrap();
            assert_eq!((p.version, p.replicas, p.len, p.offset), (2, 3, data.len(), offset), "{from}..{to}");
            assert_eq!(p.data, &data[offset..end]);
            let want: Vec<Checksum> = data[offset..end].chunks(PAGE).map(crate::shared::checksum::reference).collect();
            assert_eq!(p.pages, want);
            assert!(p.verifies());
            let hi = to.min(data.len());
            let mut bytes = data.get(from..hi).unwrap_or_default().to_vec();
            bytes.resize(to - from, 0);
            assert_eq!(p.bytes(from, to).unwrap(), bytes);
        }
        assert_eq!(s.get_range(BlockKey { file_id: 4, index: 1 }, 0, 10).unwrap(), None);
        // A block that ends on a page boundary: past its end comes its last page, which verifies.
        let even = counting(2 * PAGE);
        s.put(&[blk(4, 2, 2, &even)], false, None).unwrap();
        let p = s.get_range(BlockKey { file_id: 4, index: 2 }, 2 * PAGE + 10, 3 * PAGE).unwrap().unwrap();
        assert_eq!((p.offset, p.len, p.data.as_slice(), p.pages.len()), (PAGE, 2 * PAGE, &even[PAGE..], 1));
        assert!(p.verifies());
        assert_eq!(p.bytes(2 * PAGE + 10, 3 * PAGE).unwrap(), vec![0; PAGE - 10]);
        // A block of one page has no page checksums: it comes whole, checked against its md5.
        s.put(&[blk(4, 1, 2, b"small")], false, None).unwrap();
        let p = s.get_range(BlockKey { file_id: 4, index: 1 }, 1, 3).unwrap().unwrap();
        assert_eq!((p.offset, p.len, p.data.as_slice(), p.pages.len()), (0, 5, &b"small"[..], 0));
        assert!(p.verifies());
        assert_eq!(p.bytes(1, 3).unwrap(), b"ma");
    }

    #[test]
    fn a_block_stored_before_page_checksums_reads_whole_and_verifies() {
        let (_d, s) = open();
        let data = counting(2 * PAGE);
        let b = blk(5, 0, 3, &data);
        // The value layout from before page checksums: version | replicas | md5 | data.
        let mut old = b.version.to_le_bytes().to_vec();
        old.push(b.replicas);
        old.extend_from_slice(&b.md5);
        old.extend_from_slice(&data);
        s.db.write(|w| w.put(s.blocks, &b.key.to_bytes(), &old)).unwrap();
        assert_eq!(s.get(&[b.key]).unwrap()[0].as_ref(), Some(&b));
        let p = s.get_range(b.key, PAGE, PAGE + 8).unwrap().unwrap();
        assert_eq!((p.offset, p.data.len(), p.pages.len()), (0, 2 * PAGE, 0));
        assert!(p.verifies());
        assert_eq!(s.list(BlockKey { file_id: 0, index: 0 }, 10, |_, r| r == 3).unwrap().0.len(), 1);
        assert!(s.get_verified(&[b.key]).unwrap()[0].as_ref().unwrap().1);
    }

    #[test]
    fn damage_to_a_page_or_its_checksum_is_found_and_a_repair_replaces_it() {
        let (_d, s) = open();
        let data = counting(4 * PAGE);
        let key = BlockKey { file_id: 6, index: 0 };
        s.put(&[blk(6, 0, 1, &data)], false, None).unwrap();
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        // The corrupt call flips the first data byte: page 0 and the block's md5 no longer match.
        s.corrupt(6).unwrap();
        assert!(!s.get_range(key, 0, 10).unwrap().unwrap().verifies());
        assert!(s.get_range(key, PAGE, PAGE + 10).unwrap().unwrap().verifies(), "the other pages are intact");
        assert!(!s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        assert_eq!(s.put(&[blk(6, 0, 1, &data)], true, None).unwrap(), 1);
        assert!(s.get_range(key, 0, 10).unwrap().unwrap().verifies());
        // A damaged page checksum with intact data: the block's md5 still matches, but a scrub
        // and a repair see the damage.
        s.damage_page_checksum(key, 2);
        assert!(s.get(&[key]).unwrap()[0].as_ref().unwrap().verifies());
        assert!(!s.get_range(key, 2 * PAGE, 2 * PAGE + 1).unwrap().unwrap().verifies());
        assert!(!s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        assert_eq!(s.put(&[blk(6, 0, 1, &data)], true, None).unwrap(), 1);
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
    }

    #[test]
    fn a_writers_page_checksums_are_kept_as_sent_and_a_repair_without_them_recomputes() {
        let (_d, s) = open();
        let data = counting(2 * PAGE + 9);
        let key = BlockKey { file_id: 8, index: 0 };
        let sent = Block::batch(3, 2, vec![(key, data.clone())]).pop().unwrap();
        assert_eq!(sent.pages.len(), 3);
        let mut wrong = sent.clone();
        wrong.pages[1][0] ^= 1;
        s.put(&[wrong], false, None).unwrap();
        let p = s.get_range(key, PAGE, PAGE + 1).unwrap().unwrap();
        assert_eq!(p.data, &data[PAGE..2 * PAGE]);
        assert!(!p.verifies(), "the page checksum kept is the one sent");
        assert!(s.get_range(key, 0, 1).unwrap().unwrap().verifies());
        // What a read does on such a page: mend the copy with the whole block, sent without pages.
        assert_eq!(s.put(&[blk(8, 0, 3, &data)], true, None).unwrap(), 1);
        assert!(s.get_range(key, PAGE, PAGE + 1).unwrap().unwrap().verifies());
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        // Sent right, they are kept right.
        s.put(&[Block { version: 4, ..sent }], false, None).unwrap();
        assert!(s.get_range(key, 2 * PAGE, 2 * PAGE + 1).unwrap().unwrap().verifies());
    }

    #[test]
    fn a_copy_whose_page_checksums_alone_are_damaged_keeps_its_version_against_older_repairs() {
        let (_d, s) = open();
        let key = BlockKey { file_id: 9, index: 0 };
        s.put(&[blk(9, 0, 10, &counting(3 * PAGE))], false, None).unwrap();
        s.damage_page_checksum(key, 1);
        // A replica that missed the write (version 9) must not replace good data at version 10.
        assert_eq!(s.put(&[blk(9, 0, 9, &counting(3 * PAGE - 1))], true, None).unwrap(), 0);
        assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().version, 10);
        assert!(!s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        // The same version mends the page checksums.
        assert_eq!(s.put(&[blk(9, 0, 10, &counting(3 * PAGE))], true, None).unwrap(), 1);
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        // Data that fails its MD5 is replaced by any good copy, older or not (as before).
        s.corrupt(9).unwrap();
        assert_eq!(s.put(&[blk(9, 0, 9, &counting(3 * PAGE - 1))], true, None).unwrap(), 1);
    }

    #[test]
    fn versions_checked_in_place_say_what_get_says() {
        let (_d, s) = open();
        let (good, bad, none) =
            (BlockKey { file_id: 4, index: 0 }, BlockKey { file_id: 5, index: 0 }, BlockKey { file_id: 6, index: 0 });
        s.put(&[blk(4, 0, 7, &counting(3 * PAGE)), blk(5, 0, 8, b"will be damaged")], false, None).unwrap();
        s.corrupt(5).unwrap();
        let got = s.versions_checked(&[good, bad, none]).unwrap();
        assert_eq!(got, vec![Some((7, true, 3)), Some((8, false, 3)), None]);
        let whole = s.get(&[good, bad, none]).unwrap();
        let from_get: Vec<Option<(u64, bool, u8)>> =
            whole.iter().map(|b| b.as_ref().map(|b| (b.version, b.verifies(), b.replicas))).collect();
        assert_eq!(got, from_get);
    }

    #[test]
    fn a_value_damaged_in_its_header_reads_as_a_corrupt_copy_not_an_error() {
        let (_d, s) = open();
        let key = BlockKey { file_id: 3, index: 0 };
        // The page flag set on a value kept without page checksums (as written before header
        // checks): its "page count" is data.
        s.put(&[blk(3, 0, 5, b"short block")], false, None).unwrap();
        s.edit_stored(key, |v| *v = unchecked(&blk(3, 0, 5, b"short block")));
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1, "an unchecked value reads");
        s.edit_stored(key, |v| v[8] |= PAGED);
        let (b, ok) = s.get_verified(&[key]).unwrap().pop().flatten().unwrap();
        assert!(!ok);
        assert_eq!(b.data, b"short block", "read as far as it goes");
        assert!(s.get_range(key, 0, 3).unwrap().is_some());
        assert_eq!(s.put(&[blk(3, 0, 5, b"short block")], true, None).unwrap(), 1, "a repair replaces it");
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
        // A page count that does not match the data.
        s.put(&[blk(3, 0, 6, &counting(2 * PAGE))], false, None).unwrap();
        s.edit_stored(key, |v| v[HEADER] += 1);
        let (b, ok) = s.get_verified(&[key]).unwrap().pop().flatten().unwrap();
        assert!(!ok && !b.verifies());
        assert!(!s.get_range(key, 0, 3).unwrap().unwrap().verifies());
        assert_eq!(s.put(&[blk(3, 0, 6, &counting(2 * PAGE))], true, None).unwrap(), 1);
        assert!(s.get_verified(&[key]).unwrap()[0].as_ref().unwrap().1);
    }

    /// `b` stored as values were before header checks.
    fn unchecked(b: &Block) -> Vec<u8> {
        let mut v = b.version.to_le_bytes().to_vec();
        v.push(b.replicas);
        v.extend_from_slice(&b.md5);
        v.extend_from_slice(&b.data);
        v
    }

    /// A bit flipped on disk in a stored version: the copy reads as the oldest and corrupt, so a
    /// write, a repair or a cut replaces it. Before, it stood as the newest copy: it refused every
    /// later write of the block (answering it done) and survived cuts.
    #[test]
    fn a_version_damaged_on_disk_is_caught_by_the_header_check() {
        let (_d, s) = open();
        let key = BlockKey { file_id: 3, index: 0 };
        s.put(&[blk(3, 0, 5, b"v5")], false, None).unwrap();
        s.edit_stored(key, |v| v[7] ^= 0x40);
        assert_eq!(s.versions(&[key]).unwrap(), vec![0]);
        let (b, ok) = s.get_verified(&[key]).unwrap().pop().flatten().unwrap();
        assert!(!ok && !b.verifies(), "a copy with a damaged header reads as corrupt");
        assert_eq!(s.put(&[blk(3, 0, 6, b"v6")], false, None).unwrap(), 1, "a later write is refused");
        assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().data, b"v6");
        s.edit_stored(key, |v| v[7] ^= 0x40);
        let cut = Cut { file_id: 3, from_block: 0, version: 7 };
        assert_eq!(s.truncate(&[cut], None).unwrap(), 1, "a cut leaves it");
        // Values written before the check are read as they were.
        let old = blk(4, 0, 5, b"old");
        s.put(std::slice::from_ref(&old), false, None).unwrap();
        s.edit_stored(old.key, |v| *v = unchecked(&old));
        assert_eq!(s.versions(&[old.key]).unwrap(), vec![5]);
        assert!(s.get_verified(&[old.key]).unwrap()[0].as_ref().unwrap().1);
    }

    #[test]
    fn a_replica_count_that_would_read_as_a_flag_is_refused() {
        let (_d, s) = open();
        for replicas in [PAGED, CHECKED] {
            let mut b = blk(7, 0, 1, b"x");
            b.replicas = replicas;
            assert!(matches!(s.put(&[b], false, None), Err(StoreError::BadRequest(_))));
        }
    }

    #[test]
    fn a_conditional_drop_spares_a_block_written_again_since_it_was_listed() {
        let (_d, s) = open();
        s.put(&[blk(3, 0, 5, b"a"), blk(3, 1, 5, b"b")], false, None).unwrap();
        s.put(&[blk(3, 1, 6, b"newer")], false, None).unwrap();
        let listed = [(BlockKey { file_id: 3, index: 0 }, 5), (BlockKey { file_id: 3, index: 1 }, 5)];
        assert_eq!(s.drop_if(&listed).unwrap(), 1);
        let got = s.get(&[listed[0].0, listed[1].0]).unwrap();
        assert!(got[0].is_none());
        assert_eq!(got[1].as_ref().unwrap().data, b"newer");
        assert_eq!(s.drop_if(&listed).unwrap(), 0, "idempotent");
    }

    #[test]
    fn a_batch_with_one_bad_checksum_stores_nothing() {
        let (_d, s) = open();
        let mut bad = blk(2, 1, 1, b"world");
        bad.md5[0] ^= 1;
        assert!(matches!(s.put(&[blk(2, 0, 1, b"hello"), bad], false, None), Err(StoreError::BadRequest(_))));
        assert_eq!(s.get(&[BlockKey { file_id: 2, index: 0 }]).unwrap(), vec![None]);
    }

    #[test]
    fn older_versions_do_not_replace_newer_and_repair_fills_only_bad_blocks() {
        let (_d, s) = open();
        let k = BlockKey { file_id: 2, index: 0 };
        s.put(&[blk(2, 0, 5, b"new")], false, None).unwrap();
        assert_eq!(s.put(&[blk(2, 0, 4, b"old")], false, None).unwrap(), 0);
        assert_eq!(s.put(&[blk(2, 0, 5, b"new")], true, None).unwrap(), 0, "repair must not replace a good equal copy");
        // Of two writes of one version, the one with the larger MD5 stands higher (as in a put).
        let stored = blk(2, 0, 5, b"new").md5;
        let lower = (0u8..=255).map(|i| blk(2, 0, 5, &[b'r', i])).find(|b| b.md5 < stored).unwrap();
        assert_eq!(s.put(&[lower], true, None).unwrap(), 0, "repair must not replace a good copy of a higher write");
        let higher = (0u8..=255).map(|i| blk(2, 0, 5, &[b'r', i])).find(|b| b.md5 > stored).unwrap();
        assert_eq!(s.put(std::slice::from_ref(&higher), true, None).unwrap(), 1, "a higher write of one version");
        assert_eq!(s.get(&[k]).unwrap()[0].as_ref().unwrap().data, higher.data);
        s.corrupt(2).unwrap();
        assert!(!s.get(&[k]).unwrap()[0].as_ref().unwrap().verifies());
        assert_eq!(s.put(&[blk(2, 0, 5, b"new")], true, None).unwrap(), 1);
        assert_eq!(s.get(&[k]).unwrap()[0].as_ref().unwrap().data, b"new");
    }

    #[test]
    fn truncate_removes_only_the_tail_of_that_file() {
        let (_d, s) = open();
        let bs: Vec<Block> =
            (0..5).map(|i| blk(7, i, 1, b"x")).chain([blk(8, 0, 1, b"y"), blk(6, 9, 1, b"z")]).collect();
        s.put(&bs, false, None).unwrap();
        assert_eq!(s.truncate(&cuts(&[(7, 2)]), None).unwrap(), 3);
        let (keys, done) = s.list(BlockKey { file_id: 0, index: 0 }, 100, |_, _| true).unwrap();
        assert!(done);
        let keys: Vec<(u64, u64)> = keys.iter().map(|(k, ..)| (k.file_id, k.index)).collect();
        assert_eq!(keys, vec![(6, 9), (7, 0), (7, 1), (8, 0)]);
        assert_eq!(s.truncate(&cuts(&[(u64::MAX, 0)]), None).unwrap(), 0);
        // Several files in one call (one commit): a batch of deleted files.
        assert_eq!(s.truncate(&cuts(&[(6, 0), (8, 0), (9, 0)]), None).unwrap(), 2);
        let (keys, _) = s.list(BlockKey { file_id: 0, index: 0 }, 100, |_, _| true).unwrap();
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn completeness_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, _) = BlockStore::open(d.path()).unwrap();
            s.put(&[blk(2, 0, 1, b"a")], false, None).unwrap();
            s.mark_complete().unwrap();
        }
        let (s, complete) = BlockStore::open(d.path()).unwrap();
        assert!(complete);
        assert_eq!(s.stats().unwrap().0, 1);
    }

    #[test]
    fn a_versioned_cut_keeps_newer_blocks_and_refuses_older_copies_later() {
        let (_d, s) = open();
        s.put(&[blk(4, 0, 5, b"a"), blk(4, 1, 5, b"b"), blk(4, 2, 9, b"new")], false, None).unwrap();
        // A cut at version 7 from block 1: block 1 (version 5) goes, block 2 (version 9) stays.
        assert_eq!(s.truncate(&[Cut { file_id: 4, from_block: 1, version: 7 }], None).unwrap(), 1);
        let k = |i| BlockKey { file_id: 4, index: i };
        assert_eq!(s.versions(&[k(0), k(1), k(2)]).unwrap(), vec![5, 0, 9]);
        // A copy of the removed version arriving later (a hand-over, a scrub) is not stored back ...
        assert_eq!(s.put(&[blk(4, 1, 5, b"b")], true, None).unwrap(), 0);
        assert_eq!(s.put(&[blk(4, 1, 6, b"b")], false, None).unwrap(), 0);
        // ... but a write after the cut is.
        assert_eq!(s.put(&[blk(4, 1, 8, b"c")], false, None).unwrap(), 1);
        assert_eq!(s.cut_versions(&[k(0), k(1), k(5)]).unwrap(), vec![0, 7, 7]);
        // A wider, newer cut replaces the narrower one; pruning by age forgets it.
        s.truncate(&[Cut { file_id: 4, from_block: 0, version: 10 }], None).unwrap();
        assert_eq!(s.cuts_of(4).unwrap(), vec![(0, 10)]);
        assert_eq!(s.prune_cuts(11).unwrap(), 1);
        assert_eq!(s.cuts_of(4).unwrap(), vec![]);
    }

    /// A cut waiting to be handed over keeps its file's tombstone past its age, and goes to its
    /// server before the blocks that wait for it. Regression: a server back from a long absence
    /// got its many block hints first, its peers pruned the tombstone meanwhile, and the blocks
    /// of the deleted file it still held were handed back to them by its scrubber.
    #[test]
    fn a_cut_waiting_to_be_handed_over_keeps_its_tombstone_and_goes_first() {
        let (_d, s) = open();
        let me = HintFor { me: 0, n: 4 };
        let blocks: Vec<Block> = (0..8).map(|i| blk(2, i, 5, b"x")).collect();
        s.put(&blocks, false, Some(me)).unwrap();
        s.truncate(&[Cut { file_id: 9, from_block: 0, version: 7 }], Some(me)).unwrap();
        let first = s.hints_of(1, 1).unwrap();
        assert!(matches!(first[..], [(1, Hint::Cut(Cut { file_id: 9, .. }))]), "{first:?}");
        assert_eq!(s.prune_cuts(100).unwrap(), 0, "the tombstone stays while its cut waits");
        assert_eq!(s.cuts_of(9).unwrap(), vec![(0, 7)]);
        let cuts: Vec<(usize, Hint)> = (1..4).flat_map(|t| s.hints_of(t, 1).unwrap()).collect();
        assert_eq!(cuts.len(), 3);
        s.forget_hints(&cuts).unwrap();
        assert_eq!(s.prune_cuts(100).unwrap(), 1);
        assert_eq!(s.cuts_of(9).unwrap(), vec![]);
    }

    #[test]
    fn cuts_are_listed_by_file_in_pages() {
        let (_d, s) = open();
        let cut = |file_id, from_block, version| Cut { file_id, from_block, version };
        // Two cuts of file 3 (neither covers the other), one each of 5, 8 and 9; an unversioned
        // cut of 7 keeps nothing.
        let all = [cut(3, 4, 20), cut(3, 1, 10), cut(5, 0, 7), cut(8, 2, 8), cut(9, 0, 9)];
        s.truncate(&all, None).unwrap();
        s.truncate(&[cut(7, 0, 0)], None).unwrap();
        let (page, done) = s.list_cuts(0, 2).unwrap();
        assert_eq!(page, vec![cut(3, 4, 20), cut(3, 1, 10), cut(5, 0, 7)]);
        assert!(!done);
        let (page, done) = s.list_cuts(6, 2).unwrap();
        assert_eq!(page, vec![cut(8, 2, 8), cut(9, 0, 9)]);
        assert!(done);
        assert_eq!(s.list_cuts(10, 2).unwrap(), (vec![], true));
        assert_eq!(s.list_cuts(9, 5).unwrap(), (vec![cut(9, 0, 9)], true));
    }

    #[test]
    fn hints_name_the_other_holders_and_are_forgotten_only_if_not_renewed() {
        let (_d, s) = open();
        let me = HintFor { me: 1, n: 4 };
        let key = BlockKey { file_id: 3, index: 0 };
        let holders = replica_servers(3, 0, 3, 4);
        let me = HintFor { me: holders[0], ..me };
        s.put(&[blk(3, 0, 5, b"a")], false, Some(me)).unwrap();
        let all = |s: &BlockStore| -> Vec<(usize, Hint)> { (0..4).flat_map(|t| s.hints_of(t, 100).unwrap()).collect() };
        let hints = all(&s);
        let want: Vec<(usize, Hint)> =
            holders[1..].iter().map(|&t| (t, Hint::Block { key, version: 5 })).collect::<Vec<_>>();
        let mut sorted = want.clone();
        sorted.sort_by_key(|h| h.0);
        assert_eq!(hints, sorted);
        // Renewed by a newer write before the first hand-over finished: that hint stays.
        s.put(&[blk(3, 0, 6, b"b")], false, Some(me)).unwrap();
        s.forget_hints(&hints).unwrap();
        assert_eq!(s.hint_count().unwrap(), 2);
        s.forget_hints(&all(&s)).unwrap();
        assert_eq!(s.hint_count().unwrap(), 0);
        // A cut is noted for every other server; an older repair write notes nothing.
        s.truncate(&[Cut { file_id: 3, from_block: 0, version: 9 }], Some(me)).unwrap();
        assert_eq!(s.hint_count().unwrap(), 3);
        assert_eq!(s.put(&[blk(3, 0, 2, b"old")], true, Some(me)).unwrap(), 0);
        assert_eq!(s.hint_count().unwrap(), 3);
    }

    #[test]
    fn equal_ranges_have_equal_digests_and_a_version_changes_it() {
        let (_d1, a) = open();
        let (_d2, b) = open();
        let blocks = [blk(1, 0, 3, b"x"), blk(1, 1, 3, b"y"), blk(2, 0, 4, b"z")];
        a.put(&blocks, false, None).unwrap();
        b.put(&blocks, false, None).unwrap();
        let all = |_: BlockKey, _: u8| true;
        let from = BlockKey { file_id: 0, index: 0 };
        assert_eq!(a.digest(from, None, all).unwrap(), b.digest(from, None, all).unwrap());
        assert_eq!(a.digest(from, None, all).unwrap().0, 3);
        b.put(&[blk(1, 1, 5, b"y2")], false, None).unwrap();
        assert_ne!(a.digest(from, None, all).unwrap(), b.digest(from, None, all).unwrap());
        // The range after the difference still agrees.
        let after = BlockKey { file_id: 2, index: 0 };
        assert_eq!(a.digest(after, None, all).unwrap(), b.digest(after, None, all).unwrap());
        let upto = Some(BlockKey { file_id: 1, index: 1 });
        assert_eq!(a.digest(from, upto, all).unwrap(), b.digest(from, upto, all).unwrap());
    }

    /// Small changes are journaled, not checkpointed: reopening (as after a crash, which takes the
    /// store back to its last checkpoint) applies them again, in order, from the journal; a large
    /// put is checkpointed at once. Concurrent puts share the journal's syncs and all stay.
    #[test]
    fn changes_after_the_checkpoint_are_applied_again_from_the_journal() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![7u8; 2 * journal::SMALL_PUT];
        {
            let (mut s, _) = BlockStore::open(d.path()).unwrap();
            s.checkpoint_every = Duration::from_secs(3600);
            // Checkpointed, so it goes first: a checkpoint would make the small changes durable too.
            s.put(&[Block::new(BlockKey { file_id: 3, index: 0 }, 1, 3, big.clone())], false, None).unwrap();
            s.put(&[blk(1, 0, 1, b"one"), blk(1, 1, 1, b"two")], false, None).unwrap();
            s.put(&[blk(1, 0, 2, b"one again")], false, Some(HintFor { me: 0, n: 4 })).unwrap();
            s.truncate(&cuts(&[(1, 1)]), None).unwrap();
            s.put(&[blk(2, 0, 1, b"dropped")], false, None).unwrap();
            s.drop_if(&[(BlockKey { file_id: 2, index: 0 }, 1)]).unwrap();
            let s = std::sync::Arc::new(s);
            let writers: Vec<_> = (0..8u64)
                .map(|t| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        for i in 0..20 {
                            s.put(&[blk(10 + t, i, 1, &[t as u8; 100])], false, None).unwrap();
                        }
                    })
                })
                .collect();
            writers.into_iter().for_each(|w| w.join().unwrap());
            assert!(s.lock_journal().next > 160, "small changes go to the journal");
        }
        let (s, _) = BlockStore::open(d.path()).unwrap();
        let got = s.get(&[BlockKey { file_id: 1, index: 0 }, BlockKey { file_id: 1, index: 1 }]).unwrap();
        assert_eq!(got[0].as_ref().map(|b| b.data.as_slice()), Some(b"one again".as_slice()));
        assert_eq!(got[1], None, "cut");
        assert_eq!(s.get(&[BlockKey { file_id: 2, index: 0 }]).unwrap()[0], None, "dropped");
        let others = replica_servers(1, 0, 3, 4).into_iter().filter(|&t| t != 0).count() as u64;
        assert_eq!(s.hint_count().unwrap(), others, "the hints a journaled put noted");
        for t in 0..8u64 {
            let keys: Vec<_> = (0..20).map(|i| BlockKey { file_id: 10 + t, index: i }).collect();
            assert!(s.get(&keys).unwrap().iter().all(|b| b.as_ref().is_some_and(|b| b.data == [t as u8; 100])));
        }
        assert_eq!(s.get(&[BlockKey { file_id: 3, index: 0 }]).unwrap()[0].as_ref().map(|b| &b.data), Some(&big));
        // Opening checkpointed what it applied again: nothing is left to apply.
        assert_eq!(s.applied().unwrap(), s.lock_journal().next - 1);
    }

    /// A failed sync of the journal leaves nothing unanswered or lost: the change that met it is
    /// checkpointed instead (here the failed write-back lost the journal's records, so a reopen
    /// right after finds the change only through that checkpoint), and the journal is turned off
    /// (what it wrote may have a hole): every change after is checkpointed, none appended.
    #[test]
    fn a_failed_journal_sync_is_made_good_by_a_checkpoint_and_the_journal_turned_off() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;

        let syncs = Arc::new(AtomicUsize::new(0));
        let failing = |s: &BlockStore| {
            let counted = syncs.clone();
            s.lock_journal().wal.sync_with(Arc::new(move |f: &std::fs::File| {
                use std::os::unix::fs::FileExt;
                counted.fetch_add(1, Ordering::SeqCst);
                f.write_all_at(&vec![0u8; journal::SEGMENT as usize], 0)?;
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }));
        };
        let reopen = |d: &tempfile::TempDir| {
            let (mut s, _) = BlockStore::open(d.path()).unwrap();
            s.checkpoint_every = Duration::from_secs(3600);
            s
        };
        let held = |s: &BlockStore, n: u64| -> Vec<Option<Vec<u8>>> {
            let keys: Vec<_> = (0..n).map(|i| BlockKey { file_id: 1, index: i }).collect();
            s.get(&keys).unwrap().into_iter().map(|b| b.map(|b| b.data)).collect()
        };
        let d = tempfile::tempdir().unwrap();
        let s = reopen(&d);
        s.put(&[blk(1, 0, 1, b"before")], false, None).unwrap();
        failing(&s);
        s.put(&[blk(1, 1, 1, b"met the failure")], false, None).expect("checkpointed instead");
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        assert!(s.lock_journal().broken);
        drop(s);
        let s = reopen(&d);
        assert_eq!(held(&s, 2), vec![Some(b"before".to_vec()), Some(b"met the failure".to_vec())]);

        failing(&s);
        s.put(&[blk(1, 2, 1, b"met it too")], false, None).unwrap();
        let next = s.lock_journal().next;
        s.put(&[blk(1, 3, 1, b"after")], false, None).expect("checkpointed");
        s.truncate(&cuts(&[(1, 4)]), None).expect("checkpointed");
        assert_eq!(syncs.load(Ordering::SeqCst), 2, "a turned-off journal is not synced again");
        assert_eq!(s.lock_journal().next, next, "nothing more is appended");
        drop(s);
        let s = reopen(&d);
        assert_eq!(held(&s, 4)[3].as_deref(), Some(b"after".as_slice()));
    }

    /// A change whose journal append failed gives its record's index back by writing the journal's
    /// position back in the store. If even that write fails (a full disk), the index stays
    /// claimed, and a checkpoint taken meanwhile may hold the claim: the journal is turned off.
    /// It stayed on, the next change's record took the same index, and a reopen from that
    /// checkpoint skipped it, losing a put that was answered.
    #[test]
    fn a_failed_append_whose_index_cannot_be_given_back_turns_the_journal_off() {
        let d = tempfile::tempdir().unwrap();
        let reopen = || {
            let (mut s, _) = BlockStore::open(d.path()).unwrap();
            s.checkpoint_every = Duration::from_secs(3600);
            s
        };
        let s = reopen();
        s.put(&[blk(1, 0, 1, b"before")], false, None).unwrap();
        let arm = s.db.fail_next_write.clone();
        s.lock_journal().wal.before_append = Some(Box::new(move || {
            arm.store(true, Ordering::Release);
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }));
        assert!(s.put(&[blk(1, 1, 1, b"not answered")], false, None).is_err());
        // Another change's checkpoint, taken meanwhile.
        s.db.checkpoint().unwrap();
        s.put(&[blk(1, 2, 1, b"answered")], false, None).unwrap();
        // Killed: no checkpoint at the end.
        drop(s);
        let s = reopen();
        let got = s.get(&[BlockKey { file_id: 1, index: 2 }]).unwrap().pop().flatten();
        assert_eq!(got.map(|b| b.data).as_deref(), Some(b"answered".as_slice()));
    }

    /// The kernel reports a failed write-back to one sync only, and may then mark the failed
    /// pages clean: a sync of the journal that ran while another failed can succeed over a hole.
    /// The change waiting on it is answered only once a checkpoint covers it. Here a put (X) is
    /// held in its sync while another put (Y) begins a new segment, whose sync of the full one
    /// fails: X's sync then succeeds, and X must not be answered while Y's checkpoint is pending.
    #[test]
    fn a_sync_that_ran_beside_a_failed_one_answers_only_after_the_checkpoint() {
        use std::sync::Arc;

        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = BlockStore::open(d.path()).unwrap();
        s.checkpoint_every = Duration::from_secs(3600);
        let hook = Arc::new(wal::testing::HeldThenFailed::default());
        s.lock_journal().wal.sync_with(hook.sync());
        let s = Arc::new(s);
        let data = |i: u64| vec![i as u8; 64_000];
        // Fifteen records of ~64 KB and X's fill most of a 1 MiB segment; Y's does not fit after.
        for i in 0..15 {
            s.put(&[blk(1, i, 1, &data(i))], false, None).unwrap();
        }
        hook.arm();
        let x = {
            let (s, hook) = (s.clone(), hook.clone());
            std::thread::spawn(move || {
                let r = s.put(&[blk(1, 15, 1, &data(15))], false, None).map(|_| ());
                hook.answered(r.is_ok());
                r
            })
        };
        hook.wait_held();
        s.put(&[blk(1, 16, 1, &data(16))], false, None).expect("Y is checkpointed instead");
        x.join().unwrap().expect("X is durable through Y's checkpoint");
        assert_eq!(hook.answered_meanwhile(), None, "X was answered on its sync alone");
        assert!(s.lock_journal().broken);
        drop(s);
        let (s, _) = BlockStore::open(d.path()).unwrap();
        let keys: Vec<_> = (0..17).map(|i| BlockKey { file_id: 1, index: i }).collect();
        let got = s.get(&keys).unwrap();
        assert!(got.iter().enumerate().all(|(i, b)| b.as_ref().is_some_and(|b| b.data == data(i as u64))));
    }

    /// A crash that tears the journal's last record (its sync never returned, so its change was
    /// never answered) loses only that record.
    #[test]
    fn a_torn_last_journal_record_loses_only_itself() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = BlockStore::open(d.path()).unwrap();
            s.checkpoint_every = Duration::from_secs(3600);
            s.put(&[blk(1, 0, 1, b"kept")], false, None).unwrap();
            s.put(&[blk(1, 1, 1, b"torn")], false, None).unwrap();
        }
        let seg = std::fs::read_dir(d.path().join(JOURNAL))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "wal"))
            .expect("a segment");
        let mut bytes = std::fs::read(&seg).unwrap();
        let end = bytes.iter().rposition(|&b| b != 0).unwrap();
        bytes[end - 2] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let (s, _) = BlockStore::open(d.path()).unwrap();
        let got = s.get(&[BlockKey { file_id: 1, index: 0 }, BlockKey { file_id: 1, index: 1 }]).unwrap();
        assert_eq!(got[0].as_ref().map(|b| b.data.as_slice()), Some(b"kept".as_slice()));
        assert_eq!(got[1], None);
        // And it goes on from there.
        s.put(&[blk(1, 2, 1, b"after")], false, None).unwrap();
        drop(s);
        let (s, _) = BlockStore::open(d.path()).unwrap();
        assert!(s.get(&[BlockKey { file_id: 1, index: 2 }]).unwrap()[0].is_some());
    }
}
