//! The doctor's checks of KVM (Linux).

use hypervisor::kvm::{kvm_device_path, KvmHypervisor};
use hypervisor::{Hypervisor, HypervisorKind};

use super::{Report, Status};

/// KVM's checks; the hypervisor's kind when a VM can be made.
pub fn checks(report: &mut Report) -> Option<HypervisorKind> {
    let dev_path = kvm_device_path();
    let dev = dev_path.as_path();
    let dev_name = dev.display().to_string();
    if !dev.exists() {
        report.push(
            &dev_name,
            "missing",
            Status::Fail("load KVM (modprobe kvm_intel or kvm_amd), enable VT-x/AMD-V in the firmware, or turn on nested virtualization for this cloud VM".into()),
        );
        return None;
    }
    let hv = match KvmHypervisor::open(dev) {
        Ok(hv) => {
            report.push(&dev_name, "present and usable", Status::Ok);
            hv
        }
        Err(e @ hypervisor::Error::Open { .. }) => {
            report.push(&dev_name, e.to_string(), Status::Fail("see above".into()));
            return None;
        }
        Err(e) => {
            report.push(
                "KVM",
                e.to_string(),
                Status::Fail("update the host kernel".into()),
            );
            return None;
        }
    };
    report.push(
        "KVM API",
        format!("version {}", hv.api_version()),
        Status::Ok,
    );
    let caps: Vec<&str> = hv.capabilities().iter().map(|c| c.name).collect();
    report.push("capabilities", caps.join(", "), Status::Ok);
    report.push(
        "max vCPUs per VM",
        hv.max_vcpus().min(crate::arch::max_vcpus()).to_string(),
        Status::Info,
    );
    Some(hv.kind())
}
