//! A dataserver's journal of small changes. A durable LMDB commit costs two syncs (the data, then
//! the meta page); measured here, 370 us and 170 us a put of one block, three servers at a time on
//! one disk, where an append to a journal segment costs one `fdatasync` of bytes already allocated.
//! So a change whose record is small (a put of a few blocks, as a small file's close or a small
//! write with `fsync` makes; a cut; a drop) is applied to the store without a sync, appended to the
//! journal (`shared::wal`), and synced there, one sync shared by the changes that wait for it
//! (group commit); every other change, and every change once a second, is made durable by a
//! checkpoint of the store (`Durability::Checkpointed`). On open the store goes back to its last
//! checkpoint and applies again what the journal holds after it. A large put is not journaled:
//! its data would be written twice.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use super::blockstore::{Cut, HintFor};
use crate::shared::block::{Block, BlockKey, Checksum};
use crate::shared::wal::Wal;

/// A put whose blocks carry at most this much data is journaled.
pub const SMALL_PUT: usize = 64 << 10;
/// The journal's segments: small, as every dataserver keeps one or two (the one in use and a spare)
/// on disks that may be small and shared; a roll to the next costs writing this many zeros.
pub const SEGMENT: u64 = 1 << 20;

/// A change as the journal keeps it, to be applied again after a crash.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Blocks to store, each with the page MD5s it is stored with (already verified).
    Put {
        blocks: Vec<(Block, Vec<Checksum>)>,
        repair: bool,
        hint: Option<HintFor>,
    },
    Cut {
        cuts: Vec<Cut>,
        hint: Option<HintFor>,
    },
    DropIf(Vec<(BlockKey, u64)>),
}

const PUT: u8 = 0;
const CUT: u8 = 1;
const DROP_IF: u8 = 2;

fn put_hint(r: &mut Vec<u8>, hint: Option<HintFor>) {
    match hint {
        Some(h) => {
            r.push(1);
            r.extend_from_slice(&(h.me as u64).to_le_bytes());
            r.extend_from_slice(&(h.n as u64).to_le_bytes());
        }
        None => r.push(0),
    }
}

/// The record of a put of `blocks`, each stored with `pages`.
pub fn put_record(blocks: &[Block], pages: &[Vec<Checksum>], repair: bool, hint: Option<HintFor>) -> Vec<u8> {
    let data: usize = blocks.iter().map(|b| b.data.len() + 16 * b.pages.len() + 64).sum();
    let mut r = Vec::with_capacity(32 + data);
    r.push(PUT);
    r.push(u8::from(repair));
    put_hint(&mut r, hint);
    r.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
    for (b, pages) in blocks.iter().zip(pages) {
        r.extend_from_slice(&b.key.file_id.to_le_bytes());
        r.extend_from_slice(&b.key.index.to_le_bytes());
        r.extend_from_slice(&b.version.to_le_bytes());
        r.push(b.replicas);
        r.extend_from_slice(&b.md5);
        r.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        pages.iter().for_each(|p| r.extend_from_slice(p));
        r.extend_from_slice(&(b.data.len() as u64).to_le_bytes());
        r.extend_from_slice(&b.data);
    }
    r
}

pub fn cut_record(cuts: &[Cut], hint: Option<HintFor>) -> Vec<u8> {
    let mut r = vec![CUT];
    put_hint(&mut r, hint);
    r.extend_from_slice(&(cuts.len() as u64).to_le_bytes());
    for c in cuts {
        [c.file_id, c.from_block, c.version].iter().for_each(|x| r.extend_from_slice(&x.to_le_bytes()));
    }
    r
}

pub fn drop_if_record(keys: &[(BlockKey, u64)]) -> Vec<u8> {
    let mut r = vec![DROP_IF];
    r.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for (k, v) in keys {
        [k.file_id, k.index, *v].iter().for_each(|x| r.extend_from_slice(&x.to_le_bytes()));
    }
    r
}

/// Reads a record back; `None` if it is not one (its CRC matched, so only a bug writes such).
pub fn decode(record: &[u8]) -> Option<Change> {
    let mut r = Reader(record);
    let change = match r.u8()? {
        PUT => {
            let repair = r.u8()? != 0;
            let hint = r.hint()?;
            let n = r.len()?;
            let mut blocks = Vec::new();
            for _ in 0..n {
                let key = BlockKey { file_id: r.u64()?, index: r.u64()? };
                let version = r.u64()?;
                let replicas = r.u8()?;
                let md5: Checksum = r.take(16)?.try_into().ok()?;
                let count = r.len()?;
                let pages = (0..count).map(|_| r.take(16)?.try_into().ok()).collect::<Option<Vec<Checksum>>>()?;
                let len = r.len()?;
                let data = r.take(len)?.to_vec();
                blocks.push((Block { key, version, replicas, md5, data, pages: vec![] }, pages));
            }
            Change::Put { blocks, repair, hint }
        }
        CUT => {
            let hint = r.hint()?;
            let n = r.len()?;
            let cuts = (0..n)
                .map(|_| Some(Cut { file_id: r.u64()?, from_block: r.u64()?, version: r.u64()? }))
                .collect::<Option<Vec<_>>>()?;
            Change::Cut { cuts, hint }
        }
        DROP_IF => {
            let n = r.len()?;
            let keys = (0..n)
                .map(|_| Some((BlockKey { file_id: r.u64()?, index: r.u64()? }, r.u64()?)))
                .collect::<Option<Vec<_>>>()?;
            Change::DropIf(keys)
        }
        _ => return None,
    };
    r.0.is_empty().then_some(change)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A count or length, which the bytes left must be able to hold (so a bad one allocates nothing).
    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok().filter(|&n| n <= self.0.len())
    }

    fn hint(&mut self) -> Option<Option<HintFor>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(HintFor { me: usize::try_from(self.u64()?).ok()?, n: usize::try_from(self.u64()?).ok()? })),
        }
    }
}

/// The journal's state, behind the store's lock on it.
pub struct Journal {
    pub wal: Wal,
    /// The index the next record takes.
    pub next: u64,
    /// The segment the last record went to: syncing it makes every record so far durable (a
    /// segment is synced before the next one is begun).
    pub last: Option<Arc<File>>,
    pub checkpointed: Instant,
    /// An append or a sync failed: what it wrote may be torn or lost, so nothing more is appended
    /// (every change is checkpointed instead) until the store is opened again, which drops the
    /// torn end.
    pub broken: bool,
    /// An append found no room on the disk for a new segment: changes are checkpointed instead
    /// until then, when the journal is tried again.
    pub paused_until: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written_and_a_truncated_one_is_refused() {
        let b = Block::new(BlockKey { file_id: 7, index: 3 }, 9, 3, vec![5u8; 9000]);
        let pages = vec![[1u8; 16], [2u8; 16], [3u8; 16]];
        let hint = Some(HintFor { me: 1, n: 4 });
        let r = put_record(std::slice::from_ref(&b), std::slice::from_ref(&pages), true, hint);
        assert_eq!(decode(&r), Some(Change::Put { blocks: vec![(b, pages)], repair: true, hint }));
        assert_eq!(decode(&r[..r.len() - 1]), None);
        assert_eq!(decode(&[r.as_slice(), &[0]].concat()), None);
        let cuts = vec![Cut { file_id: 1, from_block: 2, version: 3 }];
        assert_eq!(decode(&cut_record(&cuts, None)), Some(Change::Cut { cuts, hint: None }));
        let keys = vec![(BlockKey { file_id: 4, index: 5 }, 6)];
        assert_eq!(decode(&drop_if_record(&keys)), Some(Change::DropIf(keys)));
        // A count far beyond the bytes is refused before anything is allocated for it.
        let mut huge = vec![DROP_IF];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None);
    }
}
