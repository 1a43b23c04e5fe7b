//! The cluster core across real processes: placement, durability, rebuild, repair,
//! blocking writes, failover, layout checks and bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use dfs::client::Cluster;
use dfs::dataserver::blockstore::BlockStore;
use dfs::shared::block::{Block, BlockKey};
use dfs::shared::placement::file_offset;
use dfs::shared::{FsError, Kind, NewNode, ROOT};

const DEFAULT_BS: u32 = dfs::shared::layout::DEFAULT_BLOCK_SIZE;

fn file_node() -> NewNode {
    NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 }
}

fn dir_node() -> NewNode {
    NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 }
}

/// Creates `/name` holding `data`, written in 4 MiB pieces; returns its inode (= file id).
fn put(c: &Cluster, name: &str, data: &[u8]) -> u64 {
    let ino = c.mknod(ROOT, name.as_bytes(), file_node()).expect("create").ino;
    for (i, piece) in data.chunks(4 << 20).enumerate() {
        c.write(ino, (i * (4 << 20)) as u64, piece.to_vec()).expect("write");
    }
    ino
}

/// Eight files `/<prefix>0`.. of `len` seeded bytes (seeds `seed`..); their inodes and contents.
fn put_files(c: &Cluster, prefix: &str, seed: u64, len: usize) -> Vec<(u64, Vec<u8>)> {
    (0..8)
        .map(|i| {
            let d = random_bytes(seed + i, len);
            (put(c, &format!("{prefix}{i}"), &d), d)
        })
        .collect()
}

fn get(c: &Cluster, ino: u64) -> Vec<u8> {
    let size = c.getattr(ino).expect("getattr").size;
    c.read(ino, 0, size).expect("read")
}

#[test]
fn files_of_every_edge_size_round_trip_at_each_block_size_and_ring_size() {
    for n in [4usize, 5] {
        for bs in [8u32, 512, DEFAULT_BS] {
            let cluster = TestCluster::start(n, bs, 3);
            let c = cluster.client();
            let b = bs as usize;
            let mut sizes = vec![0usize, 1, 7, 8, 9, b - 1, b + 1];
            sizes.dedup();
            for (i, &len) in sizes.iter().enumerate() {
                let data = random_bytes(i as u64, len);
                let ino = put(&c, &format!("f{i}"), &data);
                assert_eq!(get(&c, ino), data, "N={n} bs={bs} size={len}");
            }
            let big = random_bytes(42, 10 << 20);
            let ino = put(&c, "big", &big);
            assert!(get(&c, ino) == big, "N={n} bs={bs}: 10 MiB file (seed 42) differs");
            // A range read across block boundaries.
            let part = c.read(ino, (3 * b + 5) as u64, (2 * b + 3) as u64).expect("range read");
            assert_eq!(part, big[3 * b + 5..5 * b + 8]);
        }
    }
}

#[test]
fn replica_r_of_block_b_is_on_server_x_plus_b_plus_r_mod_n() {
    let mut cluster = TestCluster::start(5, 8, 3);
    let c = cluster.client();
    let data = random_bytes(7, 8 * 23 + 3);
    let ino = put(&c, "placed", &data);
    drop(c);
    for i in 0..5 {
        cluster.kill(i);
    }
    let blocks = data.len().div_ceil(8) as u64;
    let x = file_offset(ino) % 5;
    for s in 0..5usize {
        let (store, _) = BlockStore::open(&cluster.data_dir(s)).expect("open store");
        let keys: Vec<BlockKey> = (0..blocks).map(|index| BlockKey { file_id: ino, index }).collect();
        let got = store.get(&keys).expect("read store");
        for (b, blk) in got.iter().enumerate() {
            let expected = (0..3u64).any(|r| (x + b as u64 + r) % 5 == s as u64);
            assert_eq!(blk.is_some(), expected, "block {b} on server {s}");
            if let Some(blk) = blk {
                assert!(blk.verifies());
                assert_eq!(blk.data, data[b * 8..(b * 8 + 8).min(data.len())]);
            }
        }
    }
}

#[test]
fn killed_server_leaves_files_readable_and_restarts_from_its_disk() {
    let mut cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let files: Vec<(u64, Vec<u8>)> = (0..6)
        .map(|i| {
            let d = random_bytes(100 + i, 512 * 9 + i as usize);
            (put(&c, &format!("k{i}"), &d), d)
        })
        .collect();
    let before = c.server_status(1).expect("rpc").expect("status").blocks;
    cluster.kill(1);
    for (ino, d) in &files {
        let (c2, ino) = (c.clone(), *ino);
        assert_eq!(&within("a read with server 1 down", Duration::from_secs(30), move || get(&c2, ino)), d);
    }
    cluster.start_server(1);
    let s = c.server_status(1).expect("rpc").expect("status");
    assert!(!s.rebuilding, "a restarted server with its disk must not rebuild");
    assert_eq!(s.blocks, before);
    // Server 1 alone now serves its blocks: stop the two other holders of block 0 of a file on it.
    let (ino, d) = files
        .iter()
        .find(|(ino, _)| (0..3).any(|r| dfs::shared::placement::replica_server(*ino, 0, r, 4) == 1))
        .expect("a file on server 1");
    let others: Vec<usize> =
        (0..3).map(|r| dfs::shared::placement::replica_server(*ino, 0, r, 4)).filter(|&s| s != 1).collect();
    for &s in &others {
        cluster.kill(s);
    }
    let (c2, ino) = (c.clone(), *ino);
    let got = within("a read from server 1 alone", Duration::from_secs(30), move || c2.read(ino, 0, 512));
    assert_eq!(got.expect("read from server 1 alone"), d[..512]);
}

#[test]
fn wiped_server_rebuilds_from_neighbours_and_then_serves_alone() {
    let mut cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let files = put_files(&c, "w", 200, 512 * 7 + 11);
    let before = c.server_status(2).expect("rpc").expect("status").blocks;
    assert!(before > 0);
    cluster.wipe(2);
    cluster.start_server(2);
    wait_until("rebuild of server 2", Duration::from_secs(60), || cluster.server_complete(2));
    assert_eq!(c.server_status(2).expect("rpc").expect("status").blocks, before);
    let log = std::fs::read_to_string(cluster.log_path("ds2-5")).unwrap_or_default();
    assert!(log.contains("rebuild complete"), "rebuild not logged:\n{log}");
    // Some block held by server 2: stop its two other holders and read it from server 2 alone.
    let (ino, d) = &files[0];
    let b = (0..7u64)
        .find(|&b| (0..3).any(|r| dfs::shared::placement::replica_server(*ino, b, r, 4) == 2))
        .expect("block on 2");
    for r in 0..3 {
        let s = dfs::shared::placement::replica_server(*ino, b, r, 4);
        if s != 2 {
            cluster.kill(s);
        }
    }
    let (c2, ino) = (c.clone(), *ino);
    let got = within("a read from the rebuilt server", Duration::from_secs(30), move || c2.read(ino, b * 512, 512))
        .expect("read from the rebuilt server alone");
    assert_eq!(got, d[b as usize * 512..(b as usize + 1) * 512]);
}

#[test]
fn a_rebuild_finishes_from_the_other_holders_while_a_peer_is_stopped() {
    let mut cluster = TestCluster::start_with(4, 512, 3, &["--rebuild-give-up", "2"]);
    let c = cluster.client();
    let files = put_files(&c, "s", 300, 512 * 9 + 5);
    let before = c.server_status(2).expect("rpc").expect("status").blocks;
    cluster.wipe(2);
    // Stopped, not dead: it accepts connections and never answers.
    cluster.signal(1, nix::sys::signal::Signal::SIGSTOP);
    cluster.start_server(2);
    wait_until("the rebuild of server 2 with server 1 stopped", Duration::from_secs(90), || cluster.server_complete(2));
    let status = cluster.dfsctl(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("rebuild finished without dataserver(s) 1"), "{text}");
    assert_eq!(c.server_status(2).expect("rpc").expect("status").blocks, before, "{text}");
    cluster.signal(1, nix::sys::signal::Signal::SIGCONT);
    // The blocks held by 1, 2 and 3 read with 1 and 3 gone: server 2 has them.
    cluster.kill(1);
    cluster.kill(3);
    let mut read = 0;
    for (ino, d) in &files {
        for b in 0..10u64 {
            let mut holders: Vec<usize> =
                (0..3).map(|r| dfs::shared::placement::replica_server(*ino, b, r, 4)).collect();
            holders.sort();
            if holders == [1, 2, 3] {
                let (c2, ino) = (c.clone(), *ino);
                let got =
                    within("a read from server 2 alone", Duration::from_secs(30), move || c2.read(ino, b * 512, 512));
                let end = ((b as usize + 1) * 512).min(d.len());
                assert_eq!(got.expect("read"), d[b as usize * 512..end]);
                read += 1;
            }
        }
    }
    assert!(read > 0);
}

#[test]
fn corrupt_replica_is_read_around_and_repaired() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let data = random_bytes(300, 1500);
    let ino = put(&c, "c", &data);
    let holder = dfs::shared::placement::replica_server(ino, 0, 1, 4);
    let out = cluster.dfsctl(&["corrupt", &holder.to_string(), "/c"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let check = cluster.dfsctl(&["check", "/c"]);
    assert_eq!(check.status.code(), Some(1), "check must see the corruption");
    assert!(String::from_utf8_lossy(&check.stdout).contains("corrupt"));
    // Each read starts at a random replica; within 60 reads one asks the bad copy first (odds of
    // missing: (2/3)^60, 3e-11).
    for _ in 0..60 {
        assert_eq!(get(&c, ino), data, "a read returned wrong data");
        if cluster.dfsctl(&["check", "/c"]).status.success() {
            return;
        }
    }
    panic!("the corrupt replica was never repaired");
}

/// A read of a few bytes asks for the 4 KiB pages holding them (16 KiB blocks here): a corrupt page
/// is read around and its copy mended all the same, and bytes of other pages read right meanwhile.
#[test]
fn a_small_read_of_a_corrupt_page_is_read_around_and_repaired() {
    let cluster = TestCluster::start(4, 16384, 3);
    let c = cluster.client();
    let data = random_bytes(310, 40000);
    let ino = put(&c, "p", &data);
    let holder = dfs::shared::placement::replica_server(ino, 0, 1, 4);
    // The corrupt call flips the first data byte of the file's first block held there: page 0.
    assert!(cluster.dfsctl(&["corrupt", &holder.to_string(), "/p"]).status.success());
    assert_eq!(cluster.dfsctl(&["check", "/p"]).status.code(), Some(1), "check must see the corruption");
    for _ in 0..60 {
        assert_eq!(c.read(ino, 0, 300).expect("read"), data[..300], "a read returned wrong data");
        assert_eq!(c.read(ino, 5000, 100).expect("read"), data[5000..5100]);
        assert_eq!(c.read(ino, 39990, 100).expect("read"), data[39990..]);
        if cluster.dfsctl(&["check", "/p"]).status.success() {
            return;
        }
    }
    panic!("the corrupt replica was never repaired");
}

#[test]
fn write_while_a_replica_is_down_blocks_until_it_returns() {
    let mut cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let ino = c.mknod(ROOT, b"blocked", file_node()).expect("create").ino;
    cluster.kill(3);
    let data = random_bytes(400, 512 * 8);
    let (tx, rx) = mpsc::channel();
    let (c2, d2) = (c.clone(), data.clone());
    let writer = std::thread::spawn(move || {
        let r = c2.write(ino, 0, d2);
        let _ = tx.send(r.map(|a| a.size));
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(rx.try_recv().is_err(), "the write returned while a replica was down");
    // Other operations do not freeze meanwhile.
    assert!(c.readdir(ROOT).is_ok());
    cluster.start_server(3);
    let size = rx.recv_timeout(Duration::from_secs(30)).expect("write completes after restart").expect("write ok");
    writer.join().expect("writer thread");
    assert_eq!(size, data.len() as u64);
    assert_eq!(get(&c, ino), data);
    assert!(cluster.dfsctl(&["check", "/blocked"]).status.success());
}

#[test]
fn any_two_of_four_servers_down_every_block_still_reads() {
    let mut cluster = TestCluster::start(4, 8, 3);
    let c = cluster.client();
    let files: Vec<(u64, Vec<u8>)> = (0..5)
        .map(|i| {
            let d = random_bytes(500 + i, 8 * 40 + 5);
            (put(&c, &format!("t{i}"), &d), d)
        })
        .collect();
    for (a, b) in [(0, 1), (0, 2), (1, 3), (2, 3)] {
        cluster.kill(a);
        cluster.kill(b);
        for (ino, d) in &files {
            let (c2, ino) = (c.clone(), *ino);
            let got = within("a read with two servers down", Duration::from_secs(30), move || get(&c2, ino));
            assert_eq!(&got, d, "servers {a} and {b} down");
        }
        cluster.start_server(a);
        cluster.start_server(b);
    }
}

#[test]
fn every_replica_corrupt_gives_eio_never_wrong_data() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let ino = put(&c, "bad", &random_bytes(600, 100));
    for r in 0..3 {
        let s = dfs::shared::placement::replica_server(ino, 0, r, 4);
        assert!(cluster.dfsctl(&["corrupt", &s.to_string(), "/bad"]).status.success());
    }
    let start = Instant::now();
    let c2 = c.clone();
    match within("a read of a block corrupt everywhere", Duration::from_secs(30), move || c2.read(ino, 0, 100)) {
        Err(FsError::Io(_)) => {}
        other => panic!("expected EIO, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10), "EIO must come at once, not after retries");
}

#[test]
fn ports_in_another_order_are_refused_and_nothing_is_written() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    put(&c, "x", b"hello");
    let inodes = c.inode_count().expect("count");
    let blocks: Vec<u64> = (0..4).map(|i| c.server_status(i).expect("rpc").expect("st").blocks).collect();
    let mut swapped = cluster.ring();
    swapped.swap(0, 2);
    let err = Cluster::connect(&cluster.meta_port.to_string(), Some(&swapped), fast_backoff())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("position 0") && err.contains("position 2"), "unclear message: {err}");
    // A dataserver refuses a session from a client whose ring differs, whatever the metaserver says.
    let layout =
        dfs::shared::layout::Layout { servers: swapped.clone(), block_size: 512, replicas: 3, ..Default::default() };
    let res = c.run(move |_| {
        Box::pin(async move {
            let port = dfs::wire::RpcDataPort::new(layout);
            let b = Block::new(BlockKey { file_id: 999, index: 0 }, 1, 3, b"evil".to_vec());
            dfs::client::ports::DataPort::put(&port, 0, &[&b], false, false).await
        })
    });
    let msg = format!("{:?}", res.expect("rpc thread"));
    assert!(msg.contains("Refused") && msg.contains("expected"), "{msg}");
    // The dfsctl-visible state is unchanged.
    assert_eq!(c.inode_count().expect("count"), inodes);
    let after: Vec<u64> = (0..4).map(|i| c.server_status(i).expect("rpc").expect("st").blocks).collect();
    assert_eq!(after, blocks);
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let data = random_bytes(700, 3000);
    let ino = put(&c, "keep", &data);
    // Unknown file ids and inodes.
    assert_eq!(c.getattr(987_654).err(), Some(FsError::NotFound));
    assert!(matches!(c.read(987_654, 0, 10), Err(FsError::NotFound)));
    // Offsets past 2^63.
    assert_eq!(c.write(ino, 1 << 63, b"x".to_vec()).err(), Some(FsError::TooBig));
    assert_eq!(c.write(ino, u64::MAX, b"x".to_vec()).err(), Some(FsError::TooBig));
    assert_eq!(c.truncate(ino, 1 << 63).err(), Some(FsError::TooBig));
    assert_eq!(c.read(ino, 1 << 63, 10).expect("read past end"), Vec::<u8>::new());
    // Names.
    assert!(matches!(c.mknod(ROOT, b"a/b", file_node()), Err(FsError::Invalid(_))));
    assert_eq!(c.mknod(ROOT, &[b'n'; 256], file_node()).err(), Some(FsError::NameTooLong));
    assert!(c.mknod(ROOT, &[b'n'; 255], file_node()).is_ok());
    // A block larger than the block size, and a block with a wrong checksum, sent straight to a server.
    let layout = c.layout().clone();
    let res = c.run(move |_| {
        Box::pin(async move {
            let port = dfs::wire::RpcDataPort::new(layout);
            let big = Block::new(BlockKey { file_id: ino, index: 0 }, u64::MAX, 3, vec![1u8; 513]);
            let mut lie = Block::new(BlockKey { file_id: ino, index: 0 }, u64::MAX, 3, vec![1u8; 10]);
            lie.md5 = [0; 16];
            let s = dfs::shared::placement::replica_server(ino, 0, 0, 4);
            let a = dfs::client::ports::DataPort::put(&port, s, &[&big], false, false).await;
            let b = dfs::client::ports::DataPort::put(&port, s, &[&lie], false, false).await;
            (format!("{a:?}"), format!("{b:?}"))
        })
    });
    let (a, b) = res.expect("rpc thread");
    assert!(a.contains("exceeds the block size"), "{a}");
    assert!(b.contains("does not match its checksum"), "{b}");
    // Garbage, a truncated frame and an oversized frame on every server's socket.
    let mut ports = cluster.ports.clone();
    ports.push(cluster.meta_port);
    for port in ports {
        for junk in [
            random_bytes(port as u64, 4096),
            vec![0u8, 0, 0, 0, 10, 0, 0, 0, 1, 2], // truncated: 10 words promised
            vec![0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x3f, 0, 0, 0, 0], // a 2^30-word segment
        ] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink); // the server closes the connection
        }
    }
    // Everything still serves, and nothing stored changed.
    assert_eq!(get(&c, ino), data);
    assert!(cluster.dfsctl(&["check", "/keep"]).status.success());
    let fresh = cluster.client();
    assert_eq!(get(&fresh, ino), data);
}

#[test]
fn dfsctl_put_get_ls_placement_and_status() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let data = random_bytes(800, 512 * 3 + 100);
    std::fs::write(&src, &data).expect("write src");
    assert!(cluster.dfsctl(&["mkdir", "/d"]).status.success());
    let put = cluster.dfsctl(&["put", src.to_str().expect("utf8"), "/d/f"]);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let dst = tmp.path().join("dst");
    assert!(cluster.dfsctl(&["get", "/d/f", dst.to_str().expect("utf8")]).status.success());
    assert_eq!(std::fs::read(&dst).expect("read dst"), data);
    let ls = String::from_utf8_lossy(&cluster.dfsctl(&["ls", "/d"]).stdout).to_string();
    assert!(ls.contains(&format!("{} f", data.len())), "{ls}");
    let ino = c.resolve("/d/f").expect("resolve").ino;
    let pl = String::from_utf8_lossy(&cluster.dfsctl(&["placement", "/d/f"]).stdout).to_string();
    let x = (file_offset(ino) % 4) as usize;
    assert!(pl.contains(&format!("block 1: {} {} {}", (x + 1) % 4, (x + 2) % 4, (x + 3) % 4)), "{pl}");
    let st = String::from_utf8_lossy(&cluster.dfsctl(&["status"]).stdout).to_string();
    assert_eq!(st.matches(" up ").count(), 4, "{st}");
    let missing = cluster.dfsctl(&["get", "/nope", dst.to_str().expect("utf8")]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
}

/// A put or get that fails leaves the file it would replace as it was: a directory given as the
/// local source used to cut the filesystem's file to nothing, and a directory asked for by `get`
/// used to empty the local file and exit 0.
#[test]
fn a_put_or_get_that_fails_leaves_the_file_it_would_replace() {
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    let (src, local) = (tmp.path().join("src"), tmp.path().join("local"));
    let (old, new) = (random_bytes(1, 512 * 5 + 7), random_bytes(2, 512 * 2 + 3));
    std::fs::write(&src, &old).expect("write src");
    let path = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    assert!(cluster.dfsctl(&["mkdir", "/d"]).status.success());
    assert!(cluster.dfsctl(&["put", &path(&src), "/f"]).status.success());

    let put = cluster.dfsctl(&["put", &path(tmp.path()), "/f"]);
    assert!(!put.status.success());
    assert!(cluster.dfsctl(&["get", "/f", &path(&local)]).status.success());
    assert_eq!(std::fs::read(&local).expect("read local"), old, "a failed put changed the file");
    assert!(String::from_utf8_lossy(&put.stderr).contains("is a directory"), "{put:?}");

    std::fs::write(&local, b"precious").expect("write local");
    let get = cluster.dfsctl(&["get", "/d", &path(&local)]);
    assert_eq!(std::fs::read(&local).expect("read local"), b"precious", "a failed get changed the local file");
    assert!(!get.status.success());
    assert!(String::from_utf8_lossy(&get.stderr).contains("is a directory"), "{get:?}");

    // A put that succeeds replaces the file, and leaves no copy under another name.
    std::fs::write(&src, &new).expect("write src");
    assert!(cluster.dfsctl(&["put", &path(&src), "/f"]).status.success());
    assert!(cluster.dfsctl(&["get", "/f", &path(&local)]).status.success());
    assert_eq!(std::fs::read(&local).expect("read local"), new);
    let ls = String::from_utf8_lossy(&cluster.dfsctl(&["ls", "/"]).stdout).to_string();
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list tmp").count(), 2, "a get left a copy behind");
}

/// `meta status` with no member of a group answering is an error (exit 2): a metaserver on its own says it
/// is no group's member, a port with nothing behind it is unreachable.
#[test]
fn meta_status_with_no_group_member_answering_fails() {
    let cluster = TestCluster::start(4, 512, 3);
    let out = cluster.dfsctl(&["meta", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("not a group member"), "{text}");
    let nobody = free_port().to_string();
    let out =
        bounded(60, env!("CARGO_BIN_EXE_dfsctl")).args(["--meta", &nobody, "meta", "status"]).output().expect("dfsctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("unreachable"), "{text}");
}

/// A path ending in a slash names a directory only, as for rm(1) and mv(1): `rm f/` used to
/// remove the file f, and `put local /new/` to make a file named new.
#[test]
fn a_path_ending_in_a_slash_names_a_directory_only() {
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::write(&src, b"data").expect("write src");
    let src = src.to_str().expect("utf8");
    let run = |args: &[&str]| {
        let out = cluster.dfsctl(args);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    assert!(run(&["put", src, "/f"]).0);
    let out = tmp.path().join("out");
    let out = out.to_str().expect("utf8");
    for args in [
        &["rm", "/f/"][..],
        &["mv", "/f/", "/g"],
        &["mv", "/f", "/g/"],
        &["ls", "/f/"],
        &["get", "/f/", out],
        &["stat", "/f/"],
        &["placement", "/f/"],
    ] {
        let (ok, err) = run(args);
        assert!(!ok && err.contains("not a directory"), "{args:?}: {err}");
    }
    let (ok, err) = run(&["put", src, "/h/"]);
    assert!(!ok && err.contains("a put makes a file"), "{err}");
    let ls = String::from_utf8_lossy(&cluster.dfsctl(&["ls", "/"]).stdout).to_string();
    assert!(ls.contains(" f") && !ls.contains(" g") && !ls.contains(" h"), "{ls}");
    assert!(run(&["mkdir", "/d/"]).0);
    let (ok, err) = run(&["placement", "/d"]);
    assert!(!ok && err.contains("not a regular file"), "{err}");
    assert!(run(&["mv", "/d/", "/e/"]).0);
    assert!(run(&["rm", "/e/"]).0);
}

/// `get` writes through what LOCAL names: a symlink's file keeps its link and its mode, and a
/// device or pipe (`/dev/stdout`) is written to, not replaced by a file beside it.
#[test]
fn get_writes_through_a_symlink_and_to_stdout() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    let (src, real, link) = (tmp.path().join("src"), tmp.path().join("real"), tmp.path().join("link"));
    let data = random_bytes(3, 1500);
    std::fs::write(&src, &data).expect("write src");
    assert!(cluster.dfsctl(&["put", src.to_str().expect("utf8"), "/f"]).status.success());
    std::fs::write(&real, b"old").expect("write real");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let out = cluster.dfsctl(&["get", "/f", link.to_str().expect("utf8")]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::symlink_metadata(&link).expect("lstat").file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read(&real).expect("read real"), data);
    assert_eq!(std::fs::metadata(&real).expect("stat").permissions().mode() & 0o777, 0o640);
    let out = cluster.dfsctl(&["get", "/f", "/dev/stdout"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, data);
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 3, "a copy was left behind");
}

/// `rm -r` of a tree deeper than a small stack allows recursion for: removed whole. And the
/// root directory is named as such where it cannot be the operand.
#[test]
fn rm_r_removes_a_tree_of_any_depth() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let dir = NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 };
    let file = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    let mut at = c.mknod(ROOT, b"deep", dir.clone()).expect("mkdir").ino;
    for i in 0..5000 {
        if i % 1000 == 0 {
            c.mknod(at, b"f", file.clone()).expect("a file on the way");
        }
        at = c.mknod(at, b"d", dir.clone()).expect("mkdir").ino;
    }
    // With a small stack (1 MiB), as a thread's may be: 5,000 levels of recursion overflowed it.
    let line =
        format!("ulimit -s 1024 && exec {} --meta {} rm -r /deep", env!("CARGO_BIN_EXE_dfsctl"), cluster.meta_port);
    let out = secured(&mut std::process::Command::new("sh")).args(["-c", &line]).output().expect("run dfsctl");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.readdir(ROOT).expect("readdir").len(), 0);
    assert_eq!(c.inode_count().expect("inodes"), 1, "only the root is left");
    let out = cluster.dfsctl(&["rm", "-r", "/"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("the root directory cannot be"), "{out:?}");
}

/// A metaserver that no mount has told the dataserver list: `dfsctl init` records it, and then
/// put, get, stat, mv and rm work with no mount at all.
#[test]
fn dfsctl_init_then_put_get_stat_mv_rm_without_a_mount() {
    let cluster = TestCluster::start(4, 512, 3);
    // A metaserver of its own, new, over the same (empty) dataservers.
    let meta_port = free_port();
    let meta = spawn(
        env!("CARGO_BIN_EXE_metaserver"),
        &[
            "--data-dir".into(),
            cluster.dir.path().join("meta-new").display().to_string(),
            "--block-size".into(),
            "512".into(),
            meta_port.to_string(),
        ],
        &cluster.dir.path().join("logs/meta-new.log"),
    );
    wait_port(meta_port);
    let dfsctl = |args: &[&str]| {
        let out = bounded(60, env!("CARGO_BIN_EXE_dfsctl"))
            .args(["--meta", &meta_port.to_string()])
            .args(args)
            .output()
            .expect("run dfsctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let data = random_bytes(801, 512 * 5 + 7);
    std::fs::write(&src, &data).expect("write src");
    let src = src.to_str().expect("utf8");

    let (ok, _, err) = dfsctl(&["put", src, "/f"]);
    assert!(!ok && err.contains("dfsctl --meta META init"), "put before init: {err}");
    let ring = cluster.ring_args();
    let mut init = vec!["init"];
    init.extend(ring.iter().map(String::as_str));
    let (ok, out, err) = dfsctl(&init);
    assert!(ok && out.contains("4 dataservers") && out.contains("block size 512"), "{out}{err}");

    assert!(dfsctl(&["mkdir", "/d"]).0);
    let (ok, _, err) = dfsctl(&["put", src, "/d/f"]);
    assert!(ok, "{err}");
    let (ok, out, err) = dfsctl(&["stat", "/d/f"]);
    assert!(ok && out.contains(&format!("/d/f: file, {} bytes, mode 0644", data.len())), "{out}{err}");
    let (ok, _, err) = dfsctl(&["mv", "/d/f", "/g"]);
    assert!(ok, "{err}");
    assert!(!dfsctl(&["stat", "/d/f"]).0, "the old name is still there");
    let dst = tmp.path().join("dst");
    assert!(dfsctl(&["get", "/g", dst.to_str().expect("utf8")]).0);
    assert_eq!(std::fs::read(&dst).expect("read dst"), data);

    // rm: a file; a directory only when empty, or with -r.
    assert!(dfsctl(&["put", src, "/d/h"]).0);
    let (ok, _, err) = dfsctl(&["rm", "/d"]);
    assert!(!ok && err.contains("not empty"), "rm of a directory with a file in it: {err}");
    assert!(dfsctl(&["rm", "-r", "/d"]).0);
    assert!(dfsctl(&["rm", "/g"]).0);
    let (ok, out, _) = dfsctl(&["ls", "/"]);
    assert!(ok && !out.lines().any(|l| l.ends_with(" d") || l.ends_with(" g")), "left after rm: {out}");
    let (ok, _, err) = dfsctl(&["rm", "/g"]);
    assert!(!ok && err.contains("no such file"), "rm of a missing file: {err}");
    drop(meta);
}

#[test]
fn dfsctl_check_r_walks_a_tree_and_names_each_bad_file() {
    let cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let run = |args: &[&str]| {
        let out = cluster.dfsctl(args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let dir = c.mknod(ROOT, b"t", dir_node()).expect("mkdir").ino;
    let sub = c.mknod(dir, b"sub", dir_node()).expect("mkdir").ino;
    for (parent, name, seed) in [(dir, "a", 1), (sub, "b", 2), (sub, "c", 3)] {
        let ino = c.mknod(parent, name.as_bytes(), file_node()).expect("create").ino;
        c.write(ino, 0, random_bytes(900 + seed, 512 * 3 + 1)).expect("write");
    }
    let (code, out) = run(&["check", "-r", "/t"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("/t: ok (3 files, 12 blocks, 3 replicas each)"), "{out}");
    let (code, out) = run(&["check", "/t"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("is a directory (check -r"), "{out}");

    let b = c.lookup(sub, b"b").expect("lookup").ino;
    let holder = dfs::shared::placement::replica_server(b, 0, 1, 4);
    assert!(cluster.dfsctl(&["corrupt", &holder.to_string(), "/t/sub/b"]).status.success());
    let (code, out) = run(&["check", "-r", "/t"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("/t/sub/b: block 0 on dataserver {holder}")) && out.contains("corrupt"), "{out}");
    assert!(out.contains("/t: 1 of 3 files have missing, stale or corrupt replicas"), "{out}");
    assert!(!out.contains("/t/a:") && !out.contains("/t/sub/c:"), "only the bad file is named: {out}");
}

#[test]
fn dfsctl_status_json_describes_every_server() {
    let mut cluster = TestCluster::start(4, 512, 3);
    cluster.kill(2);
    let out = cluster.dfsctl(&["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    assert_eq!(v["dataservers"], 4);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["replicas"], 3);
    assert_eq!(v["write_quorum"], 3);
    assert!(v["inodes"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(v["metaservers"].as_array().map(Vec::len), Some(1));
    let servers = v["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 4);
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(s["index"], i);
        assert_eq!(s["addr"], format!("127.0.0.1:{}", cluster.ports[i]));
        if i == 2 {
            assert_eq!(s["up"], false, "{s}");
            assert!(s["error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
        } else {
            assert_eq!(s["up"], true, "{s}");
            assert_eq!(s["status"]["rebuilding"], false, "{s}");
            assert!(s["status"]["scrub"]["passes"].is_u64(), "{s}");
        }
    }
}

#[test]
fn dfsctl_shows_progress_on_a_terminal_only() {
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::write(&src, random_bytes(77, 300_000)).expect("write src");
    let src = src.to_str().expect("utf8");
    // Not a terminal: nothing on stderr.
    let out = cluster.dfsctl(&["put", src, "/piped"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // A terminal (script(1) gives it a pseudo-terminal): a bar with the bytes and the rate.
    let line = format!("{} --meta {} put {src} /tty", env!("CARGO_BIN_EXE_dfsctl"), cluster.meta_port);
    let mut cmd = bounded(60, "script");
    let out = secured(&mut cmd).args(["-qec", &line, "/dev/null"]).output().expect("run script(1)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("/tty") && said.contains("292.97 KiB") && said.contains("/s"), "{said}");
}

/// A metaserver on its own answers a change once it is in its journal; the namespace itself is
/// made durable only at checkpoints. Killed right after answering, it applies the journal again
/// when it restarts: every change it answered is there, once.
#[test]
fn a_metaserver_killed_right_after_answering_keeps_every_change_it_answered() {
    let mut cluster = TestCluster::start(4, 512, 3);
    let c = cluster.client();
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    let dir_node = NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 };
    let dir = c.mknod(ROOT, b"d", dir_node).expect("mkdir").ino;
    for i in 0..300 {
        c.mknod(dir, format!("f{i:03}").as_bytes(), node.clone()).expect("create");
    }
    c.unlink(dir, b"f007").expect("unlink");
    cluster.kill_meta();
    cluster.start_meta();
    let c2 = c.clone();
    let names = within("the listing after the restart", Duration::from_secs(30), move || c2.readdir(dir));
    let names = names.expect("readdir");
    let mut names: Vec<String> = names.into_iter().map(|(n, _)| String::from_utf8_lossy(&n).into_owned()).collect();
    names.sort();
    let want: Vec<String> = (0..300).filter(|&i| i != 7).map(|i| format!("f{i:03}")).collect();
    assert_eq!(names, want);
    let log = std::fs::read_to_string(cluster.log_path("meta-2")).unwrap_or_default();
    assert!(log.contains("applied again"), "the restart applied nothing from the journal:\n{log}");
}
