//! Hypervisor abstraction: `Hypervisor` -> `Vm` -> `Vcpu`.
//!
//! The traits use only this crate's own types (registers, exits, memory slots,
//! capabilities), so the VMM never sees a backend's types. Backends:
//! - `kvm` (Linux, on kvm-ioctls);
//! - `hvf` (macOS on Apple silicon, on Hypervisor.framework).

use std::fmt;

use vmm_os::EventFd;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_os = "linux")]
pub mod kvm;

/// The Hypervisor.framework backend (macOS on Apple silicon). Its parts
/// that are not framework calls (syndrome decoding, PSCI, the timer, the
/// emulated system registers, the start gate) are also built into the
/// tests on Linux, where CI runs them.
#[cfg(any(all(target_os = "macos", target_arch = "aarch64"), test))]
pub mod hvf;

/// The traits of this build's architecture, which the shared ones extend:
/// `HypervisorArch` (of [`Hypervisor`]), `VmArch` (of [`Vm`]) and
/// `VcpuArch` (of [`Vcpu`]).
#[cfg(target_arch = "aarch64")]
pub use aarch64::{GicLayout, HypervisorArch, VcpuArch, VmArch};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    CpuidEntry, DescriptorTable, FpuState, HypervisorArch, MsrEntry, SegmentRegister,
    SpecialRegisters, StandardRegisters, VcpuArch, VmArch,
};

/// Installs the handler of the signal that kicks a vCPU thread out of the
/// guest, for this host's backend (process-wide). Call it before any vCPU
/// thread exists, so that an early kick cannot end the process.
pub fn install_kick_handler(signal: i32) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        kvm::install_kick_handler(signal)
    }
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    {
        hvf::backend::install_kick_handler(signal)
    }
}

/// Errors from any hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}; {hint}")]
    Open {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error(
        "the hypervisor API version is {found}, this VMM needs {expected}; update the host kernel"
    )]
    ApiVersion { found: i32, expected: i32 },
    #[error("the hypervisor lacks the capability {0}; this VMM needs it (update the host kernel)")]
    MissingCapability(&'static str),
    #[error("hypervisor call {call} failed: {source}")]
    Call {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("vCPU id {id} is out of range: this host allows at most {max} vCPUs per VM")]
    VcpuId { id: u32, max: u32 },
    #[error("{0} is not supported on this architecture yet")]
    Unsupported(&'static str),
}

impl Error {
    /// Wraps the OS error of a failed backend call.
    pub fn call(call: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Call {
            call,
            source: source.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which hypervisor and what kind of host it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypervisorKind {
    /// KVM with hardware virtualization (VT-x or AMD-V), on bare metal.
    KvmHardware,
    /// KVM with hardware virtualization, itself running inside a VM.
    KvmNested,
    /// The out-of-tree PVM module: guests run without hardware
    /// virtualization and every guest kernel instruction is emulated.
    KvmPvm,
    /// macOS Hypervisor.framework.
    HypervisorFramework,
}

impl HypervisorKind {
    /// Whether guests need the `pvm` kernel flavour and its command line.
    pub fn needs_pvm_guest(self) -> bool {
        self == HypervisorKind::KvmPvm
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::KvmHardware => "KVM with hardware virtualization",
            HypervisorKind::KvmNested => {
                "KVM with hardware virtualization, nested inside another VM"
            }
            HypervisorKind::KvmPvm => {
                "KVM PVM (no hardware virtualization: guest kernel code is emulated)"
            }
            HypervisorKind::HypervisorFramework => "Hypervisor.framework",
        })
    }
}

/// A capability the VMM relies on, and whether the host has it.
#[derive(Debug, Clone)]
pub struct Capability {
    pub name: &'static str,
    pub present: bool,
}

/// One range of guest physical memory backed by host memory.
#[derive(Debug, Clone, Copy)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Start of the host mapping; it must stay mapped while the VM uses it.
    pub host_addr: u64,
}

/// Where a guest write triggers an ioeventfd.
#[derive(Debug, Clone, Copy)]
pub enum IoEventAddress {
    Pio(u64),
    Mmio(u64),
}

/// Why a vCPU left guest mode.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest read from an I/O port: fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// The guest wrote to an I/O port.
    IoOut { port: u16, data: &'a [u8] },
    /// The guest read from an MMIO address without memory behind it: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// The guest wrote to an MMIO address without memory behind it.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The vCPU halted with interrupts off (only seen without an in-kernel irqchip).
    Hlt,
    /// The guest triple-faulted (or otherwise asked for a shutdown the VMM
    /// did not model).
    Shutdown,
    /// The guest asked for a reset or power-off through a firmware interface.
    SystemEvent { kind: SystemEventKind },
    /// The run was interrupted (a signal or an immediate-exit request).
    Interrupted,
    /// The hypervisor could not run the guest: `suberror` 1 is an
    /// instruction its emulator does not handle.
    InternalError { suberror: u32, data: Vec<u64> },
    /// The hypervisor refused to enter the guest.
    FailEntry { reason: u64, cpu: u32 },
    /// An exit this VMM does not handle.
    Other(String),
}

/// A vCPU's complete state (registers, FPU, MSRs, local APIC, pending
/// events...), one variant per backend, saved by a backend and restored by
/// the same backend. It travels inside snapshots and to forked children;
/// a state of another backend does not decode where that backend is absent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum VcpuState {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[serde(rename = "kvm-x86_64")]
    KvmX86_64(Box<kvm::x86_64::state::KvmVcpuState>),
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    #[serde(rename = "kvm-aarch64")]
    KvmAarch64(Box<kvm::aarch64::state::KvmVcpuState>),
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    #[serde(rename = "hvf-aarch64")]
    HvfAarch64(Box<hvf::state::HvfVcpuState>),
}

/// A VM's own state outside its vCPUs and memory: interrupt controllers,
/// timers, clock. One variant per backend, like [`VcpuState`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[serde(rename = "kvm-x86_64")]
    KvmX86_64(Box<kvm::x86_64::state::KvmVmState>),
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    #[serde(rename = "kvm-aarch64")]
    KvmAarch64(Box<kvm::aarch64::state::KvmVmState>),
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    #[serde(rename = "hvf-aarch64")]
    HvfAarch64(Box<hvf::state::HvfVmState>),
}

/// Kinds of firmware system events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEventKind {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// A KVM-style hypervisor: opens VMs.
pub trait Hypervisor: HypervisorArch + Send + Sync {
    /// What kind of hypervisor and host this is.
    fn kind(&self) -> HypervisorKind;
    /// The capabilities the VMM relies on, with their presence.
    fn capabilities(&self) -> Vec<Capability>;
    /// The most vCPUs one VM may have on this host.
    fn max_vcpus(&self) -> u32;
    /// Creates an empty VM.
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
}

/// One virtual machine: memory, interrupt controller, vCPUs.
pub trait Vm: VmArch + Send + Sync {
    /// Maps a range of host memory into the guest.
    ///
    /// # Safety
    /// `slot.host_addr .. + size` must stay mapped and valid for as long as
    /// the VM may access it (until the slot is removed or the VM is dropped).
    unsafe fn set_memory_slot(&self, slot: MemorySlot) -> Result<()>;
    /// Creates the platform devices that must exist before the vCPUs
    /// (x86_64: the PIC, IOAPIC and local APICs, and the PIT; aarch64:
    /// none, its GIC comes after them, `VmArch::create_gic`).
    fn create_platform_devices(&self) -> Result<()>;
    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Signals interrupt line `gsi` whenever `fd` is written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Writes `fd` whenever the guest writes to `addr` (optionally only
    /// when the value written equals `datamatch`).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// Saves the interrupt controllers, timers and clock. Call it with
    /// every vCPU paused.
    fn save_state(&self) -> Result<VmState>;
    /// Restores what `save_state` saved, into a VM whose platform devices
    /// exist (`create_platform_devices`).
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// One virtual CPU. It runs on its own thread.
pub trait Vcpu: VcpuArch + Send {
    /// Runs the guest until it exits to the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// Arranges for `run` to return `VcpuExit::Interrupted` promptly when
    /// the calling thread receives `signal` (also when the signal arrives
    /// just before the guest is entered). Call it on the vCPU's own thread.
    fn enable_kick_signal(&mut self, signal: i32) -> Result<()>;
    /// Finishes an I/O or MMIO exit the VMM has handled without running
    /// more guest code, so that the saved state is consistent. Call it on
    /// the vCPU's thread before `save_state`.
    fn complete_pending_io(&mut self) -> Result<()>;
    /// Saves the complete vCPU state (the vCPU must not be running).
    fn save_state(&self) -> Result<VcpuState>;
    /// Restores a state from `save_state` into a fresh vCPU whose CPUID is
    /// set.
    fn restore_state(&self, state: &VcpuState) -> Result<()>;
}
