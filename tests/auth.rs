//! Authenticated connections across processes: a client with the wrong secret, or none, is refused
//! before anything is served; the right one works; a server will not listen on a non-loopback
//! address without a secret unless told to.

mod common;

use std::time::Duration;

use common::*;

fn dfsctl(cluster: &TestCluster, secret: Option<&std::path::Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = bounded(30, env!("CARGO_BIN_EXE_dfsctl"));
    cmd.env_remove(dfs::wire::auth::SECRET_ENV);
    if let Some(s) = secret {
        cmd.arg("--secret-file").arg(s);
    }
    cmd.arg("--meta").arg(cluster.meta_port.to_string()).args(args);
    cmd.output().expect("run dfsctl")
}

#[test]
fn only_a_client_with_the_cluster_secret_is_served() {
    let cluster = TestCluster::start(4, 4096, 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the cluster's secret at all\n").expect("write");
    let file = dir.path().join("f");
    std::fs::write(&file, b"hello").expect("write");
    let f = file.display().to_string();

    for (what, secret) in [("no secret", None), ("a wrong secret", Some(wrong.as_path()))] {
        let out = dfsctl(&cluster, secret, &["put", &f, "/intruder"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: a put was served");
        assert!(err.contains("authentication failed"), "{what}: {err}");
    }
    let ls = dfsctl(&cluster, Some(secret_file()), &["ls", "/"]);
    assert!(ls.status.success(), "{}", String::from_utf8_lossy(&ls.stderr));
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("intruder"), "a refused client changed the tree");
    let put = dfsctl(&cluster, Some(secret_file()), &["put", &f, "/friend"]);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let logs = cluster.logs();
    assert!(logs.contains("connection refused: authentication failed"), "the server logs refusals:\n{logs}");
}

#[test]
fn a_server_on_a_non_loopback_address_needs_a_secret_or_insecure() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |extra: &[&str]| {
        let mut cmd = bounded(10, env!("CARGO_BIN_EXE_dataserver"));
        cmd.env_remove(dfs::wire::auth::SECRET_ENV);
        cmd.args(extra).arg("--data-dir").arg(dir.path()).arg("0").arg(format!("0.0.0.0:{port}"));
        cmd
    };
    let out = run(&[]).output().expect("run dataserver");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a loopback address") && err.contains("--insecure"), "{err}");
    // With --insecure it serves (until killed).
    let log = dir.path().join("insecure.log");
    let mut p = Proc::spawn(run(&["--insecure"]), "dataserver", &log).expect("spawn");
    wait_until("the --insecure dataserver listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p.kill9();
}
