//! The VMM's per-OS layer: the few host services the shared code (the
//! hypervisor traits, the devices, the VMM) takes from the OS, each with a
//! Linux and a macOS implementation behind one interface.
//!
//! - [`EventFd`]: a counter one thread writes and another waits on with
//!   `poll`. Linux: an eventfd (which KVM also takes as an irqfd or
//!   ioeventfd). macOS: a non-blocking pipe ([`pipe_event::PipeEventFd`]).
//!
//! The macOS implementations that are plain POSIX are also compiled into
//! this crate's tests on Linux, where CI runs them.

#[cfg(any(target_os = "macos", test))]
pub mod pipe_event;

#[cfg(target_os = "linux")]
pub use vmm_sys_util::eventfd::EventFd;
/// The flag that makes an [`EventFd`]'s `read` return `WouldBlock` instead
/// of waiting when the counter is zero.
#[cfg(target_os = "linux")]
pub const EFD_NONBLOCK: i32 = libc::EFD_NONBLOCK;

#[cfg(target_os = "macos")]
pub use pipe_event::{PipeEventFd as EventFd, EFD_NONBLOCK};
