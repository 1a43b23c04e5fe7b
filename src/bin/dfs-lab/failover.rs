//! The metaserver group's failover time, measured: a group of three members and four dataservers,
//! a client creating files, and the leader killed with SIGKILL again and again (restarted, and
//! caught up, before the next kill). For each kill, the time from the kill to the client's next
//! completed create; the median is the figure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use dfs::client::engine::Backoff;
use dfs::client::Cluster;
use dfs::shared::{Kind, NewNode, ROOT};
use dfs::wire::admin::member_info;

use crate::procs::{free_port, wait_for, wait_listening, Proc};

struct Group {
    members: Vec<Option<Proc>>,
    servers: Vec<Proc>,
}

impl Drop for Group {
    fn drop(&mut self) {
        for p in self.members.iter_mut().flatten().chain(self.servers.iter_mut()) {
            p.kill9();
        }
    }
}

fn start_member(bin: &Path, dir: &Path, config: &Path, id: usize, port: u16, start: usize) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin.join("metaserver"));
    cmd.arg("--data-dir").arg(dir.join(format!("meta{id}"))).arg("--config").arg(config).arg(id.to_string());
    let log = dir.join(format!("meta{id}-{start}.log"));
    let mut p = Proc::spawn(cmd, &format!("metaserver member {id}"), &log)?;
    wait_listening(&format!("member {id}"), port, Some(&mut p), &log, Duration::from_secs(30))?;
    Ok(p)
}

pub fn failover(bin: &Path, kills: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let meta_ports = (0..3).map(|_| free_port()).collect::<anyhow::Result<Vec<u16>>>()?;
    let data_ports = (0..4).map(|_| free_port()).collect::<anyhow::Result<Vec<u16>>>()?;
    let addrs: Vec<String> = meta_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut config = format!("M: {}\n", addrs.len());
    for (i, a) in addrs.iter().enumerate() {
        config += &format!("metadata{i}: {a}\n");
    }
    let config_path = dir.join("group.conf");
    std::fs::write(&config_path, config)?;
    let mut g = Group { members: Vec::new(), servers: Vec::new() };
    for (i, &port) in meta_ports.iter().enumerate() {
        g.members.push(Some(start_member(bin, dir, &config_path, i, port, 0)?));
    }
    for i in 0..data_ports.len() {
        let mut cmd = Command::new(bin.join("dataserver"));
        cmd.arg("--data-dir").arg(dir.join(format!("ds{i}"))).arg(i.to_string());
        cmd.args(data_ports.iter().map(u16::to_string));
        let log = dir.join(format!("ds{i}.log"));
        let mut p = Proc::spawn(cmd, &format!("dataserver {i}"), &log)?;
        wait_listening(&format!("dataserver {i}"), data_ports[i], Some(&mut p), &log, Duration::from_secs(30))?;
        g.servers.push(p);
    }
    let ring: Vec<String> = data_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let fast = Backoff { first: Duration::from_millis(10), max: Duration::from_millis(100) };
    let c = Cluster::connect(&addrs.join(","), Some(&ring), fast).map_err(|e| anyhow!("{e}"))?;
    let create = |name: String| {
        let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 };
        c.mknod(ROOT, name.as_bytes(), node).map_err(|e| anyhow!("create {name}: {e}"))
    };
    let leader = |g: &Group| {
        (0..addrs.len())
            .find(|&i| g.members[i].is_some() && member_info(&addrs[i]).is_ok_and(|m| m.role == "leader" && !m.crashed))
    };
    dfs::outln!("failover of a metaserver group of 3 (kill -9 of the leader; time to the next completed create)");
    let mut times = Vec::with_capacity(kills);
    for k in 0..kills {
        for i in 0..20 {
            create(format!("k{k}-before{i}"))?;
        }
        let l = leader(&g).ok_or_else(|| anyhow!("no leader before kill {}", k + 1))?;
        let mut p = g.members[l].take().context("the leader's process")?;
        p.kill9();
        let t0 = Instant::now();
        create(format!("k{k}-after"))?;
        let took = t0.elapsed();
        dfs::outln!("kill {:>2}: member {l} was the leader; next create after {:.2} s", k + 1, took.as_secs_f64());
        times.push(took);
        g.members[l] = Some(start_member(bin, dir, &config_path, l, meta_ports[l], k + 1)?);
        wait_for(&format!("member {l} to follow again"), Duration::from_secs(60), || {
            Ok(member_info(&addrs[l]).is_ok_and(|m| m.role == "follower"))
        })?;
    }
    times.sort();
    if let Some(median) = times.get(times.len() / 2) {
        let (min, max) = (times[0], times[times.len() - 1]);
        dfs::outln!(
            "median {:.2} s over {} kills (min {:.2} s, max {:.2} s)",
            median.as_secs_f64(),
            times.len(),
            min.as_secs_f64(),
            max.as_secs_f64()
        );
    }
    Ok(())
}
