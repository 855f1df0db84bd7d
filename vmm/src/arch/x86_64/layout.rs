//! Guest-physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT               0x0000_0520  IDT
//! 0x0000_7000  boot_params       0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD    0x0000_c000  random seed (setup_data)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (reserved to 0xa_0000)
//! 0x0010_0000  high memory: kernel (ELF at its link address, 16 MiB), initramfs at the top of RAM
//! 0xc000_0000  MMIO gap to 4 GiB: boot timer, virtio-mmio devices, IOAPIC, local APIC
//! 0x1_0000_0000 RAM beyond 3 GiB
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The boot-time random seed (a `setup_data` entry the zero page points to).
pub const RNG_SEED_START: u64 = 0xc000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const MPTABLE_START: u64 = 0x9_fc00;
/// End of conventional memory: the MP table lives just below it.
pub const EBDA_END: u64 = 0xa_0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The boot-timer page.
pub const BOOT_TIMER_START: u64 = 0xd000_0000;
/// The first virtio-mmio device; each takes one 4 KiB page.
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// The guest-physical ranges for `size` bytes of RAM: below the MMIO gap,
/// then above 4 GiB. Each entry is (guest address, length, file offset).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, MMIO_GAP_START, 0),
            (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START),
        ]
    }
}

/// The serial port and its ISA interrupt.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// IOAPIC pins: 24, the first 16 are ISA interrupts.
pub const IOAPIC_PINS: u8 = 24;
/// The interrupt lines handed to virtio-mmio devices, one each: from the
/// first free ISA line to the IOAPIC's last pin.
pub const VIRTIO_IRQ_START: u32 = 5;
pub const VIRTIO_IRQ_END: u32 = IOAPIC_PINS as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_large_memory_skips_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20, 0)]);
        let big = 4u64 << 30;
        assert_eq!(
            ram_ranges(big),
            vec![
                (0, MMIO_GAP_START, 0),
                (MMIO_GAP_END, big - MMIO_GAP_START, MMIO_GAP_START)
            ]
        );
    }
}
