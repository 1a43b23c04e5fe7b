//! For the unit tests of hand-over and scrub: peers that are real block stores in temp dirs, any of
//! which can be down.

use std::cell::RefCell;
use std::sync::Arc;

use super::blockstore::{BlockStore, Cut};
use super::rebuild::PeerPort;
use super::DataNode;
use crate::shared::block::{Block, BlockKey, Checksum};
use crate::shared::placement::holds;
use crate::shared::PortError;

pub struct StorePeers {
    dirs: Vec<tempfile::TempDir>,
    stores: Vec<Arc<BlockStore>>,
    up: RefCell<Vec<bool>>,
    /// Peers whose hand-over calls (versions, put, truncate) answer only after a while, with an
    /// error, as a stopped process's do once they time out.
    slow: RefCell<Vec<bool>>,
    pub ring: Vec<String>,
    /// The most block bytes a get's reply or a put may carry, as a server and a message allow.
    pub reply_limit: std::cell::Cell<usize>,
    pub put_limit: std::cell::Cell<usize>,
}

impl StorePeers {
    pub fn new(n: usize) -> StorePeers {
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().expect("temp dir")).collect();
        let stores = dirs.iter().map(|d| Arc::new(BlockStore::open(d.path()).expect("store").0)).collect();
        let ring = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
        StorePeers {
            dirs,
            stores,
            up: RefCell::new(vec![true; n]),
            slow: RefCell::new(vec![false; n]),
            ring,
            reply_limit: crate::wire::data_service::MAX_REPLY_BYTES.into(),
            put_limit: crate::wire::net::MAX_MESSAGE_BYTES.into(),
        }
    }

    pub fn store(&self, i: usize) -> &BlockStore {
        &self.stores[i]
    }

    pub fn set_up(&self, i: usize, up: bool) {
        self.up.borrow_mut()[i] = up;
    }

    pub fn set_slow(&self, i: usize, slow: bool) {
        self.slow.borrow_mut()[i] = slow;
    }

    /// [`Self::answer`], after [`SLOW`] and with an error if the peer is slow.
    async fn answer_late(&self, peer: usize) -> Result<&BlockStore, PortError> {
        if self.slow.borrow()[peer] {
            tokio::time::sleep(SLOW).await;
            return Err(PortError::Unreachable("no answer in time".into()));
        }
        self.answer(peer)
    }

    /// Server `i` as its own process would see itself.
    pub fn node(&self, i: usize) -> DataNode {
        DataNode {
            store: self.stores[i].clone(),
            index: i,
            ring: self.ring.clone(),
            data_dir: self.dirs[i].path().to_path_buf(),
            rebuild: RefCell::default(),
            rebuild_give_up: super::rebuild::GIVE_UP,
            link: super::throttle::Throttle::new(None),
            scrub: super::scrub::Scrubber::new(1 << 30, None),
            catching_up: Default::default(),
            reserve: 0,
            admitted: Default::default(),
        }
    }

    fn answer(&self, peer: usize) -> Result<&BlockStore, PortError> {
        if self.up.borrow()[peer] {
            Ok(&self.stores[peer])
        } else {
            Err(PortError::Unreachable("connection refused".into()))
        }
    }
}

/// How long a slow peer takes to fail.
pub const SLOW: std::time::Duration = std::time::Duration::from_secs(5);

fn err(e: impl std::fmt::Display) -> PortError {
    PortError::Refused(e.to_string())
}

impl PeerPort for StorePeers {
    async fn ring(&self, peer: usize) -> Result<Vec<String>, PortError> {
        self.answer(peer)?;
        Ok(self.ring.clone())
    }

    async fn list_for(
        &self,
        peer: usize,
        target: usize,
        after: BlockKey,
        limit: u32,
    ) -> Result<super::rebuild::ListPage, PortError> {
        let n = self.ring.len();
        let (listed, done) = self
            .answer(peer)?
            .list(after, limit as usize, |k, r| holds(target, k.file_id, k.index, usize::from(r), n))
            .map_err(err)?;
        let (keys, md5s) = listed.into_iter().map(|(k, v, md5)| ((k, v), md5)).unzip();
        Ok(super::rebuild::ListPage { keys, md5s, done, rebuilding: false })
    }

    async fn get(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<Option<Block>>, PortError> {
        let got = self.answer(peer)?.get_within(keys, self.reply_limit.get()).map_err(err)?;
        got.ok_or_else(|| err("the reply would carry too many bytes"))
    }

    async fn put(&self, peer: usize, blocks: &[Block]) -> Result<(), PortError> {
        if blocks.iter().map(|b| b.data.len()).sum::<usize>() > self.put_limit.get() {
            return Err(err("the message would carry too many bytes"));
        }
        self.answer_late(peer).await?.put(blocks, true, None).map(|_| ()).map_err(err)
    }

    async fn truncate(&self, peer: usize, cuts: &[Cut]) -> Result<(), PortError> {
        self.answer_late(peer).await?.truncate(cuts, None).map(|_| ()).map_err(err)
    }

    async fn cuts(&self, peer: usize, from: u64, limit: u32) -> Result<(Vec<Cut>, bool), PortError> {
        self.answer(peer)?.list_cuts(from, limit as usize).map_err(err)
    }

    async fn hints_for(&self, peer: usize, target: usize, before: u64) -> Result<u64, PortError> {
        self.answer(peer)?.hints_for(target, before).map_err(err)
    }

    async fn versions(&self, peer: usize, keys: &[BlockKey]) -> Result<Vec<u64>, PortError> {
        self.answer_late(peer).await?.versions(keys).map_err(err)
    }

    async fn digest(
        &self,
        peer: usize,
        from: BlockKey,
        to: Option<BlockKey>,
        shared_with: usize,
    ) -> Result<(u64, Checksum), PortError> {
        let n = self.ring.len();
        self.answer(peer)?
            .digest(from, to, |k, r| holds(shared_with, k.file_id, k.index, usize::from(r), n))
            .map_err(err)
    }
}
