//! Normalization of workload output before it is compared with golden output: what legitimately
//! differs between two filesystems (inode numbers, device ids, times, allocation, preferred I/O size,
//! directory sizes, the mount path) is replaced by placeholders. Everything else must match.

use std::sync::LazyLock;

use regex::Regex;

struct Rule {
    re: Regex,
    with: &'static str,
}

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let rule = |re: &str, with| Rule { re: Regex::new(re).expect("normalization regex"), with };
    vec![
        // stat(1): times, birth (unsupported on many filesystems), device and inode numbers.
        rule(r"(?m)^(\s*)(Access|Modify|Change|Birth): (\d{4}-\d\d-\d\d [0-9:.]+ [+-]\d{4}|-)$", "$1$2: <time>"),
        rule(r"Device: [0-9a-fA-F,/h]+d?", "Device: <dev>"),
        rule(r"Inode: \d+", "Inode: <ino>"),
        rule(r"Blocks: \d+", "Blocks: <blocks>"),
        rule(r"IO Block: \d+", "IO Block: <iob>"),
        // A directory's size is the filesystem's business (4096 on ext4, entry-dependent on tmpfs).
        rule(r"Size: \d+(\s+Blocks: <blocks>\s+IO Block: <iob>\s+directory)", "Size: <dirsize>$1"),
        // ls -l dates and `total` (allocation) lines.
        rule(r"(?m)^total \d+$", "total <n>"),
        rule(r"\b[A-Z][a-z]{2} [ 0-3]\d (\d\d:\d\d| \d{4}) ", "<date> "),
        // Column padding follows the widths of the (normalized) numbers: collapse it.
        rule(r"[ \t]+", " "),
    ]
});

/// Normalizes `text`, produced with working directory `root` (replaced by `<root>`).
pub fn normalize(text: &str, root: &str) -> String {
    let mut s = if root.is_empty() { text.to_string() } else { text.replace(root, "<root>") };
    for r in RULES.iter() {
        s = r.re.replace_all(&s, r.with).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_output_of_two_filesystems_normalizes_equal() {
        let ext4 = "  Size: 4096      \tBlocks: 8          IO Block: 4096   directory\nDevice: 254,0\tInode: 10010709    Links: 2\nAccess: (0755/drwxr-xr-x)  Uid: (    0/    root)\nAccess: 2026-11-21 07:45:22.918702662 +0000\n Birth: 2026-11-21 07:45:22.918702662 +0000\n";
        let dfs = "  Size: 4096      \tBlocks: 8          IO Block: 1048576 directory\nDevice: 0,39\tInode: 1           Links: 2\nAccess: (0755/drwxr-xr-x)  Uid: (    0/    root)\nAccess: 2026-11-21 07:45:01.426261381 +0000\n Birth: -\n";
        assert_eq!(normalize(ext4, ""), normalize(dfs, ""));
    }

    #[test]
    fn what_matters_still_differs() {
        let a = "Device: 0,39\tInode: 1           Links: 2\nAccess: (0755/drwxr-xr-x)";
        let b = "Device: 0,39\tInode: 1           Links: 3\nAccess: (0755/drwxr-xr-x)";
        assert_ne!(normalize(a, ""), normalize(b, ""));
        let c = "Device: 0,39\tInode: 1           Links: 2\nAccess: (0700/drwx------)";
        assert_ne!(normalize(a, ""), normalize(c, ""));
        assert_ne!(
            normalize("  Size: 24  Blocks: 8  IO Block: 4096   regular file", ""),
            normalize("  Size: 25  Blocks: 8  IO Block: 4096   regular file", "")
        );
    }
}
