//! Starting servers the way a new user does, mistakes included: a dataserver with its ports in
//! another order or with a typo, two servers on one data dir, a port already taken, dfsctl piped
//! into `head`, pointed at a dataserver or given a path through a mount.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs a server binary that must refuse to start; returns its output (bounded: one that starts
/// anyway is killed and fails the test).
fn must_refuse(bin: &str, args: &[String]) -> Output {
    let out = bounded(20, bin).args(args).stdin(Stdio::null()).output().expect("run server");
    assert_ne!(out.status.code(), Some(124), "{bin} {args:?} started instead of refusing");
    assert!(!out.status.success(), "{bin} {args:?} exited 0: {}", text(&out));
    out
}

#[test]
fn a_dataserver_started_with_its_ring_in_another_order_is_reported_not_up() {
    let mut cluster = TestCluster::start(4, 512, 3);
    cluster.kill(1);
    // Dataserver 1 still listens on its own port, but with positions 0 and 2 swapped.
    let mut swapped = cluster.ring_args();
    swapped.swap(0, 2);
    cluster.start_server_with_ring(1, &swapped);
    wait_until("dfsctl status to say the ring differs", Duration::from_secs(20), || {
        text(&cluster.dfsctl(&["status"])).lines().any(|l| l.starts_with("dataserver 1 ") && l.contains("ring differs"))
    });
    let status = text(&cluster.dfsctl(&["status"]));
    let line = status.lines().find(|l| l.starts_with("dataserver 1 ")).expect("line");
    assert!(!line.contains(" up "), "{line}");
    assert!(line.contains("order differs") && line.contains("position 0") && line.contains("position 2"), "{line}");
    // The server itself found out from its peers, and said so at ERROR.
    let log_of_1 = || {
        std::fs::read_dir(cluster.dir.path().join("logs"))
            .expect("logs")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ds1-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    wait_until("the server's ERROR about its ring", Duration::from_secs(20), || {
        let log = log_of_1();
        log.contains("ERROR") && log.contains("ring differs") && log.contains("position 0")
    });

    // A typo'd port is a different list, not a different order; both lists are shown.
    cluster.kill(1);
    let mut typo = cluster.ring_args();
    let stray = free_port().to_string();
    typo[3] = stray.clone();
    cluster.start_server_with_ring(1, &typo);
    wait_until("dfsctl status to say the server list differs", Duration::from_secs(20), || {
        let st = text(&cluster.dfsctl(&["status"]));
        st.lines().any(|l| {
            l.starts_with("dataserver 1 ")
                && l.contains("server list differs")
                && l.contains(&format!("127.0.0.1:{stray}"))
                && l.contains(&format!("127.0.0.1:{}", cluster.ports[3]))
        })
    });
    // Back with the right ring, it is up again.
    cluster.kill(1);
    cluster.start_server(1);
    wait_until("dataserver 1 up and complete", Duration::from_secs(20), || cluster.server_complete(1));
}

#[test]
fn a_second_server_on_a_data_dir_in_use_is_refused_naming_the_first() {
    let cluster = TestCluster::start(4, 512, 3);
    // A second metaserver on the first one's data dir, on another port.
    let mut args = cluster.meta_args();
    *args.last_mut().expect("port") = free_port().to_string();
    let out = must_refuse(env!("CARGO_BIN_EXE_metaserver"), &args);
    let msg = text(&out);
    assert!(msg.contains("in use by the metaserver on") && msg.contains("pid"), "{msg}");
    // A second dataserver on dataserver 2's data dir, as if it were dataserver 0 of another ring.
    let dir = cluster.data_dir(2).display().to_string();
    let args: Vec<String> =
        vec!["--data-dir".into(), dir, "0".into(), free_port().to_string(), free_port().to_string()];
    let out = must_refuse(env!("CARGO_BIN_EXE_dataserver"), &args);
    let msg = text(&out);
    assert!(msg.contains("in use by dataserver 2") && msg.contains("pid"), "{msg}");
    // Both first servers still serve.
    assert!(cluster.server_complete(2));
}

#[test]
fn a_server_that_cannot_listen_creates_no_store_and_prints_no_backtrace() {
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("meta");
    // The port the cluster's metaserver already holds.
    let args = vec!["--data-dir".into(), dir.display().to_string(), cluster.meta_port.to_string()];
    let out = bounded(20, env!("CARGO_BIN_EXE_metaserver"))
        .args(&args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run metaserver");
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("cannot listen on") && msg.contains("in use"), "{msg}");
    // The cause once, not again after its own message.
    assert_eq!(msg.matches("in use").count(), 1, "{msg}");
    assert!(!msg.contains("Stack backtrace") && !msg.contains("panicked"), "{msg}");
    // A shape the store cannot take names it once too.
    let out = bounded(20, env!("CARGO_BIN_EXE_metaserver"))
        .args(["--data-dir".into(), tmp.path().join("m0").display().to_string(), "--replicas".into(), "0".into()])
        .arg(free_port().to_string())
        .output()
        .expect("run metaserver");
    let msg = text(&out);
    assert!(!out.status.success() && msg.matches("replicas must be at least 1").count() == 1, "{msg}");
    assert!(!dir.exists(), "a store was created: {:?}", std::fs::read_dir(&dir).map(|d| d.count()));
    let ds = tmp.path().join("ds");
    let args = vec!["--data-dir".into(), ds.display().to_string(), "0".into(), cluster.ports[0].to_string()];
    assert!(!bounded(20, env!("CARGO_BIN_EXE_dataserver")).args(&args).output().expect("run").status.success());
    assert!(!ds.exists());
}

#[test]
fn dfsctl_piped_into_head_exits_quietly() {
    let cluster = TestCluster::start(4, 512, 3);
    let tmp = tempfile::tempdir().expect("tmp");
    // 8,192 blocks: `placement` prints far more than a pipe holds.
    let src = tmp.path().join("big");
    std::fs::write(&src, random_bytes(5, 4 << 20)).expect("write");
    assert!(cluster.dfsctl(&["put", &src.display().to_string(), "/big"]).status.success());
    let script = format!(
        "set -o pipefail; {ctl} --meta {port} placement /big | head -1",
        ctl = env!("CARGO_BIN_EXE_dfsctl"),
        port = cluster.meta_port
    );
    let out = bounded(60, "bash").arg("-c").arg(&script).output().expect("bash");
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("/big: file id"), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}

#[test]
fn dfsctl_says_what_is_wrong_with_a_dataserver_address_or_a_mount_path() {
    let cluster = TestCluster::start(4, 512, 3);
    let at_dataserver =
        bounded(30, env!("CARGO_BIN_EXE_dfsctl")).args(["--meta", &cluster.ports[0].to_string(), "status"]).output();
    let msg = text(&at_dataserver.expect("dfsctl"));
    assert!(msg.contains("is a dataserver, not a metaserver"), "{msg}");
    let through_mount = cluster.dfsctl(&["check", "/tmp/x/mnt/f"]);
    let msg = text(&through_mount);
    assert!(msg.contains("paths name files inside the filesystem"), "{msg}");
    let help = text(&cluster.dfsctl(&["--help"]));
    assert!(help.contains("not paths through a mount point"), "{help}");
}

#[test]
fn mount_errors_name_the_problem() {
    if !fuse_available("mount errors") {
        return;
    }
    let cluster = TestCluster::start(4, 512, 3);
    let missing = cluster.dir.path().join("no-such-dir");
    let mut args = vec![missing.display().to_string(), cluster.meta_port.to_string()];
    args.extend(cluster.ring_args());
    let out = bounded(20, env!("CARGO_BIN_EXE_distributedfs")).args(&args).output().expect("run");
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));

    // A clean unmount with umount(8) leaves no warning in the mount's log.
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    assert!(Command::new("umount").arg(&mnt.path).status().expect("umount").success());
    let start = Instant::now();
    while is_mounted(&mnt.path) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(mnt);
    let log = std::fs::read_to_string(cluster.log_path("fs")).expect("log");
    assert!(!log.contains("Failed to umount"), "{log}");
    assert!(log.contains("unmounted"), "{log}");
}

/// df on the mount: used is what the files take, size and free what the cluster can still take
/// given R and what a block takes on disk (four servers on one disk share its free space).
#[test]
fn statfs_reports_what_dfs_stores_and_can_still_take() {
    if !fuse_available("statfs") {
        return;
    }
    let cluster = TestCluster::start(4, 4096, 3);
    let mnt = Mount::start(&cluster, &cluster.dir.path().join("mnt"), "fs");
    let fs_of = |p: &Path| nix::sys::statvfs::statvfs(p).expect("statvfs");
    let disk = fs_of(cluster.dir.path());
    let disk_free = disk.blocks_available() * disk.fragment_size();
    let before = fs_of(&mnt.path);
    let used = |s: &nix::sys::statvfs::Statvfs| (s.blocks() - s.blocks_free()) * s.fragment_size();
    let free = |s: &nix::sys::statvfs::Statvfs| s.blocks_available() * s.fragment_size();
    assert!(used(&before) < 1 << 20, "an empty cluster uses {} bytes", used(&before));
    // One disk, every byte three times, and a 4 KiB block takes two 4 KiB pages of a store: a
    // sixth of its free space (within 5%: the disk moves).
    let sixth = disk_free / 6;
    assert!(free(&before).abs_diff(sixth) < sixth / 20, "free {} vs a sixth of {disk_free}", free(&before));
    std::fs::write(mnt.path.join("f"), random_bytes(9, 8 << 20)).expect("write");
    let after = fs_of(&mnt.path);
    let grown = used(&after) - used(&before);
    // The stores' size on disk: a 4 KiB block takes two LMDB pages.
    assert!((8 << 20..=20 << 20).contains(&grown), "8 MiB written, used grew by {grown}");
}

#[test]
fn every_program_prints_its_man_page_and_completions() {
    let programs = [
        ("metaserver", env!("CARGO_BIN_EXE_metaserver"), "--session-lease"),
        ("dataserver", env!("CARGO_BIN_EXE_dataserver"), "--scrub-rate"),
        ("distributedfs", env!("CARGO_BIN_EXE_distributedfs"), "--readahead-kib"),
        ("dfsctl", env!("CARGO_BIN_EXE_dfsctl"), "placement"),
        ("dfs-lab", env!("CARGO_BIN_EXE_dfs-lab"), "chaos"),
    ];
    for (name, bin, mentioned) in programs {
        let man = bounded(20, bin).arg("--generate-man").output().expect("run");
        let page = String::from_utf8_lossy(&man.stdout);
        assert!(man.status.success(), "{name}: {}", text(&man));
        assert!(page.contains(&format!(".TH {name} 1")) && page.contains(".SH NAME"), "{name}: {page}");
        // roff escapes dashes.
        assert!(page.contains(&mentioned.replace('-', "\\-")), "{name}'s man page lacks {mentioned}");
        for shell in ["bash", "zsh", "fish"] {
            let out = bounded(20, bin).args(["--generate-completions", shell]).output().expect("run");
            let script = String::from_utf8_lossy(&out.stdout);
            // Fish names long options without their dashes.
            let word = mentioned.trim_start_matches('-');
            assert!(out.status.success() && script.contains(word), "{name} {shell}: {}", text(&out));
        }
        let out = bounded(20, bin).args(["--generate-completions", "tcsh"]).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains("one of bash, zsh, fish"), "{name}: {}", text(&out));
    }
}
