//! x86_64 machine setup: memory layout, kernel loading and boot parameters,
//! MP table, CPUID, and the vCPU's 64-bit entry state.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod syscall_names;

use std::sync::{Arc, Mutex};

use devices::legacy::{SerialDevice, I8042};
use devices::Bus;
use hypervisor::{CpuidEntry, Hypervisor, Vcpu, VcpuState, VmState};
use vm_memory::GuestMemoryMmap;
use vmm_os::EventFd;

use super::{MachineShape, Vcpus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
}

/// What makes a vCPU this machine's: its CPUID (topology, features the
/// guest may use). Saved with the machine; a restore sets it again.
pub type VcpuIdentity = Vec<CpuidEntry>;

/// The console and how the guest reboots (through the keyboard
/// controller, which stops the VM).
pub const KERNEL_ARGS: &[&str] = &["console=ttyS0", "reboot=k"];

/// Which architecture this is.
pub const ARCH: super::Architecture = super::Architecture::X86_64;

/// QEMU for this architecture, which boot benchmarks compare with: its
/// binary and Debian package.
pub const QEMU: (&str, &str) = ("qemu-system-x86_64", "qemu-system-x86");

/// The most vCPUs the machine can describe (the MP table's limit).
pub fn max_vcpus() -> u32 {
    mptable::max_cpus()
}

/// The kernel arguments that announce the virtio-mmio devices, each at
/// `(MMIO page, interrupt line)`: x86_64 has no device tree.
pub fn device_args(virtio: &[(u64, u32)]) -> Vec<String> {
    virtio
        .iter()
        .map(|(base, irq)| format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
        .collect()
}

/// Puts the serial port and the keyboard controller (whose reset line
/// writes `reset_evt`) on the port bus.
pub fn place_legacy_devices(
    pio: &Bus,
    _mmio: &Bus,
    serial: Arc<Mutex<SerialDevice>>,
    reset_evt: EventFd,
) -> Result<(), devices::bus::Error> {
    pio.insert(serial, layout::SERIAL_PORT, SerialDevice::LEN)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset_evt))),
        I8042::BASE,
        I8042::LEN,
    )
}

/// Creates a booting machine's vCPUs, each with its CPUID and local APIC.
pub fn create_vcpus(
    hv: &dyn Hypervisor,
    vm: &dyn hypervisor::Vm,
    count: u32,
    pvm: bool,
) -> Result<(Vcpus, Vec<VcpuIdentity>), Error> {
    let supported = hv.supported_cpuid()?;
    let identities: Vec<VcpuIdentity> = (0..count)
        .map(|id| cpuid::for_vcpu(&supported, id, count, pvm))
        .collect();
    let mut vcpus = Vec::with_capacity(identities.len());
    for (id, entries) in identities.iter().enumerate() {
        let vcpu = vm.create_vcpu(id as u32)?;
        vcpu.set_cpuid(entries)?;
        vcpu.configure_lapic()?;
        vcpus.push(vcpu);
    }
    Ok((vcpus, identities))
}

/// Restores a saved machine's interrupt controllers, timers and clock
/// (`vm_state`), then creates its vCPUs in their saved identity and state.
pub fn restore_vcpus(
    vm: &dyn hypervisor::Vm,
    identities: &[VcpuIdentity],
    states: &[VcpuState],
    vm_state: &VmState,
) -> Result<Vcpus, Error> {
    vm.restore_state(vm_state)?;
    let mut vcpus = Vec::with_capacity(identities.len());
    for (id, (entries, state)) in identities.iter().zip(states).enumerate() {
        let vcpu = vm.create_vcpu(id as u32)?;
        vcpu.set_cpuid(entries)?;
        vcpu.restore_state(state)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Writes what the kernel reads besides the zero page (the MP table, the
/// GDT and page tables) and puts vCPU 0 at the kernel's 64-bit entry.
pub fn setup_boot(
    mem: &GuestMemoryMmap,
    vcpus: &[Box<dyn Vcpu>],
    loaded: &boot::LoadedKernel,
    shape: &MachineShape,
) -> Result<(), Error> {
    mptable::setup(mem, shape.vcpus)?;
    regs::write_boot_tables(mem)?;
    let Some(vcpu) = vcpus.first() else {
        return Ok(());
    };
    let sregs = regs::boot_sregs(&vcpu.get_sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs::boot_regs(loaded.entry))?;
    vcpu.set_fpu(&regs::boot_fpu())?;
    if let Err(e) = vcpu.set_msrs(&regs::boot_msrs()) {
        tracing::info!("boot MSRs not set ({e}); the guest runs without them");
    }
    Ok(())
}

/// Where the vCPU is in the guest's code, for a report.
pub fn program_counter(vcpu: &dyn Vcpu) -> Option<u64> {
    vcpu.get_regs().ok().map(|r| r.rip)
}
