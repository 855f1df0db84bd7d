//! `vmm bench fork` and `vmm bench snapshot`: fork latency, parent pause
//! and memory per child; snapshot create and restore-to-running times;
//! each against guest memory size. Parents are `vmm launch` processes with
//! an API socket (busybox initramfs, agent on vsock). JSON keys are
//! documented in docs/bench.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{kib_field, private_kib_of, Error, Report, Stats};
use vmm::action::{Control, ForkInfo, VmState};
use vmm::api::ApiClient;

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
    /// Request sent -> answer received, which comes once every child's
    /// vCPUs run.
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
    /// Restore process start -> vCPU 0 running (from its report).
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

/// The p-th percentile (nearest rank) of `v`.
fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
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

/// A `vmm launch` parent with an API socket, stopped on drop.
struct ParentVm {
    process: Child,
    api: PathBuf,
}

impl Drop for ParentVm {
    fn drop(&mut self) {
        let _ = ApiClient::new(&self.api).stop();
        let _ = self.process.wait();
    }
}

fn scratch_dir(name: &str) -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Scratch {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn run_err(what: &'static str, run: u32) -> impl Fn(String) -> Error {
    move |detail| Error::Run { what, run, detail }
}

/// Starts the vmm binary (the fork children's) with `args`, no stdin or
/// stdout.
fn spawn_vmm(args: &[&std::ffi::OsStr]) -> Result<Child, Error> {
    let exe = vmm::fork::child_binary();
    Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: exe.display().to_string(),
            source,
        })
}

/// Boots a parent of `memory_mib` and waits for its agent.
fn boot_parent(dir: &Path, memory_mib: u64) -> Result<ParentVm, Error> {
    let config = dir.join(format!("vm-{memory_mib}.json"));
    std::fs::write(
        &config,
        json!({"memory_mib": memory_mib, "serial": "off"}).to_string(),
    )
    .map_err(|source| Error::Scratch {
        path: config.clone(),
        source,
    })?;
    let api = dir.join(format!("parent-{memory_mib}.sock"));
    let process = spawn_vmm(&[
        "launch".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--api-socket".as_ref(),
        api.as_os_str(),
    ])?;
    let mut parent = ParentVm { process, api };
    let client = ApiClient::new(&parent.api);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match client.wait_agent() {
            Ok(()) => return Ok(parent),
            Err(vmm::api::Error::Connect { .. }) if Instant::now() < deadline => {
                if let Ok(Some(status)) = parent.process.try_wait() {
                    return Err(run_err("boot", 0)(format!(
                        "the parent VMM exited: {status}"
                    )));
                }
            }
            Err(e) => return Err(run_err("boot", 0)(e.to_string())),
        }
    }
}

/// Forks `count` children; returns (ms, answer).
fn fork_once(api: &Path, count: u32, dir: &Path) -> Result<(f64, ForkInfo), String> {
    let t = Instant::now();
    let answer = ApiClient::new(api)
        .fork(count, Some(dir))
        .map_err(|e| e.to_string())?;
    Ok((t.elapsed().as_secs_f64() * 1e3, answer))
}

/// Stops a child VM and waits until its parent has reaped it.
fn stop_child(api: &Path, pid: u32) {
    let _ = ApiClient::new(api).stop();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while proc_dir.exists() && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

fn exec_in(api: &Path, script: &str) -> Result<(), String> {
    let client = ApiClient::new(api);
    client.wait_agent().map_err(|e| e.to_string())?;
    let uds = client.vsock_path().map_err(|e| e.to_string())?;
    let cmd = vmm::agent::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let status = vmm::agent::AgentClient::new(&uds)
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

/// Guest memory resident in process `pid` (KiB): its RSS minus the rest.
fn guest_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = kib_field(&status, "VmRSS:").unwrap_or(0);
    rss.saturating_sub(vmm::memory::overhead_rss_kib_of(&pid.to_string()).unwrap_or(0))
}

pub fn fork(opts: &ForkBenchOptions) -> Result<ForkBench, Error> {
    let dir = scratch_dir("fork")?;
    let mut result = ForkBench::default();
    for &mib in &opts.sizes_mib {
        let parent = boot_parent(&dir, mib)?;
        let mut size = ForkSize {
            memory_mib: mib,
            parent_guest_rss_kib: guest_rss_kib(parent.process.id()),
            ..Default::default()
        };
        for run in 0..opts.runs {
            let err = run_err("fork", run);
            let (ms, mut answer) = fork_once(&parent.api, 1, &dir).map_err(&err)?;
            size.fork_ms.push(ms);
            size.parent_pause_ms.push(answer.parent_pause_ms);
            let child = answer
                .children
                .pop()
                .ok_or_else(|| err("the fork made no child".into()))?;
            let (api, pid) = (child.api_socket, child.pid);
            if let Some(kib) = private_kib_of(pid) {
                size.child_private_kib.push(kib as f64);
            }
            if run < opts.write_runs {
                exec_in(
                    &api,
                    "dd if=/dev/zero of=/tmp/bench bs=1M count=10 2>/dev/null",
                )
                .map_err(&err)?;
                if let Some(kib) = private_kib_of(pid) {
                    size.child_private_after_10mib_kib.push(kib as f64);
                }
            }
            stop_child(&api, pid);
        }
        result.sizes.push(size);
    }
    if let Some(count) = opts.many {
        let mib = 1024;
        let parent = boot_parent(&dir, mib)?;
        let before = mem_available_kib().unwrap_or(0);
        let (ms, answer) = fork_once(&parent.api, count, &dir).map_err(run_err("many", 0))?;
        let children = answer.children;
        let all_alive = children.len() == count as usize
            && children.iter().all(|c| {
                ApiClient::new(&c.api_socket)
                    .describe()
                    .is_ok_and(|v| v.state == VmState::Running)
            });
        let after = mem_available_kib().unwrap_or(0);
        for c in &children {
            stop_child(&c.api_socket, c.pid);
        }
        result.many = Some(ManyChildren {
            memory_mib: mib,
            children: count,
            fork_ms: ms,
            all_alive,
            host_kib_per_child: before.saturating_sub(after) as f64 / f64::from(count.max(1)),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

pub fn snapshot(opts: &SnapshotBenchOptions) -> Result<SnapshotBench, Error> {
    let dir = scratch_dir("snapshot")?;
    let mut result = SnapshotBench::default();
    for &mib in &opts.sizes_mib {
        let parent = boot_parent(&dir, mib)?;
        let mut size = SnapshotSize {
            memory_mib: mib,
            ..Default::default()
        };
        for run in 0..opts.runs {
            let err = run_err("snapshot", run);
            let snap = dir.join(format!("snap-{mib}-{run}"));
            let t = Instant::now();
            let answer = ApiClient::new(&parent.api)
                .snapshot(&snap, None)
                .map_err(|e| err(e.to_string()))?;
            size.create_ms.push(t.elapsed().as_secs_f64() * 1e3);
            size.memory_file_mib
                .push(answer.memory_bytes as f64 / f64::from(1 << 20));
            let api = dir.join(format!("restored-{mib}-{run}.sock"));
            let report = dir.join(format!("restored-{mib}-{run}.json"));
            let mut restored = spawn_vmm(&[
                "restore".as_ref(),
                "--snapshot".as_ref(),
                snap.as_os_str(),
                "--api-socket".as_ref(),
                api.as_os_str(),
                "--report".as_ref(),
                report.as_os_str(),
            ])?;
            // The restored VM serves its API once built; stop it at once.
            let client = ApiClient::new(&api);
            let deadline = Instant::now() + Duration::from_secs(60);
            while client.stop().is_err() {
                if Instant::now() > deadline || matches!(restored.try_wait(), Ok(Some(_))) {
                    break;
                }
            }
            let status = restored.wait();
            let report: Value = std::fs::read_to_string(&report)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .ok_or_else(|| {
                    err(format!(
                        "the restored VM wrote no report (it ended: {status:?})"
                    ))
                })?;
            if let Some(ms) = report["vmm_setup_ms"].as_f64() {
                size.restore_to_running_ms.push(ms);
            }
            let _ = std::fs::remove_dir_all(&snap);
        }
        result.sizes.push(size);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
