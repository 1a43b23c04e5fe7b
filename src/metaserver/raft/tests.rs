//! The log store and the namespace state machine: openraft's own storage suite, exactly-once
//! application of retried requests, and a snapshot carried to a fresh member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader};

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::*;
use crate::metaserver::namespace::{Change, Namespace, Outcome};
use crate::shared::{Kind, NewNode, ROOT};

struct Stores;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Stores {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let (dir, log, sm) = member();
        Ok((dir, log, sm))
    }
}

/// A fresh member's stores in a temp dir.
fn member() -> (tempfile::TempDir, LogStore, StateMachine) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = LogStore::open(&dir.path().join("raft")).expect("log store");
    let ns = Namespace::open(&dir.path().join("meta"), Some(4096), Some(3)).expect("namespace");
    (dir, log, StateMachine::new(Arc::new(ns)))
}

#[test]
fn openraft_storage_suite_passes_on_the_member_stores() {
    // The suite makes its own runtime, so this is not a tokio test.
    Suite::test_all(Stores).expect("openraft's storage suite");
}

fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
}

fn request(index: u64, client: u64, seq: u64, change: Change) -> Entry {
    entry(index, EntryPayload::Normal(Request { client, seq, now: 1_000 + index as i64, change }))
}

fn file(name: &str) -> Change {
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    Change::Mknod { parent: ROOT, name: name.as_bytes().to_vec(), node }
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> Vec<Response> {
    sm.apply(entries).await.expect("apply")
}

fn ok(r: &Response) -> &Outcome {
    match r {
        Response::Applied(Ok(o)) => o,
        r => panic!("expected a successful change, got {r:?}"),
    }
}

/// A client whose answer was lost resends its request with the same sequence number; the leader
/// that takes it (maybe a new one) logs it again. Applying it again must answer as the first time
/// did, not fail with EEXIST or ENOENT, and change nothing.
#[tokio::test]
async fn a_retried_request_is_applied_once_and_answered_as_the_first_time() {
    let (_dir, _log, mut sm) = member();
    let rename =
        Change::Rename { parent: ROOT, name: b"a".to_vec(), new_parent: ROOT, new_name: b"b".to_vec(), flags: 0 };
    let unlink = Change::Unlink { parent: ROOT, name: b"b".to_vec() };
    let link = Change::Link { ino: 2, new_parent: ROOT, new_name: b"c".to_vec() };
    let first = apply(
        &mut sm,
        vec![
            request(1, 7, 1, file("a")),
            request(2, 7, 1, file("a")),
            request(3, 7, 2, rename.clone()),
            request(4, 7, 2, rename),
            request(5, 7, 3, file("x")),
            request(6, 7, 4, link.clone()),
            request(7, 7, 4, link),
            request(8, 7, 5, unlink.clone()),
            request(9, 7, 5, unlink),
        ],
    )
    .await;
    for pair in [(0, 1), (2, 3), (5, 6), (7, 8)] {
        assert_eq!(first[pair.0], first[pair.1], "entries {} and {} answered differently", pair.0 + 1, pair.1 + 1);
        ok(&first[pair.1]);
    }
    let ns = sm.namespace().clone();
    let names: Vec<Vec<u8>> = ns.readdir(ROOT).expect("readdir").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec![b"c".to_vec(), b"x".to_vec()]);
    assert_eq!(ns.getattr(2).expect("the file").nlink, 1, "linked once, unlinked once");
    // Another client's request with the same numbers is its own.
    let other = apply(&mut sm, vec![request(10, 8, 1, file("a"))]).await;
    ok(&other[0]);
    // An older request of a client than its last is refused, not applied.
    let stale = apply(&mut sm, vec![request(11, 7, 2, file("y"))]).await;
    assert!(matches!(&stale[0], Response::Applied(Err(_))), "{stale:?}");
    assert!(ns.lookup(ROOT, b"y").is_err());
    let (applied, _) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(11));
}

/// A failed change answers its error, changes nothing, and is answered the same when retried.
#[tokio::test]
async fn a_failed_change_is_remembered_as_failed() {
    let (_dir, _log, mut sm) = member();
    let r = apply(&mut sm, vec![request(1, 9, 1, file("a")), request(2, 9, 2, file("a")), request(3, 9, 2, file("a"))])
        .await;
    ok(&r[0]);
    assert_eq!(r[1], Response::Applied(Err(crate::shared::FsError::Exists)));
    assert_eq!(r[1], r[2]);
    assert_eq!(sm.namespace().inode_count().expect("count"), 2, "the root and one file");
}

/// A member that fell behind (or lost its disk) gets a snapshot: the namespace, the clients'
/// last answers and the applied position all come with it.
#[tokio::test]
async fn a_snapshot_carries_the_namespace_and_the_sessions_to_a_fresh_member() {
    let (_a, _la, mut a) = member();
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|i| (i, BasicNode::new(format!("127.0.0.1:{i}")))).collect();
    let ids: BTreeSet<u64> = members.keys().copied().collect();
    let membership = Membership::new(vec![ids], members);
    let mut entries = vec![entry(1, EntryPayload::Membership(membership.clone()))];
    entries.extend((0..50).map(|i| request(2 + i, 5, 1 + i, file(&format!("f{i}")))));
    apply(&mut a, entries).await;
    let snap = a.get_snapshot_builder().await.build_snapshot().await.expect("build");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(51));
    assert_eq!(*a.checkpointed().borrow(), Some(51), "a snapshot is built from a checkpoint");

    let (_b, mut lb, mut b) = member();
    assert_eq!(*b.checkpointed().borrow(), None);
    b.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
    assert_eq!(*b.checkpointed().borrow(), Some(51), "an installed snapshot is checkpointed");
    assert_eq!(b.namespace().readdir(ROOT).expect("b"), a.namespace().readdir(ROOT).expect("a"));
    let (applied, m) = b.applied_state().await.expect("applied state");
    assert_eq!(applied, snap.meta.last_log_id);
    assert_eq!(m.membership(), &membership);
    assert_eq!(b.get_current_snapshot().await.expect("current").map(|s| s.meta), Some(snap.meta.clone()));
    // The last request of client 5, retried on the new member, is answered, not applied again.
    let retry = apply(&mut b, vec![request(52, 5, 50, file("f49"))]).await;
    ok(&retry[0]);
    assert_eq!(b.namespace().inode_count().expect("count"), 51);
    // The log store of a fresh member starts empty.
    assert_eq!(lb.get_log_state().await.expect("log state").last_log_id, None);
}

/// A member whose log an earlier version kept in LMDB finds its entries in the segment log, and
/// appends after them.
#[tokio::test]
async fn entries_in_the_old_lmdb_log_move_to_the_segment_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let raft = dir.path().join("raft");
    {
        let (db, [log, _state]) = crate::shared::db::Db::open(&raft, ["log", "state"]).expect("old store");
        db.write(|w| {
            for i in 1..=3u64 {
                let e = request(i, 1, i, file(&format!("f{i}")));
                w.put(log, &i.to_be_bytes(), &postcard::to_allocvec(&e).expect("encode"))?;
            }
            Ok::<_, crate::shared::db::DbError>(())
        })
        .expect("old entries");
    }
    let mut store = LogStore::open(&raft).expect("log store");
    let held: Vec<u64> =
        store.try_get_log_entries(0..).await.expect("entries").iter().map(|e| e.log_id.index).collect();
    assert_eq!(held, vec![1, 2, 3]);
    drop(store);
    // Moved, not copied: a reopen finds them once.
    let mut store = LogStore::open(&raft).expect("log store");
    assert_eq!(store.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(3));
    assert_eq!(store.try_get_log_entries(0..).await.expect("entries").len(), 3);
}

/// A member's namespace applies without waiting for the disk and is checkpointed; after a crash it
/// reopens as of its checkpoint, says so, and applying the rest of the log again rebuilds what it
/// had (each change applied once: nothing answers EEXIST).
#[tokio::test]
async fn a_member_restarted_after_a_crash_applies_again_what_its_checkpoint_lacks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let open = || {
        let shape = crate::metaserver::namespace::Shape {
            block_size: Some(4096),
            replicas: Some(3),
            quorum: Default::default(),
        };
        let durability = crate::shared::db::Durability::Checkpointed;
        StateMachine::new(Arc::new(Namespace::open_with(&dir.path().join("meta"), shape, durability).expect("open")))
    };
    let entries: Vec<Entry> = (1..=20).map(|i| request(i, 3, i, file(&format!("f{i}")))).collect();
    let mut sm = open();
    apply(&mut sm, entries[..10].to_vec()).await;
    sm.namespace().checkpoint().expect("checkpoint");
    apply(&mut sm, entries[10..].to_vec()).await;
    let before = sm.namespace().readdir(ROOT).expect("readdir");
    assert_eq!(before.len(), 20);
    drop(sm);

    let mut sm = open();
    let (applied, _) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(10));
    assert_eq!(sm.namespace().readdir(ROOT).expect("readdir").len(), 10);
    for r in apply(&mut sm, entries[10..].to_vec()).await {
        ok(&r);
    }
    assert_eq!(sm.namespace().readdir(ROOT).expect("readdir"), before);
    // A snapshot is taken from a checkpoint: it holds all of it.
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(20));
}

/// Regression: entries carry the time their leader took them, and a leader's clock may be behind
/// the one before it. The collector frees an orphan on session reports stamped after its removal,
/// so a report taken before a removal, under a leader whose clock was ahead, looked taken after it.
/// Stamps now follow the log's order.
#[tokio::test]
async fn stamps_follow_the_log_order_whatever_the_leaders_clocks() {
    let (_dir, _log, mut sm) = member();
    let a = apply(&mut sm, vec![request(1, 7, 1, file("a"))]).await;
    let slow = Request { client: 7, seq: 2, now: 500, change: file("b") };
    let b = apply(&mut sm, vec![entry(2, EntryPayload::Normal(slow))]).await;
    let (Outcome::Attr(a), Outcome::Attr(b)) = (ok(&a[0]), ok(&b[0])) else { panic!("attributes") };
    assert_eq!(a.ctime, 1_001);
    assert_eq!(b.ctime, 1_002, "the later change is stamped after the earlier one");
    let c = apply(&mut sm, vec![request(3, 7, 3, file("c"))]).await;
    let Outcome::Attr(c) = ok(&c[0]) else { panic!("attributes") };
    assert_eq!(c.ctime, 1_003);
}

/// A batch entry applies its requests in order, each at its own time and answered as alone: a
/// retry of a request applied before gets that first answer, a failed one its error, and the
/// others go on.
#[tokio::test]
async fn a_batch_applies_each_request_as_its_own_entry_would() {
    let (_dir, _log, mut sm) = member();
    let first = apply(&mut sm, vec![request(1, 7, 1, file("a"))]).await;
    let r = |client, seq, now, change| Request { client, seq, now, change };
    let batch = Change::Batch {
        requests: vec![
            r(7, 1, 2_000, file("a")),
            r(8, 1, 2_001, file("b")),
            r(8, 2, 2_002, file("b")),
            r(9, 1, 2_003, file("c")),
        ],
    };
    let out = apply(&mut sm, vec![entry(2, EntryPayload::Normal(r(0, 0, 2_004, batch)))]).await;
    let Response::Many(answers) = &out[0] else { panic!("a batch answers each request: {out:?}") };
    assert_eq!(answers.len(), 4);
    assert_eq!(Response::Applied(answers[0].clone()), first[0], "a retry gets its first answer");
    let Ok(Outcome::Attr(b)) = &answers[1] else { panic!("{answers:?}") };
    assert_eq!(b.ctime, 2_001, "each request at its own time");
    assert!(matches!(answers[2], Err(crate::shared::FsError::Exists)), "{:?}", answers[2]);
    let Ok(Outcome::Attr(c)) = &answers[3] else { panic!("{answers:?}") };
    assert_eq!(c.ctime, 2_003);
    let names = sm.namespace().readdir(ROOT).expect("readdir");
    assert_eq!(names.len(), 3, "{names:?}");
}

/// openraft builds a snapshot beside the installs of the leader's: a build that began before an
/// install and ends after it must not take the place of the newer snapshot installed.
#[tokio::test]
async fn a_snapshot_built_before_an_install_does_not_replace_the_newer_one_installed() {
    let entries: Vec<Entry> = (1..=20).map(|i| request(i, 3, i, file(&format!("f{i}")))).collect();
    let (_d1, _l1, mut older) = member();
    apply(&mut older, entries[..10].to_vec()).await;
    let (_d2, _l2, mut newer) = member();
    apply(&mut newer, entries.clone()).await;
    let built = older.get_snapshot_builder().await.build_snapshot().await.expect("build at 10");
    let newest = newer.get_snapshot_builder().await.build_snapshot().await.expect("build at 20");
    let (_d3, _l3, mut sm) = member();
    sm.install_snapshot(&newest.meta, newest.snapshot).await.expect("install at 20");
    // The build that began before the install ends now.
    let bytes = built.snapshot.into_inner();
    sm.keep(&built.meta, bytes);
    let kept = sm.get_current_snapshot().await.expect("current").expect("a snapshot");
    assert_eq!(kept.meta.last_log_id.map(|l| l.index), Some(20));
}
