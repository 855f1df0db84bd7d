//! Machine state (everything but guest memory and disk data) and the
//! snapshot directory format (docs/snapshot.md).
//!
//! A snapshot directory holds:
//! - `state`: magic `VMMSNAP\0`, format version (u32 LE), body length (u64
//!   LE), CRC-32 of the body (u32 LE), then the body: [`MachineState`] as
//!   JSON;
//! - `memory`: guest memory, byte for byte (sparse where the guest never
//!   wrote), mapped copy-on-write by a restore;
//! - `disk-layer`: the root disk's blocks that differ from its base image,
//!   when the VM has a root disk (the base image itself is referenced by
//!   path and checked by size and modification time).
//!
//! It is written under a temporary name and renamed into place once every
//! file is complete and synced, so a VMM killed mid-snapshot never leaves a
//! directory that looks complete. The snapshot holds the guest's secrets:
//! the directory is created 0700 and its files 0600 whatever the umask;
//! the temporary name carries random bytes and is created exclusively (a
//! name that exists is an error, never reused), and the rename never
//! replaces anything at the target.

pub mod auth;
pub mod host;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use devices::legacy::serial::SerialSnapshot;
use devices::virtio::mmio::TransportSnapshot;
use hypervisor::{VcpuState, VmState};
use serde::{Deserialize, Serialize};

use crate::arch::VcpuIdentity;
use crate::config::VmConfig;
use crate::memory::MemoryImage;
use crate::virtio::DeviceId;

/// First bytes of a `state` file.
pub const MAGIC: &[u8; 8] = b"VMMSNAP\0";
/// The format version this VMM writes and reads. 2: typed vCPU, VM and
/// device state; devices matched to their state by identity.
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest `state` body accepted (it is JSON of a few hundred KiB at most).
const MAX_BODY: u64 = 64 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
pub const DISK_LAYER_FILE: &str = "disk-layer";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} already exists; choose a new snapshot directory")]
    Exists { path: PathBuf },
    #[error("cannot write the snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a snapshot of this VMM (bad magic); give the directory `vmm snapshot` wrote"
    )]
    BadMagic { path: PathBuf },
    #[error("{path} has snapshot format version {found}; this VMM reads version {VERSION} only (restore it with the VMM version that wrote it)")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is truncated or corrupted ({what}); the snapshot cannot be used")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path} cannot be read by this VMM ({reason}): it was written by another build or hypervisor backend; restore it with the VMM that wrote it")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "cannot encode the machine state: {0} (a bug: please report it); no snapshot was written"
    )]
    Encode(serde_json::Error),
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error("the snapshot's memory file {path} is {found} bytes, its state says {expected}: it is truncated or from another snapshot")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `Action::Snapshot` wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    /// Guest memory bytes written (the rest of the file is holes).
    pub memory_bytes: u64,
    pub pause_ms: f64,
}

/// Everything about a paused machine except its memory and disk data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// The configuration it runs (with the identity of this copy: vsock
    /// socket, CID).
    pub config: VmConfig,
    /// The root disk's base image, resolved.
    pub disk_base: Option<PathBuf>,
    /// The kernel command line it booted with (for reports).
    pub cmdline: String,
    pub memory_size: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// What made each vCPU this machine's (x86_64: its CPUID). Written as
    /// `cpuid` by the VMMs before arm64.
    #[serde(alias = "cpuid")]
    pub vcpu_identity: Vec<VcpuIdentity>,
    pub serial: SerialSnapshot,
    /// Virtio devices, in bus order.
    pub virtio: Vec<SavedDevice>,
    /// Whether the guest agent had announced itself.
    pub agent_ready: bool,
}

/// A virtio device's saved transport (registers, queues, the device's own
/// state), and which device of the configuration it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedDevice {
    pub id: DeviceId,
    pub transport: TransportSnapshot,
}

/// What a VM is restored from: a snapshot directory or a forking parent.
pub struct RestoreSource {
    pub state: MachineState,
    pub memory: MemoryImage,
    /// The root disk's frozen layer (the disk as it was), with a name for
    /// errors. The base image is `state.disk_base`, or `disk_base_file`.
    pub disk_layer: Option<(std::fs::File, PathBuf)>,
    /// The base image, already open (a fork child gets its parent's).
    pub disk_base_file: Option<std::fs::File>,
    /// The saved machine's own network (`state.config` has the one it is
    /// restored onto): what its guest's interface is set to.
    pub saved_network: Option<crate::config::NetworkConfig>,
}

/// Encodes `state` as a `state` file.
pub fn encode(state: &MachineState) -> Result<Vec<u8>> {
    Ok(frame(&serde_json::to_vec(state).map_err(Error::Encode)?))
}

/// `body` behind the header (magic, version, length, checksum).
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes a `state` file (`path` names it in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<MachineState> {
    let corrupt = |what: &str| Error::Corrupt {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt("header cut short"));
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let version = word(8);
    if version != VERSION {
        return Err(Error::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let crc = word(20);
    let body = &bytes[HEADER_LEN..];
    if len > MAX_BODY || body.len() as u64 != len {
        return Err(corrupt(&format!(
            "the body is {} bytes, the header says {len}",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    serde_json::from_slice(body).map_err(|e| Error::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A snapshot being written: files go into a temporary directory next to
/// the target, which `commit` syncs and renames into place.
pub struct Writer {
    target: PathBuf,
    tmp: PathBuf,
}

impl Writer {
    pub fn create(target: &Path) -> Result<Self> {
        if target.exists() {
            return Err(Error::Exists {
                path: target.to_path_buf(),
            });
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let tmp = target.with_file_name(format!(
            ".{name}.partial-{}-{}",
            std::process::id(),
            crate::runtime::random_hex(8)
        ));
        Self::create_at(target, tmp)
    }

    /// Creates the temporary directory `tmp` (0700, exclusively) for
    /// `target`.
    fn create_at(target: &Path, tmp: PathBuf) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let made = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)));
        if let Err(source) = made {
            // Not ours (it existed): never removed by this writer.
            return Err(Error::Write { path: tmp, source });
        }
        Ok(Writer {
            target: target.to_path_buf(),
            tmp,
        })
    }

    /// The temporary directory the files go to.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Creates file `name` in the temporary directory.
    pub fn file(&self, name: &str) -> Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.tmp.join(name);
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| Error::Write { path, source })
    }

    /// Writes the `state` file (and, with a key, the `auth` file), syncs
    /// every file, and renames the directory into place.
    pub fn commit(self, state: &MachineState, key: Option<&[u8]>) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Write { path, source }
        };
        let state_path = self.tmp.join(STATE_FILE);
        let mut f = self.file(STATE_FILE)?;
        f.write_all(&encode(state)?).map_err(io(&state_path))?;
        if let Some(key) = key {
            let mac = auth::sign(&self.tmp, key)?;
            let auth_path = self.tmp.join(auth::AUTH_FILE);
            self.file(auth::AUTH_FILE)?
                .write_all(mac.as_bytes())
                .map_err(io(&auth_path))?;
        }
        for entry in std::fs::read_dir(&self.tmp).map_err(io(&self.tmp))? {
            let path = entry.map_err(io(&self.tmp))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
        vmm_os::file::rename_noreplace(&self.tmp, &self.target).map_err(io(&self.target))?;
        if let Some(parent) = self.target.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not committed (an error on the way): leave nothing behind.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// A snapshot directory opened for restoring.
pub struct Snapshot {
    pub state: MachineState,
    /// The `state` file as read (what an `auth` MAC covers).
    state_bytes: Vec<u8>,
    pub memory: File,
    pub disk_layer: Option<(File, PathBuf)>,
}

/// Opens and checks snapshot directory `dir`.
pub fn open(dir: &Path) -> Result<Snapshot> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Read { path, source }
    };
    let state_path = dir.join(STATE_FILE);
    let mut bytes = Vec::new();
    File::open(&state_path)
        .and_then(|f| f.take(MAX_BODY + HEADER_LEN as u64).read_to_end(&mut bytes))
        .map_err(read_err(&state_path))?;
    let state = decode(&bytes, &state_path)?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(read_err(&memory_path))?;
    let found = memory.metadata().map_err(read_err(&memory_path))?.len();
    if found != state.memory_size {
        return Err(Error::MemorySize {
            path: memory_path,
            expected: state.memory_size,
            found,
        });
    }
    let disk_layer = if state.config.rootfs.is_some() {
        let path = dir.join(DISK_LAYER_FILE);
        let file = File::open(&path).map_err(read_err(&path))?;
        Some((file, path))
    } else {
        None
    };
    Ok(Snapshot {
        state,
        state_bytes: bytes,
        memory,
        disk_layer,
    })
}

/// How a snapshot is restored.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The restored VM's vsock socket (the snapshot's VM may still run on
    /// its own).
    pub vsock_socket: PathBuf,
    /// Where host-side settings come from ([`host`]).
    pub host: host::HostSettings,
    /// With a key, the snapshot must carry a matching `auth` MAC.
    pub key: Option<Vec<u8>>,
}

/// Opens snapshot directory `dir` for a restore: checks it (CRC, sizes,
/// and the MAC when a key is given) and takes its host-side settings only
/// as `opts.host` allows.
pub fn restore_source(dir: &Path, opts: &RestoreOptions) -> Result<RestoreSource> {
    let snap = open(dir)?;
    if let Some(key) = &opts.key {
        auth::verify(
            dir,
            key,
            &snap.state_bytes,
            &snap.memory,
            snap.disk_layer.as_ref().map(|(f, _)| f),
        )?;
    }
    let mut state = snap.state;
    let saved_network = state.config.network.clone();
    let (config, disk_base) = host::resolve(&state.config, state.disk_base.take(), &opts.host)?;
    state.config = config;
    state.disk_base = disk_base;
    // A copy of the VM: a socket and a context id of its own.
    if let Some(v) = &mut state.config.vsock {
        v.uds_path = opts.vsock_socket.clone();
        v.renew_cid();
    }
    // The disk continues from the snapshot's layer with a throwaway layer
    // on top: the snapshot itself never changes.
    if let Some(r) = &mut state.config.rootfs {
        r.layer = None;
    }
    Ok(RestoreSource {
        memory: MemoryImage {
            size: state.memory_size,
            base: std::sync::Arc::new(snap.memory),
            overlays: Vec::new(),
        },
        state,
        disk_layer: snap.disk_layer,
        disk_base_file: None,
        saved_network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::DeviceState;

    /// This build's backend's state types, empty (the format around them
    /// is what the tests check).
    #[cfg(target_arch = "x86_64")]
    fn blank_vm() -> VmState {
        VmState::KvmX86_64(Default::default())
    }
    #[cfg(target_arch = "x86_64")]
    fn blank_vcpu() -> VcpuState {
        VcpuState::KvmX86_64(Default::default())
    }
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    fn blank_vm() -> VmState {
        VmState::KvmAarch64(Default::default())
    }
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    fn blank_vcpu() -> VcpuState {
        VcpuState::KvmAarch64(Default::default())
    }
    #[cfg(target_os = "macos")]
    fn blank_vm() -> VmState {
        VmState::HvfAarch64(Default::default())
    }
    #[cfg(target_os = "macos")]
    fn blank_vcpu() -> VcpuState {
        VcpuState::HvfAarch64(Default::default())
    }

    fn sample() -> MachineState {
        let transport = |device| TransportSnapshot {
            device_type: 26,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 1 << 32,
            queue_sel: 0,
            status: 15,
            config_generation: 0,
            interrupt_status: 0,
            activated: true,
            queues: vec![],
            device,
        };
        MachineState {
            config: VmConfig::default(),
            disk_base: None,
            cmdline: "console=ttyS0".into(),
            memory_size: 1 << 20,
            vm: blank_vm(),
            vcpus: vec![blank_vcpu()],
            vcpu_identity: vec![Default::default()],
            serial: SerialSnapshot::default(),
            virtio: vec![
                SavedDevice {
                    id: DeviceId::Vsock,
                    transport: transport(None),
                },
                SavedDevice {
                    id: DeviceId::Share("work".into()),
                    transport: transport(Some(DeviceState::Fs(Default::default()))),
                },
            ],
            agent_ready: true,
        }
    }

    #[test]
    fn state_round_trips_and_damage_is_refused() {
        let p = Path::new("snap/state");
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes, p).unwrap();
        assert_eq!(back.cmdline, "console=ttyS0");
        assert!(back.agent_ready);
        let ids: Vec<DeviceId> = back.virtio.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, [DeviceId::Vsock, DeviceId::Share("work".into())]);
        assert!(matches!(
            back.virtio[1].transport.device,
            Some(DeviceState::Fs(_))
        ));

        let msg = |r: Result<MachineState>| r.unwrap_err().to_string();
        assert!(msg(decode(&bytes[..bytes.len() - 3], p)).contains("truncated"));
        assert!(msg(decode(&bytes[..10], p)).contains("truncated"));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert!(msg(decode(&flipped, p)).contains("checksum"));
        for old in [1u8, 9] {
            let mut other = bytes.clone();
            other[8] = old;
            let err = msg(decode(&other, p));
            assert!(
                err.contains(&format!("version {old};")) && err.contains("reads version 2 only"),
                "{err}"
            );
        }
        assert!(msg(decode(b"GIF89a..", p)).contains("not a snapshot"));
    }

    #[test]
    fn state_of_another_backend_is_refused_with_a_sentence() {
        let mut body = serde_json::to_value(sample()).unwrap();
        let vm = body["vm"].as_object_mut().unwrap();
        let ours = vm.keys().next().unwrap().clone();
        let saved = vm.remove(&ours).unwrap();
        // A backend this build lacks.
        let other = if ours == "kvm-x86_64" {
            "hvf-aarch64"
        } else {
            "kvm-x86_64"
        };
        vm.insert(other.into(), saved);
        let bytes = frame(&serde_json::to_vec(&body).unwrap());
        let err = decode(&bytes, Path::new("snap/state")).unwrap_err();
        assert!(matches!(err, Error::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains(other), "{err}");
    }

    #[test]
    fn writer_is_atomic() {
        let root = std::env::temp_dir().join(format!("vmm-snapw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let target = root.join("snap");
        {
            let w = Writer::create(&target).unwrap();
            w.file(MEMORY_FILE).unwrap().set_len(1 << 20).unwrap();
            // Dropped before commit: nothing is left.
        }
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        let w = Writer::create(&target).unwrap();
        w.file(MEMORY_FILE).unwrap().set_len(1 << 20).unwrap();
        w.commit(&sample(), None).unwrap();
        let snap = open(&target).unwrap();
        assert_eq!(snap.state.memory_size, 1 << 20);
        assert!(Writer::create(&target).is_err(), "no overwrite");
        // A memory file of the wrong size is refused.
        File::options()
            .write(true)
            .open(target.join(MEMORY_FILE))
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(matches!(open(&target), Err(Error::MemorySize { .. })));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn snapshots_are_private_and_never_land_in_a_planted_name() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = std::env::temp_dir().join(format!("vmm-snapp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // Written under umask 0: still 0700 and 0600.
        let target = root.join("snap");
        // SAFETY: umask only changes this process's creation mask.
        let old = unsafe { libc::umask(0) };
        let made = Writer::create(&target).and_then(|w| w.file(MEMORY_FILE).map(|f| (w, f)));
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let (w, file) = made.unwrap();
        file.set_len(4096).unwrap();
        assert!(w.dir().file_name().unwrap().len() > ".snap.partial-".len() + 16);
        w.commit(
            &{
                let mut s = sample();
                s.memory_size = 4096;
                s
            },
            None,
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o700);
        for name in [MEMORY_FILE, STATE_FILE] {
            let mode = std::fs::metadata(target.join(name)).unwrap().mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        // A temporary name that exists (planted by someone, here by a
        // thread running as uid 65534 when possible) is an error, and is
        // left alone.
        let planted = root.join(".snap2.partial-planted");
        let p = planted.clone();
        let by_nobody = crate::runtime::tests::as_nobody(move || {
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("memory"), b"trap").unwrap();
        });
        if by_nobody.is_none() {
            std::fs::create_dir(&planted).unwrap();
            std::fs::write(planted.join("memory"), b"trap").unwrap();
        }
        let err = Writer::create_at(&root.join("snap2"), planted.clone()).err();
        assert!(matches!(err, Some(Error::Write { .. })));
        assert_eq!(std::fs::read(planted.join("memory")).unwrap(), b"trap");
        // A target that appears before the commit is not replaced, even
        // as an empty directory.
        let target3 = root.join("snap3");
        let w = Writer::create(&target3).unwrap();
        std::fs::create_dir(&target3).unwrap();
        assert!(w.commit(&sample(), None).is_err());
        assert_eq!(std::fs::read_dir(&target3).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
