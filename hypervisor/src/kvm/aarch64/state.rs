//! Saving and restoring KVM/arm64 vCPU and VM state (for snapshots and
//! forks).
//!
//! A vCPU is every register `KVM_GET_REG_LIST` names (core, FP/SIMD,
//! system registers, the arch timer's, KVM's firmware pseudo-registers) and
//! its MP state (running, or powered off until PSCI CPU_ON). The VM is its
//! vGICv3: the distributor's registers for the shared interrupts, and each
//! vCPU's redistributor and CPU interface (ICC) registers, read and written
//! through the KVM device's attribute groups (Linux's
//! Documentation/virt/kvm/devices/arm-vgic-v3.rst). The interrupts are
//! edge-triggered and the GIC has no ITS, so there are no line levels or
//! LPI tables to carry.

use kvm_bindings::{
    kvm_device_attr, kvm_mp_state, RegList, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
};
use kvm_ioctls::{DeviceFd, VcpuFd};
use serde::{Deserialize, Serialize};

use super::gic_regs::{
    dist_words, icc_implemented, redist_words, vgic_mpidr, ICC_CTLR_EL1, ICC_REGS,
};
use crate::kvm::os_err;
use crate::{Error, Result};

/// One register: its `ONE_REG` id and value (little-endian bytes, as
/// many as the id's size field says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReg {
    pub id: u64,
    pub value: Vec<u8>,
}

/// What KVM holds of one arm64 vCPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub regs: Vec<SavedReg>,
    pub mp_state: u32,
}

/// One vCPU's part of the GIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicVcpuState {
    /// The redistributor's registers, in [`REDIST_REGS`] order, 32 bits
    /// at a time.
    pub redist: Vec<u32>,
    /// The CPU interface's registers, in [`ICC_REGS`] order; `None` where
    /// this GIC does not implement one (the active-priority registers
    /// beyond its priority bits).
    pub icc: Vec<Option<u64>>,
}

/// What KVM holds of an arm64 VM beyond its vCPUs: the vGICv3.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The interrupt lines the GIC was made with.
    pub lines: u32,
    /// The distributor's registers, in [`DIST_REGS`] order over the shared
    /// interrupts, 32 bits at a time.
    pub dist: Vec<u32>,
    /// Per vCPU, in vCPU order.
    pub vcpus: Vec<GicVcpuState>,
}

/// The vCPU's registers as `KVM_GET_REG_LIST` lists them.
fn register_ids(fd: &VcpuFd) -> Result<Vec<u64>> {
    // Linux lists fewer than 500 on today's CPUs; E2BIG says how many.
    let mut list = RegList::new(500).map_err(|e| Error::call("KVM_GET_REG_LIST", io_other(e)))?;
    if let Err(e) = fd.get_reg_list(&mut list) {
        if e.errno() != libc::E2BIG {
            return Err(Error::call("KVM_GET_REG_LIST", os_err(e)));
        }
        let n = list.as_fam_struct_ref().n as usize;
        list = RegList::new(n).map_err(|e| Error::call("KVM_GET_REG_LIST", io_other(e)))?;
        fd.get_reg_list(&mut list)
            .map_err(|e| Error::call("KVM_GET_REG_LIST", os_err(e)))?;
    }
    Ok(list.as_slice().to_vec())
}

fn io_other(e: impl std::fmt::Debug) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

pub(super) fn save_vcpu(fd: &VcpuFd) -> Result<KvmVcpuState> {
    let mut regs = Vec::new();
    for id in register_ids(fd)? {
        let mut value = vec![0u8; kvm_ioctls::reg_size(id)];
        fd.get_one_reg(id, &mut value)
            .map_err(|e| Error::call("KVM_GET_ONE_REG", os_err(e)))?;
        regs.push(SavedReg { id, value });
    }
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| Error::call("KVM_GET_MP_STATE", os_err(e)))?
        .mp_state;
    Ok(KvmVcpuState { regs, mp_state })
}

/// Restores into a vCPU initialised like the saved one.
pub(super) fn restore_vcpu(fd: &VcpuFd, saved: &KvmVcpuState) -> Result<()> {
    for reg in &saved.regs {
        if reg.value.len() != kvm_ioctls::reg_size(reg.id) {
            return Err(Error::call(
                "KVM_SET_ONE_REG",
                std::io::Error::other(format!(
                    "register {:#x} was saved with {} bytes, it has {}",
                    reg.id,
                    reg.value.len(),
                    kvm_ioctls::reg_size(reg.id)
                )),
            ));
        }
        fd.set_one_reg(reg.id, &reg.value).map_err(|e| {
            Error::call(
                "KVM_SET_ONE_REG",
                std::io::Error::other(format!("register {:#x}: {}", reg.id, os_err(e))),
            )
        })?;
    }
    fd.set_mp_state(kvm_mp_state {
        mp_state: saved.mp_state,
    })
    .map_err(|e| Error::call("KVM_SET_MP_STATE", os_err(e)))
}

/// Reads GIC attribute `attr` in `group` (a 32-bit register, or a 64-bit
/// CPU system register).
fn get_attr(gic: &DeviceFd, group: u32, attr: u64) -> Result<u64> {
    let mut value = 0u64;
    let mut request = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &mut value as *mut u64 as u64,
    };
    // SAFETY: `addr` points at a live u64, which holds the largest value
    // these groups write (32-bit registers fill its low half on a
    // little-endian host; CPU system registers are 64 bits).
    unsafe { gic.get_device_attr(&mut request) }
        .map_err(|e| Error::call("KVM_GET_DEVICE_ATTR (vGIC)", os_err(e)))?;
    Ok(value)
}

fn set_attr(gic: &DeviceFd, group: u32, attr: u64, value: u64) -> Result<()> {
    let request = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &value as *const u64 as u64,
    };
    gic.set_device_attr(&request).map_err(|e| {
        Error::call(
            "KVM_SET_DEVICE_ATTR (vGIC)",
            std::io::Error::other(format!("group {group}, attribute {attr:#x}: {}", os_err(e))),
        )
    })
}

/// Saves the GIC of a VM whose vCPUs (MPIDRs in vCPU order) are paused.
pub(super) fn save_gic(gic: &DeviceFd, lines: u32, mpidrs: &[u64]) -> Result<KvmVmState> {
    let group = KVM_DEV_ARM_VGIC_GRP_DIST_REGS;
    let dist = dist_words(lines)
        .into_iter()
        .map(|(at, _)| get_attr(gic, group, at).map(|v| v as u32))
        .collect::<Result<Vec<u32>>>()?;
    let mut vcpus = Vec::with_capacity(mpidrs.len());
    for &mpidr in mpidrs {
        let cpu = vgic_mpidr(mpidr);
        let redist = redist_words()
            .into_iter()
            .map(|(at, _)| {
                get_attr(gic, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | at).map(|v| v as u32)
            })
            .collect::<Result<Vec<u32>>>()?;
        let sysregs = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
        let ctlr = get_attr(gic, sysregs, cpu | ICC_CTLR_EL1)?;
        let priority_bits = ((ctlr >> 8) & 0x7) + 1;
        let icc = ICC_REGS
            .iter()
            .map(|&reg| {
                icc_implemented(reg, priority_bits)
                    .then(|| get_attr(gic, sysregs, cpu | reg))
                    .transpose()
            })
            .collect::<Result<Vec<Option<u64>>>>()?;
        vcpus.push(GicVcpuState { redist, icc });
    }
    Ok(KvmVmState { lines, dist, vcpus })
}

/// Restores a saved GIC into a new one with the same lines and vCPUs.
pub(super) fn restore_gic(
    gic: &DeviceFd,
    lines: u32,
    mpidrs: &[u64],
    saved: &KvmVmState,
) -> Result<()> {
    let words = dist_words(saved.lines);
    if saved.lines != lines || saved.dist.len() != words.len() || saved.vcpus.len() != mpidrs.len()
    {
        return Err(Error::call(
            "KVM_SET_DEVICE_ATTR (vGIC)",
            std::io::Error::other(format!(
                "the saved GIC has {} lines and {} vCPUs, this one {} and {}",
                saved.lines,
                saved.vcpus.len(),
                lines,
                mpidrs.len()
            )),
        ));
    }
    restore_words(gic, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, &words, &saved.dist)?;
    let redist = redist_words();
    for (&mpidr, state) in mpidrs.iter().zip(&saved.vcpus) {
        let cpu = vgic_mpidr(mpidr);
        if state.redist.len() != redist.len() || state.icc.len() != ICC_REGS.len() {
            return Err(Error::call(
                "KVM_SET_DEVICE_ATTR (vGIC)",
                std::io::Error::other("a vCPU's saved GIC registers do not match this VMM's list"),
            ));
        }
        restore_words(
            gic,
            KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
            cpu,
            &redist,
            &state.redist,
        )?;
        for (&reg, value) in ICC_REGS.iter().zip(&state.icc) {
            if let Some(value) = value {
                set_attr(gic, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu | reg, *value)?;
            }
        }
    }
    Ok(())
}

/// Writes saved words: each clear register first with the complement of
/// what its set register held, then the value.
fn restore_words(
    gic: &DeviceFd,
    group: u32,
    cpu: u64,
    words: &[(u64, Option<u64>)],
    values: &[u32],
) -> Result<()> {
    for (&(at, clear), &value) in words.iter().zip(values) {
        if let Some(clear) = clear {
            set_attr(gic, group, cpu | clear, u64::from(!value))?;
        }
        set_attr(gic, group, cpu | at, u64::from(value))?;
    }
    Ok(())
}
