//! `vmm bench fs`: sequential throughput and small-file metadata speed on
//! a virtio-fs share, on the virtio-blk root for reference, and on the same
//! share behind qemu's `vhost-user-fs-device`, served by virtiofsd and by
//! our own daemon (`vmm device fs`) (same kernel, initramfs, root image
//! and guest script, in the same run).
//!
//! Each VM runs `fsbench.py` as its init's command and powers off; the
//! figures are the lines it prints on the console. JSON keys: docs/bench.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    launch_to_marker, qemu_spawn_error, qemu_to_marker, qemu_with_root_disk, two_decimals, vmm_exe,
    Error, Figures, GuestArtifacts, MedianTable, Report, ScratchDir,
};
use vmm::artifacts;
use vmm::config::{RootfsConfig, SerialOutput, ShareConfig, VmConfig};

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
    /// Also run the share behind qemu: virtiofsd and `vmm device fs`.
    pub qemu: bool,
}

/// A target's figures, as the guest script prints them and in JSON:
/// write and read MiB/s, files created+stat'ed+unlinked per second.
const KEYS: [&str; 3] = ["write_mibs", "read_mibs", "meta_files_per_s"];

/// Results of `vmm bench fs`.
#[derive(Debug, Default)]
pub struct FsBench {
    pub mib: u64,
    pub files: u32,
    pub runs: u32,
    pub vmm_share: Figures<3>,
    pub vmm_blk: Figures<3>,
    pub qemu_share: Option<Figures<3>>,
    pub qemu_skipped: Option<String>,
    /// `vmm device fs` behind the same qemu.
    pub device_share: Option<Figures<3>>,
}

impl FsBench {
    /// `ours` / virtiofsd+qemu, per figure (higher is better for both).
    fn ratios(&self, ours: Option<&Figures<3>>) -> Option<[Option<f64>; 3]> {
        let q = self.qemu_share.as_ref()?.medians();
        let v = ours?.medians();
        Some([0, 1, 2].map(|i| Some(v[i]? / q[i]?)))
    }
}

impl Report for FsBench {
    fn to_json(&self) -> Value {
        let ratio = |i: usize| self.ratios(Some(&self.vmm_share)).and_then(|r| r[i]);
        let device = |i: usize| self.ratios(self.device_share.as_ref()).and_then(|r| r[i]);
        json!({
            "mib": self.mib,
            "files": self.files,
            "runs": self.runs,
            "vmm_share": self.vmm_share.to_json(KEYS),
            "vmm_blk_root": self.vmm_blk.to_json(KEYS),
            "virtiofsd_qemu_share": self.qemu_share.as_ref().map(|q| q.to_json(KEYS)),
            "vmm_vs_virtiofsd": {
                "write": ratio(0),
                "read": ratio(1),
                "meta": ratio(2),
            },
            "vmm_device_qemu_share": self.device_share.as_ref().map(|q| q.to_json(KEYS)),
            "device_vs_virtiofsd": {
                "write": device(0),
                "read": device(1),
                "meta": device(2),
            },
            "qemu_skipped": self.qemu_skipped,
        })
    }

    fn table(&self) -> String {
        let title = format!(
            "{} MiB sequential, {} x (create+stat+unlink), {} runs; medians",
            self.mib, self.files, self.runs
        );
        let columns = [
            ("target", 28),
            ("write MiB/s", 12),
            ("read MiB/s", 12),
            ("meta files/s", 14),
        ];
        let mut table = MedianTable::new(&title, &columns);
        table.row("vmm virtio-fs share", &self.vmm_share.medians());
        table.row("vmm virtio-blk root (ext4)", &self.vmm_blk.medians());
        if let Some(q) = &self.qemu_share {
            table.row("virtiofsd + qemu share", &q.medians());
        }
        if let Some(q) = &self.device_share {
            table.row("vmm device fs + qemu share", &q.medians());
        }
        for (what, ours) in [
            ("vmm", Some(&self.vmm_share)),
            ("vmm device fs", self.device_share.as_ref()),
        ] {
            if let Some(r) = self.ratios(ours) {
                table.note(&format!(
                    "{what} / virtiofsd: write {}, read {}, meta {}",
                    two_decimals(r[0]),
                    two_decimals(r[1]),
                    two_decimals(r[2])
                ));
            }
        }
        if let Some(why) = &self.qemu_skipped {
            table.note(&format!("virtiofsd + qemu: skipped ({why})"));
        }
        table.finish()
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
fn parse_lines(lines: &[String]) -> Vec<(String, Figures<3>)> {
    lines
        .iter()
        .filter_map(|l| l.split_once("fsbench ").map(|(_, j)| j))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .map(|v| {
            (
                v["target"].as_str().unwrap_or("").to_string(),
                Figures::parse(&v, KEYS),
            )
        })
        .collect()
}

fn find(results: &[(String, Figures<3>)], target: &str) -> Option<Figures<3>> {
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

/// Kills a helper process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn fs(opts: &FsBenchOptions) -> Result<FsBench, Error> {
    let guest = GuestArtifacts::resolve(true)?;
    let scratch = ScratchDir::new("fs")?;
    let share = scratch.path().join("share");
    std::fs::create_dir_all(&share).map_err(|source| Error::Scratch {
        path: share.clone(),
        source,
    })?;
    std::fs::write(share.join("fsbench.py"), SCRIPT).map_err(|source| Error::Scratch {
        path: share.clone(),
        source,
    })?;
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
    let watched = launch_to_marker(&config, &scratch, &[], DONE)?;
    let results = parse_lines(&watched.lines);
    let (Some(s), Some(b)) = (find(&results, "share"), find(&results, "blk")) else {
        return Err(Error::no_figures("vmm", &watched));
    };
    result.vmm_share = s;
    result.vmm_blk = b;

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
        return Ok(result);
    }
    let socket = scratch.path().join("fs.sock");
    match virtiofsd() {
        Some(daemon) => {
            let mut cmd = Command::new(daemon);
            cmd.arg("--socket-path")
                .arg(&socket)
                .arg("--shared-dir")
                .arg(&share)
                .args(["--cache", "auto", "--sandbox", "none"]);
            result.qemu_share = Some(run_qemu(opts, cmd, "virtiofsd", &socket, &guest)?);
        }
        None => {
            result.qemu_skipped = Some(
                "virtiofsd is not installed (cargo install --root ~/.cache/vmm/virtiofsd virtiofsd; needs libseccomp-dev libcap-ng-dev)"
                    .into(),
            )
        }
    }
    let mut ours = Command::new(vmm_exe()?);
    ours.args(["device", "fs", "--socket"])
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&share);
    result.device_share = Some(run_qemu(opts, ours, "vmm device fs", &socket, &guest)?);
    Ok(result)
}

/// The share served by `daemon` (listening on `socket`) behind qemu.
fn run_qemu(
    opts: &FsBenchOptions,
    mut daemon: Command,
    name: &'static str,
    socket: &Path,
    guest: &GuestArtifacts,
) -> Result<Figures<3>, Error> {
    let _ = std::fs::remove_file(socket);
    let _daemon = Killed(
        daemon
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: name.into(),
                source,
            })?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(Error::Run {
                what: name,
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
    let mut cmd = qemu_with_root_disk(guest, extra, MEMORY_MIB);
    let size = format!("{MEMORY_MIB}M");
    cmd.args(["-object"])
        .arg(format!("memory-backend-memfd,id=mem,size={size},share=on"))
        .args(["-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", socket.display()))
        .args([
            "-device",
            &format!("vhost-user-fs-device,chardev=vfs,tag={TAG},queue-size=1024"),
        ]);
    let watched = qemu_to_marker(cmd, DONE).map_err(qemu_spawn_error)?;
    find(&parse_lines(&watched.lines), "share").ok_or_else(|| Error::no_figures(name, &watched))
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
        assert_eq!(share.0[0], vec![2.0, 4.0]);
        assert_eq!(share.medians()[2], Some(100.0));
        assert_eq!(find(&r, "blk").unwrap().0[0], vec![1.0]);
        assert!(find(&r, "other").is_none());
    }
}
