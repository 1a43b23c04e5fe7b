//! `--metrics`: a metaserver, a dataserver and a mount serve Prometheus metrics, and a scrape
//! during a workload shows their counters moving.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_scrape_during_a_workload_shows_the_counters_moving() {
    if !fuse_available("a_scrape_during_a_workload_shows_the_counters_moving") {
        return;
    }
    let (meta_port, data_port, mount_port) = (free_port(), free_port(), free_port());
    let mut c = TestCluster::start_full(4, 4096, 3, &[], &["--metrics", &meta_port.to_string()]);
    c.kill(1);
    c.server_flags[1] = vec!["--metrics".into(), data_port.to_string()];
    c.start_server(1);
    let mp = c.dir.path().join("mnt");
    let m = Mount::start_with(&c, &mp, "mount", &["--metrics", &mount_port.to_string()]);

    let before = (scrape(meta_port), scrape(data_port), scrape(mount_port));
    let data = random_bytes(7, 1 << 20);
    for i in 0..3 {
        std::fs::write(m.path.join(format!("f{i}")), &data).expect("write");
        assert_eq!(std::fs::read(m.path.join(format!("f{i}"))).expect("read"), data);
    }
    assert!(std::fs::metadata(m.path.join("missing")).is_err());
    let mount = scrape(mount_port);
    let grew = |before: &str, after: &str, series: &str, by: f64| {
        let (b, a) = (value(before, series), value(after, series));
        assert!(a >= b + by, "{series}: {b} before, {a} after (expected at least {by} more)\n{after}");
    };
    grew(&before.2, &mount, r#"dfs_bytes_total{op="write"}"#, 3.0 * data.len() as f64);
    grew(&before.2, &mount, r#"dfs_operations_total{op="write"}"#, 3.0);
    grew(&before.2, &mount, r#"dfs_operations_total{op="create"}"#, 3.0);
    grew(&before.2, &mount, r#"dfs_operation_errors_total{op="lookup",error="ENOENT"}"#, 1.0);
    grew(&before.2, &mount, r#"dfs_operation_seconds_count{op="write"}"#, 3.0);

    // Every block went to three of the four dataservers: dataserver 1 took about three quarters.
    let data_after = scrape(data_port);
    grew(&before.1, &data_after, r#"dfs_bytes_total{op="put"}"#, data.len() as f64);
    grew(&before.1, &data_after, r#"dfs_operations_total{op="put"}"#, 1.0);
    let meta_after = scrape(meta_port);
    grew(&before.0, &meta_after, r#"dfs_operations_total{op="mknod"}"#, 3.0);
    grew(&before.0, &meta_after, r#"dfs_operations_total{op="extend"}"#, 1.0);

    // Gauges are copied from the servers' state every second.
    wait_until("the dataserver's block gauge to count the new blocks", Duration::from_secs(10), || {
        value(&scrape(data_port), "dfs_blocks") >= 3.0 * 256.0 / 2.0
    });
    wait_until("the metaserver's inode gauge to count the new files", Duration::from_secs(10), || {
        value(&scrape(meta_port), "dfs_inodes") >= 4.0
    });
    drop(m);
}

#[test]
fn a_taken_metrics_port_fails_the_start_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = bounded(30, env!("CARGO_BIN_EXE_metaserver"))
        .args(["--metrics", &port.to_string(), "--data-dir"])
        .arg(dir.path())
        .arg(free_port().to_string())
        .output()
        .expect("run metaserver");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("--metrics 127.0.0.1:{port}")) && err.contains("in use"), "{err}");
}

/// A cluster whose metaserver serves metrics, mounted; and the metrics port. None (the test skips)
/// without FUSE.
fn metered(test: &str) -> Option<(TestCluster, Mount, u16)> {
    if !fuse_available(test) {
        return None;
    }
    let meta_port = free_port();
    let c = TestCluster::start_full(4, 4096, 3, &[], &["--metrics", &meta_port.to_string()]);
    let m = Mount::start(&c, &c.dir.path().join("mnt"), "mount");
    Some((c, m, meta_port))
}

/// A create or unlink makes the kernel drop the directory's attributes, and a stat of it asks the
/// mount again. The metaserver sends the directory's attributes with its answer to the change, and
/// the mount answers that stat from them: the right attributes, without asking the metaserver
/// again.
#[test]
fn a_directory_this_mount_changed_is_statted_from_the_changes_answer() {
    use std::os::unix::fs::MetadataExt;
    let Some((c, m, meta_port)) = metered("a_directory_this_mount_changed_is_statted_from_the_changes_answer") else {
        return;
    };
    let d = m.path.join("d");
    std::fs::create_dir(&d).expect("mkdir");
    let lib = c.client();
    let ino = std::fs::metadata(&d).expect("stat").ino();
    const FILES: usize = 20;
    let getattrs = || value(&scrape(meta_port), r#"dfs_operations_total{op="getattr"}"#);
    let same_as_the_metaserver = |what: &str| {
        let seen = std::fs::metadata(&d).expect("stat the directory");
        let a = lib.getattr(ino).expect("getattr through the library");
        let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
        assert_eq!(
            (ns(seen.mtime(), seen.mtime_nsec()), ns(seen.ctime(), seen.ctime_nsec()), seen.nlink()),
            (a.mtime, a.ctime, u64::from(a.nlink)),
            "{what}: the directory's mtime, ctime and links through the mount and on the metaserver"
        );
    };
    for (phase, change) in [("create", true), ("unlink", false)] {
        let before = getattrs();
        for i in 0..FILES {
            let f = d.join(format!("f{i}"));
            if change {
                std::fs::write(&f, b"x").expect("create");
            } else {
                std::fs::remove_file(&f).expect("unlink");
            }
            // The directory's times move on with each change: each stat must show the new ones.
            same_as_the_metaserver(&format!("after {phase} {i}"));
        }
        // The library's own getattr calls above count too: one per file.
        let asked = getattrs() - before - FILES as f64;
        assert!(
            asked < (FILES / 2) as f64,
            "{phase}: the mount asked the metaserver for the directory's attributes {asked} times in {FILES} changes"
        );
    }
    drop(m);
}

/// `rm` of many files in one directory looks each name up, then removes it. The lookups run into
/// a listing fetched ahead, which the removals edit instead of discarding it: most lookups are
/// answered without the metaserver, and a name another client makes meanwhile still shows.
#[test]
fn a_loop_of_removals_in_one_directory_looks_names_up_in_a_listing() {
    use dfs::shared::{Kind, NewNode};
    let Some((c, m, meta_port)) = metered("a_loop_of_removals_in_one_directory_looks_names_up_in_a_listing") else {
        return;
    };
    let lib = c.client();
    let file = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
    let dir = NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 };
    // Made through the library, so that the mount's kernel has none of the names cached.
    let d = lib.mknod(1, b"d", dir).expect("mkdir").ino;
    const FILES: usize = 40;
    for i in 0..FILES {
        lib.mknod(d, format!("f{i}").as_bytes(), file.clone()).expect("create");
    }
    let lookups = || value(&scrape(meta_port), r#"dfs_operations_total{op="lookup"}"#);
    let before = lookups();
    for i in 0..FILES {
        if i == FILES / 2 {
            lib.mknod(d, b"late", file.clone()).expect("create");
            assert!(m.path.join("d/late").exists(), "a name made elsewhere after the listing shows");
        }
        std::fs::remove_file(m.path.join(format!("d/f{i}"))).expect("unlink");
    }
    let asked = lookups() - before;
    assert!(asked < (FILES / 2) as f64, "{asked} lookups reached the metaserver for {FILES} removals");
    let left: Vec<_> =
        std::fs::read_dir(m.path.join("d")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("late")], "every removed name is gone");
    for i in 0..FILES {
        assert!(!m.path.join(format!("d/f{i}")).exists(), "f{i} is gone");
    }
    drop(m);
}

/// What a mount keeps of each file it met goes when the kernel forgets the file, so a mount that
/// walks a large tree does not keep a record of every file in it for as long as it runs.
/// Regression: the records were never dropped.
#[test]
fn the_files_a_mount_keeps_are_those_the_kernel_has_not_forgotten() {
    if !fuse_available("the_files_a_mount_keeps_are_those_the_kernel_has_not_forgotten") {
        return;
    }
    let c = TestCluster::start(4, 4096, 3);
    let port = free_port();
    let m = Mount::start_with(&c, &c.dir.path().join("mnt"), "mount", &["--metrics", &port.to_string()]);
    let d = m.path.join("d");
    std::fs::create_dir(&d).expect("mkdir");
    const FILES: usize = 300;
    for i in 0..FILES {
        std::fs::write(d.join(format!("f{i}")), b"x").expect("create");
    }
    let known = || value(&scrape(port), "dfs_files_known");
    assert!(known() >= FILES as f64, "{} files known after {FILES} creates", known());
    // Dropping the kernel's dentries and inodes makes it forget every file it is not using.
    wait_until("the mount to forget the files the kernel forgot", Duration::from_secs(20), || {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
        known() < (FILES / 2) as f64
    });
    // A file met again is kept again, and reads as it was.
    assert_eq!(std::fs::read(d.join("f7")).expect("read"), b"x");
    assert!(known() >= 1.0);
    // Files removed right after their close: the kernel may forget one before it sends the
    // release of its last close, when the mount still has it open.
    let before = known();
    for i in 0..FILES {
        let f = d.join(format!("g{i}"));
        std::fs::write(&f, b"y").expect("create");
        std::fs::remove_file(&f).expect("remove");
    }
    wait_until("the mount to forget the removed files", Duration::from_secs(20), || known() <= before + 10.0);
    drop(m);
}
