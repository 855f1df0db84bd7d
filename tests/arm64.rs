//! arm64 guests on KVM/arm64, on this x86_64 machine: `tools/arm64-l1.sh`
//! boots an arm64 Linux ("L1") under qemu-system-aarch64 with EL2 emulated,
//! whose KVM runs our aarch64 `vmm` and its guests ("L2"). One L1 runs
//! every section of `tests/arm64/l1-job.sh` once; each test checks its
//! section and prints the section's time (L1's clock: everything here is
//! emulated, about 100x slower than arm64 hardware). Needs what
//! tools/setup.sh installs; without it these tests fail and say so. On an
//! arm64 host the other test files run natively instead.
#![cfg(target_arch = "x86_64")]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// One section of the job: its output, status and time.
struct Section {
    text: String,
    status: i32,
    seconds: f64,
}

impl Section {
    /// The numbers on the section's first line that starts with `prefix`.
    fn numbers_after(&self, prefix: &str) -> Vec<u64> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{}", self.text))
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    }
}

/// L1's console, split into sections.
struct L1Run {
    console: String,
    sections: HashMap<String, Section>,
}

fn parse(console: &str) -> HashMap<String, Section> {
    let mut sections = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(name) = line.strip_prefix("ARM64-BEGIN ") {
            current = Some((name.to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix("ARM64-END ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or_default();
            let field = |key: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_default()
                    .to_string()
            };
            if let Some((open, text)) = current.take() {
                if open == name {
                    sections.insert(
                        open,
                        Section {
                            text,
                            status: field("status=").parse().unwrap_or(-1),
                            seconds: field("seconds=").parse().unwrap_or(f64::NAN),
                        },
                    );
                }
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

fn l1() -> &'static L1Run {
    static RUN: OnceLock<L1Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let started = std::time::Instant::now();
        let out = Command::new(repo.join("tools/arm64-l1.sh"))
            .arg("run")
            .arg(repo.join("tests/arm64/l1-job.sh"))
            .output()
            .expect("run tools/arm64-l1.sh");
        let console = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "arm64: L1 run (with any builds) took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            out.status.success() && console.contains("L1-DONE"),
            "the L1 run failed ({}):\n{console}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        L1Run {
            sections: parse(&console),
            console,
        }
    })
}

/// Section `name`, which must have ended with status 0.
fn section(name: &str) -> &'static Section {
    let run = l1();
    let s = run
        .sections
        .get(name)
        .unwrap_or_else(|| panic!("no section {name} in L1's console:\n{}", run.console));
    eprintln!("arm64: {name} took {:.2} s in L1", s.seconds);
    assert_eq!(s.status, 0, "section {name} failed:\n{}", s.text);
    s
}

#[test]
fn the_guest_boots_to_our_init_and_powers_off() {
    let s = section("boot");
    assert!(s.text.contains("vmm-init: ready"), "{}", s.text);
    let report: serde_json::Value = s
        .text
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no launch report:\n{}", s.text));
    assert_eq!(report["exit_code"], 0, "{report}");
    assert_eq!(report["exit_reason"], "the guest shut down", "{report}");
    let to_init = report["boot_to_init_ms"].as_f64().expect("boot_to_init_ms");
    eprintln!(
        "arm64: vmm setup {:.0} ms, boot to init {to_init:.0} ms (in L1)",
        report["vmm_setup_ms"].as_f64().unwrap_or(f64::NAN)
    );
}

#[test]
fn two_vcpus_come_online_through_psci() {
    let s = section("smp");
    assert!(
        s.text.contains("vmm-init: ready cpus-online=0-1"),
        "{}",
        s.text
    );
}

#[test]
fn a_command_runs_on_a_virtio_blk_root_through_the_vsock_agent() {
    let s = section("run_on_disk");
    let mut lines = s.text.lines().filter(|l| !l.starts_with("vmm"));
    assert_eq!(lines.next(), Some("aarch64"), "{}", s.text);
    assert!(s.text.contains("/dev/vda / ext4 rw"), "{}", s.text);
}

#[test]
fn a_share_carries_files_both_ways() {
    section("start_vm");
    let s = section("share");
    assert!(s.text.contains("from L1\n"), "{}", s.text);
    assert!(s.text.contains("L1 reads: from-guest"), "{}", s.text);
}

#[test]
fn the_user_network_answers_dhcp_and_a_fetch_from_l1_arrives_intact() {
    section("start_vm");
    let s = section("net");
    assert!(s.text.contains("inet 10.0.2.15/24"), "{}", s.text);
    let sums: Vec<&str> = s
        .text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.len() == 32))
        .collect();
    assert_eq!(sums.len(), 2, "{}", s.text);
    assert_eq!(sums[0], sums[1], "the guest's copy differs:\n{}", s.text);
}

#[test]
fn a_paused_vm_resumes_and_its_restored_snapshot_continues_its_counter() {
    section("start_vm");
    let s = section("snapshot_restore");
    let before = s.numbers_after("counter before ")[0];
    let resumed = s.numbers_after("resumed counter ");
    assert!(
        resumed[0] >= before && resumed[1] > resumed[0],
        "the resumed VM's counter did not go on from {before}: {resumed:?}\n{}",
        s.text
    );
    let after = s.numbers_after("restored counter ");
    assert!(
        after[0] >= before && after[1] > after[0],
        "the counter did not go on from {before}: {after:?}\n{}",
        s.text
    );
}

#[test]
fn a_fork_child_diverges_from_its_parent() {
    section("start_vm");
    let s = section("fork");
    assert!(s.text.contains("child who=child"), "{}", s.text);
    assert!(s.text.contains("parent who=none"), "{}", s.text);
}

#[test]
fn a_restored_two_vcpu_guest_runs_on_both() {
    let s = section("smp_restore");
    assert!(s.text.contains("online 0-1"), "{}", s.text);
    // "before cpu0 A cpu1 B" / "after cpu0 C cpu1 D": user ticks per CPU.
    let (before, after) = (s.numbers_after("before "), s.numbers_after("after "));
    assert_eq!((before.len(), after.len()), (2, 2), "{}", s.text);
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "a restored vCPU stood still: {before:?} then {after:?}\n{}",
        s.text
    );
}

/// The times to the marker line of each VMM (`minimal`, `vmm`) in the
/// section's rounds.
fn marker_times(text: &str) -> HashMap<&str, Vec<f64>> {
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut current = "";
    for line in text.lines() {
        if let Some(round) = line.strip_prefix("round ") {
            current = round.split_whitespace().nth(1).unwrap_or_default();
        } else if let Some(t) = line.strip_prefix("marker after ") {
            times
                .entry(current)
                .or_default()
                .push(t.trim().parse().unwrap_or(f64::NAN));
        }
    }
    times
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Debian's own arm64 kernel boots to its initramfs under our VMM as under
/// the minimal one (tools/minimal-vmm), three times each. The time ratio
/// is the boot goal of docs/arm64.md; it is printed here and recorded by a
/// release-build run in docs/results/, not asserted on this emulated host.
#[test]
fn debians_own_arm64_kernel_boots_to_its_initramfs() {
    let s = section("debian_image");
    assert_eq!(
        s.text.matches("L2-MARKER arch=aarch64 cpus=1").count(),
        6,
        "{}",
        s.text
    );
    let times = marker_times(&s.text);
    let (minimal, ours) = (times["minimal"].clone(), times["vmm"].clone());
    assert_eq!((minimal.len(), ours.len()), (3, 3), "{}", s.text);
    let (minimal, ours) = (median(minimal), median(ours));
    eprintln!(
        "arm64: Debian's Image to its marker: minimal VMM {minimal:.2} s, vmm {ours:.2} s, ratio {:.2} (goal at most 1.2)",
        ours / minimal
    );
}
