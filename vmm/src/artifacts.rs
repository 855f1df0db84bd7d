//! Where the setup command leaves the guest kernels and images, and which
//! kernel flavour fits this host.
//!
//! Layout of the cache (`$VMM_CACHE_DIR`, else `$XDG_CACHE_HOME/vmm`, else
//! `~/.cache/vmm`): `kernel/<flavour>-<hash>/vmlinux` (`Image` for arm64) and
//! `initramfs/<hash>/initramfs.cpio` and `base/<hash>/base.ext4`, each keyed
//! by a hash of its inputs, plus the stable links `kernel/<flavour>`,
//! `initramfs/current` and `base/current` to the newest build. The VMM reads
//! the stable links.

use std::path::PathBuf;

use hypervisor::HypervisorKind;

use crate::arch::Architecture;
use crate::config::Flavour;

/// Kernel command-line flags every PVM guest needs (see docs/host-kvm.md):
/// CPU features KVM's emulator cannot run in kernel mode are turned off, and
/// run-time text patching is avoided. The last two are environment
/// variables the kernel hands to init, and every guest process inherits:
/// with `noxsave` the guest kernel saves only x87/SSE state when it switches
/// tasks, while user code on a PVM host runs with the host's XCR0 (AVX and
/// AVX-512 enabled), so a task's YMM/ZMM/K registers would be overwritten by
/// other tasks' (measured with tools/pvm/ymm.c: a value held in ymm0 by
/// one of three processes changed in 1129 of 1447 rounds). They make
/// glibc's string functions and OpenSSL use SSE code instead, whose
/// registers the kernel does save. `clocksource=kvm-clock`: a PVM guest
/// reads the host's TSC, which a restore cannot set back, so on the `tsc`
/// clock a restored guest's monotonic time jumped by the time since the
/// snapshot (and it caught up on that time after each restore: a template
/// an hour old restored about 150 ms slower); kvm-clock is restored with
/// the snapshot (KVM_SET_CLOCK) and continues.
pub const PVM_CMDLINE: &str = concat!(
    "noxsave clearcpuid=popcnt,smap,fsgsbase,rdpid,rdrand,rdseed,erms,fsrm,invpcid,pcid,cx16,clflushopt,clwb,rdtscp",
    " noreplace-smp percpu_alloc=page rodata=off clocksource=kvm-clock",
    " GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL,-AVX512ER,-AVX512PF,-FMA,-FMA4",
    // OpenSSL's capability words: CPUID.1 ECX bits AVX, FMA, F16C; CPUID.7
    // EBX bits AVX2 and AVX-512 (F, DQ, IFMA, PF, ER, CD, BW, VL) and ECX
    // bits VBMI, VBMI2, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ.
    " OPENSSL_ia32cap=~0x3000100000000000:~0x5e42dc230020",
);

/// A kernel flavour resolved for a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFlavour {
    /// x86_64, for real KVM.
    Standard,
    /// x86_64, for PVM hosts.
    Pvm,
    /// arm64: what `standard` means on an arm64 host.
    Arm64,
}

impl KernelFlavour {
    /// The flavour `flavour` means on a host of `kind`.
    pub fn resolve(flavour: Flavour, kind: HypervisorKind) -> Self {
        match flavour {
            Flavour::Pvm => KernelFlavour::Pvm,
            Flavour::Auto if kind.needs_pvm_guest() => KernelFlavour::Pvm,
            Flavour::Standard | Flavour::Auto => match crate::arch::ARCH {
                Architecture::X86_64 => KernelFlavour::Standard,
                Architecture::Aarch64 => KernelFlavour::Arm64,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelFlavour::Standard => "standard",
            KernelFlavour::Pvm => "pvm",
            KernelFlavour::Arm64 => "arm64",
        }
    }

    /// The kernel file guest-kernel/build.sh leaves for this flavour.
    pub fn file(self) -> &'static str {
        match self {
            KernelFlavour::Standard | KernelFlavour::Pvm => "vmlinux",
            KernelFlavour::Arm64 => "Image",
        }
    }

    /// Command-line flags this flavour needs by default.
    pub fn cmdline(self) -> &'static str {
        match self {
            KernelFlavour::Standard | KernelFlavour::Arm64 => "",
            KernelFlavour::Pvm => PVM_CMDLINE,
        }
    }
}

/// The artifact cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("vmm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("vmm")
}

/// The default kernel of a flavour.
pub fn default_kernel(flavour: KernelFlavour) -> PathBuf {
    cache_dir()
        .join("kernel")
        .join(flavour.name())
        .join(flavour.file())
}

/// The default base image (Debian, ext4).
pub fn default_base_image() -> PathBuf {
    cache_dir().join("base").join("current").join("base.ext4")
}

/// The default initramfs: the guest agent plus busybox, for VMs without a
/// root disk.
pub fn default_initramfs() -> PathBuf {
    cache_dir()
        .join("initramfs")
        .join("current")
        .join("initramfs.cpio")
}

/// The agent-only initramfs, for VMs whose root file system is a disk (and
/// for the boot benchmark): 0.5 MB instead of 2.4 MB to unpack.
pub fn default_minimal_initramfs() -> PathBuf {
    cache_dir()
        .join("initramfs")
        .join("current")
        .join("initramfs-minimal.cpio")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_host() {
        use HypervisorKind::*;
        assert_eq!(
            KernelFlavour::resolve(Flavour::Auto, KvmPvm),
            KernelFlavour::Pvm
        );
        assert_eq!(
            KernelFlavour::resolve(Flavour::Auto, KvmHardware),
            KernelFlavour::Standard
        );
        assert_eq!(
            KernelFlavour::resolve(Flavour::Standard, KvmPvm),
            KernelFlavour::Standard
        );
        assert!(KernelFlavour::Pvm.cmdline().contains("noxsave"));
        assert!(KernelFlavour::Pvm
            .cmdline()
            .contains(" GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"));
        assert!(!KernelFlavour::Standard.cmdline().contains("GLIBC_TUNABLES"));
        assert!(default_kernel(KernelFlavour::Pvm).ends_with("kernel/pvm/vmlinux"));
    }
}
