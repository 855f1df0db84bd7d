//! The registers a vCPU's state holds, and their framework calls. Every
//! call here must run on the vCPU's own thread.

use applevisor_sys as hv;
use hv::hv_gic_icc_reg_t as Icc;
use hv::hv_reg_t as R;
use hv::hv_simd_fp_reg_t as Q;
use hv::hv_sys_reg_t as S;

use super::check;
use crate::Result;

/// X0..X30, in order.
pub const GENERAL: [R; 31] = [
    R::X0,
    R::X1,
    R::X2,
    R::X3,
    R::X4,
    R::X5,
    R::X6,
    R::X7,
    R::X8,
    R::X9,
    R::X10,
    R::X11,
    R::X12,
    R::X13,
    R::X14,
    R::X15,
    R::X16,
    R::X17,
    R::X18,
    R::X19,
    R::X20,
    R::X21,
    R::X22,
    R::X23,
    R::X24,
    R::X25,
    R::X26,
    R::X27,
    R::X28,
    R::X29,
    R::X30,
];

/// Q0..Q31, in order.
pub const SIMD: [Q; 32] = [
    Q::Q0,
    Q::Q1,
    Q::Q2,
    Q::Q3,
    Q::Q4,
    Q::Q5,
    Q::Q6,
    Q::Q7,
    Q::Q8,
    Q::Q9,
    Q::Q10,
    Q::Q11,
    Q::Q12,
    Q::Q13,
    Q::Q14,
    Q::Q15,
    Q::Q16,
    Q::Q17,
    Q::Q18,
    Q::Q19,
    Q::Q20,
    Q::Q21,
    Q::Q22,
    Q::Q23,
    Q::Q24,
    Q::Q25,
    Q::Q26,
    Q::Q27,
    Q::Q28,
    Q::Q29,
    Q::Q30,
    Q::Q31,
];

/// The EL1 and EL0 system registers a Linux guest's state lives in (the
/// ID registers are the host's and MPIDR_EL1 is set at creation, so
/// neither is saved).
pub const SYSTEM: [S; 38] = [
    S::SCTLR_EL1,
    S::ACTLR_EL1,
    S::CPACR_EL1,
    S::TTBR0_EL1,
    S::TTBR1_EL1,
    S::TCR_EL1,
    S::APIAKEYLO_EL1,
    S::APIAKEYHI_EL1,
    S::APIBKEYLO_EL1,
    S::APIBKEYHI_EL1,
    S::APDAKEYLO_EL1,
    S::APDAKEYHI_EL1,
    S::APDBKEYLO_EL1,
    S::APDBKEYHI_EL1,
    S::APGAKEYLO_EL1,
    S::APGAKEYHI_EL1,
    S::SPSR_EL1,
    S::ELR_EL1,
    S::SP_EL0,
    S::SP_EL1,
    S::AFSR0_EL1,
    S::AFSR1_EL1,
    S::ESR_EL1,
    S::FAR_EL1,
    S::PAR_EL1,
    S::MAIR_EL1,
    S::AMAIR_EL1,
    S::VBAR_EL1,
    S::CONTEXTIDR_EL1,
    S::TPIDR_EL1,
    S::CNTKCTL_EL1,
    S::CSSELR_EL1,
    S::TPIDR_EL0,
    S::TPIDRRO_EL0,
    S::MDSCR_EL1,
    S::CNTV_CTL_EL0,
    S::CNTV_CVAL_EL0,
    S::CNTP_CTL_EL0,
];

/// The GIC CPU interface registers a guest programs (ICC_RPR_EL1 is
/// read-only and derived).
pub const ICC: [Icc; 9] = [
    Icc::SRE_EL1,
    Icc::CTLR_EL1,
    Icc::PMR_EL1,
    Icc::BPR0_EL1,
    Icc::BPR1_EL1,
    Icc::AP0R0_EL1,
    Icc::AP1R0_EL1,
    Icc::IGRPEN0_EL1,
    Icc::IGRPEN1_EL1,
];

/// A system register's encoding, as saved.
pub fn sys_code(reg: S) -> u16 {
    reg as u32 as u16
}

/// An ICC register's encoding, as saved.
pub fn icc_code(reg: Icc) -> u16 {
    reg as u32 as u16
}

/// A vCPU's registers, by handle. Only its thread may use it.
#[derive(Debug, Clone, Copy)]
pub struct Regs(pub hv::hv_vcpu_t);

impl Regs {
    pub fn get(self, reg: R) -> Result<u64> {
        let mut value = 0;
        // SAFETY: the vCPU is this thread's; `value` is a live u64.
        check("hv_vcpu_get_reg", unsafe {
            hv::hv_vcpu_get_reg(self.0, reg, &mut value)
        })?;
        Ok(value)
    }

    pub fn set(self, reg: R, value: u64) -> Result<()> {
        // SAFETY: the vCPU is this thread's.
        check("hv_vcpu_set_reg", unsafe {
            hv::hv_vcpu_set_reg(self.0, reg, value)
        })
    }

    /// General-purpose register `n` (31 reads as XZR: zero).
    pub fn x(self, n: u8) -> Result<u64> {
        match GENERAL.get(usize::from(n)) {
            Some(&reg) => self.get(reg),
            None => Ok(0),
        }
    }

    /// Writes general-purpose register `n` (31, XZR, discards it).
    pub fn set_x(self, n: u8, value: u64) -> Result<()> {
        match GENERAL.get(usize::from(n)) {
            Some(&reg) => self.set(reg, value),
            None => Ok(()),
        }
    }

    /// Moves the PC past the trapped 4-byte instruction.
    pub fn skip_instruction(self) -> Result<()> {
        let pc = self.get(R::PC)?;
        self.set(R::PC, pc.wrapping_add(4))
    }

    pub fn simd(self, reg: Q) -> Result<u128> {
        let mut value = 0;
        // SAFETY: the vCPU is this thread's; `value` is a live u128.
        check("hv_vcpu_get_simd_fp_reg", unsafe {
            hv::hv_vcpu_get_simd_fp_reg(self.0, reg, &mut value)
        })?;
        Ok(value)
    }

    pub fn set_simd(self, reg: Q, value: u128) -> Result<()> {
        // SAFETY: the vCPU is this thread's.
        check("hv_vcpu_set_simd_fp_reg", unsafe {
            hv::hv_vcpu_set_simd_fp_reg(self.0, reg, value)
        })
    }

    pub fn sys(self, reg: S) -> Result<u64> {
        let mut value = 0;
        // SAFETY: the vCPU is this thread's; `value` is a live u64.
        check("hv_vcpu_get_sys_reg", unsafe {
            hv::hv_vcpu_get_sys_reg(self.0, reg, &mut value)
        })?;
        Ok(value)
    }

    pub fn set_sys(self, reg: S, value: u64) -> Result<()> {
        // SAFETY: the vCPU is this thread's.
        check("hv_vcpu_set_sys_reg", unsafe {
            hv::hv_vcpu_set_sys_reg(self.0, reg, value)
        })
    }

    pub fn icc(self, reg: Icc) -> Result<u64> {
        let mut value = 0;
        // SAFETY: the vCPU is this thread's and the GIC exists.
        check("hv_gic_get_icc_reg", unsafe {
            hv::hv_gic_get_icc_reg(self.0, reg, &mut value)
        })?;
        Ok(value)
    }

    pub fn set_icc(self, reg: Icc, value: u64) -> Result<()> {
        // SAFETY: the vCPU is this thread's and the GIC exists.
        check("hv_gic_set_icc_reg", unsafe {
            hv::hv_gic_set_icc_reg(self.0, reg, value)
        })
    }

    pub fn redistributor(self, reg: hv::hv_gic_redistributor_reg_t) -> Result<u64> {
        let mut value = 0;
        // SAFETY: the vCPU is this thread's and the GIC exists.
        check("hv_gic_get_redistributor_reg", unsafe {
            hv::hv_gic_get_redistributor_reg(self.0, reg, &mut value)
        })?;
        Ok(value)
    }

    pub fn set_vtimer_offset(self, value: u64) -> Result<()> {
        // SAFETY: the vCPU is this thread's.
        check("hv_vcpu_set_vtimer_offset", unsafe {
            hv::hv_vcpu_set_vtimer_offset(self.0, value)
        })
    }

    pub fn vtimer_masked(self) -> Result<bool> {
        let mut value = false;
        // SAFETY: the vCPU is this thread's; `value` is a live bool.
        check("hv_vcpu_get_vtimer_mask", unsafe {
            hv::hv_vcpu_get_vtimer_mask(self.0, &mut value)
        })?;
        Ok(value)
    }

    pub fn set_vtimer_masked(self, value: bool) -> Result<()> {
        // SAFETY: the vCPU is this thread's.
        check("hv_vcpu_set_vtimer_mask", unsafe {
            hv::hv_vcpu_set_vtimer_mask(self.0, value)
        })
    }
}
