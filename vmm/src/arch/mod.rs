//! The machine architecture, chosen at compile time: `x86_64` today,
//! `aarch64` next. Shared code names only `crate::arch::...`, never an
//! architecture's module, so adding one means adding a module with the
//! same items, not `cfg` arms through the builder (crosvm's `sys/` rule).
//!
//! What an architecture module provides:
//! - `layout`: the guest physical memory map (RAM, the MMIO gap and what
//!   sits in it: the boot timer, virtio-mmio slots, interrupt controllers),
//!   the console's place and interrupt, the interrupt lines virtio devices
//!   get;
//! - `boot`: loading the kernel and initramfs and writing what the kernel
//!   reads at entry (x86_64: the zero page; aarch64: the FDT);
//! - the vCPUs' entry state (`regs`) and identity (x86_64: `cpuid`, the
//!   MP table in `mptable`).

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
