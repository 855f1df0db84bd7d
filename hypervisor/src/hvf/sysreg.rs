//! The system registers a Linux guest touches that Hypervisor.framework
//! traps to the VMM (the rest it handles itself): the OS lock and the
//! debug registers (the kernel's debug monitors set them up at boot), and
//! the PMU (the kernel probes it; the device tree declares none).
//! The OS lock is modelled; the others read as zero and ignore writes, as
//! a CPU without those features would have them (PMCR_EL0.N = 0: no
//! counters). Any other trapped register is reported and treated the same.

use super::esr::{SysReg, SysRegAccess};

/// OSLAR_EL1 (write-only): bit 0 sets or clears the OS lock.
pub const OSLAR_EL1: SysReg = SysReg::new(2, 0, 1, 0, 4);
/// OSLSR_EL1 (read-only): the lock's state.
pub const OSLSR_EL1: SysReg = SysReg::new(2, 0, 1, 1, 4);
/// OSDLR_EL1: the OS double lock.
pub const OSDLR_EL1: SysReg = SysReg::new(2, 0, 1, 3, 4);
/// PMCR_EL0.
pub const PMCR_EL0: SysReg = SysReg::new(3, 3, 9, 12, 0);

/// OSLSR_EL1.OSLM: the OS lock is implemented (OSLM = 0b10, its bit 3).
const OSLSR_OSLM: u64 = 1 << 3;
/// OSLSR_EL1.OSLK: the OS lock is set.
const OSLSR_OSLK: u64 = 1 << 1;

/// Which group a trapped register belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OsLock,
    /// Breakpoint and watchpoint registers, OSDLR_EL1, MDCCINT_EL1.
    Debug,
    /// Performance monitors.
    Pmu,
    /// Anything else: read as zero, writes ignored, and reported.
    Unknown,
}

/// Classifies a register.
pub fn kind(reg: SysReg) -> Kind {
    if reg == OSLAR_EL1 || reg == OSLSR_EL1 {
        return Kind::OsLock;
    }
    let SysReg {
        op0,
        op1,
        crn,
        crm,
        op2,
    } = reg;
    // DBGBVR/BCR/WVR/WCR<n>_EL1 (op2 4..7), MDCCINT_EL1 (C0_C2_0),
    // OSDLR_EL1, OSECCR_EL1 (C0_C6_2) and DBGCLAIM*/DBGAUTHSTATUS (C7).
    let debug = op0 == 2
        && op1 == 0
        && (crn == 0 && (op2 >= 4 || (crm == 2 && op2 == 0) || (crm == 6 && op2 == 2))
            || reg == OSDLR_EL1
            || crn == 7);
    if debug {
        return Kind::Debug;
    }
    // PMCR_EL0 .. PMOVSSET_EL0 (C9_C12..C14), PMINTEN*_EL1 (op1 0, C9_C14),
    // PMEVCNTR<n>/PMEVTYPER<n>/PMCCFILTR_EL0 (op1 3, C14_C8..C15).
    let pmu = op0 == 3
        && ((crn == 9 && (12..=14).contains(&crm) && (op1 == 3 || op1 == 0))
            || (op1 == 3 && crn == 14 && crm >= 8));
    if pmu {
        return Kind::Pmu;
    }
    Kind::Unknown
}

/// The emulated registers of one vCPU.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Emulated {
    /// The OS lock (set by the kernel while it saves debug state).
    pub os_lock: bool,
}

impl Emulated {
    /// Performs `access` (`written`: the value of Rt for a write); returns
    /// the value for Rt on a read, and the register's kind.
    pub fn access(&mut self, access: &SysRegAccess, written: u64) -> (Option<u64>, Kind) {
        let kind = kind(access.reg);
        if kind == Kind::OsLock && access.reg == OSLAR_EL1 && !access.read {
            self.os_lock = written & 1 != 0;
        }
        let value = access.read.then(|| match kind {
            Kind::OsLock if access.reg == OSLSR_EL1 => {
                OSLSR_OSLM | if self.os_lock { OSLSR_OSLK } else { 0 }
            }
            _ => 0,
        });
        (value, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(reg: SysReg) -> SysRegAccess {
        SysRegAccess {
            reg,
            read: true,
            register: 1,
        }
    }

    fn write(reg: SysReg) -> SysRegAccess {
        SysRegAccess {
            reg,
            read: false,
            register: 1,
        }
    }

    #[test]
    fn the_os_lock_is_kept() {
        let mut e = Emulated::default();
        assert_eq!(e.access(&read(OSLSR_EL1), 0).0, Some(OSLSR_OSLM));
        assert_eq!(e.access(&write(OSLAR_EL1), 1), (None, Kind::OsLock));
        assert_eq!(
            e.access(&read(OSLSR_EL1), 0).0,
            Some(OSLSR_OSLM | OSLSR_OSLK)
        );
        e.access(&write(OSLAR_EL1), 0);
        assert_eq!(e.access(&read(OSLSR_EL1), 0).0, Some(OSLSR_OSLM));
        // Writing OSLSR (read-only) changes nothing.
        e.access(&write(OSLSR_EL1), 1);
        assert!(!e.os_lock);
    }

    #[test]
    fn debug_and_pmu_registers_read_as_zero() {
        let debug = [
            SysReg::new(2, 0, 0, 0, 4),  // DBGBVR0_EL1
            SysReg::new(2, 0, 0, 15, 7), // DBGWCR15_EL1
            SysReg::new(2, 0, 0, 2, 0),  // MDCCINT_EL1
            OSDLR_EL1,
            SysReg::new(2, 0, 7, 8, 6), // DBGCLAIMSET_EL1
        ];
        let pmu = [
            PMCR_EL0,
            SysReg::new(3, 3, 9, 12, 1),  // PMCNTENSET_EL0
            SysReg::new(3, 3, 9, 13, 0),  // PMCCNTR_EL0
            SysReg::new(3, 3, 9, 14, 0),  // PMUSERENR_EL0
            SysReg::new(3, 0, 9, 14, 1),  // PMINTENSET_EL1
            SysReg::new(3, 3, 14, 8, 0),  // PMEVCNTR0_EL0
            SysReg::new(3, 3, 14, 15, 7), // PMCCFILTR_EL0
        ];
        let mut e = Emulated::default();
        for (regs, k) in [(&debug[..], Kind::Debug), (&pmu[..], Kind::Pmu)] {
            for &reg in regs {
                assert_eq!(kind(reg), k, "{reg}");
                assert_eq!(e.access(&write(reg), u64::MAX), (None, k));
                assert_eq!(e.access(&read(reg), 0), (Some(0), k), "{reg}");
            }
        }
        assert_eq!(e, Emulated::default());
    }

    #[test]
    fn other_registers_are_reported() {
        // MDSCR_EL1 (HVF's own), ICC_SGI1R_EL1, CNTP_CTL_EL0, SCTLR_EL1.
        for reg in [
            SysReg::new(2, 0, 0, 2, 2),
            SysReg::new(3, 0, 12, 11, 5),
            SysReg::new(3, 3, 14, 2, 1),
            SysReg::new(3, 0, 1, 0, 0),
        ] {
            assert_eq!(kind(reg), Kind::Unknown, "{reg}");
            assert_eq!(
                Emulated::default().access(&read(reg), 0),
                (Some(0), Kind::Unknown)
            );
        }
    }
}
