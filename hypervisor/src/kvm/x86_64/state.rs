//! Saving and restoring KVM vCPU and VM state (for snapshots and forks).
//!
//! The state is the kvm-bindings structures themselves, serialized with
//! their serde support; outside this module it is the `KvmX86_64` variant
//! of `VcpuState` / `VmState`, whose fields only this module reads.

use std::io;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::kvm::os_err;
use crate::{Error, Result, VcpuState, VmState};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs to save, in restore order: the TSC first and the TSC deadline
/// last, so the deadline is set against the restored TSC.
pub(super) fn msrs_to_save(list: &[u32]) -> Vec<u32> {
    let mut msrs: Vec<u32> = list
        .iter()
        .copied()
        .filter(|&m| m != MSR_IA32_TSC && m != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.contains(&MSR_IA32_TSC) {
        msrs.insert(0, MSR_IA32_TSC);
    }
    if list.contains(&MSR_IA32_TSC_DEADLINE) {
        msrs.push(MSR_IA32_TSC_DEADLINE);
    }
    msrs
}

/// What KVM holds of one x86_64 vCPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvmVcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Xsave,
    /// Absent when the host has no XCR support.
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

/// What KVM holds of an x86_64 VM besides its vCPUs and memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvmVmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// `kvm_xsave` (legacy 4 KiB layout), which kvm-bindings leaves without
/// `Clone` and `Default` because of its empty trailing array.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Xsave(kvm_xsave);

impl Clone for Xsave {
    fn clone(&self) -> Self {
        Xsave(kvm_xsave {
            region: self.0.region,
            extra: Default::default(),
        })
    }
}

impl Default for Xsave {
    fn default() -> Self {
        Xsave(kvm_xsave {
            region: [0; 1024],
            extra: Default::default(),
        })
    }
}

fn call<T>(name: &'static str, r: std::result::Result<T, kvm_ioctls::Error>) -> Result<T> {
    r.map_err(|e| Error::call(name, os_err(e)))
}

/// Reads the MSRs in `indices`; MSRs the host refuses to read are left out
/// (KVM stops a batch at the first one it refuses).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| {
            Error::call(
                "KVM_GET_MSRS",
                io::Error::new(io::ErrorKind::InvalidInput, "too many MSRs"),
            )
        })?;
        let read = call("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < rest.len() {
            tracing::debug!("MSR {:#x} cannot be read here; not saved", rest[read]);
        }
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(saved)
}

/// Writes `entries`; MSRs the host refuses to set are logged and skipped.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| {
            Error::call(
                "KVM_SET_MSRS",
                io::Error::new(io::ErrorKind::InvalidInput, "too many MSRs"),
            )
        })?;
        let written = call("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
        if written < rest.len() {
            tracing::debug!("MSR {:#x} cannot be set here; skipped", rest[written].index);
        }
        rest = &rest[(written + 1).min(rest.len())..];
    }
    Ok(())
}

pub(in crate::kvm) fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState> {
    let state = KvmVcpuState {
        mp_state: call("KVM_GET_MP_STATE", fd.get_mp_state())?,
        regs: call("KVM_GET_REGS", fd.get_regs())?,
        sregs: call("KVM_GET_SREGS", fd.get_sregs())?,
        xsave: Xsave(call("KVM_GET_XSAVE", fd.get_xsave())?),
        xcrs: fd.get_xcrs().ok(),
        debugregs: call("KVM_GET_DEBUGREGS", fd.get_debug_regs())?,
        lapic: call("KVM_GET_LAPIC", fd.get_lapic())?,
        msrs: read_msrs(fd, msr_list)?,
        events: call("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?,
    };
    Ok(VcpuState::KvmX86_64(Box::new(state)))
}

pub(in crate::kvm) fn restore_vcpu(fd: &VcpuFd, saved: &VcpuState) -> Result<()> {
    let VcpuState::KvmX86_64(s) = saved;
    call("KVM_SET_MP_STATE", fd.set_mp_state(s.mp_state))?;
    call("KVM_SET_REGS", fd.set_regs(&s.regs))?;
    call("KVM_SET_SREGS", fd.set_sregs(&s.sregs))?;
    // SAFETY: `s.xsave` is a complete `kvm_xsave` (the legacy 4 KiB
    // layout KVM_GET_XSAVE filled), which is what KVM_SET_XSAVE reads.
    call("KVM_SET_XSAVE", unsafe { fd.set_xsave(&s.xsave.0) })?;
    if let Some(xcrs) = &s.xcrs {
        call("KVM_SET_XCRS", fd.set_xcrs(xcrs))?;
    }
    call("KVM_SET_DEBUGREGS", fd.set_debug_regs(&s.debugregs))?;
    call("KVM_SET_LAPIC", fd.set_lapic(&s.lapic))?;
    write_msrs(fd, &s.msrs)?;
    call("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&s.events))?;
    // Tells a kvm-clock guest it was paused, so its watchdogs do not fire.
    // Hosts without it (or guests without kvm-clock) refuse; that is fine.
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    call("KVM_GET_IRQCHIP", fd.get_irqchip(&mut chip))?;
    Ok(chip)
}

pub(in crate::kvm) fn save_vm(fd: &VmFd) -> Result<VmState> {
    let mut clock = call("KVM_GET_CLOCK", fd.get_clock())?;
    // Only the clock value is restored; the flags describe the host.
    clock.flags = 0;
    let state = KvmVmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: call("KVM_GET_PIT2", fd.get_pit2())?,
        clock,
    };
    Ok(VmState::KvmX86_64(Box::new(state)))
}

pub(in crate::kvm) fn restore_vm(fd: &VmFd, saved: &VmState) -> Result<()> {
    let VmState::KvmX86_64(s) = saved;
    call("KVM_SET_PIT2", fd.set_pit2(&s.pit))?;
    call("KVM_SET_CLOCK", fd.set_clock(&s.clock))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        call("KVM_SET_IRQCHIP", fd.set_irqchip(chip))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_first_and_deadline_last() {
        let list = [0x6e0, 0x174, 0x10, 0xc0000080];
        assert_eq!(msrs_to_save(&list), vec![0x10, 0x174, 0xc0000080, 0x6e0]);
        assert_eq!(msrs_to_save(&[0x174]), vec![0x174]);
    }
}
