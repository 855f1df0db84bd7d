//! The KVM backend, on kvm-ioctls. kvm-bindings types stay inside this module.

use std::cell::Cell;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuFd, VmFd};
use vmm_os::EventFd;

use crate::Hypervisor as _;
use crate::{
    Capability, Error, HypervisorKind, IoEventAddress, MemorySlot, Result, SystemEventKind,
    VcpuExit, VcpuState, VmState,
};

// An architecture's half provides: `REQUIRED_CAPS`, `HostInfo` (what it
// learns about the host once), `VmInfo` (about a VM, which its vCPUs
// share), `runs_nested`, `prepare_vm`, `create_platform_devices`,
// `save_vm`/`restore_vm`, `save_vcpu`/`restore_vcpu`, and the crate's
// architecture traits for `KvmHypervisor`, `KvmVm` and `KvmVcpu`.
#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "aarch64")]
use self::aarch64 as arch;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
use self::x86_64 as arch;

/// The arm64 vGIC's register tables are plain data, built on other hosts
/// too so that their unit tests run in CI here.
#[cfg(all(test, not(target_arch = "aarch64")))]
#[path = "aarch64/gic_regs.rs"]
#[allow(dead_code)]
mod aarch64_gic_regs;

/// The KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// Environment variable naming another KVM device node (for hosts that put
/// it elsewhere, and for tests).
pub const KVM_PATH_ENV: &str = "VMM_KVM_DEVICE";

/// The KVM device to open: `$VMM_KVM_DEVICE`, else /dev/kvm.
pub fn kvm_device_path() -> std::path::PathBuf {
    std::env::var_os(KVM_PATH_ENV)
        .filter(|p| !p.is_empty())
        .map(Into::into)
        .unwrap_or_else(|| KVM_PATH.into())
}
/// Present when the host's KVM is the PVM module.
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// What the VMM needs of KVM on every architecture (each adds its own:
/// `arch::REQUIRED_CAPS`).
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

fn os_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Opens `/dev/kvm` with errors that tell the user what to do.
pub fn open_kvm_device(path: &Path) -> Result<Kvm> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| {
            let hint = match source.kind() {
                io::ErrorKind::NotFound => {
                    "KVM is not available: load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization in the firmware or the cloud VM settings"
                }
                io::ErrorKind::PermissionDenied => {
                    "add your user to the group that owns it (usually `kvm`: sudo usermod -aG kvm $USER, then log in again) or run as root"
                }
                _ => "check that the KVM module is loaded and working",
            };
            Error::Open {
                path: path.display().to_string(),
                source,
                hint,
            }
        })?;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just opened on the KVM device and its ownership moves
    // into the `Kvm` object, which closes it.
    Ok(unsafe { Kvm::from_raw_fd(fd) })
}

/// The KVM hypervisor.
pub struct KvmHypervisor {
    kvm: Kvm,
    kind: HypervisorKind,
    /// What this architecture's half learned about the host.
    host: arch::HostInfo,
}

impl KvmHypervisor {
    /// Opens the KVM device (`kvm_device_path`) and checks the API version
    /// and required capabilities.
    pub fn new() -> Result<Self> {
        Self::open(&kvm_device_path())
    }

    /// Like `new`, with another device path.
    pub fn open(path: &Path) -> Result<Self> {
        let kvm = open_kvm_device(path)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion {
                found: version,
                expected: kvm_bindings::KVM_API_VERSION as i32,
            });
        }
        let hv = KvmHypervisor {
            kind: detect_kind(),
            host: arch::HostInfo::probe(&kvm),
            kvm,
        };
        if let Some(missing) = hv.capabilities().into_iter().find(|c| !c.present) {
            return Err(Error::MissingCapability(missing.name));
        }
        Ok(hv)
    }

    /// The KVM API version (12 on every current kernel).
    pub fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }
}

/// Tells PVM, nested and bare-metal KVM apart.
pub fn detect_kind() -> HypervisorKind {
    if Path::new(PVM_MODULE_PATH).exists() {
        return HypervisorKind::KvmPvm;
    }
    if arch::runs_nested() {
        HypervisorKind::KvmNested
    } else {
        HypervisorKind::KvmHardware
    }
}

impl crate::Hypervisor for KvmHypervisor {
    fn kind(&self) -> HypervisorKind {
        self.kind
    }

    fn capabilities(&self) -> Vec<Capability> {
        REQUIRED_CAPS
            .iter()
            .chain(arch::REQUIRED_CAPS)
            .map(|(cap, name)| Capability {
                name,
                present: self.kvm.check_extension(*cap),
            })
            .collect()
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    fn create_vm(&self) -> Result<Box<dyn crate::Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", os_err(e)))?;
        let info = arch::prepare_vm(&fd, &self.host)?;
        Ok(Box::new(KvmVm {
            fd,
            max_vcpus: self.max_vcpus(),
            info,
        }))
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    fd: VmFd,
    max_vcpus: u32,
    info: arch::VmInfo,
}

impl crate::Vm for KvmVm {
    unsafe fn set_memory_slot(&self, slot: MemorySlot) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: 0,
            guest_phys_addr: slot.guest_phys_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped while the
        // VM uses it (this function's contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::call("KVM_SET_USER_MEMORY_REGION", os_err(e)))
    }

    fn create_platform_devices(&self) -> Result<()> {
        arch::create_platform_devices(&self.fd)
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn crate::Vcpu>> {
        if id >= self.max_vcpus {
            return Err(Error::VcpuId {
                id,
                max: self.max_vcpus,
            });
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::call("KVM_CREATE_VCPU", os_err(e)))?;
        Ok(Box::new(KvmVcpu {
            fd,
            id,
            info: self.info.clone(),
        }))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| Error::call("KVM_IRQFD", os_err(e)))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
        };
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| Error::call("KVM_IOEVENTFD", os_err(e)))
    }

    fn save_state(&self) -> Result<VmState> {
        arch::save_vm(&self.fd, &self.info)
    }

    fn restore_state(&self, saved: &VmState) -> Result<()> {
        arch::restore_vm(&self.fd, &self.info, saved)
    }
}

thread_local! {
    /// The `kvm_run` area of the vCPU running on this thread, for the kick
    /// signal handler.
    static KICK_TARGET: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KICK_TARGET.with(|t| t.get());
    if !run.is_null() {
        // SAFETY: the pointer was set on this thread by `enable_kick_signal`
        // and points into the vCPU's kvm_run mapping, which lives as long as
        // the vCPU object that owns this thread's run loop. A volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the process-wide handler of the kick signal. Call it before
/// any thread can be kicked: until then the signal's default action ends
/// the process. The handler does nothing on threads without a vCPU.
pub fn install_kick_handler(signal: i32) -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(signal, handle_kick)
        .map_err(|e| Error::call("sigaction", io::Error::from_raw_os_error(e.errno())))
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    id: u32,
    info: arch::VmInfo,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let ours = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        KICK_TARGET.with(|t| {
            if t.get() == ours {
                t.set(std::ptr::null_mut());
            }
        });
    }
}

impl crate::Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // The exit borrows the vCPU; the kvm_run area is also read through
        // this pointer in the arms that need more than the exit carries.
        let run_area = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run_area` points into this vCPU's kvm_run mapping,
                // alive as long as `self`; KVM_RUN has returned.
                unsafe { std::ptr::addr_of_mut!((*run_area).immediate_exit).write_volatile(0) };
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(Error::call("KVM_RUN", os_err(e))),
        };
        use kvm_ioctls::VcpuExit as K;
        Ok(match exit {
            K::IoIn(port, data) => VcpuExit::IoIn { port, data },
            K::IoOut(port, data) => VcpuExit::IoOut { port, data },
            K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            K::Hlt => VcpuExit::Hlt,
            K::Shutdown => VcpuExit::Shutdown,
            K::Intr => VcpuExit::Interrupted,
            K::FailEntry(reason, cpu) => VcpuExit::FailEntry { reason, cpu },
            K::SystemEvent(kind, _) => VcpuExit::SystemEvent {
                kind: match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                    other => SystemEventKind::Other(other),
                },
            },
            K::InternalError => {
                // SAFETY: `run_area` is this vCPU's live kvm_run mapping and the
                // exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                // the `internal` member of the union.
                let internal = unsafe { (*run_area).__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VcpuExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            other => VcpuExit::Other(format!("{other:?}")),
        })
    }

    fn enable_kick_signal(&mut self, signal: i32) -> Result<()> {
        install_kick_handler(signal)?;
        let run = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        KICK_TARGET.with(|t| t.set(run));
        Ok(())
    }

    fn complete_pending_io(&mut self) -> Result<()> {
        let run = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        // SAFETY: `run` points into this vCPU's kvm_run mapping, alive as
        // long as `self`; the vCPU is not running (we hold `&mut self`).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        // With immediate_exit set, KVM_RUN finishes the pending exit and
        // returns EINTR without entering the guest.
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::call("KVM_RUN", os_err(e))),
            Ok(exit) => Err(Error::call(
                "KVM_RUN",
                io::Error::other(format!(
                    "the vCPU exited with {exit:?} while completing its last exit"
                )),
            )),
        };
        // SAFETY: as above.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
        result
    }

    fn save_state(&self) -> Result<VcpuState> {
        arch::save_vcpu(&self.fd, &self.info)
    }

    fn restore_state(&self, saved: &VcpuState) -> Result<()> {
        arch::restore_vcpu(&self.fd, saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::HypervisorArch as _;

    #[test]
    fn open_errors_say_what_to_do() {
        let missing = KvmHypervisor::open(Path::new("/nonexistent/kvm"))
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("modprobe kvm_intel"),
            "{missing}"
        );
        // Permission errors are covered by tests/cli_errors.rs, which runs
        // the VMM as an unprivileged user.
    }

    #[test]
    fn opens_this_hosts_kvm() {
        let hv = KvmHypervisor::new().expect("this machine has a usable /dev/kvm");
        assert_eq!(hv.api_version(), 12);
        assert!(hv.max_vcpus() >= 1);
        #[cfg(target_arch = "x86_64")]
        assert!(!hv.supported_cpuid().unwrap().is_empty());
    }
}
