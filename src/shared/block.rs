//! Blocks as they travel between clients and dataservers, and their MD5 checksums.

pub use super::checksum::{checksum, checksums, Checksum};

/// A block's identity: the file's stable id and the block's index in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct BlockKey {
    pub file_id: u64,
    pub index: u64,
}

impl BlockKey {
    /// Big-endian so that LMDB's byte order is (file, index) order: a file's blocks are contiguous.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.file_id.to_be_bytes());
        k[8..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        let (f, i) = b.split_at(8);
        Some(BlockKey {
            file_id: u64::from_be_bytes(f.try_into().ok()?),
            index: u64::from_be_bytes(i.try_into().ok()?),
        })
    }
}

/// One block's share of a byte range: the block's index, its first byte's offset in the file, and
/// the range's bytes within the block, `[lo, hi)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub index: u64,
    pub start: u64,
    pub lo: usize,
    pub hi: usize,
}

impl Piece {
    /// Whether the range covers the whole block.
    pub fn whole(&self, block_size: u64) -> bool {
        self.lo == 0 && self.hi as u64 == block_size
    }

    /// Where this piece's bytes are in a buffer that holds the range from `offset`.
    pub fn in_range(&self, offset: u64) -> std::ops::Range<usize> {
        let from = (self.start + self.lo as u64 - offset) as usize;
        from..from + (self.hi - self.lo)
    }
}

/// Bytes of disk a block of `len` bytes takes in a dataserver's store: LMDB keeps a value larger
/// than half a page (with the store's 25-byte header) in whole 4 KiB overflow pages after a
/// 16-byte page header, so a 16 KiB block takes five pages and a 4 KiB one two.
pub fn disk_bytes(len: usize) -> u64 {
    (len as u64 + 25 + 16).div_ceil(4096) * 4096
}

/// The one place a byte range `[offset, end)` of a file is cut into blocks: its pieces, in order.
/// Empty when the range is.
pub fn pieces(offset: u64, end: u64, block_size: u64) -> impl Iterator<Item = Piece> {
    let bs = block_size.max(1);
    // Exclusive end: an empty range yields nothing.
    let blocks = offset / bs..if end > offset { (end - 1) / bs + 1 } else { offset / bs };
    blocks.map(move |index| {
        let start = index * bs;
        let lo = (offset.max(start) - start) as usize;
        let hi = (end.min(start + bs) - start) as usize;
        Piece { index, start, lo, hi }
    })
}

/// A dataserver keeps, beside a block's MD5, the MD5 of each page of this many bytes of it, so that a
/// read of a few KiB fetches and hashes only the pages holding them (see `BlockStore::get_range`).
pub const PAGE: usize = 4096;

/// How many pages `len` bytes take (the last may be short).
pub fn page_count(len: usize) -> usize {
    len.div_ceil(PAGE)
}

/// A stored or transmitted block. `version` orders writes of the same block (higher wins);
/// `replicas` is the replication factor it was written with, so a server can tell which of its
/// peers hold it without any other state (rebuild needs this after a lost disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub key: BlockKey,
    pub version: u64,
    pub replicas: u8,
    pub md5: Checksum,
    pub data: Vec<u8>,
    /// The MD5 of each [`PAGE`] of `data`, for a block of more than one page, when its writer
    /// computed them; empty, the server that stores it computes them (see `BlockStore::put`).
    pub pages: Vec<Checksum>,
}

impl Block {
    pub fn new(key: BlockKey, version: u64, replicas: u8, data: Vec<u8>) -> Self {
        Block { key, version, replicas, md5: checksum(&data), data, pages: vec![] }
    }

    pub fn verifies(&self) -> bool {
        checksum(&self.data) == self.md5
    }

    /// Blocks of one write: their checksums and their pages' are computed in one multi-buffer
    /// pass (once here, where each of the servers storing a block would otherwise hash it again).
    pub fn batch(version: u64, replicas: u8, contents: Vec<(BlockKey, Vec<u8>)>) -> Vec<Block> {
        let datas: Vec<&[u8]> = contents.iter().map(|(_, d)| d.as_slice()).collect();
        let (sums, pages) = sums_with_pages(&datas, |i| datas[i].len() > PAGE);
        contents
            .into_iter()
            .zip(sums.into_iter().zip(pages))
            .map(|((key, data), (md5, pages))| Block { key, version, replicas, md5, data, pages })
            .collect()
    }
}

/// The MD5 of each of `datas` and, for those whose index `paged` picks, of each of its pages, all
/// in one multi-buffer pass: one sum per data, and per data its pages' sums (empty where not
/// picked).
pub fn sums_with_pages(datas: &[&[u8]], paged: impl Fn(usize) -> bool) -> (Vec<Checksum>, Vec<Vec<Checksum>>) {
    let mut inputs = datas.to_vec();
    for (_, d) in datas.iter().enumerate().filter(|&(i, _)| paged(i)) {
        inputs.extend(d.chunks(PAGE));
    }
    let mut sums = checksums(&inputs);
    let mut rest = sums.split_off(datas.len()).into_iter();
    let pages =
        datas
            .iter()
            .enumerate()
            .map(|(i, d)| if paged(i) { rest.by_ref().take(page_count(d.len())).collect() } else { vec![] });
    (sums, pages.collect())
}

/// Part of a stored block (`BlockStore::get_range`): `data` is bytes [`offset`, `offset` +
/// `data.len()`) of the block's `len`, and `pages` holds one MD5 per page of it; a block kept
/// without page checksums comes whole, with `pages` empty, to be checked against `md5`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub version: u64,
    pub replicas: u8,
    pub md5: Checksum,
    pub len: usize,
    pub offset: usize,
    pub data: Vec<u8>,
    pub pages: Vec<Checksum>,
}

impl Part {
    /// The part of a block stored as `data` (with `pages`, its pages' MD5s, or none) that answers
    /// a read of bytes [`from`, `to`): the whole pages holding them, clamped to the stored length
    /// (past it, the last page, which shows where the block ends); without page MD5s, the whole
    /// block.
    pub fn of(
        version: u64,
        replicas: u8,
        md5: Checksum,
        data: &[u8],
        pages: &[Checksum],
        from: usize,
        to: usize,
    ) -> Part {
        let len = data.len();
        let (first, last) = if pages.is_empty() {
            (0, page_count(len))
        } else {
            let first = (from.min(len) / PAGE).min(page_count(len) - 1);
            (first, page_count(to.min(len)).max(first + 1))
        };
        Part {
            version,
            replicas,
            md5,
            len,
            offset: first * PAGE,
            data: data[first * PAGE..(last * PAGE).min(len)].to_vec(),
            pages: pages.get(first..last).map(<[_]>::to_vec).unwrap_or_default(),
        }
    }

    /// Bytes [`lo`, `hi`) of the block, zeros past its stored length; `None` if the part does not
    /// hold them.
    pub fn bytes(&self, lo: usize, hi: usize) -> Option<Vec<u8>> {
        let end = self.offset + self.data.len();
        if lo < self.offset.min(self.len) || hi.min(self.len) > end {
            return None;
        }
        let mut out = vec![0; hi - lo];
        let (from, to) = (lo.max(self.offset), hi.min(end));
        if from < to {
            out[from - lo..to - lo].copy_from_slice(&self.data[from - self.offset..to - self.offset]);
        }
        Some(out)
    }

    /// Whether the data matches its pages' MD5s, or (whole) the block's MD5.
    pub fn verifies(&self) -> bool {
        if self.pages.is_empty() {
            return self.offset == 0 && self.data.len() == self.len && checksum(&self.data) == self.md5;
        }
        let chunks: Vec<&[u8]> = self.data.chunks(PAGE).collect();
        self.offset.is_multiple_of(PAGE) && chunks.len() == self.pages.len() && checksums(&chunks) == self.pages
    }
}

/// For each block (None: absent), whether it is present and matches its checksum; all hashed in
/// one multi-buffer pass.
pub fn verify_each<'a>(blocks: impl IntoIterator<Item = Option<&'a Block>>) -> Vec<bool> {
    let blocks: Vec<Option<&Block>> = blocks.into_iter().collect();
    let present: Vec<&Block> = blocks.iter().flatten().copied().collect();
    let sums = checksums(&present.iter().map(|b| b.data.as_slice()).collect::<Vec<_>>());
    let mut ok = present.iter().zip(sums).map(|(b, s)| b.md5 == s);
    blocks.iter().map(|b| b.is_some() && ok.next().unwrap_or(false)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_cut_at_block_boundaries() {
        let p: Vec<Piece> = pieces(5, 23, 8).collect();
        assert_eq!(
            p,
            vec![
                Piece { index: 0, start: 0, lo: 5, hi: 8 },
                Piece { index: 1, start: 8, lo: 0, hi: 8 },
                Piece { index: 2, start: 16, lo: 0, hi: 7 },
            ]
        );
        assert!(!p[0].whole(8) && p[1].whole(8) && !p[2].whole(8));
        // The pieces' bytes tile the range.
        assert_eq!(p.iter().map(|x| x.in_range(5)).collect::<Vec<_>>(), vec![0..3, 3..11, 11..18]);
        assert_eq!(pieces(8, 16, 8).count(), 1);
        assert_eq!(pieces(9, 9, 8).count(), 0);
        assert_eq!(pieces(0, 1, 1 << 20).collect::<Vec<_>>(), vec![Piece { index: 0, start: 0, lo: 0, hi: 1 }]);
    }

    /// What a dataserver answers to a range read is checked before a byte of it is used: an answer
    /// that is misaligned, short, or whose pages do not match is refused, never sliced wrongly.
    #[test]
    fn a_range_answer_that_does_not_add_up_is_refused() {
        let data: Vec<u8> = (0..3 * PAGE as u32 + 5).map(|i| (i % 241) as u8).collect();
        let pages: Vec<Checksum> = data.chunks(PAGE).map(checksum).collect();
        let part = |offset: usize, first: usize, last: usize| Part {
            version: 1,
            replicas: 3,
            md5: checksum(&data),
            len: data.len(),
            offset,
            data: data[first * PAGE..(last * PAGE).min(data.len())].to_vec(),
            pages: pages[first..last].to_vec(),
        };
        let good = part(PAGE, 1, 3);
        assert!(good.verifies());
        assert_eq!(good.bytes(PAGE + 1, 3 * PAGE).unwrap(), &data[PAGE + 1..3 * PAGE]);
        assert_eq!(good.bytes(PAGE - 1, PAGE + 1), None, "starts before the pages sent");
        assert_eq!(good.bytes(3 * PAGE, 3 * PAGE + 1), None, "ends after them, within the block");
        // Misaligned, or pages and data that do not pair up.
        assert!(!Part { offset: PAGE + 1, ..good.clone() }.verifies());
        assert!(!Part { pages: pages[1..2].to_vec(), ..good.clone() }.verifies());
        let mut flipped = good.clone();
        flipped.data[PAGE + 7] ^= 1;
        assert!(!flipped.verifies());
        // A whole block: checked against the block's MD5, and only if it is all there.
        let whole = Part { offset: 0, data: data.clone(), pages: vec![], ..good.clone() };
        assert!(whole.verifies());
        assert!(!Part { data: data[..PAGE].to_vec(), ..whole.clone() }.verifies());
        assert!(!Part { offset: PAGE, ..whole.clone() }.verifies());
        // Past the stored end: zeros.
        assert_eq!(whole.bytes(data.len() - 1, data.len() + 3).unwrap(), [data[data.len() - 1], 0, 0, 0]);
    }

    #[test]
    fn a_batch_carries_each_blocks_md5_and_its_pages_for_blocks_of_more_than_one() {
        let lens = [0, 1, PAGE, PAGE + 1, 3 * PAGE, 4 * PAGE - 7];
        let contents: Vec<(BlockKey, Vec<u8>)> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| (BlockKey { file_id: 1, index: i as u64 }, (0..len).map(|j| (j * 7 + i) as u8).collect()))
            .collect();
        for (b, (key, data)) in Block::batch(9, 3, contents.clone()).iter().zip(&contents) {
            assert_eq!((b.key, b.version, b.replicas, &b.data), (*key, 9, 3, data));
            assert_eq!(b.md5, crate::shared::checksum::reference(data));
            let pages: Vec<Checksum> = if data.len() > PAGE {
                data.chunks(PAGE).map(crate::shared::checksum::reference).collect()
            } else {
                vec![]
            };
            assert_eq!(b.pages, pages, "{} bytes", data.len());
        }
    }
}
