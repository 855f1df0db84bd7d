//! The Hypervisor.framework backend (macOS 15 or later on Apple silicon).
//!
//! Hypervisor.framework leaves to the VMM what KVM does in the kernel:
//! decoding MMIO accesses from the exception syndrome ([`esr`]), PSCI
//! ([`psci`]), sleeping on WFI until the timer or an interrupt
//! ([`timer`]), the system registers it traps ([`sysreg`]), and the fact
//! that a vCPU lives on the thread that created it ([`gate`]). Those parts
//! are plain logic, tested on Linux. The framework calls are in `backend`,
//! built on macOS only.

pub mod esr;
pub mod gate;
pub mod psci;
pub mod sysreg;
pub mod timer;
