//! Blocks as they travel between clients and dataservers, and their MD5 checksums (SPEC R3.1).

use md5::{Digest, Md5};

pub type Checksum = [u8; 16];

pub fn checksum(data: &[u8]) -> Checksum {
    Md5::digest(data).into()
}

/// A block's identity: the file's stable id and the block's index in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
}

impl Block {
    pub fn new(key: BlockKey, version: u64, replicas: u8, data: Vec<u8>) -> Self {
        Block { key, version, replicas, md5: checksum(&data), data }
    }

    pub fn verifies(&self) -> bool {
        checksum(&self.data) == self.md5
    }
}
