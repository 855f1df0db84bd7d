//! The machine architecture, chosen at compile time. Shared code names
//! only `crate::arch::...`, never an architecture's module, so adding one
//! means adding a module with the same items, not `cfg` arms through the
//! builder (crosvm's `sys/` rule).
//!
//! What an architecture module provides:
//! - `layout`: the guest physical memory map (`ram_ranges`; the boot
//!   timer, virtio-mmio slots `VIRTIO_MMIO_START` with their interrupt
//!   lines `VIRTIO_IRQ_START..VIRTIO_IRQ_END`, the console's
//!   `SERIAL_IRQ`);
//! - `boot`: checking and loading the kernel and initramfs
//!   (`KernelImage`, `check_memory`, `bulk_ranges`, `load`);
//! - `VcpuIdentity` (what a restore sets again on a vCPU before its state:
//!   x86_64 its CPUID), `create_vcpus` and `restore_vcpus`;
//! - `syscall_names::name`: a system call's name by number, for reports;
//! - `KERNEL_ARGS`, `device_args` (how the guest finds the virtio devices
//!   when it has no device tree), `place_legacy_devices` (the console and
//!   what else the guest expects), `setup_boot` (the tables the kernel
//!   reads at entry and the boot vCPU's registers), `ARCH` (which
//!   [`Architecture`] it is), `QEMU` (what boot benchmarks compare
//!   with), `max_vcpus` and
//!   `program_counter`, and one `Error` for them.

pub mod load;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::*;

/// The arm64 machine's plain-data parts (the device tree, the memory map,
/// the Image header), built on other hosts too so that their unit tests
/// run in CI here. What only the machine setup uses is unused here.
#[cfg(all(test, not(target_arch = "aarch64")))]
#[path = "aarch64"]
#[allow(dead_code)]
mod aarch64_data {
    pub mod boot;
    pub mod fdt;
    pub mod layout;
}

/// The machine architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    X86_64,
    Aarch64,
}

/// A machine's vCPUs, in id order.
pub type Vcpus = Vec<Box<dyn hypervisor::Vcpu>>;

/// What the boot tables describe of a machine besides its kernel.
#[derive(Debug, Clone)]
pub struct MachineShape {
    pub vcpus: u32,
    pub mem_size: u64,
    /// The virtio-mmio devices: (MMIO page, interrupt line) each.
    pub virtio: Vec<(u64, u32)>,
}
