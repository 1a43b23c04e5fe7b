//! The layers stay apart: only the wire knows the RPC library, only the FUSE adapter knows fuser,
//! and only the binaries use anyhow (the library's errors are typed). This reads the sources, so it
//! fails on the commit that crosses a boundary, not later when the code has grown around it.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Lines of library sources outside `allowed` (folders under src/) that name `krate`.
fn crossings(krate: &str, allowed: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 10, "found only {} sources under {}", files.len(), src.display());
    let pattern = regex::Regex::new(&format!(r"\b{krate}(_rpc)?::")).expect("pattern");
    // Names inside string literals (log targets, messages) are not uses.
    let strings = regex::Regex::new(r#""([^"\\]|\\.)*""#).expect("pattern");
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src").to_string_lossy().to_string();
        if rel.starts_with("bin/") || allowed.iter().any(|a| rel.starts_with(a)) {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read source");
        for (i, line) in text.lines().enumerate() {
            let code = strings.replace_all(line.split("//").next().unwrap_or(""), "\"\"");
            if pattern.is_match(&code) {
                found.push(format!("src/{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_the_wire_knows_capnp() {
    let found = crossings("capnp", &["wire/"]);
    assert!(found.is_empty(), "capnp used outside src/wire:\n{}", found.join("\n"));
}

#[test]
fn only_the_fuse_adapter_knows_fuser() {
    let found = crossings("fuser", &["fuse/"]);
    assert!(found.is_empty(), "fuser used outside src/fuse:\n{}", found.join("\n"));
}

#[test]
fn only_the_binaries_use_anyhow() {
    let found = crossings("anyhow", &[]);
    assert!(found.is_empty(), "anyhow used in the library:\n{}", found.join("\n"));
}
