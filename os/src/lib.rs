//! The VMM's per-OS layer: the few host services the shared code (the
//! hypervisor traits, the devices, the VMM) takes from the OS, each with a
//! Linux and a macOS implementation behind one interface.
//!
//! - [`EventFd`]: a counter one thread writes and another waits on with
//!   `poll`. Linux: an eventfd (which KVM also takes as an irqfd or
//!   ioeventfd). macOS: a non-blocking pipe ([`pipe_event::PipeEventFd`]).
//! - [`epoll`]: Linux: `vmm_sys_util::epoll`. macOS: the same interface
//!   over a kqueue.
//! - [`timerfd`]: a timer that is a descriptor. Linux: a timerfd. macOS:
//!   a kqueue with one timer.
//! - [`file`]: unnamed scratch files and in-kernel copies;
//!   [`fill_random`] and [`peer_uid`].
//! - [`memory`]: guest RAM's files, seals and private pages.
//! - [`process`]: process exit descriptors, closing descriptors, dying
//!   with the parent, signal handlers, the vCPU kick signal.
//! - [`event_manager`]: the event loop. Linux: rust-vmm's `event-manager`.
//!   macOS: [`events`], the same interface over [`epoll`].
//!
//! The macOS implementations that are plain POSIX are also compiled into
//! this crate's tests on Linux, where CI runs them.

pub mod file;
mod host;
pub mod memory;
#[cfg(any(target_os = "macos", test))]
pub mod pipe_event;
pub mod process;

pub use host::{fill_random, peer_uid};

#[cfg(target_os = "linux")]
pub use vmm_sys_util::eventfd::EventFd;
/// The flag that makes an [`EventFd`]'s `read` return `WouldBlock` instead
/// of waiting when the counter is zero.
#[cfg(target_os = "linux")]
pub const EFD_NONBLOCK: i32 = libc::EFD_NONBLOCK;

#[cfg(target_os = "macos")]
pub use pipe_event::{PipeEventFd as EventFd, EFD_NONBLOCK};

#[cfg(target_os = "linux")]
pub use vmm_sys_util::epoll;

#[cfg(target_os = "macos")]
#[path = "kqueue.rs"]
pub mod epoll;

#[cfg(any(target_os = "macos", test))]
pub mod events;

#[cfg(target_os = "linux")]
pub use event_manager;

#[cfg(target_os = "macos")]
pub use events as event_manager;

#[cfg(target_os = "linux")]
#[path = "linux_timer.rs"]
pub mod timerfd;

#[cfg(target_os = "macos")]
#[path = "kqueue_timer.rs"]
pub mod timerfd;

/// Gives `evt` (a clone of an event) to a signal handler for good:
/// returns a descriptor through which a bare `write(2)` of 8 bytes (the
/// async-signal-safe call) wakes the event's readers. It stays open for
/// the rest of the process.
pub fn leak_for_signal_handler(evt: EventFd) -> std::os::fd::RawFd {
    #[cfg(target_os = "linux")]
    {
        std::os::fd::IntoRawFd::into_raw_fd(evt)
    }
    #[cfg(target_os = "macos")]
    {
        let fd = evt.write_fd();
        std::mem::forget(evt);
        fd
    }
}
