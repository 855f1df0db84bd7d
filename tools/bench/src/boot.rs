//! `vmm bench boot`: VMM setup and boot to the guest's init, each boot a
//! fresh `vmm launch` process (so process start is real), against qemu
//! microvm with the same kernel and initramfs. JSON keys: docs/bench.md.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::common::{
    launch_to_marker, qemu_command, qemu_spawn_error, qemu_to_marker, Error, GuestArtifacts,
    Report, ScratchDir, Stats, Watched,
};
use vmm::config::{SerialOutput, VmConfig};

/// The line the guest init prints when it starts (after the boot-timer write).
pub const INIT_READY_MARKER: &str = "vmm-init: ready";

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
        let ratio = median_ratio(&self.vmm_spawn_to_ready_ms, &self.qemu_boot_to_init_ms);
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

/// median(a) / median(b), to three places.
pub fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let (a, b) = (Stats::of(a)?, Stats::of(b)?);
    Some(((a.median / b.median) * 1000.0).round() / 1000.0)
}

/// One boot's figures.
pub struct OneBoot {
    pub setup_ms: f64,
    pub init_ms: f64,
    pub ready_ms: f64,
    pub rss_kib: Option<f64>,
}

/// Launches `config` to the init's line and reads its report.
pub fn boot_once(config: &VmConfig, scratch: &ScratchDir, run: u32) -> Result<OneBoot, Error> {
    let report_path = scratch.path().join("report.json");
    let _ = std::fs::remove_file(&report_path);
    let extra = ["--report".as_ref(), report_path.as_os_str()];
    let watched = launch_to_marker(config, scratch, &extra, INIT_READY_MARKER)?;
    let report: Value = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let (Some(setup_ms), Some(init_ms), Some(ready), true) = (
        report["vmm_setup_ms"].as_f64(),
        report["boot_to_init_ms"].as_f64(),
        watched.seen,
        watched.success,
    ) else {
        return Err(Error::Run {
            what: "vmm",
            run,
            detail: format!("no complete boot (report: {report})"),
        });
    };
    Ok(OneBoot {
        setup_ms,
        init_ms,
        ready_ms: ready.as_secs_f64() * 1000.0,
        rss_kib: report["vmm_overhead_rss_kib"].as_f64(),
    })
}

/// Boots the default kernel and initramfs `runs` times under this VMM and
/// (when installed) under qemu microvm.
pub fn boot(opts: &BootBenchOptions) -> Result<BootBench, Error> {
    // The init alone: it writes the boot timer, prints its line, powers off.
    let guest = GuestArtifacts::resolve(false)?;
    let scratch = ScratchDir::new("boot")?;
    let config = VmConfig {
        memory_mib: opts.memory_mib,
        kernel: Some(guest.kernel.clone()),
        initramfs: Some(guest.initramfs.clone()),
        serial: SerialOutput::Stdout,
        ..Default::default()
    };
    let mut result = BootBench {
        runs: opts.runs,
        memory_mib: opts.memory_mib,
        flavour: guest.flavour.name().into(),
        kernel: guest.kernel.clone(),
        ..Default::default()
    };
    for run in 1..=opts.runs {
        let b = boot_once(&config, &scratch, run)?;
        result.vmm_setup_ms.push(b.setup_ms);
        result.boot_to_init_ms.push(b.init_ms);
        result.vmm_spawn_to_ready_ms.push(b.ready_ms);
        result.vmm_overhead_rss_kib.extend(b.rss_kib);
    }

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
    } else {
        let cmdline = vmm::vm::kernel_cmdline(&VmConfig::default(), guest.flavour, &[]);
        for run in 1..=opts.runs {
            let cmd = qemu_command(&guest, &cmdline, opts.memory_mib);
            match qemu_to_marker(cmd, INIT_READY_MARKER) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    result.qemu_skipped = Some(
                        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
                            .into(),
                    );
                    break;
                }
                Err(source) => return Err(qemu_spawn_error(source)),
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
    Ok(result)
}
