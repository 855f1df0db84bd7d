//! Guest-physical memory map of the arm64 machine (the addresses of QEMU's
//! `virt` machine where it has the same device, which arm64 Linux boots on
//! as a matter of course).
//!
//! ```text
//! 0x0100_0000  16550 UART (SPI 1)
//! 0x0200_0000  boot timer page
//! 0x0800_0000  GICv3 distributor (64 KiB)
//! 0x080a_0000  GICv3 redistributors (128 KiB per vCPU, up to 251 vCPUs)
//! 0x0a00_0000  virtio-mmio devices, 4 KiB each (SPI 16 up)
//! 0x8000_0000  RAM: the kernel 2 MiB in, the initramfs below the device
//!              tree, the device tree in the last 2 MiB
//! ```

/// The console UART and its shared interrupt (an SPI number; the GSI an
/// irqfd names on arm64 KVM is the SPI number).
pub const UART_START: u64 = 0x0100_0000;
pub const UART_LEN: u64 = 0x1000;
pub const SERIAL_IRQ: u32 = 1;

/// The boot-timer page.
pub const BOOT_TIMER_START: u64 = 0x0200_0000;

pub const GIC_DISTRIBUTOR: u64 = 0x0800_0000;
pub const GIC_DISTRIBUTOR_LEN: u64 = 0x1_0000;
pub const GIC_REDISTRIBUTORS: u64 = 0x080a_0000;
/// Interrupt lines in all: 32 private to each vCPU, then 96 shared.
pub const GIC_LINES: u32 = 128;

/// The first virtio-mmio device; each takes one 4 KiB page.
pub const VIRTIO_MMIO_START: u64 = 0x0a00_0000;
/// The shared interrupts handed to virtio-mmio devices, one each.
pub const VIRTIO_IRQ_START: u32 = 16;
pub const VIRTIO_IRQ_END: u32 = GIC_LINES - 32;

/// The most vCPUs whose redistributors fit below the virtio devices.
pub const MAX_VCPUS: u32 = ((VIRTIO_MMIO_START - GIC_REDISTRIBUTORS) / REDISTRIBUTOR_LEN) as u32;
/// One vCPU's redistributor: two 64 KiB frames.
pub const REDISTRIBUTOR_LEN: u64 = 0x2_0000;

pub const RAM_START: u64 = 0x8000_0000;
/// The kernel's 2 MiB-aligned base (the Image header's text offset is
/// added); the first 2 MiB of RAM stay free, as on QEMU's `virt`.
pub const KERNEL_BASE: u64 = RAM_START + 0x20_0000;
/// The device tree's room at the top of RAM.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

/// The guest-physical ranges for `size` bytes of RAM: one, at
/// [`RAM_START`]. Each entry is (guest address, length, file offset).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    vec![(RAM_START, size, 0)]
}

/// Where the device tree goes in `mem_size` bytes of RAM: the start of its
/// last 2 MiB (the arm64 boot protocol wants it 8-byte aligned and within
/// one 2 MiB block).
pub fn fdt_addr(mem_size: u64) -> u64 {
    RAM_START + mem_size - FDT_MAX_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    // Devices do not overlap, and RAM is above them all.
    const _: () = {
        assert!(UART_START + UART_LEN <= BOOT_TIMER_START);
        assert!(BOOT_TIMER_START + 0x1000 <= GIC_DISTRIBUTOR);
        assert!(GIC_DISTRIBUTOR + GIC_DISTRIBUTOR_LEN <= GIC_REDISTRIBUTORS);
        assert!(GIC_REDISTRIBUTORS + MAX_VCPUS as u64 * REDISTRIBUTOR_LEN <= VIRTIO_MMIO_START);
        assert!(
            VIRTIO_MMIO_START + (VIRTIO_IRQ_END - VIRTIO_IRQ_START) as u64 * 0x1000 <= RAM_START
        );
        assert!(SERIAL_IRQ < VIRTIO_IRQ_START);
        assert!(KERNEL_BASE.is_multiple_of(0x20_0000));
    };

    #[test]
    fn ram_is_one_range_with_the_device_tree_at_its_top() {
        assert_eq!(ram_ranges(256 << 20), vec![(RAM_START, 256 << 20, 0)]);
        assert_eq!(fdt_addr(256 << 20), RAM_START + (254 << 20));
    }
}
