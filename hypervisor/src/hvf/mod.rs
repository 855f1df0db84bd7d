//! The Hypervisor.framework backend (macOS 15 or later on Apple silicon).
//!
//! Hypervisor.framework leaves to the VMM what KVM does in the kernel:
//! decoding MMIO accesses from the exception syndrome ([`esr`]), PSCI
//! ([`psci`]), sleeping on WFI until the timer or an interrupt
//! ([`timer`]), the system registers it traps ([`sysreg`]), ioeventfds
//! ([`ioevent`]), irqfds ([`irq_lines`]), waking a sleeping vCPU
//! ([`wake`]), and the fact that a vCPU lives on the thread that created
//! it ([`gate`]). Those parts are plain logic, tested on Linux, like the
//! saved state's format ([`state`]). The framework calls are in
//! `backend`, built on macOS only.

pub mod esr;
pub mod gate;
pub mod ioevent;
pub mod irq_lines;
pub mod psci;
pub mod state;
pub mod sysreg;
pub mod timer;
pub mod wake;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub mod backend;

/// The first shared interrupt line's INTID: line (GSI) `n` is INTID 32 + n.
pub const SPI_BASE: u32 = 32;

/// vCPU `id`'s MPIDR_EL1: bit 31 (RES1), Aff0 the low 4 bits of the id
/// (GICv3 targets at most 16 CPUs per Aff0 group), Aff1 the rest, as KVM
/// assigns it, so a device tree reads the same on both backends.
pub fn mpidr(id: u32) -> u64 {
    (1 << 31) | u64::from(id & 0xf) | (u64::from((id >> 4) & 0xff) << 8)
}

/// What a Hypervisor.framework return code means, and what to do about
/// it.
pub fn describe(rc: i32) -> &'static str {
    match rc as u32 {
        0 => "success",
        0xfae9_4001 => "the call failed (HV_ERROR)",
        0xfae9_4002 => {
            "the resource is busy (HV_BUSY): macOS allows one VM per process; \
             stop the other VM in this process"
        }
        0xfae9_4003 => "a bad argument (HV_BAD_ARGUMENT): report this as a bug",
        0xfae9_4004 => "the guest is in an illegal state (HV_ILLEGAL_GUEST_STATE)",
        0xfae9_4005 => {
            "the host has no resources left (HV_NO_RESOURCES): close other VMs \
             or lower the vCPU count or memory size"
        }
        0xfae9_4006 => "no VM or vCPU (HV_NO_DEVICE): create the VM first",
        0xfae9_4007 => {
            "denied (HV_DENIED): the binary lacks the com.apple.security.hypervisor \
             entitlement; sign it: codesign --sign - --entitlements \
             tools/macos/vmm.entitlements --force BINARY"
        }
        0xfae9_4008 => "a fault (HV_FAULT)",
        0xfae9_400f => {
            "not supported (HV_UNSUPPORTED): this Mac or macOS lacks the feature; \
             the VMM needs Apple silicon and macOS 15 or later (and, inside another \
             VM, an M3 or later chip with nested virtualization)"
        }
        _ => "an unknown Hypervisor.framework error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpidr_matches_kvm_layout() {
        assert_eq!(mpidr(0), 0x8000_0000);
        assert_eq!(mpidr(15), 0x8000_000f);
        assert_eq!(mpidr(16), 0x8000_0100);
        assert_eq!(mpidr(37), 0x8000_0205);
        // The PSCI table finds a vCPU by the affinity bits.
        assert_eq!(mpidr(37) & psci::AFFINITY_MASK, 0x205);
    }

    #[test]
    fn every_error_says_what_to_do() {
        assert!(describe(0xfae9_4007u32 as i32).contains("codesign"));
        assert!(describe(0xfae9_400fu32 as i32).contains("macOS 15"));
        assert!(describe(0xfae9_4002u32 as i32).contains("one VM per process"));
        assert_eq!(describe(7), "an unknown Hypervisor.framework error");
    }
}
