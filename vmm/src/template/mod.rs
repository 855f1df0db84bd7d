//! Templates (docs/templates.md): a VM booted once, its agent up and its
//! warm-up commands run, then snapshotted into the artifact cache, so that
//! a sandbox starts by restoring it in milliseconds instead of booting.
//!
//! The store is `<cache>/templates` (`~/.cache/vmm/templates`, 0700). A
//! template `NAME` is the folder `NAME/` holding `template.json` (a
//! [`Record`]: what it was built from, when, how) and `snapshot/` (a
//! snapshot directory, docs/snapshot.md). It is built in a folder of its
//! own, `.NAME.partial-<random>` (locked while its build runs), and
//! renamed into place once complete, so a template is either whole or
//! absent; a rebuild swaps the new folder in at once (`RENAME_EXCHANGE`),
//! and sandboxes still running from the old one keep its files open.
//!
//! Before a template is used, [`Template::check`] compares its
//! [`inputs::Inputs`] with the run's: a template whose kernel, initramfs,
//! base image or guest-visible machine differs is refused with a sentence
//! naming each difference, never used.

mod adopt;
pub mod inputs;

pub use adopt::adopt;

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::action::Control;
use crate::artifacts::KernelFlavour;
use crate::config::VmConfig;
use crate::sandbox::Sandbox;
use inputs::{FileId, Inputs, Layout};

/// The record's file name in a template's folder.
const RECORD_FILE: &str = "template.json";
/// The snapshot's folder name in a template's folder.
const SNAPSHOT_DIR: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a template name: use 1 to 64 of a-z, 0-9, '-', '_' and '.', starting with a letter or digit")]
    BadName(String),
    #[error("no template named {0:?}; `vmm template ls` lists them, `vmm template create {0}` builds one")]
    NoSuchTemplate(String),
    #[error("a template named {0:?} exists; remove it with `vmm template rm {0}` or rebuild it with `vmm template create {0} --replace`")]
    Exists(String),
    #[error("the template {name:?} does not fit: {}; rebuild it with `vmm template create {name} --replace` (with the config you run), or start without it", changes.join("; "))]
    Stale { name: String, changes: Vec<String> },
    #[error("the template {name:?} is damaged ({what}); remove it with `vmm template rm {name}` and build it again")]
    Damaged { name: String, what: String },
    #[error("building the template {name:?}: the warm-up command `{command}` failed ({status}); its output:\n{output}")]
    Warmup {
        name: String,
        command: String,
        status: String,
        output: String,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} for the template: {source}")]
    Input {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::Error),
    #[error("building the template: {0}")]
    Action(#[from] crate::action::ActionError),
    #[error(transparent)]
    Partial(#[from] crate::partial::Error),
    #[error("the warm parent's fork answered without a child (a bug: please report it)")]
    NoChild,
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// What `template.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// When it was built, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// How long building it took.
    pub build_ms: u64,
    /// The warm-up commands run before the snapshot (`sh -c`).
    pub warmup: Vec<String>,
    pub inputs: Inputs,
    /// The configuration it was built from: a sandbox started from the
    /// template without a config of its own takes its host-side settings
    /// from it (the user's own choice, made on this host).
    pub config: VmConfig,
    /// Guest memory bytes in the snapshot (the rest are holes).
    pub memory_bytes: u64,
    /// The sandbox it was snapshotted from while it ran (`adopt`), for a
    /// template made that way; none for a built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_sandbox: Option<String>,
}

/// A template in the store.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub record: Record,
}

/// The store's folder (not created).
pub fn store_dir() -> PathBuf {
    crate::artifacts::cache_dir().join("templates")
}

fn store() -> Result<PathBuf> {
    let dir = store_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io("create", &dir))?;
    Ok(dir)
}

fn check_name(name: &str) -> Result<()> {
    crate::names::check_name(name).map_err(|_| Error::BadName(name.to_string()))
}

/// The configuration a sandbox runs: `config` with the root disk and the
/// agent's vsock device where it leaves them out (as `vmm run` and
/// [`Sandbox::start`] do). Inputs are computed from it.
pub fn sandbox_config(config: &VmConfig) -> VmConfig {
    let mut c = config.clone();
    c.ensure_agent(PathBuf::from("agent.vsock"));
    c
}

/// The inputs a sandbox of `config` (as [`sandbox_config`] makes it) would
/// be built from on this host.
pub fn inputs_of(config: &VmConfig, hv: &dyn hypervisor::Hypervisor) -> Result<Inputs> {
    let config = sandbox_config(config);
    let (files, base) = crate::Vm::boot_files(&config, hv)?;
    let id = |what: &'static str, p: &Path| {
        FileId::of(p).map_err(|source| Error::Input {
            what,
            path: p.to_path_buf(),
            source,
        })
    };
    let flavour = KernelFlavour::resolve(config.flavour, hv.kind());
    Ok(Inputs {
        kernel: id("cannot read the kernel", &files[0])?,
        initramfs: files
            .get(1)
            .map(|p| id("cannot read the initramfs", p))
            .transpose()?,
        base: base
            .as_deref()
            .map(|p| id("cannot read the base image", p))
            .transpose()?,
        layout: Layout::of(&config, &crate::vm::kernel_cmdline(&config, flavour, &[])),
        snapshot_format: crate::snapshot::VERSION,
    })
}

impl Template {
    /// The template called `name`.
    pub fn open(name: &str) -> Result<Template> {
        check_name(name)?;
        Self::open_in(&store_dir(), name)
    }

    fn open_in(store: &Path, name: &str) -> Result<Template> {
        let dir = store.join(name);
        let text = match std::fs::read(dir.join(RECORD_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSuchTemplate(name.to_string()))
            }
            Err(e) => return Err(io("read", &dir.join(RECORD_FILE))(e)),
        };
        let record: Record = serde_json::from_slice(&text).map_err(|e| Error::Damaged {
            name: name.to_string(),
            what: format!("{RECORD_FILE}: {e}"),
        })?;
        if record.name != name {
            return Err(Error::Damaged {
                name: name.to_string(),
                what: format!("{RECORD_FILE} names {:?}", record.name),
            });
        }
        Ok(Template { dir, record })
    }

    /// The snapshot directory a sandbox restores.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }

    /// Bytes its files take on disk (the memory file is sparse).
    pub fn size_on_disk(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                match entry.metadata() {
                    Ok(m) if m.is_dir() => stack.push(entry.path()),
                    Ok(m) => total += m.blocks() * 512,
                    Err(_) => {}
                }
            }
        }
        total
    }

    /// Starts a sandbox from the template in this process (the Rust API's
    /// `vmm run --template`): checked against `config` (the sandbox's
    /// host-side settings; `None`: the template's own), restored, its
    /// agent answering.
    pub fn start(&self, config: Option<VmConfig>) -> Result<Sandbox> {
        let config = self.fit(config)?;
        let host = crate::snapshot::host::HostSettings {
            config: Some(config),
            trust_snapshot_config: false,
        };
        Ok(Sandbox::restore(&self.snapshot_dir(), host, None)?)
    }

    /// Restores the template once in this process and keeps it running,
    /// to fork sandboxes from ([`Warm::start`]): for many starts in a row,
    /// each then costs a fork instead of a restore. `config` is as for
    /// [`Template::start`]; every sandbox forked from it has its host-side
    /// settings.
    pub fn warm(&self, config: Option<VmConfig>) -> Result<Warm> {
        Ok(Warm {
            parent: self.start(config)?,
        })
    }

    /// The config a sandbox from this template runs with (`config`, or
    /// the template's own), once checked to fit ([`Template::check`]).
    pub fn fit(&self, config: Option<VmConfig>) -> Result<VmConfig> {
        let config = config.unwrap_or_else(|| self.record.config.clone());
        let hv = crate::open_hypervisor()?;
        self.check(&inputs_of(&config, hv.as_ref())?)?;
        Ok(config)
    }

    /// Refuses the template, naming every difference, unless it was built
    /// from `now` (a run's inputs, [`inputs_of`]).
    pub fn check(&self, now: &Inputs) -> Result<()> {
        let changes = self.record.inputs.changes(now);
        if changes.is_empty() {
            Ok(())
        } else {
            Err(Error::Stale {
                name: self.record.name.clone(),
                changes,
            })
        }
    }
}

/// A template kept running in this process ([`Template::warm`]), from
/// which sandboxes are forked copy-on-write. Their processes run this
/// program's executable: call `vmm::fork_child::run_child_if_asked()`
/// first in `main`.
pub struct Warm {
    parent: Sandbox,
}

impl Warm {
    /// A new sandbox: a fork child of the warm parent (a VM in its own
    /// process, with fresh randomness, clock and identity), its agent
    /// answering.
    pub fn start(&self) -> Result<crate::sandbox::Forked> {
        let child = self.parent.fork(1)?.pop().ok_or(Error::NoChild)?;
        child.agent()?;
        Ok(child)
    }
}

/// Every template in the store, by name (damaged ones are skipped with a
/// log line).
pub fn list() -> Result<Vec<Template>> {
    let dir = store_dir();
    match std::fs::metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("read", &dir)(e)),
        Ok(_) => Ok(list_in(&dir)),
    }
}

/// (name, base image path) of every template: what `vmm::image` needs to
/// tell which images templates use.
pub fn bases() -> Vec<(String, PathBuf)> {
    list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| Some((t.record.name.clone(), t.record.inputs.base.clone()?.path)))
        .collect()
}

fn list_in(store: &Path) -> Vec<Template> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || check_name(&name).is_err() {
            continue;
        }
        match Template::open_in(store, &name) {
            Ok(t) => out.push(t),
            Err(e) => tracing::warn!("template {name}: {e}"),
        }
    }
    out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    out
}

/// Removes template `name` (sandboxes running from it keep its files).
pub fn remove(name: &str) -> Result<()> {
    check_name(name)?;
    let dir = store_dir().join(name);
    if !dir.join(RECORD_FILE).exists() {
        return Err(Error::NoSuchTemplate(name.to_string()));
    }
    std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))
}

/// How to build a template.
pub struct Build<'a> {
    pub name: &'a str,
    /// The VM to boot (the root disk and the agent are added where it
    /// leaves them out).
    pub config: VmConfig,
    /// Commands run in the guest (`sh -c`) before the snapshot.
    pub warmup: Vec<String>,
    /// Replace a template of that name.
    pub replace: bool,
    /// A template of that name is enough: return it instead of building
    /// (or of failing when another build installed one first).
    pub if_missing: bool,
}

/// Boots `build.config`, waits for the agent, runs the warm-up commands,
/// snapshots the VM into the store and stops it. `progress` gets a line
/// for each step. ([`prepare`] and [`Pending::run`] in one.)
pub fn create(build: Build, progress: &mut dyn FnMut(&str)) -> Result<Template> {
    match prepare(build)? {
        Prepared::Exists(t) => Ok(t),
        Prepared::Pending(p) => p.run(progress),
    }
}

/// What [`prepare`] found.
// Made once per build, and both variants are large (a config each).
#[allow(clippy::large_enum_variant)]
pub enum Prepared<'a> {
    /// The build is `if_missing` and the template exists.
    Exists(Template),
    /// The build is checked and ready to boot.
    Pending(Pending<'a>),
}

/// A build checked against the store, its inputs read: what is left
/// boots the VM and writes nothing but the store (so it can run in a
/// jail that shows it the VM's files and the store only).
pub struct Pending<'a> {
    build: Build<'a>,
    /// The config the VM boots with: the build's, with what a jail fills
    /// in (the template records the build's own).
    pub boot: VmConfig,
    store: PathBuf,
    inputs: Inputs,
    started: Instant,
}

/// Checks the build's name against the store (creating the store) and
/// reads the inputs the template will record, before anything boots.
pub fn prepare(build: Build) -> Result<Prepared> {
    let started = Instant::now();
    let name = build.name;
    check_name(name)?;
    let store = store()?;
    crate::partial::sweep(&store);
    if build.if_missing {
        if let Ok(t) = Template::open_in(&store, name) {
            return Ok(Prepared::Exists(t));
        }
    }
    if !build.replace && store.join(name).exists() {
        return Err(Error::Exists(name.to_string()));
    }
    let hv = crate::open_hypervisor()?;
    let inputs = inputs_of(&build.config, hv.as_ref())?;
    Ok(Prepared::Pending(Pending {
        boot: build.config.clone(),
        build,
        store,
        inputs,
        started,
    }))
}

impl Pending<'_> {
    /// The store the template is written into.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Boots the VM, waits for its agent, runs the warm-up commands,
    /// snapshots it into the store and stops it.
    pub fn run(self, progress: &mut dyn FnMut(&str)) -> Result<Template> {
        let Pending {
            build,
            boot,
            store,
            inputs,
            started,
        } = self;
        let name = build.name;
        progress(&format!(
            "template {name}: booting {} vCPU(s), {} MiB, kernel {}{}",
            inputs.layout.vcpus,
            inputs.layout.memory_mib,
            inputs.kernel.path.display(),
            inputs
                .base
                .as_ref()
                .map(|b| format!(", base image {}", b.path.display()))
                .unwrap_or_default()
        ));
        let sandbox = Sandbox::start(boot)?;
        progress(&format!(
            "template {name}: agent ready after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        for command in &build.warmup {
            progress(&format!("template {name}: warm-up `{command}`"));
            warm_up(&sandbox, name, command)?;
        }
        write_back(&sandbox);
        let made = save(&sandbox, &store, &build, inputs, started);
        // The VM is not needed any more, whatever happened.
        let _ = sandbox.machine().stop();
        drop(sandbox);
        let record = match made {
            Ok(r) => r,
            // Another build of the same template finished first.
            Err(Error::Exists(_)) if build.if_missing => return Template::open_in(&store, name),
            Err(e) => return Err(e),
        };
        if name.starts_with(DEFAULT_PREFIX) {
            sweep_defaults(&store, &record);
        }
        let template = Template {
            dir: store.join(name),
            record,
        };
        progress(&format!(
            "template {name}: built in {:.1} s, {} MiB on disk",
            started.elapsed().as_secs_f64(),
            template.size_on_disk() >> 20
        ));
        Ok(template)
    }
}

/// Snapshots the sandbox and writes its record into a partial folder of
/// the store, then installs that as the template (the folder is removed
/// if anything fails).
fn save(
    sandbox: &Sandbox,
    store: &Path,
    build: &Build,
    inputs: Inputs,
    started: Instant,
) -> Result<Record> {
    // Held until the template is installed: a sweep leaves it alone.
    let (partial, _held) = crate::partial::create(store, build.name)?;
    let saved = snapshot_into(sandbox, &partial).and_then(|memory_bytes| {
        let record = Record {
            name: build.name.to_string(),
            created_unix: crate::names::now_unix(),
            build_ms: started.elapsed().as_millis() as u64,
            warmup: build.warmup.clone(),
            inputs,
            config: build.config.clone(),
            memory_bytes,
            from_sandbox: None,
        };
        write_record(&partial, &record)?;
        install(&partial, &store.join(build.name), build.replace)?;
        Ok(record)
    });
    if saved.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    saved
}

/// Runs one warm-up command; its failure fails the build.
fn warm_up(sandbox: &Sandbox, name: &str, command: &str) -> Result<()> {
    let exec = crate::agent::Exec {
        argv: vec!["sh".into(), "-c".into(), command.into()],
        ..Default::default()
    };
    let mut output = Vec::new();
    let mut errors = Vec::new();
    let status = sandbox
        .agent()
        .exec(&exec, None, &mut output, &mut errors)?;
    if status.shell_code() == 0 {
        return Ok(());
    }
    output.extend_from_slice(&errors);
    Err(Error::Warmup {
        name: name.to_string(),
        command: command.to_string(),
        status: format!("exit status {}", status.shell_code()),
        output: String::from_utf8_lossy(&output).into_owned(),
    })
}

/// Has the guest write its dirty pages back before the snapshot. Writeback
/// left pending (the warm-up's files, written seconds before) would run in
/// the first seconds of every sandbox started from the template: `vmm run
/// -- true` took 3.7 s from one build and 2.0 s from the next on the PVM
/// host, depending on whether its snapshot caught writeback pending.
fn write_back(sandbox: &Sandbox) {
    let exec = crate::agent::Exec {
        argv: vec!["sync".into()],
        ..Default::default()
    };
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    match sandbox.agent().exec(&exec, None, &mut output, &mut errors) {
        Ok(s) if s.shell_code() == 0 => {}
        Ok(_) => tracing::warn!(
            "the guest's sync failed ({}); sandboxes may start slower",
            String::from_utf8_lossy(&errors).trim()
        ),
        Err(e) => tracing::warn!("cannot run sync in the guest ({e}); sandboxes may start slower"),
    }
}

/// Snapshots the sandbox into `<partial>/snapshot`; the memory bytes.
fn snapshot_into(sandbox: &Sandbox, partial: &Path) -> Result<u64> {
    let info = sandbox
        .machine()
        .snapshot(&partial.join(SNAPSHOT_DIR), None)?;
    Ok(info.memory_bytes)
}

fn write_record(dir: &Path, record: &Record) -> Result<()> {
    use std::io::Write;
    let path = dir.join(RECORD_FILE);
    let body = serde_json::to_vec_pretty(record).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("create", &path))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(io("write", &path))
}

/// Renames the complete `partial` folder to `target`: without replacing
/// anything, or (`replace`) swapping it with the old one at once and
/// removing that.
fn install(partial: &Path, target: &Path, replace: bool) -> Result<()> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match vmm_os::file::rename_noreplace(partial, target) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !replace => {
            return Err(Error::Exists(name))
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(io("rename into", target)(e)),
    }
    vmm_os::file::rename_exchange(partial, target).map_err(io("swap in", target))?;
    // `partial` now holds the old template.
    std::fs::remove_dir_all(partial).map_err(io("remove the old template", partial))
}

/// The prefix of default templates' names (`default-<inputs digest>`).
pub const DEFAULT_PREFIX: &str = "default-";

/// What a default template runs before its snapshot: a first command, so
/// the C library and the dynamic loader are in the guest's page cache,
/// and, where the image has python3, its start-up and the modules agents'
/// scripts import most. Without it the first command after every start
/// reads them from the disk again (measured on a PVM host: `vmm run --
/// true` 8.5 s from a template without it, 2.3 s with it; python 19 s and
/// 6.3 s).
pub const DEFAULT_WARMUP: &str = "true; if command -v python3 >/dev/null 2>&1; then python3 -c 'import json, os, subprocess'; fi";

/// The name of the default template for a run with `inputs`: the inputs'
/// digest, and the warm-up's.
pub fn default_name(inputs: &Inputs) -> String {
    let mut both = inputs.digest();
    both.push_str(DEFAULT_WARMUP);
    let hash = sha2::Sha256::digest(both.as_bytes());
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{DEFAULT_PREFIX}{hex}")
}

/// Removes the default templates that `new` (a default template just
/// built) supersedes: those of the same machine built from other files (an
/// older kernel, initramfs or base image: the setup command builds new
/// ones into new folders, and runs boot the newest), and those whose
/// files are gone.
fn sweep_defaults(store: &Path, new: &Record) {
    for entry in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(DEFAULT_PREFIX) || name == new.name {
            continue;
        }
        let Ok(t) = Template::open_in(store, &name) else {
            continue;
        };
        let i = &t.record.inputs;
        let mut files = std::iter::once(&i.kernel)
            .chain(&i.initramfs)
            .chain(&i.base);
        if i.layout == new.inputs.layout || files.any(|f| !f.path.exists()) {
            tracing::info!("template {name}: removed, {} supersedes it", new.name);
            let _ = std::fs::remove_dir_all(&t.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-tmpl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn install_never_leaves_half_a_template() {
        let store = scratch("install");
        let build = |tag: &str| {
            let p = store.join(format!(".t.partial-1-{tag}"));
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("mark"), tag).unwrap();
            p
        };
        let target = store.join("t");
        install(&build("a"), &target, false).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("mark")).unwrap(), "a");
        // Taken: refused without --replace, and the partial folder stays
        // for the caller to remove.
        let b = build("b");
        assert!(matches!(install(&b, &target, false), Err(Error::Exists(n)) if n == "t"));
        assert_eq!(std::fs::read_to_string(target.join("mark")).unwrap(), "a");
        // Replaced: swapped in, the old one removed.
        install(&b, &target, true).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("mark")).unwrap(), "b");
        assert!(!b.exists());
        std::fs::remove_dir_all(&store).unwrap();
    }

    pub(super) fn record(name: &str, kernel: &Path, memory_mib: u64) -> Record {
        let layout = Layout::of(&VmConfig::default(), "console=ttyS0");
        Record {
            name: name.into(),
            created_unix: 0,
            build_ms: 0,
            warmup: vec![],
            inputs: Inputs {
                kernel: FileId {
                    path: kernel.into(),
                    size: 1,
                    mtime_ns: 1,
                    inode: 1,
                },
                initramfs: None,
                base: None,
                layout: Layout {
                    memory_mib,
                    ..layout
                },
                snapshot_format: crate::snapshot::VERSION,
            },
            config: VmConfig::default(),
            memory_bytes: 0,
            from_sandbox: None,
        }
    }

    #[test]
    fn a_new_default_template_supersedes_the_same_machine_built_from_other_files() {
        let store = scratch("defaults");
        let kernel = store.join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let gone = store.join("gone");
        let put = |r: &Record| {
            let dir = store.join(&r.name);
            std::fs::create_dir(&dir).unwrap();
            write_record(&dir, r).unwrap();
        };
        let old = record("default-old", &store.join("old-vmlinux"), 128);
        let other = record("default-other", &kernel, 512);
        let orphan = record("default-orphan", &gone, 256);
        let named = record("mine", &store.join("old-vmlinux"), 128);
        let new = record("default-new", &kernel, 128);
        for r in [&old, &other, &orphan, &named, &new] {
            put(r);
        }
        sweep_defaults(&store, &new);
        let left: Vec<String> = list_in(&store).into_iter().map(|t| t.record.name).collect();
        assert_eq!(left, ["default-new", "default-other", "mine"]);
        std::fs::remove_dir_all(&store).unwrap();
    }

    #[test]
    fn a_damaged_or_missing_record_is_named() {
        let store = scratch("open");
        assert!(matches!(
            Template::open_in(&store, "none"),
            Err(Error::NoSuchTemplate(_))
        ));
        std::fs::create_dir(store.join("bad")).unwrap();
        std::fs::write(store.join("bad").join(RECORD_FILE), b"{").unwrap();
        let err = Template::open_in(&store, "bad").unwrap_err();
        assert!(matches!(err, Error::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("vmm template rm bad"));
        std::fs::remove_dir_all(&store).unwrap();
    }
}
