//! The Rust embedding API on a real guest: runs `examples/sandboxes.rs`
//! (start, exec, put/get, pause/resume, snapshot, fork into two children
//! in their own processes, restore in the same process, stop) and checks
//! what each step saw.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::Scratch;

/// The example's binary: cargo builds examples next to the test binaries
/// (`<target>/debug/examples/`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("examples").join("sandboxes");
    let built = std::fs::metadata(&path).and_then(|m| m.modified());
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sandboxes.rs");
    let edited = std::fs::metadata(source)
        .and_then(|m| m.modified())
        .unwrap();
    // `cargo test` without target filters builds examples; with `--test
    // embed` alone it does not, so the binary may be missing or older
    // than its source.
    assert!(
        built.is_ok_and(|built| built >= edited),
        "{} is missing or older than {source}: run `cargo build --example sandboxes` (plain `cargo test` builds it)",
        path.display()
    );
    path
}

#[test]
fn the_example_orchestrates_sandboxes_without_the_cli() {
    let s = Scratch::new("embed");
    let out = Command::new(example())
        .arg(&s.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}\n{stderr}"))
            .to_string()
    };
    // The hostname is `sandbox-` and the machine id's first 8 digits.
    let host = line("exec: ");
    let id = host.strip_prefix("hello from sandbox-").unwrap_or_default();
    assert!(
        id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{host}"
    );
    assert_eq!(line("put: "), "21");
    assert_eq!(line("get: "), "\"a file from the host\"");
    assert_eq!(line("paused: "), "Paused");
    assert_eq!(line("resumed: "), "Running");
    assert!(line("snapshot: ").ends_with("bytes of memory"));
    // Each child sees the parent's change from before the fork and only
    // its own file; the parent sees none of theirs.
    let children: Vec<&str> = stdout.lines().filter(|l| l.starts_with("child ")).collect();
    assert_eq!(children.len(), 2, "{stdout}");
    for c in &children {
        let (id, seen) = c["child ".len()..].split_once(": ").unwrap();
        assert_eq!(seen, format!("after {id}"), "{stdout}");
    }
    assert_eq!(line("parent: "), "none");
    // The restore has the snapshot's disk, not the later change.
    assert_eq!(line("restored: "), "before");
    assert!(line("stopped: ").contains("shut"), "{stdout}");
}
