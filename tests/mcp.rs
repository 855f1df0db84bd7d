//! `vmm mcp` driven by the official MCP Python SDK (pinned in
//! tests/python/requirements.txt): tests/mcp/client_test.py lists its
//! tools and calls each over stdio.

mod common;

use std::process::Command;

use common::{client_env, describe, Scratch, VMM};

#[test]
fn the_official_mcp_client_calls_every_tool() {
    let venv = client_env("python");
    let scratch = Scratch::new("mcp");
    let out = Command::new(venv.join("bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/mcp/client_test.py"
        ))
        .arg(VMM)
        .current_dir(&scratch.0)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the MCP client failed: {}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all done"));
}
