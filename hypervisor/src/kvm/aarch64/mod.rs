//! The aarch64 half of the KVM backend: a vCPU's initialisation
//! (`KVM_ARM_VCPU_INIT` with the host's preferred target and PSCI 0.2),
//! its core and system registers (`ONE_REG`), the in-kernel vGICv3 (a KVM
//! device), and the state a snapshot saves of them (`state`).

mod gic_regs;
pub mod state;

use std::collections::BTreeMap;
use std::mem::offset_of;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_regs,
    kvm_vcpu_init, user_pt_regs, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG,
    KVM_REG_ARM64_SYSREG_CRM_SHIFT, KVM_REG_ARM64_SYSREG_CRN_SHIFT, KVM_REG_ARM64_SYSREG_OP0_SHIFT,
    KVM_REG_ARM64_SYSREG_OP1_SHIFT, KVM_REG_ARM64_SYSREG_OP2_SHIFT, KVM_REG_ARM_CORE,
    KVM_REG_SIZE_U64, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{Cap, DeviceFd, Kvm, VcpuFd, VmFd};

use super::{os_err, KvmHypervisor, KvmVcpu, KvmVm};
use crate::aarch64::{GicLayout, HypervisorArch, VcpuArch, VmArch};
use crate::{Error, Result, VcpuState, VmState};

/// What the VMM needs of KVM on aarch64, beyond what every architecture
/// needs.
pub(super) const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (Cap::OneReg, "KVM_CAP_ONE_REG"),
    (Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
];

/// PSTATE at the kernel's entry: EL1 with SP_EL1 (EL1h), and debug,
/// SError, IRQ and FIQ masked.
const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;

/// What the backend learns about the host once: nothing on aarch64 (the
/// vCPU target is a VM's question).
#[derive(Debug, Clone, Default)]
pub(super) struct HostInfo;

impl HostInfo {
    pub fn probe(_kvm: &Kvm) -> HostInfo {
        HostInfo
    }
}

/// What a VM's vCPUs share: the host's preferred vCPU target, each vCPU's
/// MPIDR by id (the GIC's state is saved per vCPU), and the VM's GIC once
/// made with its interrupt lines.
#[derive(Debug, Clone)]
pub(super) struct VmInfo {
    target: kvm_vcpu_init,
    mpidrs: Arc<Mutex<BTreeMap<u32, u64>>>,
    gic: Arc<OnceLock<(DeviceFd, u32)>>,
}

impl VmInfo {
    /// The vCPUs' MPIDRs in id order.
    fn mpidrs(&self) -> Vec<u64> {
        self.mpidrs
            .lock()
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    fn gic(&self) -> Result<&(DeviceFd, u32)> {
        self.gic.get().ok_or_else(|| {
            Error::call(
                "the vGIC's state",
                std::io::Error::other("the VM has no GIC yet: create it after the vCPUs"),
            )
        })
    }
}

/// Whether this host runs under a hypervisor: arm64 has no portable way to
/// tell from inside, so it is reported as hardware.
pub(super) fn runs_nested() -> bool {
    false
}

pub(super) fn prepare_vm(fd: &VmFd, _host: &HostInfo) -> Result<VmInfo> {
    let mut target = kvm_vcpu_init::default();
    fd.get_preferred_target(&mut target)
        .map_err(|e| Error::call("KVM_ARM_PREFERRED_TARGET", os_err(e)))?;
    Ok(VmInfo {
        target,
        mpidrs: Arc::new(Mutex::new(BTreeMap::new())),
        gic: Arc::new(OnceLock::new()),
    })
}

/// Nothing must exist before an arm64 VM's vCPUs: its GIC comes after
/// them ([`VmArch::create_gic`]).
pub(super) fn create_platform_devices(_fd: &VmFd) -> Result<()> {
    Ok(())
}

/// Saves the vGIC; call it with every vCPU paused.
pub(super) fn save_vm(_fd: &VmFd, info: &VmInfo) -> Result<VmState> {
    let (gic, lines) = info.gic()?;
    let saved = state::save_gic(gic, *lines, &info.mpidrs())?;
    Ok(VmState::KvmAarch64(Box::new(saved)))
}

/// Restores the vGIC into a VM whose vCPUs and GIC exist (an arm64 VM's
/// GIC comes after its vCPUs).
pub(super) fn restore_vm(_fd: &VmFd, info: &VmInfo, saved: &VmState) -> Result<()> {
    let VmState::KvmAarch64(saved) = saved;
    let (gic, lines) = info.gic()?;
    state::restore_gic(gic, *lines, &info.mpidrs(), saved)
}

pub(super) fn save_vcpu(fd: &VcpuFd, _info: &VmInfo) -> Result<VcpuState> {
    Ok(VcpuState::KvmAarch64(Box::new(state::save_vcpu(fd)?)))
}

/// Restores into a vCPU initialised with `VcpuArch::init`.
pub(super) fn restore_vcpu(fd: &VcpuFd, saved: &VcpuState) -> Result<()> {
    let VcpuState::KvmAarch64(saved) = saved;
    state::restore_vcpu(fd, saved)
}

impl HypervisorArch for KvmHypervisor {}

/// A 64-bit core register's `ONE_REG` id, from its byte offset in
/// `kvm_regs` (the id counts 32-bit words).
fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
}

/// A system register's `ONE_REG` id from its encoding.
fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | u64::from(KVM_REG_ARM64_SYSREG)
        | op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT
        | op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT
        | crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT
        | crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT
        | op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT
}

fn pc_reg() -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc))
}

fn pstate_reg() -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate))
}

fn x_reg(n: usize) -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + 8 * n)
}

/// MPIDR_EL1: op0 3, op1 0, CRn 0, CRm 0, op2 5.
fn mpidr_reg() -> u64 {
    sys_reg(3, 0, 0, 0, 5)
}

impl KvmVcpu {
    fn get_reg(&self, id: u64) -> Result<u64> {
        let mut bytes = [0u8; 8];
        self.fd
            .get_one_reg(id, &mut bytes)
            .map_err(|e| Error::call("KVM_GET_ONE_REG", os_err(e)))?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn set_reg(&self, id: u64, value: u64) -> Result<()> {
        self.fd
            .set_one_reg(id, &value.to_le_bytes())
            .map(drop)
            .map_err(|e| Error::call("KVM_SET_ONE_REG", os_err(e)))
    }
}

impl VcpuArch for KvmVcpu {
    fn init(&self, powered_off: bool) -> Result<()> {
        let mut kvi = self.info.target;
        kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if powered_off {
            kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        self.fd
            .vcpu_init(&kvi)
            .map_err(|e| Error::call("KVM_ARM_VCPU_INIT", os_err(e)))?;
        let mpidr = self.mpidr()?;
        if let Ok(mut mpidrs) = self.info.mpidrs.lock() {
            mpidrs.insert(self.id, mpidr);
        }
        Ok(())
    }

    fn set_boot_regs(&self, entry: u64, fdt: u64) -> Result<()> {
        self.set_reg(pstate_reg(), PSTATE_EL1H_DAIF_MASKED)?;
        self.set_reg(pc_reg(), entry)?;
        self.set_reg(x_reg(0), fdt)
    }

    fn mpidr(&self) -> Result<u64> {
        self.get_reg(mpidr_reg())
    }

    fn program_counter(&self) -> Result<u64> {
        self.get_reg(pc_reg())
    }
}

impl VmArch for KvmVm {
    fn create_gic(&self, layout: &GicLayout) -> Result<()> {
        if !layout.lines.is_multiple_of(32) || !(64..=1024).contains(&layout.lines) {
            return Err(Error::call(
                "KVM_DEV_ARM_VGIC_GRP_NR_IRQS",
                std::io::Error::other(format!(
                    "{} interrupt lines: a GIC has 64 to 1024, a multiple of 32",
                    layout.lines
                )),
            ));
        }
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let gic = self
            .fd
            .create_device(&mut device)
            .map_err(|e| Error::call("KVM_CREATE_DEVICE (vGICv3)", os_err(e)))?;
        let set = |group: u32, attr: u32, addr: u64, what: &'static str| {
            let attr = kvm_device_attr {
                flags: 0,
                group,
                attr: u64::from(attr),
                addr,
            };
            gic.set_device_attr(&attr)
                .map_err(|e| Error::call(what, os_err(e)))
        };
        let (dist, redist, lines) = (layout.distributor, layout.redistributors, layout.lines);
        // The kernel reads each value through the address it is given.
        let addr_of_u64 = |v: &u64| v as *const u64 as u64;
        set(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST,
            addr_of_u64(&dist),
            "the vGIC distributor's address",
        )?;
        set(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST,
            addr_of_u64(&redist),
            "the vGIC redistributors' address",
        )?;
        set(
            KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            &lines as *const u32 as u64,
            "the vGIC's interrupt lines",
        )?;
        set(
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_CTRL_INIT,
            0,
            "the vGIC's initialisation",
        )?;
        self.info.gic.set((gic, lines)).map_err(|_| {
            Error::call(
                "KVM_CREATE_DEVICE (vGICv3)",
                std::io::Error::other("the VM has a GIC already"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_ids_are_the_kernels() {
        // From Linux's arch/arm64/include/uapi/asm/kvm.h, as QEMU and
        // Firecracker write them: the core registers count 32-bit words.
        assert_eq!(x_reg(0), 0x6030_0000_0010_0000);
        assert_eq!(x_reg(1), 0x6030_0000_0010_0002);
        assert_eq!(pc_reg(), 0x6030_0000_0010_0040);
        assert_eq!(pstate_reg(), 0x6030_0000_0010_0042);
        assert_eq!(mpidr_reg(), 0x6030_0000_0013_c005);
    }
}
