//! `dfsctl --meta <port> <command> ...`: inspect and operate a cluster without a mount.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use dfs::client::engine::{Backoff, ReplicaState};
use dfs::client::session::{Collection, Session};
use dfs::client::Cluster;
use dfs::metaserver::namespace::sessions::ClientInfo;
use dfs::shared::placement::replica_servers;
use dfs::shared::{Attr, Kind, NewNode};

/// Operates a DFS cluster: status, copying files in and out, placement, checks and fault injection.
///
/// PATHs name files inside DFS, from its root (`/dir/file`), not paths through a mount point.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    secret: dfs::cli::SecretArg,
    /// The metaserver's port (127.0.0.1) or HOST:PORT; for a group, its members' list
    /// (9001,9002,9003) or @FILE (the group's config file).
    #[arg(long)]
    meta: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Records the dataservers (their ports or HOST:PORTs, in ring order) in a new cluster's
    /// metaserver, as the first mount would: then put and get work before any mount.
    Init {
        #[arg(required = true)]
        dataservers: Vec<String>,
    },
    /// The cluster's shape, its clients, the metaservers, and every dataserver up or down with
    /// the blocks it holds, its disk, rebuild and scrub.
    Status {
        /// One JSON object instead of lines, for scripts and monitoring.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the namespace; then only what each metaserver says of itself is
        /// shown, and the exit status is 1 (a group without a leader would otherwise hold status
        /// for as long as that lasts).
        #[arg(long, value_name = "SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
    /// Copies a local file into the filesystem, creating PATH or replacing it once the copy is
    /// whole (a put that fails part way leaves the old file; one killed leaves its copy under a
    /// name starting `.dfsctl-put-`).
    Put { local: PathBuf, path: String },
    /// Copies a file out of the filesystem, replacing LOCAL once the copy is whole.
    Get { path: String, local: PathBuf },
    /// Lists a directory (or shows one file).
    Ls { path: String },
    /// Creates a directory.
    Mkdir { path: String },
    /// Removes a file, a symlink or an empty directory (with -r, a directory and all it holds).
    Rm {
        #[arg(short, long)]
        recursive: bool,
        path: String,
    },
    /// Renames (moves) FROM to TO, replacing a file or an empty directory at TO.
    Mv { from: String, to: String },
    /// A file's attributes: kind, size, mode, owner, links, times, inode and version.
    Stat { path: String },
    /// The file's version: it counts the changes to the file (metadata changes and writes).
    Version { path: String },
    /// For each block of a file, the dataservers of its replicas.
    Placement { path: String },
    /// Exits 0 only if every replica of every block of the file (with -r, of every file under
    /// the directory) is present and verifies.
    Check {
        #[arg(short, long)]
        recursive: bool,
        path: String,
    },
    /// Flips a byte of one block of the file held on that dataserver (fault injection).
    Corrupt { index: usize, path: String },
    /// Runs the collector now: frees removed files nobody has open any more, and deletes blocks
    /// no file references (of deleted files, or past a file's end) that are older than the window.
    Gc {
        /// Leave blocks written within this many seconds (a write may be landing before its size
        /// is recorded).
        #[arg(long, default_value_t = 600)]
        window: u64,
    },
    /// Starts a scrub pass on every dataserver now (each verifies its blocks and compares versions
    /// with its peers) and shows where each stands.
    Scrub {
        /// Wait until every server's pass has ended, showing progress; exit 1 if a server could
        /// not be reached or corruption was found that no good copy could mend.
        #[arg(long)]
        wait: bool,
    },
    /// A metaserver group's members (ids are the config file's; members added later keep theirs).
    #[command(subcommand)]
    Meta(MetaCmd),
}

#[derive(Subcommand)]
enum MetaCmd {
    /// Each member's id, address, role, term, last log index, applied index and snapshot index.
    Status,
    /// Crashes a member: it stays up but answers every call with an error and changes nothing.
    Crash { id: usize },
    /// Resumes a crashed member as a follower.
    Restore { id: usize },
    /// Prints true or false.
    Iscrashed { id: usize },
    /// Prints true or false.
    Isleader { id: usize },
    /// The version of the file at PATH as this member's own store has it (answers while crashed).
    Version { id: usize, path: String },
    /// Adds the metaserver at HOST:PORT (started with `metaserver --config FILE <id>`, FILE listing
    /// it) to the group: it catches up as a learner, then votes.
    Add { addr: String },
    /// Takes member ID out of the group (it may then be stopped).
    Remove { id: usize },
}

/// The group's members by id: the positions of --meta's list, and every member that the members
/// who answer know of (members added at run time too).
fn known_members(list: &[String]) -> std::collections::BTreeMap<u64, String> {
    let mut known: std::collections::BTreeMap<u64, String> =
        list.iter().enumerate().map(|(i, a)| (i as u64, a.clone())).collect();
    let mut best: Option<dfs::wire::admin::MemberInfo> = None;
    for a in list {
        if let Ok(m) = dfs::wire::admin::member_info(a) {
            if best.as_ref().is_none_or(|b| (m.term, m.applied) > (b.term, b.applied)) {
                best = Some(m);
            }
        }
    }
    for (id, addr, _) in best.map(|b| b.nodes).unwrap_or_default() {
        known.insert(id, addr);
    }
    known
}

/// The address of the member that leads, as the members say.
fn find_leader(known: &std::collections::BTreeMap<u64, String>) -> anyhow::Result<String> {
    for a in known.values() {
        if let Ok(m) = dfs::wire::admin::member_info(a) {
            if m.role == "leader" && !m.crashed {
                return Ok(a.clone());
            }
            if let Some(l) = m.leader.and_then(|l| known.get(&l)) {
                if dfs::wire::admin::member_info(l).is_ok_and(|m| m.role == "leader" && !m.crashed) {
                    return Ok(l.clone());
                }
            }
        }
    }
    bail!("no member leads now (see `dfsctl meta status`)")
}

fn meta_cmd(meta: &str, cmd: MetaCmd) -> anyhow::Result<ExitCode> {
    let list = dfs::metaserver::group::GroupConfig::parse_meta_arg(meta)?;
    let known = known_members(&list);
    let addr = |id: usize| {
        known.get(&(id as u64)).ok_or_else(|| anyhow!("member {id} is not in the group (ids: {:?})", known.keys()))
    };
    let info = |id: usize| {
        let a = addr(id)?;
        dfs::wire::admin::member_info(a).map_err(|e| anyhow!("member {id} ({a}): {e}"))
    };
    match cmd {
        MetaCmd::Status => {
            if !print_members(&known) {
                bail!("no metaserver answered as a member of a group");
            }
        }
        MetaCmd::Crash { id } | MetaCmd::Restore { id } => {
            let crash = matches!(cmd, MetaCmd::Crash { .. });
            let a = addr(id)?;
            dfs::wire::admin::set_crashed(a, crash).map_err(|e| anyhow!("member {id} ({a}): {e}"))?;
        }
        MetaCmd::Iscrashed { id } => dfs::outln!("{}", info(id)?.crashed),
        MetaCmd::Isleader { id } => {
            let m = info(id)?;
            dfs::outln!("{}", !m.crashed && m.role == "leader")
        }
        MetaCmd::Version { id, path } => {
            let a = addr(id)?;
            let v = dfs::wire::admin::local_version(a, &path).map_err(|e| anyhow!("member {id} ({a}): {e}"))?;
            dfs::outln!("{}", v.map_err(fs_err(&path))?)
        }
        MetaCmd::Add { addr: new } => {
            let new = dfs::shared::layout::parse_addr(&new)?;
            let m = dfs::wire::admin::member_info(&new)
                .map_err(|e| anyhow!("{new}: {e} (start it first: metaserver --config FILE <id>)"))?;
            let leader = find_leader(&known)?;
            dfs::wire::admin::add_member(&leader, m.id, &new)
                .map_err(|e| anyhow!("{leader}: {e}"))?
                .map_err(|e| anyhow!("adding member {} at {new}: {e}", m.id))?;
            dfs::outln!("member {} at {new} added: it caught up and votes", m.id);
        }
        MetaCmd::Remove { id } => {
            let leader = find_leader(&known)?;
            dfs::wire::admin::remove_member(&leader, id as u64)
                .map_err(|e| anyhow!("{leader}: {e}"))?
                .map_err(|e| anyhow!("removing member {id}: {e}"))?;
            dfs::outln!("member {id} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What each member says of itself, asked at once: a member that does not answer costs one
/// timeout, not one each.
fn member_infos(
    members: &std::collections::BTreeMap<u64, String>,
) -> Vec<Result<dfs::wire::admin::MemberInfo, String>> {
    std::thread::scope(|s| {
        let asked: Vec<_> = members.values().map(|a| s.spawn(move || dfs::wire::admin::member_info(a))).collect();
        asked.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the query panicked".into()))).collect()
    })
}

/// What each member says of itself, or why it did not answer, for the status report.
fn member_reports(members: &std::collections::BTreeMap<u64, String>) -> Vec<MetaserverReport> {
    let infos = member_infos(members);
    let reports = infos.into_iter().zip(members).map(|(info, (id, addr))| {
        let (member, error) = match info {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
        MetaserverReport { id: *id, addr: addr.clone(), member, error }
    });
    reports.collect()
}

/// One line per member of a metaserver group: its role and Raft positions, or why it did not answer.
/// Prints each member's line; whether any answered.
fn print_members(members: &std::collections::BTreeMap<u64, String>) -> bool {
    let mut answered = false;
    for ((id, a), info) in members.iter().zip(member_infos(members)) {
        answered |= info.is_ok();
        print_member(*id, a, info.as_ref().map_err(String::as_str));
    }
    answered
}

fn print_member(id: u64, a: &str, info: Result<&dfs::wire::admin::MemberInfo, &str>) {
    match info {
        Ok(m) => dfs::outln!(
            "member {id} {a} {} term {} last log {} applied {} snapshot {}",
            if m.crashed { "crashed" } else { &m.role },
            m.term,
            m.last_log_index,
            m.applied,
            m.snapshot
        ),
        // A metaserver on its own answers, but as no group's member.
        Err(e) if e.contains("not a member of a group") => dfs::outln!("member {id} {a} not a group member ({e})"),
        Err(e) => dfs::outln!("member {id} {a} unreachable ({e})"),
    }
}

/// Removes `name` (whose attributes are `a`) from directory `parent`: a directory must be empty
/// unless `recursive`. A tree
/// is walked with a stack of its own, not by recursion, so that no depth overflows ours: each
/// directory is listed once, its files removed and its directories stacked, and it is removed
/// once they are.
fn remove(c: &Cluster, parent: u64, name: &[u8], a: &Attr, recursive: bool) -> dfs::shared::FsResult<()> {
    if a.kind != Kind::Dir {
        reclaim(c, c.unlink(parent, name)?);
        return Ok(());
    }
    if !recursive {
        return c.rmdir(parent, name).map(|_| ());
    }
    // (parent, name, inode, listed already)
    let mut stack = vec![(parent, name.to_vec(), a.ino, false)];
    while let Some((parent, name, ino, listed)) = stack.pop() {
        if listed {
            c.rmdir(parent, &name)?;
            continue;
        }
        stack.push((parent, name, ino, true));
        for (child, attr) in c.readdir(ino)? {
            if child == b"." || child == b".." {
                continue;
            }
            if attr.kind == Kind::Dir {
                stack.push((ino, child, attr.ino, false));
            } else {
                reclaim(c, c.unlink(ino, &child)?);
            }
        }
    }
    Ok(())
}

/// Frees the blocks of a file the last name of which went (0: none), unless another client has it
/// open; the collector frees them otherwise.
fn reclaim(c: &Cluster, orphan: u64) {
    if orphan != 0 {
        if let Err(e) = c.reclaim(vec![orphan]) {
            tracing::warn!(ino = orphan, "the removed file's blocks are left to the collector: {e}");
        }
    }
}

/// Bytes per read or write call: whole blocks, about 4 MiB.
fn chunk_size(block_size: u32) -> usize {
    let bs = block_size as usize;
    ((4 << 20) / bs).max(1) * bs
}

/// This process's umask (read by setting it, and setting it back).
fn umask() -> u32 {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o022));
    umask(old);
    old.bits()
}

/// Whether `path` ends in a slash, which only a directory may (`rm f/` is refused, as by rm(1)).
fn names_dir(path: &str) -> bool {
    path.len() > 1 && path.ends_with('/')
}

/// Refuses a path that ends in a slash but names something other than a directory.
fn dir_if_slashed(path: &str, kind: Kind) -> anyhow::Result<()> {
    if names_dir(path) && kind != Kind::Dir {
        bail!("{path}: not a directory");
    }
    Ok(())
}

fn split_path(path: &str) -> anyhow::Result<(&str, &str)> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() && !path.is_empty() {
        bail!("{path}: the root directory cannot be made, removed or moved");
    }
    let (dir, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if name.is_empty() {
        bail!("'{path}' names no file");
    }
    Ok((dir, name))
}

fn fs_err(path: &str) -> impl Fn(dfs::shared::FsError) -> anyhow::Error + '_ {
    move |e| match e {
        // A path through a mount point (`/mnt/dfs/f`) is the usual mistake.
        dfs::shared::FsError::NotFound => anyhow!(
            "{path}: no such file in DFS (paths name files inside the filesystem, from its root: \
             /dir/file, not a path through a mount point)"
        ),
        e => anyhow!("{path}: {e}"),
    }
}

/// The live client sessions, one line each.
fn print_clients(clients: &[dfs::metaserver::namespace::sessions::ClientRow]) {
    dfs::outln!("clients: {}", clients.len());
    let now = dfs::shared::now_ns();
    let ago = |t: i64| format!("{:.1}s ago", now.saturating_sub(t) as f64 / 1e9);
    for r in clients {
        dfs::outln!(
            "client {:016x} host {} pid {} mount {} since {} heartbeat {} locks {} waiting {} open {}",
            r.session,
            r.info.host,
            r.info.pid,
            r.info.mount,
            ago(r.since),
            ago(r.renewed),
            r.locks,
            r.waiting,
            r.opens
        );
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.secret.apply().map_err(anyhow::Error::msg)?;
    let cmd = match args.cmd {
        Cmd::Meta(m) => return meta_cmd(&args.meta, m),
        Cmd::Status { json, wait } => return status(&args.meta, json, std::time::Duration::from_secs(wait)),
        Cmd::Init { dataservers } => {
            let ring = dfs::shared::layout::parse_ring(&dataservers).map_err(|e| anyhow!("dataserver list: {e}"))?;
            let c = Cluster::connect(&args.meta, Some(&ring), Backoff::default()).map_err(|e| anyhow!("{e}"))?;
            let l = c.layout();
            dfs::outln!(
                "cluster: {} dataservers ({}), block size {}, {} replicas",
                l.n(),
                l.servers.join(" "),
                l.block_size,
                l.replicas
            );
            return Ok(ExitCode::SUCCESS);
        }
        cmd => cmd,
    };
    let c = Cluster::connect(&args.meta, None, Backoff::default()).map_err(|e| anyhow!("{e}"))?;
    let layout = c.layout().clone();
    // A run that changes files is a client session like a mount (`dfsctl status` lists it, and
    // what it removes is held while other clients may have it open); it ends with the run.
    let _session = match cmd {
        Cmd::Put { .. } | Cmd::Mkdir { .. } | Cmd::Rm { .. } | Cmd::Mv { .. } => {
            let info =
                ClientInfo { host: dfs::client::session::host_name(), pid: std::process::id(), mount: "dfsctl".into() };
            let host = std::sync::Arc::new(dfs::client::session::NoOpens);
            Some(Session::start(&c, info, host, Collection::default()).map_err(|e| anyhow!("{e}"))?)
        }
        _ => None,
    };
    match cmd {
        Cmd::Meta(m) => return meta_cmd(&args.meta, m),
        Cmd::Init { .. } => unreachable!("answered above"),
        Cmd::Status { .. } => unreachable!("answered above"),
        Cmd::Scrub { wait } => return scrub(&c, &layout, wait),
        Cmd::Gc { window } => {
            let r = c.collect(std::time::Duration::from_secs(window)).map_err(|e| anyhow!("collecting: {e}"))?;
            dfs::outln!("orphans freed: {}", r.orphans_freed);
            if r.orphans_left > 0 {
                dfs::outln!("orphans left for the next run (a dataserver did not answer): {}", r.orphans_left);
            }
            dfs::outln!("blocks listed: {}", r.blocks_seen);
            dfs::outln!("blocks unreferenced: {} (removed: {})", r.blocks_unreferenced, r.blocks_removed);
            dfs::outln!("blocks unreferenced but younger than {window} s, left: {}", r.blocks_too_young);
            if !r.servers_skipped.is_empty() {
                dfs::outln!("dataservers not listed (down?): {:?}", r.servers_skipped);
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Put { local, path } => {
            let what = || local.display().to_string();
            let mut f = File::open(&local).with_context(what)?;
            let meta = f.metadata().with_context(what)?;
            if meta.is_dir() {
                bail!("{}: is a directory", local.display());
            }
            let len = meta.is_file().then_some(meta.len());
            if names_dir(&path) {
                bail!("{path}: ends in a slash, but a put makes a file (name it: {path}NAME)");
            }
            let (dir, name) = split_path(&path)?;
            let parent = c.resolve(dir).map_err(fs_err(dir))?;
            // The copy goes to a name of its own and replaces PATH only once whole: a put that
            // fails part way (the local file unreadable, a server down, Ctrl-C) leaves the old
            // file as it was, as `install` and rsync do.
            let node = match c.lookup(parent.ino, name.as_bytes()) {
                Ok(a) if a.kind == Kind::File => {
                    NewNode { kind: Kind::File, perm: a.perm, uid: a.uid, gid: a.gid, rdev: 0 }
                }
                Ok(_) => bail!("{path} exists and is not a regular file"),
                Err(dfs::shared::FsError::NotFound) => {
                    NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0 }
                }
                Err(e) => return Err(fs_err(&path)(e)),
            };
            let temp = format!(".dfsctl-put-{}-{}", std::process::id(), dfs::shared::types::now_ns());
            let ino = c.mknod(parent.ino, temp.as_bytes(), node).map_err(fs_err(&path))?.ino;
            let copied = (|| -> anyhow::Result<()> {
                let mut buf = vec![0u8; chunk_size(layout.block_size)];
                let mut offset = 0u64;
                let bar = progress(len, &path);
                loop {
                    let n = read_full(&mut f, &mut buf).with_context(what)?;
                    if n == 0 {
                        break;
                    }
                    c.write(ino, offset, buf[..n].to_vec()).map_err(fs_err(&path))?;
                    offset += n as u64;
                    bar.inc(n as u64);
                }
                bar.finish();
                let (replaced, _) =
                    c.rename(parent.ino, temp.as_bytes(), parent.ino, name.as_bytes(), 0).map_err(fs_err(&path))?;
                reclaim(&c, replaced);
                Ok(())
            })();
            if copied.is_err() {
                if let Ok(orphan) = c.unlink(parent.ino, temp.as_bytes()) {
                    reclaim(&c, orphan);
                }
            }
            copied?;
        }
        Cmd::Get { path, local } => {
            let a = c.resolve(&path).map_err(fs_err(&path))?;
            dir_if_slashed(&path, a.kind)?;
            match a.kind {
                Kind::File => {}
                Kind::Dir => bail!("{path}: is a directory"),
                _ => bail!("{path}: not a regular file"),
            }
            // As `put`: a regular file (or a new one) is replaced only once the copy is whole,
            // by a copy beside it that takes its mode. Anything else (`/dev/stdout`, a pipe) is
            // written to as it is.
            let target = std::fs::canonicalize(&local).unwrap_or_else(|_| local.clone());
            let existing = std::fs::metadata(&target).ok();
            let replace = existing.as_ref().is_none_or(|m| m.is_file());
            let temp =
                target.with_file_name(format!(".dfsctl-get-{}-{}", std::process::id(), dfs::shared::types::now_ns()));
            let written = if replace { &temp } else { &target };
            let mut out = {
                use std::os::unix::fs::OpenOptionsExt;
                let mut open = std::fs::OpenOptions::new();
                open.write(true);
                if replace {
                    open.create_new(true).mode(0o600);
                }
                open.open(written).with_context(|| written.display().to_string())?
            };
            let copied = (|| -> anyhow::Result<()> {
                let chunk = chunk_size(layout.block_size) as u64;
                let mut offset = 0;
                let bar = progress(Some(a.size), &path);
                while offset < a.size {
                    let data = c.read_at(a.ino, offset, chunk, a.size).map_err(fs_err(&path))?;
                    if data.is_empty() {
                        break;
                    }
                    out.write_all(&data).with_context(|| written.display().to_string())?;
                    offset += data.len() as u64;
                    bar.inc(data.len() as u64);
                }
                bar.finish();
                if !replace {
                    return Ok(());
                }
                use std::os::unix::fs::PermissionsExt;
                // The mode of the file replaced, or a new file's (0666 less the umask).
                let mode = existing.map_or_else(|| 0o666 & !umask(), |m| m.permissions().mode());
                std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
                out.sync_all().with_context(|| temp.display().to_string())?;
                std::fs::rename(&temp, &target).with_context(|| local.display().to_string())
            })();
            if replace && copied.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            copied?;
        }
        Cmd::Ls { path } => {
            let a = c.resolve(&path).map_err(fs_err(&path))?;
            let entries = if a.kind == Kind::Dir {
                c.readdir(a.ino).map_err(fs_err(&path))?
            } else {
                dir_if_slashed(&path, a.kind)?;
                vec![(path.rsplit('/').next().unwrap_or("").as_bytes().to_vec(), a)]
            };
            for (name, e) in entries {
                let kind = match e.kind {
                    Kind::Dir => 'd',
                    Kind::Symlink => 'l',
                    Kind::File => '-',
                    _ => '?',
                };
                dfs::outln!("{kind}{:04o} {:>3} {:>12} {}", e.perm, e.nlink, e.size, String::from_utf8_lossy(&name));
            }
        }
        Cmd::Mkdir { path } => {
            let (dir, name) = split_path(&path)?;
            let parent = c.resolve(dir).map_err(fs_err(dir))?;
            let node = NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0 };
            c.mknod(parent.ino, name.as_bytes(), node).map_err(fs_err(&path))?;
        }
        Cmd::Rm { recursive, path } => {
            let (dir, name) = split_path(&path)?;
            let parent = c.resolve(dir).map_err(fs_err(dir))?;
            let a = c.lookup(parent.ino, name.as_bytes()).map_err(fs_err(&path))?;
            dir_if_slashed(&path, a.kind)?;
            remove(&c, parent.ino, name.as_bytes(), &a, recursive).map_err(fs_err(&path))?;
        }
        Cmd::Mv { from, to } => {
            let ((fdir, fname), (tdir, tname)) = (split_path(&from)?, split_path(&to)?);
            let fparent = c.resolve(fdir).map_err(fs_err(fdir))?;
            let tparent = c.resolve(tdir).map_err(fs_err(tdir))?;
            let kind = c.lookup(fparent.ino, fname.as_bytes()).map_err(fs_err(&from))?.kind;
            dir_if_slashed(&from, kind)?;
            dir_if_slashed(&to, kind)?;
            // An error may be the destination's (a directory not empty, or not a directory): both
            // are named.
            let both = format!("{from} -> {to}");
            let (replaced, _) =
                c.rename(fparent.ino, fname.as_bytes(), tparent.ino, tname.as_bytes(), 0).map_err(fs_err(&both))?;
            reclaim(&c, replaced);
        }
        Cmd::Stat { path } => {
            let a = c.resolve(&path).map_err(fs_err(&path))?;
            dir_if_slashed(&path, a.kind)?;
            let kind = format!("{:?}", a.kind).to_lowercase();
            let time = |ns: i64| {
                let secs = ns.div_euclid(1_000_000_000);
                format!("{secs}.{:09}", ns.rem_euclid(1_000_000_000))
            };
            dfs::outln!("{path}: {kind}, {} bytes, mode {:04o}", a.size, a.perm);
            dfs::outln!("inode {} links {} uid {} gid {} version {}", a.ino, a.nlink, a.uid, a.gid, a.version);
            dfs::outln!("atime {} mtime {} ctime {} (seconds since 1970)", time(a.atime), time(a.mtime), time(a.ctime));
            if !a.target.is_empty() {
                dfs::outln!("target {}", String::from_utf8_lossy(&a.target));
            }
        }
        Cmd::Version { path } => dfs::outln!("{}", c.resolve(&path).map_err(fs_err(&path))?.version),
        Cmd::Placement { path } => {
            let a = c.resolve(&path).map_err(fs_err(&path))?;
            dir_if_slashed(&path, a.kind)?;
            if a.kind != Kind::File {
                bail!("{path}: not a regular file (only files have blocks)");
            }
            let blocks = a.size.div_ceil(u64::from(layout.block_size));
            dfs::outln!("{path}: file id {}, {} bytes, {blocks} blocks", a.ino, a.size);
            for b in 0..blocks {
                let servers = replica_servers(a.ino, b, usize::from(layout.replicas), layout.n());
                let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
                dfs::outln!("block {b}: {}", list.join(" "));
            }
        }
        Cmd::Check { recursive, path } => return check(&c, &layout, &path, recursive),
        Cmd::Corrupt { index, path } => {
            if index >= layout.n() {
                bail!("dataserver index {index} is outside the ring of {}", layout.n());
            }
            let a = c.resolve(&path).map_err(fs_err(&path))?;
            match c.corrupt(index, a.ino).map_err(|e| anyhow!("{e}"))? {
                Ok(Some(b)) => dfs::outln!("corrupted block {b} of {path} on dataserver {index}"),
                Ok(None) => bail!("dataserver {index} holds no block of {path}"),
                Err(e) => bail!("dataserver {index}: {e}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dfsctl check [-r] PATH`: every replica of every block of the file, or of each file under the
/// directory, is present and verifies; exit 1 otherwise.
fn check(c: &Cluster, layout: &dfs::shared::layout::Layout, path: &str, recursive: bool) -> anyhow::Result<ExitCode> {
    let a = c.resolve(path).map_err(fs_err(path))?;
    if a.kind == Kind::Dir && !recursive {
        bail!("{path} is a directory (check -r checks every file under it)");
    }
    // Depth first, by an explicit stack: a deep tree must not overflow this thread's stack.
    let mut stack = vec![(path.trim_end_matches('/').to_string(), a)];
    let (mut files, mut blocks, mut bad_files) = (0u64, 0u64, 0u64);
    while let Some((p, a)) = stack.pop() {
        match a.kind {
            Kind::Dir => {
                let mut entries = c.readdir(a.ino).map_err(fs_err(&p))?;
                entries.retain(|(n, _)| n != b"." && n != b"..");
                // Popped in name order.
                entries.sort_by(|x, y| y.0.cmp(&x.0));
                for (name, e) in entries {
                    stack.push((format!("{p}/{}", String::from_utf8_lossy(&name)), e));
                }
            }
            Kind::File => {
                let n = a.size.div_ceil(u64::from(layout.block_size));
                files += 1;
                blocks += n;
                let problems = match c.check(a.ino) {
                    Ok(p) => p,
                    // Removed since it was listed: nothing left to check.
                    Err(dfs::shared::FsError::NotFound | dfs::shared::FsError::Stale) if recursive => continue,
                    Err(e) => return Err(fs_err(&p)(e)),
                };
                for (block, bad) in &problems {
                    for (s, state) in bad {
                        let what = match state {
                            ReplicaState::Missing => "missing",
                            ReplicaState::Corrupt => "corrupt",
                            ReplicaState::Stale => "stale",
                            ReplicaState::Unreachable => "unreachable",
                            ReplicaState::Refused => "refused (see `dfsctl status`)",
                            ReplicaState::Ok => "ok",
                        };
                        dfs::outln!("{p}: block {block} on dataserver {s} ({}): {what}", layout.servers[*s]);
                    }
                }
                if !problems.is_empty() {
                    bad_files += 1;
                } else if !recursive {
                    dfs::outln!("{p}: ok ({n} blocks, {} replicas each)", layout.replicas);
                }
            }
            _ => {}
        }
    }
    if recursive {
        if bad_files == 0 {
            dfs::outln!("{path}: ok ({files} files, {blocks} blocks, {} replicas each)", layout.replicas);
        } else {
            dfs::outln!("{path}: {bad_files} of {files} files have missing, stale or corrupt replicas");
        }
    }
    Ok(if bad_files == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A progress bar with the throughput for copying `total` bytes (None: not known), on stderr and
/// only when stderr is a terminal: scripts and logs get none.
fn progress(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {elapsed}",
        ),
        None => {
            (indicatif::ProgressBar::new_spinner(), "{msg} {spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}")
        }
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What `dfsctl status` reports, gathered before it is shown as lines or as JSON.
#[derive(serde::Serialize)]
struct StatusReport {
    dataservers: usize,
    block_size: u32,
    replicas: u8,
    inodes: u64,
    write_quorum: u8,
    read_quorum: u8,
    orphans_pending: usize,
    clients: Vec<dfs::metaserver::namespace::sessions::ClientRow>,
    metaservers: Vec<MetaserverReport>,
    servers: Vec<DataserverReport>,
    /// Write quorum + read quorum <= replicas: a read may miss the latest write for a while.
    may_miss: bool,
}

#[derive(serde::Serialize)]
struct MetaserverReport {
    id: u64,
    addr: String,
    /// None for a metaserver on its own (it has no Raft state) or one that did not answer.
    member: Option<dfs::wire::admin::MemberInfo>,
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct DataserverReport {
    index: usize,
    addr: String,
    up: bool,
    /// Why it counts as down.
    error: Option<String>,
    status: Option<dfs::client::ports::ServerStatus>,
}

/// `dfsctl status [--json] [--wait SECS]`: the report, or once `wait` has passed without the
/// namespace answering, what each metaserver says of itself (exit 1). Status is what one runs
/// when something is wrong, so it must not wait for as long as a group goes without a leader.
fn status(meta: &str, json: bool, wait: std::time::Duration) -> anyhow::Result<ExitCode> {
    let (tx, rx) = std::sync::mpsc::channel();
    let m = meta.to_string();
    std::thread::spawn(move || {
        let gathered = Cluster::connect(&m, None, Backoff::default())
            .map_err(|e| anyhow!("{e}"))
            .and_then(|c| gather_status(&c, &c.layout().clone(), &m));
        let _ = tx.send(gathered);
    });
    let report = match rx.recv_timeout(wait) {
        Ok(r) => r?,
        Err(_) => {
            let list = dfs::metaserver::group::GroupConfig::parse_meta_arg(meta)?;
            let members = known_members(&list);
            let why = format!(
                "the namespace did not answer in {} s: no metaserver leads, or none can be reached",
                wait.as_secs()
            );
            if json {
                let metaservers = member_reports(&members);
                let v = serde_json::json!({ "error": why, "metaservers": metaservers });
                dfs::outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                dfs::outln!("{why}");
                print_members(&members);
            }
            return Ok(ExitCode::from(1));
        }
    };
    if json {
        dfs::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn gather_status(c: &Cluster, layout: &dfs::shared::layout::Layout, meta: &str) -> anyhow::Result<StatusReport> {
    let (q, r) = (layout.quorum, layout.replicas);
    let list = dfs::metaserver::group::GroupConfig::parse_meta_arg(meta)?;
    let members = known_members(&list);
    let metaservers = if members.len() > 1 {
        member_reports(&members)
    } else {
        vec![MetaserverReport { id: 0, addr: list[0].clone(), member: None, error: None }]
    };
    let mut servers = Vec::new();
    for (index, addr) in layout.servers.iter().enumerate() {
        let (status, error) = match c.server_status(index).map_err(|e| anyhow!("{e}"))? {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        servers.push(DataserverReport { index, addr: addr.clone(), up: status.is_some(), error, status });
    }
    let report = StatusReport {
        dataservers: layout.n(),
        block_size: layout.block_size,
        replicas: r,
        inodes: c.inode_count().map_err(|e| anyhow!("{e}"))?,
        write_quorum: q.w(r),
        read_quorum: q.q(r),
        orphans_pending: c.orphans().map_err(|e| anyhow!("{e}"))?.len(),
        clients: c.clients().map_err(|e| anyhow!("{e}"))?,
        metaservers,
        servers,
        may_miss: q.may_miss(r),
    };
    Ok(report)
}

fn print_status(r: &StatusReport) {
    dfs::outln!(
        "cluster: {} dataservers, block size {}, {} replicas, {} inodes",
        r.dataservers,
        r.block_size,
        r.replicas,
        r.inodes
    );
    let (w, q, n) = (r.write_quorum, r.read_quorum, r.replicas);
    dfs::outln!("quorums: a write waits for {w} of {n} replicas, a read compares {q}");
    if r.may_miss {
        dfs::outln!(
            "warning: write quorum {w} + read quorum {q} <= {n} replicas: a read may miss the latest write \
             until the replicas converge"
        );
    }
    dfs::outln!("orphans pending: {} (removed files whose blocks are not freed yet)", r.orphans_pending);
    print_clients(&r.clients);
    if r.metaservers.len() > 1 {
        dfs::outln!("metaserver group: {} members", r.metaservers.len());
        for m in &r.metaservers {
            print_member(m.id, &m.addr, m.member.as_ref().ok_or(m.error.as_deref().unwrap_or("")));
        }
    } else {
        dfs::outln!("metaserver {}", r.metaservers[0].addr);
    }
    let ring: Vec<String> = r.servers.iter().map(|d| d.addr.clone()).collect();
    for d in &r.servers {
        let (i, addr) = (d.index, &d.addr);
        let Some(s) = &d.status else {
            dfs::outln!("dataserver {i} {addr} down ({})", d.error.as_deref().unwrap_or(""));
            continue;
        };
        if s.servers != ring {
            let diff = dfs::shared::layout::ring_difference(&ring, &s.servers).unwrap_or_default();
            dfs::outln!("dataserver {i} {addr} ring differs: it was started with another list ({diff})");
            continue;
        }
        let rebuild = if s.rebuilding {
            format!(
                "rebuilding ({} blocks copied of {} listed, {} peers left)",
                s.rebuild_copied, s.rebuild_listed, s.rebuild_peers_left
            )
        } else if s.catching_up {
            "catching up (peers are handing over what it missed while down)".into()
        } else {
            "complete".into()
        };
        dfs::outln!(
            "dataserver {i} {addr} up blocks {} disk {} MiB free {} MiB {rebuild}",
            s.blocks,
            s.bytes >> 20,
            s.disk_free >> 20
        );
        if s.hints > 0 {
            dfs::outln!("  hints: {} blocks or cuts to hand to peers that lack them", s.hints);
        }
        dfs::outln!("  scrub: {}", scrub_line(&s.scrub));
        if !s.rebuild_skipped.is_empty() {
            let peers: Vec<String> = s.rebuild_skipped.iter().map(u32::to_string).collect();
            dfs::outln!(
                "  rebuild finished without dataserver(s) {} (not answering); copying from them when they do",
                peers.join(", ")
            );
        }
        if s.rebuild_nowhere > 0 {
            let keys: Vec<String> =
                s.rebuild_nowhere_keys.iter().map(|k| format!("{}/{}", k.file_id, k.index)).collect();
            dfs::outln!(
                "  rebuild found {} block(s) intact nowhere (file/block): {}{}",
                s.rebuild_nowhere,
                keys.join(" "),
                if s.rebuild_nowhere as usize > keys.len() { " ..." } else { "" }
            );
        }
    }
}

/// One line on a server's scrubber: the pass running, or the last one and what it found and fixed.
fn scrub_line(s: &dfs::dataserver::scrub::ScrubStatus) -> String {
    let found = format!(
        "{} of {} blocks verified, {} corrupt, {} copies mended here, {} sent to peers, {} ranges differed{}",
        s.checked,
        s.total,
        s.corrupt,
        s.repaired,
        s.pushed,
        s.ranges_differed,
        if s.unreachable > 0 { format!(", {} peers unreachable", s.unreachable) } else { String::new() }
    );
    let ago = |t: i64| (dfs::shared::now_ns() / 1_000_000_000 - t).max(0);
    if s.running {
        format!("pass running for {} s: {found}", ago(s.started_at))
    } else if s.finished_at == 0 {
        format!("no pass yet (rate {} MiB/s)", s.rate >> 20)
    } else {
        format!("last pass ended {} s ago: {found}", ago(s.finished_at))
    }
}

/// `dfsctl scrub [--wait]`.
fn scrub(c: &Cluster, layout: &dfs::shared::layout::Layout, wait: bool) -> anyhow::Result<ExitCode> {
    let n = layout.n();
    // Each server's passes before this start: its pass is done once the count has grown.
    let mut before: Vec<Option<u64>> = vec![None; n];
    for (i, slot) in before.iter_mut().enumerate() {
        match c.scrub(i, true).map_err(|e| anyhow!("{e}"))? {
            Ok(s) => {
                *slot = Some(s.passes);
                dfs::outln!("dataserver {i}: scrub started");
            }
            Err(e) => dfs::outln!("dataserver {i} {}: down ({e})", layout.servers[i]),
        }
    }
    if !wait {
        return Ok(if before.iter().all(Option::is_some) { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let started = std::time::Instant::now();
    let mut last_line = std::time::Instant::now();
    let mut bad = before.iter().any(Option::is_none);
    let mut done = vec![false; n];
    while done.iter().zip(&before).any(|(d, b)| !d && b.is_some()) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let show = last_line.elapsed() >= std::time::Duration::from_secs(2);
        for i in 0..n {
            let Some(b) = before[i] else { continue };
            if done[i] {
                continue;
            }
            match c.scrub(i, false).map_err(|e| anyhow!("{e}"))? {
                Ok(s) if s.passes > b && !s.running => {
                    done[i] = true;
                    bad |= s.unreachable > 0 || s.corrupt > s.repaired;
                    dfs::outln!("dataserver {i}: {}", scrub_line(&s));
                }
                Ok(s) if show => dfs::outln!("dataserver {i}: {}", scrub_line(&s)),
                Ok(_) => {}
                Err(e) => {
                    done[i] = true;
                    bad = true;
                    dfs::outln!("dataserver {i}: lost during the pass ({e})");
                }
            }
        }
        if show {
            last_line = std::time::Instant::now();
        }
    }
    dfs::outln!("scrub done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(if bad { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn main() -> ExitCode {
    if let Some(code) = dfs::cli::generated_docs::<Args>("dfsctl") {
        return code;
    }
    let args = Args::parse();
    dfs::cli::init_tracing_quiet();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dfsctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
