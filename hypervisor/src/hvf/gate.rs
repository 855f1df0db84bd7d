//! The start gate of a VM's vCPUs on Hypervisor.framework.
//!
//! A vCPU exists only on its own thread (it is created on its first run),
//! but a restored GIC's state may be set only once every vCPU exists and
//! before any runs, and each vCPU's own GIC registers after that. So every
//! vCPU thread, once its vCPU exists, waits here; the last to arrive runs
//! the VM-wide step (setting the GIC state) and opens the gate for all.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long vCPU threads wait for the others before giving up: every
/// thread is started together, so this only ends a start that failed.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum State {
    Waiting { arrived: u32 },
    Open,
    Failed(String),
}

/// Where a VM's vCPU threads wait for each other before their first run.
#[derive(Debug)]
pub struct StartGate {
    expected: u32,
    state: Mutex<State>,
    changed: Condvar,
}

impl StartGate {
    /// A gate for `expected` vCPUs.
    pub fn new(expected: u32) -> StartGate {
        StartGate {
            expected,
            state: Mutex::new(State::Waiting { arrived: 0 }),
            changed: Condvar::new(),
        }
    }

    /// Called once by each vCPU thread whose vCPU exists. The last to
    /// arrive runs `open`; every caller returns once it has, with its
    /// result.
    pub fn arrive(&self, open: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            State::Waiting { arrived } => {
                *arrived += 1;
                if *arrived >= self.expected {
                    *state = match open() {
                        Ok(()) => State::Open,
                        Err(e) => State::Failed(e),
                    };
                    self.changed.notify_all();
                }
            }
            State::Open => return Ok(()),
            State::Failed(e) => return Err(e.clone()),
        }
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        loop {
            match &*state {
                State::Open => return Ok(()),
                State::Failed(e) => return Err(e.clone()),
                State::Waiting { arrived } => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let e = format!(
                            "only {arrived} of {} vCPUs started within {ARRIVAL_TIMEOUT:?}",
                            self.expected
                        );
                        *state = State::Failed(e.clone());
                        self.changed.notify_all();
                        return Err(e);
                    }
                    state = self
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// A vCPU thread that cannot create its vCPU: the others stop waiting.
    pub fn fail(&self, why: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, State::Waiting { .. }) {
            *state = State::Failed(why);
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn the_last_arrival_opens_it_once_for_all() {
        let gate = Arc::new(StartGate::new(4));
        let opened = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, opened) = (gate.clone(), opened.clone());
                std::thread::spawn(move || {
                    gate.arrive(|| {
                        opened.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .map(|()| opened.load(Ordering::SeqCst))
                })
            })
            .collect();
        for t in threads {
            // Nobody passes before the VM-wide step ran.
            assert_eq!(t.join().unwrap(), Ok(1));
        }
        // A late caller (a vCPU restarted in place) passes at once.
        assert_eq!(gate.arrive(|| Err("not again".into())), Ok(()));
    }

    #[test]
    fn a_failed_step_or_vcpu_fails_every_waiter() {
        // Whichever arrives last runs the failing step.
        let fails = || Err::<(), String>("the GIC state does not fit".into());
        let gate = Arc::new(StartGate::new(2));
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.arrive(fails));
        assert_eq!(gate.arrive(fails), Err("the GIC state does not fit".into()));
        assert_eq!(
            waiter.join().unwrap(),
            Err("the GIC state does not fit".into())
        );

        let gate = Arc::new(StartGate::new(2));
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.arrive(|| Ok(())));
        gate.fail("vCPU 1 could not be created".into());
        assert_eq!(
            waiter.join().unwrap(),
            Err("vCPU 1 could not be created".into())
        );
    }
}
