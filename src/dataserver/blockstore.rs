//! A dataserver's block store: blocks keyed by (file id, block index), each with its MD5
//! and version, persisted in LMDB. Every changing call is one durable transaction, so a batch of
//! blocks costs one commit.

use std::path::Path;

use crate::shared::block::{checksum, Block, BlockKey, Checksum};
use crate::shared::db::{Db, DbError, Read, Table};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is malformed; nothing was stored. Retrying it cannot succeed.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Value layout: version (8, LE) | replicas (1) | md5 (16) | data.
const HEADER: usize = 8 + 1 + 16;
/// The key under which `meta` records that the store holds its full share (no rebuild needed).
const COMPLETE: &[u8] = b"complete";

pub struct BlockStore {
    db: Db,
    blocks: Table,
    meta: Table,
}

fn encode(b: &Block) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + b.data.len());
    v.extend_from_slice(&b.version.to_le_bytes());
    v.push(b.replicas);
    v.extend_from_slice(&b.md5);
    v.extend_from_slice(&b.data);
    v
}

fn decode(key: BlockKey, v: &[u8]) -> Result<Block, DbError> {
    if v.len() < HEADER {
        return Err(DbError::Other(format!("stored block {key:?} is truncated")));
    }
    let mut version = [0u8; 8];
    version.copy_from_slice(&v[..8]);
    let mut md5: Checksum = [0; 16];
    md5.copy_from_slice(&v[9..25]);
    Ok(Block { key, version: u64::from_le_bytes(version), replicas: v[8], md5, data: v[HEADER..].to_vec() })
}

/// Whether a stored block verifies, without copying it.
fn stored_verifies(v: &[u8]) -> bool {
    v.len() >= HEADER && checksum(&v[HEADER..]) == v[9..25]
}

/// The version of a stored block; a value too short to hold one (damaged on disk) counts as the
/// oldest, so that any write or repair replaces it.
fn stored_version(v: &[u8]) -> u64 {
    match v.get(..8) {
        Some(b) => u64::from_le_bytes(b.try_into().unwrap_or_default()),
        None => 0,
    }
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
    /// Opens the store in `dir`. Returns whether it already held its full share: false for a new or
    /// wiped disk, and for one whose rebuild had not finished.
    pub fn open(dir: &Path) -> Result<(BlockStore, bool), DbError> {
        let (db, t) = Db::open(dir, ["blocks", "meta"])?;
        let store = BlockStore { db, blocks: t[0], meta: t[1] };
        let complete = store.db.read(|r| Ok::<_, DbError>(r.get(store.meta, COMPLETE)?.is_some()))?;
        Ok((store, complete))
    }

    /// Records that the store holds its full share: a restart after this needs no rebuild.
    pub fn mark_complete(&self) -> Result<(), DbError> {
        self.db.write(|w| w.put(self.meta, COMPLETE, b"1"))
    }

    /// Stores a batch in one durable transaction. Every block must verify against its checksum, or
    /// nothing is stored. A normal write replaces an equal or older version (retries are
    /// idempotent; concurrent writers converge on the highest version). A `repair` write only fills
    /// a missing or corrupt block or replaces an older one. Returns how many blocks were written.
    pub fn put(&self, blocks: &[Block], repair: bool) -> Result<usize, StoreError> {
        if let Some(b) = blocks.iter().find(|b| !b.verifies()) {
            return Err(StoreError::BadRequest(format!(
                "block {}/{} does not match its checksum",
                b.key.file_id, b.key.index
            )));
        }
        if let Some(b) = blocks.iter().find(|b| b.replicas == 0) {
            return Err(StoreError::BadRequest(format!("block {}/{} has 0 replicas", b.key.file_id, b.key.index)));
        }
        self.db.write(|w| {
            let mut written = 0;
            for b in blocks {
                let key = b.key.to_bytes();
                let replace = match w.get(self.blocks, &key)? {
                    None => true,
                    Some(old) if repair => stored_version(old) < b.version || !stored_verifies(old),
                    Some(old) => stored_version(old) <= b.version,
                };
                if replace {
                    w.put(self.blocks, &key, &encode(b))?;
                    written += 1;
                }
            }
            Ok(written)
        })
    }

    /// Reads blocks as stored, corrupt or not: verifying is the reader's job.
    pub fn get(&self, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, DbError> {
        self.db.read(|r| {
            keys.iter().map(|k| r.get(self.blocks, &k.to_bytes())?.map(|v| decode(*k, v)).transpose()).collect()
        })
    }

    /// Per (file id, first block), deletes that file's blocks with index >= the first block, all in
    /// one durable transaction. Returns how many blocks there were.
    pub fn truncate(&self, cuts: &[(u64, u64)]) -> Result<u64, DbError> {
        self.db.write(|w| {
            let mut removed = 0;
            for &(file_id, from_block) in cuts {
                let (from, to) = file_range(file_id, from_block);
                removed += w.delete_range(self.blocks, &from, &to)?;
            }
            Ok(removed)
        })
    }

    /// Deletes each listed block that is held with exactly the version given, in one durable
    /// transaction; a block written again since it was listed stays. Returns how many went.
    pub fn drop_if(&self, keys: &[(BlockKey, u64)]) -> Result<u64, DbError> {
        self.db.write(|w| {
            let mut removed = 0;
            for &(key, version) in keys {
                let k = key.to_bytes();
                let held = w.get(self.blocks, &k)?.filter(|v| v.len() >= HEADER).map(stored_version);
                if held == Some(version) && w.delete(self.blocks, &k)? {
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    /// Flips one byte of the first block of the file held here. Returns its index.
    pub fn corrupt(&self, file_id: u64) -> Result<Option<u64>, DbError> {
        let (from, to) = file_range(file_id, 0);
        self.db.write(|w| {
            let Some((k, mut v)) = w.scan(self.blocks, &from, &to, 1)?.pop() else {
                return Ok(None);
            };
            // Flip a data byte if there is one, else a checksum byte: either way the MD5 no longer matches.
            let at = if v.len() > HEADER { HEADER } else { 9 };
            v[at] ^= 0xff;
            w.put(self.blocks, &k, &v)?;
            Ok(BlockKey::from_bytes(&k).map(|k| k.index))
        })
    }

    /// Up to `limit` keys (with versions) after `after`, in key order, of blocks for which
    /// `wanted(key, replicas)` holds; and whether the scan reached the end. Reads only each block's
    /// header, in place: listing a store copies no block data.
    pub fn list(
        &self,
        after: BlockKey,
        limit: usize,
        wanted: impl Fn(BlockKey, u8) -> bool,
    ) -> Result<(Vec<(BlockKey, u64)>, bool), DbError> {
        let mut from = after.to_bytes().to_vec();
        from.push(0); // strictly after `after`
        let mut out = Vec::new();
        let mut reached_end = true;
        self.db.read(|r| {
            r.visit(self.blocks, &from, &[0xffu8; 17], |k, v| {
                let Some(key) = BlockKey::from_bytes(k) else { return true };
                if v.len() >= HEADER && wanted(key, v[8]) {
                    out.push((key, stored_version(v)));
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

    /// (blocks held, bytes on disk).
    pub fn stats(&self) -> Result<(u64, u64), DbError> {
        let n = self.db.read(|r| r.len(self.blocks))?;
        Ok((n, self.db.disk_size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(f: u64, i: u64, v: u64, data: &[u8]) -> Block {
        Block::new(BlockKey { file_id: f, index: i }, v, 3, data.to_vec())
    }

    fn open() -> (tempfile::TempDir, BlockStore) {
        let d = tempfile::tempdir().unwrap();
        let (s, complete) = BlockStore::open(d.path()).unwrap();
        assert!(!complete);
        (d, s)
    }

    #[test]
    fn a_damaged_short_value_is_replaced_not_a_panic() {
        let (_d, s) = open();
        let key = BlockKey { file_id: 7, index: 0 };
        for short in [&b""[..], b"\x01\x02\x03"] {
            s.db.write(|w| w.put(s.blocks, &key.to_bytes(), short)).unwrap();
            // Listing it (what a rebuilding peer asks) and a plain write of it must not panic.
            s.list(BlockKey { file_id: 0, index: 0 }, 10, |_, _| true).unwrap();
            s.put(&[blk(7, 0, 1, b"fresh")], false).unwrap();
            assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().data, b"fresh");
        }
        // And the repair path.
        s.db.write(|w| w.put(s.blocks, &key.to_bytes(), b"\x09")).unwrap();
        s.put(&[blk(7, 0, 1, b"again")], true).unwrap();
        assert_eq!(s.get(&[key]).unwrap()[0].as_ref().unwrap().data, b"again");
    }

    #[test]
    fn a_conditional_drop_spares_a_block_written_again_since_it_was_listed() {
        let (_d, s) = open();
        s.put(&[blk(3, 0, 5, b"a"), blk(3, 1, 5, b"b")], false).unwrap();
        s.put(&[blk(3, 1, 6, b"newer")], false).unwrap();
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
        assert!(matches!(s.put(&[blk(2, 0, 1, b"hello"), bad], false), Err(StoreError::BadRequest(_))));
        assert_eq!(s.get(&[BlockKey { file_id: 2, index: 0 }]).unwrap(), vec![None]);
    }

    #[test]
    fn older_versions_do_not_replace_newer_and_repair_fills_only_bad_blocks() {
        let (_d, s) = open();
        let k = BlockKey { file_id: 2, index: 0 };
        s.put(&[blk(2, 0, 5, b"new")], false).unwrap();
        assert_eq!(s.put(&[blk(2, 0, 4, b"old")], false).unwrap(), 0);
        assert_eq!(s.put(&[blk(2, 0, 5, b"rep")], true).unwrap(), 0, "repair must not replace a good equal version");
        s.corrupt(2).unwrap();
        assert!(!s.get(&[k]).unwrap()[0].as_ref().unwrap().verifies());
        assert_eq!(s.put(&[blk(2, 0, 5, b"new")], true).unwrap(), 1);
        assert_eq!(s.get(&[k]).unwrap()[0].as_ref().unwrap().data, b"new");
    }

    #[test]
    fn truncate_removes_only_the_tail_of_that_file() {
        let (_d, s) = open();
        let bs: Vec<Block> =
            (0..5).map(|i| blk(7, i, 1, b"x")).chain([blk(8, 0, 1, b"y"), blk(6, 9, 1, b"z")]).collect();
        s.put(&bs, false).unwrap();
        assert_eq!(s.truncate(&[(7, 2)]).unwrap(), 3);
        let (keys, done) = s.list(BlockKey { file_id: 0, index: 0 }, 100, |_, _| true).unwrap();
        assert!(done);
        let keys: Vec<(u64, u64)> = keys.iter().map(|(k, _)| (k.file_id, k.index)).collect();
        assert_eq!(keys, vec![(6, 9), (7, 0), (7, 1), (8, 0)]);
        assert_eq!(s.truncate(&[(u64::MAX, 0)]).unwrap(), 0);
        // Several files in one call (one commit): a batch of deleted files.
        assert_eq!(s.truncate(&[(6, 0), (8, 0), (9, 0)]).unwrap(), 2);
        let (keys, _) = s.list(BlockKey { file_id: 0, index: 0 }, 100, |_, _| true).unwrap();
        assert_eq!(keys.len(), 2);
    }

    #[test]
    fn completeness_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, _) = BlockStore::open(d.path()).unwrap();
            s.put(&[blk(2, 0, 1, b"a")], false).unwrap();
            s.mark_complete().unwrap();
        }
        let (s, complete) = BlockStore::open(d.path()).unwrap();
        assert!(complete);
        assert_eq!(s.stats().unwrap().0, 1);
    }
}
