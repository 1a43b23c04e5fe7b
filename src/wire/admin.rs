//! Operators' and testers' calls to the members of a metaserver group, one member at a time: its
//! state, crashing or restoring it (fault injection), and its copy of a file's version. Synchronous, for dfsctl and the lab.

use std::time::Duration;

use super::dfs_capnp::meta;
use super::net;

/// What a member says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub role: String,
    pub crashed: bool,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied: u64,
    pub snapshot: u64,
}

/// A member's answer takes at most this long.
const LIMIT: Duration = Duration::from_secs(5);

fn on<T>(addr: &str, f: impl AsyncFnOnce(meta::Client) -> capnp::Result<T>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    tokio::task::LocalSet::new().block_on(&rt, async {
        let call = async {
            let c: meta::Client = net::connect(addr).await.map_err(|e| capnp::Error::disconnected(e.to_string()))?;
            f(c).await
        };
        match tokio::time::timeout(LIMIT, call).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {LIMIT:?}")),
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
