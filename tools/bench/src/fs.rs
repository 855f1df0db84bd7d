//! `vmm bench fs`: sequential throughput and small-file metadata speed on
//! a virtio-fs share, on the virtio-blk root for reference, and on the same
//! share served by virtiofsd behind qemu's `vhost-user-fs-device` (same
//! kernel, initramfs, root image and guest script, in the same run).
//!
//! Each VM runs `fsbench.py` as its init's command and powers off; the
//! figures are the lines it prints on the console. JSON keys: docs/bench.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    microvm_cmdline, qemu_command, require_built, tail, time_to_marker, vmm_exe, Error, Report,
    Stats,
};
use vmm::artifacts::{self, KernelFlavour};
use vmm::config::{Flavour, RootfsConfig, SerialOutput, ShareConfig, VmConfig};

const SCRIPT: &str = include_str!("fsbench.py");
const DONE: &str = "fsbench-done";
const TAG: &str = "bench";
const GUEST_DIR: &str = "/mnt/bench";
const MEMORY_MIB: u64 = 512;

pub struct FsBenchOptions {
    /// MiB per sequential figure.
    pub mib: u64,
    /// Files per metadata figure.
    pub files: u32,
    /// Figures per target (in one boot).
    pub runs: u32,
    /// Also run virtiofsd + qemu.
    pub qemu: bool,
}

/// One target's figures.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub write_mibs: Vec<f64>,
    pub read_mibs: Vec<f64>,
    pub meta_files_per_s: Vec<f64>,
}

impl Figures {
    fn parse(v: &Value) -> Figures {
        Figures {
            write_mibs: Stats::list(v, "write_mibs"),
            read_mibs: Stats::list(v, "read_mibs"),
            meta_files_per_s: Stats::list(v, "meta_files_per_s"),
        }
    }

    fn medians(&self) -> [Option<f64>; 3] {
        [&self.write_mibs, &self.read_mibs, &self.meta_files_per_s].map(|v| Stats::median_of(v))
    }

    fn to_json(&self) -> Value {
        json!({
            "write_mibs": Stats::json_of(&self.write_mibs),
            "read_mibs": Stats::json_of(&self.read_mibs),
            "meta_files_per_s": Stats::json_of(&self.meta_files_per_s),
        })
    }
}

/// Results of `vmm bench fs`.
#[derive(Debug, Default)]
pub struct FsBench {
    pub mib: u64,
    pub files: u32,
    pub runs: u32,
    pub vmm_share: Figures,
    pub vmm_blk: Figures,
    pub qemu_share: Option<Figures>,
    pub qemu_skipped: Option<String>,
}

impl FsBench {
    /// ours / virtiofsd+qemu, per figure (higher is better for both).
    fn ratios(&self) -> Option<[Option<f64>; 3]> {
        let q = self.qemu_share.as_ref()?.medians();
        let v = self.vmm_share.medians();
        Some([0, 1, 2].map(|i| Some(v[i]? / q[i]?)))
    }
}

impl Report for FsBench {
    fn to_json(&self) -> Value {
        let ratio = |i: usize| self.ratios().and_then(|r| r[i]);
        json!({
            "mib": self.mib,
            "files": self.files,
            "runs": self.runs,
            "vmm_share": self.vmm_share.to_json(),
            "vmm_blk_root": self.vmm_blk.to_json(),
            "virtiofsd_qemu_share": self.qemu_share.as_ref().map(Figures::to_json),
            "vmm_vs_virtiofsd": {
                "write": ratio(0),
                "read": ratio(1),
                "meta": ratio(2),
            },
            "qemu_skipped": self.qemu_skipped,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "{} MiB sequential, {} x (create+stat+unlink), {} runs; medians\n{:<28} {:>12} {:>12} {:>14}\n",
            self.mib, self.files, self.runs, "target", "write MiB/s", "read MiB/s", "meta files/s"
        );
        let mut row = |name: &str, f: &Figures| {
            let m = f
                .medians()
                .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")));
            out.push_str(&format!(
                "{name:<28} {:>12} {:>12} {:>14}\n",
                m[0], m[1], m[2]
            ));
        };
        row("vmm virtio-fs share", &self.vmm_share);
        row("vmm virtio-blk root (ext4)", &self.vmm_blk);
        if let Some(q) = &self.qemu_share {
            row("virtiofsd + qemu share", q);
        }
        if let Some(r) = self.ratios() {
            let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
            out.push_str(&format!(
                "vmm / virtiofsd: write {}, read {}, meta {}\n",
                f(r[0]),
                f(r[1]),
                f(r[2])
            ));
        }
        if let Some(why) = &self.qemu_skipped {
            out.push_str(&format!("virtiofsd + qemu: skipped ({why})\n"));
        }
        out
    }
}

/// The guest's command: the script over each `target=dir`.
fn guest_command(opts: &FsBenchOptions, targets: &[(&str, &str)]) -> String {
    let mut cmd = format!(
        "-- python3 {GUEST_DIR}/fsbench.py {} {} {}",
        opts.mib, opts.files, opts.runs
    );
    for (name, dir) in targets {
        cmd.push_str(&format!(" {name}={dir}"));
    }
    cmd
}

/// The `fsbench` lines of a run, by target.
fn parse_lines(lines: &[String]) -> Vec<(String, Figures)> {
    lines
        .iter()
        .filter_map(|l| l.split_once("fsbench ").map(|(_, j)| j))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .map(|v| {
            (
                v["target"].as_str().unwrap_or("").to_string(),
                Figures::parse(&v),
            )
        })
        .collect()
}

fn find(results: &[(String, Figures)], target: &str) -> Option<Figures> {
    results
        .iter()
        .find(|(t, _)| t == target)
        .map(|(_, f)| f.clone())
}

/// virtiofsd from PATH, or the copy `cargo install` puts in the cache.
fn virtiofsd() -> Option<PathBuf> {
    let cached = artifacts::cache_dir().join("virtiofsd/bin/virtiofsd");
    if cached.exists() {
        return Some(cached);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.exists())
}

/// The bench's scratch folder, removed however the bench ends.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a helper process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn fs(opts: &FsBenchOptions) -> Result<FsBench, Error> {
    let hv = vmm::open_hypervisor()?;
    let flavour = KernelFlavour::resolve(Flavour::Auto, hv.kind());
    drop(hv);
    let kernel = artifacts::default_kernel(flavour);
    let initramfs = artifacts::default_minimal_initramfs();
    let base = artifacts::default_base_image();
    require_built(&[
        ("kernel", &kernel),
        ("initramfs", &initramfs),
        ("base image", &base),
    ])?;
    let guard =
        ScratchDir(std::env::temp_dir().join(format!("vmm-bench-fs-{}", std::process::id())));
    let scratch = guard.0.clone();
    let share = scratch.join("share");
    let scratch_err = |source| Error::Scratch {
        path: scratch.clone(),
        source,
    };
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&share).map_err(scratch_err)?;
    std::fs::write(share.join("fsbench.py"), SCRIPT).map_err(scratch_err)?;
    let mut result = FsBench {
        mib: opts.mib,
        files: opts.files,
        runs: opts.runs,
        ..Default::default()
    };

    // This VMM: the share and the root disk.
    let config = VmConfig {
        memory_mib: MEMORY_MIB,
        serial: SerialOutput::Stdout,
        rootfs: Some(RootfsConfig::default()),
        shares: vec![ShareConfig {
            tag: TAG.into(),
            host_path: share.clone(),
            guest_path: GUEST_DIR.into(),
            read_only: false,
        }],
        cmdline: Some(guest_command(
            opts,
            &[("share", "/mnt/bench/vmm"), ("blk", "/root/fsbench")],
        )),
        ..Default::default()
    };
    let config_path = scratch.join("vm.json");
    std::fs::write(
        &config_path,
        serde_json::to_string(&config).unwrap_or_default(),
    )
    .map_err(scratch_err)?;
    let exe = vmm_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("launch").arg("--config").arg(&config_path);
    let watched = time_to_marker(cmd, DONE, false).map_err(|source| Error::Spawn {
        program: exe.display().to_string(),
        source,
    })?;
    let results = parse_lines(&watched.lines);
    let (Some(s), Some(b)) = (find(&results, "share"), find(&results, "blk")) else {
        return Err(Error::Run {
            what: "vmm",
            run: 1,
            detail: format!("no figures; console:\n{}", tail(&watched.lines)),
        });
    };
    result.vmm_share = s;
    result.vmm_blk = b;

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
    } else if let Some(daemon) = virtiofsd() {
        result.qemu_share = Some(run_qemu(
            opts, &daemon, &scratch, &share, &kernel, &initramfs, &base, flavour,
        )?);
    } else {
        result.qemu_skipped = Some(
            "virtiofsd is not installed (cargo install --root ~/.cache/vmm/virtiofsd virtiofsd; needs libseccomp-dev libcap-ng-dev)"
                .into(),
        );
    }
    Ok(result)
}

#[allow(clippy::too_many_arguments)]
fn run_qemu(
    opts: &FsBenchOptions,
    daemon: &Path,
    scratch: &Path,
    share: &Path,
    kernel: &Path,
    initramfs: &Path,
    base: &Path,
    flavour: KernelFlavour,
) -> Result<Figures, Error> {
    let socket = scratch.join("virtiofsd.sock");
    let spawn_err = |program: &str| {
        let program = program.to_string();
        move |source| Error::Spawn { program, source }
    };
    let _daemon = Killed(
        Command::new(daemon)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(share)
            .args(["--cache", "auto", "--sandbox", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(spawn_err("virtiofsd"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(Error::Run {
                what: "virtiofsd",
                run: 1,
                detail: format!("{} did not appear", socket.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra = format!(
        "VMM_SHARES={TAG}:{GUEST_DIR} {}",
        guest_command(opts, &[("share", "/mnt/bench/qemu")])
    );
    let cmdline = microvm_cmdline(flavour, extra);
    let mut cmd = qemu_command(kernel, initramfs, &cmdline, MEMORY_MIB);
    let size = format!("{MEMORY_MIB}M");
    cmd.args(["-object"])
        .arg(format!("memory-backend-memfd,id=mem,size={size},share=on"))
        .args(["-machine", "memory-backend=mem,auto-kernel-cmdline=off"])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            base.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", socket.display()))
        .args([
            "-device",
            &format!("vhost-user-fs-device,chardev=vfs,tag={TAG},queue-size=1024"),
        ]);
    let watched = time_to_marker(cmd, DONE, true).map_err(spawn_err("qemu-system-x86_64"))?;
    find(&parse_lines(&watched.lines), "share").ok_or_else(|| Error::Run {
        what: "qemu",
        run: 1,
        detail: format!("no figures; console:\n{}", tail(&watched.lines)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_the_console_lines() {
        let lines = vec![
            "noise".to_string(),
            r#"fsbench {"target": "share", "write_mibs": [2.0, 4.0], "read_mibs": [8.0], "meta_files_per_s": [100.0]}"#.to_string(),
            "[   1.0] fsbench {\"target\": \"blk\", \"write_mibs\": [1.0]}".to_string(),
        ];
        let r = parse_lines(&lines);
        let share = find(&r, "share").unwrap();
        assert_eq!(share.write_mibs, vec![2.0, 4.0]);
        assert_eq!(share.medians()[2], Some(100.0));
        assert_eq!(find(&r, "blk").unwrap().write_mibs, vec![1.0]);
        assert!(find(&r, "other").is_none());
    }
}
