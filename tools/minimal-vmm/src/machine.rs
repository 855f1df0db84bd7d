//! The machine: RAM at 2 GiB, the GICv3 and UART where the VMM puts them,
//! the Image 2 MiB into RAM, the initramfs below the device tree at the
//! top of RAM.

use std::io::Write;
use std::path::Path;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{Kvm, VcpuExit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not an arm64 Image (no \"ARM\\x64\" magic)")]
    NotAnImage(String),
    #[error("the kernel and initramfs do not fit in {0} MiB")]
    TooBig(u64),
    #[error("cannot map guest memory: {0}")]
    Map(std::io::Error),
    #[error("cannot build the device tree: {0}")]
    Fdt(#[from] vm_fdt::Error),
    #[error("unexpected exit: {0}")]
    Exit(String),
}

const RAM_START: u64 = 0x8000_0000;
const RAM_MIB: u64 = 256;
const KERNEL_BASE: u64 = RAM_START + 0x20_0000;
const FDT_ROOM: u64 = 0x20_0000;
const UART: u64 = 0x0100_0000;
const GIC_DIST: u64 = 0x0800_0000;
const GIC_REDIST: u64 = 0x080a_0000;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Boots `image` with `initramfs` and runs it until it powers off.
pub fn boot(image: &Path, initramfs: &Path, cmdline: &str) -> Result<(), Error> {
    let kernel = read(image)?;
    let initrd = read(initramfs)?;
    if kernel.len() < 64 || kernel[56..60] != *b"ARM\x64" {
        return Err(Error::NotAnImage(image.display().to_string()));
    }
    let word = |at: usize| u64::from_le_bytes(kernel[at..at + 8].try_into().unwrap_or_default());
    let text_offset = if word(16) == 0 { 0x8_0000 } else { word(8) };

    let size = RAM_MIB << 20;
    let fdt_at = RAM_START + size - FDT_ROOM;
    let initrd_at = (fdt_at - initrd.len() as u64) & !0xfff;
    let kernel_at = KERNEL_BASE + text_offset;
    if kernel_at + kernel.len() as u64 > initrd_at {
        return Err(Error::TooBig(RAM_MIB));
    }

    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ram == libc::MAP_FAILED {
        return Err(Error::Map(std::io::Error::last_os_error()));
    }
    // SAFETY: `ram` is `size` bytes, mapped for the life of the process
    // (never unmapped), and only this thread writes it before the vCPU runs.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram as *mut u8, size as usize) };
    let at = |gpa: u64| (gpa - RAM_START) as usize;
    mem[at(kernel_at)..at(kernel_at) + kernel.len()].copy_from_slice(&kernel);
    mem[at(initrd_at)..at(initrd_at) + initrd.len()].copy_from_slice(&initrd);

    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_START,
        memory_size: size,
        userspace_addr: ram as u64,
    };
    // SAFETY: the region is the mapping above, which lives as long as the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(kvm("KVM_ARM_PREFERRED_TARGET"))?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&init).map_err(kvm("KVM_ARM_VCPU_INIT"))?;

    let mut gic = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut gic)
        .map_err(kvm("KVM_CREATE_DEVICE"))?;
    let (dist, redist, lines) = (GIC_DIST, GIC_REDIST, 128u32);
    for (group, attr, addr) in [
        (
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST,
            &dist as *const u64 as u64,
        ),
        (
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST,
            &redist as *const u64 as u64,
        ),
        (KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &lines as *const u32 as u64),
        (KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0),
    ] {
        let attr = kvm_device_attr {
            flags: 0,
            group,
            attr: u64::from(attr),
            addr,
        };
        gic.set_device_attr(&attr)
            .map_err(kvm("KVM_SET_DEVICE_ATTR (vGIC)"))?;
    }

    let mut mpidr = [0u8; 8];
    vcpu.get_one_reg(0x6030_0000_0013_c005, &mut mpidr)
        .map_err(kvm("MPIDR_EL1"))?;
    let tree = device_tree(
        u64::from_le_bytes(mpidr) & 0xff_00ff_ffff,
        cmdline,
        (initrd_at, initrd.len() as u64),
    )?;
    mem[at(fdt_at)..at(fdt_at) + tree.len()].copy_from_slice(&tree);

    // PSTATE EL1h with D, A, I, F masked; PC; X0 = the device tree.
    for (reg, value) in [
        (0x6030_0000_0010_0042u64, 0x3c5u64),
        (0x6030_0000_0010_0040, kernel_at),
        (0x6030_0000_0010_0000, fdt_at),
    ] {
        vcpu.set_one_reg(reg, &value.to_le_bytes())
            .map_err(kvm("KVM_SET_ONE_REG"))?;
    }

    let mut out = std::io::stdout().lock();
    let mut ier = 0u8;
    loop {
        match vcpu.run().map_err(kvm("KVM_RUN"))? {
            VcpuExit::MmioWrite(addr, data) => match addr.wrapping_sub(UART) {
                0 => {
                    let _ = out.write_all(&data[..1]);
                    let _ = out.flush();
                }
                1 => ier = data[0],
                _ => {}
            },
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0);
                match addr.wrapping_sub(UART) {
                    // IIR: "transmitter empty" while that interrupt is
                    // enabled, which is how the 8250 driver without an
                    // interrupt line learns to send more.
                    2 => data[0] = if ier & 0x02 != 0 { 0x02 } else { 0x01 },
                    // LSR: transmitter empty.
                    5 => data[0] = 0x60,
                    _ => {}
                }
            }
            VcpuExit::SystemEvent(..) => return Ok(()),
            other => return Err(Error::Exit(format!("{other:?}"))),
        }
    }
}

fn device_tree(mpidr: u64, cmdline: &str, initrd: (u64, u64)) -> Result<Vec<u8>, Error> {
    let mut fdt = vm_fdt::FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", 1)?;
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cmdline)?;
    fdt.property_string("stdout-path", "/uart@1000000")?;
    fdt.property_u64("linux,initrd-start", initrd.0)?;
    fdt.property_u64("linux,initrd-end", initrd.0 + initrd.1)?;
    fdt.end_node(chosen)?;
    let memory = fdt.begin_node("memory@80000000")?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[RAM_START, RAM_MIB << 20])?;
    fdt.end_node(memory)?;
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
    fdt.property_string("device_type", "cpu")?;
    fdt.property_string("compatible", "arm,arm-v8")?;
    fdt.property_string("enable-method", "psci")?;
    fdt.property_u64("reg", mpidr)?;
    fdt.end_node(cpu)?;
    fdt.end_node(cpus)?;
    let psci = fdt.begin_node("psci")?;
    fdt.property_string("compatible", "arm,psci-0.2")?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;
    let gic = fdt.begin_node("intc@8000000")?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_array_u64("reg", &[GIC_DIST, 0x1_0000, GIC_REDIST, 0x2_0000])?;
    fdt.property_phandle(1)?;
    fdt.end_node(gic)?;
    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_array_u32("interrupts", &[1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4])?;
    fdt.end_node(timer)?;
    let uart = fdt.begin_node("uart@1000000")?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[UART, 0x1000])?;
    fdt.property_u32("clock-frequency", 1_843_200)?;
    fdt.end_node(uart)?;
    fdt.end_node(root)?;
    Ok(fdt.finish()?)
}
