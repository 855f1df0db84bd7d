//! vCPU threads: each runs its vCPU and dispatches port and MMIO exits to
//! the buses until the VM stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use hypervisor::{SystemEventKind, Vcpu, VcpuExit};
use vmm_sys_util::signal::Killable;

use crate::exit::{ExitReason, ExitSignal};

/// The real-time signal used to kick a vCPU thread out of guest mode.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
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
    while !shared.stop.load(Ordering::SeqCst) {
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
                let rip = vcpu.get_regs().ok().map(|r| r.rip);
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
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, shared))?;
        Ok(VcpuThread { handle })
    }

    /// Kicks the thread out of guest mode (it then sees the stop flag).
    pub fn kick(&self) {
        // The thread may already have ended; then there is nothing to kick.
        let _ = self.handle.kill(kick_signal());
    }

    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
