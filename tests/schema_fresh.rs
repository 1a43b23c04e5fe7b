//! The Rust code generated from `src/wire/dfs.capnp` is committed (so a build needs only a Rust toolchain).
//! This test regenerates it and fails when the committed copy is stale. It needs the `capnp` tool
//! (Debian: `apt-get install capnproto`), which CI installs.
//!
//! To regenerate after editing the schema: `DFS_REGENERATE_SCHEMA=1 cargo test --test schema_fresh`.

use std::path::Path;

#[test]
fn committed_generated_code_matches_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = root.join("src/wire/dfs_capnp.rs");
    let out = tempfile::tempdir().expect("temp dir");
    capnpc::CompilerCommand::new()
        .src_prefix(root.join("src/wire"))
        .file(root.join("src/wire/dfs.capnp"))
        .default_parent_module(vec!["wire".into()])
        .output_path(out.path())
        .run()
        .expect("capnp compile failed: is the `capnp` tool installed (apt-get install capnproto)?");
    let fresh = std::fs::read_to_string(out.path().join("dfs_capnp.rs")).expect("generated file");
    if std::env::var_os("DFS_REGENERATE_SCHEMA").is_some() {
        std::fs::write(&committed, &fresh).expect("write generated code");
        return;
    }
    let old = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        old == fresh,
        "src/wire/dfs_capnp.rs is stale: run `DFS_REGENERATE_SCHEMA=1 cargo test --test schema_fresh`"
    );
}
