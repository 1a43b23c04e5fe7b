//! The cluster layout: the ordered dataserver ring, the block size and the replica count.
//! A wrong port order would silently misplace every block, so every party compares layouts and says
//! exactly what differs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Largest block size a store may be created with. Blocks travel whole in one RPC message.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Largest ring we accept (any N from 3 to 64 must work).
pub const MAX_SERVERS: usize = 64;

/// The block size of a new store unless `--block-size` says otherwise (see README's measurements).
pub const DEFAULT_BLOCK_SIZE: u32 = 16 * 1024;
/// The replica count of a new store unless `--replicas` says otherwise.
pub const DEFAULT_REPLICAS: u8 = 3;
/// The most replicas a block may have: a dataserver keeps the count in a byte whose top two bits
/// are flags.
pub const MAX_REPLICAS: u8 = 63;

/// What is wrong with a layout, a ring or an address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("block size must be 1..={MAX_BLOCK_SIZE} bytes, got {0}")]
    BlockSize(u32),
    #[error("replicas must be at least 1")]
    NoReplicas,
    #[error("replicas must be at most {MAX_REPLICAS}, got {0}")]
    TooManyReplicas(u8),
    #[error("{replicas} replicas need at least {replicas} dataservers, but {servers} are given")]
    TooFewServers { replicas: u8, servers: usize },
    #[error("a ring has 1..={MAX_SERVERS} dataservers, got {0}")]
    RingSize(usize),
    #[error("dataserver {0} is listed twice")]
    Duplicate(String),
    #[error("{0}")]
    Quorum(String),
    #[error("'{addr}' {why}")]
    Address { addr: String, why: &'static str },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Dataserver addresses, normalized "host:port", in ring order.
    pub servers: Vec<String>,
    pub block_size: u32,
    pub replicas: u8,
    /// The quorums; not in the serialized form (a change's recorded answer keeps the shape it had
    /// before quorums existed), so the client asks for them with the layout. Default: all, one.
    #[serde(skip)]
    pub quorum: Quorum,
}

/// How many replicas a write waits for and how many a read compares. 0 means the default: a
/// write waits for every replica, a read trusts one verified copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quorum {
    pub write: u8,
    pub read: u8,
}

impl Quorum {
    /// Checks the quorums against `replicas`: each from 1 to R (0 stands for the default).
    pub fn validate(self, replicas: u8) -> Result<(), LayoutError> {
        for (what, flag, v) in [("write", "--write-quorum", self.write), ("read", "--read-quorum", self.read)] {
            if v > replicas {
                return Err(LayoutError::Quorum(format!(
                    "{flag} {v}: a {what} quorum is at most the replica count ({replicas})"
                )));
            }
        }
        Ok(())
    }

    /// The write quorum in effect with `replicas` replicas.
    pub fn w(self, replicas: u8) -> u8 {
        if self.write == 0 {
            replicas
        } else {
            self.write.min(replicas)
        }
    }

    /// The read quorum in effect.
    pub fn q(self, replicas: u8) -> u8 {
        self.read.clamp(1, replicas.max(1))
    }

    /// Whether a read may miss the latest acknowledged write: W + Q <= R.
    pub fn may_miss(self, replicas: u8) -> bool {
        u16::from(self.w(replicas)) + u16::from(self.q(replicas)) <= u16::from(replicas)
    }

    /// The stricter of this and `asked` (a mount may ask for more, never less): an error names a
    /// value looser than this one or above `replicas`.
    pub fn stricter(self, asked: Quorum, replicas: u8) -> Result<Quorum, LayoutError> {
        asked.validate(replicas)?;
        for (flag, asked, ours) in
            [("--write-quorum", asked.write, self.w(replicas)), ("--read-quorum", asked.read, self.q(replicas))]
        {
            if asked != 0 && asked < ours {
                return Err(LayoutError::Quorum(format!(
                    "{flag} {asked}: the cluster's is {ours}, and a mount may only ask for more"
                )));
            }
        }
        let pick = |asked: u8, ours: u8| if asked != 0 { asked } else { ours };
        Ok(Quorum { write: pick(asked.write, self.write), read: pick(asked.read, self.read) })
    }
}

impl Layout {
    /// Checks the invariants every stored or received layout must hold.
    pub fn validate(&self) -> Result<(), LayoutError> {
        validate_shape(self.block_size, self.replicas)?;
        validate_ring(&self.servers)?;
        if usize::from(self.replicas) > self.servers.len() {
            return Err(LayoutError::TooFewServers { replicas: self.replicas, servers: self.servers.len() });
        }
        self.quorum.validate(self.replicas)
    }

    pub fn n(&self) -> usize {
        self.servers.len()
    }
}

/// Validates block size and replica count.
pub fn validate_shape(block_size: u32, replicas: u8) -> Result<(), LayoutError> {
    if block_size == 0 || block_size > MAX_BLOCK_SIZE {
        return Err(LayoutError::BlockSize(block_size));
    }
    if replicas == 0 {
        return Err(LayoutError::NoReplicas);
    }
    if replicas > MAX_REPLICAS {
        return Err(LayoutError::TooManyReplicas(replicas));
    }
    Ok(())
}

/// Validates a ring: 1..=64 distinct addresses.
pub fn validate_ring(servers: &[String]) -> Result<(), LayoutError> {
    if servers.is_empty() || servers.len() > MAX_SERVERS {
        return Err(LayoutError::RingSize(servers.len()));
    }
    for (i, a) in servers.iter().enumerate() {
        if servers[..i].contains(a) {
            return Err(LayoutError::Duplicate(a.clone()));
        }
    }
    Ok(())
}

/// Describes how ring `theirs` differs from `ours`, or `None` if they are equal: "order differs"
/// when both list the same servers (naming each position that differs), "server list differs"
/// when they do not (a typo'd or missing port). Both lists are shown either way.
pub fn ring_difference(ours: &[String], theirs: &[String]) -> Option<String> {
    if ours == theirs {
        return None;
    }
    let lists = format!("expected [{}], got [{}]", ours.join(" "), theirs.join(" "));
    let (mut a, mut b) = (ours.to_vec(), theirs.to_vec());
    a.sort();
    b.sort();
    if a != b {
        let missing: Vec<&str> = ours.iter().filter(|s| !theirs.contains(s)).map(String::as_str).collect();
        let extra: Vec<&str> = theirs.iter().filter(|s| !ours.contains(s)).map(String::as_str).collect();
        let mut what = Vec::new();
        if ours.len() != theirs.len() {
            what.push(format!("{} dataservers given, the cluster has {}", theirs.len(), ours.len()));
        }
        if !extra.is_empty() {
            what.push(format!("not in the cluster: {}", extra.join(" ")));
        }
        if !missing.is_empty() {
            what.push(format!("missing: {}", missing.join(" ")));
        }
        return Some(format!("server list differs ({}): {lists}", what.join("; ")));
    }
    let diffs: Vec<String> = ours
        .iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("position {i}: expected {a}, got {b}"))
        .collect();
    Some(format!("dataserver order differs ({}): {lists}", diffs.join("; ")))
}

/// Parses a server address: a port alone means 127.0.0.1; `HOST:PORT` is taken as given.
pub fn parse_addr(s: &str) -> Result<String, LayoutError> {
    let s = s.trim();
    let bad = |why| LayoutError::Address { addr: s.to_string(), why };
    if let Ok(port) = s.parse::<u16>() {
        if port == 0 {
            return Err(bad("is not a server address: port 0"));
        }
        return Ok(format!("127.0.0.1:{port}"));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("is neither a port nor HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| bad("does not end in a port number"))?;
    if host.is_empty() || port == 0 {
        return Err(bad("is not a valid HOST:PORT"));
    }
    Ok(format!("{host}:{port}"))
}

/// Parses a list of addresses into a validated ring.
pub fn parse_ring(items: &[String]) -> Result<Vec<String>, LayoutError> {
    let ring = items.iter().map(|s| parse_addr(s)).collect::<Result<Vec<_>, _>>()?;
    validate_ring(&ring)?;
    if let Some((i, j)) = same_servers(&ring) {
        return Err(LayoutError::Duplicate(format!("{} (as {})", ring[i], ring[j])));
    }
    Ok(ring)
}

/// The first two of `addrs` (ordered) that name one server under two spellings
/// (`localhost:9001` and `127.0.0.1:9001`, `[::1]:9001`): a server listed twice would, for one,
/// rebuild a lost disk from itself. Other host names are compared by name, without asking DNS
/// (slow, or down, while a server starts).
pub fn same_servers(addrs: &[String]) -> Option<(usize, usize)> {
    let resolved: Vec<Vec<SocketAddr>> = addrs.iter().map(|a| literal(a)).collect();
    (0..addrs.len()).find_map(|j| {
        (0..j).find(|&i| addrs[i] == addrs[j] || resolved[i].iter().any(|a| resolved[j].contains(a))).map(|i| (i, j))
    })
}

/// Whether `a` and `b` name one server, compared as [`same_servers`] compares.
pub fn same_server(a: &str, b: &str) -> bool {
    a == b || literal(a).iter().any(|x| literal(b).contains(x))
}

/// The socket addresses `HOST:PORT` names when its host is an IP literal or `localhost`; none for
/// other host names.
fn literal(a: &str) -> Vec<SocketAddr> {
    let Some((host, port)) = a.rsplit_once(':') else { return Vec::new() };
    let Ok(port) = port.parse::<u16>() else { return Vec::new() };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return vec![(Ipv4Addr::LOCALHOST, port).into(), (Ipv6Addr::LOCALHOST, port).into()];
    }
    host.parse::<IpAddr>().map(|ip| vec![SocketAddr::new(ip, port)]).unwrap_or_default()
}

/// What a caller states about the cluster when it opens a dataserver session or registers with
/// the metaserver: the whole layout (a client that writes), or only the ring (a rebuilding peer,
/// which only reads; a mount registering its list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Ring(Vec<String>),
    Layout(Layout),
}

impl Claim {
    pub fn ring(&self) -> &[String] {
        match self {
            Claim::Ring(r) => r,
            Claim::Layout(l) => &l.servers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorums_are_checked_against_the_replicas_and_a_mount_may_only_tighten_them() {
        let q = Quorum { write: 2, read: 1 };
        assert!(Quorum { write: 4, read: 1 }.validate(3).unwrap_err().to_string().contains("--write-quorum 4"));
        assert_eq!((q.w(3), q.q(3), Quorum::default().w(3), Quorum::default().q(3)), (2, 1, 3, 1));
        assert!(q.may_miss(3) && !Quorum { write: 2, read: 2 }.may_miss(3) && !Quorum::default().may_miss(3));
        assert_eq!(q.stricter(Quorum { write: 3, read: 0 }, 3).unwrap(), Quorum { write: 3, read: 1 });
        assert_eq!(q.stricter(Quorum::default(), 3).unwrap(), q);
        let looser = q.stricter(Quorum { write: 1, read: 0 }, 3).unwrap_err().to_string();
        assert!(looser.contains("--write-quorum 1: the cluster's is 2"), "{looser}");
        assert!(q.stricter(Quorum { write: 0, read: 4 }, 3).is_err());
    }

    #[test]
    fn bare_port_means_loopback_and_bad_ports_are_refused() {
        assert_eq!(parse_addr("3333").unwrap(), "127.0.0.1:3333");
        assert_eq!(parse_addr("host.example:80").unwrap(), "host.example:80");
        assert!(parse_addr("0").is_err());
        assert!(parse_addr("99999").is_err());
        assert!(parse_addr("host:").is_err());
        assert!(parse_addr("nonsense").is_err());
    }

    #[test]
    fn ring_difference_names_the_positions_that_differ() {
        let a: Vec<String> = ["1:1", "1:2", "1:3"].iter().map(|s| s.to_string()).collect();
        let mut b = a.clone();
        b.swap(0, 1);
        let msg = ring_difference(&a, &b).unwrap();
        assert!(msg.contains("position 0: expected 1:1, got 1:2"), "{msg}");
        assert!(msg.starts_with("dataserver order differs"), "{msg}");
        assert!(msg.contains("expected [1:1 1:2 1:3], got [1:2 1:1 1:3]"), "{msg}");
        assert!(ring_difference(&a, &a).is_none());
        assert!(ring_difference(&a, &a[..2]).unwrap().contains("2 dataservers given"));
        // A typo'd port is not an order problem.
        let mut typo = a.clone();
        typo[2] = "1:4".into();
        let msg = ring_difference(&a, &typo).unwrap();
        assert!(msg.starts_with("server list differs"), "{msg}");
        assert!(msg.contains("not in the cluster: 1:4") && msg.contains("missing: 1:3"), "{msg}");
        assert!(msg.contains("expected [1:1 1:2 1:3], got [1:1 1:2 1:4]"), "{msg}");
    }

    #[test]
    fn one_server_under_two_spellings_is_listed_twice() {
        let ring = |items: &[&str]| parse_ring(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let err = ring(&["9001", "localhost:9002", "localhost:9001"]).expect_err("9001 twice").to_string();
        assert!(err.contains("127.0.0.1:9001 (as localhost:9001)"), "{err}");
        assert!(ring(&["9001", "localhost:9002", "127.0.0.2:9001"]).is_ok());
        assert_eq!(same_servers(&["h:1".into(), "h:1".into()]), Some((0, 1)));
        assert_eq!(same_servers(&["[::1]:7".into(), "LOCALHOST:7".into()]), Some((0, 1)));
        assert_eq!(same_servers(&["h:1".into(), "h:2".into(), "127.0.0.1:1".into()]), None);
        assert!(same_server("localhost:5", "[::1]:5") && same_server("h:5", "h:5"));
        assert!(!same_server("localhost:5", "127.0.0.1:6") && !same_server("h:5", "127.0.0.1:5"));
    }

    #[test]
    fn duplicate_servers_and_too_many_replicas_are_invalid() {
        let l = Layout { servers: vec!["a:1".into(), "a:1".into()], block_size: 8, replicas: 1, ..Default::default() };
        assert_eq!(l.validate(), Err(LayoutError::Duplicate("a:1".into())));
        let l = Layout { servers: vec!["a:1".into(), "a:2".into()], block_size: 8, replicas: 3, ..Default::default() };
        assert!(l.validate().unwrap_err().to_string().contains("3 replicas"));
        // A dataserver keeps the count in six bits.
        let servers: Vec<String> = (0..64).map(|i| format!("a:{}", i + 1)).collect();
        let l = Layout { servers, block_size: 8, replicas: 64, ..Default::default() };
        assert_eq!(l.validate(), Err(LayoutError::TooManyReplicas(64)));
        assert_eq!(Layout { replicas: 63, ..l }.validate(), Ok(()));
    }
}
