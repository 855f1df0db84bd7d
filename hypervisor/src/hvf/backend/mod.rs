//! The Hypervisor.framework calls, on applevisor-sys (the raw bindings:
//! the VMM maps its own file-backed guest memory, for snapshots and
//! forks, and creates the GIC at its own addresses, which the high-level
//! `applevisor` crate does not allow). macOS 15 or later: the platform
//! GIC (`hv_gic_create`) and its state API.

mod regs;
mod vcpu;
mod vm;

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use applevisor_sys as hv;

use crate::{Capability, Error, HypervisorKind, Result};

pub use vcpu::HvfVcpu;
pub use vm::HvfVm;

/// Turns a framework return code into this crate's error, with what the
/// code means and what to do (see [`super::describe`]).
pub(crate) fn check(call: &'static str, rc: hv::hv_return_t) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::call(
            call,
            io::Error::other(format!("{:#x}: {}", rc as u32, super::describe(rc))),
        ))
    }
}

/// Reads a string sysctl by name; `None` when the name does not exist.
pub fn sysctl_string(name: &std::ffi::CStr) -> Option<String> {
    let mut buf = [0u8; 256];
    let mut len = buf.len();
    // SAFETY: `buf` has `len` writable bytes; the name is a C string; no
    // new value is written (null, 0).
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    let text = &buf[..len.min(buf.len())];
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(text).into_owned())
}

/// Reads an integer sysctl by name; `None` when the name does not exist.
pub fn sysctl_u32(name: &std::ffi::CStr) -> Option<u32> {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>();
    // SAFETY: `value` is a live u32 and `len` its size; the name is a C
    // string; no new value is written (null, 0).
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&mut value as *mut u32).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(value)
}

/// The host counter's rate: nanoseconds = ticks * numer / denom.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timebase {
    pub numer: u32,
    pub denom: u32,
}

impl Timebase {
    // libc marks its Mach items deprecated in favour of the mach2 crate;
    // these two calls do not warrant another dependency.
    #[allow(deprecated)]
    fn host() -> Timebase {
        let mut info = libc::mach_timebase_info { numer: 0, denom: 0 };
        // SAFETY: fills the live struct.
        let rc = unsafe { libc::mach_timebase_info(&mut info) };
        if rc != 0 || info.denom == 0 {
            // Apple silicon's documented 24 MHz counter.
            return Timebase {
                numer: 125,
                denom: 3,
            };
        }
        Timebase {
            numer: info.numer,
            denom: info.denom,
        }
    }
}

/// The host's counter, which the guest's virtual counter follows.
pub(crate) fn host_ticks() -> u64 {
    // SAFETY: no arguments, no side effects.
    #[allow(deprecated)]
    unsafe {
        libc::mach_absolute_time()
    }
}

/// Hypervisor.framework on this Mac.
pub struct HvfHypervisor {
    max_vcpus: u32,
    timebase: Timebase,
}

impl HvfHypervisor {
    /// Checks that this Mac offers the hypervisor and learns its limits.
    pub fn new() -> Result<HvfHypervisor> {
        if sysctl_u32(c"kern.hv_support") != Some(1) {
            return Err(Error::Open {
                path: "Hypervisor.framework".into(),
                source: io::Error::from(io::ErrorKind::Unsupported),
                hint: "this Mac does not offer virtualization (sysctl kern.hv_support is not 1): \
                       use an Apple silicon Mac; inside a VM, the host must be an M3 or later \
                       on macOS 15 or later with nested virtualization enabled",
            });
        }
        let mut max_vcpus = 0u32;
        // SAFETY: writes the count into the live u32.
        check("hv_vm_get_max_vcpu_count", unsafe {
            hv::hv_vm_get_max_vcpu_count(&mut max_vcpus)
        })?;
        Ok(HvfHypervisor {
            max_vcpus,
            timebase: Timebase::host(),
        })
    }

    /// Whether a VM can be created here (the entitlement is present and
    /// no other VM exists in this process): creates one and destroys it.
    pub fn probe(&self) -> Result<()> {
        // SAFETY: a null config asks for the defaults.
        check("hv_vm_create", unsafe {
            hv::hv_vm_create(std::ptr::null_mut())
        })?;
        // SAFETY: the VM just created is this process's, and unused.
        check("hv_vm_destroy", unsafe { hv::hv_vm_destroy() })
    }
}

impl crate::HypervisorArch for HvfHypervisor {}

impl crate::Hypervisor for HvfHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::HypervisorFramework
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![
            Capability {
                name: "kern.hv_support",
                present: true,
            },
            Capability {
                name: "kern.hv_vmm_present (this macOS runs inside a VM)",
                present: sysctl_u32(c"kern.hv_vmm_present") == Some(1),
            },
        ]
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    fn create_vm(&self) -> Result<Box<dyn crate::Vm>> {
        Ok(Box::new(HvfVm::new(self.timebase, self.max_vcpus)?))
    }
}

thread_local! {
    /// The vCPU on this thread and its doorbell's write end, for the kick
    /// handler; set before the handler can run on this thread.
    static KICK_TARGET: Cell<Option<(hv::hv_vcpu_t, i32)>> = const { Cell::new(None) };
    /// Set by the kick handler; `run` returns `Interrupted` when it sees it.
    static KICKED: AtomicBool = const { AtomicBool::new(false) };
}

extern "C" fn handle_kick(_signal: libc::c_int) {
    KICKED.with(|k| k.store(true, Ordering::SeqCst));
    if let Some((vcpu, doorbell)) = KICK_TARGET.with(Cell::get) {
        // SAFETY: `vcpu` is this thread's vCPU (destroyed only after the
        // target is cleared); hv_vcpus_exit may be called from any
        // context. `write` is async-signal-safe and `doorbell` stays open
        // while the target is set.
        unsafe {
            hv::hv_vcpus_exit(&vcpu, 1);
            let one = 1u64.to_ne_bytes();
            libc::write(doorbell, one.as_ptr().cast(), one.len());
        }
    }
}

/// Installs the handler of the kick signal (process-wide; the VMM calls
/// it before it starts vCPU threads, so an early kick cannot kill the
/// process).
pub fn install_kick_handler(signal: i32) -> Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"; the
    // handler only touches thread-locals set up before, an atomic, and
    // async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_kick as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::call("sigaction", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Takes this thread's kick, if one came.
pub(crate) fn take_kick() -> bool {
    KICKED.with(|k| k.swap(false, Ordering::SeqCst))
}

/// Points the kick handler of this thread at `target` (or nothing).
pub(crate) fn set_kick_target(target: Option<(hv::hv_vcpu_t, i32)>) {
    KICK_TARGET.with(|t| t.set(target));
    // Touch the flag too, so that its first use is not in the handler.
    KICKED.with(|k| k.load(Ordering::SeqCst));
}
