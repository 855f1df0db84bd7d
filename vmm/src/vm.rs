//! Building a VM from its configuration and running it to the end.

use devices::sync::Locked;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::legacy::{
    boot_timer::BootTime, BootTimer, ConsoleOutput, GuestPanic, SerialDevice, I8042,
};
use devices::{Bus, EventFdLine};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use hypervisor::{Hypervisor, HypervisorKind, Vcpu};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiServer, ApiThread};
use crate::artifacts::{self, KernelFlavour};
use crate::config::{NetworkConfig, RootfsConfig, SerialOutput, VmConfig};
use crate::control::Controller;
use crate::exit::{ExitReason, ExitSignal};
use crate::machine::{Machine, MachineHandle, VmInfo};
use crate::memory::{GuestRam, MemoryImage};
use crate::snapshot::RestoreSource;
use crate::vcpu::{PauseControl, VcpuShared, VcpuThread};
use crate::virtio::{order_as_saved, DeviceId, VirtioPlacer, VirtioSlot};
use crate::x86_64::{boot, cpuid, layout, mptable, regs};
use devices::virtio::block::{Block, LayeredDisk, SharedDisk};
use devices::virtio::fs::{Fs, PassthroughFs};
use devices::virtio::net::tap::Tap;
use devices::virtio::net::user::{self, UserNet, UserNetConfig};
use devices::virtio::net::{Net, NetBackend};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use hypervisor::CpuidEntry;

/// An event-loop subscriber for a device's host side.
type Backend = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The guest's MAC address unless the config names one (locally
/// administered, unicast).
const DEFAULT_MAC: [u8; 6] = [0x02, 0x56, 0x4d, 0x4d, 0x00, 0x01];

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error("\"vcpus\" is {asked}, but this host allows at most {max} vCPUs per VM")]
    TooManyVcpus { asked: u32, max: u32 },
    #[error("no \"kernel\" given and the default {flavour} kernel is not built ({path} is missing): run tools/setup.sh, or set \"kernel\" in the config")]
    DefaultKernelMissing {
        flavour: &'static str,
        path: PathBuf,
    },
    #[error("no \"initramfs\" given and the default one is not built ({path} is missing): run tools/setup.sh, or set \"initramfs\" in the config")]
    DefaultInitramfsMissing { path: PathBuf },
    #[error("\"rootfs\" has no \"base\" and the default base image is not built ({path} is missing): run tools/setup.sh, or set \"rootfs\": {{\"base\": ...}}")]
    DefaultBaseMissing { path: PathBuf },
    #[error(transparent)]
    Disk(#[from] devices::virtio::block::disk::Error),
    #[error(transparent)]
    Api(#[from] crate::api::Error),
    #[error(transparent)]
    Machine(#[from] crate::machine::Error),
    #[error("cannot listen on the vsock socket {path}: {source}; check that its folder exists and is writable")]
    VsockSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Virtio(#[from] crate::virtio::Error),
    #[error(transparent)]
    Tap(#[from] devices::virtio::net::tap::Error),
    #[error(transparent)]
    UserNet(#[from] devices::virtio::net::user::Error),
    #[error("share {tag:?}: {source}")]
    Share {
        tag: String,
        source: devices::virtio::fs::Error,
    },
    #[error("cannot open the initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::bus::Error),
    #[error("cannot set up the VMM event loop: {0}")]
    EventLoop(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the saved machine does not fit its configuration: {0}")]
    RestoreMismatch(String),
    #[error("cannot restore {id}: {source}")]
    RestoreDevice {
        id: DeviceId,
        source: devices::virtio::mmio::RestoreError,
    },
    #[error("cannot restore the serial port: {0}")]
    RestoreSerial(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Boot timings, measured from the VMM's start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BootTimings {
    /// To vCPU 0's first entry into the guest.
    pub vmm_setup: Option<Duration>,
    /// To the guest init's write to the boot timer.
    pub boot_to_init: Option<Duration>,
}

/// How a VM run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub reason: ExitReason,
    pub timings: BootTimings,
    /// The VMM's resident memory outside guest RAM, in KiB, measured when
    /// the guest stopped.
    pub vmm_overhead_rss_kib: Option<u64>,
}

impl RunOutcome {
    /// The JSON report `vmm launch --report` writes.
    pub fn report_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        serde_json::json!({
            "exit_reason": self.reason.to_string(),
            "exit_code": self.reason.exit_code(),
            "clean": self.reason.is_clean(),
            "vmm_setup_ms": ms(self.timings.vmm_setup),
            "boot_to_init_ms": ms(self.timings.boot_to_init),
            "vmm_overhead_rss_kib": self.vmm_overhead_rss_kib,
        })
    }
}

/// How to run a built VM.
#[derive(Default)]
pub struct RunOptions {
    /// The VM stops when this becomes readable (see `signals::install`).
    pub stop_evt: Option<EventFd>,
    /// Serve the control API on this Unix socket while the VM runs.
    pub api_socket: Option<PathBuf>,
    /// Listen on the agent's ready port (`<uds_path>_1023`) so the machine
    /// knows when the agent serves, even without an API socket (the
    /// in-process API needs it). With an API socket it always does; without
    /// either, a program of the user's may listen there itself.
    pub watch_agent: bool,
    /// Called once every vCPU thread runs, with a handle that sends the
    /// machine actions (a fork child acknowledges its start with it; the
    /// in-process Rust API keeps the handle).
    pub on_started: Option<Box<dyn FnOnce(MachineHandle) + Send>>,
}

/// What a VM was built from, after defaults were filled in.
#[derive(Debug, Clone)]
pub struct ResolvedBoot {
    pub kind: HypervisorKind,
    pub flavour: KernelFlavour,
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
}

/// A VM made ahead of a restore from a known frozen memory base (a fork
/// child's spare, while it waits for its parent's next fork): created,
/// the base mapped copy-on-write and registered, irqchip and PIT created.
/// That takes the work that grows with memory size (the hypervisor's
/// per-page structures for a memory slot, and invalidating them when the
/// mapping changes) off the fork path: the fork then only maps the
/// overlays written since.
pub struct Prepared {
    vm: Box<dyn hypervisor::Vm>,
    ram: GuestRam,
}

/// Identifies a file (device and inode).
fn file_id(file: &std::fs::File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

impl Prepared {
    pub fn new(
        hv: &dyn Hypervisor,
        base: Arc<std::fs::File>,
        memory_size: u64,
    ) -> Result<Prepared> {
        let vm = hv.create_vm()?;
        let ram = GuestRam::from_image(&MemoryImage {
            size: memory_size,
            base,
            overlays: Vec::new(),
        })?;
        ram.register(vm.as_ref())?;
        vm.create_platform_devices()?;
        Ok(Prepared { vm, ram })
    }

    /// Whether `image` is made over the base this VM was prepared with.
    fn fits(&self, image: &MemoryImage) -> bool {
        image.size == self.ram.size
            && file_id(&image.base).is_some()
            && file_id(&image.base) == file_id(&self.ram.file)
    }
}

/// A built VM, ready to run.
pub struct Vm {
    // Field order matters for drop: vCPUs before the VM, the VM before its memory.
    vcpus: Vec<Box<dyn Vcpu>>,
    vm: Box<dyn hypervisor::Vm>,
    ram: GuestRam,
    shared: Arc<VcpuShared>,
    disk: Option<SharedDisk>,
    disk_base: Option<PathBuf>,
    cpuid: Vec<Vec<CpuidEntry>>,
    config: VmConfig,
    /// Restored from a machine whose agent was up: reseed it, then report
    /// it ready.
    restored_agent: bool,
    serial: Arc<Mutex<SerialDevice>>,
    panic: GuestPanic,
    boot_time: BootTime,
    reset_evt: EventFd,
    serial_is_stdout: bool,
    virtio: Vec<VirtioSlot>,
    backends: Vec<Backend>,
    info: VmInfo,
    resolved: ResolvedBoot,
}

/// The kernel command line: the VMM's own arguments, the flavour's, then
/// the user's (later arguments win in Linux).
pub fn kernel_cmdline(config: &VmConfig, flavour: KernelFlavour, devices: &[String]) -> String {
    let mut parts = vec![
        "console=ttyS0".to_string(),
        "reboot=k".into(),
        "panic=-1".into(),
        "quiet".into(),
        format!("VMM_BOOT_TIMER={:#x}", layout::BOOT_TIMER_START),
    ];
    let flavour_args = config
        .flavour_cmdline
        .clone()
        .unwrap_or_else(|| flavour.cmdline().to_string());
    parts.push(flavour_args);
    parts.extend(devices.iter().cloned());
    if let Some(extra) = &config.cmdline {
        parts.push(extra.clone());
    }
    parts.retain(|p| !p.trim().is_empty());
    parts.join(" ")
}

/// `VMM_SHARES=tag:guest_path[:ro],...` for the guest init (the config
/// checked that tags and paths have no separators or spaces).
fn shares_arg(shares: &[crate::config::ShareConfig]) -> String {
    let list: Vec<String> = shares
        .iter()
        .map(|s| {
            let ro = if s.read_only { ":ro" } else { "" };
            format!("{}:{}{ro}", s.tag, s.guest_path.display())
        })
        .collect();
    format!("VMM_SHARES={}", list.join(","))
}

/// The kernel's static address setting: `ip=ADDR::GW:MASK::eth0:off`.
fn ip_arg(address: &str, gateway: Option<&str>) -> Result<String> {
    let (addr, len) = crate::config::parse_cidr(address)?;
    let mask = std::net::Ipv4Addr::from(user::policy::prefix_mask(len));
    Ok(format!(
        "ip={addr}::{}:{mask}::eth0:off",
        gateway.unwrap_or("")
    ))
}

/// The virtio-net device for `network`. A restored or forked machine gets a
/// user-mode network of its own (no connections carried over); its port
/// forwards are bound when the ports are free, else left out with a
/// warning (the original VM may still hold them).
fn network_device(network: &NetworkConfig, restored: bool) -> Result<Net> {
    let (NetworkConfig::Tap { mac, .. } | NetworkConfig::User { mac, .. }) = network;
    let mac = match mac {
        Some(m) => crate::config::parse_mac(m)?,
        None => DEFAULT_MAC,
    };
    let backend: Box<dyn NetBackend> = match network {
        NetworkConfig::Tap { tap, .. } => Box::new(Tap::open(tap)?),
        NetworkConfig::User {
            egress,
            port_forwards,
            dns,
            ..
        } => {
            let dns = match dns {
                Some(list) => list
                    .iter()
                    .map(|d| crate::config::parse_dns_server(d))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                None => user::host_resolvers(),
            };
            if dns.is_empty() {
                tracing::warn!("network: /etc/resolv.conf names no IPv4 name server; the guest's DNS queries will fail (set \"dns\" in \"network\")");
            }
            let mut forwards = Vec::new();
            for f in port_forwards {
                match user::listen(f.bind_addr()?) {
                    Ok(listener) => forwards.push(user::PortForward {
                        listener,
                        guest_port: f.guest,
                    }),
                    Err(e) if restored => {
                        tracing::warn!("network: {e}; this restored VM goes without it")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Box::new(UserNet::new(UserNetConfig {
                guest_mac: mac,
                policy: egress.policy()?,
                dns,
                port_forwards: forwards,
            })?)
        }
    };
    Ok(Net::new(mac, backend))
}

/// Every vsock connection, network flow and guest inode a share holds is a
/// host descriptor: lift the soft descriptor limit to the hard one, for
/// every VM.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill and then pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::info!(
                    "cannot raise the descriptor limit; the VM can hold fewer connections and files"
                );
            }
        }
    }
}

/// `path` when the setup command built it, else the error `missing` makes.
fn built(path: PathBuf, missing: impl FnOnce(PathBuf) -> Error) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(missing(path))
    }
}

fn resolve_kernel(config: &VmConfig, flavour: KernelFlavour) -> Result<PathBuf> {
    match &config.kernel {
        Some(path) => Ok(path.clone()),
        None => built(artifacts::default_kernel(flavour), |path| {
            Error::DefaultKernelMissing {
                flavour: flavour.name(),
                path,
            }
        }),
    }
}

fn resolve_initramfs(config: &VmConfig) -> Result<Option<PathBuf>> {
    match &config.initramfs {
        Some(path) if path.as_os_str().is_empty() => Ok(None),
        Some(path) => Ok(Some(path.clone())),
        None => {
            // With a root disk the agent switches to it: busybox is not needed.
            let path = if config.rootfs.is_some() {
                artifacts::default_minimal_initramfs()
            } else {
                artifacts::default_initramfs()
            };
            built(path, |path| Error::DefaultInitramfsMissing { path }).map(Some)
        }
    }
}

fn resolve_base(rootfs: &RootfsConfig) -> Result<PathBuf> {
    match &rootfs.base {
        Some(path) => Ok(path.clone()),
        None => built(artifacts::default_base_image(), |path| {
            Error::DefaultBaseMissing { path }
        }),
    }
}

/// The root disk: from the config, or (restoring) the saved frozen layer
/// over the base with a new throwaway layer on top.
fn root_disk(
    rootfs: &RootfsConfig,
    base: &std::path::Path,
    restore: Option<&mut RestoreSource>,
) -> Result<SharedDisk> {
    let disk = match restore {
        None => LayeredDisk::open(base, rootfs.layer.as_deref(), rootfs.read_only)?,
        Some(r) => {
            let base_file = match r.disk_base_file.take() {
                Some(f) => f,
                None => std::fs::File::open(base).map_err(|source| {
                    devices::virtio::block::disk::Error::OpenBase {
                        path: base.to_path_buf(),
                        source,
                    }
                })?,
            };
            let lower = r.disk_layer.take().ok_or_else(|| {
                Error::RestoreMismatch("the root disk's saved layer is missing".into())
            })?;
            LayeredDisk::open_parts(
                base_file,
                base,
                Some((lower.0, &lower.1)),
                None,
                rootfs.read_only,
            )?
        }
    };
    Ok(Arc::new(Mutex::new(disk)))
}

fn serial_writer(serial: &SerialOutput) -> Result<Box<dyn std::io::Write + Send>> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Off => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

impl Vm {
    /// Builds a VM: memory, kernel, devices and vCPUs, all ready to run.
    /// `start` is when the VMM started (the boot timings count from it).
    pub fn build(config: &VmConfig, hv: &dyn Hypervisor, start: Instant) -> Result<Vm> {
        Self::assemble(config, hv, start, None, None)
    }

    /// Builds a VM that continues a saved machine (from a snapshot or a
    /// fork): its memory mapped copy-on-write, its devices and vCPUs in
    /// their saved state.
    pub fn restore(source: RestoreSource, hv: &dyn Hypervisor, start: Instant) -> Result<Vm> {
        let config = source.state.config.clone();
        Self::assemble(&config, hv, start, Some(source), None)
    }

    /// `restore` into a VM prepared for this memory size.
    pub fn restore_prepared(
        source: RestoreSource,
        hv: &dyn Hypervisor,
        start: Instant,
        prepared: Prepared,
    ) -> Result<Vm> {
        let config = source.state.config.clone();
        Self::assemble(&config, hv, start, Some(source), Some(prepared))
    }

    fn assemble(
        config: &VmConfig,
        hv: &dyn Hypervisor,
        start: Instant,
        mut restore: Option<RestoreSource>,
        prepared: Option<Prepared>,
    ) -> Result<Vm> {
        config.validate()?;
        let kind = hv.kind();
        let flavour = KernelFlavour::resolve(config.flavour, kind);
        let max_vcpus = hv.max_vcpus().min(mptable::max_cpus());
        if config.vcpus > max_vcpus {
            return Err(Error::TooManyVcpus {
                asked: config.vcpus,
                max: max_vcpus,
            });
        }
        let mem_size = config.memory_mib << 20;
        if let Some(r) = &restore {
            let s = &r.state;
            if s.vcpus.len() != config.vcpus as usize
                || s.cpuid.len() != s.vcpus.len()
                || s.memory_size != mem_size
                || r.memory.size != mem_size
            {
                return Err(Error::RestoreMismatch(format!(
                    "{} vCPUs and {} bytes of memory saved, the config has {} and {}",
                    s.vcpus.len(),
                    s.memory_size,
                    config.vcpus,
                    mem_size
                )));
            }
        }

        // What to boot (a restored machine has booted already).
        let mut boot_files = None;
        let mut kernel_path = PathBuf::new();
        let mut initramfs_path = None;
        if restore.is_none() {
            kernel_path = resolve_kernel(config, flavour)?;
            let kernel = boot::KernelImage::open(&kernel_path)?;
            initramfs_path = resolve_initramfs(config)?;
            let initramfs = match &initramfs_path {
                None => None,
                Some(path) => {
                    let (file, size) =
                        boot::open_regular_file(path).map_err(|source| Error::Initramfs {
                            path: path.clone(),
                            source,
                        })?;
                    Some((file, size))
                }
            };
            let initramfs_size = initramfs.as_ref().map_or(0, |(_, size)| *size);
            boot::check_memory(&kernel, initramfs_size, mem_size)?;
            boot_files = Some((kernel, initramfs, initramfs_size));
        }

        let phase = |what: &str| tracing::debug!("setup: {what} at {:?}", start.elapsed());
        phase("config checked");
        let (vm, ram) = match (&restore, prepared) {
            (Some(r), Some(mut p)) if p.fits(&r.memory) => {
                p.ram.add_overlays(&r.memory.overlays)?;
                (p.vm, p.ram)
            }
            (restore, _) => {
                let vm = hv.create_vm()?;
                let ram = match restore {
                    None => GuestRam::new(mem_size)?,
                    Some(r) => GuestRam::from_image(&r.memory)?,
                };
                // Memory before the irqchip: adding a memory slot to a VM
                // that has one costs ~6 ms on some hosts (measured on PVM),
                // before it 0.2 ms.
                ram.register(vm.as_ref())?;
                vm.create_platform_devices()?;
                (vm, ram)
            }
        };
        if let Some(r) = &restore {
            vm.restore_state(&r.state.vm)?;
        }
        phase("VM, memory and irqchip created");
        if let Some((kernel, _, initramfs_size)) = &boot_files {
            // Populate the memory about to be written in bulk, on two threads.
            ram.populate(&[
                (layout::HIMEM_START, kernel.end - layout::HIMEM_START),
                (
                    boot::initramfs_addr(mem_size, *initramfs_size),
                    *initramfs_size,
                ),
            ])?;
            phase("memory populated");
        }

        // Devices.
        let exit = Arc::new(ExitSignal::new().map_err(io_err("create an eventfd"))?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)?;
        let console = ConsoleOutput::new(serial_writer(&config.serial)?);
        let panic = console.panic_handle();
        let serial = match &restore {
            None => SerialDevice::new(EventFdLine(serial_irq), console),
            Some(r) => SerialDevice::restored(EventFdLine(serial_irq), console, &r.state.serial)
                .map_err(Error::RestoreSerial)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), layout::SERIAL_PORT, SerialDevice::LEN)?;
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(io_err("clone an eventfd"))?);
        pio.insert(Arc::new(Mutex::new(i8042)), I8042::BASE, I8042::LEN)?;
        let timer = BootTimer::new(start);
        let boot_time = timer.handle();
        mmio.insert(
            Arc::new(Mutex::new(timer)),
            layout::BOOT_TIMER_START,
            BootTimer::LEN,
        )?;

        raise_fd_limit();
        // Devices in the configuration's order; a restore puts them where
        // the saved machine had them and gives each its own saved state.
        let mut devices: Vec<(DeviceId, Box<dyn VirtioDevice>)> = Vec::new();
        let mut disk = None;
        let mut disk_base = None;
        if let Some(rootfs) = &config.rootfs {
            let base = match restore.as_ref().and_then(|r| r.state.disk_base.clone()) {
                Some(path) => path,
                None => resolve_base(rootfs)?,
            };
            let shared_disk = root_disk(rootfs, &base, restore.as_mut())?;
            devices.push((
                DeviceId::RootDisk,
                Box::new(Block::new(shared_disk.clone(), "rootfs")),
            ));
            disk = Some(shared_disk);
            disk_base = Some(base);
        }
        let mut backends: Vec<Backend> = Vec::new();
        if let Some(v) = &config.vsock {
            let vsock = Vsock::new(v.cid, &v.uds_path).map_err(|source| Error::VsockSocket {
                path: v.uds_path.clone(),
                source,
            })?;
            backends.push(Arc::new(Mutex::new(vsock.backend())));
            devices.push((DeviceId::Vsock, Box::new(vsock)));
        }
        if let Some(network) = &config.network {
            let net = network_device(network, restore.is_some())?;
            backends.push(Arc::new(Mutex::new(net.handle())));
            devices.push((DeviceId::Network, Box::new(net)));
        }
        for share in &config.shares {
            let fs = PassthroughFs::new(&share.host_path, share.read_only).map_err(|source| {
                Error::Share {
                    tag: share.tag.clone(),
                    source,
                }
            })?;
            devices.push((
                DeviceId::Share(share.tag.clone()),
                Box::new(Fs::new(&share.tag, fs)),
            ));
        }
        if let Some(r) = &restore {
            let saved: Vec<DeviceId> = r.state.virtio.iter().map(|d| d.id.clone()).collect();
            devices = order_as_saved(devices, &saved)?;
        }
        let mut placer = VirtioPlacer::new(vm.as_ref(), &mmio, &ram.memory);
        let mut virtio = Vec::with_capacity(devices.len());
        for (id, device) in devices {
            virtio.push(placer.add(id, device)?);
        }
        if let Some(r) = &restore {
            for (slot, saved) in virtio.iter().zip(&r.state.virtio) {
                slot.transport
                    .locked()
                    .restore(&saved.transport)
                    .map_err(|source| Error::RestoreDevice {
                        id: slot.id.clone(),
                        source,
                    })?;
            }
        }
        phase("devices created");

        let mut boot_entry = None;
        let cmdline = match (&restore, boot_files) {
            (Some(r), _) => r.state.cmdline.clone(),
            (None, None) => String::new(),
            (None, Some((kernel, initramfs, _))) => {
                let mut device_args: Vec<String> =
                    virtio.iter().map(|v| v.cmdline.clone()).collect();
                if config.vsock.is_some() {
                    // Tells the guest init to serve the agent on vsock.
                    device_args.push(format!("VMM_AGENT_PORT={}", vmm_agent::AGENT_PORT));
                }
                if !config.shares.is_empty() {
                    // Tells the guest init what to mount where.
                    device_args.push(shares_arg(&config.shares));
                }
                match &config.network {
                    Some(NetworkConfig::Tap {
                        address, gateway, ..
                    }) => device_args.push(ip_arg(address, gateway.as_deref())?),
                    // The guest kernel asks the user-mode network's DHCP.
                    Some(NetworkConfig::User { .. }) => device_args.push("ip=dhcp".into()),
                    None => {}
                }
                let cmdline = kernel_cmdline(config, flavour, &device_args);
                let initramfs = initramfs
                    .zip(initramfs_path.as_deref())
                    .map(|((file, size), path)| (path, file, size));
                let loaded = boot::load(&ram.memory, mem_size, kernel, initramfs, &cmdline)?;
                phase("kernel and initramfs loaded");
                mptable::setup(&ram.memory, config.vcpus)?;
                regs::write_boot_tables(&ram.memory)?;
                boot_entry = Some(loaded.entry);
                cmdline
            }
        };

        // vCPUs.
        let pvm = kind.needs_pvm_guest();
        let cpuid: Vec<Vec<CpuidEntry>> = match &restore {
            Some(r) => r.state.cpuid.clone(),
            None => {
                let supported = hv.supported_cpuid()?;
                (0..config.vcpus)
                    .map(|id| cpuid::for_vcpu(&supported, id, config.vcpus, pvm))
                    .collect()
            }
        };
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let vcpu = vm.create_vcpu(id)?;
            vcpu.set_cpuid(&cpuid[id as usize])?;
            if let Some(r) = &restore {
                vcpu.restore_state(&r.state.vcpus[id as usize])?;
            } else {
                vcpu.configure_lapic()?;
                if let (0, Some(entry)) = (id, boot_entry) {
                    let sregs = regs::boot_sregs(&vcpu.get_sregs()?);
                    vcpu.set_sregs(&sregs)?;
                    vcpu.set_regs(&regs::boot_regs(entry))?;
                    vcpu.set_fpu(&regs::boot_fpu())?;
                    if let Err(e) = vcpu.set_msrs(&regs::boot_msrs()) {
                        tracing::info!("boot MSRs not set ({e}); the guest runs without them");
                    }
                }
            }
            vcpus.push(vcpu);
        }

        if restore.is_some() {
            // Interrupts raised now reach the restored interrupt controllers.
            for slot in &virtio {
                slot.transport.locked().finish_restore();
            }
        }
        phase("vCPUs configured");
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            exit,
            stop: AtomicBool::new(false),
            start,
            first_entry: OnceLock::new(),
            pvm_host: pvm,
            pause: PauseControl::default(),
        });
        Ok(Vm {
            vcpus,
            vm,
            ram,
            shared,
            disk,
            disk_base,
            cpuid,
            config: config.clone(),
            restored_agent: restore.as_ref().is_some_and(|r| r.state.agent_ready),
            serial,
            panic,
            boot_time,
            reset_evt,
            serial_is_stdout: config.serial == SerialOutput::Stdout,
            virtio,
            backends,
            info: VmInfo {
                vcpus: config.vcpus,
                memory_mib: config.memory_mib,
                vsock: config.vsock.as_ref().map(|v| (v.cid, v.uds_path.clone())),
            },
            resolved: ResolvedBoot {
                kind,
                flavour,
                kernel: kernel_path,
                initramfs: initramfs_path,
                cmdline,
            },
        })
    }

    /// What the VM boots, after defaults.
    pub fn resolved(&self) -> &ResolvedBoot {
        &self.resolved
    }

    /// Runs the guest until it shuts down, crashes, `opts.stop_evt`
    /// becomes readable or the API asks; then stops every vCPU and returns
    /// why.
    pub fn run(self, opts: RunOptions) -> Result<RunOutcome> {
        let RunOptions {
            stop_evt,
            api_socket,
            watch_agent,
            on_started,
        } = opts;
        let Vm {
            mut vcpus,
            vm,
            ram,
            shared,
            disk,
            disk_base,
            cpuid,
            config,
            restored_agent,
            serial,
            panic,
            boot_time,
            reset_evt,
            serial_is_stdout,
            virtio,
            backends,
            info,
            resolved,
        } = self;
        let vsock_path = config.vsock.as_ref().map(|v| v.uds_path.clone());
        let controller = Controller::new(
            vm,
            ram,
            shared.clone(),
            virtio
                .iter()
                .map(|v| (v.id.clone(), v.transport.clone()))
                .collect(),
            disk.zip(disk_base),
            serial.clone(),
            cpuid,
            config,
            resolved.cmdline.clone(),
        );
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        // A restored guest's agent is reseeded before it is reported ready.
        let reseed_done = match (restored_agent, &vsock_path) {
            (true, Some(_)) => {
                Some(EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?)
            }
            _ => None,
        };
        let ready_evt = reseed_done
            .as_ref()
            .map(|e| e.try_clone())
            .transpose()
            .map_err(io_err("clone an eventfd"))?;
        let machine = Arc::new(Mutex::new(Machine::new(
            Some(controller),
            info.clone(),
            shared.exit.clone(),
            watch_agent || api_socket.is_some(),
            ready_evt,
        )?));
        manager.add_subscriber(machine.clone());
        // The socket listens from now on; its thread starts once the vCPUs
        // run (a connection waits in the backlog until then).
        let api_server = match &api_socket {
            Some(path) => Some(ApiServer::bind(path, machine.locked().handle())?),
            None => None,
        };
        // Console input: only from an interactive terminal, so a VMM run by
        // another program never steals that program's standard input.
        let forward_stdin = serial_is_stdout && std::io::IsTerminal::is_terminal(&std::io::stdin());
        let control = Arc::new(Mutex::new(ControlLoop {
            exit: shared.exit.clone(),
            reset_evt: reset_evt.try_clone().map_err(io_err("clone an eventfd"))?,
            stop_evt,
            serial: serial.clone(),
            forward_stdin,
            done: false,
        }));
        manager.add_subscriber(control.clone());
        for slot in virtio {
            manager.add_subscriber(Arc::new(Mutex::new(slot)));
        }
        for backend in backends {
            manager.add_subscriber(backend);
        }

        let mut threads = Vec::with_capacity(vcpus.len());
        for (id, vcpu) in vcpus.drain(..).enumerate() {
            match VcpuThread::spawn(id as u32, vcpu, shared.clone()) {
                Ok(t) => threads.push(t),
                Err(source) => {
                    shared.exit.report(ExitReason::VcpuError {
                        vcpu: id as u32,
                        message: format!("cannot start its thread: {source}"),
                    });
                    break;
                }
            }
        }
        machine
            .locked()
            .set_vcpu_threads(threads.iter().map(VcpuThread::pthread).collect());
        let mut loop_error = None;
        let api = match api_server.map(ApiThread::spawn).transpose() {
            Ok(api) => api,
            Err(e) => {
                shared.exit.report(ExitReason::Stopped { signal: None });
                loop_error = Some(Error::from(e));
                None
            }
        };
        if let Some(f) = on_started {
            f(machine.locked().handle());
        }
        if let (Some(done), Some(uds)) = (reseed_done, vsock_path) {
            reseed_agent(uds, done, shared.exit.clone());
        }

        while loop_error.is_none() && !control.locked().done {
            if let Err(e) = manager.run() {
                loop_error = Some(Error::EventLoop(format!("{e:?}")));
                break;
            }
        }

        if let Some(api) = api {
            api.stop();
        }
        let vmm_overhead_rss_kib = crate::memory::overhead_rss_kib();
        shared.stop.store(true, Ordering::SeqCst);
        shared.pause.wake_for_stop();
        for t in &threads {
            t.kick();
        }
        for t in threads {
            t.join();
        }
        if let Some(e) = loop_error {
            return Err(e);
        }

        let mut reason = shared
            .exit
            .reason()
            .unwrap_or(ExitReason::Stopped { signal: None });
        // A panicking kernel reboots itself (panic=-1): report the panic.
        if let Some(msg) = panic.locked().clone() {
            if reason == ExitReason::GuestShutdown {
                reason = ExitReason::KernelPanic(msg);
            }
        }
        let timings = BootTimings {
            vmm_setup: shared.first_entry.get().copied(),
            boot_to_init: *boot_time.locked(),
        };
        Ok(RunOutcome {
            reason,
            timings,
            vmm_overhead_rss_kib,
        })
    }
}

/// Has the restored guest's agent reseed its random generator with fresh
/// host randomness, on a helper thread, then writes `done`. Connections
/// the guest resets while it handles the vsock transport reset are tried
/// again.
fn reseed_agent(uds: PathBuf, done: EventFd, exit: Arc<ExitSignal>) {
    let spawned = std::thread::Builder::new()
        .name("reseed".into())
        .spawn(move || {
            let agent = crate::agent::AgentClient::new(&uds);
            let mut last = None;
            for _ in 0..20 {
                let mut seed = [0u8; 64];
                // SAFETY: getrandom fills at most `seed.len()` bytes of `seed`.
                let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
                if n != seed.len() as isize {
                    last = Some("the host has no randomness to give".to_string());
                    break;
                }
                match agent.reseed(&seed) {
                    Ok(()) => {
                        let _ = done.write(1);
                        return;
                    }
                    Err(e) => last = Some(e.to_string()),
                }
                if exit.reason().is_some() {
                    return; // the VM is stopping
                }
            }
            tracing::warn!(
                "the restored guest's agent was not reseeded ({}); it stays reported as starting",
                last.unwrap_or_default()
            );
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the reseed thread: {e}");
    }
}

/// The main thread's event loop subscriber: guest reset requests, vCPU
/// exit reports, host stop requests, console input.
struct ControlLoop {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    stop_evt: Option<EventFd>,
    serial: Arc<Mutex<SerialDevice>>,
    forward_stdin: bool,
    done: bool,
}

const STDIN_FD: i32 = 0;

impl MutEventSubscriber for ControlLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32| {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.exit.eventfd().as_raw_fd());
        add(self.reset_evt.as_raw_fd());
        if let Some(stop) = &self.stop_evt {
            add(stop.as_raw_fd());
        }
        if self.forward_stdin {
            add(STDIN_FD);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.exit.report(ExitReason::GuestShutdown);
        } else if self.stop_evt.as_ref().is_some_and(|e| e.as_raw_fd() == fd) {
            if let Some(e) = &self.stop_evt {
                let _ = e.read();
            }
            self.exit.report(ExitReason::Stopped {
                signal: crate::signals::received(),
            });
        } else if fd == STDIN_FD {
            let mut buf = [0u8; 64];
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = ops.remove(events);
                }
                Ok(n) => {
                    self.serial.locked().enqueue_input(&buf[..n]);
                }
            }
        } else if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        }
        if self.exit.reason().is_some() {
            self.done = true;
        }
    }
}

/// Opens the hypervisor for this host.
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(hypervisor::kvm::KvmHypervisor::new()?))
}
