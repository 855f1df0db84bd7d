//! The CLI's template commands: `vmm template create|ls|rm`, and what
//! `vmm run --template` and `vmm launch --template` check before they
//! restore one (docs/templates.md, `vmm::template`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;
use vmm::config::VmConfig;
use vmm::template::{self, Build, Prepared, Template};

use super::fail;
use super::run::jail_sandbox;

/// `vmm template ...`.
#[derive(clap::Subcommand)]
pub enum TemplateCommand {
    /// Boot a VM, wait for its agent, run the warm-up commands, and
    /// snapshot it as template NAME (in `~/.cache/vmm/templates`).
    Create {
        /// The template's name.
        name: String,
        /// The VM configuration (docs/config.md); without it, what `vmm
        /// run` boots. A sandbox started from the template must have the
        /// same vCPUs, memory and devices; its host-side settings are its
        /// own.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Build from this imported image (`vmm image ls`) as the root
        /// disk, in place of the config's.
        #[arg(long)]
        image: Option<String>,
        /// A command the guest runs (`sh -c`) before the snapshot, so what
        /// it loads is in the template's memory (repeatable).
        #[arg(long = "warmup", value_name = "CMD")]
        warmup: Vec<String>,
        /// Replace a template of that name.
        #[arg(long, conflicts_with = "if_missing")]
        replace: bool,
        /// Succeed without building when a template of that name exists
        /// (how `vmm run` builds its default templates).
        #[arg(long, hide = true)]
        if_missing: bool,
        /// Build without the jail the VM otherwise boots in wherever the
        /// host allows user namespaces (docs/security.md).
        #[arg(long)]
        no_jail: bool,
    },
    /// List the templates: name, size on disk, memory, what each was
    /// built from, age.
    Ls {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (sandboxes running from it are not affected).
    Rm {
        /// The template's name.
        name: String,
    },
}

pub fn command(cmd: TemplateCommand) -> ExitCode {
    match cmd {
        TemplateCommand::Create {
            name,
            config,
            image,
            warmup,
            replace,
            if_missing,
            no_jail,
        } => {
            let mut config = match config.as_deref().map(VmConfig::from_file).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return fail(e),
            };
            if let Some(name) = image {
                if let Err(e) = super::image::open_or_pull(&name) {
                    return fail(e);
                }
                let rootfs = config.rootfs.get_or_insert_with(Default::default);
                rootfs.base = None;
                rootfs.image = Some(name);
            }
            let build = Build {
                name: &name,
                config,
                warmup,
                replace,
                if_missing,
            };
            create(build, no_jail)
        }
        TemplateCommand::Ls { json } => ls(json),
        TemplateCommand::Rm { name } => match template::remove(&name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
    }
}

/// Builds the template in a jail (as `vmm run` boots): it sees the VM's
/// files, and the store as its one writable folder besides the VM's own.
fn create(build: Build, no_jail: bool) -> ExitCode {
    let made = match template::prepare(build) {
        Ok(Prepared::Exists(t)) => Ok(t),
        Ok(Prepared::Pending(mut pending)) => {
            let store = pending.store().to_path_buf();
            if let Err(e) = jail_sandbox(no_jail, &mut pending.boot, None, Some(&store)) {
                return fail(e);
            }
            pending.run(&mut |line| eprintln!("vmm: {line}"))
        }
        Err(e) => Err(e),
    };
    match made {
        Ok(t) => {
            println!("{}", t.dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// One row of `vmm template ls`.
#[derive(Serialize)]
struct Row {
    name: String,
    /// Bytes its files take on disk.
    size_bytes: u64,
    memory_mib: u64,
    vcpus: u32,
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    base: Option<PathBuf>,
    warmup: Vec<String>,
    created_unix: u64,
    age_s: u64,
}

fn ls(json: bool) -> ExitCode {
    let templates = match template::list() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let now = vmm::names::now_unix();
    let rows: Vec<Row> = templates
        .iter()
        .map(|t| {
            let r = &t.record;
            Row {
                name: r.name.clone(),
                size_bytes: t.size_on_disk(),
                memory_mib: r.inputs.layout.memory_mib,
                vcpus: r.inputs.layout.vcpus,
                kernel: r.inputs.kernel.path.clone(),
                initramfs: r.inputs.initramfs.as_ref().map(|f| f.path.clone()),
                base: r.inputs.base.as_ref().map(|f| f.path.clone()),
                warmup: r.warmup.clone(),
                created_unix: r.created_unix,
                age_s: now.saturating_sub(r.created_unix),
            }
        })
        .collect();
    let header = format!(
        "{:<24} {:>8} {:>8} {:>6}  {:<32} BASE",
        "NAME", "SIZE", "MEMORY", "AGE", "KERNEL"
    );
    let short = |p: &Path| {
        // The cache's folders are named by hash: the last two parts say
        // which build it is.
        let parts: Vec<_> = p.iter().rev().take(2).collect();
        parts
            .iter()
            .rev()
            .map(|s| s.to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    };
    super::print_listing(json, rows, &header, |r| {
        format!(
            "{:<24} {:>7}M {:>7}M {:>6}  {:<32} {}",
            r.name,
            r.size_bytes >> 20,
            r.memory_mib,
            super::named::uptime(r.age_s),
            short(&r.kernel),
            r.base.as_deref().map_or_else(|| "-".into(), short)
        )
    })
}

/// Template `name` checked against the sandbox a run of `config` would
/// be: the template and the config to restore it with (`config`, or the
/// template's own when none is given).
pub fn for_run(name: &str, config: Option<VmConfig>) -> Result<(Template, VmConfig), String> {
    let t = Template::open(name).map_err(|e| e.to_string())?;
    let config = t.fit(config).map_err(|e| e.to_string())?;
    Ok((t, config))
}

/// The default template of a run of `config` (`default-<digest of its
/// inputs>`), built on first use. The build runs as a `vmm template
/// create` process of its own, so that this process stays as it was (one
/// thread, no filter) for the jail it may enter next.
pub fn default_for(config: &VmConfig, no_jail: bool) -> Result<Template, String> {
    let hv = vmm::open_hypervisor().map_err(|e| e.to_string())?;
    let inputs = template::inputs_of(config, hv.as_ref()).map_err(|e| e.to_string())?;
    drop(hv);
    let name = template::default_name(&inputs);
    match Template::open(&name) {
        Ok(t) => return Ok(t),
        Err(template::Error::NoSuchTemplate(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    eprintln!(
        "vmm: building the template {name} for this configuration, once: later runs start from it in milliseconds (`vmm run --cold` boots instead)"
    );
    let scratch = vmm::runtime::RuntimeDir::create("template").map_err(|e| e.to_string())?;
    let file = scratch.path().join("config.json");
    let json = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    std::fs::write(&file, json).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmm binary: {e}"))?;
    let status = std::process::Command::new(exe)
        .args(["template", "create", &name, "--if-missing", "--config"])
        .arg(&file)
        // An image may have no shell to run the warm-up with.
        .args(
            ["--warmup", template::DEFAULT_WARMUP]
                .into_iter()
                .filter(|_| config.rootfs.as_ref().is_none_or(|r| r.image.is_none())),
        )
        .args(no_jail.then_some("--no-jail"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot start the template build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the template {name} failed ({status}); `vmm run --cold` boots without it"
        ));
    }
    let t = Template::open(&name).map_err(|e| e.to_string())?;
    t.check(&inputs).map_err(|e| e.to_string())?;
    Ok(t)
}
