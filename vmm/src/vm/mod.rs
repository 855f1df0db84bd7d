//! A VM: built from its configuration or a saved machine (`build`), then
//! run to the end.

mod build;

use devices::sync::Locked;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{boot_timer::BootTime, GuestPanic, SerialDevice};
use hypervisor::{Hypervisor, HypervisorKind, Vcpu};
use vmm_os::event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps,
};
use vmm_os::EventFd;

use crate::api::{ApiServer, ApiThread};
use crate::arch::{self, boot, layout, VcpuIdentity};
use crate::artifacts::KernelFlavour;
use crate::config::VmConfig;
use crate::control::Controller;
use crate::exit::{ExitReason, ExitSignal};
use crate::machine::{Machine, MachineHandle, VmInfo};
use crate::memory::{GuestRam, MemoryImage};
use crate::snapshot::RestoreSource;
use crate::vcpu::{VcpuShared, VcpuThread};
use crate::virtio::{DeviceId, VirtioSlot};
use devices::virtio::block::SharedDisk;

/// An event-loop subscriber for a device's host side.
type Backend = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Image(#[from] crate::image::Error),
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
    Arch(#[from] arch::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::bus::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
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
    identities: Vec<VcpuIdentity>,
    config: VmConfig,
    /// Restored from a machine whose agent was up: reseed it, then report
    /// it ready.
    restored_agent: bool,
    /// What a restored guest's network interface changes to.
    new_interface: crate::agent::NewInterface,
    /// The user-mode network's egress policy, to change while it runs.
    egress: Option<devices::virtio::net::user::policy::SharedPolicy>,
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
    let mut parts: Vec<String> = arch::KERNEL_ARGS.iter().map(|a| a.to_string()).collect();
    parts.extend([
        "panic=-1".into(),
        "quiet".into(),
        format!("VMM_BOOT_TIMER={:#x}", layout::BOOT_TIMER_START),
    ]);
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

impl Vm {
    /// Builds a VM: memory, kernel, devices and vCPUs, all ready to run.
    /// `start` is when the VMM started (the boot timings count from it).
    pub fn build(config: &VmConfig, hv: &dyn Hypervisor, start: Instant) -> Result<Vm> {
        build::boot(config, hv, start)
    }

    /// The host files [`Vm::build`] reads for `config`, defaults
    /// resolved: the kernel and initramfs, and the root disk's base image.
    pub fn boot_files(
        config: &VmConfig,
        hv: &dyn Hypervisor,
    ) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
        build::boot_files(config, hv)
    }

    /// The base image [`Vm::restore`] opens for `source`'s root disk.
    pub fn restore_base(source: &RestoreSource) -> Result<Option<PathBuf>> {
        build::restore_base(source)
    }

    /// Builds a VM that continues a saved machine (from a snapshot or a
    /// fork): its memory mapped copy-on-write, its devices and vCPUs in
    /// their saved state.
    pub fn restore(source: RestoreSource, hv: &dyn Hypervisor, start: Instant) -> Result<Vm> {
        build::restore(source, hv, start, None)
    }

    /// `restore` into a VM prepared for this memory size.
    pub fn restore_prepared(
        source: RestoreSource,
        hv: &dyn Hypervisor,
        start: Instant,
        prepared: Prepared,
    ) -> Result<Vm> {
        build::restore(source, hv, start, Some(prepared))
    }

    /// What the VM boots, after defaults.
    pub fn resolved(&self) -> &ResolvedBoot {
        &self.resolved
    }

    /// Runs the guest until it shuts down, crashes, `opts.stop_evt`
    /// becomes readable or the API asks; then stops every vCPU and returns
    /// why.
    ///
    /// The calling thread becomes the VM's device loop: with `seccomp` on
    /// (the default) it ends under the device loop's filter, for good. An
    /// embedding program calls this on a thread it gives to the VM, as
    /// the Rust API's `Sandbox` does.
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
            identities,
            config,
            restored_agent,
            new_interface,
            egress,
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
        let seccomp = config.seccomp;
        if seccomp {
            // Before any thread narrows: fork children start from it.
            crate::spawner::start()?;
        }
        let mut controller = Controller::new(
            vm,
            ram,
            shared.clone(),
            virtio
                .iter()
                .map(|v| (v.id.clone(), v.transport.clone()))
                .collect(),
            disk.zip(disk_base),
            serial.clone(),
            identities,
            config,
            resolved.cmdline.clone(),
        );
        controller.egress = egress;
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        // A restored guest's agent is reseeded before it is reported ready.
        let reseed_done = match (restored_agent, &vsock_path) {
            (true, Some(_)) => {
                Some(EventFd::new(vmm_os::EFD_NONBLOCK).map_err(io_err("create an eventfd"))?)
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
        let api = match api_server
            .map(|server| ApiThread::spawn(server, seccomp))
            .transpose()
        {
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
            reseed_agent(uds, done, new_interface, shared.exit.clone(), seccomp);
        }
        // From here this thread only runs the device loop.
        if seccomp && loop_error.is_none() {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::DeviceLoop) {
                shared.exit.report(ExitReason::Stopped { signal: None });
                loop_error = Some(Error::from(e));
            }
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
/// host randomness, step its wall clock to the host's and move its network
/// interface to `interface`, on a helper thread, then writes `done`. Connections
/// the guest resets while it handles the vsock transport reset are tried
/// again. An agent older than the clock step (a snapshot of an older
/// build) is reseeded without it.
fn reseed_agent(
    uds: PathBuf,
    done: EventFd,
    interface: crate::agent::NewInterface,
    exit: Arc<ExitSignal>,
    seccomp: bool,
) {
    let spawned = std::thread::Builder::new()
        .name("reseed".into())
        .spawn(move || {
            if seccomp {
                if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Reseed) {
                    tracing::warn!("the restored guest's agent was not reseeded: {e}");
                    return;
                }
            }
            let agent = crate::agent::AgentClient::new(&uds);
            let mut last = None;
            for _ in 0..20 {
                let mut seed = [0u8; 64];
                if let Err(e) = vmm_os::fill_random(&mut seed) {
                    last = Some(format!("the host has no randomness to give: {e}"));
                    break;
                }
                let now = Some(std::time::SystemTime::now());
                let mut answer = agent.reseed(&seed, now, &interface);
                if matches!(&answer, Err(crate::agent::Error::Agent(m)) if m.contains("unknown field")) {
                    tracing::warn!("the restored guest's agent cannot set its clock or addresses (an older agent): its wall clock lags by the time the VM was saved, and it keeps the saved VM's MAC and IP addresses");
                    answer = agent.reseed(&seed, None, &Default::default());
                }
                match answer {
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

/// Opens the hypervisor for this host: KVM on Linux, Hypervisor.framework
/// on macOS.
pub fn open_hypervisor() -> Result<Box<dyn Hypervisor>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(hypervisor::kvm::KvmHypervisor::new()?))
    }
    #[cfg(all(target_os = "macos", target_arch = "aarch64"))]
    {
        Ok(Box::new(hypervisor::hvf::backend::HvfHypervisor::new()?))
    }
}
