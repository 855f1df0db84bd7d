//! What the benchmarks share: errors and reports, statistics and tables,
//! the default guest's artifacts, scratch folders, timing a process to a
//! console line, and the qemu microvm commands the comparisons run.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use vmm::artifacts::{self, KernelFlavour};
use vmm::config::{Flavour, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the hypervisor: {0}")]
    Hypervisor(#[from] vmm::vm::Error),
    #[error(transparent)]
    Sandbox(#[from] vmm::sandbox::Error),
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
    #[error("cannot encode the VM config: {0} (a bug, please report it)")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// A guest that printed no figures (`what`: the VMM that ran it).
    pub fn no_figures(what: &'static str, watched: &Watched) -> Error {
        Error::Run {
            what,
            run: 1,
            detail: format!("no figures; console:\n{}", tail(&watched.lines)),
        }
    }
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

/// The p-th percentile (nearest rank) of `v`.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
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

/// One target's figures: a series of values for each of `N` figures, in
/// the order of the keys the caller names them by.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures<const N: usize>(pub [Vec<f64>; N]);

impl<const N: usize> Default for Figures<N> {
    fn default() -> Self {
        Figures(std::array::from_fn(|_| Vec::new()))
    }
}

impl<const N: usize> Figures<N> {
    /// The arrays at `keys` of `v` (the JSON a guest script printed).
    pub fn parse(v: &Value, keys: [&str; N]) -> Self {
        Figures(keys.map(|k| Stats::list(v, k)))
    }

    pub fn medians(&self) -> [Option<f64>; N] {
        std::array::from_fn(|i| Stats::median_of(&self.0[i]))
    }

    /// `{key: {"median","min","max"}}` for each figure.
    pub fn to_json(&self, keys: [&str; N]) -> Value {
        let fields = keys
            .iter()
            .zip(&self.0)
            .map(|(k, v)| (k.to_string(), Stats::json_of(v)));
        Value::Object(fields.collect())
    }
}

/// A figure with two decimals, "-" when there is none.
pub fn two_decimals(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}"))
}

/// A figure with one decimal, "-" when there is none.
pub fn one_decimal(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.1}"))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `{"p50","p99","n"}` of a series (two decimals), null when it is empty.
pub fn p50_p99(v: &[f64]) -> Value {
    match (percentile(v, 50.0), percentile(v, 99.0)) {
        (Some(p50), Some(p99)) => json!({"p50": round2(p50), "p99": round2(p99), "n": v.len()}),
        _ => Value::Null,
    }
}

/// The ratio of two series' medians (p50), two decimals.
pub fn p50_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    Some(round2(percentile(a, 50.0)? / percentile(b, 50.0)?))
}

/// A text table of medians: a title line, a header, one row per target.
pub struct MedianTable {
    out: String,
    widths: Vec<usize>,
}

impl MedianTable {
    /// `columns`: (heading, width); the first is the targets' names
    /// (left-aligned), the others figures (right-aligned).
    pub fn new(title: &str, columns: &[(&str, usize)]) -> Self {
        let mut table = MedianTable {
            out: format!("{title}\n"),
            widths: columns.iter().map(|&(_, w)| w).collect(),
        };
        let headings: Vec<String> = columns.iter().map(|&(h, _)| h.to_string()).collect();
        table.cells(&headings);
        table
    }

    pub fn row(&mut self, name: &str, medians: &[Option<f64>]) {
        let mut cells = vec![name.to_string()];
        cells.extend(medians.iter().map(|&m| two_decimals(m)));
        self.cells(&cells);
    }

    fn cells(&mut self, cells: &[String]) {
        let mut line = Vec::with_capacity(cells.len());
        for (i, (cell, width)) in cells.iter().zip(&self.widths).enumerate() {
            line.push(match i {
                0 => format!("{cell:<width$}"),
                _ => format!("{cell:>width$}"),
            });
        }
        self.out.push_str(&line.join(" "));
        self.out.push('\n');
    }

    /// A line of its own under the rows.
    pub fn note(&mut self, line: &str) {
        self.out.push_str(line);
        self.out.push('\n');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The default guest the benchmarks boot: the kernel of the flavour this
/// host needs, the minimal initramfs and the base image.
pub struct GuestArtifacts {
    pub flavour: KernelFlavour,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub base: PathBuf,
}

impl GuestArtifacts {
    /// Finds them; fails with the setup hint when one is not built (the
    /// base image only matters `with_base`).
    pub fn resolve(with_base: bool) -> Result<Self, Error> {
        let hv = vmm::open_hypervisor()?;
        let flavour = KernelFlavour::resolve(Flavour::Auto, hv.kind());
        drop(hv);
        let guest = GuestArtifacts {
            flavour,
            kernel: artifacts::default_kernel(flavour),
            initramfs: artifacts::default_minimal_initramfs(),
            base: artifacts::default_base_image(),
        };
        let mut needed = vec![("kernel", &guest.kernel), ("initramfs", &guest.initramfs)];
        if with_base {
            needed.push(("base image", &guest.base));
        }
        match needed.into_iter().find(|(_, path)| !path.exists()) {
            Some((what, path)) => Err(Error::Missing {
                what,
                path: path.clone(),
            }),
            None => Ok(guest),
        }
    }
}

/// A fresh scratch folder under the temporary directory, removed however
/// the bench ends.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `vmm-bench-NAME-PID`, emptied if it was left over.
    pub fn new(name: &str) -> Result<ScratchDir, Error> {
        let dir = std::env::temp_dir().join(format!("vmm-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Scratch {
            path: dir.clone(),
            source,
        })?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` into file `name` of the folder; its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf, Error> {
        let path = self.0.join(name);
        std::fs::write(&path, contents).map_err(|source| Error::Scratch {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `vmm` binary the benches start VMs with: `VMM_BIN`, else the one
/// next to this program (`vmm bench` runs the `vmm-bench` beside it).
pub fn vmm_exe() -> Result<PathBuf, Error> {
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
pub struct Watched {
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
fn time_to_marker(
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

/// `vmm launch --config vm.json` (`config` written into `scratch`) with
/// `extra` arguments, its console on standard output: what it printed and
/// how long to the first line holding `marker`. The VMM runs as users run
/// it, process start included.
pub fn launch_to_marker(
    config: &VmConfig,
    scratch: &ScratchDir,
    extra: &[&OsStr],
    marker: &str,
) -> Result<Watched, Error> {
    let config_path = scratch.write("vm.json", serde_json::to_string(config)?)?;
    let exe = vmm_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("launch")
        .arg("--config")
        .arg(&config_path)
        .args(extra);
    time_to_marker(cmd, marker, false).map_err(|source| Error::Spawn {
        program: exe.display().to_string(),
        source,
    })
}

/// Runs qemu `cmd` to the first console line holding `marker`, then kills
/// it. A qemu that is not installed is an error of kind NotFound.
pub fn qemu_to_marker(cmd: Command, marker: &str) -> std::io::Result<Watched> {
    time_to_marker(cmd, marker, true)
}

/// The error for qemu that could not be started.
pub fn qemu_spawn_error(source: std::io::Error) -> Error {
    Error::Spawn {
        program: "qemu-system-x86_64".into(),
        source,
    }
}

/// The last 20 console lines (for an error).
fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// qemu microvm booting `guest`'s kernel and initramfs with `memory_mib`
/// and kernel command line `cmdline`, its console on standard output.
pub fn qemu_command(guest: &GuestArtifacts, cmdline: &str, memory_mib: u64) -> Command {
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
    .arg(&guest.kernel)
    .arg("-initrd")
    .arg(&guest.initramfs)
    .arg("-append")
    .arg(cmdline);
    cmd
}

/// [`qemu_command`] with `guest`'s base image as a throwaway root disk
/// and `extra` (which may end with the guest's command, `-- ...`) on our
/// kernel command line. qemu would append its virtio-mmio devices after
/// that command, where the kernel no longer reads them: all eight microvm
/// transports (0xfeb00000 + 512 * i, IRQ 5 + i without ACPI) are named
/// before it instead (empty ones are skipped by the guest), and qemu's own
/// additions are turned off.
pub fn qemu_with_root_disk(guest: &GuestArtifacts, extra: String, memory_mib: u64) -> Command {
    let transports: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "virtio_mmio.device=512@{:#x}:{}",
                0xfeb0_0000 + 512 * i,
                5 + i
            )
        })
        .collect();
    let config = VmConfig {
        cmdline: Some(extra),
        ..Default::default()
    };
    let cmdline = vmm::vm::kernel_cmdline(&config, guest.flavour, &transports);
    let mut cmd = qemu_command(guest, &cmdline, memory_mib);
    cmd.args(["-machine", "auto-kernel-cmdline=off"])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            guest.base.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"]);
    cmd
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
    fn figures_and_their_table() {
        let v = json!({"a": [1.0, 3.0], "b": []});
        let f = Figures::parse(&v, ["a", "b"]);
        assert_eq!(f.medians(), [Some(2.0), None]);
        assert_eq!(f.to_json(["x", "y"])["x"]["median"], 2.0);
        assert!(f.to_json(["x", "y"])["y"].is_null());
        let mut t = MedianTable::new("title", &[("target", 6), ("a", 5), ("b", 3)]);
        t.row("vmm", &f.medians());
        t.note("end");
        assert_eq!(
            t.finish(),
            "title\ntarget     a   b\nvmm     2.00   -\nend\n"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn overhead_rss_reads_this_process() {
        let kib = vmm::memory::overhead_rss_kib().unwrap();
        assert!(kib > 0);
    }
}
