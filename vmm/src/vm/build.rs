//! Building a [`Vm`] by one of two paths that share the platform, device
//! and vCPU creation: [`boot`] from a configuration (kernel, initramfs,
//! fresh devices, vCPUs at the kernel's entry) and [`restore`] from a saved
//! machine (its memory copy-on-write, devices where the saved machine had
//! them with their saved state, vCPUs in their saved state).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::legacy::serial::SerialSnapshot;
use devices::legacy::{boot_timer::BootTime, BootTimer, ConsoleOutput, GuestPanic, SerialDevice};
use devices::sync::Locked;
use devices::virtio::block::{Block, LayeredDisk, SharedDisk};
use devices::virtio::net::tap::Tap;
use devices::virtio::net::user::policy::SharedPolicy;
use devices::virtio::net::user::{self, UserNet, UserNetConfig};
use devices::virtio::net::{Net, NetBackend};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::{Bus, EventFdLine};
use hypervisor::{Hypervisor, HypervisorKind, Vcpu};
use vmm_os::EventFd;

use super::{io_err, kernel_cmdline, Backend, Error, Prepared, ResolvedBoot, Result, Vm};
use crate::arch::{self, boot, layout, load, MachineShape, VcpuIdentity};
use crate::artifacts::{self, KernelFlavour};
use crate::config::{NetworkConfig, RootfsConfig, SerialOutput, VmConfig};
use crate::exit::ExitSignal;
use crate::machine::VmInfo;
use crate::memory::GuestRam;
use crate::snapshot::RestoreSource;
use crate::vcpu::{PauseControl, VcpuShared};
use crate::virtio::{order_as_saved, DeviceId, VirtioPlacer, VirtioSlot};

/// What both paths check first.
struct Checked {
    kind: HypervisorKind,
    flavour: KernelFlavour,
    mem_size: u64,
}

fn check(config: &VmConfig, hv: &dyn Hypervisor) -> Result<Checked> {
    config.validate()?;
    let kind = hv.kind();
    let max_vcpus = hv.max_vcpus().min(arch::max_vcpus());
    if config.vcpus > max_vcpus {
        return Err(Error::TooManyVcpus {
            asked: config.vcpus,
            max: max_vcpus,
        });
    }
    Ok(Checked {
        kind,
        flavour: KernelFlavour::resolve(config.flavour, kind),
        mem_size: config.memory_mib << 20,
    })
}

fn phase(start: Instant, what: &str) {
    tracing::debug!("setup: {what} at {:?}", start.elapsed());
}

/// The VM with its memory and in-kernel interrupt controllers.
fn create_vm(hv: &dyn Hypervisor, ram: GuestRam) -> Result<(Box<dyn hypervisor::Vm>, GuestRam)> {
    let vm = hv.create_vm()?;
    // Memory before the irqchip: adding a memory slot to a VM that has one
    // costs ~6 ms on some hosts (measured on PVM), before it 0.2 ms.
    ram.register(vm.as_ref())?;
    vm.create_platform_devices()?;
    Ok((vm, ram))
}

/// The buses and the legacy devices on them.
struct Platform {
    exit: Arc<ExitSignal>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    panic: GuestPanic,
    reset_evt: EventFd,
    boot_time: BootTime,
}

fn platform(
    config: &VmConfig,
    vm: &dyn hypervisor::Vm,
    start: Instant,
    saved_serial: Option<&SerialSnapshot>,
) -> Result<Platform> {
    let exit = Arc::new(ExitSignal::new().map_err(io_err("create an eventfd"))?);
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial_irq = EventFd::new(vmm_os::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)?;
    let console = ConsoleOutput::new(serial_writer(&config.serial)?);
    let panic = console.panic_handle();
    let serial = match saved_serial {
        None => SerialDevice::new(EventFdLine(serial_irq), console),
        Some(saved) => SerialDevice::restored(EventFdLine(serial_irq), console, saved)
            .map_err(Error::RestoreSerial)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset_evt = EventFd::new(vmm_os::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
    arch::place_legacy_devices(
        &pio,
        &mmio,
        serial.clone(),
        reset_evt.try_clone().map_err(io_err("clone an eventfd"))?,
    )?;
    let timer = BootTimer::new(start);
    let boot_time = timer.handle();
    mmio.insert(
        Arc::new(Mutex::new(timer)),
        layout::BOOT_TIMER_START,
        BootTimer::LEN,
    )?;
    Ok(Platform {
        exit,
        pio,
        mmio,
        serial,
        panic,
        reset_evt,
        boot_time,
    })
}

/// The virtio devices, on the bus.
struct Devices {
    virtio: Vec<VirtioSlot>,
    backends: Vec<Backend>,
    disk: Option<SharedDisk>,
    disk_base: Option<PathBuf>,
    /// What a restored guest's network interface is to change to.
    new_interface: crate::agent::NewInterface,
    /// The user-mode network's egress policy, to change while it runs.
    egress: Option<SharedPolicy>,
}

/// Creates the configuration's virtio devices and puts them on the bus: in
/// the configuration's order, or (restoring) where the saved machine had
/// them, each transport given its saved state.
fn devices(
    config: &VmConfig,
    vm: &dyn hypervisor::Vm,
    mmio: &Bus,
    ram: &GuestRam,
    mut restore: Option<&mut RestoreSource>,
) -> Result<Devices> {
    raise_fd_limit();
    let mut devices: Vec<(DeviceId, Box<dyn VirtioDevice>)> = Vec::new();
    let mut disk = None;
    let mut disk_base = None;
    if let Some(rootfs) = &config.rootfs {
        let base = match restore.as_ref().and_then(|r| r.state.disk_base.clone()) {
            Some(path) => path,
            None => resolve_base(rootfs)?,
        };
        let shared_disk = root_disk(rootfs, &base, restore.as_deref_mut())?;
        devices.push((
            DeviceId::RootDisk,
            Box::new(
                Block::new(shared_disk.clone(), "rootfs")
                    .with_rate_limit(&rootfs.rate_limit.unwrap_or_default()),
            ),
        ));
        disk = Some(shared_disk);
        disk_base = Some(base);
    }
    let mut backends: Vec<Backend> = Vec::new();
    let mut new_interface = crate::agent::NewInterface::default();
    let mut egress = None;
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(v.cid, &v.uds_path).map_err(|source| Error::VsockSocket {
            path: v.uds_path.clone(),
            source,
        })?;
        backends.push(Arc::new(Mutex::new(vsock.backend())));
        devices.push((DeviceId::Vsock, Box::new(vsock)));
    }
    if let Some(network) = &config.network {
        let saved = restore.as_ref().map(|r| r.saved_network.as_ref());
        let (mac, new) = guest_mac(network, saved)?;
        let (net, policy) = network_device(network, mac, restore.is_some())?;
        let address = new_address(network, saved);
        new_interface = crate::agent::NewInterface {
            mac: new.then_some(mac),
            // The new link's MTU goes with its address.
            mtu: address.as_ref().and(net.mtu()),
            address,
        };
        egress = policy;
        backends.push(Arc::new(Mutex::new(net.handle())));
        devices.push((DeviceId::Network, Box::new(net)));
    }
    for share in &config.shares {
        devices.push((DeviceId::Share(share.tag.clone()), share_device(share)?));
    }
    if let Some(r) = &restore {
        let saved: Vec<DeviceId> = r.state.virtio.iter().map(|d| d.id.clone()).collect();
        devices = order_as_saved(devices, &saved)?;
    }
    let mut placer = VirtioPlacer::new(vm, mmio, &ram.memory);
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
    Ok(Devices {
        virtio,
        backends,
        disk,
        disk_base,
        new_interface,
        egress,
    })
}

/// What the two paths hand over to make the [`Vm`].
struct Parts {
    checked: Checked,
    vm: Box<dyn hypervisor::Vm>,
    ram: GuestRam,
    platform: Platform,
    devices: Devices,
    vcpus: Vec<Box<dyn Vcpu>>,
    identities: Vec<VcpuIdentity>,
    restored_agent: bool,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
}

fn finish(config: &VmConfig, start: Instant, p: Parts) -> Vm {
    let shared = Arc::new(VcpuShared {
        pio: p.platform.pio,
        mmio: p.platform.mmio,
        exit: p.platform.exit,
        stop: AtomicBool::new(false),
        start,
        first_entry: OnceLock::new(),
        pvm_host: p.checked.kind.needs_pvm_guest(),
        pause: PauseControl::default(),
        seccomp: config.seccomp,
    });
    Vm {
        vcpus: p.vcpus,
        vm: p.vm,
        ram: p.ram,
        shared,
        disk: p.devices.disk,
        disk_base: p.devices.disk_base,
        identities: p.identities,
        config: config.clone(),
        restored_agent: p.restored_agent,
        new_interface: p.devices.new_interface,
        egress: p.devices.egress,
        serial: p.platform.serial,
        panic: p.platform.panic,
        boot_time: p.platform.boot_time,
        reset_evt: p.platform.reset_evt,
        serial_is_stdout: config.serial == SerialOutput::Stdout,
        virtio: p.devices.virtio,
        backends: p.devices.backends,
        info: VmInfo {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            vsock: config.vsock.as_ref().map(|v| (v.cid, v.uds_path.clone())),
        },
        resolved: ResolvedBoot {
            kind: p.checked.kind,
            flavour: p.checked.flavour,
            kernel: p.kernel,
            initramfs: p.initramfs,
            cmdline: p.cmdline,
        },
    }
}

/// Boots `config`: memory, kernel and initramfs, fresh devices, vCPU 0 at
/// the kernel's entry.
pub(super) fn boot(config: &VmConfig, hv: &dyn Hypervisor, start: Instant) -> Result<Vm> {
    let checked = check(config, hv)?;
    let mem_size = checked.mem_size;
    let kernel_path = resolve_kernel(config, checked.flavour)?;
    let kernel = boot::KernelImage::open(&kernel_path)?;
    let initramfs_path = resolve_initramfs(config)?;
    let initramfs = match &initramfs_path {
        None => None,
        Some(path) => Some(
            load::open_regular_file(path).map_err(|source| Error::Initramfs {
                path: path.clone(),
                source,
            })?,
        ),
    };
    // An image's exec defaults reach the agent as a second archive after
    // the initramfs (the kernel unpacks both).
    let defaults = match (
        &initramfs,
        config.rootfs.as_ref().and_then(|r| r.image.as_deref()),
    ) {
        (Some(_), Some(image)) => image_defaults_archive(image)?,
        _ => Vec::new(),
    };
    let initramfs_size = initramfs
        .as_ref()
        .map_or(0, |(_, size)| load::with_extra(*size, defaults.len()));
    boot::check_memory(&kernel, initramfs_size, mem_size)?;
    phase(start, "config checked");

    let (vm, ram) = create_vm(hv, GuestRam::new(mem_size)?)?;
    phase(start, "VM, memory and irqchip created");
    // Populate the memory about to be written in bulk, on two threads.
    ram.populate(&boot::bulk_ranges(&kernel, mem_size, initramfs_size))?;
    phase(start, "memory populated");
    let pvm = checked.kind.needs_pvm_guest();
    let (vcpus, identities) = arch::create_vcpus(hv, vm.as_ref(), config.vcpus, pvm)?;
    phase(start, "vCPUs created");

    let platform = platform(config, vm.as_ref(), start, None)?;
    let devices = devices(config, vm.as_ref(), &platform.mmio, &ram, None)?;
    phase(start, "devices created");

    let shape = MachineShape {
        vcpus: config.vcpus,
        mem_size,
        virtio: devices.virtio.iter().map(|v| (v.base, v.irq)).collect(),
    };
    let mut device_args = arch::device_args(&shape.virtio);
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
    let cmdline = kernel_cmdline(config, checked.flavour, &device_args);
    let initramfs = initramfs
        .zip(initramfs_path.as_deref())
        .map(|((file, size), path)| load::Initramfs {
            path,
            file,
            size,
            extra: &defaults,
        });
    let loaded = boot::load(&ram.memory, mem_size, kernel, initramfs, &cmdline)?;
    phase(start, "kernel and initramfs loaded");
    arch::setup_boot(&ram.memory, &vcpus, &loaded, &shape)?;
    phase(start, "boot state written");
    Ok(finish(
        config,
        start,
        Parts {
            checked,
            vm,
            ram,
            platform,
            devices,
            vcpus,
            identities,
            restored_agent: false,
            kernel: kernel_path,
            initramfs: initramfs_path,
            cmdline,
        },
    ))
}

/// Continues the saved machine `source` (from a snapshot or a forking
/// parent), in the VM `prepared` for it when that fits.
pub(super) fn restore(
    mut source: RestoreSource,
    hv: &dyn Hypervisor,
    start: Instant,
    prepared: Option<Prepared>,
) -> Result<Vm> {
    let config = source.state.config.clone();
    let checked = check(&config, hv)?;
    let mem_size = checked.mem_size;
    let s = &source.state;
    if s.vcpus.len() != config.vcpus as usize
        || s.vcpu_identity.len() != s.vcpus.len()
        || s.memory_size != mem_size
        || source.memory.size != mem_size
    {
        return Err(Error::RestoreMismatch(format!(
            "{} vCPUs and {} bytes of memory saved, the config has {} and {}",
            s.vcpus.len(),
            s.memory_size,
            config.vcpus,
            mem_size
        )));
    }
    phase(start, "config checked");

    let (vm, ram) = match prepared {
        Some(mut p) if p.fits(&source.memory) => {
            p.ram.add_overlays(&source.memory.overlays)?;
            (p.vm, p.ram)
        }
        _ => create_vm(hv, GuestRam::from_image(&source.memory)?)?,
    };
    let state = &source.state;
    let vcpus = arch::restore_vcpus(vm.as_ref(), &state.vcpu_identity, &state.vcpus, &state.vm)?;
    phase(start, "VM, memory, irqchip and vCPUs restored");

    let platform = platform(&config, vm.as_ref(), start, Some(&source.state.serial))?;
    let devices = devices(
        &config,
        vm.as_ref(),
        &platform.mmio,
        &ram,
        Some(&mut source),
    )?;
    // Interrupts raised now reach the restored interrupt controllers.
    for slot in &devices.virtio {
        slot.transport.locked().finish_restore();
    }
    phase(start, "devices created");
    let state = &source.state;
    // A restored machine booted long ago: no kernel or initramfs of its own.
    let (kernel, initramfs) = (PathBuf::new(), None);
    Ok(finish(
        &config,
        start,
        Parts {
            checked,
            vm,
            ram,
            platform,
            devices,
            vcpus,
            identities: state.vcpu_identity.clone(),
            restored_agent: state.agent_ready,
            kernel,
            initramfs,
            cmdline: state.cmdline.clone(),
        },
    ))
}

/// A booted guest's MAC address unless the config names one (locally
/// administered, unicast).
const DEFAULT_MAC: [u8; 6] = [0x02, 0x56, 0x4d, 0x4d, 0x00, 0x01];

/// The guest's MAC address, and whether a restored guest's interface is
/// to move to it (`saved`: the restored machine's network, `None` when
/// booting): the config's when it names one (new when the saved machine's
/// differs); else [`DEFAULT_MAC`] for a booted guest and a random one for
/// a restored or forked guest, so no two copies of a VM share an address.
fn guest_mac(
    network: &NetworkConfig,
    saved: Option<Option<&NetworkConfig>>,
) -> Result<([u8; 6], bool)> {
    if let Some(m) = network.mac() {
        let new = saved.is_some_and(|s| s.and_then(NetworkConfig::mac) != Some(m));
        return Ok((crate::config::parse_mac(m)?, new));
    }
    if saved.is_none() {
        return Ok((DEFAULT_MAC, false));
    }
    let mut mac = [0u8; 6];
    vmm_os::fill_random(&mut mac).map_err(io_err(
        "draw a MAC address from the host's random generator",
    ))?;
    // Unicast, locally administered.
    mac[0] = (mac[0] & !0x01) | 0x02;
    Ok((mac, true))
}

/// A restored guest's new IPv4 address and gateway: a TAP network's, when
/// they are not the saved machine's (a template started on another link).
fn new_address(
    network: &NetworkConfig,
    saved: Option<Option<&NetworkConfig>>,
) -> Option<(String, Option<String>)> {
    let addressed = |n: &NetworkConfig| match n {
        NetworkConfig::Tap {
            address, gateway, ..
        } => Some((address.clone(), gateway.clone())),
        NetworkConfig::User { .. } => None,
    };
    let now = addressed(network)?;
    let before = saved?.and_then(addressed);
    (before.as_ref() != Some(&now)).then_some(now)
}

/// The virtio-fs device of `share`.
fn share_device(share: &crate::config::ShareConfig) -> Result<Box<dyn VirtioDevice>> {
    let fs = devices::virtio::fs::PassthroughFs::new(&share.host_path, share.read_only).map_err(
        |source| Error::Share {
            tag: share.tag.clone(),
            source,
        },
    )?;
    Ok(Box::new(devices::virtio::fs::Fs::new(&share.tag, fs)))
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
/// warning (the original VM may still hold them). Also the user-mode
/// network's egress policy, which may change while the VM runs.
fn network_device(
    network: &NetworkConfig,
    mac: [u8; 6],
    restored: bool,
) -> Result<(Net, Option<SharedPolicy>)> {
    let mut policy = None;
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
            let user = UserNet::new(UserNetConfig {
                guest_mac: mac,
                policy: egress.policy()?,
                dns,
                port_forwards: forwards,
            })?;
            policy = Some(user.policy());
            Box::new(user)
        }
    };
    let net = Net::new(mac, backend);
    let net = match network.rate_limit() {
        Some(limit) => net
            .with_rate_limit(&limit.rx, &limit.tx)
            .map_err(io_err("make the network's rate-limit timer"))?,
        None => net,
    };
    Ok((net, policy))
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

/// The host files a boot of `config` reads, defaults resolved: the kernel
/// and initramfs, and the root disk's base image.
pub(super) fn boot_files(
    config: &VmConfig,
    hv: &dyn Hypervisor,
) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let checked = check(config, hv)?;
    let mut files = vec![resolve_kernel(config, checked.flavour)?];
    files.extend(resolve_initramfs(config)?);
    if let Some(image) = config.rootfs.as_ref().and_then(|r| r.image.as_deref()) {
        files.extend(crate::image::boot_files(image)?);
    }
    let base = config.rootfs.as_ref().map(resolve_base).transpose()?;
    Ok((files, base))
}

/// The base image a restore of `source` opens (as `devices` does).
pub(super) fn restore_base(source: &RestoreSource) -> Result<Option<PathBuf>> {
    let Some(rootfs) = &source.state.config.rootfs else {
        return Ok(None);
    };
    match &source.state.disk_base {
        Some(path) => Ok(Some(path.clone())),
        None => resolve_base(rootfs).map(Some),
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
    if let Some(name) = &rootfs.image {
        let image = crate::image::open(name)?;
        image.mark_used();
        return Ok(image.disk());
    }
    match &rootfs.base {
        Some(path) => Ok(path.clone()),
        None => built(artifacts::default_base_image(), |path| {
            Error::DefaultBaseMissing { path }
        }),
    }
}

/// A newc cpio archive holding image `name`'s exec defaults at
/// `vmm_agent::IMAGE_DEFAULTS_PATH`.
fn image_defaults_archive(name: &str) -> Result<Vec<u8>> {
    let image = crate::image::open(name)?;
    let json = serde_json::to_vec(&image.record.defaults).unwrap_or_default();
    let path = vmm_agent::IMAGE_DEFAULTS_PATH.trim_start_matches('/');
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    let entries = [
        (
            cpio::NewcBuilder::new(dir).mode(0o040_755).nlink(2).ino(1),
            Vec::new(),
        ),
        (
            cpio::NewcBuilder::new(path).mode(0o100_444).nlink(1).ino(2),
            json,
        ),
    ];
    let archive = cpio::write_cpio(
        entries
            .into_iter()
            .map(|(b, data)| (b, std::io::Cursor::new(data))),
        Vec::new(),
    );
    archive.map_err(|e| Error::Initramfs {
        path: PathBuf::from(vmm_agent::IMAGE_DEFAULTS_PATH),
        source: e,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn network(json: &str) -> NetworkConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn copies_of_a_vm_get_their_own_mac_unless_the_config_names_one() {
        let unnamed = network(r#"{"mode": "user"}"#);
        assert_eq!(guest_mac(&unnamed, None).unwrap(), (DEFAULT_MAC, false));
        let (a, new_a) = guest_mac(&unnamed, Some(Some(&unnamed))).unwrap();
        let (b, new_b) = guest_mac(&unnamed, Some(Some(&unnamed))).unwrap();
        assert!(new_a && new_b);
        assert_ne!(a, b);
        for mac in [a, b] {
            assert_eq!(mac[0] & 0x03, 0x02, "unicast, locally administered");
            assert_eq!(
                crate::config::parse_mac(&vmm_agent::format_mac(&mac)).unwrap(),
                mac
            );
        }
        let named = network(r#"{"mode": "user", "mac": "02:00:00:00:00:07"}"#);
        for saved in [None, Some(Some(&named))] {
            assert_eq!(
                guest_mac(&named, saved).unwrap(),
                ([2, 0, 0, 0, 0, 7], false)
            );
        }
        // A restore naming another MAC than the saved machine's moves the
        // guest's interface to it.
        for saved in [Some(Some(&unnamed)), Some(None)] {
            assert_eq!(
                guest_mac(&named, saved).unwrap(),
                ([2, 0, 0, 0, 0, 7], true)
            );
        }
    }

    #[test]
    fn a_restore_on_another_tap_link_readdresses_the_guest() {
        let tap = |address: &str, gateway: &str| {
            network(&format!(
                r#"{{"mode": "tap", "tap": "t0", "address": "{address}", "gateway": "{gateway}"}}"#
            ))
        };
        let template = tap("10.255.255.2/24", "10.255.255.1");
        let pod = tap("10.88.0.5/16", "10.88.0.1");
        let wanted = Some(("10.88.0.5/16".to_string(), Some("10.88.0.1".to_string())));
        assert_eq!(new_address(&pod, Some(Some(&template))), wanted);
        assert_eq!(new_address(&pod, Some(Some(&pod))), None, "unchanged");
        assert_eq!(
            new_address(&pod, None),
            None,
            "a booted guest has it from its command line"
        );
        let user = network(r#"{"mode": "user"}"#);
        assert_eq!(new_address(&user, Some(Some(&user))), None, "DHCP gives it");
    }
}
