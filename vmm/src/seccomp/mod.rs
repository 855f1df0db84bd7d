//! seccomp filters, one per thread role (docs/security.md lists every
//! role's system calls and why each is needed).
//!
//! A thread installs its role's filter itself ([`apply`]) before it
//! handles anything from the guest. A call outside the filter traps
//! (SIGSYS) into [`on_sigsys`], which writes one line naming the thread's
//! role and the call to standard error and then makes [`KILL_CALL`], which
//! a second filter under every role's answers with
//! SECCOMP_RET_KILL_PROCESS: the VMM dies by SIGSYS, having said why.
//!
//! Filters are per thread: in a program that embeds the VMM, only the
//! VMM's own threads are filtered.

#[cfg(target_os = "linux")]
mod filter;
mod role;
#[cfg(target_os = "linux")]
mod rules;

pub use role::Role;

#[cfg(target_os = "linux")]
pub use filter::{apply, filtered, name_thread};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot build the seccomp filter of the {role} thread: {message} (a bug, please report it)"
    )]
    Build { role: &'static str, message: String },
    #[error("cannot install the seccomp filter of the {role} thread: {message}; this kernel may lack seccomp filters (run `vmm doctor`), or run with --no-seccomp for debugging only")]
    Install { role: &'static str, message: String },
    #[error("cannot install the handler that reports forbidden system calls: {0}")]
    Handler(std::io::Error),
    #[error("seccomp filters exist on Linux only: on this host the VMM runs without them (set \"seccomp\": false, or pass --no-seccomp; docs/macos.md)")]
    NotOnThisHost,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Other hosts have no seccomp: a thread asked to install a filter gets
/// an error saying so (the configuration turns filters off there).
#[cfg(not(target_os = "linux"))]
pub fn apply(_role: Role) -> Result<()> {
    Err(Error::NotOnThisHost)
}

/// Other hosts have no seccomp: no thread runs under a filter.
#[cfg(not(target_os = "linux"))]
pub fn filtered() -> bool {
    false
}

/// Other hosts have no seccomp: nothing to name.
#[cfg(not(target_os = "linux"))]
pub fn name_thread(_name: &'static str) -> Result<()> {
    Ok(())
}
