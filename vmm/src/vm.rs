//! Building a VM from its configuration and running it to the end.

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

use crate::api::{ApiServer, VmInfo};
use crate::artifacts::{self, KernelFlavour};
use crate::config::{RootfsConfig, SerialOutput, VmConfig};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestRam;
use crate::vcpu::{VcpuShared, VcpuThread};
use crate::virtio::{VirtioPlacer, VirtioSlot};
use crate::x86_64::{boot, cpuid, layout, mptable, regs};
use devices::virtio::block::{Block, LayeredDisk};
use devices::virtio::vsock::{Vsock, VsockBackend};

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
    #[error("cannot listen on the vsock socket {path}: {source}; check that its folder exists and is writable")]
    VsockSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Virtio(#[from] crate::virtio::Error),
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

/// How to run a built VM.
#[derive(Default)]
pub struct RunOptions {
    /// The VM stops when this becomes readable (see `signals::install`).
    pub stop_evt: Option<EventFd>,
    /// Serve the control API on this Unix socket while the VM runs.
    pub api_socket: Option<PathBuf>,
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

/// A built VM, ready to run.
pub struct Vm {
    // Field order matters for drop: vCPUs before the VM, the VM before its memory.
    vcpus: Vec<Box<dyn Vcpu>>,
    _vm: Box<dyn hypervisor::Vm>,
    _ram: GuestRam,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<SerialDevice>>,
    panic: GuestPanic,
    boot_time: BootTime,
    reset_evt: EventFd,
    serial_is_stdout: bool,
    virtio: Vec<VirtioSlot>,
    backends: Vec<VsockBackend>,
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

fn root_disk(rootfs: &RootfsConfig) -> Result<Block> {
    let base = match &rootfs.base {
        Some(path) => path.clone(),
        None => built(artifacts::default_base_image(), |path| {
            Error::DefaultBaseMissing { path }
        })?,
    };
    let disk = LayeredDisk::open(&base, rootfs.layer.as_deref(), rootfs.read_only)?;
    Ok(Block::new(Arc::new(Mutex::new(disk)), "rootfs"))
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

        let kernel_path = resolve_kernel(config, flavour)?;
        let kernel = boot::KernelImage::open(&kernel_path)?;
        let initramfs_path = resolve_initramfs(config)?;
        let initramfs = match &initramfs_path {
            None => None,
            Some(path) => {
                let (file, size) =
                    boot::open_regular_file(path).map_err(|source| Error::Initramfs {
                        path: path.clone(),
                        source,
                    })?;
                Some((path.as_path(), file, size))
            }
        };
        let initramfs_size = initramfs.as_ref().map_or(0, |(_, _, size)| *size);
        let mem_size = config.memory_mib << 20;
        boot::check_memory(&kernel, initramfs_size, mem_size)?;

        let phase = |what: &str| tracing::debug!("setup: {what} at {:?}", start.elapsed());
        phase("config checked");
        let vm = hv.create_vm()?;
        let ram = GuestRam::new(mem_size)?;
        // Memory before the irqchip: adding a memory slot to a VM that has
        // one costs ~6 ms on some hosts (measured on PVM), before it 0.2 ms.
        ram.register(vm.as_ref())?;
        vm.create_platform_devices()?;
        phase("VM, memory and irqchip created");
        // Populate the memory about to be written in bulk, on two threads.
        ram.populate(&[
            (layout::HIMEM_START, kernel.end - layout::HIMEM_START),
            (
                boot::initramfs_addr(mem_size, initramfs_size),
                initramfs_size,
            ),
        ])?;
        phase("memory populated");

        // Devices.
        let exit = Arc::new(ExitSignal::new().map_err(io_err("create an eventfd"))?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)?;
        let console = ConsoleOutput::new(serial_writer(&config.serial)?);
        let panic = console.panic_handle();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdLine(serial_irq),
            console,
        )));
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

        let mut placer = VirtioPlacer::new(vm.as_ref(), &mmio, &ram.memory);
        let mut virtio = Vec::new();
        if let Some(rootfs) = &config.rootfs {
            virtio.push(placer.add(Box::new(root_disk(rootfs)?))?);
        }
        let mut backends: Vec<VsockBackend> = Vec::new();
        if let Some(v) = &config.vsock {
            let vsock = Vsock::new(v.cid, &v.uds_path).map_err(|source| Error::VsockSocket {
                path: v.uds_path.clone(),
                source,
            })?;
            backends.push(vsock.backend());
            virtio.push(placer.add(Box::new(vsock))?);
        }
        phase("devices created");

        let mut device_args: Vec<String> = virtio.iter().map(|v| v.cmdline.clone()).collect();
        if config.vsock.is_some() {
            // Tells the guest init to serve the agent on vsock.
            device_args.push(format!("VMM_AGENT_PORT={}", vmm_agent::AGENT_PORT));
        }
        let cmdline = kernel_cmdline(config, flavour, &device_args);
        let loaded = boot::load(&ram.memory, mem_size, kernel, initramfs, &cmdline)?;
        phase("kernel and initramfs loaded");
        mptable::setup(&ram.memory, config.vcpus)?;
        regs::write_boot_tables(&ram.memory)?;

        // vCPUs.
        let supported = hv.supported_cpuid()?;
        let pvm = kind.needs_pvm_guest();
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let vcpu = vm.create_vcpu(id)?;
            vcpu.set_cpuid(&cpuid::for_vcpu(&supported, id, config.vcpus, pvm))?;
            vcpu.configure_lapic()?;
            if id == 0 {
                let sregs = regs::boot_sregs(&vcpu.get_sregs()?);
                vcpu.set_sregs(&sregs)?;
                vcpu.set_regs(&regs::boot_regs(loaded.entry))?;
                vcpu.set_fpu(&regs::boot_fpu())?;
                if let Err(e) = vcpu.set_msrs(&regs::boot_msrs()) {
                    tracing::info!("boot MSRs not set ({e}); the guest runs without them");
                }
            }
            vcpus.push(vcpu);
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
        });
        Ok(Vm {
            vcpus,
            _vm: vm,
            _ram: ram,
            shared,
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
    pub fn run(mut self, opts: RunOptions) -> Result<RunOutcome> {
        let RunOptions {
            stop_evt,
            api_socket,
        } = opts;
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        if let Some(path) = &api_socket {
            let server = ApiServer::bind(path, self.info.clone(), self.shared.exit.clone())?;
            manager.add_subscriber(Arc::new(Mutex::new(server)));
        }
        // Console input: only from an interactive terminal, so a VMM run by
        // another program never steals that program's standard input.
        let forward_stdin =
            self.serial_is_stdout && std::io::IsTerminal::is_terminal(&std::io::stdin());
        let control = Arc::new(Mutex::new(ControlLoop {
            exit: self.shared.exit.clone(),
            reset_evt: self
                .reset_evt
                .try_clone()
                .map_err(io_err("clone an eventfd"))?,
            stop_evt,
            serial: self.serial.clone(),
            forward_stdin,
            done: false,
        }));
        manager.add_subscriber(control.clone());
        for slot in self.virtio.drain(..) {
            manager.add_subscriber(Arc::new(Mutex::new(slot)));
        }
        for backend in self.backends.drain(..) {
            manager.add_subscriber(Arc::new(Mutex::new(backend)));
        }

        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            match VcpuThread::spawn(id as u32, vcpu, self.shared.clone()) {
                Ok(t) => threads.push(t),
                Err(source) => {
                    self.shared.exit.report(ExitReason::VcpuError {
                        vcpu: id as u32,
                        message: format!("cannot start its thread: {source}"),
                    });
                    break;
                }
            }
        }

        let mut loop_error = None;
        while !control.lock().unwrap_or_else(|e| e.into_inner()).done {
            if let Err(e) = manager.run() {
                loop_error = Some(Error::EventLoop(format!("{e:?}")));
                break;
            }
        }

        let vmm_overhead_rss_kib = crate::bench::overhead_rss_kib();
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in &threads {
            t.kick();
        }
        for t in threads {
            t.join();
        }
        if let Some(e) = loop_error {
            return Err(e);
        }

        let mut reason = self
            .shared
            .exit
            .reason()
            .unwrap_or(ExitReason::Stopped { signal: None });
        // A panicking kernel reboots itself (panic=-1): report the panic.
        if let Some(msg) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            if reason == ExitReason::GuestShutdown {
                reason = ExitReason::KernelPanic(msg);
            }
        }
        let timings = BootTimings {
            vmm_setup: self.shared.first_entry.get().copied(),
            boot_to_init: *self.boot_time.lock().unwrap_or_else(|e| e.into_inner()),
        };
        Ok(RunOutcome {
            reason,
            timings,
            vmm_overhead_rss_kib,
        })
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
                    self.serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(&buf[..n]);
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
