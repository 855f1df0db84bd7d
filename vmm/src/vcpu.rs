//! vCPU threads: each runs its vCPU and dispatches port and MMIO exits to
//! the buses until the VM stops.

use devices::sync::Locked;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use hypervisor::{SystemEventKind, Vcpu, VcpuExit, VcpuState};

use crate::exit::{ExitReason, ExitSignal};

/// The real-time signal used to kick a vCPU thread out of guest mode.
pub fn kick_signal() -> i32 {
    vmm_os::process::kick_signal()
}

/// State shared by the vCPU threads of one VM.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub stop: AtomicBool,
    /// VMM start, for the boot timings.
    pub start: Instant,
    /// Time from VMM start to vCPU 0's first guest entry.
    pub first_entry: OnceLock<Duration>,
    pub pvm_host: bool,
    pub pause: PauseControl,
    /// Each vCPU thread installs its seccomp filter first.
    pub seccomp: bool,
}

/// Pausing the vCPU threads: a paused thread has finished its last exit,
/// saved its vCPU state and waits for the resume.
#[derive(Default)]
pub struct PauseControl {
    requested: AtomicBool,
    inner: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Default)]
struct Parked {
    /// The saved state of each parked vCPU, by id.
    states: Vec<Option<Result<VcpuState, String>>>,
    count: usize,
}

impl PauseControl {
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.inner.locked()
    }

    /// Called on a vCPU thread that saw the request: saves the vCPU and
    /// waits until the resume (or the VM stops).
    fn park(&self, id: u32, vcpu: &mut dyn Vcpu, stop: &AtomicBool) {
        let saved = vcpu
            .complete_pending_io()
            .and_then(|()| vcpu.save_state())
            .map_err(|e| e.to_string());
        let mut parked = self.lock();
        let slot = id as usize;
        if parked.states.len() <= slot {
            parked.states.resize(slot + 1, None);
        }
        parked.states[slot] = Some(saved);
        parked.count += 1;
        self.changed.notify_all();
        while self.is_requested() && !stop.load(Ordering::SeqCst) {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        parked.count -= 1;
        parked.states[slot] = None;
    }

    /// Marks the pause as requested; the caller then kicks every thread.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` vCPUs are parked and returns their saved states, in
    /// vCPU order. Gives up after `timeout`.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let mut parked = self.lock();
        while parked.count < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "only {} of {n} vCPUs paused within {timeout:?}",
                    parked.count
                ));
            }
            parked = self
                .changed
                .wait_timeout(parked, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        parked.states[..n]
            .iter()
            .enumerate()
            .map(|(id, s)| match s {
                Some(Ok(state)) => Ok(state.clone()),
                Some(Err(e)) => Err(format!("cannot save vCPU {id}: {e}")),
                None => Err(format!("vCPU {id} did not pause")),
            })
            .collect()
    }

    /// Lets parked threads run again.
    pub fn resume(&self) {
        let _parked = self.lock();
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Wakes parked threads so they see the stop flag.
    pub fn wake_for_stop(&self) {
        let _parked = self.lock();
        self.changed.notify_all();
    }
}

/// What a run of the vCPU asks the loop to do next.
enum Next {
    Continue,
    Exit(ExitReason),
    EmulationFailure,
}

fn run_once(id: u32, vcpu: &mut dyn Vcpu, shared: &VcpuShared) -> Next {
    match vcpu.run() {
        Ok(VcpuExit::IoIn { port, data }) => {
            shared.pio.read(u64::from(port), data);
            Next::Continue
        }
        Ok(VcpuExit::IoOut { port, data }) => {
            shared.pio.write(u64::from(port), data);
            Next::Continue
        }
        Ok(VcpuExit::MmioRead { addr, data }) => {
            shared.mmio.read(addr, data);
            Next::Continue
        }
        Ok(VcpuExit::MmioWrite { addr, data }) => {
            shared.mmio.write(addr, data);
            Next::Continue
        }
        Ok(VcpuExit::Interrupted) => Next::Continue,
        Ok(VcpuExit::Shutdown) => Next::Exit(ExitReason::TripleFault { vcpu: id }),
        Ok(VcpuExit::SystemEvent { kind }) => Next::Exit(match kind {
            SystemEventKind::Shutdown | SystemEventKind::Reset => ExitReason::GuestShutdown,
            SystemEventKind::Crash => ExitReason::VcpuError {
                vcpu: id,
                message: "the guest reported a crash".into(),
            },
            SystemEventKind::Other(k) => ExitReason::VcpuError {
                vcpu: id,
                message: format!("unknown system event {k}"),
            },
        }),
        Ok(VcpuExit::Hlt) => Next::Exit(ExitReason::VcpuError {
            vcpu: id,
            message: "the vCPU halted with interrupts disabled".into(),
        }),
        Ok(VcpuExit::InternalError { suberror: 1, .. }) => Next::EmulationFailure,
        Ok(VcpuExit::InternalError { suberror, .. }) => {
            Next::Exit(ExitReason::InternalError { vcpu: id, suberror })
        }
        Ok(VcpuExit::FailEntry { reason, .. }) => {
            Next::Exit(ExitReason::FailEntry { vcpu: id, reason })
        }
        Ok(VcpuExit::Other(what)) => Next::Exit(ExitReason::VcpuError {
            vcpu: id,
            message: format!("unhandled exit {what}"),
        }),
        Err(e) => Next::Exit(ExitReason::VcpuError {
            vcpu: id,
            message: e.to_string(),
        }),
    }
}

fn vcpu_loop(id: u32, mut vcpu: Box<dyn Vcpu>, shared: Arc<VcpuShared>) {
    if let Err(e) = vcpu.enable_kick_signal(kick_signal()) {
        shared.exit.report(ExitReason::VcpuError {
            vcpu: id,
            message: e.to_string(),
        });
        return;
    }
    if shared.seccomp {
        if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Vcpu) {
            shared.exit.report(ExitReason::VcpuError {
                vcpu: id,
                message: e.to_string(),
            });
            return;
        }
    }
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.pause.is_requested() {
            shared.pause.park(id, vcpu.as_mut(), &shared.stop);
            continue;
        }
        if id == 0 {
            shared.first_entry.get_or_init(|| shared.start.elapsed());
        }
        match run_once(id, vcpu.as_mut(), &shared) {
            Next::Continue => {}
            Next::Exit(reason) => {
                shared.exit.report(reason);
                break;
            }
            Next::EmulationFailure => {
                let rip = crate::arch::program_counter(vcpu.as_ref());
                shared.exit.report(ExitReason::EmulationFailure {
                    vcpu: id,
                    rip,
                    pvm_host: shared.pvm_host,
                });
                break;
            }
        }
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts vCPU `id` on a new thread.
    pub fn spawn(id: u32, vcpu: Box<dyn Vcpu>, shared: Arc<VcpuShared>) -> std::io::Result<Self> {
        // Before the thread exists: a kick that comes before the thread
        // registers itself must not end the process.
        hypervisor::install_kick_handler(kick_signal()).map_err(std::io::Error::other)?;
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, shared))?;
        Ok(VcpuThread { handle })
    }

    /// The thread's pthread handle, to kick it from elsewhere.
    pub fn pthread(&self) -> libc::pthread_t {
        std::os::unix::thread::JoinHandleExt::as_pthread_t(&self.handle)
    }

    /// Kicks the thread out of guest mode (it then sees the stop flag).
    pub fn kick(&self) {
        // The thread may already have ended; then there is nothing to kick.
        let _ = vmm_os::process::signal_thread(self.pthread(), kick_signal());
    }

    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
