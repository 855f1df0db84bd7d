//! `vmm bench`: boot-time benchmark against qemu microvm, and the launch
//! report it reads.
//!
//! Each boot is a fresh `vmm launch` process, so "process start" is real.
//! JSON keys are documented in docs/bench.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use vmm::artifacts::{self, KernelFlavour};
use vmm::config::{Flavour, SerialOutput, VmConfig};

/// The line the guest init prints when it starts (after the boot-timer write).
pub const INIT_READY_MARKER: &str = "vmm-init: ready";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the hypervisor: {0}")]
    Hypervisor(#[from] vmm::vm::Error),
    #[error("the default {what} is not built ({path} is missing): run tools/setup.sh first")]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} run {run} failed: {detail}")]
    Run {
        what: &'static str,
        run: u32,
        detail: String,
    },
    #[error("cannot use the scratch directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A benchmark's results: machine-readable and readable.
pub trait Report {
    fn to_json(&self) -> Value;
    fn table(&self) -> String;
}

/// Memory only process `pid` uses (Private_Clean + Private_Dirty, KiB):
/// for a fork child, its own VMM memory plus the guest pages it changed.
pub fn private_kib_of(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(kib_field(&rollup, "Private_Clean:")? + kib_field(&rollup, "Private_Dirty:")?)
}

/// The number after `name` in a /proc file of `Name: N kB` lines.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Median, min and max of a series, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// The numbers in the array at `key` of `v`.
    pub fn list(v: &Value, key: &str) -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    }

    pub fn median_of(values: &[f64]) -> Option<f64> {
        Stats::of(values).map(|s| s.median)
    }

    /// `{"median","min","max"}` of `values`, null when empty.
    pub fn json_of(values: &[f64]) -> Value {
        Stats::of(values).map_or(Value::Null, Stats::to_json)
    }

    pub fn to_json(self) -> Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({"median": r(self.median), "min": r(self.min), "max": r(self.max)})
    }
}

pub struct BootBenchOptions {
    pub runs: u32,
    pub memory_mib: u64,
    pub qemu: bool,
}

/// Results of `vmm bench boot`.
#[derive(Debug, Default)]
pub struct BootBench {
    pub runs: u32,
    pub memory_mib: u64,
    pub flavour: String,
    pub kernel: PathBuf,
    pub vmm_setup_ms: Vec<f64>,
    pub boot_to_init_ms: Vec<f64>,
    pub vmm_spawn_to_ready_ms: Vec<f64>,
    pub vmm_overhead_rss_kib: Vec<f64>,
    pub qemu_boot_to_init_ms: Vec<f64>,
    /// Why there is no qemu figure, when there is none.
    pub qemu_skipped: Option<String>,
}

impl Report for BootBench {
    fn to_json(&self) -> Value {
        let stats = |v: &[f64]| Stats::of(v).map(Stats::to_json);
        let ratio = match (
            Stats::of(&self.vmm_spawn_to_ready_ms),
            Stats::of(&self.qemu_boot_to_init_ms),
        ) {
            (Some(v), Some(q)) => Some(((v.median / q.median) * 1000.0).round() / 1000.0),
            _ => None,
        };
        json!({
            "runs": self.runs,
            "memory_mib": self.memory_mib,
            "kernel_flavour": self.flavour,
            "kernel": self.kernel,
            "vmm_setup_ms": stats(&self.vmm_setup_ms),
            "boot_to_init_ms": stats(&self.boot_to_init_ms),
            "vmm_spawn_to_ready_ms": stats(&self.vmm_spawn_to_ready_ms),
            "vmm_overhead_rss_kib": stats(&self.vmm_overhead_rss_kib),
            "qemu_boot_to_init_ms": stats(&self.qemu_boot_to_init_ms),
            "vmm_vs_qemu_ratio": ratio,
            "qemu_skipped": self.qemu_skipped,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "boot benchmark: {} runs, {} MiB, {} kernel\n{:<34} {:>10} {:>10} {:>10}\n",
            self.runs, self.memory_mib, self.flavour, "metric", "median", "min", "max"
        );
        let rows: [(&str, &[f64]); 5] = [
            ("vmm_setup_ms", &self.vmm_setup_ms),
            ("boot_to_init_ms", &self.boot_to_init_ms),
            ("vmm_spawn_to_ready_ms", &self.vmm_spawn_to_ready_ms),
            ("qemu_boot_to_init_ms", &self.qemu_boot_to_init_ms),
            ("vmm_overhead_rss_kib", &self.vmm_overhead_rss_kib),
        ];
        for (name, values) in rows {
            match Stats::of(values) {
                Some(s) => out.push_str(&format!(
                    "{name:<34} {:>10.1} {:>10.1} {:>10.1}\n",
                    s.median, s.min, s.max
                )),
                None => out.push_str(&format!("{name:<34} {:>10}\n", "-")),
            }
        }
        if let Some(r) = self.to_json()["vmm_vs_qemu_ratio"].as_f64() {
            out.push_str(&format!("vmm / qemu boot (spawn to init line): {r:.3}\n"));
        }
        if let Some(why) = &self.qemu_skipped {
            out.push_str(&format!("qemu: skipped ({why})\n"));
        }
        out
    }
}

/// Fails with the setup hint when an artifact the setup command builds is
/// missing.
pub(crate) fn require_built(files: &[(&'static str, &PathBuf)]) -> Result<(), Error> {
    match files.iter().find(|(_, path)| !path.exists()) {
        Some((what, path)) => Err(Error::Missing {
            what,
            path: (*path).clone(),
        }),
        None => Ok(()),
    }
}

/// The `vmm` binary the benches start VMs with: `VMM_BIN`, else the one
/// next to this program (`vmm bench` runs the `vmm-bench` beside it).
pub(crate) fn vmm_exe() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("VMM_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Spawn {
        program: "vmm".into(),
        source,
    })?;
    Ok(exe.with_file_name("vmm"))
}

/// Longest a single boot may take before the bench gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// What `time_to_marker` saw of a run.
pub(crate) struct Watched {
    /// Spawn to the first stdout line holding the marker.
    pub seen: Option<Duration>,
    /// The process exited successfully.
    pub success: bool,
    /// Every stdout line.
    pub lines: Vec<String>,
}

/// Runs `cmd`, returns the time from spawn to the first stdout line holding
/// `marker`, whether the process exited successfully and its output. With
/// `kill_at_marker` the process is killed once the marker is seen (qemu's
/// reset path sometimes spins on this host after the guest's reboot; the
/// figure is taken by then). A run past `RUN_TIMEOUT` is killed.
pub(crate) fn time_to_marker(
    mut cmd: Command,
    marker: &str,
    kill_at_marker: bool,
) -> std::io::Result<Watched> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(RUN_TIMEOUT).is_err() {
            // SAFETY: kill(2) on our child, which is not reaped before the
            // watchdog is told the run finished.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut seen = None;
    let mut lines = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            let found = seen.is_none() && line.contains(marker);
            lines.push(line);
            if found {
                seen = Some(start.elapsed());
                if kill_at_marker {
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let status = child.wait();
    let _ = done.send(());
    let _ = watchdog.join();
    Ok(Watched {
        seen,
        success: status?.success(),
        lines,
    })
}

/// The last 20 console lines (for an error).
pub(crate) fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The kernel command line of a qemu microvm guest with `extra` (which may
/// end with the guest's command, `-- ...`). qemu would append its
/// virtio-mmio devices after that command, where the kernel no longer reads
/// them: all eight microvm transports (0xfeb00000 + 512 * i, IRQ 5 + i
/// without ACPI) are named before it instead; empty ones are skipped by
/// the guest. Use with `-machine auto-kernel-cmdline=off`.
pub(crate) fn microvm_cmdline(flavour: KernelFlavour, extra: String) -> String {
    let transports: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000 + 512 * i,
                5 + i
            )
        })
        .collect();
    vmm::vm::kernel_cmdline(
        &vmm::config::VmConfig {
            cmdline: Some(extra),
            ..Default::default()
        },
        flavour,
        &transports,
    )
}

pub(crate) fn qemu_command(
    kernel: &Path,
    initramfs: &Path,
    cmdline: &str,
    memory_mib: u64,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        // Without the ARCH_CAPABILITIES MSR: PVM hosts refuse qemu's write of
        // it (and it is not needed for a boot benchmark).
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
    ])
    .arg(memory_mib.to_string())
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(cmdline);
    cmd
}

/// Boots the default kernel and initramfs `runs` times under this VMM and
/// (when installed) under qemu microvm.
pub fn boot(opts: &BootBenchOptions) -> Result<BootBench, Error> {
    let hv = vmm::open_hypervisor()?;
    let flavour = KernelFlavour::resolve(Flavour::Auto, hv.kind());
    drop(hv);
    let kernel = artifacts::default_kernel(flavour);
    // The init alone: it writes the boot timer, prints its line, powers off.
    let initramfs = artifacts::default_minimal_initramfs();
    require_built(&[("kernel", &kernel), ("initramfs", &initramfs)])?;
    let scratch = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| Error::Scratch {
        path: scratch.clone(),
        source,
    })?;
    let config = VmConfig {
        memory_mib: opts.memory_mib,
        kernel: Some(kernel.clone()),
        initramfs: Some(initramfs.clone()),
        serial: SerialOutput::Stdout,
        ..Default::default()
    };
    let config_path = scratch.join("vm.json");
    let report_path = scratch.join("report.json");
    let scratch_err = |source| Error::Scratch {
        path: scratch.clone(),
        source,
    };
    std::fs::write(
        &config_path,
        serde_json::to_string(&config).unwrap_or_default(),
    )
    .map_err(scratch_err)?;
    let exe = vmm_exe()?;

    let mut result = BootBench {
        runs: opts.runs,
        memory_mib: opts.memory_mib,
        flavour: flavour.name().into(),
        kernel: kernel.clone(),
        ..Default::default()
    };
    for run in 1..=opts.runs {
        let _ = std::fs::remove_file(&report_path);
        let mut cmd = Command::new(&exe);
        cmd.arg("launch")
            .arg("--config")
            .arg(&config_path)
            .arg("--report")
            .arg(&report_path);
        let watched =
            time_to_marker(cmd, INIT_READY_MARKER, false).map_err(|source| Error::Spawn {
                program: exe.display().to_string(),
                source,
            })?;
        let (ready, ok) = (watched.seen, watched.success);
        let report: Value = std::fs::read_to_string(&report_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let (Some(setup), Some(init), Some(ready), true) = (
            report["vmm_setup_ms"].as_f64(),
            report["boot_to_init_ms"].as_f64(),
            ready,
            ok,
        ) else {
            return Err(Error::Run {
                what: "vmm",
                run,
                detail: format!("no complete boot (report: {report})"),
            });
        };
        result.vmm_setup_ms.push(setup);
        result.boot_to_init_ms.push(init);
        result
            .vmm_spawn_to_ready_ms
            .push(ready.as_secs_f64() * 1000.0);
        if let Some(rss) = report["vmm_overhead_rss_kib"].as_f64() {
            result.vmm_overhead_rss_kib.push(rss);
        }
    }

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
    } else {
        let cmdline = vmm::vm::kernel_cmdline(&VmConfig::default(), flavour, &[]);
        for run in 1..=opts.runs {
            let cmd = qemu_command(&kernel, &initramfs, &cmdline, opts.memory_mib);
            match time_to_marker(cmd, INIT_READY_MARKER, true) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    result.qemu_skipped = Some(
                        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
                            .into(),
                    );
                    break;
                }
                Err(source) => {
                    return Err(Error::Spawn {
                        program: "qemu-system-x86_64".into(),
                        source,
                    })
                }
                Ok(Watched { seen: Some(t), .. }) => {
                    result.qemu_boot_to_init_ms.push(t.as_secs_f64() * 1000.0)
                }
                Ok(Watched { seen: None, .. }) => {
                    return Err(Error::Run {
                        what: "qemu",
                        run,
                        detail: format!("the guest never printed \"{INIT_READY_MARKER}\""),
                    })
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_series() {
        let s = Stats::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(Stats::of(&[4.0, 2.0]).unwrap().median, 3.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn overhead_rss_reads_this_process() {
        let kib = vmm::memory::overhead_rss_kib().unwrap();
        assert!(kib > 0);
    }
}

/// Options of `vmm bench agent`.
pub struct AgentBenchOptions {
    /// Round trips measured for ping and exec.
    pub runs: u32,
    /// MiB moved per throughput measurement.
    pub mib: u64,
}

/// Results of `vmm bench agent` (milliseconds and MiB/s).
#[derive(Debug, Default)]
pub struct AgentBench {
    pub boot_to_agent_ms: f64,
    pub ping_ms: Vec<f64>,
    pub exec_true_ms: Vec<f64>,
    pub host_to_guest_mib_s: f64,
    pub guest_to_host_mib_s: f64,
    pub blk_write_mib_s: Option<f64>,
    pub blk_read_mib_s: Option<f64>,
    pub mib: u64,
}

/// Parses the elapsed seconds out of GNU dd's summary line
/// ("... copied, 1.23 s, 54.5 MB/s").
fn dd_seconds(stderr: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.contains("copied"))?;
    let before = line.split(" s,").next()?;
    before.rsplit(", ").next()?.trim().parse().ok()
}

impl Report for AgentBench {
    fn to_json(&self) -> Value {
        let stats = |v: &[f64]| Stats::of(v).map(Stats::to_json);
        let r = |x: f64| (x * 10.0).round() / 10.0;
        json!({
            "boot_to_agent_ms": r(self.boot_to_agent_ms),
            "agent_ping_ms": stats(&self.ping_ms),
            "exec_true_ms": stats(&self.exec_true_ms),
            "vsock_host_to_guest_mib_s": r(self.host_to_guest_mib_s),
            "vsock_guest_to_host_mib_s": r(self.guest_to_host_mib_s),
            "blk_seq_write_mib_s": self.blk_write_mib_s.map(r),
            "blk_seq_read_mib_s": self.blk_read_mib_s.map(r),
            "transfer_mib": self.mib,
        })
    }

    fn table(&self) -> String {
        let j = self.to_json();
        let mut out = String::from("agent benchmark\n");
        for (k, v) in j.as_object().into_iter().flatten() {
            out.push_str(&format!("{k:<28} {v}\n"));
        }
        out
    }
}

/// Boots a sandbox (default root disk, vsock) and measures the agent path.
pub fn agent(opts: &AgentBenchOptions) -> Result<AgentBench, vmm::sandbox::Error> {
    use std::io::Cursor;
    use vmm::agent::Exec;
    let exec = |argv: &[&str]| Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let start = Instant::now();
    let sandbox = vmm::sandbox::Sandbox::start(VmConfig {
        memory_mib: 256,
        ..Default::default()
    })?;
    let mut result = AgentBench {
        boot_to_agent_ms: start.elapsed().as_secs_f64() * 1000.0,
        mib: opts.mib,
        ..Default::default()
    };
    let agent = sandbox.agent();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for _ in 0..opts.runs {
        let t = Instant::now();
        agent.ping()?;
        result.ping_ms.push(ms(t));
    }
    for _ in 0..opts.runs {
        let t = Instant::now();
        agent.exec(
            &exec(&["true"]),
            None,
            &mut std::io::sink(),
            &mut std::io::sink(),
        )?;
        result.exec_true_ms.push(ms(t));
    }
    let bytes = opts.mib << 20;
    let data = vec![0x5au8; bytes as usize];
    let t = Instant::now();
    agent.exec(
        &exec(&["sh", "-c", "cat > /dev/null"]),
        Some(Box::new(Cursor::new(data))),
        &mut std::io::sink(),
        &mut std::io::sink(),
    )?;
    result.host_to_guest_mib_s = opts.mib as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let count = format!("head -c {bytes} /dev/zero");
    agent.exec(
        &exec(&["sh", "-c", &count]),
        None,
        &mut std::io::sink(),
        &mut std::io::sink(),
    )?;
    result.guest_to_host_mib_s = opts.mib as f64 / t.elapsed().as_secs_f64();
    let dd = |script: &str| -> Result<Option<f64>, vmm::sandbox::Error> {
        let mut err = Vec::new();
        agent.exec(
            &exec(&["sh", "-c", script]),
            None,
            &mut std::io::sink(),
            &mut err,
        )?;
        Ok(dd_seconds(&String::from_utf8_lossy(&err)).map(|s| opts.mib as f64 / s))
    };
    result.blk_write_mib_s = dd(&format!(
        "dd if=/dev/zero of=/root/bench.bin bs=1M count={} conv=fsync",
        opts.mib
    ))?;
    result.blk_read_mib_s =
        dd("sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/root/bench.bin of=/dev/null bs=1M")?;
    sandbox.stop()?;
    Ok(result)
}

#[cfg(test)]
mod agent_bench_tests {
    use super::*;

    #[test]
    fn dd_summary_is_parsed() {
        let s = "64+0 records in\n64+0 records out\n67108864 bytes (67 MB, 64 MiB) copied, 1.23 s, 54.5 MB/s\n";
        assert_eq!(dd_seconds(s), Some(1.23));
        assert_eq!(dd_seconds("nothing"), None);
    }
}
