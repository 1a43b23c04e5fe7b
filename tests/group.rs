//! A metaserver group of three real processes with four dataservers: the leader killed during a
//! workload (no error reaches the client, nothing lost or doubled), a majority down (calls wait,
//! then finish), the testers' calls through dfsctl, and bad config files.

mod common;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use dfs::client::engine::Backoff;
use dfs::client::Cluster;
use dfs::shared::{Kind, NewNode, ROOT};

struct Group {
    dir: tempfile::TempDir,
    /// Each member's loopback address (all 127.0.0.1, or one each for a partition).
    hosts: Vec<String>,
    meta_ports: Vec<u16>,
    /// Where each member serves its metrics.
    metrics_ports: Vec<u16>,
    data_ports: Vec<u16>,
    members: Vec<Option<Proc>>,
    servers: Vec<Proc>,
    starts: usize,
}

impl Group {
    fn start() -> Group {
        Group::start_on(&["127.0.0.1"; 3])
    }

    fn start_on(hosts: &[&str; 3]) -> Group {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
        let meta_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let data_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let metrics_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut config = format!("# a test group\nM: {}\n", meta_ports.len());
        for (i, p) in meta_ports.iter().enumerate() {
            config += &format!("metadata{i}: {}:{p}\n", hosts[i]);
        }
        std::fs::write(dir.path().join("group.conf"), config).expect("config");
        let mut g = Group {
            dir,
            hosts,
            meta_ports,
            metrics_ports,
            data_ports,
            members: vec![None, None, None],
            servers: vec![],
            starts: 0,
        };
        for i in 0..3 {
            g.start_member(i);
        }
        let ring: Vec<String> = g.data_ports.iter().map(|p| p.to_string()).collect();
        for i in 0..4 {
            let mut args = vec!["--data-dir".to_string(), g.dir.path().join(format!("ds{i}")).display().to_string()];
            args.push(i.to_string());
            args.extend(ring.iter().cloned());
            let log = g.log(&format!("ds{i}"));
            g.servers.push(spawn(env!("CARGO_BIN_EXE_dataserver"), &args, &log));
            wait_port(g.data_ports[i]);
        }
        g
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn start_member(&mut self, i: usize) {
        self.starts += 1;
        let args = vec![
            "--data-dir".to_string(),
            self.dir.path().join(format!("meta{i}")).display().to_string(),
            "--block-size".into(),
            "4096".into(),
            "--metrics".into(),
            self.metrics_ports[i].to_string(),
            "--config".into(),
            self.dir.path().join("group.conf").display().to_string(),
            i.to_string(),
        ];
        let log = self.log(&format!("meta{i}-{}", self.starts));
        self.members[i] = Some(spawn(env!("CARGO_BIN_EXE_metaserver"), &args, &log));
        let addr = self.addr(i);
        wait_until(&format!("metaserver {i} to listen"), Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:{}", self.hosts[i], self.meta_ports[i])
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].take() {
            p.kill9();
        }
    }

    fn meta_arg(&self) -> String {
        (0..self.meta_ports.len()).map(|i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    fn client(&self) -> Cluster {
        let ring: Vec<String> = self.data_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let fast = Backoff { first: Duration::from_millis(20), max: Duration::from_millis(200) };
        Cluster::connect(&self.meta_arg(), Some(&ring), fast).expect("connect to the group")
    }

    /// The member that the live members' logs last named as leader.
    fn leader(&self) -> Option<usize> {
        let field = regex::Regex::new(r"leader=(\d+)").expect("pattern");
        let mut latest: Option<(String, usize)> = None;
        for e in std::fs::read_dir(self.dir.path().join("logs")).expect("logs").flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("the group's leader is member")) {
                let id = field.captures(line).and_then(|c| c[1].parse().ok());
                let at = line.split(' ').next().unwrap_or("").to_string();
                if let Some(id) = id.filter(|&i: &usize| self.members[i].is_some()) {
                    if latest.as_ref().is_none_or(|(t, _)| at > *t) {
                        latest = Some((at, id));
                    }
                }
            }
        }
        latest.map(|(_, i)| i)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        for s in &mut self.servers {
            s.kill9();
        }
    }
}

fn file(c: &Cluster, name: &str, data: &[u8]) -> u64 {
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    let a = c.mknod(ROOT, name.as_bytes(), node).unwrap_or_else(|e| panic!("create {name}: {e}"));
    c.write(a.ino, 0, data.to_vec()).unwrap_or_else(|e| panic!("write {name}: {e}"));
    a.ino
}

#[test]
fn the_leader_killed_during_a_workload_costs_no_error_and_loses_or_doubles_nothing() {
    let mut g = Group::start();
    let c = g.client();
    let (tx, rx) = mpsc::channel();
    let worker = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 0..120 {
                file(&c, &format!("f{i}"), format!("content {i}").as_bytes());
                let _ = tx.send(i);
            }
        })
    };
    // Let the workload get going, then kill the leader under it.
    wait_until("30 files", Duration::from_secs(60), || rx.try_iter().last().is_some_and(|i| i >= 30));
    let leader = g.leader().expect("a leader");
    g.kill_member(leader);
    within("the workload", Duration::from_secs(120), move || worker.join().expect("no error reached the workload"));
    let names = c.readdir(ROOT).expect("readdir");
    assert_eq!(names.len(), 120, "every file once");
    for (name, a) in names {
        let i: usize = String::from_utf8_lossy(&name)[1..].parse().expect("a name f<i>");
        assert_eq!(c.read(a.ino, 0, 100).expect("read"), format!("content {i}").as_bytes());
    }
}

#[test]
fn with_a_majority_down_calls_wait_and_finish_once_it_is_back() {
    let mut g = Group::start();
    let c = g.client();
    file(&c, "before", b"x");
    let leader = g.leader().expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    g.kill_member(others[0]);
    g.kill_member(leader);
    let (tx, rx) = mpsc::channel();
    let c2 = c.clone();
    std::thread::spawn(move || {
        let _ = tx.send(file(&c2, "during", b"y"));
    });
    assert!(rx.recv_timeout(Duration::from_secs(3)).is_err(), "a change finished without a majority");
    g.start_member(leader);
    let ino = rx.recv_timeout(Duration::from_secs(60)).expect("the change finished once a majority was back");
    assert_eq!(c.lookup(ROOT, b"during").expect("lookup").ino, ino);
    assert_eq!(c.readdir(ROOT).expect("readdir").len(), 2, "nothing lost, nothing doubled");
}

#[test]
fn bad_group_configs_are_refused_saying_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |config: &str, id: &str| {
        let path = dir.path().join("group.conf");
        std::fs::write(&path, config).expect("config");
        let out = bounded(20, env!("CARGO_BIN_EXE_metaserver"))
            .args(["--data-dir", &dir.path().join("m").display().to_string(), "--config"])
            .arg(&path)
            .arg(id)
            .output()
            .expect("run metaserver");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let msg = run("M: 3\nmetadata0: 127.0.0.1:1\nmetadata1: 127.0.0.1:2\n", "0");
    assert!(msg.contains("M is 3, but 2 metadata lines are given"), "{msg}");
    let msg = run("M: 1\nmetadata0: 127.0.0.1:1\n", "1");
    assert!(msg.contains("member 1 is not in a group of 1"), "{msg}");
    let msg = run("M: 1\nmetadata0: 127.0.0.1:1\n", "one");
    assert!(msg.contains("member id 'one' is not a number"), "{msg}");
    let msg = run("M: 2\nmetadata0: 127.0.0.1:1\nmetadata1: 127.0.0.1:1\n", "0");
    assert!(msg.contains("the same address"), "{msg}");
    // This machine has no such address: the line for this member is not where it can listen.
    let msg = run("M: 2\nmetadata0: 127.0.0.1:1\nmetadata1: 192.0.2.1:2\n", "1");
    assert!(msg.contains("cannot listen on 192.0.2.1:2"), "{msg}");
}

#[test]
fn a_client_naming_a_list_that_is_not_the_group_is_refused_saying_what_differs() {
    let g = Group::start();
    let stranger = free_port();
    let list = format!("{},{},127.0.0.1:{stranger}", g.addr(0), g.addr(1));
    let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl")).args(["--meta", &list, "ls", "/"]).output().expect("dfsctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("127.0.0.1:{stranger} is not in it")) && err.contains("member 2"), "{err}");
    // Two processes claiming one id: the second cannot take the member's address.
    let out = bounded(20, env!("CARGO_BIN_EXE_metaserver"))
        .args(["--data-dir", &g.dir.path().join("again").display().to_string(), "--config"])
        .arg(g.dir.path().join("group.conf"))
        .arg("1")
        .output()
        .expect("run metaserver");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {}", g.addr(1))) && err.contains("member 1"), "{err}");
}

fn dfsctl(g: &Group, args: &[&str]) -> String {
    let mut all = vec!["meta"];
    all.extend_from_slice(args);
    dfsctl_top(g, &all)
}

fn dfsctl_top(g: &Group, args: &[&str]) -> String {
    let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl"))
        .args(["--meta", &g.meta_arg()])
        .args(args)
        .output()
        .expect("run dfsctl");
    assert!(out.status.success(), "dfsctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_tester_crashes_and_restores_the_leader_through_dfsctl_and_the_group_goes_on() {
    let g = Group::start();
    let c = g.client();
    let a = file(&c, "a", b"1");
    assert_eq!(dfsctl_top(&g, &["version", "/a"]), "2", "made, then written");
    let leader = (0..3).find(|&i| dfsctl(&g, &["isleader", &i.to_string()]) == "true").expect("a leader");
    let version = |id: usize| dfsctl(&g, &["version", &id.to_string(), "/a"]);
    // A follower may not have applied the file's creation yet: then it has no /a.
    let applied = |id: usize, want: &str| {
        let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl"))
            .args(["--meta", &g.meta_arg(), "meta", "version", &id.to_string(), "/a"])
            .output()
            .expect("run dfsctl");
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == want
    };
    wait_until("every member to apply the write", Duration::from_secs(20), || (0..3).all(|i| applied(i, "2")));
    assert_eq!(dfsctl(&g, &["iscrashed", &leader.to_string()]), "false");
    dfsctl(&g, &["crash", &leader.to_string()]);
    assert_eq!(dfsctl(&g, &["iscrashed", &leader.to_string()]), "true");
    assert_eq!(dfsctl(&g, &["isleader", &leader.to_string()]), "false");
    // The others elect a leader and the client moves to it.
    file(&c, "b", b"2");
    c.write(a, 1, b"more".to_vec()).expect("write");
    assert_eq!(dfsctl_top(&g, &["version", "/a"]), "3");
    assert_eq!(version(leader), "2", "the crashed member answers from its own store, without the write");
    let status = dfsctl(&g, &["status"]);
    assert!(status.contains(&format!("member {leader} 127.0.0.1:{} crashed", g.meta_ports[leader])), "{status}");
    assert_eq!(status.lines().filter(|l| l.contains(" leader ")).count(), 1, "{status}");
    dfsctl(&g, &["restore", &leader.to_string()]);
    wait_until("the restored member to follow", Duration::from_secs(20), || {
        dfsctl(&g, &["status"]).lines().any(|l| l.starts_with(&format!("member {leader} ")) && l.contains("follower"))
    });
    file(&c, "c", b"3");
    assert_eq!(c.readdir(ROOT).expect("readdir").len(), 3);
    wait_until("the restored member to catch up", Duration::from_secs(20), || applied(leader, "3"));
    let status = dfsctl_top(&g, &["status"]);
    assert!(status.contains("metaserver group: 3 members") && status.contains(" leader term "), "{status}");
}

/// iptables rules that drop the packets between two sets of addresses, removed when dropped.
struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    /// Drops every packet from one member to another's port, both ways, between `member` and
    /// each of `others`. None if this machine cannot (no iptables, or not allowed).
    fn between(g: &Group, member: usize, others: &[usize]) -> Option<Cut> {
        let mut cut = Cut { rules: Vec::new() };
        for &o in others {
            for (from, to) in [(member, o), (o, member)] {
                let rule: Vec<String> = [
                    "INPUT",
                    "-p",
                    "tcp",
                    "-s",
                    &g.hosts[from],
                    "-d",
                    &g.hosts[to],
                    "--dport",
                    &g.meta_ports[to].to_string(),
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let ok =
                    std::process::Command::new("iptables").arg("-I").args(&rule).status().is_ok_and(|s| s.success());
                if !ok {
                    return None; // the rules made so far go with `cut`
                }
                cut.rules.push(rule);
            }
        }
        Some(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = std::process::Command::new("iptables").arg("-D").args(rule).status();
        }
    }
}

#[test]
fn a_leader_cut_off_by_the_network_stands_aside_and_its_client_moves_on_losing_nothing() {
    // Each member on its own loopback address, so that the network can cut one off from the others
    // while the client still reaches all three.
    let g = Group::start_on(&["127.0.0.21", "127.0.0.22", "127.0.0.23"]);
    let c = g.client();
    for i in 0..20 {
        file(&c, &format!("before{i}"), b"x");
    }
    let leader = (0..3).find(|&i| dfsctl(&g, &["isleader", &i.to_string()]) == "true").expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let Some(cut) = Cut::between(&g, leader, &others) else {
        eprintln!("skipping: iptables cannot drop packets here (install iptables; needs CAP_NET_ADMIN)");
        return;
    };
    // The client's next changes land on a new leader, with no error.
    let during: Vec<u64> = (0..20).map(|i| file(&c, &format!("during{i}"), b"y")).collect();
    let new_leader = (0..3).find(|&i| i != leader && dfsctl(&g, &["isleader", &i.to_string()]) == "true");
    assert!(new_leader.is_some(), "{}", dfsctl(&g, &["status"]));
    // The old leader stands aside: it tells no client it leads, and answers no read, so nothing
    // stale: a client that can reach only it waits instead of answering from its old namespace.
    wait_until("the cut-off leader to stand aside", Duration::from_secs(10), || {
        dfsctl(&g, &["isleader", &leader.to_string()]) == "false"
    });
    let (tx, rx) = mpsc::channel();
    let only_old = g.addr(leader);
    std::thread::spawn(move || {
        let fast = Backoff { first: Duration::from_millis(20), max: Duration::from_millis(200) };
        let r = Cluster::connect(&only_old, None, fast).map(|c| c.lookup(ROOT, b"during0"));
        let _ = tx.send(r.map(|r| r.map(|a| a.ino)));
    });
    match rx.recv_timeout(Duration::from_secs(3)) {
        Err(_) => {} // waiting: right
        Ok(r) => assert!(matches!(r, Ok(Ok(ino)) if ino == during[0]), "a stale answer from the cut-off leader: {r:?}"),
    }
    // Healed, it follows the new leader and catches up; nothing acknowledged was lost or doubled.
    drop(cut);
    // (Until it has, it has no such file: dfsctl fails.)
    let version = |id: usize| {
        let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl"))
            .args(["--meta", &g.meta_arg(), "meta", "version", &id.to_string(), "/during19"])
            .output()
            .expect("run dfsctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_until("the old leader to catch up", Duration::from_secs(30), || version(leader) == "2");
    let names = c.readdir(ROOT).expect("readdir");
    assert_eq!(names.len(), 40, "every file once");
}

#[test]
fn a_member_added_at_run_time_catches_up_and_votes_and_a_removed_one_is_not_needed() {
    let mut g = Group::start();
    let c = g.client();
    for i in 0..30 {
        file(&c, &format!("f{i}"), b"x");
    }
    // A fourth metaserver, started from a config file that lists it, joins through dfsctl.
    let port = free_port();
    let mut config = std::fs::read_to_string(g.dir.path().join("group.conf")).expect("config");
    config = config.replace("M: 3", "M: 4") + &format!("metadata3: 127.0.0.1:{port}\n");
    let conf4 = g.dir.path().join("group4.conf");
    std::fs::write(&conf4, config).expect("config");
    g.hosts.push("127.0.0.1".into());
    g.meta_ports.push(port);
    g.members.push(None);
    let args = vec![
        "--data-dir".to_string(),
        g.dir.path().join("meta3").display().to_string(),
        "--block-size".into(),
        "4096".into(),
        "--config".into(),
        conf4.display().to_string(),
        "3".into(),
    ];
    g.members[3] = Some(spawn(env!("CARGO_BIN_EXE_metaserver"), &args, &g.log("meta3")));
    wait_until("metaserver 3 to listen", Duration::from_secs(20), || std::net::TcpStream::connect(g.addr(3)).is_ok());
    let added = dfsctl(&g, &["add", &g.addr(3)]);
    assert!(added.contains("member 3"), "{added}");
    // It has the namespace once it has applied what it was sent, which may come just after.
    let version = || {
        let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl"))
            .args(["--meta", &g.meta_arg(), "meta", "version", "3", "/f29"])
            .output()
            .expect("run dfsctl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_until("the new member to apply /f29 at version 2", Duration::from_secs(20), || version() == "2");
    let status = dfsctl(&g, &["status"]);
    assert_eq!(status.lines().count(), 4, "{status}");
    // Take the leader and one more out; the two left (the new member one of them) are the group.
    let leader = (0..4).find(|&i| dfsctl(&g, &["isleader", &i.to_string()]) == "true").expect("a leader");
    let other = (0..3).find(|&i| i != leader).expect("another original member");
    dfsctl(&g, &["remove", &other.to_string()]);
    g.kill_member(other);
    file(&c, "after-remove", b"y");
    // Of three voters left, one more may go: the new member must vote for changes to go on.
    let third = (0..3).find(|&i| i != leader && i != other).expect("the third original member");
    g.kill_member(third);
    file(&c, "with-the-new-member", b"z");
    assert_eq!(c.readdir(ROOT).expect("readdir").len(), 32, "nothing lost or doubled");
    // Asking for what cannot be: a clear error, nothing changed.
    let out = bounded(30, env!("CARGO_BIN_EXE_dfsctl"))
        .args(["--meta", &g.meta_arg(), "meta", "remove", "9"])
        .output()
        .expect("run dfsctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("member 9 is not a voter"), "{out:?}");
}

/// Locks are replicated state: a lock held when the leader is killed stays held under the new
/// leader, and the requests queued for it are granted in the order they came.
#[test]
fn a_lock_held_across_a_leader_kill_stays_held_and_waiters_keep_their_place() {
    use dfs::client::session::{Collection, NoOpens, Session};
    use dfs::metaserver::namespace::locks::LockType;
    use dfs::metaserver::namespace::sessions::ClientInfo;
    let mut g = Group::start();
    let clients: Vec<Cluster> = (0..3).map(|_| g.client()).collect();
    let sessions: Vec<Session> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let info = ClientInfo { host: "test".into(), pid: i as u32, mount: format!("client{i}") };
            Session::start(c, info, std::sync::Arc::new(NoOpens), Collection::default()).expect("session")
        })
        .collect();
    let ino = file(&clients[0], "locked", b"x");
    let all = (0, u64::MAX);
    let write = Some(LockType::Write);
    clients[0].lock(ino, 1, all, write, 1, false).expect("the holder's lock");
    let (tx, rx) = mpsc::channel();
    let mut waiters = vec![];
    for i in 1..3 {
        let (c, tx) = (clients[i].clone(), tx.clone());
        waiters.push(std::thread::spawn(move || {
            c.lock(ino, 1, all, write, i as u32, true).expect("a waiter's lock");
            let _ = tx.send(i);
        }));
        wait_until(&format!("{i} waiting"), Duration::from_secs(20), || {
            clients[0].clients().expect("clients").iter().map(|r| r.waiting).sum::<u32>() == i as u32
        });
    }
    let leader = g.leader().expect("a leader");
    g.kill_member(leader);
    // The new leader has the lock and the queue.
    wait_until("a new leader answers", Duration::from_secs(30), || clients[0].clients().is_ok());
    let holder = clients[2].test_lock(ino, 1, all, LockType::Read).expect("test").expect("still held");
    assert_eq!(holder.owner.session, clients[0].session());
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "granted while held");
    clients[0].lock(ino, 1, all, None, 1, false).expect("release");
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(1), "the first waiter first");
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "the second waiter while the first holds it");
    clients[1].lock(ino, 1, all, None, 1, false).expect("release");
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(2));
    for w in waiters {
        w.join().expect("waiter");
    }
    drop(sessions);
}

#[test]
fn each_member_publishes_its_raft_role_term_and_applied_index() {
    let g = Group::start();
    let c = g.client();
    file(&c, "first", b"x");
    let role = |text: &str, state: &str| value(text, &format!("dfs_raft_role{{state=\"{state}\"}}"));
    let mut leader = 0;
    wait_until("the members' metrics to name one leader and two followers", Duration::from_secs(20), || {
        let texts: Vec<String> = g.metrics_ports.iter().map(|&p| scrape(p)).collect();
        let leaders: Vec<usize> = (0..3).filter(|&i| role(&texts[i], "leader") == 1.0).collect();
        let followers = texts.iter().filter(|t| role(t, "follower") == 1.0).count();
        let terms: Vec<f64> = texts.iter().map(|t| value(t, "dfs_raft_term")).collect();
        if let [l] = leaders[..] {
            leader = l;
        }
        leaders.len() == 1 && followers == 2 && terms.iter().all(|&t| t >= 1.0 && t == terms[0])
    });
    let before = value(&scrape(g.metrics_ports[leader]), "dfs_raft_applied_index");
    for i in 0..5 {
        file(&c, &format!("f{i}"), b"y");
    }
    wait_until("every member's applied index to grow by the five creates", Duration::from_secs(20), || {
        g.metrics_ports.iter().all(|&p| value(&scrape(p), "dfs_raft_applied_index") >= before + 5.0)
    });
}

#[test]
fn status_without_a_leader_answers_within_its_wait_with_what_each_member_says() {
    let mut g = Group::start();
    let c = g.client();
    file(&c, "a", b"x");
    g.kill_member(1);
    g.kill_member(2);
    // A leader left alone stands aside once it has heard from no majority for a while; until
    // then it may still answer.
    wait_until("the lone member to stand aside", Duration::from_secs(30), || dfsctl(&g, &["isleader", "0"]) == "false");
    let started = std::time::Instant::now();
    let out = bounded(60, env!("CARGO_BIN_EXE_dfsctl"))
        .args(["--meta", &g.meta_arg(), "status", "--wait", "3"])
        .output()
        .expect("run dfsctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30), "status took {:?}", started.elapsed());
    assert!(text.contains("the namespace did not answer in 3 s"), "{text}");
    // The live member answers for itself (a candidate or follower, with its term); the others are
    // named unreachable.
    assert!(text.lines().any(|l| l.starts_with(&format!("member 0 {} ", g.addr(0))) && l.contains(" term ")), "{text}");
    assert!(text.contains(&format!("member 1 {} unreachable", g.addr(1))), "{text}");
    let out = bounded(60, env!("CARGO_BIN_EXE_dfsctl"))
        .args(["--meta", &g.meta_arg(), "status", "--json", "--wait", "3"])
        .output()
        .expect("run dfsctl");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("did not answer")), "{v}");
    assert_eq!(v["metaservers"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(v["metaservers"][0]["member"]["term"].is_u64(), "{v}");
    assert!(v["metaservers"][2]["error"].is_string(), "{v}");
}

/// A client given one member's address alone follows that member's hint to the leader when it
/// is not the leader itself: it used to ask the same follower again and again, for good.
#[test]
fn a_client_given_a_followers_address_alone_reaches_the_leader() {
    let g = Group::start();
    let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    g.client().mknod(ROOT, b"first", node.clone()).expect("a create through the group");
    let leader = g.leader().expect("a leader");
    let follower = g.addr((leader + 1) % 3);
    let ring: Vec<String> = g.data_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    within("a create sent to a follower", Duration::from_secs(30), move || {
        let fast = Backoff { first: Duration::from_millis(20), max: Duration::from_millis(200) };
        let c = Cluster::connect(&follower, Some(&ring), fast).expect("connect to the follower");
        c.mknod(ROOT, b"second", node).expect("a create sent to a follower");
    });
    assert_eq!(g.client().readdir(ROOT).expect("readdir").len(), 2);
}
