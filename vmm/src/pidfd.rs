//! Process descriptors: an fd that becomes readable when a process ends
//! (Linux: a pidfd; macOS: a kqueue; see `vmm_os::process::exit_fd`).

use std::os::fd::OwnedFd;

/// A descriptor for process `pid` that becomes readable when it ends.
pub fn open(pid: u32) -> std::io::Result<OwnedFd> {
    vmm_os::process::exit_fd(pid)
}
