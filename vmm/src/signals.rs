//! SIGINT and SIGTERM stop the VM cleanly: the handler only records the
//! signal and writes an eventfd; the event loop does the rest.

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_os::EventFd;

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(num, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd kept open
        // for the life of the process by `install`, and `one` is 8 valid bytes.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Installs the SIGINT and SIGTERM handlers. The returned eventfd becomes
/// readable when either arrives; `received()` says which.
pub fn install() -> std::io::Result<EventFd> {
    let evt = EventFd::new(vmm_os::EFD_NONBLOCK)?;
    // The handler's copy lives for the rest of the process.
    let handler_copy = evt.try_clone()?;
    STOP_FD.store(
        vmm_os::leak_for_signal_handler(handler_copy),
        Ordering::SeqCst,
    );
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_os::process::set_signal_handler(sig, on_stop_signal)?;
    }
    Ok(evt)
}

/// The last stop signal received (None if none arrived).
pub fn received() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
