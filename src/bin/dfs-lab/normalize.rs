//! Normalization of workload output before it is compared with golden output: what legitimately
//! differs between two filesystems (inode numbers, device ids, times of the run, allocation and
//! `du`, preferred I/O size, directory sizes in `stat`, `ls -l` and `stat -c '%s %F'`, the mount
//! path) is replaced by placeholders. Everything else
//! must match.
//!
//! Times: a time the run produced (a file's creation, a write) is recent, and differs between any
//! two runs; a time a workload chose (`touch -d 2001-02-03`, kept by `cp -p` or `tar -x`) is years
//! before the run, and must survive. So dates from before last year are kept, later ones replaced.

use std::sync::LazyLock;

use regex::Regex;

struct Rule {
    re: Regex,
    with: &'static str,
    /// Only matches whose capture group "year" is at least this are replaced (dates a workload
    /// chose, years before the run, are kept).
    from_year: Option<i32>,
}

/// The year before the current one (UTC): a run's own times are never earlier.
fn recent_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Days to civil year (Howard Hinnant's algorithm, year part only).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400 + i64::from(mp >= 10);
    year as i32 - 1
}

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let rule = |re: &str, with| Rule { re: Regex::new(re).expect("normalization regex"), with, from_year: None };
    let recent = |re: &str, with| Rule { from_year: Some(recent_year()), ..rule(re, with) };
    vec![
        // stat(1): times of the run, birth (unsupported on many filesystems), device and inode numbers.
        recent(r"(?m)^(\s*)(Access|Modify|Change|Birth): (?<year>\d{4})-\d\d-\d\d [0-9:.]+ [+-]\d{4}$", "$1$2: <time>"),
        rule(r"(?m)^(\s*)Birth: -$", "${1}Birth: <time>"),
        rule(r"Device: [0-9a-fA-F,/h]+d?", "Device: <dev>"),
        rule(r"Inode: \d+", "Inode: <ino>"),
        rule(r"Blocks: \d+", "Blocks: <blocks>"),
        rule(r"IO Block: \d+", "IO Block: <iob>"),
        // A directory's size is the filesystem's business (4096 on ext4, entry-dependent on tmpfs).
        rule(r"Size: \d+(\s+Blocks: <blocks>\s+IO Block: <iob>\s+directory)", "Size: <dirsize>$1"),
        // ls -l of a directory: its size column (the link count, owner and group still count).
        rule(r"(?m)^(d[rwxXsStT-]{9}[.+@]?\s+\d+\s+\S+\s+\S+\s+)\d+", "${1}<dirsize>"),
        // stat -c with %F beside %s: a directory's size.
        rule(r"\b\d+ directory\b", "<dirsize> directory"),
        // du: allocation, each filesystem's own (DFS has no allocation units; ext4 rounds to 4 KiB).
        rule(r"(?m)^\d+(\.\d+)?[KMGT]?\t", "<du>\t"),
        // ls -l dates and `total` (allocation) lines.
        rule(r"(?m)^total \d+$", "total <n>"),
        rule(r"\b[A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d ", "<date> "),
        recent(r"\b[A-Z][a-z]{2} [ 0-3]\d  (?<year>\d{4}) ", "<date> "),
        recent(r"\b(?<year>\d{4})-\d\d-\d\d \d\d:\d\d\b", "<date>"),
        // Column padding follows the widths of the (normalized) numbers: collapse it.
        rule(r"[ \t]+", " "),
    ]
});

/// Normalizes `text`, produced with working directory `root` (replaced by `<root>`).
pub fn normalize(text: &str, root: &str) -> String {
    let mut s = if root.is_empty() { text.to_string() } else { text.replace(root, "<root>") };
    for r in RULES.iter() {
        s = match r.from_year {
            None => r.re.replace_all(&s, r.with).into_owned(),
            Some(from) => {
                r.re.replace_all(&s, |c: &regex::Captures| {
                    let year: i32 = c.name("year").and_then(|y| y.as_str().parse().ok()).unwrap_or(i32::MAX);
                    if year >= from {
                        let mut out = String::new();
                        c.expand(r.with, &mut out);
                        out
                    } else {
                        c[0].to_string()
                    }
                })
                .into_owned()
            }
        };
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
    fn times_of_the_run_are_replaced_and_chosen_dates_kept() {
        let year = recent_year() + 1;
        let now = format!("Modify: {year}-11-21 07:45:22.918702662 +0000\n");
        let later = format!("Modify: {year}-11-21 07:45:23.000000000 +0000\n");
        assert_eq!(normalize(&now, ""), normalize(&later, ""));
        let chosen = "Modify: 2001-02-03 04:05:06.000000000 +0000\n";
        let lost = format!("Modify: {year}-11-21 07:45:23.000000000 +0000\n");
        assert_eq!(normalize(chosen, ""), chosen);
        assert_ne!(normalize(chosen, ""), normalize(&lost, ""));
        // ls -l: recent dates show a time of day; old ones a year.
        assert_eq!(normalize("-rw-r--r-- 1 root root 4 Nov 21 07:45 f", ""), "-rw-r--r-- 1 root root 4 <date> f");
        assert_eq!(normalize("-rw-r--r-- 1 root root 4 Feb  3  2001 f", ""), "-rw-r--r-- 1 root root 4 Feb 3 2001 f");
        assert_eq!(normalize(&format!("4 {year}-11-21 07:45 f"), ""), "4 <date> f");
        assert_eq!(normalize("4 2001-02-03 04:05 f", ""), "4 2001-02-03 04:05 f");
    }

    #[test]
    fn directory_sizes_in_every_form_are_hidden_and_file_sizes_are_not() {
        // ls -l: directories differ (ext4 4096, DFS 4096, tmpfs by entries); files must not.
        assert_eq!(
            normalize("drwxr-xr-x 2 root root 4096 Jan  1  2001 d", ""),
            normalize("drwxr-xr-x 2 root root 60 Jan  1  2001 d", "")
        );
        assert_ne!(
            normalize("drwxr-xr-x 2 root root 4096 Jan  1  2001 d", ""),
            normalize("drwxr-xr-x 3 root root 4096 Jan  1  2001 d", ""),
            "the link count still counts"
        );
        assert_ne!(
            normalize("-rw-r--r-- 1 root root 24 Jan  1  2001 f", ""),
            normalize("-rw-r--r-- 1 root root 25 Jan  1  2001 f", "")
        );
        // stat -c '%n %s %F'.
        assert_eq!(normalize("d 4096 directory", ""), normalize("d 0 directory", ""));
        assert_ne!(normalize("f 24 regular file", ""), normalize("f 25 regular file", ""));
        // du: allocation.
        assert_eq!(normalize("8\t./d\n4\t./d/f", ""), normalize("0\t./d\n1\t./d/f", ""));
        assert_ne!(normalize("8\t./d", ""), normalize("8\t./e", ""));
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
