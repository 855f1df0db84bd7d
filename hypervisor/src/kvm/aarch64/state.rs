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

/// GIC registers the state carries: a block of 32-bit words at `offset`,
/// `bytes` long, and the register that clears what this one sets (written
/// first with the complement, so a restore ends with exactly the saved
/// bits).
#[derive(Debug, Clone, Copy)]
struct Block {
    offset: u64,
    bytes: u64,
    clear: Option<u64>,
}

const fn block(offset: u64, bytes: u64) -> Block {
    Block {
        offset,
        bytes,
        clear: None,
    }
}

const fn set_clear(offset: u64, bytes: u64, clear: u64) -> Block {
    Block {
        offset,
        bytes,
        clear: Some(clear),
    }
}

impl Block {
    /// Its words: (offset, the clear register's offset).
    fn words(self) -> impl Iterator<Item = (u64, Option<u64>)> {
        (self.offset..self.offset + self.bytes)
            .step_by(4)
            .map(move |at| (at, self.clear.map(|c| c + (at - self.offset))))
    }
}

/// GICD_CTLR, written last: the interrupts are set up before the
/// distributor forwards any.
const GICD_CTLR: u64 = 0x0;

/// The distributor's per-interrupt registers, by bits per interrupt:
/// group, routing, configuration, priority, then enable, pending and
/// active (restored in this order, so an interrupt is set up before it is
/// enabled or pending). Only the shared interrupts' part: the private
/// ones' is RAZ/WI in the distributor (the redistributors hold them).
const DIST_REGS: [(Block, u64); 7] = [
    (block(0x0080, 0), 1),             // GICD_IGROUPR
    (block(0x6000, 0), 64),            // GICD_IROUTER
    (block(0x0c00, 0), 2),             // GICD_ICFGR
    (block(0x0400, 0), 8),             // GICD_IPRIORITYR
    (set_clear(0x0100, 0, 0x0180), 1), // GICD_ISENABLER / ICENABLER
    (set_clear(0x0200, 0, 0x0280), 1), // GICD_ISPENDR / ICPENDR
    (set_clear(0x0300, 0, 0x0380), 1), // GICD_ISACTIVER / ICACTIVER
];

/// The distributor's words for `lines` interrupt lines: (offset, clear
/// register's offset).
fn dist_words(lines: u32) -> Vec<(u64, Option<u64>)> {
    let mut words = Vec::new();
    for (reg, bits) in DIST_REGS {
        let skip = 32 * bits / 8;
        let shared = Block {
            offset: reg.offset + skip,
            bytes: u64::from(lines) * bits / 8 - skip,
            clear: reg.clear.map(|c| c + skip),
        };
        words.extend(shared.words());
    }
    words.push((GICD_CTLR, None));
    words
}

/// The redistributor's registers: the RD frame, then the SGI frame at
/// 64 KiB (the private interrupts), in restore order as for the
/// distributor, its control register after the base registers.
const SGI: u64 = 0x1_0000;
const REDIST_REGS: [Block; 10] = [
    block(0x0014, 4),                         // GICR_WAKER
    block(0x0070, 8),                         // GICR_PROPBASER
    block(0x0078, 8),                         // GICR_PENDBASER
    block(0x0000, 4),                         // GICR_CTLR
    block(SGI + 0x0080, 4),                   // GICR_IGROUPR0
    block(SGI + 0x0c00, 8),                   // GICR_ICFGR0, ICFGR1
    block(SGI + 0x0400, 32),                  // GICR_IPRIORITYR0..7
    set_clear(SGI + 0x0100, 4, SGI + 0x0180), // GICR_ISENABLER0 / ICENABLER0
    set_clear(SGI + 0x0200, 4, SGI + 0x0280), // GICR_ISPENDR0 / ICPENDR0
    set_clear(SGI + 0x0300, 4, SGI + 0x0380), // GICR_ISACTIVER0 / ICACTIVER0
];

/// The redistributor's words: (offset, clear register's offset).
fn redist_words() -> Vec<(u64, Option<u64>)> {
    REDIST_REGS.iter().flat_map(|r| r.words()).collect()
}

/// A system register's encoding as the CPU-interface attribute group
/// takes it (op0, op1, CRn, CRm, op2 at KVM's ONE_REG shifts).
const fn icc(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

const ICC_CTLR_EL1: u64 = icc(3, 0, 12, 12, 4);
/// ICC_SRE_EL1 first (it decides how the others are accessed), then
/// control, priority mask and binary points, the active priorities, and
/// the group enables last.
const ICC_REGS: [u64; 15] = [
    icc(3, 0, 12, 12, 5), // ICC_SRE_EL1
    ICC_CTLR_EL1,
    icc(3, 0, 4, 6, 0),   // ICC_PMR_EL1
    icc(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
    icc(3, 0, 12, 12, 3), // ICC_BPR1_EL1
    icc(3, 0, 12, 8, 4),  // ICC_AP0R0_EL1
    icc(3, 0, 12, 8, 5),  // ICC_AP0R1_EL1
    icc(3, 0, 12, 8, 6),  // ICC_AP0R2_EL1
    icc(3, 0, 12, 8, 7),  // ICC_AP0R3_EL1
    icc(3, 0, 12, 9, 0),  // ICC_AP1R0_EL1
    icc(3, 0, 12, 9, 1),  // ICC_AP1R1_EL1
    icc(3, 0, 12, 9, 2),  // ICC_AP1R2_EL1
    icc(3, 0, 12, 9, 3),  // ICC_AP1R3_EL1
    icc(3, 0, 12, 12, 6), // ICC_IGRPEN0_EL1
    icc(3, 0, 12, 12, 7), // ICC_IGRPEN1_EL1
];

/// Whether active-priority register `reg` exists with `priority_bits`
/// bits of priority (GICv3 spec: APxR1 from 6 bits, APxR2/3 with 7).
fn icc_implemented(reg: u64, priority_bits: u64) -> bool {
    let n = match reg {
        r if r == icc(3, 0, 12, 8, 5) || r == icc(3, 0, 12, 9, 1) => 1,
        r if r == icc(3, 0, 12, 8, 6)
            || r == icc(3, 0, 12, 8, 7)
            || r == icc(3, 0, 12, 9, 2)
            || r == icc(3, 0, 12, 9, 3) =>
        {
            2
        }
        _ => 0,
    };
    match n {
        1 => priority_bits >= 6,
        2 => priority_bits == 7,
        _ => true,
    }
}

/// The attribute's vCPU field: the MPIDR's affinity levels packed as
/// Aff3.Aff2.Aff1.Aff0 in bits 63..32.
pub(super) fn vgic_mpidr(mpidr: u64) -> u64 {
    let aff = ((mpidr & 0xff_0000_0000) >> 8) | (mpidr & 0xff_ffff);
    aff << 32
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distributor_carries_the_shared_interrupts_of_each_register() {
        let words = dist_words(128);
        // 96 shared interrupts: 3 words of each 1-bit register (group,
        // enable, pending, active), 192 of IROUTER, 6 of ICFGR, 24 of
        // IPRIORITYR; the control register once, last.
        assert_eq!(words.len(), 3 + 192 + 6 + 24 + 3 + 3 + 3 + 1);
        assert_eq!(words[0], (0x0080 + 4, None));
        assert_eq!(words[3], (0x6000 + 32 * 8, None));
        assert_eq!(words[3 + 192 - 1], (0x6000 + 128 * 8 - 4, None));
        assert!(words.contains(&(0x0100 + 4, Some(0x0180 + 4))));
        assert!(words.contains(&(0x0400 + 32, None)));
        assert!(!words.contains(&(0x0400 + 28, None)));
        assert_eq!(words.last(), Some(&(GICD_CTLR, None)));
        assert!(!words.iter().any(|(at, _)| (0x6000..0x6100).contains(at)));
    }

    #[test]
    fn the_redistributor_words_cover_both_frames() {
        let words = redist_words();
        // WAKER, 2 x 2 base-register halves, CTLR; IGROUPR0, 2 ICFGR,
        // 8 IPRIORITYR, 3 set registers.
        assert_eq!(words.len(), 1 + 4 + 1 + 1 + 2 + 8 + 3);
        assert!(words.contains(&(SGI + 0x0100, Some(SGI + 0x0180))));
        assert!(words.contains(&(0x007c, None)));
        assert!(words.contains(&(SGI + 0x041c, None)));
    }

    #[test]
    fn system_register_encodings_and_mpidr_packing_are_the_kernels() {
        // ICC_SRE_EL1 = S3_0_C12_C12_5 as arm-vgic-v3.rst encodes it.
        assert_eq!(icc(3, 0, 12, 12, 5), 0xc665);
        assert_eq!(ICC_CTLR_EL1, 0xc664);
        assert_eq!(vgic_mpidr(0x8000_0000), 0);
        assert_eq!(vgic_mpidr(0x81_8003_0201), 0x8103_0201 << 32);
        assert!(icc_implemented(icc(3, 0, 12, 8, 4), 5));
        assert!(!icc_implemented(icc(3, 0, 12, 8, 5), 5));
        assert!(icc_implemented(icc(3, 0, 12, 9, 1), 6));
        assert!(!icc_implemented(icc(3, 0, 12, 9, 3), 6));
        assert!(icc_implemented(icc(3, 0, 12, 9, 3), 7));
    }
}
