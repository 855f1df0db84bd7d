//! The smallest VMM that boots an arm64 Linux `Image` with an initramfs to
//! user space on KVM: RAM, one vCPU, the in-kernel GICv3, a device tree,
//! and a 16550 console that only transmits. It is the yardstick of the
//! arm64 boot goal (docs/arm64.md): `vmm launch` of the same Image and
//! initramfs should take at most 1.2x its time. Nothing else: no devices,
//! no threads, no seccomp, no snapshots.
//!
//!   vmm-minimal-arm64 IMAGE INITRAMFS [CMDLINE]
//!
//! The guest's console goes to standard output; the program exits 0 when
//! the guest powers off (PSCI SYSTEM_OFF or SYSTEM_RESET).

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
mod machine;

use std::process::ExitCode;

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(image), Some(initramfs)) = (args.first(), args.get(1)) else {
        eprintln!("usage: vmm-minimal-arm64 IMAGE INITRAMFS [CMDLINE]");
        return ExitCode::from(2);
    };
    let cmdline = args.get(2).map_or("console=ttyS0 quiet", String::as_str);
    match machine::boot(image.as_ref(), initramfs.as_ref(), cmdline) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-minimal-arm64: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "aarch64")))]
fn main() -> ExitCode {
    eprintln!("vmm-minimal-arm64 runs on arm64 Linux hosts (KVM) only");
    ExitCode::FAILURE
}
