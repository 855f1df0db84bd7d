//! `vmm-bench fork` and `vmm-bench snapshot` on a real guest, small: the
//! benches run end to end through the Rust API (parents in the bench's
//! process, fork children as processes of the bench program) and report
//! figures that make sense.

use std::process::Command;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_vmm-bench");

/// Runs the bench with `args` and `--json`; its one size's figures.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(BENCH)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmm-bench {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sizes = report["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 1, "{report}");
    sizes[0].clone()
}

fn median(v: &Value, key: &str) -> f64 {
    v[key]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("no median {key} in {v}"))
}

#[test]
fn fork_and_snapshot_benches_run_through_the_rust_api() {
    let fork = bench(&["fork", "--sizes", "128", "--runs", "3", "--write-runs", "1"]);
    assert_eq!(fork["memory_mib"], 128);
    assert!(median(&fork, "fork_ms") > 0.0, "{fork}");
    assert!(median(&fork, "parent_pause_ms") > 0.0, "{fork}");
    assert!(
        fork["parent_guest_rss_kib"].as_f64().unwrap() > 0.0,
        "{fork}"
    );
    // A child that wrote 10 MiB holds at least those pages of its own.
    let before = median(&fork, "child_private_kib");
    let after = median(&fork, "child_private_after_10mib_write_kib");
    assert!(after >= before + 10240.0, "{before} -> {after} KiB");

    let snapshot = bench(&["snapshot", "--sizes", "128", "--runs", "2"]);
    assert!(median(&snapshot, "create_ms") > 0.0, "{snapshot}");
    assert!(median(&snapshot, "memory_file_mib") > 0.0, "{snapshot}");
    assert!(
        median(&snapshot, "restore_to_running_ms") > 0.0,
        "{snapshot}"
    );
}
