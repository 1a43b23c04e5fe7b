//! A metaserver group's configuration, in the format of the assignment's Raft variant:
//!
//! ```text
//! M: 3
//! metadata0: localhost:9001
//! metadata1: localhost:9002
//! metadata2: localhost:9003
//! ```
//!
//! Blank lines and `#` comments are allowed. Member `i` is the line `metadata<i>`; every member
//! from 0 to M-1 must be listed once, at distinct addresses.

use std::path::Path;

use crate::shared::layout::{parse_addr, same_servers, LayoutError};

/// The members' addresses, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    pub members: Vec<String>,
}

/// What is wrong with a group's configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no 'M: <number of servers>' line")]
    NoCount,
    #[error("M is {count}, but {listed} metadata lines are given")]
    CountDiffers { count: usize, listed: usize },
    #[error("metadata{id} is listed, but M is {count} (members are metadata0 to metadata{})", count - 1)]
    Beyond { id: usize, count: usize },
    #[error("metadata{0} is missing")]
    Missing(usize),
    #[error("metadata{0} and metadata{1} have the same address {2}")]
    SameAddress(usize, usize, String),
    #[error("{0}")]
    Address(LayoutError),
    #[error("member {id} is not in a group of {count}")]
    NoSuchMember { id: usize, count: usize },
}

/// How two entries naming one server are shown: the address, and its other spelling if any.
fn same_as(addrs: &[String], i: usize, j: usize) -> String {
    if addrs[i] == addrs[j] {
        addrs[i].clone()
    } else {
        format!("{} (as {})", addrs[i], addrs[j])
    }
}

impl GroupConfig {
    pub fn load(path: &Path) -> Result<GroupConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), why: e.to_string() })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<GroupConfig, ConfigError> {
        let mut count = None;
        let mut listed: Vec<Option<String>> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| ConfigError::Line { line: i + 1, why };
            let (key, value) = line.split_once(':').ok_or_else(|| bad(format!("'{line}' is not 'key: value'")))?;
            let (key, value) = (key.trim(), value.trim());
            if key == "M" {
                if count.is_some() {
                    return Err(bad("M is given twice".into()));
                }
                let n: usize = value.parse().map_err(|_| bad(format!("M: '{value}' is not a number")))?;
                if n == 0 || n > 64 {
                    return Err(bad(format!("M: a group has 1 to 64 members, not {n}")));
                }
                count = Some(n);
            } else if let Some(id) = key.strip_prefix("metadata") {
                // Digits only: `metadata+1` is a typo, not 1 (`metadata01` is 1).
                let plain = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
                let id: usize =
                    id.parse().ok().filter(|_| plain).ok_or_else(|| bad(format!("'{key}' is not metadata<number>")))?;
                if id >= 64 {
                    return Err(bad(format!("{key}: a group has at most 64 members")));
                }
                let addr = parse_addr(value).map_err(|e: LayoutError| bad(format!("{key}: {e}")))?;
                if listed.len() <= id {
                    listed.resize(id + 1, None);
                }
                if listed[id].replace(addr).is_some() {
                    return Err(bad(format!("{key} is given twice")));
                }
            } else {
                return Err(bad(format!("unknown key '{key}' (expected M or metadata<number>)")));
            }
        }
        let count = count.ok_or(ConfigError::NoCount)?;
        if listed.len() > count {
            return Err(ConfigError::Beyond { id: listed.len() - 1, count });
        }
        let given = listed.iter().flatten().count();
        if given != count {
            return Err(ConfigError::CountDiffers { count, listed: given });
        }
        let members: Vec<String> =
            listed.into_iter().enumerate().map(|(i, a)| a.ok_or(ConfigError::Missing(i))).collect::<Result<_, _>>()?;
        if let Some((i, j)) = same_servers(&members) {
            return Err(ConfigError::SameAddress(i, j, same_as(&members, i, j)));
        }
        Ok(GroupConfig { members })
    }

    /// The metaserver(s) a client names: one address, a comma-separated list of a group's
    /// members (`9001,9002,9003`, ports or host:port), or `@FILE`, the group's config file.
    pub fn parse_meta_arg(arg: &str) -> Result<Vec<String>, ConfigError> {
        if let Some(path) = arg.strip_prefix('@') {
            return Ok(Self::load(Path::new(path))?.members);
        }
        let addrs: Vec<String> =
            arg.split(',').map(|a| parse_addr(a).map_err(ConfigError::Address)).collect::<Result<_, _>>()?;
        if let Some((i, j)) = same_servers(&addrs) {
            return Err(ConfigError::SameAddress(i, j, same_as(&addrs, i, j)));
        }
        Ok(addrs)
    }

    /// The group's identity: members refuse Raft messages from another group's. It is named by its
    /// founding member (metadata0, which forms it), so that it stays the same when members are
    /// added at run time with config files that list more members.
    pub fn id(&self) -> u64 {
        let digest = crate::shared::block::checksum(self.members[0].as_bytes());
        u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
    }

    /// Member `id`'s address.
    pub fn member(&self, id: usize) -> Result<&str, ConfigError> {
        self.members.get(id).map(String::as_str).ok_or(ConfigError::NoSuchMember { id, count: self.members.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_named_by_its_founding_member() {
        let three = GroupConfig::parse("M: 3\nmetadata0: h:1\nmetadata1: h:2\nmetadata2: h:3\n").expect("three");
        let four = GroupConfig::parse("M: 4\nmetadata0: h:1\nmetadata1: h:2\nmetadata2: h:3\nmetadata3: h:4\n");
        let other = GroupConfig::parse("M: 3\nmetadata0: h:9\nmetadata1: h:2\nmetadata2: h:3\n").expect("other");
        assert_eq!(three.id(), four.expect("four").id(), "a member added later is of the same group");
        assert_ne!(three.id(), other.id());
    }

    #[test]
    fn the_assignments_format_with_blank_lines_and_comments() {
        let c = GroupConfig::parse(
            "# three members\nM: 3\n\nmetadata0: localhost:9001\n\nmetadata1: localhost:9002  # the second\nmetadata2: 9003\n",
        )
        .expect("parse");
        assert_eq!(c.members, vec!["localhost:9001", "localhost:9002", "127.0.0.1:9003"]);
        assert_eq!(c.member(2), Ok("127.0.0.1:9003"));
        assert_eq!(c.member(3), Err(ConfigError::NoSuchMember { id: 3, count: 3 }));
        // Any order of lines.
        let d = GroupConfig::parse("metadata1: a:2\nmetadata0: a:1\nM: 2").expect("parse");
        assert_eq!(d.members, vec!["a:1", "a:2"]);
    }

    #[test]
    fn malformed_files_are_refused_saying_what_is_wrong() {
        let err = |text: &str| GroupConfig::parse(text).expect_err(text).to_string();
        assert_eq!(err("metadata0: a:1"), "no 'M: <number of servers>' line");
        assert_eq!(err("M: 3\nmetadata0: a:1\nmetadata1: a:2"), "M is 3, but 2 metadata lines are given");
        assert_eq!(
            err("M: 2\nmetadata0: a:1\nmetadata2: a:2"),
            "metadata2 is listed, but M is 2 (members are metadata0 to metadata1)"
        );
        assert_eq!(err("M: 2\nmetadata0: a:1\nmetadata1: a:1"), "metadata0 and metadata1 have the same address a:1");
        assert!(err("M: two").contains("line 1: M: 'two' is not a number"));
        assert!(err("M: 1\nmetadata0: a:1\nmetadata0: a:2").contains("line 3: metadata0 is given twice"));
        assert!(err("M: 1\nmetadata0: nowhere").contains("line 2: metadata0:"));
        assert!(err("M: 1\nserver0: a:1").contains("unknown key 'server0'"));
        assert!(err("M: 1\njust words").contains("is not 'key: value'"));
        assert!(err("M: 0").contains("1 to 64 members"));
        assert!(err("M: 2\nmetadata0: 9001\nmetadata1: a:2\nmetadata01: a:3").contains("metadata01 is given twice"));
        assert!(err("M: 2\nmetadata0: 9001\nmetadata+1: a:2").contains("'metadata+1' is not metadata<number>"));
        assert_eq!(
            err("M: 2\nmetadata0: 9001\nmetadata1: localhost:9001"),
            "metadata0 and metadata1 have the same address 127.0.0.1:9001 (as localhost:9001)"
        );
    }

    #[test]
    fn a_client_names_one_metaserver_a_list_or_the_config_file() {
        assert_eq!(GroupConfig::parse_meta_arg("9001"), Ok(vec!["127.0.0.1:9001".to_string()]));
        assert_eq!(
            GroupConfig::parse_meta_arg("9001,h:9002"),
            Ok(vec!["127.0.0.1:9001".to_string(), "h:9002".to_string()])
        );
        assert!(GroupConfig::parse_meta_arg("9001,9001").is_err());
        assert!(GroupConfig::parse_meta_arg("9001,localhost:9001").is_err());
        assert!(GroupConfig::parse_meta_arg("9001,,9002").is_err());
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("group.conf");
        std::fs::write(&path, "M: 2\nmetadata0: a:1\nmetadata1: a:2\n").expect("write");
        let arg = format!("@{}", path.display());
        assert_eq!(GroupConfig::parse_meta_arg(&arg), Ok(vec!["a:1".to_string(), "a:2".to_string()]));
        assert!(GroupConfig::parse_meta_arg("@/nonexistent/group.conf")
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
