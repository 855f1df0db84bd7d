//! Why a VM stopped, and how vCPU threads and devices report it.

use devices::sync::Locked;
use std::fmt;
use std::sync::Mutex;

use vmm_os::EventFd;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or rebooted (both end the VM).
    GuestShutdown,
    /// The host stopped the VM (Ctrl-C, SIGTERM, an API call).
    Stopped { signal: Option<i32> },
    /// The guest kernel panicked; the message is its panic line.
    KernelPanic(String),
    /// The guest triple-faulted.
    TripleFault { vcpu: u32 },
    /// KVM's instruction emulator met an instruction it does not handle.
    EmulationFailure {
        vcpu: u32,
        rip: Option<u64>,
        pvm_host: bool,
    },
    /// Another KVM internal error.
    InternalError { vcpu: u32, suberror: u32 },
    /// KVM refused to enter the guest.
    FailEntry { vcpu: u32, reason: u64 },
    /// A vCPU failed in a way the VMM does not model.
    VcpuError { vcpu: u32, message: String },
}

impl ExitReason {
    /// True when the VM ended the way its user wanted.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::GuestShutdown | ExitReason::Stopped { .. })
    }

    /// The `vmm` process exit status for this reason: 0 for a guest
    /// shutdown, 128 + signal when stopped by a signal, 1 for a crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestShutdown => 0,
            ExitReason::Stopped { signal: Some(s) } => 128 + s,
            ExitReason::Stopped { signal: None } => 0,
            _ => 1,
        }
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestShutdown => write!(f, "the guest shut down"),
            ExitReason::Stopped { signal: Some(s) } => {
                write!(f, "the VM was stopped by {}", signal_name(*s))
            }
            ExitReason::Stopped { signal: None } => write!(f, "the VM was stopped by the host"),
            ExitReason::KernelPanic(msg) => write!(f, "the guest kernel panicked: {msg}"),
            ExitReason::TripleFault { vcpu } => write!(
                f,
                "the guest crashed: vCPU {vcpu} triple-faulted (a kernel that does not fit this machine, or a corrupt image)"
            ),
            ExitReason::EmulationFailure { vcpu, rip, pvm_host } => {
                write!(
                    f,
                    "the guest crashed: KVM could not emulate an instruction on vCPU {vcpu}"
                )?;
                if let Some(rip) = rip {
                    write!(f, " at RIP {rip:#x}")?;
                }
                write!(f, " (KVM internal error: emulation failure)")?;
                if *pvm_host {
                    write!(f, "; this host's KVM is PVM, where guest kernel code is emulated: boot the pvm kernel flavour (\"flavour\": \"auto\" or \"pvm\", with the kernel the setup command builds)")
                } else {
                    Ok(())
                }
            }
            ExitReason::InternalError { vcpu, suberror } => write!(
                f,
                "the guest crashed: KVM internal error (suberror {suberror}) on vCPU {vcpu}"
            ),
            ExitReason::FailEntry { vcpu, reason } => write!(
                f,
                "KVM could not enter the guest on vCPU {vcpu} (hardware entry failure reason {reason:#x})"
            ),
            ExitReason::VcpuError { vcpu, message } => {
                write!(f, "vCPU {vcpu} failed: {message}")
            }
        }
    }
}

/// The first reported exit reason, and an eventfd that wakes the VMM's
/// event loop when one is reported.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(vmm_os::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one was recorded before, and wakes the loop.
    pub fn report(&self, reason: ExitReason) {
        let mut slot = self.reason.locked();
        if slot.is_none() {
            tracing::debug!("VM exit: {reason}");
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the VMM event loop: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.locked().clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_report_wins_and_wakes() {
        let s = ExitSignal::new().unwrap();
        assert!(s.reason().is_none());
        s.report(ExitReason::TripleFault { vcpu: 1 });
        s.report(ExitReason::GuestShutdown);
        assert_eq!(s.reason(), Some(ExitReason::TripleFault { vcpu: 1 }));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes_and_messages() {
        assert_eq!(ExitReason::GuestShutdown.exit_code(), 0);
        let sig = ExitReason::Stopped {
            signal: Some(libc::SIGTERM),
        };
        assert_eq!(sig.exit_code(), 143);
        assert!(sig.is_clean());
        assert!(sig.to_string().contains("SIGTERM"));
        let emu = ExitReason::EmulationFailure {
            vcpu: 0,
            rip: Some(0xffff_ffff_8100_0000),
            pvm_host: true,
        };
        assert_eq!(emu.exit_code(), 1);
        let msg = emu.to_string();
        assert!(
            msg.contains("emulation failure") && msg.contains("PVM"),
            "{msg}"
        );
    }
}
