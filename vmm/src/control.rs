//! Pause, resume, snapshot and fork of a running VM. The control API calls
//! these on the VMM's event-loop thread, so no device is processing guest
//! memory while they run; pausing stops the vCPU threads.

use devices::sync::Locked;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::SerialDevice;
use devices::virtio::block::SharedDisk;
use devices::virtio::mmio::MmioTransport;
use hypervisor::VcpuState;

use crate::arch::VcpuIdentity;
use crate::config::VmConfig;
use crate::fork;
use crate::fork::ForkRequest;
use crate::memory::GuestRam;
use crate::snapshot::{self, MachineState, SavedDevice};
use crate::vcpu::VcpuShared;
use crate::virtio::DeviceId;

/// How long the vCPUs get to stop when pausing.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot pause the VM: {0}")]
    Pause(String),
    #[error("cannot save the VM state: {0}")]
    Save(#[from] hypervisor::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
    #[error("cannot copy the root disk's layer: {0}")]
    Disk(#[from] devices::virtio::block::disk::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    Fork(#[from] fork::Error),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error("this VM's network is a TAP interface, which belongs to one VM: a fork needs \"network\": {{\"mode\": \"user\"}} (a snapshot of it restores onto a TAP the restoring config names)")]
    TapNetwork,
    #[error("this VM has no user-mode network (\"network\": {{\"mode\": \"user\"}}), so it has no egress policy to change")]
    NoUserNetwork,
    #[error("bad egress policy: {0}")]
    BadEgress(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The parts of a running VM the control operations need.
pub struct Controller {
    pub(crate) vm: Box<dyn hypervisor::Vm>,
    pub(crate) ram: GuestRam,
    pub(crate) shared: Arc<VcpuShared>,
    /// The vCPU threads, to kick them out of guest mode.
    pub(crate) threads: Vec<libc::pthread_t>,
    pub(crate) transports: Vec<(DeviceId, Arc<Mutex<MmioTransport>>)>,
    pub(crate) disk: Option<SharedDisk>,
    pub(crate) disk_base: Option<PathBuf>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) identities: Vec<VcpuIdentity>,
    pub(crate) config: VmConfig,
    pub(crate) cmdline: String,
    /// The user-mode network's egress policy (none without one).
    pub(crate) egress: Option<devices::virtio::net::user::policy::SharedPolicy>,
    fork_seq: u64,
    /// A child process started ahead of the next fork (see `fork::Spare`).
    spares: Vec<fork::Spare>,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: Box<dyn hypervisor::Vm>,
        ram: GuestRam,
        shared: Arc<VcpuShared>,
        transports: Vec<(DeviceId, Arc<Mutex<MmioTransport>>)>,
        disk: Option<(SharedDisk, PathBuf)>,
        serial: Arc<Mutex<SerialDevice>>,
        identities: Vec<VcpuIdentity>,
        config: VmConfig,
        cmdline: String,
    ) -> Self {
        let (disk, disk_base) = match disk {
            Some((d, b)) => (Some(d), Some(b)),
            None => (None, None),
        };
        Controller {
            vm,
            ram,
            shared,
            threads: Vec::new(),
            transports,
            disk,
            disk_base,
            serial,
            identities,
            config,
            cmdline,
            egress: None,
            fork_seq: 0,
            spares: Vec::new(),
        }
    }

    /// Replaces the user-mode network's egress policy: for connections
    /// that start from now on, and for the snapshots and fork children
    /// taken from now on.
    pub fn set_egress(&mut self, egress: crate::config::EgressConfig) -> Result<()> {
        let (Some(shared), Some(crate::config::NetworkConfig::User { egress: kept, .. })) =
            (&self.egress, self.config.network.as_mut())
        else {
            return Err(Error::NoUserNetwork);
        };
        let policy = egress
            .policy()
            .map_err(|e| Error::BadEgress(e.to_string()))?;
        shared.set(policy);
        *kept = egress;
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary; returns their saved
    /// states. The caller (the `Machine`) records that the VM is paused.
    pub fn pause(&mut self) -> Result<Vec<VcpuState>> {
        let pause = &self.shared.pause;
        pause.request();
        for &t in &self.threads {
            // The vCPU threads are joined only after the event loop (which
            // owns this controller) has ended, so `t` names a live thread.
            let _ = vmm_os::process::signal_thread(t, crate::vcpu::kick_signal());
        }
        pause
            .wait_parked(self.threads.len(), PAUSE_TIMEOUT)
            .map_err(|e| {
                pause.resume();
                Error::Pause(e)
            })
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&mut self) {
        self.shared.pause.resume();
    }

    /// The machine's state, with the paused vCPUs' saved `vcpus`.
    fn machine_state(&self, vcpus: &[VcpuState], agent_ready: bool) -> Result<MachineState> {
        Ok(MachineState {
            config: self.config.clone(),
            disk_base: self.disk_base.clone(),
            cmdline: self.cmdline.clone(),
            memory_size: self.ram.size,
            vm: self.vm.save_state()?,
            vcpus: vcpus.to_vec(),
            vcpu_identity: self.identities.clone(),
            serial: self.serial.locked().save(),
            virtio: self
                .transports
                .iter()
                .map(|(id, t)| SavedDevice {
                    id: id.clone(),
                    transport: t.locked().save(),
                })
                .collect(),
            agent_ready,
        })
    }

    /// Refuses a fork of a VM on a TAP network: its children would share
    /// the interface. (A snapshot is restored onto the TAP its restoring
    /// config names, and a TAP takes one VM at a time.)
    pub fn check_forkable(&self) -> Result<()> {
        match self.config.network {
            Some(crate::config::NetworkConfig::Tap { .. }) => Err(Error::TapNetwork),
            _ => Ok(()),
        }
    }

    /// Writes a snapshot of the paused VM (its vCPUs saved as `vcpus`)
    /// into `writer`'s directory (docs/snapshot.md), authenticated with
    /// `key` when given. Returns the guest memory bytes written.
    pub fn snapshot(
        &mut self,
        vcpus: &[VcpuState],
        writer: snapshot::Writer,
        agent_ready: bool,
        key: Option<&[u8]>,
    ) -> Result<u64> {
        let state = self.machine_state(vcpus, agent_ready)?;
        let memory = writer.file(snapshot::MEMORY_FILE)?;
        let written = self.ram.write_to(&memory)?;
        if let Some(disk) = &self.disk {
            disk.locked()
                .frozen_copy(writer.dir(), Some(snapshot::DISK_LAYER_FILE))?;
        }
        writer.commit(&state, key)?;
        Ok(written)
    }

    /// Starts a spare child for the next fork when there is none (call it
    /// after answering a fork: a VM forked once is likely forked again).
    pub fn prepare_spare(&mut self) {
        if self.spares.is_empty() {
            match fork::Spare::spawn(self.ram.size, &self.ram.file) {
                Ok(spare) => self.spares.push(spare),
                Err(e) => tracing::warn!("no spare fork child: {e}"),
            }
        }
    }

    /// What fork children need of the paused VM (its vCPUs saved as
    /// `vcpus`): the machine state, the frozen memory image and the disk
    /// (base image and a frozen copy of its layer). Spawning them
    /// ([`Controller::spawn_children`]) waits until the VM runs again.
    pub fn capture(&mut self, vcpus: &[VcpuState], agent_ready: bool) -> Result<Capture> {
        let t0 = Instant::now();
        let phase = |what: &str| tracing::debug!("fork: {what} at {:?}", t0.elapsed());
        let state = self.machine_state(vcpus, agent_ready)?;
        phase("state saved");
        let image = self.ram.freeze()?;
        // Hypervisor.framework maps the pages a slot had when it was
        // mapped; the freeze put new mappings at the same addresses (KVM
        // follows such changes itself), so map the slots again.
        #[cfg(target_os = "macos")]
        self.ram.register(self.vm.as_ref())?;
        phase("memory frozen");
        let disk = match &self.disk {
            Some(disk) => {
                let disk = disk.locked();
                let layer = disk.frozen_copy(&std::env::temp_dir(), None)?;
                let base = disk
                    .base_file()
                    .try_clone()
                    .map_err(|source| fork::Error::Io {
                        what: "share the base image",
                        source,
                    })?;
                Some((base, layer))
            }
            None => None,
        };
        phase("disk captured");
        Ok(Capture { state, image, disk })
    }

    /// Starts `opts.count` children from `capture`, each in its own VMM
    /// process; the caller learns from [`fork::Pending`] when they run.
    pub fn spawn_children(
        &mut self,
        capture: &Capture,
        opts: &ForkRequest,
    ) -> Result<fork::Pending> {
        let dir = match &opts.dir {
            Some(d) => d.clone(),
            None => crate::runtime::user_dir()?,
        };
        // Child ids: the names asked for, else `<parent pid>-<n>`.
        let ids: Vec<String> = match &opts.names {
            Some(names) => names.clone(),
            None => (1..=u64::from(opts.count))
                .map(|n| format!("{}-{}", std::process::id(), self.fork_seq + n))
                .collect(),
        };
        self.fork_seq += u64::from(opts.count);
        let disk = capture.disk.as_ref().map(|(base, layer)| (base, layer));
        Ok(fork::spawn_children(
            &capture.state,
            &capture.image,
            disk,
            &ids,
            &dir,
            &mut self.spares,
        )?)
    }
}

/// A paused VM as fork children get it (see [`Controller::capture`]).
pub struct Capture {
    state: MachineState,
    image: crate::memory::MemoryImage,
    disk: Option<(std::fs::File, std::fs::File)>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Unused spare children: stop and reap them.
        for mut spare in self.spares.drain(..) {
            spare.stop();
        }
    }
}
