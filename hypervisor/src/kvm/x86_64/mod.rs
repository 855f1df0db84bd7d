//! The x86_64 half of the KVM backend: the VM's set-up and in-kernel
//! PIC/IOAPIC/PIT, CPUID, registers, MSRs and the local APIC of a vCPU
//! (`crate::x86_64`'s traits), and the state a snapshot saves (`state`).

use std::io;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::{os_err, KvmHypervisor, KvmVcpu};
use crate::x86_64::{HypervisorArch, VcpuArch, CPUID_FLAG_SIGNIFICANT_INDEX};
use crate::{
    CpuidEntry, DescriptorTable, Error, FpuState, MsrEntry, Result, SegmentRegister,
    SpecialRegisters, StandardRegisters,
};

pub mod state;

/// What the VMM needs of KVM on x86_64, beyond what every architecture needs.
pub(super) const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Where the TSS and identity-map pages go (Intel VT-x needs them below 4 GiB,
/// outside RAM). They sit just below the 4 GiB boundary, in the MMIO gap.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// What the backend learns about the host once, for its VMs and vCPUs.
#[derive(Debug, Clone, Default)]
pub(super) struct HostInfo {
    /// The MSRs a vCPU state covers (KVM_GET_MSR_INDEX_LIST).
    pub msrs: Arc<Vec<u32>>,
}

impl HostInfo {
    pub fn probe(kvm: &Kvm) -> HostInfo {
        let msrs = kvm
            .get_msr_index_list()
            .map(|list| state::msrs_to_save(list.as_slice()))
            .unwrap_or_default();
        HostInfo {
            msrs: Arc::new(msrs),
        }
    }
}

/// Whether this host itself runs under a hypervisor (CPUID leaf 1, ECX
/// bit 31).
pub(super) fn runs_nested() -> bool {
    std::arch::x86_64::__cpuid(1).ecx & (1 << 31) != 0
}

/// What a VM's vCPUs need to know: what the host does.
pub(super) type VmInfo = HostInfo;

/// What a new VM needs before anything else: the TSS and identity-map
/// pages (Intel VT-x).
pub(super) fn prepare_vm(fd: &VmFd, host: &HostInfo) -> Result<VmInfo> {
    fd.set_tss_address(TSS_ADDRESS)
        .map_err(|e| Error::call("KVM_SET_TSS_ADDR", os_err(e)))?;
    fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        .map_err(|e| Error::call("KVM_SET_IDENTITY_MAP_ADDR", os_err(e)))?;
    Ok(host.clone())
}

pub(super) use state::restore_vcpu;

/// The interrupt controllers, the PIT and the clock.
pub(super) fn save_vm(fd: &VmFd, _info: &VmInfo) -> Result<crate::VmState> {
    state::save_vm(fd)
}

/// Restores what `save_vm` saved, into a VM whose platform devices exist.
pub(super) fn restore_vm(fd: &VmFd, _info: &VmInfo, saved: &crate::VmState) -> Result<()> {
    state::restore_vm(fd, saved)
}

/// The vCPU's complete state, with the MSRs the host has.
pub(super) fn save_vcpu(fd: &VcpuFd, info: &VmInfo) -> Result<crate::VcpuState> {
    state::save_vcpu(fd, &info.msrs)
}

/// The in-kernel PIC, IOAPIC and local APICs, and the PIT.
pub(super) fn create_platform_devices(fd: &VmFd) -> Result<()> {
    fd.create_irq_chip()
        .map_err(|e| Error::call("KVM_CREATE_IRQCHIP", os_err(e)))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(|e| Error::call("KVM_CREATE_PIT2", os_err(e)))
}

impl crate::x86_64::VmArch for super::KvmVm {}

impl HypervisorArch for KvmHypervisor {
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::call("KVM_GET_SUPPORTED_CPUID", os_err(e)))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: if e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
                    CPUID_FLAG_SIGNIFICANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

/// Builds a `$ty` from the general-purpose registers of `$r`; both types
/// name them alike.
macro_rules! gp_regs {
    ($ty:ident, $r:expr) => {{
        let r = &$r;
        $ty {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }};
}

fn segment_to_kvm(s: &SegmentRegister) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}

fn segment_from_kvm(s: &kvm_segment) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

impl VcpuArch for KvmVcpu {
    fn get_regs(&self) -> Result<StandardRegisters> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| Error::call("KVM_GET_REGS", os_err(e)))?;
        Ok(gp_regs!(StandardRegisters, r))
    }

    fn set_regs(&self, r: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(&gp_regs!(kvm_regs, r))
            .map_err(|e| Error::call("KVM_SET_REGS", os_err(e)))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", os_err(e)))?;
        Ok(SpecialRegisters {
            cs: segment_from_kvm(&s.cs),
            ds: segment_from_kvm(&s.ds),
            es: segment_from_kvm(&s.es),
            fs: segment_from_kvm(&s.fs),
            gs: segment_from_kvm(&s.gs),
            ss: segment_from_kvm(&s.ss),
            tr: segment_from_kvm(&s.tr),
            ldt: segment_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&self, s: &SpecialRegisters) -> Result<()> {
        // Start from the current state so fields this crate does not model
        // (the pending-interrupt bitmap) keep their values.
        let mut k: kvm_sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", os_err(e)))?;
        k.cs = segment_to_kvm(&s.cs);
        k.ds = segment_to_kvm(&s.ds);
        k.es = segment_to_kvm(&s.es);
        k.fs = segment_to_kvm(&s.fs);
        k.gs = segment_to_kvm(&s.gs);
        k.ss = segment_to_kvm(&s.ss);
        k.tr = segment_to_kvm(&s.tr);
        k.ldt = segment_to_kvm(&s.ldt);
        k.gdt.base = s.gdt.base;
        k.gdt.limit = s.gdt.limit;
        k.idt.base = s.idt.base;
        k.idt.limit = s.idt.limit;
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        k.apic_base = s.apic_base;
        self.fd
            .set_sregs(&k)
            .map_err(|e| Error::call("KVM_SET_SREGS", os_err(e)))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let k = kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd
            .set_fpu(&k)
            .map_err(|e| Error::call("KVM_SET_FPU", os_err(e)))
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0 {
                    kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| {
            Error::call(
                "KVM_SET_CPUID2",
                io::Error::new(io::ErrorKind::InvalidInput, "too many CPUID entries"),
            )
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::call("KVM_SET_CPUID2", os_err(e)))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| {
            Error::call(
                "KVM_SET_MSRS",
                io::Error::new(io::ErrorKind::InvalidInput, "too many MSRs"),
            )
        })?;
        let written = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(|e| Error::call("KVM_SET_MSRS", os_err(e)))?;
        if written != entries.len() {
            let refused = entries[written].index;
            return Err(Error::call(
                "KVM_SET_MSRS",
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the host refused MSR {refused:#x}"),
                ),
            ));
        }
        Ok(())
    }

    fn configure_lapic(&self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const MODE_NMI: u32 = 0x4;
        const MODE_EXTINT: u32 = 0x7;
        let mut lapic: kvm_lapic_state = self
            .fd
            .get_lapic()
            .map_err(|e| Error::call("KVM_GET_LAPIC", os_err(e)))?;
        let mut set_mode = |offset: usize, mode: u32| {
            let reg = &mut lapic.regs[offset..offset + 4];
            let value =
                u32::from_le_bytes([reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8]);
            // Delivery mode is bits 8..11.
            let value = (value & !0x700) | (mode << 8);
            for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
                *dst = src as _;
            }
        };
        set_mode(APIC_LVT0, MODE_EXTINT);
        set_mode(APIC_LVT1, MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::call("KVM_SET_LAPIC", os_err(e)))
    }
}
