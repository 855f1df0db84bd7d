//! The saved state of a Hypervisor.framework vCPU and VM, as snapshots
//! and forks carry it, and the virtual counter's arithmetic across a
//! save and a restore (in another process, where the host's counter has
//! moved on).

use super::psci::Power;
use super::sysreg::Emulated;

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "the saved vCPU state has {found} {what}, expected {expected}: the snapshot is damaged \
         or from another backend version; take a new one"
    )]
    Shape {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(
        "the saved vCPU state names system register {0:#06x}, which this build does not save; \
         the snapshot comes from a newer VMM: restore it with that version"
    )]
    UnknownRegister(u16),
}

/// General-purpose registers X0..X30.
pub const GENERAL_REGISTERS: usize = 31;
/// SIMD and floating-point registers Q0..Q31.
pub const SIMD_REGISTERS: usize = 32;

/// One vCPU's complete state.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HvfVcpuState {
    /// X0..X30.
    pub x: Vec<u64>,
    pub pc: u64,
    pub cpsr: u64,
    pub fpcr: u64,
    pub fpsr: u64,
    /// Q0..Q31, each as its (low, high) 64-bit halves.
    pub q: Vec<[u64; 2]>,
    /// EL1 and EL0 system registers, by their Hypervisor.framework
    /// encoding (op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2).
    pub sys_regs: Vec<(u16, u64)>,
    /// The GIC CPU interface (ICC_*_EL1), by the same encoding.
    pub icc: Vec<(u16, u64)>,
    /// HVF's mask of the virtual timer (set when it fired and the VMM
    /// has not yet seen the guest handle it).
    pub vtimer_masked: bool,
    /// On, off (waiting for PSCI CPU_ON) or about to start.
    pub power: Power,
    /// The system registers the VMM emulates.
    pub emulated: Emulated,
}

impl HvfVcpuState {
    /// Checks the register counts before any is written to a vCPU.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |what, found, expected| {
            if found == expected {
                Ok(())
            } else {
                Err(Error::Shape {
                    what,
                    found,
                    expected,
                })
            }
        };
        check("general registers", self.x.len(), GENERAL_REGISTERS)?;
        check("SIMD registers", self.q.len(), SIMD_REGISTERS)
    }

    /// Q register `n` as the framework's 128-bit value.
    pub fn q_value(&self, n: usize) -> u128 {
        let [lo, hi] = self.q[n];
        u128::from(lo) | (u128::from(hi) << 64)
    }

    /// Splits a 128-bit Q register value into its stored halves.
    pub fn q_halves(value: u128) -> [u64; 2] {
        [value as u64, (value >> 64) as u64]
    }
}

/// The VM's own state.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HvfVmState {
    /// The platform GIC's opaque blob (`hv_gic_state_get_data`),
    /// restored with `hv_gic_set_state` into a GIC of the same layout,
    /// on the same macOS version.
    pub gic: Vec<u8>,
    /// The guest's virtual count when saved (one for all vCPUs, which
    /// share one timer offset): the restored VM's counter continues from
    /// it, so the guest sees no jump in time.
    pub virtual_count: u64,
}

/// The guest's virtual count at host counter `host_now`, with the vCPU's
/// virtual timer offset (virtual = physical - offset).
pub fn virtual_count(host_now: u64, offset: u64) -> u64 {
    host_now.wrapping_sub(offset)
}

/// The offset that makes the guest's virtual count `count` at host
/// counter `host_now`.
pub fn offset_for(host_now: u64, count: u64) -> u64 {
    host_now.wrapping_sub(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HvfVcpuState {
        HvfVcpuState {
            x: (0..31).collect(),
            pc: 0x4020_0000,
            cpsr: 0x3c5,
            fpcr: 0,
            fpsr: 0,
            q: (0..32)
                .map(|i| HvfVcpuState::q_halves(u128::MAX - i))
                .collect(),
            sys_regs: vec![(0xc080, 0x30d0_0800)],
            icc: vec![(0xc230, 0xf0)],
            vtimer_masked: true,
            power: Power::OnPending {
                entry: 0x4000_0000,
                context: 7,
            },
            emulated: Emulated { os_lock: true },
        }
    }

    #[test]
    fn round_trips_through_json() {
        let s = state();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<HvfVcpuState>(&text).unwrap(), s);
        assert_eq!(s.validate(), Ok(()));
        let vm = HvfVmState {
            gic: vec![0, 1, 255],
            virtual_count: 123_456,
        };
        let text = serde_json::to_string(&vm).unwrap();
        assert_eq!(serde_json::from_str::<HvfVmState>(&text).unwrap(), vm);
    }

    #[test]
    fn q_registers_keep_all_128_bits() {
        let s = state();
        assert_eq!(s.q_value(0), u128::MAX);
        assert_eq!(s.q_value(31), u128::MAX - 31);
        let v = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        assert_eq!(
            HvfVcpuState::q_halves(v),
            [0xfedc_ba98_7654_3210, 0x0123_4567_89ab_cdef]
        );
    }

    #[test]
    fn damaged_states_are_refused() {
        let mut s = state();
        s.x.pop();
        assert_eq!(
            s.validate(),
            Err(Error::Shape {
                what: "general registers",
                found: 30,
                expected: 31
            })
        );
        let mut s = state();
        s.q.push([0, 0]);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("33 SIMD registers"));
    }

    #[test]
    fn the_virtual_count_continues_across_hosts() {
        // Saved at host count 1000 with offset 400: the guest saw 600.
        let seen = virtual_count(1000, 400);
        assert_eq!(seen, 600);
        // Restored where the host counter is at 50 (another boot): the
        // new offset wraps, and the guest still reads 600.
        let offset = offset_for(50, seen);
        assert_eq!(virtual_count(50, offset), 600);
        assert_eq!(virtual_count(60, offset), 610);
    }
}
