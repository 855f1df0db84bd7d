//! The Intel MultiProcessor Specification (1.4) table: how a guest without
//! ACPI finds its CPUs, its IOAPIC and its interrupt routing. Without it
//! Linux scans the BIOS area (1.4 s under emulation) and boots one CPU.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_END, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} vCPUs do not fit in the MP table; the most is {max}", max = max_cpus())]
    TooManyCpus(u32),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
/// Bus, IOAPIC, one interrupt entry per IOAPIC pin, two local interrupts.
const FIXED_ENTRIES_LEN: usize = SMALL_ENTRY_LEN * (2 + IOAPIC_PINS as usize + 2);

/// The most CPUs whose entries fit between `MPTABLE_START` and the end of
/// conventional memory.
pub const fn max_cpus() -> u32 {
    let space = (EBDA_END - MPTABLE_START) as usize - FLOATING_LEN - HEADER_LEN - FIXED_ENTRIES_LEN;
    (space / CPU_ENTRY_LEN) as u32
}

// Entry types and flags from the specification.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature; FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ALL_LOCAL_APICS: u8 = 0xff;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` CPUs
/// placed at `MPTABLE_START`.
pub fn build(cpus: u32) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > max_cpus() {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8 + 1;
    let mut entries = Vec::new();
    for id in 0..cpus {
        let mut e = vec![ENTRY_PROCESSOR, id as u8, APIC_VERSION];
        e.push(CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 });
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entries.push(e);
    }
    entries.push([&[ENTRY_BUS, 0][..], b"ISA   "].concat());
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.push(ioapic);
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n goes to IOAPIC pin n; polarity/trigger conform to the bus.
        entries.push(vec![
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
    }
    entries.push(vec![
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        0,
        0,
        ALL_LOCAL_APICS,
        0,
    ]);
    entries.push(vec![
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        0,
        0,
        ALL_LOCAL_APICS,
        1,
    ]);

    let body: Vec<u8> = entries.concat();
    let table_len = HEADER_LEN + body.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // specification revision 1.4
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"SANDBOX     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&((MPTABLE_START as u32) + FLOATING_LEN as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // specification revision
    floating.push(0); // checksum
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
    floating[10] = checksum(&floating);

    Ok([floating, table].concat())
}

/// Writes the MP table for `cpus` CPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, cpus: u32) -> Result<(), Error> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn table_is_well_formed() {
        let t = build(2).unwrap();
        let (floating, table) = t.split_at(FLOATING_LEN);
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(floating), 0);
        let ptr = u32::from_le_bytes(floating[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + FLOATING_LEN as u64);
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        assert_eq!(count, 2 + 2 + IOAPIC_PINS as usize + 2);
        // First entry: the bootstrap processor with APIC id 0.
        assert_eq!(&table[HEADER_LEN..HEADER_LEN + 4], &[0, 0, APIC_VERSION, 3]);
        assert_eq!(table[HEADER_LEN + CPU_ENTRY_LEN + 3], CPU_ENABLED);
    }

    #[test]
    fn cpu_count_is_bounded_by_the_space() {
        let max = max_cpus();
        assert!(max >= 32, "room for {max} CPUs");
        let t = build(max).unwrap();
        assert!(MPTABLE_START + t.len() as u64 <= EBDA_END);
        assert!(matches!(build(max + 1), Err(Error::TooManyCpus(_))));
        assert!(build(0).is_err());
    }
}
