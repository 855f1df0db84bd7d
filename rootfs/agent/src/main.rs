//! The guest init and agent (PID 1 of the VMM's guest images).
//!
//! Boot: mount devtmpfs, write the boot timer (the VMM passes its address in
//! the `VMM_BOOT_TIMER` environment variable, from the kernel command line),
//! mount proc and sysfs, switch to the root disk when there is one, mount
//! devpts and the shared folders (`VMM_SHARES`), print one ready line with
//! the online CPUs. Then:
//! - a command given after `--` on the kernel command line is run, and the
//!   VM powers off;
//! - else, when the VMM gave the VM a vsock device (`VMM_AGENT_PORT`), the
//!   agent serves requests there (docs/agent-protocol.md) until told to
//!   shut down;
//! - else the VM powers off.
//!
//! The command is read from /proc/cmdline rather than from argv: the kernel
//! also passes the boot parameters it does not know (such as `noxsave`) to
//! init as arguments, so argv cannot tell them from the command.

#[cfg(target_os = "linux")]
mod guest;

#[cfg(target_os = "linux")]
fn main() {
    guest::main()
}

/// The agent runs inside the VMM's Linux guests; on another OS (a macOS
/// host builds the workspace too) the binary only says so.
#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!(
        "vmm-agent is the init of the VMM's Linux guests: build it for a Linux target \
         (the guest images are built on Linux; see docs/macos.md)"
    );
    std::process::exit(2);
}
