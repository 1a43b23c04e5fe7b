//! Operators' and testers' calls to the members of a metaserver group, one member at a time: its
//! state, crashing or restoring it (fault injection), its copy of a file's version, and changing
//! the group's membership. Synchronous, for dfsctl and the lab.

use std::time::Duration;

use super::dfs_capnp::meta;
use super::net;

/// What a member says of itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemberInfo {
    pub id: u64,
    pub role: String,
    pub crashed: bool,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied: u64,
    pub snapshot: u64,
    /// The members it knows of: (id, address, voter).
    pub nodes: Vec<(u64, String, bool)>,
}

/// A member's answer takes at most this long.
const LIMIT: Duration = Duration::from_secs(5);

/// A membership change waits for a new member to catch up: at most this long.
const MEMBERSHIP_LIMIT: Duration = Duration::from_secs(120);

fn on<T>(addr: &str, f: impl AsyncFnOnce(meta::Client) -> capnp::Result<T>) -> Result<T, String> {
    on_for(addr, LIMIT, f)
}

fn on_for<T>(addr: &str, limit: Duration, f: impl AsyncFnOnce(meta::Client) -> capnp::Result<T>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    tokio::task::LocalSet::new().block_on(&rt, async {
        let call = async {
            let c: meta::Client = net::connect(addr).await.map_err(|e| capnp::Error::disconnected(e.to_string()))?;
            f(c).await
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {limit:?}")),
        }
    })
}

/// The state of the member at `addr`.
pub fn member_info(addr: &str) -> Result<MemberInfo, String> {
    on(addr, async |c| {
        let reply = c.member_request().send().promise.await?;
        let s = reply.get()?.get_status()?;
        Ok(MemberInfo {
            id: s.get_id(),
            role: s.get_role()?.to_string()?,
            crashed: s.get_crashed(),
            leader: u64::try_from(s.get_leader()).ok(),
            term: s.get_term(),
            last_log_index: s.get_last_log_index(),
            applied: s.get_applied(),
            snapshot: s.get_snapshot(),
            nodes: s
                .get_nodes()?
                .iter()
                .map(|n| Ok((n.get_id(), n.get_addr()?.to_string()?, n.get_voter())))
                .collect::<capnp::Result<_>>()?,
        })
    })
}

/// Crashes (or, with `false`, restores) the member at `addr`.
pub fn set_crashed(addr: &str, crashed: bool) -> Result<(), String> {
    on(addr, async |c| {
        let mut req = c.crash_request();
        req.get().set_crashed(crashed);
        req.send().promise.await?;
        Ok(())
    })
}

/// The version of the inode at `path` in the store of the member at `addr` (its own copy, even
/// while it is crashed or behind the leader).
pub fn local_version(addr: &str, path: &str) -> Result<Result<u64, crate::shared::FsError>, String> {
    on(addr, async |c| {
        let mut req = c.local_version_request();
        req.get().set_path(path.as_bytes());
        let reply = req.send().promise.await?;
        let r = reply.get()?;
        Ok(super::convert::errno_from_wire(r.get_err()).map(|()| r.get_version()))
    })
}

/// Asks the leader at `leader` to add member `id` at `addr` (see the addMember method); waits
/// while the new member catches up.
pub fn add_member(leader: &str, id: u64, addr: &str) -> Result<Result<(), String>, String> {
    on_for(leader, MEMBERSHIP_LIMIT, async |c| {
        let mut req = c.add_member_request();
        req.get().set_id(id);
        req.get().set_addr(addr);
        let reply = req.send().promise.await?;
        let err = reply.get()?.get_err()?.to_string()?;
        Ok(if err.is_empty() { Ok(()) } else { Err(err) })
    })
}

/// Asks the leader at `leader` to take voter `id` out of the group.
pub fn remove_member(leader: &str, id: u64) -> Result<Result<(), String>, String> {
    on_for(leader, MEMBERSHIP_LIMIT, async |c| {
        let mut req = c.remove_member_request();
        req.get().set_id(id);
        let reply = req.send().promise.await?;
        let err = reply.get()?.get_err()?.to_string()?;
        Ok(if err.is_empty() { Ok(()) } else { Err(err) })
    })
}
