//! x86_64: vCPU state in this crate's own types, and what a hypervisor,
//! beyond the shared traits, does for an x86_64 machine: CPUID, the
//! registers of the 64-bit entry state, MSRs, the local APIC.

use crate::Result;

/// What an x86_64 hypervisor adds to [`crate::Hypervisor`].
pub trait HypervisorArch {
    /// The CPUID leaves the hypervisor can present to a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// What an x86_64 VM adds to [`crate::Vm`]: nothing an x86_64 machine
/// needs beyond the shared traits.
pub trait VmArch {}

/// What an x86_64 vCPU adds to [`crate::Vcpu`].
pub trait VcpuArch {
    fn get_regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Sets up the local APIC the way the boot protocol expects: LINT0 as
    /// ExtINT (the legacy PIC) and LINT1 as NMI.
    fn configure_lapic(&self) -> Result<()>;
}

/// General-purpose registers, instruction pointer and flags.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor part.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRegister {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (32-bit when set).
    pub db: bool,
    /// Descriptor type: code/data when set, system otherwise.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Limit in 4 KiB units when set.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl SegmentRegister {
    /// Builds a segment from a GDT entry (the descriptor's 64-bit encoding).
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
        let flag = |bit: u32| (entry >> bit) & 1 == 1;
        let g = flag(55);
        SegmentRegister {
            base,
            limit: if g {
                ((limit as u32) << 12) | 0xfff
            } else {
                limit as u32
            },
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            s: flag(44),
            dpl: ((entry >> 45) & 0x3) as u8,
            present: flag(47),
            avl: flag(52),
            l: flag(53),
            db: flag(54),
            g,
            unusable: !flag(47),
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: SegmentRegister,
    pub ds: SegmentRegister,
    pub es: SegmentRegister,
    pub fs: SegmentRegister,
    pub gs: SegmentRegister,
    pub ss: SegmentRegister,
    pub tr: SegmentRegister,
    pub ldt: SegmentRegister,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The parts of the x87/SSE state the boot protocol sets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub mxcsr: u32,
}

/// One CPUID leaf (and subleaf) as presented to the guest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend-neutral flags: bit 0 = the subleaf index is significant.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `CpuidEntry::flags` bit: the entry applies to subleaf `index` only.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// A model-specific register and its value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_decodes_64bit_code_segment() {
        // Flat 64-bit code segment: present, DPL 0, code exec/read, L=1, G=1.
        let seg = SegmentRegister::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert!(seg.present && seg.s && seg.l && seg.g && !seg.db);
        assert_eq!(seg.dpl, 0);
        assert!(!seg.unusable);
    }

    #[test]
    fn gdt_entry_decodes_null_as_unusable() {
        let seg = SegmentRegister::from_gdt_entry(0, 0);
        assert!(seg.unusable && !seg.present);
    }
}
