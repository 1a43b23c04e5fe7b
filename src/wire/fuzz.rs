//! Hostile bytes on the wire. A seeded, bounded loop feeds random frames and mutations of valid
//! Cap'n Proto RPC conversations to each service: a dataserver, a metaserver, and a metaserver
//! group's member (through its Raft messages too). Then: no handler panicked, the process's memory
//! stayed bounded, the server still answers a well-formed conversation, and its store's file is
//! byte for byte what it was. A second test holds thousands of idle connections, a sender that
//! trickles bytes and a request with a huge list against a dataserver while a client is served.
//!
//! The servers run in this process (on threads, as their binaries run them), so a panic anywhere
//! is seen by the hook below. `DFS_FUZZ_ITERATIONS` (default 1,000 per service) and
//! `DFS_FUZZ_SEED` give longer or other runs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use capnp::message::ReaderOptions;
use capnp::traits::HasTypeId;
use capnp_rpc::rpc_capnp::{message, return_};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dfs_capnp::{data_server, data_session, meta, Kind};
use super::{auth, net};
use crate::metaserver::group::GroupConfig;
use crate::metaserver::namespace::Shape;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// The two tests here measure the process's memory: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Counts every panic in the process from the first call on (the servers' handlers run on their
/// threads, where a panic would otherwise only end one connection's task).
fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info)
        }));
    });
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("rss");
    pages * 4096
}

/// The most memory this process has had resident so far.
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|k| k.trim().parse::<u64>().ok()).expect("VmHWM") << 10
}

/// Runs a server the way its binary does, on a thread of its own (it serves until the process ends).
fn spawn_server(
    name: &str,
    addr: &str,
    run: impl FnOnce() -> Result<(), crate::shared::start::StartError> + Send + 'static,
) {
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(e) = run() {
                panic!("{name} stopped: {e}");
            }
        })
        .expect("thread");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An authenticated connection, handed back as a blocking stream.
fn connect(addr: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let s = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        auth::client_side(&mut s, auth::secret()).await.expect("handshake");
        s.into_std().expect("std stream")
    });
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s
}

fn frame(build: impl FnOnce(message::Builder)) -> Vec<u8> {
    let mut b = capnp::message::Builder::new_default();
    build(b.init_root());
    capnp::serialize::write_message_to_words(&b)
}

fn bootstrap(q: u32) -> Vec<u8> {
    frame(|m| m.init_bootstrap().set_question_id(q))
}

/// Question `q`: method `method` of `interface` on what question `on` returns (or on the
/// capability in pointer field `field` of its results), with `params` written by the caller.
fn call(
    q: u32,
    on: u32,
    field: Option<u16>,
    (interface, method): (u64, u16),
    params: impl FnOnce(capnp::any_pointer::Builder),
) -> Vec<u8> {
    frame(|m| {
        let mut c = m.init_call();
        c.set_question_id(q);
        c.set_interface_id(interface);
        c.set_method_id(method);
        let mut target = c.reborrow().init_target().init_promised_answer();
        target.set_question_id(on);
        if let Some(f) = field {
            target.init_transform(1).get(0).set_get_pointer_field(f);
        }
        params(c.init_params().init_content());
    })
}

const META: u64 = <meta::Client as HasTypeId>::TYPE_ID;
const DATA: u64 = <data_server::Client as HasTypeId>::TYPE_ID;
const SESSION: u64 = <data_session::Client as HasTypeId>::TYPE_ID;

/// The methods that change what a server stores or does (or lose it its clients, as `crash`):
/// a mutation that turns a frame into one of these is a legitimate request, not hostile bytes, so
/// the loop does not send it. `raft` stays in: a member checks its messages.
fn changes_state(interface: u64, method: u16) -> bool {
    match interface {
        META => matches!(method, 0 | 4 | 5 | 6 | 8 | 9 | 10 | 11 | 13 | 14 | 17 | 20 | 22 | 23),
        DATA => method == 2,
        SESSION => matches!(method, 0 | 2 | 3 | 5),
        _ => false,
    }
}

fn is_changing_call(bytes: &[u8]) -> bool {
    let Ok(m) = capnp::serialize::read_message_from_flat_slice(&mut &bytes[..], net::reader_options()) else {
        return false;
    };
    let Ok(root) = m.get_root::<message::Reader>() else { return false };
    match root.which() {
        Ok(message::Call(Ok(c))) => changes_state(c.get_interface_id(), c.get_method_id()),
        _ => false,
    }
}

/// What the loop sends to one service: frames that set up the state it must keep, and a
/// conversation of reads (each frame a question numbered by its position) to mutate.
struct Service {
    name: &'static str,
    addr: String,
    /// The store's file, when nothing but a change may write it (a group member's namespace also
    /// records each applied Raft entry, and a forged vote may legitimately start an election).
    store: Option<PathBuf>,
    setup: Vec<Vec<u8>>,
    reads: Vec<Vec<u8>>,
    /// The reads whose answers show the stored state, compared before and after the loop.
    state: Vec<u32>,
}

fn layout_of(ring: &[String], mut l: super::dfs_capnp::layout::Builder) {
    let mut servers = l.reborrow().init_servers(ring.len() as u32);
    for (i, s) in ring.iter().enumerate() {
        servers.set(i as u32, s.as_str());
    }
    l.set_block_size(4096);
    l.set_replicas(3);
}

fn key(mut k: super::dfs_capnp::block_key::Builder, file: u64, index: u64) {
    k.set_file_id(file);
    k.set_index(index);
}

fn dataserver(dir: &Path) -> Service {
    let ring: Vec<String> = (0..4).map(|_| free_addr()).collect();
    let (d, r) = (dir.to_path_buf(), ring.clone());
    let opts =
        crate::dataserver::DataServerOptions { debug_skip_rebuild: true, scrub_every: None, ..Default::default() };
    spawn_server("fuzz-dataserver", &ring[0], move || crate::dataserver::run(&d, 0, r, opts));
    let connect = |q| {
        call(q, 0, None, (DATA, 0), |p| {
            layout_of(&ring, p.init_as::<data_server::connect_params::Builder>().init_layout())
        })
    };
    // A block that belongs on this server (the first of the ring).
    let file = (1..).find(|&f| crate::shared::placement::holds(0, f, 0, 3, 4)).expect("a file");
    let data = vec![7u8; 4096];
    let put = call(2, 1, Some(0), (SESSION, 0), |p| {
        let mut b = p.init_as::<data_session::put_params::Builder>().init_blocks(1).get(0);
        b.set_file_id(file);
        b.set_index(0);
        b.set_version(1);
        b.set_replicas(3);
        b.set_md5(&crate::shared::block::checksum(&data));
        b.set_data(&data);
    });
    let reads = vec![
        bootstrap(0),
        connect(1),
        call(2, 0, None, (DATA, 1), |_| {}),
        call(3, 1, Some(0), (SESSION, 1), |p| {
            let mut keys = p.init_as::<data_session::get_params::Builder>().init_keys(2);
            key(keys.reborrow().get(0), file, 0);
            key(keys.get(1), file, 1);
        }),
        call(4, 1, Some(0), (SESSION, 4), |p| {
            let mut l = p.init_as::<data_session::list_for_params::Builder>();
            l.set_target(1);
            l.set_limit(100);
            key(l.init_after(), 0, 0);
        }),
        call(5, 1, Some(0), (SESSION, 6), |p| {
            key(p.init_as::<data_session::versions_params::Builder>().init_keys(1).get(0), file, 0)
        }),
        call(6, 1, Some(0), (SESSION, 7), |p| {
            let mut d = p.init_as::<data_session::digest_params::Builder>();
            d.set_peer(1);
            key(d.init_from(), 0, 0);
        }),
        call(7, 1, Some(0), (SESSION, 8), |p| p.init_as::<data_session::hints_for_params::Builder>().set_target(1)),
        call(8, 1, Some(0), (SESSION, 9), |p| {
            let mut g = p.init_as::<data_session::get_range_params::Builder>();
            key(g.reborrow().init_key(), file, 0);
            g.set_from(10);
            g.set_to(100);
        }),
    ];
    let setup = vec![bootstrap(0), connect(1), put];
    Service {
        name: "dataserver",
        addr: ring[0].clone(),
        store: Some(dir.join("data.mdb")),
        setup,
        reads,
        state: vec![3, 5, 6],
    }
}

fn shape() -> Shape {
    Shape { block_size: Some(4096), replicas: Some(3), quorum: Default::default() }
}

fn meta_reads() -> Vec<Vec<u8>> {
    let m = |q, method, params: fn(capnp::any_pointer::Builder)| call(q, 0, None, (META, method), params);
    vec![
        bootstrap(0),
        m(1, 1, |_| {}),
        m(2, 2, |p| {
            let mut l = p.init_as::<meta::lookup_params::Builder>();
            l.set_parent(crate::shared::ROOT);
            l.set_name(b"f");
        }),
        m(3, 3, |p| p.init_as::<meta::getattr_params::Builder>().set_ino(crate::shared::ROOT)),
        m(4, 12, |p| p.init_as::<meta::readdir_params::Builder>().set_ino(crate::shared::ROOT)),
        m(5, 16, |_| {}),
        m(6, 15, |_| {}),
        m(7, 21, |p| p.init_as::<meta::local_version_params::Builder>().set_path(b"/f")),
    ]
}

/// lookup, getattr, readdir, stats and localVersion in [`meta_reads`].
const META_STATE: [u32; 5] = [2, 3, 4, 5, 7];

fn metaserver(dir: &Path) -> Service {
    let addr = free_addr();
    let (d, a) = (dir.to_path_buf(), addr.clone());
    spawn_server("fuzz-metaserver", &addr, move || {
        crate::metaserver::run(&d, shape(), &a, crate::metaserver::DEFAULT_LEASE)
    });
    let mknod = |q, name: &'static [u8], kind| {
        call(q, 0, None, (META, 5), move |p| {
            let mut n = p.init_as::<meta::mknod_params::Builder>();
            n.set_parent(crate::shared::ROOT);
            n.set_name(name);
            n.set_kind(kind);
            n.set_perm(0o755);
        })
    };
    let setup = vec![bootstrap(0), mknod(1, b"f", Kind::File), mknod(2, b"d", Kind::Dir)];
    Service {
        name: "metaserver",
        addr,
        store: Some(dir.join("data.mdb")),
        setup,
        reads: meta_reads(),
        state: META_STATE.to_vec(),
    }
}

fn group_member(dir: &Path) -> Service {
    use crate::metaserver::raft::{NodeId, TypeConfig};
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use openraft::{SnapshotMeta, Vote};

    let addr = free_addr();
    let group = GroupConfig::parse(&format!("M: 1\nmetadata0: {addr}\n")).expect("config");
    let id = group.id();
    let d = dir.to_path_buf();
    spawn_server("fuzz-member", &addr, move || {
        crate::metaserver::run_member(&d, shape(), &group, 0, crate::metaserver::DEFAULT_LEASE)
    });
    // Term 0 and an unknown member: valid messages that a member answers and refuses.
    let vote = postcard::to_allocvec(&VoteRequest::<NodeId>::new(Vote::new(0, 9), None)).expect("vote");
    let append = postcard::to_allocvec(&AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(0, 9),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    })
    .expect("append");
    let raft = |q, kind, body: Vec<u8>| {
        call(q, 0, None, (META, 18), move |p| {
            let mut r = p.init_as::<meta::raft_params::Builder>();
            r.set_group(id);
            r.set_kind(kind);
            r.set_message(&body);
        })
    };
    // A snapshot's first chunk, then one at an offset no leader sends: it grew the receiving
    // buffer to that offset (and near 2^63, panicked).
    let chunk = |offset: u64, data: Vec<u8>| {
        postcard::to_allocvec(&InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(u64::MAX - 1, 9),
            meta: SnapshotMeta { snapshot_id: "x".into(), ..SnapshotMeta::default() },
            offset,
            data,
            done: false,
        })
        .expect("snapshot chunk")
    };
    let mut reads = meta_reads();
    reads.push(call(8, 0, None, (META, 19), |_| {}));
    reads.push(raft(9, 1, vote));
    reads.push(raft(10, 0, append));
    reads.push(raft(11, 2, chunk(0, vec![])));
    reads.push(raft(12, 2, chunk(1 << 63, vec![0])));
    Service { name: "group member", addr, store: None, setup: vec![], reads, state: META_STATE.to_vec() }
}

/// Sends `frames` on a fresh connection, closes its sending side and reads whatever comes back
/// until the server closes or is silent for 5 s (a server that keeps sending for 10 s fails).
fn converse(addr: &str, frames: &[Vec<u8>]) {
    let mut s = connect(addr);
    for f in frames {
        if s.write_all(f).is_err() {
            break; // the server hung up on bad input: that is allowed
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(Instant::now() < deadline, "{addr} kept talking after the client closed"),
        }
    }
}

/// Runs the well-formed conversation and checks that every question got results (not an
/// exception) within a bound; returns each answer's content, by question.
fn answers_all(addr: &str, frames: &[Vec<u8>]) -> BTreeMap<u32, Vec<u8>> {
    let answers = answers(addr, frames);
    answers.into_iter().map(|(q, a)| (q, a.unwrap_or_else(|e| panic!("{addr}: question {q} failed: {e}")))).collect()
}

/// Each question's answer in a conversation: its content, or the exception's reason.
fn answers(addr: &str, frames: &[Vec<u8>]) -> BTreeMap<u32, Result<Vec<u8>, String>> {
    let mut s = connect(addr);
    for f in frames {
        s.write_all(f).expect("send");
    }
    let want: Vec<u32> = (0..frames.len() as u32).collect();
    let mut got = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want.len() {
        assert!(Instant::now() < deadline, "{addr}: answers to {:?} of {want:?} only", got.keys());
        let m = capnp::serialize::read_message(&mut s, ReaderOptions::new()).expect("an answer");
        if let Ok(message::Return(Ok(r))) = m.get_root::<message::Reader>().expect("root").which() {
            match r.which() {
                Ok(return_::Results(Ok(p))) => {
                    // Answers holding capabilities (bootstrap, a session) do not copy; they show no state.
                    let mut copy = capnp::message::Builder::new_default();
                    let content = match copy.set_root(p.get_content()) {
                        Ok(()) => capnp::serialize::write_message_to_words(&copy),
                        Err(_) => vec![],
                    };
                    got.insert(r.get_answer_id(), Ok(content));
                }
                Ok(return_::Exception(Ok(e))) => {
                    let why = e.get_reason().ok().and_then(|r| r.to_str().ok()).unwrap_or("?").to_string();
                    got.insert(r.get_answer_id(), Err(why));
                }
                _ => panic!("{addr}: question {}: an odd return", r.get_answer_id()),
            }
        }
    }
    got
}

/// One hostile change to a frame.
fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    let len = f.len().max(1);
    match rng.random_range(0..7) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..len);
                if let Some(b) = f.get_mut(i) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..len);
                let v = [0u8, 0xff, 0x7f, 0x80, 1, rng.random()][rng.random_range(0..6)];
                if let Some(b) = f.get_mut(i) {
                    *b = v;
                }
            }
        }
        2 => f.truncate(rng.random_range(0..len)),
        3 => f.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        4 => {
            // A huge count where a size or a list length is: segment table, pointers.
            let i = rng.random_range(0..len / 4) * 4;
            if f.len() >= i + 4 {
                let v = [u32::MAX, 0x7fff_ffff, 1 << 24, 0xffff_fff0][rng.random_range(0..4)];
                f[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        5 => {
            let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
            let chunk = f[a.min(b).min(f.len())..a.max(b).min(f.len())].to_vec();
            f.extend(chunk);
        }
        _ => {
            // Random words behind a plausible one-segment header.
            let words = rng.random_range(0..64u32);
            *f = 0u32.to_le_bytes().into_iter().chain(words.to_le_bytes()).collect();
            f.extend((0..words * 8).map(|_| rng.random::<u8>()));
        }
    }
}

fn iterations() -> usize {
    std::env::var("DFS_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn seed() -> u64 {
    std::env::var("DFS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xdf5)
}

fn fuzz(service: &Service, rng: &mut StdRng) {
    if !service.setup.is_empty() {
        answers_all(&service.addr, &service.setup);
    }
    // Background work that follows a start (an election, the first scrub of nothing) settles first.
    std::thread::sleep(Duration::from_millis(500));
    let state = |answers: BTreeMap<u32, Vec<u8>>| {
        answers.into_iter().filter(|(q, _)| service.state.contains(q)).collect::<BTreeMap<_, _>>()
    };
    let before = state(answers_all(&service.addr, &service.reads));
    let stored = service.store.as_ref().map(|f| std::fs::read(f).expect("store file"));
    let rss = resident_bytes();
    let (mut sent, mut skipped) = (0, 0);
    for i in 0..iterations() {
        let mut frames = service.reads.clone();
        let at = rng.random_range(0..frames.len());
        mutate(rng, &mut frames[at]);
        if is_changing_call(&frames[at]) {
            skipped += 1;
            continue;
        }
        // Sometimes the rest of the conversation follows the bad frame, sometimes not.
        if rng.random_bool(0.5) {
            frames.truncate(at + 1);
        }
        converse(&service.addr, &frames);
        sent += 1;
        if i % 50 == 49 {
            answers_all(&service.addr, &service.reads);
        }
    }
    let after = state(answers_all(&service.addr, &service.reads));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{}: a handler panicked (see above)", service.name);
    let grew = resident_bytes().saturating_sub(rss);
    assert!(grew < 256 << 20, "{}: memory grew by {grew} bytes over the loop", service.name);
    assert!(before == after, "{}: what it answers about its store changed", service.name);
    if let (Some(f), Some(stored)) = (&service.store, stored) {
        assert!(std::fs::read(f).expect("store file") == stored, "{}: its store's file changed", service.name);
    }
    assert!(sent > iterations() / 2, "{}: only {sent} of {} sent ({skipped} skipped)", service.name, iterations());
}

#[test]
fn random_and_mutated_frames_harm_no_service() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    eprintln!("fuzz seed {} (DFS_FUZZ_SEED), {} iterations per service (DFS_FUZZ_ITERATIONS)", seed(), iterations());
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = tempfile::tempdir().expect("tempdir");
    for service in [
        dataserver(&dir.path().join("data")),
        metaserver(&dir.path().join("meta")),
        group_member(&dir.path().join("member")),
    ] {
        fuzz(&service, &mut rng);
    }
}

/// Question 2: a get naming one block `copies` times.
fn huge_get(file: u64, copies: u32) -> Vec<u8> {
    call(2, 1, Some(0), (SESSION, 1), |p| {
        let mut keys = p.init_as::<data_session::get_params::Builder>().init_keys(copies);
        for i in 0..copies {
            key(keys.reborrow().get(i), file, 0);
        }
    })
}

#[test]
fn idle_trickling_and_huge_requests_leave_other_clients_served() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let service = dataserver(dir.path());
    answers_all(&service.addr, &service.setup);
    let file = (1..).find(|&f| crate::shared::placement::holds(0, f, 0, 3, 4)).expect("a file");
    let rss = resident_bytes();
    // The test process and the server share one limit on open files: the server raised it.
    // Each idle connection costs two descriptors here (both ends live in this process).
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("limit");
    let count = 2000.min(hard.saturating_sub(500) / 2) as usize;
    let idle: Vec<TcpStream> =
        (0..count).map(|_| TcpStream::connect(&service.addr).expect("idle connection")).collect();
    // One connection trickles its handshake, one a frame after its handshake: a byte every 100 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = |mut s: TcpStream, bytes: Vec<u8>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        std::thread::spawn(move || {
            for b in bytes {
                if stop.load(Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let t1 = trickle(TcpStream::connect(&service.addr).expect("connect"), b"DFSAUTH1\0".repeat(8), stop.clone());
    let t2 = trickle(connect(&service.addr), [bootstrap(0), huge_get(file, 1)].concat(), stop.clone());
    // Requests as large as a frame may be: a get naming one 4 KiB block 65,536 times (the store
    // stops copying at the reply's limit) and a put of a million empty blocks.
    let huge = [bootstrap(0), service.reads[1].clone(), huge_get(file, 65_536)];
    let empty_blocks = call(2, 1, Some(0), (SESSION, 0), |p| {
        p.init_as::<data_session::put_params::Builder>().init_blocks(1_000_000);
    });
    let huge_put = [bootstrap(0), service.reads[1].clone(), empty_blocks];
    let peak = peak_resident_bytes();
    for _ in 0..3 {
        let refused = |answers: BTreeMap<u32, Result<Vec<u8>, String>>| answers.get(&2).and_then(|a| a.clone().err());
        let why = refused(answers(&service.addr, &huge)).expect("the huge get refused");
        assert!(why.contains("fewer blocks"), "{why}");
        assert!(refused(answers(&service.addr, &huge_put)).is_some(), "the put of empty blocks refused");
        answers_all(&service.addr, &service.reads);
    }
    // Each huge frame is at most 48 MiB, read once; the 65,536 copies of the block alone would be 256.
    let peak_grew = peak_resident_bytes().saturating_sub(peak);
    assert!(peak_grew < 192 << 20, "memory peaked {} MiB higher", peak_grew >> 20);
    stop.store(true, Ordering::SeqCst);
    t1.join().expect("trickler");
    t2.join().expect("trickler");
    let grew = resident_bytes().saturating_sub(rss);
    assert!(grew < 512 << 20, "memory grew by {grew} bytes");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a handler panicked (see above)");
    drop(idle);
}
