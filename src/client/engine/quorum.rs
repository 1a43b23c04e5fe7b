//! Reads with a read quorum Q > 1: each block is asked of Q of its replicas at once (more when
//! some are down, corrupt or rebuilding), and the answers are compared by version.
//!
//! Why versions, and not a checksum kept by the metadata service: every copy carries its MD5, so
//! a corrupt copy is caught without asking anyone; what a checksum at the metaserver would add is
//! catching a copy that is intact but stale, and the version does that already: every write of a
//! block gets a new, higher version (the writer's clock), a replica never replaces a newer version
//! with an older one, and a truncate or delete leaves a cut with its version on every server
//! that applied it. The newest version among Q answers is the latest acknowledged write whenever
//! W + Q > R, since the W replicas that acknowledged it and the Q asked must share one. Keeping
//! checksums at the metaserver would put a metadata commit on every block write, which the data
//! path avoids (blocks never pass through the metaserver).

use std::collections::BTreeMap;

use futures::future::join_all;
use tracing::warn;

use super::{DataPort, Engine, EngineError};
use crate::client::ports::Cut;
use crate::shared::block::{Block, BlockKey};

/// One replica's answer for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A copy that verifies.
    Good(Block),
    /// Not held. `cut`: the version of a cut that removed it there (0: none known).
    Absent { cut: u64 },
    /// A copy that fails its MD5, and the version it claims (the largest there is for a copy of
    /// another key).
    Corrupt { claims: u64 },
}

/// What the answers for one block decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The newest verified copy.
    Data(Block),
    /// No copy newer than the newest cut (or none at all): the block reads as zeros.
    Hole { cut: u64 },
    /// Copies were found but none verifies.
    Corrupt,
}

/// Chooses among the answers (server, answer) and says which servers to mend: those that
/// answered with an older, missing or corrupt copy (never one that did not answer). Of two copies
/// with one version (two mounts wrote in the same nanosecond) the one with the larger MD5 is the
/// newer, as the servers order them.
pub(crate) fn choose(answers: &[(usize, Answer)]) -> (Choice, Vec<usize>) {
    let newest = answers
        .iter()
        .filter_map(|(_, a)| if let Answer::Good(b) = a { Some(b) } else { None })
        .max_by_key(|b| (b.version, b.md5));
    let cut =
        answers.iter().filter_map(|(_, a)| if let Answer::Absent { cut, .. } = a { Some(*cut) } else { None }).max();
    let cut = cut.unwrap_or(0);
    match newest {
        Some(b) if b.version > cut => {
            let stale = answers
                .iter()
                .filter(|(_, a)| match a {
                    Answer::Good(x) => (x.version, x.md5) < (b.version, b.md5),
                    Answer::Absent { .. } | Answer::Corrupt { .. } => true,
                })
                .map(|(s, _)| *s)
                .collect();
            (Choice::Data(b.clone()), stale)
        }
        Some(_) => {
            // A cut newer than every copy: the copies are what a server that missed it still has.
            let stale = answers
                .iter()
                .filter(|(_, a)| matches!(a, Answer::Good(_)) || corrupt_before(a, cut))
                .map(|(s, _)| *s)
                .collect();
            (Choice::Hole { cut }, stale)
        }
        // No intact copy, and a corrupt one that may be the last write (no cut is newer).
        None if answers.iter().any(|(_, a)| matches!(a, Answer::Corrupt { claims } if *claims >= cut)) => {
            (Choice::Corrupt, vec![])
        }
        // Corrupt copies older than a cut another holder applied (an interrupted truncate, then
        // rot) are what the cut removed: a hole, and the cut goes to their holders.
        None => {
            (Choice::Hole { cut }, answers.iter().filter(|(_, a)| corrupt_before(a, cut)).map(|(s, _)| *s).collect())
        }
    }
}

/// Whether answer `a` is a corrupt copy older than cut `cut`.
fn corrupt_before(a: &Answer, cut: u64) -> bool {
    matches!(a, Answer::Corrupt { claims } if *claims < cut)
}

/// The state of one block's read.
struct Ballot {
    order: Vec<usize>,
    tried: usize,
    answers: Vec<(usize, Answer)>,
    /// Answers from servers that vouch for them: not rebuilding a lost disk, not catching up
    /// after a restart (their copies take part in the choice, but not in the count). Corrupt
    /// copies are counted apart, in `corrupt`.
    counted: usize,
    corrupt: usize,
}

impl Ballot {
    fn counted(&self) -> usize {
        self.counted
    }

    fn has_good(&self) -> bool {
        self.answers.iter().any(|(_, a)| matches!(a, Answer::Good(_)))
    }

    fn has_corrupt(&self) -> bool {
        self.answers.iter().any(|(_, a)| matches!(a, Answer::Corrupt { .. }))
    }

    /// Whether the answers suffice: Q that count, and a good copy among them if any was corrupt
    /// (another replica may still hold a good one). A corrupt copy's version is only what its
    /// header claims (the MD5 covers the data), too weak to win over an intact copy, so it counts
    /// only once every replica answered: before that, a stale copy beside a corrupt newer one
    /// would make Q and win over the intact newer copy not yet heard from (asked later, or down:
    /// asked is not enough). The claim decides only between the corrupt copy and a cut.
    fn settled(&self, q: usize) -> bool {
        let all_answered = self.answers.len() == self.order.len();
        let counted = self.counted + if all_answered { self.corrupt } else { 0 };
        counted >= q && (self.has_good() || !self.has_corrupt() || all_answered)
    }

    /// Whether the read of this block is decided: `want` answers, or `least` once every replica
    /// was asked (the others are down).
    fn decided(&self, want: usize, least: usize) -> bool {
        self.settled(want) || (self.tried == self.order.len() && self.settled(least))
    }
}

impl<P: DataPort> Engine<P> {
    /// [`Engine::read_blocks`] with a read quorum: every block is decided by `want` answers, or
    /// by `least` once every replica was asked (see [`choose`]), and the replicas that answered
    /// stale, missing or corrupt are mended.
    pub(super) async fn read_blocks_quorum(
        &self,
        file_id: u64,
        from: u64,
        to: u64,
        quorum: (u8, u8),
    ) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let (q, least) = (usize::from(quorum.0), usize::from(quorum.1.min(quorum.0)));
        let keys: Vec<BlockKey> = (from..to).map(|index| BlockKey { file_id, index }).collect();
        let mut ballots: Vec<Ballot> = self
            .read_orders(keys.iter().copied())
            .into_iter()
            .map(|order| Ballot { order, tried: 0, answers: vec![], counted: 0, corrupt: 0 })
            .collect();
        let mut delay = self.backoff.first;
        let mut waits = 0u32;
        loop {
            // Ask each unsettled block's next replicas, as many as it lacks answers.
            let mut by_server: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, b) in ballots.iter_mut().enumerate() {
                if b.decided(q, least) {
                    continue;
                }
                let want = q.saturating_sub(b.counted()).max(1);
                for _ in 0..want {
                    if b.tried < b.order.len() {
                        by_server.entry(b.order[b.tried]).or_default().push(i);
                        b.tried += 1;
                    }
                }
            }
            if by_server.is_empty() {
                let waiting: Vec<usize> = (0..ballots.len()).filter(|&i| !ballots[i].decided(q, least)).collect();
                if waiting.is_empty() {
                    break;
                }
                // Every replica was asked and fewer than Q answered: wait for servers to return,
                // then ask again from the start (as a write waits for a down server).
                if waits.is_multiple_of(20) {
                    warn!(
                        file_id,
                        blocks = waiting.len(),
                        quorum = least,
                        "read: fewer than the read quorum answer; waiting"
                    );
                }
                waits += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.backoff.max);
                for i in waiting {
                    ballots[i].tried = 0;
                    ballots[i].answers.clear();
                    ballots[i].counted = 0;
                    ballots[i].corrupt = 0;
                }
                continue;
            }
            let asks = by_server.iter().map(|(&s, idx)| self.get_many(s, idx.iter().map(|&i| keys[i])));
            for ((&s, idx), reply) in by_server.iter().zip(join_all(asks).await) {
                let Ok(replies) = reply.inspect_err(|e| {
                    warn!(server = s, addr = %self.port.name(s), "read: dataserver {s}: {e}; trying other replicas");
                }) else {
                    continue;
                };
                let ok = self.verified_each(&replies);
                for ((&i, (block, rebuilding, cut)), ok) in idx.iter().zip(replies).zip(ok) {
                    let answer = match block {
                        Some(b) if b.key == keys[i] && ok => Answer::Good(b),
                        Some(b) => {
                            warn!(server = s, file_id, block = keys[i].index, "read: a corrupt copy on dataserver {s}");
                            Answer::Corrupt { claims: if b.key == keys[i] { b.version } else { u64::MAX } }
                        }
                        None => Answer::Absent { cut },
                    };
                    let corrupt = matches!(answer, Answer::Corrupt { .. });
                    ballots[i].answers.push((s, answer));
                    match (rebuilding, corrupt) {
                        (true, _) => {}
                        (false, true) => ballots[i].corrupt += 1,
                        (false, false) => ballots[i].counted += 1,
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        let mut mend: BTreeMap<usize, Vec<Block>> = BTreeMap::new();
        let mut cuts: BTreeMap<usize, Vec<Cut>> = BTreeMap::new();
        for (k, b) in keys.iter().zip(&ballots) {
            let (choice, stale) = choose(&b.answers);
            match choice {
                Choice::Data(block) => {
                    for s in stale {
                        mend.entry(s).or_default().push(block.clone());
                    }
                    out.push(Some(block.data));
                }
                Choice::Hole { cut } => {
                    for s in stale {
                        cuts.entry(s).or_default().push(Cut { file_id, from_block: k.index, version: cut });
                    }
                    out.push(None);
                }
                Choice::Corrupt => {
                    tracing::error!(file_id, block = k.index, "read: every replica asked is corrupt");
                    return Err(EngineError::Corrupt { file_id, index: k.index });
                }
            }
        }
        self.mend(mend, cuts).await;
        Ok(out)
    }

    /// Writes the chosen copies to the replicas that answered older, missing or corrupt ones, and
    /// sends cuts to those that still held removed blocks. Best effort: the scrubber is the backstop.
    async fn mend(&self, mend: BTreeMap<usize, Vec<Block>>, cuts: BTreeMap<usize, Vec<Cut>>) {
        self.put_repairs(mend.iter().map(|(&s, blocks)| (s, blocks.iter().collect())).collect()).await;
        self.send_cuts(cuts).await;
    }

    /// Sends each server the cuts it missed. Best effort, as [`Self::mend`].
    pub(super) async fn send_cuts(&self, cuts: BTreeMap<usize, Vec<Cut>>) {
        let sends = cuts.iter().map(|(&s, c)| async move {
            if let Err(e) = self.port.truncate(s, c, false).await {
                warn!(server = s, "sending a missed cut to dataserver {s} failed: {e}");
            }
        });
        join_all(sends).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::super::fakes::{block_on, engine_with_quorum, FakeData};
    use super::*;
    use crate::shared::layout::Quorum;
    use crate::shared::placement::replica_servers;

    fn good(v: u64, data: &[u8]) -> Answer {
        Answer::Good(Block::new(BlockKey { file_id: 1, index: 0 }, v, 3, data.to_vec()))
    }

    #[test]
    fn the_newest_verified_version_wins_and_every_other_answer_is_mended() {
        let (c, stale) = choose(&[(0, good(5, b"old")), (1, good(7, b"new")), (2, Answer::Corrupt { claims: 1 })]);
        assert!(matches!(c, Choice::Data(b) if b.version == 7 && b.data == b"new"));
        assert_eq!(stale, vec![0, 2]);
        let (c, stale) = choose(&[(3, Answer::Absent { cut: 0 }), (1, good(7, b"x"))]);
        assert!(matches!(c, Choice::Data(_)));
        assert_eq!(stale, vec![3], "a replica that lost the block gets it back");
        let (_, stale) = choose(&[(0, good(7, b"x")), (1, good(7, b"x"))]);
        assert!(stale.is_empty(), "equal versions need no repair");
    }

    #[test]
    fn a_cut_newer_than_every_copy_is_a_hole_and_the_copies_are_cut() {
        let (c, stale) = choose(&[(0, good(5, b"old")), (1, Answer::Absent { cut: 6 })]);
        assert_eq!(c, Choice::Hole { cut: 6 });
        assert_eq!(stale, vec![0]);
        // A write after the cut wins over it.
        let (c, stale) = choose(&[(0, good(9, b"new")), (1, Answer::Absent { cut: 6 })]);
        assert!(matches!(c, Choice::Data(b) if b.version == 9));
        assert_eq!(stale, vec![1]);
    }

    /// Two copies of one version (two mounts wrote in the same nanosecond, and a write quorum
    /// below R let each replica miss one): the read takes the one the servers keep, the larger
    /// MD5, whichever answered first, and mends the other.
    #[test]
    fn of_two_copies_with_one_version_the_larger_md5_wins_and_the_other_is_mended() {
        let (a, b) = (good(5, b"first"), good(5, b"second"));
        let md5 = |x: &Answer| if let Answer::Good(b) = x { b.md5 } else { unreachable!() };
        let (high, low) = if md5(&a) > md5(&b) { (a, b) } else { (b, a) };
        for answers in [[(0, high.clone()), (1, low.clone())], [(1, low.clone()), (0, high.clone())]] {
            let (c, stale) = choose(&answers);
            assert_eq!(
                c,
                Choice::Data(match &high {
                    Answer::Good(b) => b.clone(),
                    _ => unreachable!(),
                })
            );
            assert_eq!(stale, vec![1]);
        }
    }

    #[test]
    fn only_corrupt_copies_are_an_error_and_nothing_at_all_is_a_hole() {
        assert_eq!(
            choose(&[(0, Answer::Corrupt { claims: 1 }), (1, Answer::Corrupt { claims: 1 })]).0,
            Choice::Corrupt
        );
        let none = [(0, Answer::Absent { cut: 0 }), (1, Answer::Absent { cut: 0 })];
        assert_eq!(choose(&none), (Choice::Hole { cut: 0 }, vec![]));
        assert_eq!(choose(&[(0, Answer::Corrupt { claims: 1 }), (1, Answer::Absent { cut: 0 })]).0, Choice::Corrupt);
        // Beside a cut: a copy claiming a version older than the cut is what the cut removed (it
        // is sent the cut); one claiming the cut's version or newer may be the last write.
        let older = [(0, Answer::Corrupt { claims: 4 }), (1, Answer::Absent { cut: 5 })];
        assert_eq!(choose(&older), (Choice::Hole { cut: 5 }, vec![0]));
        let newer = [(0, Answer::Corrupt { claims: 5 }), (1, Answer::Absent { cut: 5 })];
        assert_eq!(choose(&newer).0, Choice::Corrupt);
    }

    /// Regression: a corrupt answer counted toward Q. With W = 2 and Q = 2 of R = 3, a replica
    /// that missed a write (stale) and one whose newer copy rotted made Q between them, and the
    /// stale copy won (and was then written over the rotted one) though the third replica, not
    /// yet asked, held the newer copy intact.
    #[test]
    fn a_corrupt_copy_does_not_count_toward_the_read_quorum_while_a_replica_is_left() {
        let mut b = Ballot { order: vec![0, 1, 2], tried: 2, answers: vec![], counted: 0, corrupt: 0 };
        b.answers = vec![(0, good(5, b"stale")), (1, Answer::Corrupt { claims: 1 })];
        (b.counted, b.corrupt) = (1, 1);
        assert!(!b.settled(2), "settled on a stale copy and a corrupt one");
        b.answers.push((2, good(7, b"new")));
        (b.tried, b.counted) = (3, 2);
        assert!(b.settled(2));
        let (c, stale) = choose(&b.answers);
        assert!(matches!(c, Choice::Data(x) if x.version == 7));
        assert_eq!(stale, vec![0, 1]);
        // Every replica asked, the corrupt copies count: the read is decided by what verifies.
        let mut all = Ballot { order: vec![0, 1, 2], tried: 3, answers: vec![], counted: 1, corrupt: 2 };
        all.answers =
            vec![(0, good(5, b"only")), (1, Answer::Corrupt { claims: 1 }), (2, Answer::Corrupt { claims: 1 })];
        assert!(all.settled(2));
    }

    /// A W = 2, Q = 2 engine whose block 6/0 has three copies: a stale one (its holder missed the
    /// second write), a corrupt newer one, and an intact newer one on the server returned.
    fn stale_beside_corrupt() -> (Engine<FakeData>, usize) {
        let key = BlockKey { file_id: 6, index: 0 };
        let [_, rotted, intact] = replica_servers(6, 0, 3, 4)[..] else { panic!("three replicas") };
        let e = missed_by_its_first_replica(Quorum { write: 2, read: 2 });
        e.port().stores.borrow_mut()[rotted].get_mut(&key).expect("the copy").data = b"2222x222".to_vec();
        (e, intact)
    }

    /// An engine with `quorum` of R = 3 whose block 6/0 was written twice ("11111111", then
    /// "22222222"), the second time with its first replica down: that replica holds the first.
    fn missed_by_its_first_replica(quorum: Quorum) -> Engine<FakeData> {
        let late = replica_servers(6, 0, 3, 4)[0];
        let e = engine_with_quorum(4, 8, 3, quorum);
        block_on(async {
            e.write(6, 0, b"11111111", 0).await.unwrap();
            e.port().set_up(late, false);
            e.write(6, 0, b"22222222", 8).await.unwrap();
            e.port().set_up(late, true);
        });
        e
    }

    /// The same through the engine: each read asks two of the three replicas first, in an order
    /// drawn per read, so over 30 fresh engines the stale and the corrupt copy come first about
    /// ten times; none may read the stale copy.
    #[test]
    fn a_stale_copy_beside_a_corrupt_newer_one_does_not_win_a_q_2_read() {
        for round in 0..30 {
            let (e, _) = stale_beside_corrupt();
            assert_eq!(block_on(e.read(6, 0, 8, 8)).unwrap(), b"22222222", "round {round}");
        }
    }

    /// The same with the third holder down: the corrupt copy may not count toward Q while the
    /// one that could hold the newest write is silent, so the read waits for it (it read the stale
    /// copy, and mended the corrupt one with it).
    #[test]
    fn a_stale_copy_beside_a_corrupt_newer_one_waits_for_a_silent_third() {
        let (e, silent) = stale_beside_corrupt();
        block_on(async {
            e.port().set_up(silent, false);
            let read = tokio::time::timeout(Duration::from_millis(300), e.read(6, 0, 8, 8)).await;
            assert!(read.is_err(), "read {:?} without the newest copy's holder", read.map(|r| r.ok()));
            e.port().set_up(silent, true);
            assert_eq!(e.read(6, 0, 8, 8).await.unwrap(), b"22222222");
        });
    }

    /// W = 2, Q = 1 of R = 3: a partial write or a truncate merges into a block's old content, and
    /// a replica that missed the last write holds an older copy: a merge into that, stored under
    /// a newer version, would undo the last write on every replica. The old content is read from
    /// R - W + 1 replicas. The replica a read asks first is drawn per read, so over 30 fresh
    /// engines the stale one comes first about ten times.
    #[test]
    fn a_merge_with_w_below_r_starts_from_the_last_write_not_a_stale_copy() {
        let key = BlockKey { file_id: 6, index: 0 };
        let newest = |e: &Engine<FakeData>| {
            let stores = e.port().stores.borrow();
            stores.iter().filter_map(|s| s.get(&key)).max_by_key(|b| b.version).map(|b| b.data.clone())
        };
        let quorum = Quorum { write: 2, read: 1 };
        for round in 0..30 {
            let e = missed_by_its_first_replica(quorum);
            block_on(e.write(6, 0, b"3", 8)).unwrap();
            assert_eq!(newest(&e).as_deref(), Some(b"32222222".as_slice()), "write, round {round}");
            let e = missed_by_its_first_replica(quorum);
            block_on(e.truncate(6, 8, 4)).unwrap();
            assert_eq!(newest(&e).as_deref(), Some(b"2222".as_slice()), "truncate, round {round}");
        }
    }

    /// R = 4, W = 2, Q = 2 with two servers down (as in the assignment's quorum table): a partial
    /// write still returns, and keeps the block's other bytes. Its merge asks for R - W + 1 = 3
    /// copies, and settles for the Q that answer: with two up, the write reaches no more.
    #[test]
    fn a_merge_with_fewer_than_r_minus_w_plus_1_servers_up_reads_the_read_quorum() {
        let e = engine_with_quorum(4, 8, 4, Quorum { write: 2, read: 2 });
        let key = BlockKey { file_id: 6, index: 0 };
        block_on(async {
            e.write(6, 0, b"11111111", 0).await.unwrap();
            // The write returned with two copies (here nothing hands the others over): one of
            // them and one server without a copy stay up.
            let (holders, others): (Vec<usize>, Vec<usize>) =
                (0..4).partition(|&s| e.port().stores.borrow()[s].contains_key(&key));
            e.port().set_up(holders[0], false);
            e.port().set_up(others[0], false);
            let w = tokio::time::timeout(Duration::from_secs(5), e.write(6, 0, b"2", 8)).await;
            assert!(w.is_ok(), "a partial write waited for servers that are down");
            assert_eq!(e.read(6, 0, 8, 8).await.unwrap(), b"21111111");
        });
    }

    #[test]
    fn a_write_with_one_holder_down_returns_with_w_2_and_waits_with_w_3() {
        let e = engine_with_quorum(4, 8, 3, Quorum { write: 2, read: 2 });
        block_on(async {
            let down = replica_servers(5, 0, 3, 4)[2];
            e.port().set_up(down, false);
            let w = tokio::time::timeout(Duration::from_secs(2), e.write(5, 0, b"abcdefgh", 0)).await;
            assert!(w.is_ok(), "a W = 2 write waited for a down replica");
            assert_eq!(e.read(5, 0, 8, 8).await.unwrap(), b"abcdefgh");
        });
        let e = engine_with_quorum(4, 8, 3, Quorum { write: 3, read: 1 });
        block_on(async {
            e.port().set_up(replica_servers(5, 0, 3, 4)[2], false);
            let w = tokio::time::timeout(Duration::from_millis(200), e.write(5, 0, b"abcdefgh", 0)).await;
            assert!(w.is_err(), "a W = 3 write returned with a replica down");
        });
    }

    #[test]
    fn a_restarted_server_that_is_catching_up_is_not_counted() {
        // W = 2, Q = 2 of R = 4: two servers down during a write come back; while they catch up
        // their answers must not make the quorum, or a read of two of them would miss the write.
        let e = engine_with_quorum(4, 8, 4, Quorum { write: 2, read: 2 });
        block_on(async {
            e.port().set_up(1, false);
            e.port().set_up(2, false);
            e.write(8, 0, b"newdata!", 0).await.unwrap();
            e.port().set_up(1, true);
            e.port().set_up(2, true);
            e.port().set_catching_up(1, true);
            e.port().set_catching_up(2, true);
            for _ in 0..30 {
                assert_eq!(e.read(8, 0, 8, 8).await.unwrap(), b"newdata!");
            }
        });
    }

    #[test]
    fn a_stale_replica_is_outvoted_and_mended_by_q_2_reads() {
        let e = missed_by_its_first_replica(Quorum { write: 2, read: 2 });
        let (late, key) = (replica_servers(6, 0, 3, 4)[0], BlockKey { file_id: 6, index: 0 });
        block_on(async {
            assert_eq!(e.port().stores.borrow()[late][&key].data, b"11111111", "the fake holds the stale copy");
            for _ in 0..30 {
                assert_eq!(e.read(6, 0, 8, 8).await.unwrap(), b"22222222");
            }
            assert_eq!(e.port().stores.borrow()[late][&key].data, b"22222222", "the stale copy was not mended");
        });
    }

    #[test]
    fn a_truncate_missed_by_a_down_server_is_not_read_back_and_is_sent_to_it() {
        let e = engine_with_quorum(4, 8, 3, Quorum { write: 2, read: 2 });
        block_on(async {
            e.write(7, 0, &[1u8; 16], 0).await.unwrap();
            let late = replica_servers(7, 1, 3, 4)[1];
            e.port().set_up(late, false);
            e.truncate(7, 16, 8).await.unwrap();
            e.port().set_up(late, true);
            // Extended again: block 1 must read as zeros, never the old bytes the late server has.
            for _ in 0..30 {
                assert_eq!(e.read(7, 8, 8, 16).await.unwrap(), vec![0u8; 8]);
            }
            let key = BlockKey { file_id: 7, index: 1 };
            assert!(!e.port().stores.borrow()[late].contains_key(&key), "the late server still holds the cut block");
        });
    }

    /// A truncate cut short after it reached two holders of a block but not the third, whose copy
    /// then rotted: the block reads as the hole the cut made (with one answer trusted, and with
    /// two or three compared), and the cut goes to the third. Every read answered EIO: a corrupt
    /// copy was taken for a lost write, whatever the cuts beside it said of it.
    #[test]
    fn a_corrupt_copy_older_than_a_cut_reads_as_the_hole_and_is_cut() {
        use crate::client::ports::DataPort;
        let key = BlockKey { file_id: 7, index: 1 };
        for read in 1..=3 {
            let e = engine_with_quorum(4, 8, 3, Quorum { write: 3, read });
            block_on(async {
                e.write(7, 0, b"0123456789abcdef", 0).await.unwrap();
                let h = replica_servers(7, 1, 3, 4);
                let version = e.port().stores.borrow()[h[0]][&key].version + 1;
                let cut = Cut { file_id: 7, from_block: 1, version };
                for &s in &h[1..] {
                    e.port().truncate(s, &[cut], false).await.unwrap();
                }
                e.port().stores.borrow_mut()[h[0]].get_mut(&key).unwrap().data[0] ^= 1;
                // Q = 2 asks two of the three, drawn per read: the corrupt copy's holder is among
                // them in two reads of three.
                for _ in 0..30 {
                    assert_eq!(e.read(7, 8, 8, 16).await.unwrap(), vec![0u8; 8], "Q = {read}");
                }
                assert!(!e.port().stores.borrow()[h[0]].contains_key(&key), "Q = {read}: the corrupt copy stayed");
                // A corrupt copy newer than the cuts beside it is still an error where the read
                // hears from it (Q = 2 may settle on the two cuts): it may be the last write.
                let newer = Block::new(key, version + 1, 3, b"ABCDEFGH".to_vec());
                e.port().stores.borrow_mut()[h[0]].insert(key, Block { data: b"XBCDEFGH".to_vec(), ..newer });
                if read != 2 {
                    assert!(e.read(7, 8, 8, 16).await.is_err(), "Q = {read}: a corrupt copy newer than the cut");
                }
            });
        }
    }
}
