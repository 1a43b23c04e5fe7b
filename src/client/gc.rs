//! The collector: frees what nobody will free otherwise. Orphans that every live session has
//! closed (their remover died before freeing them, or freeing failed), and blocks on dataservers
//! that no inode references: blocks of a file that is gone, and blocks wholly past the end of a
//! file nobody has open (a client that died mid-write past the end, a truncate that failed
//! halfway). Never a block younger than the safety window (a write may be landing before its size
//! is recorded), never a block of an open file past its end, and never a block written again
//! after it was listed (dataservers drop a block only at the version listed).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info};

use super::files::Files;
use super::ports::{DataPort, MetaPort};
use crate::metaserver::namespace::sessions::{FileRef, Query, QueryReply, MAX_REFS};
use crate::shared::block::BlockKey;
use crate::shared::{FsError, FsResult, MAX_CUTS};

/// Blocks listed per call.
const PAGE: u32 = 16 * 1024;
/// How long freeing one batch of orphans may take.
const RECLAIM_LIMIT: Duration = Duration::from_secs(30);

/// What one collection found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Collected {
    /// Orphans nobody had open any more, freed.
    pub orphans_freed: u64,
    /// Orphans to free that were left for the next run (a dataserver did not answer).
    pub orphans_left: u64,
    /// Blocks listed on all dataservers.
    pub blocks_seen: u64,
    /// Blocks no inode references, older than the window (removed unless written again since).
    pub blocks_unreferenced: u64,
    pub blocks_removed: u64,
    /// Unreferenced blocks left because they are younger than the window.
    pub blocks_too_young: u64,
    /// Dataservers that could not be listed (their blocks are left for the next run).
    pub servers_skipped: Vec<usize>,
}

impl<M: MetaPort, D: DataPort> Files<M, D> {
    /// Runs one collection. `now_ns` is the time a block's version (its writer's clock) is
    /// compared with; blocks written within `window` of it stay.
    pub async fn collect(&self, window: Duration, now_ns: i64) -> FsResult<Collected> {
        let mut out = Collected::default();
        let orphans = match self.meta.query(Query::Freeable).await? {
            QueryReply::Freeable(o) => o,
            r => return Err(FsError::Io(format!("expected orphans, got {r:?}"))),
        };
        // A cut waits for every replica (retrying a server that is down): bounded, so that one
        // orphan that cannot be freed now leaves the others and the blocks for the next run
        // instead of holding this one, and every one after it, for good.
        for (i, chunk) in orphans.chunks(MAX_CUTS).enumerate() {
            match tokio::time::timeout(RECLAIM_LIMIT, self.reclaim(chunk)).await {
                Ok(Ok(())) => out.orphans_freed += chunk.len() as u64,
                failed => {
                    let why = failed.map_or_else(|_| format!("no answer in {RECLAIM_LIMIT:?}"), |r| format!("{r:?}"));
                    info!("collector: freeing orphans failed ({why}); they wait for the next run");
                    out.orphans_left = orphans.len().saturating_sub(i * MAX_CUTS) as u64;
                    break;
                }
            }
        }
        let young_after = now_ns.saturating_sub(i64::try_from(window.as_nanos()).unwrap_or(i64::MAX));
        let bs = self.engine.block_size().max(1);
        for server in 0..self.engine.servers() {
            // Inode 0 is never a file, so listing after (0, 0) lists everything.
            let mut after = BlockKey { file_id: 0, index: 0 };
            loop {
                let page = match self.engine.port().list(server, after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        info!(server, "collector: cannot list this dataserver ({e}); its blocks wait");
                        out.servers_skipped.push(server);
                        break;
                    }
                };
                let keys = page.keys;
                out.blocks_seen += keys.len() as u64;
                let doomed = self.unreferenced(&keys, bs, young_after, &mut out).await?;
                if !doomed.is_empty() {
                    match self.engine.port().drop_blocks(server, &doomed).await {
                        Ok(n) => out.blocks_removed += n,
                        Err(e) => info!(server, "collector: dropping blocks failed ({e}); they wait"),
                    }
                }
                match keys.last() {
                    Some((k, _)) if !page.done => after = *k,
                    _ => break,
                }
            }
        }
        debug!(?out, "collected");
        Ok(out)
    }

    /// Of `keys` (one page of one server), those no inode references and older than the window.
    async fn unreferenced(
        &self,
        keys: &[(BlockKey, u64)],
        bs: u64,
        young_after: i64,
        out: &mut Collected,
    ) -> FsResult<Vec<(BlockKey, u64)>> {
        let mut files: Vec<u64> = keys.iter().map(|(k, _)| k.file_id).collect();
        files.dedup();
        let mut refs: HashMap<u64, Option<FileRef>> = HashMap::new();
        for chunk in files.chunks(MAX_REFS) {
            match self.meta.query(Query::Refs { inos: chunk.to_vec() }).await? {
                QueryReply::Refs(r) if r.len() == chunk.len() => refs.extend(chunk.iter().copied().zip(r)),
                r => return Err(FsError::Io(format!("expected {} references, got {r:?}", chunk.len()))),
            }
        }
        let mut doomed = Vec::new();
        for &(k, version) in keys {
            let referenced = match refs.get(&k.file_id).copied().flatten() {
                None => false,
                Some(r) => r.open || k.index < r.size.div_ceil(bs),
            };
            if referenced {
                continue;
            }
            if i64::try_from(version).unwrap_or(i64::MAX) > young_after {
                out.blocks_too_young += 1;
            } else {
                out.blocks_unreferenced += 1;
                doomed.push((k, version));
            }
        }
        Ok(doomed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fakes::{block_on, files};
    use super::*;
    use crate::shared::{Kind, NewNode, ROOT};

    #[test]
    fn unreferenced_old_blocks_go_and_everything_referenced_or_young_stays() {
        let f = files(4, 8);
        block_on(async {
            let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
            let kept = f.meta.mknod(ROOT, b"kept", &node).await.unwrap().ino;
            let cut = f.meta.mknod(ROOT, b"cut", &node).await.unwrap().ino;
            let gone = f.meta.mknod(ROOT, b"gone", &node).await.unwrap().ino;
            for ino in [kept, cut, gone] {
                f.write(ino, 0, &[7u8; 32]).await.unwrap();
            }
            // `cut` loses its last two blocks' worth of size behind the blocks' back, as a writer that
            // died before recording its size would leave it; `gone` is purged without its blocks.
            let set = crate::shared::SetAttr { size: Some(16), ..Default::default() };
            f.meta.setattr(cut, &set).await.unwrap();
            f.meta.unlink(ROOT, b"gone").await.unwrap();
            f.meta.purge(&[gone]).await.unwrap();
            let before = f.engine.port().blocks_of(kept);
            let now = crate::shared::now_ns();
            let young = f.collect(Duration::from_secs(3600), now).await.unwrap();
            assert_eq!((young.blocks_removed, young.blocks_too_young), (0, 3 * (4 + 2)), "{young:?}");
            let done = f.collect(Duration::ZERO, now + 1_000_000_000).await.unwrap();
            assert_eq!(done.blocks_removed, 3 * (4 + 2), "{done:?}");
            assert_eq!(f.engine.port().blocks_of(kept), before);
            assert_eq!(f.engine.port().blocks_of(cut), 3 * 2);
            assert_eq!(f.engine.port().blocks_of(gone), 0);
            assert_eq!(f.read(kept, 0, 32).await.unwrap(), vec![7u8; 32]);
            assert_eq!(f.read(cut, 0, 16).await.unwrap(), vec![7u8; 16]);
        });
    }

    /// An orphan that cannot be freed now (a holder of its blocks is down, and a cut waits for
    /// every replica) is left for the next run, and the blocks on the servers that are up are
    /// still collected: the collection used to wait for the server for good.
    #[test]
    fn an_orphan_that_cannot_be_freed_now_leaves_the_rest_of_the_collection() {
        let f = files(4, 8);
        block_on(async {
            tokio::time::pause();
            let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
            let ino = f.meta.mknod(ROOT, b"x", &node).await.unwrap().ino;
            f.write(ino, 0, &[1u8; 20]).await.unwrap();
            let gone = f.meta.mknod(ROOT, b"gone", &node).await.unwrap().ino;
            f.write(gone, 0, &[2u8; 32]).await.unwrap();
            f.meta.unlink(ROOT, b"gone").await.unwrap();
            f.meta.purge(&[gone]).await.unwrap();
            assert_eq!(f.meta.unlink(ROOT, b"x").await.unwrap(), ino);
            f.engine.port().set_up(1, false);
            let c = f.collect(Duration::ZERO, crate::shared::now_ns() + 1_000_000_000).await.unwrap();
            assert_eq!((c.orphans_freed, c.orphans_left, c.servers_skipped.clone()), (0, 1, vec![1]), "{c:?}");
            assert!(c.blocks_removed > 0, "{c:?}");
            assert_eq!(f.meta.orphans().await.unwrap(), vec![ino], "left for the next run");
            f.engine.port().set_up(1, true);
            let c = f.collect(Duration::ZERO, crate::shared::now_ns() + 1_000_000_000).await.unwrap();
            assert_eq!((c.orphans_freed, c.orphans_left), (1, 0), "{c:?}");
            assert_eq!((f.engine.port().blocks_of(ino), f.engine.port().blocks_of(gone)), (0, 0));
        });
    }

    #[test]
    fn orphans_that_nobody_has_open_are_freed() {
        let f = files(4, 8);
        block_on(async {
            let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
            let ino = f.meta.mknod(ROOT, b"x", &node).await.unwrap().ino;
            f.write(ino, 0, &[1u8; 20]).await.unwrap();
            assert_eq!(f.meta.unlink(ROOT, b"x").await.unwrap(), ino);
            let c = f.collect(Duration::from_secs(3600), crate::shared::now_ns()).await.unwrap();
            assert_eq!(c.orphans_freed, 1);
            assert_eq!(f.engine.port().blocks_of(ino), 0);
            assert!(f.meta.orphans().await.unwrap().is_empty());
        });
    }
}
