//! The guest's virtual timer, as the VMM sees it on Hypervisor.framework.
//!
//! - A WFI is an exit: the vCPU thread sleeps until the timer is due or a
//!   wake-up arrives (an interrupt for the guest, a kick). [`wfi_wait`]
//!   says how long from CNTV_CTL_EL0, CNTV_CVAL_EL0 and the virtual count.
//! - Without the platform GIC, HVF reports the timer firing as a
//!   VTIMER_ACTIVATED exit with the timer masked; the VMM injects the
//!   interrupt and unmasks once the guest has handled it (the line is low
//!   again). [`VtimerLine`] holds that. With the platform GIC (macOS 15+,
//!   which this backend uses) the platform delivers the timer itself and
//!   that exit does not come; the backend still handles it this way.

use std::time::Duration;

/// CNTV_CTL_EL0 bits.
const ENABLE: u64 = 1 << 0;
const IMASK: u64 = 1 << 1;
const ISTATUS: u64 = 1 << 2;

/// Whether the timer's interrupt line is high: enabled, not masked by
/// the guest, and the condition met.
pub fn line_level(ctl: u64) -> bool {
    ctl & (ENABLE | IMASK | ISTATUS) == ENABLE | ISTATUS
}

/// How long a WFI may sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The timer is due: go straight back into the guest.
    Now,
    /// Until the timer is due.
    For(Duration),
    /// The timer is off or masked: until a wake-up.
    UntilWoken,
}

/// How long a WFI sleeps, given the timer registers, the virtual count now
/// and the counter's rate as a ratio to nanoseconds (`mach_timebase_info`:
/// `ns = ticks * numer / denom`).
pub fn wfi_wait(ctl: u64, cval: u64, now: u64, numer: u32, denom: u32) -> Wait {
    if ctl & ENABLE == 0 || ctl & IMASK != 0 {
        return Wait::UntilWoken;
    }
    if cval <= now {
        return Wait::Now;
    }
    let ticks = u128::from(cval - now);
    let ns = ticks * u128::from(numer) / u128::from(denom.max(1));
    match u64::try_from(ns) {
        Ok(0) => Wait::Now,
        Ok(ns) => Wait::For(Duration::from_nanos(ns)),
        Err(_) => Wait::UntilWoken,
    }
}

/// How often a sleeping vCPU of a guest with more than one vCPU looks at
/// its private interrupts. Another vCPU's inter-processor interrupt
/// (SGI) goes to the platform GIC without an exit, so nothing else would
/// wake the sleeper; a guest with one vCPU sleeps until its timer or a
/// device interrupt.
pub const PRIVATE_RECHECK: Duration = Duration::from_millis(1);

/// How long one sleep of a WFI lasts (`None`: until woken), for a guest
/// of `vcpus` vCPUs. `Wait::Now` does not sleep.
pub fn sleep_slice(wait: Wait, vcpus: u32) -> Option<Duration> {
    let full = match wait {
        Wait::Now => return Some(Duration::ZERO),
        Wait::For(d) => Some(d),
        Wait::UntilWoken => None,
    };
    if vcpus > 1 {
        Some(full.map_or(PRIVATE_RECHECK, |d| d.min(PRIVATE_RECHECK)))
    } else {
        full
    }
}

/// Whether an enabled private interrupt (SGI or PPI) is pending, from the
/// vCPU's redistributor registers GICR_ISPENDR0 and GICR_ISENABLER0: a
/// sleeping vCPU then goes back into the guest to take it.
pub fn private_pending(ispendr0: u64, isenabler0: u64) -> bool {
    ispendr0 & isenabler0 & 0xffff_ffff != 0
}

/// The virtual timer's line when the VMM injects it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VtimerLine {
    /// HVF masked the timer when it fired; the VMM unmasks it once the
    /// guest has taken the interrupt.
    masked: bool,
}

/// What to do with the timer after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerAction {
    Nothing,
    /// Raise the timer interrupt (it fired; HVF has masked it).
    Inject,
    /// The guest has dealt with it: lower the interrupt and unmask the
    /// timer so that it can fire again.
    Unmask,
}

impl VtimerLine {
    /// A VTIMER_ACTIVATED exit.
    pub fn activated(&mut self) -> TimerAction {
        self.masked = true;
        TimerAction::Inject
    }

    /// Whether the timer fired and waits to be unmasked: only then does
    /// [`VtimerLine::after_exit`] need the guest's CNTV_CTL_EL0.
    pub fn waiting(&self) -> bool {
        self.masked
    }

    /// Any other exit, with the guest's CNTV_CTL_EL0 now.
    pub fn after_exit(&mut self, ctl: u64) -> TimerAction {
        if self.masked && !line_level(ctl) {
            self.masked = false;
            TimerAction::Unmask
        } else {
            TimerAction::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apple silicon's 24 MHz counter: 125/3 ns per tick.
    const NUMER: u32 = 125;
    const DENOM: u32 = 3;

    #[test]
    fn a_wfi_sleeps_until_the_timer_is_due() {
        assert_eq!(
            wfi_wait(ENABLE, 1_000 + 24_000_000, 1_000, NUMER, DENOM),
            Wait::For(Duration::from_secs(1))
        );
        assert_eq!(wfi_wait(ENABLE, 5, 10, NUMER, DENOM), Wait::Now);
        assert_eq!(wfi_wait(ENABLE, 10, 10, NUMER, DENOM), Wait::Now);
        // Off, or masked by the guest: only a wake-up ends the sleep.
        assert_eq!(wfi_wait(0, 100, 10, NUMER, DENOM), Wait::UntilWoken);
        assert_eq!(
            wfi_wait(ENABLE | IMASK, 100, 10, NUMER, DENOM),
            Wait::UntilWoken
        );
        // Further than u64 nanoseconds reach: no overflow, wait for a wake-up.
        assert_eq!(
            wfi_wait(ENABLE, u64::MAX, 0, NUMER, DENOM),
            Wait::UntilWoken
        );
        assert_eq!(
            wfi_wait(ENABLE, 3 << 40, 0, NUMER, DENOM),
            Wait::For(Duration::from_nanos(125 << 40))
        );
        // A bad timebase does not divide by zero.
        assert_eq!(
            wfi_wait(ENABLE, 2, 1, 1, 0),
            Wait::For(Duration::from_nanos(1))
        );
    }

    #[test]
    fn the_line_is_high_only_when_enabled_unmasked_and_due() {
        assert!(line_level(ENABLE | ISTATUS));
        assert!(!line_level(ENABLE));
        assert!(!line_level(ISTATUS));
        assert!(!line_level(ENABLE | IMASK | ISTATUS));
    }

    #[test]
    fn a_fired_timer_is_injected_then_unmasked_once_handled() {
        let mut line = VtimerLine::default();
        assert_eq!(line.after_exit(ENABLE | ISTATUS), TimerAction::Nothing);
        assert!(!line.waiting());
        assert_eq!(line.activated(), TimerAction::Inject);
        assert!(line.waiting());
        // The guest has not reprogrammed the timer yet: keep it masked.
        assert_eq!(line.after_exit(ENABLE | ISTATUS), TimerAction::Nothing);
        // It has: CVAL moved on (ISTATUS clear), or the guest masked it.
        assert_eq!(line.after_exit(ENABLE), TimerAction::Unmask);
        assert!(!line.waiting());
        assert_eq!(line.after_exit(ENABLE), TimerAction::Nothing);
        line.activated();
        assert_eq!(
            line.after_exit(ENABLE | IMASK | ISTATUS),
            TimerAction::Unmask
        );
    }

    #[test]
    fn sleeps_are_sliced_only_with_other_vcpus() {
        let long = Wait::For(Duration::from_secs(1));
        let short = Wait::For(Duration::from_micros(10));
        assert_eq!(sleep_slice(Wait::Now, 4), Some(Duration::ZERO));
        assert_eq!(sleep_slice(long, 1), Some(Duration::from_secs(1)));
        assert_eq!(sleep_slice(Wait::UntilWoken, 1), None);
        assert_eq!(sleep_slice(long, 2), Some(PRIVATE_RECHECK));
        assert_eq!(sleep_slice(short, 2), Some(Duration::from_micros(10)));
        assert_eq!(sleep_slice(Wait::UntilWoken, 2), Some(PRIVATE_RECHECK));
    }

    #[test]
    fn only_enabled_pending_private_lines_wake() {
        // SGI 1 pending but disabled; the timer's PPI 27 enabled but idle.
        assert!(!private_pending(1 << 1, 1 << 27));
        assert!(private_pending(1 << 1, (1 << 27) | (1 << 1)));
        assert!(private_pending(1 << 27, 1 << 27));
        // Bits above 31 are not registers' bits.
        assert!(!private_pending(1 << 40, 1 << 40));
    }
}
