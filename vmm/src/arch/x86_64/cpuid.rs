//! The CPUID the guest sees: the hypervisor's supported leaves, with the
//! topology of this VM and, on PVM hosts, the paravirtual features that
//! would hang the guest removed.

use hypervisor::CpuidEntry;

/// KVM's feature leaf.
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// PV_UNHALT (7), PV_SEND_IPI (11), PV_SCHED_YIELD (13): each makes the
/// guest issue a `vmcall`, which never returns on PVM hosts.
const PVM_HANGING_KVM_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Builds vCPU `id`'s CPUID out of the hypervisor's `supported` leaves.
pub fn for_vcpu(supported: &[CpuidEntry], id: u32, vcpus: u32, pvm: bool) -> Vec<CpuidEntry> {
    // Bits needed to number the vCPUs (x2APIC topology shift).
    let core_bits = 32 - (vcpus.max(1) - 1).leading_zeros();
    supported
        .iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                1 => {
                    // Initial APIC id, logical processor count, hypervisor bit.
                    e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((vcpus.min(255)) << 16);
                    e.ecx |= LEAF1_ECX_HYPERVISOR;
                    if vcpus > 1 {
                        e.edx |= LEAF1_EDX_HTT;
                    } else {
                        e.edx &= !LEAF1_EDX_HTT;
                    }
                }
                0xb | 0x1f => {
                    // Extended topology: one thread per core, `vcpus` cores.
                    let (eax, ebx, level_type) = match e.index {
                        0 => (0, 1, 1),
                        1 => (core_bits, vcpus, 2),
                        _ => (0, 0, 0),
                    };
                    e.eax = eax;
                    e.ebx = ebx;
                    e.ecx = (level_type << 8) | (e.index & 0xff);
                    e.edx = id;
                }
                KVM_FEATURES_LEAF if pvm => e.eax &= !PVM_HANGING_KVM_FEATURES,
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0x0008_0800,
            ecx: 0,
            edx: 0,
            flags: 0,
        }
    }

    #[test]
    fn topology_and_apic_ids_follow_the_vcpu() {
        let supported = [leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        let c = for_vcpu(&supported, 1, 2, false);
        assert_eq!(c[0].ebx >> 24, 1);
        assert_eq!((c[0].ebx >> 16) & 0xff, 2);
        assert_eq!(c[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(c[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(c[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((c[1].ebx, c[1].edx), (1, 1));
        assert_eq!((c[2].eax, c[2].ebx, c[2].ecx >> 8), (1, 2, 2));
        assert_eq!(c[3].ebx, 0);
    }

    #[test]
    fn pvm_hosts_lose_the_hanging_pv_features_only() {
        let supported = [leaf(KVM_FEATURES_LEAF, 0)];
        assert_eq!(for_vcpu(&supported, 0, 1, false)[0].eax, 0xffff_ffff);
        let pvm = for_vcpu(&supported, 0, 1, true)[0].eax;
        assert_eq!(pvm, !0x2880);
    }
}
