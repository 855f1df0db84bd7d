//! aarch64: what a hypervisor does for an arm64 machine beyond the shared
//! traits: the vCPU's initialisation (PSCI 0.2; secondaries powered off
//! until the guest's PSCI CPU_ON), the boot protocol's entry registers,
//! MPIDR_EL1 for the device tree, and the in-kernel GICv3, which exists
//! only once every vCPU does.

use crate::Result;

/// Where the GICv3 sits in guest physical memory, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicLayout {
    /// The distributor's 64 KiB.
    pub distributor: u64,
    /// The redistributors: two 64 KiB frames per vCPU, one vCPU after
    /// another.
    pub redistributors: u64,
    /// Interrupt lines in all: the 32 private ones of each vCPU and the
    /// shared ones (SPIs) after them; a multiple of 32, at most 1024.
    pub lines: u32,
}

/// The size of the redistributor region of `vcpus` vCPUs.
pub fn redistributors_size(vcpus: u32) -> u64 {
    u64::from(vcpus) * 2 * 0x1_0000
}

/// What an aarch64 hypervisor adds to [`crate::Hypervisor`]: nothing an
/// arm64 machine needs beyond the shared traits.
pub trait HypervisorArch {}

/// What an aarch64 VM adds to [`crate::Vm`].
pub trait VmArch {
    /// Creates the GICv3 at `layout` and initialises it. Call it once,
    /// after every vCPU exists and is initialised (the redistributors are
    /// per vCPU), before any runs.
    fn create_gic(&self, layout: &GicLayout) -> Result<()>;
}

/// What an aarch64 vCPU adds to [`crate::Vcpu`].
pub trait VcpuArch {
    /// Makes the vCPU an arm64 CPU of the host's preferred kind with PSCI
    /// 0.2. `powered_off`: a secondary, which waits for the guest's PSCI
    /// CPU_ON.
    fn init(&self, powered_off: bool) -> Result<()>;
    /// The Linux arm64 boot protocol's entry state: PC at `entry`, X0 the
    /// device tree's guest address, PSTATE EL1h with D, A, I and F masked.
    fn set_boot_regs(&self, entry: u64, fdt: u64) -> Result<()>;
    /// MPIDR_EL1, the vCPU's affinity (the device tree's `reg` of its cpu
    /// node).
    fn mpidr(&self) -> Result<u64>;
    /// The program counter, for reports.
    fn program_counter(&self) -> Result<u64>;
}
