//! The boot vCPU's state for the Linux 64-bit boot protocol: long mode with
//! paging on, a flat GDT, identity-mapped low memory, RSI at boot_params.

use hypervisor::{
    DescriptorTable, FpuState, MsrEntry, SegmentRegister, SpecialRegisters, StandardRegisters,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot {what} to guest memory: {source}")]
    Write {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Null, 64-bit code, data, TSS: flat segments.
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Writes the GDT, an empty IDT and page tables identity-mapping the first
/// GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let write = |what, bytes: &[u8], addr| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write { what, source })
    };
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write("GDT", &gdt, BOOT_GDT_START)?;
    write("IDT", &0u64.to_le_bytes(), BOOT_IDT_START)?;
    // Present | writable.
    write("PML4", &(PDPTE_START | 0x3).to_le_bytes(), PML4_START)?;
    write("PDPT", &(PDE_START | 0x3).to_le_bytes(), PDPTE_START)?;
    // Present | writable | 2 MiB page.
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write("page directory", &pd, PDE_START)
}

/// Segment and control registers for long mode.
pub fn boot_sregs(base: &SpecialRegisters) -> SpecialRegisters {
    let code = SegmentRegister::from_gdt_entry(CODE_SELECTOR, GDT[1]);
    let data = SegmentRegister::from_gdt_entry(DATA_SELECTOR, GDT[2]);
    let tss = SegmentRegister::from_gdt_entry(TSS_SELECTOR, GDT[3]);
    SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        gdt: DescriptorTable {
            base: BOOT_GDT_START,
            limit: (std::mem::size_of_val(&GDT) - 1) as u16,
        },
        idt: DescriptorTable {
            base: BOOT_IDT_START,
            limit: 7,
        },
        cr0: (base.cr0 | CR0_PE | CR0_ET | CR0_PG),
        cr3: PML4_START,
        cr4: base.cr4 | CR4_PAE,
        efer: base.efer | EFER_LME | EFER_LMA,
        ..*base
    }
}

/// General registers: entry point, boot stack, RSI at boot_params.
pub fn boot_regs(entry: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 and SSE control words at their reset values.
pub fn boot_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
    }
}

/// MSRs worth setting before boot; the host may refuse them (then the
/// guest runs without fast strings, which is only slower).
pub fn boot_msrs() -> Vec<MsrEntry> {
    vec![MsrEntry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, GDT[1]);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = boot_sregs(&SpecialRegisters::default());
        assert!(s.cs.l && s.cs.present);
        assert_eq!(s.cs.selector, CODE_SELECTOR);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(boot_regs(0x100_0000).rsi, ZERO_PAGE_START);
    }
}
