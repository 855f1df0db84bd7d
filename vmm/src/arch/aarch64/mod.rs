//! arm64 machine setup: memory layout, Image loading, the device tree, the
//! GICv3, and the boot vCPU's entry state (PSCI starts the others).

pub mod boot;
pub mod fdt;
pub mod layout;
pub mod syscall_names;

use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use devices::Bus;
use hypervisor::aarch64::redistributors_size;
use hypervisor::{GicLayout, Hypervisor, Vcpu, VcpuState, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_os::EventFd;

use super::{MachineShape, Vcpus};
use layout::{
    fdt_addr, GIC_DISTRIBUTOR, GIC_DISTRIBUTOR_LEN, GIC_LINES, GIC_REDISTRIBUTORS, UART_LEN,
    UART_START,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Fdt(#[from] fdt::Error),
    #[error("cannot write the device tree to guest memory: {0}")]
    WriteFdt(vm_memory::GuestMemoryError),
    #[error("cannot read the host's random generator for the guest's boot seed: {0}; check that getrandom(2) works on this host")]
    Seed(std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
}

/// What makes a vCPU this machine's beyond its saved state: nothing on
/// arm64 (its MPIDR follows from its index).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VcpuIdentity;

/// The console (the device tree's UART, which the 8250 driver names
/// ttyS0). Reboot and power-off are PSCI calls that stop the VM.
pub const KERNEL_ARGS: &[&str] = &["console=ttyS0"];

/// Which architecture this is.
pub const ARCH: super::Architecture = super::Architecture::Aarch64;

/// QEMU for this architecture, which boot benchmarks compare with: its
/// binary and Debian package.
pub const QEMU: (&str, &str) = ("qemu-system-aarch64", "qemu-system-arm");

/// The most vCPUs the machine has room for.
pub fn max_vcpus() -> u32 {
    layout::MAX_VCPUS
}

/// Nothing: the device tree announces the virtio devices.
pub fn device_args(_virtio: &[(u64, u32)]) -> Vec<String> {
    Vec::new()
}

/// Puts the UART on the MMIO bus. There is no reset line: PSCI
/// SYSTEM_RESET reaches the VMM as a system event.
pub fn place_legacy_devices(
    _pio: &Bus,
    mmio: &Bus,
    serial: Arc<Mutex<SerialDevice>>,
    _reset_evt: EventFd,
) -> Result<(), devices::bus::Error> {
    mmio.insert(serial, UART_START, UART_LEN)
}

const GIC: GicLayout = GicLayout {
    distributor: GIC_DISTRIBUTOR,
    redistributors: GIC_REDISTRIBUTORS,
    lines: GIC_LINES,
};

/// Creates a booting machine's vCPUs (vCPU 0 runs, the others wait for
/// the guest's PSCI CPU_ON), then the GIC, which needs them all.
pub fn create_vcpus(
    _hv: &dyn Hypervisor,
    vm: &dyn hypervisor::Vm,
    count: u32,
    _pvm: bool,
) -> Result<(Vcpus, Vec<VcpuIdentity>), Error> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.init(id != 0)?;
        vcpus.push(vcpu);
    }
    vm.create_gic(&GIC)?;
    Ok((vcpus, vec![VcpuIdentity; count as usize]))
}

/// Creates a restored machine's vCPUs and GIC, then restores the vCPUs'
/// saved state (registers, timer, power state) and the GIC's
/// (`vm_state`), which is per vCPU.
pub fn restore_vcpus(
    vm: &dyn hypervisor::Vm,
    _identities: &[VcpuIdentity],
    states: &[VcpuState],
    vm_state: &VmState,
) -> Result<Vcpus, Error> {
    let mut vcpus = Vec::with_capacity(states.len());
    for id in 0..states.len() {
        let vcpu = vm.create_vcpu(id as u32)?;
        // Powered on: the saved MP state says whether it runs.
        vcpu.init(false)?;
        vcpus.push(vcpu);
    }
    vm.create_gic(&GIC)?;
    for (vcpu, state) in vcpus.iter().zip(states) {
        vcpu.restore_state(state)?;
    }
    vm.restore_state(vm_state)?;
    Ok(vcpus)
}

/// Writes the device tree at the top of RAM and puts vCPU 0 at the
/// kernel's entry with X0 pointing at it.
pub fn setup_boot(
    mem: &GuestMemoryMmap,
    vcpus: &[Box<dyn Vcpu>],
    loaded: &boot::LoadedKernel,
    shape: &MachineShape,
) -> Result<(), Error> {
    let mpidrs = vcpus
        .iter()
        .map(|v| v.mpidr())
        .collect::<Result<Vec<u64>, _>>()?;
    let virtio: Vec<fdt::MmioDevice> = shape
        .virtio
        .iter()
        .map(|&(base, spi)| fdt::MmioDevice {
            base,
            len: devices::virtio::mmio::MMIO_LEN,
            spi,
        })
        .collect();
    let mut seed = [0u8; 32];
    vmm_os::fill_random(&mut seed).map_err(Error::Seed)?;
    let tree = fdt::build(
        &fdt::Machine {
            memory: (layout::RAM_START, shape.mem_size),
            mpidrs: &mpidrs,
            gic_distributor: (GIC.distributor, GIC_DISTRIBUTOR_LEN),
            gic_redistributors: (GIC.redistributors, redistributors_size(shape.vcpus)),
            uart: fdt::MmioDevice {
                base: UART_START,
                len: UART_LEN,
                spi: layout::SERIAL_IRQ,
            },
            virtio: &virtio,
            cmdline: &loaded.cmdline,
            initrd: loaded.initrd,
            rng_seed: &seed,
        },
        layout::FDT_MAX_SIZE as usize,
    )?;
    let at = fdt_addr(shape.mem_size);
    mem.write_slice(&tree, GuestAddress(at))
        .map_err(Error::WriteFdt)?;
    if let Some(vcpu) = vcpus.first() {
        vcpu.set_boot_regs(loaded.entry, at)?;
    }
    Ok(())
}

/// Where the vCPU is in the guest's code, for a report.
pub fn program_counter(vcpu: &dyn Vcpu) -> Option<u64> {
    vcpu.program_counter().ok()
}
