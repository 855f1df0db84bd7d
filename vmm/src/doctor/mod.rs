//! `vmm doctor`: can this host launch a VM, and if not, what to do.

use std::fmt;
use std::path::Path;

use hypervisor::HypervisorKind;

use crate::artifacts::{self, KernelFlavour};
use crate::config::Flavour;
use crate::jail::probe;

#[cfg(target_os = "linux")]
mod kvm;
#[cfg(any(target_os = "macos", test))]
mod macos;

/// Outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Worth knowing; does not stop a launch.
    Info,
    /// Stops a launch; carries the fix.
    Fail(String),
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub detail: String,
    pub status: Status,
}

/// All checks and the verdict.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub(crate) fn push(&mut self, name: &str, detail: impl Into<String>, status: Status) {
        self.checks.push(Check {
            name: name.into(),
            detail: detail.into(),
            status,
        });
    }

    /// True when nothing stops a launch with the default artifacts.
    pub fn can_launch(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|c| matches!(c.status, Status::Fail(_)))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Info => "info",
                Status::Fail(_) => "FAIL",
            };
            writeln!(f, "[{tag}] {}: {}", c.name, c.detail)?;
            if let Status::Fail(fix) = &c.status {
                writeln!(f, "       fix: {fix}")?;
            }
        }
        if self.can_launch() {
            writeln!(f, "verdict: this host can launch VMs")
        } else {
            writeln!(
                f,
                "verdict: this host cannot launch VMs yet; apply the fixes above"
            )
        }
    }
}

fn describe_kind(kind: HypervisorKind) -> String {
    match kind {
        HypervisorKind::KvmPvm => format!(
            "{kind}; the kvm_pvm module is loaded, so guests boot the pvm kernel flavour and the VMM adds its command-line flags"
        ),
        other => other.to_string(),
    }
}

fn artifact_check(report: &mut Report, name: &str, path: &Path) {
    if path.exists() {
        report.push(name, format!("built: {}", path.display()), Status::Ok);
    } else {
        report.push(
            name,
            format!("not built ({} is missing)", path.display()),
            Status::Fail("run tools/setup.sh (builds the guest kernel and images), or give \"kernel\" and \"initramfs\" in the VM config".into()),
        );
    }
}

/// Runs every check.
pub fn run() -> Report {
    let mut report = Report::default();
    #[cfg(target_os = "linux")]
    let kind = kvm::checks(&mut report);
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    let kind = macos::checks(&mut report);
    let Some(kind) = kind else {
        return report;
    };
    report.push("hypervisor", describe_kind(kind), Status::Info);
    let flavour = KernelFlavour::resolve(Flavour::Auto, kind);
    report.push("kernel flavour", flavour.name(), Status::Info);
    artifact_check(
        &mut report,
        "guest kernel",
        &artifacts::default_kernel(flavour),
    );
    artifact_check(&mut report, "initramfs", &artifacts::default_initramfs());
    artifact_check(
        &mut report,
        "initramfs (agent only, for VMs with a root disk)",
        &artifacts::default_minimal_initramfs(),
    );
    artifact_check(
        &mut report,
        "base image (for vmm run / rootfs)",
        &artifacts::default_base_image(),
    );
    let images = crate::image::list(&[]).unwrap_or_default();
    let image_bytes: u64 = images.iter().map(|l| l.image.size_on_disk()).sum();
    report.push(
        "disk: artifact cache",
        format!(
            "{} in {} ({} imported images: {}; `vmm image prune` removes unused ones)",
            crate::image::human(crate::image::cache_usage()),
            artifacts::cache_dir().display(),
            images.len(),
            crate::image::human(image_bytes),
        ),
        Status::Info,
    );
    jail_checks(&mut report);
    let (qemu_binary, qemu_package) = crate::arch::QEMU;
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(qemu_binary).exists()))
        .unwrap_or(false);
    let missing = format!("not installed; apt-get install {qemu_package} to compare boot times");
    report.push(
        "qemu (for `vmm bench boot` comparisons)",
        if qemu {
            "installed".to_string()
        } else {
            missing
        },
        Status::Info,
    );
    report
}

/// What the host allows a jail (none of it stops a launch).
fn jail_checks(report: &mut Report) {
    match probe::user_namespaces() {
        Ok(()) => report.push(
            "jail: user namespaces",
            "allowed: the VMM can make its jail's user, mount, PID, IPC and UTS namespaces",
            Status::Ok,
        ),
        Err(e) => report.push("jail: user namespaces", e.to_string(), Status::Info),
    }
    let landlock = match probe::landlock_abi() {
        Some(abi) => format!("ABI version {abi}"),
        None => "not offered by this kernel (built without it, or not in the lsm= boot list); the jail goes without it".into(),
    };
    report.push("jail: Landlock", landlock, Status::Info);
    let cgroup = match probe::cgroup_delegation(&probe::CGROUP_CONTROLLERS) {
        Ok(dir) => format!("delegated: {} (memory, pids, cpu)", dir.display()),
        Err(why) => format!("not available, so a jail with memory, pids or cpu limits (\"jail\" in the config) is refused: {why}"),
    };
    report.push("jail: cgroup v2", cgroup, Status::Info);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_fails_on_any_failed_check() {
        let mut r = Report::default();
        r.push("a", "fine", Status::Ok);
        r.push("b", "note", Status::Info);
        assert!(r.can_launch());
        r.push("c", "broken", Status::Fail("do this".into()));
        assert!(!r.can_launch());
        let text = r.to_string();
        assert!(
            text.contains("[FAIL] c: broken") && text.contains("fix: do this"),
            "{text}"
        );
    }
}
