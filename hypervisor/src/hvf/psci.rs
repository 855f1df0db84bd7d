//! PSCI 0.2 over HVC, answered by the VMM: on KVM the kernel does this;
//! on Hypervisor.framework every HVC is an exit. The device tree names
//! `arm,psci-0.2` with the `hvc` method. [`PowerTable`] holds each vCPU's
//! power state, which CPU_ON, CPU_OFF and AFFINITY_INFO read and change.
//! Reference: Arm DEN 0022 (PSCI), 5.1.

use std::sync::Mutex;

/// Function ids (SMC32 and SMC64 forms).
pub mod function {
    pub const VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND: u32 = 0x8400_0001;
    pub const CPU_SUSPEND64: u32 = 0xc400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON: u32 = 0x8400_0003;
    pub const CPU_ON64: u32 = 0xc400_0003;
    pub const AFFINITY_INFO: u32 = 0x8400_0004;
    pub const AFFINITY_INFO64: u32 = 0xc400_0004;
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
}

/// Return codes.
pub mod code {
    pub const SUCCESS: i64 = 0;
    pub const NOT_SUPPORTED: i64 = -1;
    pub const INVALID_PARAMETERS: i64 = -2;
    pub const ALREADY_ON: i64 = -4;
    pub const ON_PENDING: i64 = -5;
}

/// PSCI 0.2: major 0, minor 2.
pub const VERSION_0_2: u64 = 2;
/// MIGRATE_INFO_TYPE: no trusted OS that would need migrating.
const NO_TRUSTED_OS: u64 = 2;

/// The bits of MPIDR_EL1 that name a CPU (Aff3, Aff2, Aff1, Aff0).
pub const AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// What the vCPU that made the call does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Put this in X0 and go on after the HVC.
    Return(u64),
    /// CPU_ON succeeded: put 0 in X0, go on, and wake vCPU `id`, which
    /// now starts at its entry point.
    Started { id: u32 },
    /// CPU_OFF: this vCPU is off until another turns it on.
    PowerOff,
    /// SYSTEM_OFF: the VM ends.
    SystemOff,
    /// SYSTEM_RESET: the VM ends (the VMM does not reboot in place).
    SystemReset,
}

/// A vCPU's power state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Power {
    #[default]
    On,
    Off,
    /// Turned on by CPU_ON; starts at `entry` with `context` in X0 once its
    /// thread sees it.
    OnPending {
        entry: u64,
        context: u64,
    },
}

/// Every vCPU's MPIDR and power state.
#[derive(Debug, Default)]
pub struct PowerTable {
    cpus: Mutex<Vec<(u64, Power)>>,
}

impl PowerTable {
    /// Adds vCPU `id` (ids come in order from 0).
    pub fn add(&self, id: u32, mpidr: u64, power: Power) {
        let mut cpus = self.lock();
        let slot = id as usize;
        if cpus.len() <= slot {
            cpus.resize(slot + 1, (0, Power::Off));
        }
        cpus[slot] = (mpidr, power);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Power)>> {
        self.cpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(cpus: &[(u64, Power)], target: u64) -> Option<usize> {
        cpus.iter()
            .position(|(mpidr, _)| mpidr & AFFINITY_MASK == target & AFFINITY_MASK)
    }

    /// vCPU `id`'s state.
    pub fn get(&self, id: u32) -> Option<Power> {
        self.lock().get(id as usize).map(|&(_, p)| p)
    }

    /// Sets vCPU `id`'s state (CPU_OFF, or a restored snapshot).
    pub fn set(&self, id: u32, power: Power) {
        if let Some(cpu) = self.lock().get_mut(id as usize) {
            cpu.1 = power;
        }
    }

    /// If vCPU `id` was turned on, marks it on and returns where it
    /// starts: (entry, context).
    pub fn take_start(&self, id: u32) -> Option<(u64, u64)> {
        let mut cpus = self.lock();
        let cpu = cpus.get_mut(id as usize)?;
        match cpu.1 {
            Power::OnPending { entry, context } => {
                cpu.1 = Power::On;
                Some((entry, context))
            }
            _ => None,
        }
    }

    fn cpu_on(&self, target: u64, entry: u64, context: u64) -> Action {
        let mut cpus = self.lock();
        let Some(i) = Self::find(&cpus, target) else {
            return Action::Return(code::INVALID_PARAMETERS as u64);
        };
        match cpus[i].1 {
            Power::On => Action::Return(code::ALREADY_ON as u64),
            Power::OnPending { .. } => Action::Return(code::ON_PENDING as u64),
            Power::Off => {
                cpus[i].1 = Power::OnPending { entry, context };
                Action::Started { id: i as u32 }
            }
        }
    }

    fn affinity_info(&self, target: u64, level: u64) -> u64 {
        if level != 0 {
            return code::INVALID_PARAMETERS as u64;
        }
        let cpus = self.lock();
        match Self::find(&cpus, target).map(|i| cpus[i].1) {
            None => code::INVALID_PARAMETERS as u64,
            Some(Power::On) => 0,
            Some(Power::Off) => 1,
            Some(Power::OnPending { .. }) => 2,
        }
    }

    /// Answers the PSCI call in X0..X3 made by vCPU `caller`.
    pub fn handle(&self, caller: u32, x: [u64; 4]) -> Action {
        let Ok(id) = u32::try_from(x[0]) else {
            return Action::Return(code::NOT_SUPPORTED as u64);
        };
        // The SMC32 forms take 32-bit arguments.
        let arg = |i: usize| {
            if id & 0x4000_0000 == 0 {
                x[i] & 0xffff_ffff
            } else {
                x[i]
            }
        };
        match id {
            function::VERSION => Action::Return(VERSION_0_2),
            // Standby may end early: returning at once is a valid wake-up.
            function::CPU_SUSPEND | function::CPU_SUSPEND64 => Action::Return(code::SUCCESS as u64),
            function::CPU_OFF => {
                self.set(caller, Power::Off);
                Action::PowerOff
            }
            function::CPU_ON | function::CPU_ON64 => self.cpu_on(arg(1), arg(2), arg(3)),
            function::AFFINITY_INFO | function::AFFINITY_INFO64 => {
                Action::Return(self.affinity_info(arg(1), arg(2)))
            }
            function::MIGRATE_INFO_TYPE => Action::Return(NO_TRUSTED_OS),
            function::SYSTEM_OFF => Action::SystemOff,
            function::SYSTEM_RESET => Action::SystemReset,
            _ => Action::Return(code::NOT_SUPPORTED as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PowerTable {
        let t = PowerTable::default();
        t.add(0, 0x8000_0000, Power::On);
        t.add(1, 0x8000_0001, Power::Off);
        t.add(2, 0x8000_0100, Power::Off);
        t
    }

    fn ret(code: i64) -> Action {
        Action::Return(code as u64)
    }

    #[test]
    fn version_and_info() {
        let t = table();
        assert_eq!(
            t.handle(0, [function::VERSION as u64, 0, 0, 0]),
            Action::Return(2)
        );
        assert_eq!(
            t.handle(0, [function::MIGRATE_INFO_TYPE as u64, 0, 0, 0]),
            Action::Return(2)
        );
        // PSCI_FEATURES is PSCI 1.0; SMCCC_VERSION; garbage in X0.
        for id in [0x8400_000a_u64, 0x8000_0000, 0xdead_beef_0000_0000] {
            assert_eq!(t.handle(0, [id, 0, 0, 0]), ret(code::NOT_SUPPORTED));
        }
    }

    #[test]
    fn cpu_on_starts_a_secondary_once() {
        let t = table();
        let on = [function::CPU_ON64 as u64, 1, 0x8020_0000, 0x1234];
        assert_eq!(t.handle(0, on), Action::Started { id: 1 });
        assert_eq!(t.handle(0, on), ret(code::ON_PENDING));
        assert_eq!(t.take_start(1), Some((0x8020_0000, 0x1234)));
        assert_eq!(t.take_start(1), None);
        assert_eq!(t.handle(0, on), ret(code::ALREADY_ON));
        // Aff1 = 1 names vCPU 2.
        let on2 = [function::CPU_ON64 as u64, 0x100, 0x8020_0000, 0];
        assert_eq!(t.handle(0, on2), Action::Started { id: 2 });
        // Nobody has MPIDR 7.
        let bad = [function::CPU_ON64 as u64, 7, 0x8020_0000, 0];
        assert_eq!(t.handle(0, bad), ret(code::INVALID_PARAMETERS));
    }

    #[test]
    fn the_32_bit_form_ignores_upper_halves() {
        let t = table();
        let on = [
            function::CPU_ON as u64,
            0xffff_ffff_0000_0001,
            0xffff_ffff_8000_0000,
            0,
        ];
        assert_eq!(t.handle(0, on), Action::Started { id: 1 });
        assert_eq!(t.take_start(1), Some((0x8000_0000, 0)));
    }

    #[test]
    fn affinity_info_follows_the_power_state() {
        let t = table();
        let info = |target| t.handle(0, [function::AFFINITY_INFO64 as u64, target, 0, 0]);
        assert_eq!(info(0), Action::Return(0));
        assert_eq!(info(1), Action::Return(1));
        t.handle(0, [function::CPU_ON64 as u64, 1, 0, 0]);
        assert_eq!(info(1), Action::Return(2));
        t.take_start(1);
        assert_eq!(info(1), Action::Return(0));
        assert_eq!(
            t.handle(1, [function::CPU_OFF as u64, 0, 0, 0]),
            Action::PowerOff
        );
        assert_eq!(info(1), Action::Return(1));
        assert_eq!(info(9), ret(code::INVALID_PARAMETERS));
        // Only level 0 is modelled.
        let level1 = t.handle(0, [function::AFFINITY_INFO64 as u64, 0, 1, 0]);
        assert_eq!(level1, ret(code::INVALID_PARAMETERS));
    }

    #[test]
    fn system_calls_end_the_vm() {
        let t = table();
        assert_eq!(
            t.handle(0, [function::SYSTEM_OFF as u64, 0, 0, 0]),
            Action::SystemOff
        );
        assert_eq!(
            t.handle(0, [function::SYSTEM_RESET as u64, 0, 0, 0]),
            Action::SystemReset
        );
        assert_eq!(
            t.handle(0, [function::CPU_SUSPEND64 as u64, 0, 0, 0]),
            ret(code::SUCCESS)
        );
    }
}
