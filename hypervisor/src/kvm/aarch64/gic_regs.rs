//! Which vGICv3 registers a saved VM carries and how KVM's device
//! attributes address them (Linux's
//! Documentation/virt/kvm/devices/arm-vgic-v3.rst): plain data, so the unit
//! tests run on any host.

/// GIC registers the state carries: a block of 32-bit words at `offset`,
/// `bytes` long, and the register that clears what this one sets (written
/// first with the complement, so a restore ends with exactly the saved
/// bits).
#[derive(Debug, Clone, Copy)]
struct Block {
    offset: u64,
    bytes: u64,
    clear: Option<u64>,
}

const fn block(offset: u64, bytes: u64) -> Block {
    Block {
        offset,
        bytes,
        clear: None,
    }
}

const fn set_clear(offset: u64, bytes: u64, clear: u64) -> Block {
    Block {
        offset,
        bytes,
        clear: Some(clear),
    }
}

impl Block {
    /// Its words: (offset, the clear register's offset).
    fn words(self) -> impl Iterator<Item = (u64, Option<u64>)> {
        (self.offset..self.offset + self.bytes)
            .step_by(4)
            .map(move |at| (at, self.clear.map(|c| c + (at - self.offset))))
    }
}

/// GICD_CTLR, written last: the interrupts are set up before the
/// distributor forwards any.
const GICD_CTLR: u64 = 0x0;

/// The distributor's per-interrupt registers, by bits per interrupt:
/// group, routing, configuration, priority, then enable, pending and
/// active (restored in this order, so an interrupt is set up before it is
/// enabled or pending). Only the shared interrupts' part: the private
/// ones' is RAZ/WI in the distributor (the redistributors hold them).
const DIST_REGS: [(Block, u64); 7] = [
    (block(0x0080, 0), 1),             // GICD_IGROUPR
    (block(0x6000, 0), 64),            // GICD_IROUTER
    (block(0x0c00, 0), 2),             // GICD_ICFGR
    (block(0x0400, 0), 8),             // GICD_IPRIORITYR
    (set_clear(0x0100, 0, 0x0180), 1), // GICD_ISENABLER / ICENABLER
    (set_clear(0x0200, 0, 0x0280), 1), // GICD_ISPENDR / ICPENDR
    (set_clear(0x0300, 0, 0x0380), 1), // GICD_ISACTIVER / ICACTIVER
];

/// The distributor's words for `lines` interrupt lines: (offset, clear
/// register's offset).
pub(super) fn dist_words(lines: u32) -> Vec<(u64, Option<u64>)> {
    let mut words = Vec::new();
    for (reg, bits) in DIST_REGS {
        let skip = 32 * bits / 8;
        let shared = Block {
            offset: reg.offset + skip,
            bytes: u64::from(lines) * bits / 8 - skip,
            clear: reg.clear.map(|c| c + skip),
        };
        words.extend(shared.words());
    }
    words.push((GICD_CTLR, None));
    words
}

/// The redistributor's registers: the RD frame, then the SGI frame at
/// 64 KiB (the private interrupts), in restore order as for the
/// distributor, its control register after the base registers.
const SGI: u64 = 0x1_0000;
const REDIST_REGS: [Block; 10] = [
    block(0x0014, 4),                         // GICR_WAKER
    block(0x0070, 8),                         // GICR_PROPBASER
    block(0x0078, 8),                         // GICR_PENDBASER
    block(0x0000, 4),                         // GICR_CTLR
    block(SGI + 0x0080, 4),                   // GICR_IGROUPR0
    block(SGI + 0x0c00, 8),                   // GICR_ICFGR0, ICFGR1
    block(SGI + 0x0400, 32),                  // GICR_IPRIORITYR0..7
    set_clear(SGI + 0x0100, 4, SGI + 0x0180), // GICR_ISENABLER0 / ICENABLER0
    set_clear(SGI + 0x0200, 4, SGI + 0x0280), // GICR_ISPENDR0 / ICPENDR0
    set_clear(SGI + 0x0300, 4, SGI + 0x0380), // GICR_ISACTIVER0 / ICACTIVER0
];

/// The redistributor's words: (offset, clear register's offset).
pub(super) fn redist_words() -> Vec<(u64, Option<u64>)> {
    REDIST_REGS.iter().flat_map(|r| r.words()).collect()
}

/// A system register's encoding as the CPU-interface attribute group
/// takes it (op0, op1, CRn, CRm, op2 at KVM's ONE_REG shifts).
const fn icc(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

pub(super) const ICC_CTLR_EL1: u64 = icc(3, 0, 12, 12, 4);
/// ICC_SRE_EL1 first (it decides how the others are accessed), then
/// control, priority mask and binary points, the active priorities, and
/// the group enables last.
pub(super) const ICC_REGS: [u64; 15] = [
    icc(3, 0, 12, 12, 5), // ICC_SRE_EL1
    ICC_CTLR_EL1,
    icc(3, 0, 4, 6, 0),   // ICC_PMR_EL1
    icc(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
    icc(3, 0, 12, 12, 3), // ICC_BPR1_EL1
    icc(3, 0, 12, 8, 4),  // ICC_AP0R0_EL1
    icc(3, 0, 12, 8, 5),  // ICC_AP0R1_EL1
    icc(3, 0, 12, 8, 6),  // ICC_AP0R2_EL1
    icc(3, 0, 12, 8, 7),  // ICC_AP0R3_EL1
    icc(3, 0, 12, 9, 0),  // ICC_AP1R0_EL1
    icc(3, 0, 12, 9, 1),  // ICC_AP1R1_EL1
    icc(3, 0, 12, 9, 2),  // ICC_AP1R2_EL1
    icc(3, 0, 12, 9, 3),  // ICC_AP1R3_EL1
    icc(3, 0, 12, 12, 6), // ICC_IGRPEN0_EL1
    icc(3, 0, 12, 12, 7), // ICC_IGRPEN1_EL1
];

/// Whether active-priority register `reg` exists with `priority_bits`
/// bits of priority (GICv3 spec: APxR1 from 6 bits, APxR2/3 with 7).
pub(super) fn icc_implemented(reg: u64, priority_bits: u64) -> bool {
    let n = match reg {
        r if r == icc(3, 0, 12, 8, 5) || r == icc(3, 0, 12, 9, 1) => 1,
        r if r == icc(3, 0, 12, 8, 6)
            || r == icc(3, 0, 12, 8, 7)
            || r == icc(3, 0, 12, 9, 2)
            || r == icc(3, 0, 12, 9, 3) =>
        {
            2
        }
        _ => 0,
    };
    match n {
        1 => priority_bits >= 6,
        2 => priority_bits == 7,
        _ => true,
    }
}

/// The attribute's vCPU field: the MPIDR's affinity levels packed as
/// Aff3.Aff2.Aff1.Aff0 in bits 63..32.
pub(super) fn vgic_mpidr(mpidr: u64) -> u64 {
    let aff = ((mpidr & 0xff_0000_0000) >> 8) | (mpidr & 0xff_ffff);
    aff << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distributor_carries_the_shared_interrupts_of_each_register() {
        let words = dist_words(128);
        // 96 shared interrupts: 3 words of each 1-bit register (group,
        // enable, pending, active), 192 of IROUTER, 6 of ICFGR, 24 of
        // IPRIORITYR; the control register once, last.
        assert_eq!(words.len(), 3 + 192 + 6 + 24 + 3 + 3 + 3 + 1);
        assert_eq!(words[0], (0x0080 + 4, None));
        assert_eq!(words[3], (0x6000 + 32 * 8, None));
        assert_eq!(words[3 + 192 - 1], (0x6000 + 128 * 8 - 4, None));
        assert!(words.contains(&(0x0100 + 4, Some(0x0180 + 4))));
        assert!(words.contains(&(0x0400 + 32, None)));
        assert!(!words.contains(&(0x0400 + 28, None)));
        assert_eq!(words.last(), Some(&(GICD_CTLR, None)));
        assert!(!words.iter().any(|(at, _)| (0x6000..0x6100).contains(at)));
    }

    #[test]
    fn the_redistributor_words_cover_both_frames() {
        let words = redist_words();
        // WAKER, 2 x 2 base-register halves, CTLR; IGROUPR0, 2 ICFGR,
        // 8 IPRIORITYR, 3 set registers.
        assert_eq!(words.len(), 1 + 4 + 1 + 1 + 2 + 8 + 3);
        assert!(words.contains(&(SGI + 0x0100, Some(SGI + 0x0180))));
        assert!(words.contains(&(0x007c, None)));
        assert!(words.contains(&(SGI + 0x041c, None)));
    }

    #[test]
    fn system_register_encodings_and_mpidr_packing_are_the_kernels() {
        // ICC_SRE_EL1 = S3_0_C12_C12_5 as arm-vgic-v3.rst encodes it.
        assert_eq!(icc(3, 0, 12, 12, 5), 0xc665);
        assert_eq!(ICC_CTLR_EL1, 0xc664);
        assert_eq!(vgic_mpidr(0x8000_0000), 0);
        assert_eq!(vgic_mpidr(0x81_8003_0201), 0x8103_0201 << 32);
        assert!(icc_implemented(icc(3, 0, 12, 8, 4), 5));
        assert!(!icc_implemented(icc(3, 0, 12, 8, 5), 5));
        assert!(icc_implemented(icc(3, 0, 12, 9, 1), 6));
        assert!(!icc_implemented(icc(3, 0, 12, 9, 3), 6));
        assert!(icc_implemented(icc(3, 0, 12, 9, 3), 7));
    }
}
