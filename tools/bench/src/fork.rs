//! `vmm bench fork` and `vmm bench snapshot`: fork latency, parent pause
//! and memory per child; snapshot create and restore-to-running times;
//! each against guest memory size. Parents run in this process through
//! the Rust API (busybox initramfs, agent on vsock, no root disk); fork
//! children are processes of this program, restores run in it too. JSON
//! keys are documented in docs/bench.md.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::common::{kib_field, percentile, private_kib_of, Error, Report, ScratchDir, Stats};
use vmm::action::{Control, VmState};
use vmm::config::{SerialOutput, VmConfig};
use vmm::sandbox::{Forked, Sandbox};
use vmm::snapshot::RestoreOptions;

/// Options of `vmm bench fork`.
pub struct ForkBenchOptions {
    /// Guest memory sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Forks measured per size.
    pub runs: u32,
    /// Children that also write 10 MiB (memory measured before and after).
    pub write_runs: u32,
    /// When set: also fork this many children of a 1 GiB guest at once.
    pub many: Option<u32>,
}

/// Options of `vmm bench snapshot`.
pub struct SnapshotBenchOptions {
    pub sizes_mib: Vec<u64>,
    pub runs: u32,
}

/// One size's fork figures.
#[derive(Debug, Default)]
pub struct ForkSize {
    pub memory_mib: u64,
    /// Guest memory the parent had touched when forked (KiB).
    pub parent_guest_rss_kib: u64,
    /// The fork call -> its answer, which comes once every child's vCPUs
    /// run.
    pub fork_ms: Vec<f64>,
    pub parent_pause_ms: Vec<f64>,
    /// Private memory of a child right after the fork (KiB).
    pub child_private_kib: Vec<f64>,
    /// The same after the child wrote 10 MiB.
    pub child_private_after_10mib_kib: Vec<f64>,
}

/// Many children at once.
#[derive(Debug, Default)]
pub struct ManyChildren {
    pub memory_mib: u64,
    pub children: u32,
    pub fork_ms: f64,
    pub all_alive: bool,
    /// Host MemAvailable drop per child (KiB).
    pub host_kib_per_child: f64,
}

/// Results of `vmm bench fork`.
#[derive(Debug, Default)]
pub struct ForkBench {
    pub sizes: Vec<ForkSize>,
    pub many: Option<ManyChildren>,
}

/// One size's snapshot figures.
#[derive(Debug, Default)]
pub struct SnapshotSize {
    pub memory_mib: u64,
    pub create_ms: Vec<f64>,
    pub memory_file_mib: Vec<f64>,
    /// Restore started -> every vCPU thread running.
    pub restore_to_running_ms: Vec<f64>,
}

/// Results of `vmm bench snapshot`.
#[derive(Debug, Default)]
pub struct SnapshotBench {
    pub sizes: Vec<SnapshotSize>,
}

fn stats(v: &[f64]) -> Value {
    Stats::of(v).map_or(Value::Null, Stats::to_json)
}

fn r1(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl Report for ForkBench {
    fn to_json(&self) -> Value {
        let sizes: Vec<Value> = self
            .sizes
            .iter()
            .map(|s| {
                json!({
                    "memory_mib": s.memory_mib,
                    "parent_guest_rss_kib": s.parent_guest_rss_kib,
                    "fork_ms": stats(&s.fork_ms),
                    "fork_p50_ms": percentile(&s.fork_ms, 50.0).map(r1),
                    "fork_p99_ms": percentile(&s.fork_ms, 99.0).map(r1),
                    "first_fork_ms": s.fork_ms.first().map(|x| r1(*x)),
                    "parent_pause_ms": stats(&s.parent_pause_ms),
                    "child_private_kib": stats(&s.child_private_kib),
                    "child_private_after_10mib_write_kib": stats(&s.child_private_after_10mib_kib),
                })
            })
            .collect();
        let p50 = |i: usize| self.sizes.get(i).and_then(|s| percentile(&s.fork_ms, 50.0));
        let flatness = match (p50(0), p50(self.sizes.len().saturating_sub(1))) {
            (Some(small), Some(large)) if self.sizes.len() > 1 => Some(r1(large / small)),
            _ => None,
        };
        json!({
            "sizes": sizes,
            "fork_p50_largest_over_smallest": flatness,
            "many_children": self.many.as_ref().map(|m| json!({
                "memory_mib": m.memory_mib,
                "children": m.children,
                "fork_ms": r1(m.fork_ms),
                "all_alive": m.all_alive,
                "host_kib_per_child": r1(m.host_kib_per_child),
            })),
        })
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "fork benchmark\nmemory  fork p50 ms  p99 ms  first ms  pause ms  child KiB  +10MiB KiB\n",
        );
        for s in &self.sizes {
            let med = |v: &[f64]| Stats::of(v).map_or(f64::NAN, |s| s.median);
            out.push_str(&format!(
                "{:>6}  {:>11.2}  {:>6.2}  {:>8.2}  {:>8.2}  {:>9.0}  {:>10.0}\n",
                s.memory_mib,
                percentile(&s.fork_ms, 50.0).unwrap_or(f64::NAN),
                percentile(&s.fork_ms, 99.0).unwrap_or(f64::NAN),
                s.fork_ms.first().copied().unwrap_or(f64::NAN),
                med(&s.parent_pause_ms),
                med(&s.child_private_kib),
                med(&s.child_private_after_10mib_kib),
            ));
        }
        if let Some(m) = &self.many {
            out.push_str(&format!(
                "{} children of a {} MiB guest: fork {:.1} ms, all alive: {}, {:.0} KiB of host memory each\n",
                m.children, m.memory_mib, m.fork_ms, m.all_alive, m.host_kib_per_child
            ));
        }
        out
    }
}

impl Report for SnapshotBench {
    fn to_json(&self) -> Value {
        json!({
            "sizes": self.sizes.iter().map(|s| json!({
                "memory_mib": s.memory_mib,
                "create_ms": stats(&s.create_ms),
                "memory_file_mib": stats(&s.memory_file_mib),
                "restore_to_running_ms": stats(&s.restore_to_running_ms),
            })).collect::<Vec<_>>(),
        })
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "snapshot benchmark\nmemory  create ms  written MiB  restore-to-running ms\n",
        );
        for s in &self.sizes {
            let med = |v: &[f64]| Stats::of(v).map_or(f64::NAN, |s| s.median);
            out.push_str(&format!(
                "{:>6}  {:>9.1}  {:>11.1}  {:>21.2}\n",
                s.memory_mib,
                med(&s.create_ms),
                med(&s.memory_file_mib),
                med(&s.restore_to_running_ms)
            ));
        }
        out
    }
}

fn run_err(what: &'static str, run: u32) -> impl Fn(String) -> Error {
    move |detail| Error::Run { what, run, detail }
}

/// Boots a parent of `memory_mib` in this process and waits for its agent.
fn boot_parent(memory_mib: u64) -> Result<Sandbox, Error> {
    Ok(Sandbox::start_without_root_disk(VmConfig {
        memory_mib,
        serial: SerialOutput::Off,
        ..Default::default()
    })?)
}

/// Forks `count` children; returns how long the call took (ms), the
/// parent's pause (ms) and the children.
fn fork_once(parent: &Sandbox, count: u32) -> Result<(f64, f64, Vec<Forked>), String> {
    let t = Instant::now();
    let info = parent
        .machine()
        .fork(count, None)
        .map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let children = info.children.into_iter().map(Forked::from).collect();
    Ok((ms, info.parent_pause_ms, children))
}

fn exec_in(child: &Forked, script: &str) -> Result<(), String> {
    let cmd = vmm::agent::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let status = child
        .agent()
        .map_err(|e| e.to_string())?
        .exec(&cmd, None, &mut std::io::sink(), &mut std::io::sink())
        .map_err(|e| e.to_string())?;
    if status != vmm::agent::ExitStatus::Code(0) {
        return Err(format!("`{script}` failed: {status:?}"));
    }
    Ok(())
}

fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// Guest memory resident in this process (KiB): its RSS minus the rest.
fn guest_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = kib_field(&status, "VmRSS:").unwrap_or(0);
    rss.saturating_sub(vmm::memory::overhead_rss_kib().unwrap_or(0))
}

pub fn fork(opts: &ForkBenchOptions) -> Result<ForkBench, Error> {
    let mut result = ForkBench::default();
    for &mib in &opts.sizes_mib {
        let parent = boot_parent(mib)?;
        let mut size = ForkSize {
            memory_mib: mib,
            parent_guest_rss_kib: guest_rss_kib(),
            ..Default::default()
        };
        for run in 0..opts.runs {
            let err = run_err("fork", run);
            let (ms, pause_ms, mut children) = fork_once(&parent, 1).map_err(&err)?;
            size.fork_ms.push(ms);
            size.parent_pause_ms.push(pause_ms);
            let child = children
                .pop()
                .ok_or_else(|| err("the fork made no child".into()))?;
            let pid = child.info().pid;
            if let Some(kib) = private_kib_of(pid) {
                size.child_private_kib.push(kib as f64);
            }
            if run < opts.write_runs {
                exec_in(
                    &child,
                    "dd if=/dev/zero of=/tmp/bench bs=1M count=10 2>/dev/null",
                )
                .map_err(&err)?;
                if let Some(kib) = private_kib_of(pid) {
                    size.child_private_after_10mib_kib.push(kib as f64);
                }
            }
            child.stop().map_err(|e| err(e.to_string()))?;
        }
        result.sizes.push(size);
    }
    if let Some(count) = opts.many {
        let mib = 1024;
        let parent = boot_parent(mib)?;
        let before = mem_available_kib().unwrap_or(0);
        let (ms, _, children) = fork_once(&parent, count).map_err(run_err("many", 0))?;
        let all_alive = children.len() == count as usize
            && children.iter().all(|c| {
                c.control()
                    .describe()
                    .is_ok_and(|v| v.state == VmState::Running)
            });
        let after = mem_available_kib().unwrap_or(0);
        drop(children);
        result.many = Some(ManyChildren {
            memory_mib: mib,
            children: count,
            fork_ms: ms,
            all_alive,
            host_kib_per_child: before.saturating_sub(after) as f64 / f64::from(count.max(1)),
        });
    }
    Ok(result)
}

/// Restores snapshot `snap` in this process and stops it as soon as its
/// vCPUs run; how long from the start of the restore to every vCPU thread
/// running (ms), the moment a fork child reports that it started.
fn restore_to_running(snap: &Path, scratch: &ScratchDir) -> Result<f64, String> {
    let start = Instant::now();
    let opts = RestoreOptions {
        vsock_socket: scratch.path().join("restored.vsock"),
        host: Default::default(),
        key: None,
    };
    let source = vmm::snapshot::restore_source(snap, &opts).map_err(|e| e.to_string())?;
    let hv = vmm::open_hypervisor().map_err(|e| e.to_string())?;
    let vm = vmm::Vm::restore(source, hv.as_ref(), start).map_err(|e| e.to_string())?;
    let (tx, running) = std::sync::mpsc::channel();
    let run = vmm::RunOptions {
        on_started: Some(Box::new(move |machine| {
            let _ = tx.send(start.elapsed());
            // The handle's calls wait for the machine's loop, which runs
            // after this returns: stop it from another thread.
            std::thread::spawn(move || machine.stop());
        })),
        ..Default::default()
    };
    // On a thread of its own: the thread that runs a VM ends under the
    // device loop's seccomp filter, and this one has more VMs to start.
    let outcome = std::thread::scope(|s| s.spawn(|| vm.run(run)).join())
        .map_err(|_| "the restored VM's thread panicked".to_string())?
        .map_err(|e| e.to_string())?;
    running
        .try_recv()
        .map(|d| d.as_secs_f64() * 1e3)
        .map_err(|_| format!("the restored VM never ran ({})", outcome.reason))
}

pub fn snapshot(opts: &SnapshotBenchOptions) -> Result<SnapshotBench, Error> {
    let scratch = ScratchDir::new("snapshot")?;
    let mut result = SnapshotBench::default();
    for &mib in &opts.sizes_mib {
        let parent = boot_parent(mib)?;
        let mut size = SnapshotSize {
            memory_mib: mib,
            ..Default::default()
        };
        for run in 0..opts.runs {
            let err = run_err("snapshot", run);
            let snap = scratch.path().join(format!("snap-{mib}-{run}"));
            let t = Instant::now();
            let answer = parent
                .machine()
                .snapshot(&snap, None)
                .map_err(|e| err(e.to_string()))?;
            size.create_ms.push(t.elapsed().as_secs_f64() * 1e3);
            size.memory_file_mib
                .push(answer.memory_bytes as f64 / f64::from(1 << 20));
            let ms = restore_to_running(&snap, &scratch).map_err(&err)?;
            size.restore_to_running_ms.push(ms);
            let _ = std::fs::remove_dir_all(&snap);
        }
        result.sizes.push(size);
    }
    Ok(result)
}
