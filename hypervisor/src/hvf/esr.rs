//! Decoding the exception syndrome (ESR_EL2) of a Hypervisor.framework
//! exception exit: which kind of trap it was, and for the traps the VMM
//! emulates (MMIO data aborts, system-register accesses) what exactly the
//! guest instruction asked for. KVM decodes these itself; on HVF the VMM
//! must. Reference: Arm ARM, D24.2.40 (ESR_EL2) and the ISS encodings.

/// The exception classes (ESR bits 31:26) the backend handles.
pub mod class {
    /// WFI or WFE.
    pub const WFX: u8 = 0x01;
    /// HVC from AArch64: PSCI calls.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64.
    pub const SMC64: u8 = 0x17;
    /// MSR, MRS or a system instruction trapped from AArch64.
    pub const SYS64: u8 = 0x18;
    /// An instruction abort from the guest (a fetch outside its memory).
    pub const INSTRUCTION_ABORT_LOWER: u8 = 0x20;
    /// A data abort from the guest: an access to an address without
    /// memory behind it, which is MMIO.
    pub const DATA_ABORT_LOWER: u8 = 0x24;
    /// BRK from AArch64.
    pub const BRK64: u8 = 0x3c;
}

/// The exception class of a syndrome.
pub fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// Why a syndrome cannot be emulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("syndrome {esr:#x} is exception class {class:#x}, not {expected}")]
    WrongClass {
        esr: u64,
        class: u8,
        expected: &'static str,
    },
    #[error(
        "the guest accessed MMIO with an instruction the syndrome does not describe (ISV=0, \
         e.g. a load pair or a load with writeback; syndrome {0:#x}); the guest's driver must \
         use single loads and stores on device memory"
    )]
    NoSyndrome(u64),
}

/// An MMIO access, decoded from a data abort's syndrome (ISV=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// A store (WnR); otherwise a load.
    pub write: bool,
    /// Bytes accessed: 1, 2, 4 or 8 (SAS).
    pub size: usize,
    /// The general-purpose register loaded or stored (SRT); 31 is XZR.
    pub register: u8,
    /// A load that sign-extends the value to the register's width (SSE).
    pub sign_extend: bool,
    /// The register is 64 bits wide (SF); otherwise 32 (Wn), whose upper
    /// half a load clears.
    pub sixty_four: bool,
}

/// Decodes a data abort from the guest (class 0x24) into the MMIO access
/// it describes.
pub fn decode_data_abort(esr: u64) -> Result<MmioAccess, Error> {
    let class = exception_class(esr);
    if class != class::DATA_ABORT_LOWER {
        return Err(Error::WrongClass {
            esr,
            class,
            expected: "a data abort from the guest (0x24)",
        });
    }
    if esr & (1 << 24) == 0 {
        return Err(Error::NoSyndrome(esr));
    }
    Ok(MmioAccess {
        write: esr & (1 << 6) != 0,
        size: 1 << ((esr >> 22) & 0b11),
        register: ((esr >> 16) & 0x1f) as u8,
        sign_extend: esr & (1 << 21) != 0,
        sixty_four: esr & (1 << 15) != 0,
    })
}

impl MmioAccess {
    /// The register value a load of `data` (the device's bytes,
    /// little-endian, `size` long) leaves: zero- or sign-extended from
    /// the access size, then cut to 32 bits for a Wn register.
    pub fn loaded_value(&self, data: &[u8]) -> u64 {
        let mut bytes = [0u8; 8];
        let n = self.size.min(8).min(data.len());
        bytes[..n].copy_from_slice(&data[..n]);
        let raw = u64::from_le_bytes(bytes);
        let bits = (self.size * 8) as u32;
        let value = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        if self.sixty_four {
            value
        } else {
            value & 0xffff_ffff
        }
    }

    /// The bytes a store of register value `value` writes (its low `size`
    /// bytes, little-endian).
    pub fn stored_bytes(&self, value: u64) -> [u8; 8] {
        let mut bytes = value.to_le_bytes();
        bytes[self.size.min(8)..].fill(0);
        bytes
    }
}

/// A trapped MSR or MRS, decoded from a class 0x18 syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// The register's encoding: op0, op1, CRn, CRm, op2.
    pub reg: SysReg,
    /// MRS (a read into `register`); otherwise MSR (a write of it).
    pub read: bool,
    /// The general-purpose register read or written (Rt); 31 is XZR.
    pub register: u8,
}

/// A system register by its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SysReg {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
}

impl SysReg {
    pub const fn new(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> SysReg {
        SysReg {
            op0,
            op1,
            crn,
            crm,
            op2,
        }
    }

    /// The 16-bit encoding Hypervisor.framework's `hv_sys_reg_t` uses:
    /// op0 (2 bits), op1 (3), CRn (4), CRm (4), op2 (3).
    pub const fn hv_encoding(self) -> u16 {
        ((self.op0 as u16 & 0b11) << 14)
            | ((self.op1 as u16 & 0b111) << 11)
            | ((self.crn as u16 & 0xf) << 7)
            | ((self.crm as u16 & 0xf) << 3)
            | (self.op2 as u16 & 0b111)
    }
}

impl std::fmt::Display for SysReg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S{}_{}_C{}_C{}_{}",
            self.op0, self.op1, self.crn, self.crm, self.op2
        )
    }
}

/// Decodes a trapped MSR or MRS (class 0x18).
pub fn decode_sys_reg(esr: u64) -> Result<SysRegAccess, Error> {
    let class = exception_class(esr);
    if class != class::SYS64 {
        return Err(Error::WrongClass {
            esr,
            class,
            expected: "a trapped MSR/MRS (0x18)",
        });
    }
    let field = |shift: u32, bits: u32| ((esr >> shift) & ((1 << bits) - 1)) as u8;
    Ok(SysRegAccess {
        reg: SysReg::new(
            field(20, 2),
            field(14, 3),
            field(10, 4),
            field(1, 4),
            field(17, 3),
        ),
        read: esr & 1 != 0,
        register: field(5, 5),
    })
}

/// A trapped WFI (true) or WFE (false), from a class 0x01 syndrome.
pub fn is_wfi(esr: u64) -> bool {
    esr & 1 == 0
}

/// The 16-bit immediate of an HVC or SMC (0 for PSCI and SMCCC calls).
pub fn call_immediate(esr: u64) -> u16 {
    (esr & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data abort syndrome with ISV set, as the hardware writes it.
    fn data_abort(write: bool, sas: u64, srt: u64, sse: bool, sf: bool) -> u64 {
        (u64::from(class::DATA_ABORT_LOWER) << 26)
            | (1 << 25)
            | (1 << 24)
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(write) << 6)
    }

    #[test]
    fn every_size_register_and_direction_decodes() {
        for sas in 0..4u64 {
            for srt in 0..32u64 {
                for write in [false, true] {
                    for sf in [false, true] {
                        let a = decode_data_abort(data_abort(write, sas, srt, false, sf)).unwrap();
                        assert_eq!(a.size, 1 << sas);
                        assert_eq!(u64::from(a.register), srt);
                        assert_eq!(a.write, write);
                        assert_eq!(a.sixty_four, sf);
                        assert!(!a.sign_extend);
                    }
                }
            }
        }
    }

    #[test]
    fn loads_extend_as_the_instruction_says() {
        let load = |sas, sse, sf| decode_data_abort(data_abort(false, sas, 3, sse, sf)).unwrap();
        // LDRB w3: zero-extended byte.
        assert_eq!(load(0, false, false).loaded_value(&[0x80]), 0x80);
        // LDRSB w3: sign-extended to 32 bits, upper half clear.
        assert_eq!(load(0, true, false).loaded_value(&[0x80]), 0xffff_ff80);
        // LDRSB x3: sign-extended to 64 bits.
        assert_eq!(
            load(0, true, true).loaded_value(&[0x80]),
            0xffff_ffff_ffff_ff80
        );
        // LDRSH x3, positive: unchanged.
        assert_eq!(load(1, true, true).loaded_value(&[0x34, 0x12]), 0x1234);
        // LDRSH w3, negative.
        assert_eq!(
            load(1, true, false).loaded_value(&[0x00, 0x80]),
            0xffff_8000
        );
        // LDRSW x3.
        assert_eq!(
            load(2, true, true).loaded_value(&[0, 0, 0, 0x80]),
            0xffff_ffff_8000_0000
        );
        // LDR w3: 32 bits as they are.
        assert_eq!(
            load(2, false, false).loaded_value(&[1, 2, 3, 4]),
            0x0403_0201
        );
        // LDR x3.
        assert_eq!(
            load(3, false, true).loaded_value(&[1, 2, 3, 4, 5, 6, 7, 8]),
            0x0807_0605_0403_0201
        );
        // A short device answer is zero-filled, never read past.
        assert_eq!(load(3, false, true).loaded_value(&[0xff]), 0xff);
    }

    #[test]
    fn stores_write_the_low_bytes() {
        let store = |sas| decode_data_abort(data_abort(true, sas, 5, false, true)).unwrap();
        let v = 0x1122_3344_5566_7788u64;
        assert_eq!(&store(0).stored_bytes(v)[..1], &[0x88]);
        assert_eq!(&store(1).stored_bytes(v)[..2], &[0x88, 0x77]);
        assert_eq!(&store(2).stored_bytes(v)[..4], &[0x88, 0x77, 0x66, 0x55]);
        assert_eq!(store(3).stored_bytes(v), v.to_le_bytes());
        assert_eq!(store(0).stored_bytes(v)[1..], [0; 7]);
    }

    #[test]
    fn a_data_abort_without_syndrome_is_refused() {
        let esr = data_abort(false, 2, 1, false, false) & !(1 << 24);
        assert_eq!(decode_data_abort(esr), Err(Error::NoSyndrome(esr)));
        assert!(Error::NoSyndrome(esr).to_string().contains("ISV=0"));
    }

    #[test]
    fn other_classes_are_not_data_aborts() {
        let hvc = u64::from(class::HVC64) << 26;
        assert!(matches!(
            decode_data_abort(hvc),
            Err(Error::WrongClass { class: 0x16, .. })
        ));
        assert!(decode_sys_reg(hvc).is_err());
    }

    /// The syndrome of a trapped MSR/MRS of `reg` with `rt`.
    fn sys(reg: SysReg, rt: u64, read: bool) -> u64 {
        (u64::from(class::SYS64) << 26)
            | (1 << 25)
            | (u64::from(reg.op0) << 20)
            | (u64::from(reg.op2) << 17)
            | (u64::from(reg.op1) << 14)
            | (u64::from(reg.crn) << 10)
            | (rt << 5)
            | (u64::from(reg.crm) << 1)
            | u64::from(read)
    }

    #[test]
    fn system_register_accesses_decode() {
        let regs = [
            SysReg::new(2, 0, 1, 0, 4),   // OSLAR_EL1
            SysReg::new(3, 3, 9, 12, 0),  // PMCR_EL0
            SysReg::new(3, 3, 14, 15, 7), // PMCCFILTR_EL0
            SysReg::new(3, 0, 12, 11, 5), // ICC_SGI1R_EL1
        ];
        for reg in regs {
            for rt in [0, 17, 31] {
                for read in [false, true] {
                    let a = decode_sys_reg(sys(reg, rt, read)).unwrap();
                    assert_eq!(a.reg, reg);
                    assert_eq!(u64::from(a.register), rt);
                    assert_eq!(a.read, read);
                }
            }
        }
    }

    #[test]
    fn the_encoding_is_hypervisor_frameworks() {
        // Values of hv_sys_reg_t.
        assert_eq!(SysReg::new(3, 0, 0, 0, 5).hv_encoding(), 0xc005); // MPIDR_EL1
        assert_eq!(SysReg::new(3, 3, 14, 3, 1).hv_encoding(), 0xdf19); // CNTV_CTL_EL0
        assert_eq!(SysReg::new(2, 0, 0, 2, 2).hv_encoding(), 0x8012); // MDSCR_EL1
        assert_eq!(SysReg::new(3, 0, 12, 12, 4).hv_encoding(), 0xc664); // ICC_CTLR_EL1
        assert_eq!(SysReg::new(3, 3, 14, 15, 7).to_string(), "S3_3_C14_C15_7");
    }

    #[test]
    fn wfi_wfe_and_call_immediates() {
        let wfx = u64::from(class::WFX) << 26;
        assert!(is_wfi(wfx));
        assert!(!is_wfi(wfx | 1));
        assert_eq!(
            call_immediate((u64::from(class::HVC64) << 26) | 0x1234),
            0x1234
        );
        assert_eq!(exception_class(wfx), class::WFX);
    }
}
