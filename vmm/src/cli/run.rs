//! `vmm run`: one sandbox, one command, its exit status. It starts from
//! the configuration's default template (built on first use), a named
//! template, or a boot (`--cold`); jailed where the host allows it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmm::config::VmConfig;

use super::{fail, is_namespace_refusal, jail_plan, template, ExecArgs};

/// How `vmm run` starts its sandbox.
pub enum RunStart {
    /// From the configuration's default template, built on first use.
    Default,
    /// From a named template.
    Template(String),
    /// Booting (`--cold`).
    Cold,
}

/// `vmm run`'s switches.
pub struct RunHow {
    pub start: RunStart,
    /// `--image`: the root disk, and the command when none is given.
    pub image: Option<String>,
    pub no_seccomp: bool,
    pub no_jail: bool,
}

pub fn run(config: Option<PathBuf>, how: RunHow, cmd: &ExecArgs) -> ExitCode {
    let RunHow {
        start,
        image,
        no_seccomp,
        no_jail,
    } = how;
    let mut config = match config.as_deref().map(VmConfig::from_file).transpose() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut owned_cmd;
    let mut cmd = cmd;
    if let Some(name) = image {
        let record = match super::image::open_or_pull(&name) {
            Ok(i) => i.record,
            Err(e) => return fail(e),
        };
        let c = config.get_or_insert_with(VmConfig::default);
        let rootfs = c.rootfs.get_or_insert_with(Default::default);
        rootfs.base = None;
        rootfs.image = Some(name);
        // As `docker run`: the entrypoint, then the arguments or `Cmd`.
        owned_cmd = cmd.clone();
        owned_cmd.argv = record.command(&cmd.argv);
        if owned_cmd.argv.is_empty() {
            return fail("the image names no command (no Entrypoint or Cmd): give one after `--`");
        }
        cmd = &owned_cmd;
    }
    // A user's own disk layer outlives the run: only a boot writes to it.
    let own_layer = config
        .as_ref()
        .and_then(|c| c.rootfs.as_ref())
        .is_some_and(|r| r.layer.is_some());
    // A template is checked against this run before anything starts.
    let (snapshot, mut config) = match start {
        RunStart::Template(name) => match template::for_run(&name, config) {
            Ok((t, c)) => (Some(t.snapshot_dir()), c),
            Err(e) => return fail(e),
        },
        RunStart::Default if !own_layer => {
            let config = config.unwrap_or_default();
            match template::default_for(&config, no_jail) {
                Ok(t) => (Some(t.snapshot_dir()), config),
                Err(e) => return fail(e),
            }
        }
        RunStart::Default | RunStart::Cold => (None, config.unwrap_or_default()),
    };
    config.seccomp &= !no_seccomp;
    if let Err(e) = jail_sandbox(no_jail, &mut config, snapshot.as_deref(), None) {
        return fail(e);
    }
    let seccomp = config.seccomp;
    let started = match snapshot {
        Some(dir) => {
            let host = vmm::snapshot::host::HostSettings {
                config: Some(config),
                trust_snapshot_config: false,
            };
            vmm::sandbox::Sandbox::restore(&dir, host, None)
        }
        None => vmm::sandbox::Sandbox::start(config),
    };
    let sandbox = match started {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // From here this thread only talks to the guest agent.
    if seccomp {
        if let Err(e) = vmm::seccomp::apply(vmm::seccomp::Role::RunClient) {
            let _ = sandbox.stop();
            return fail(e);
        }
    }
    let code = cmd.run(sandbox.agent());
    // Without a layer of the user's, the disk is thrown away: the VM can
    // stop at once, without a guest shutdown.
    let stopped = match own_layer {
        true => sandbox.stop(),
        false => sandbox.discard(),
    };
    if let Err(e) = stopped {
        eprintln!("vmm: the VM did not stop cleanly: {e}");
    }
    code
}

/// Jails this process before the sandbox of `config` starts, unless
/// `no_jail`: the jail shows the files of the config with the sandbox's
/// defaults (the root disk, the agent) and `read` (a template's snapshot)
/// read-only, the VM's own folders and `write` (a template store)
/// writable; the sockets go into its runtime folder. Where the host
/// forbids user namespaces, a config's "jail" fails; without one the
/// sandbox runs unjailed.
pub fn jail_sandbox(
    no_jail: bool,
    config: &mut VmConfig,
    read: Option<&Path>,
    write: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    if no_jail {
        return Ok(());
    }
    let asked = config.jail.is_some();
    match enter_jail(config, read, write) {
        Err(e) if !asked && is_namespace_refusal(e.as_ref()) => {
            tracing::info!("{e}; the VM runs unjailed");
            config.jail = None;
            Ok(())
        }
        entered => entered,
    }
}

fn enter_jail(
    config: &mut VmConfig,
    read: Option<&Path>,
    write: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    config.jail.get_or_insert_with(Default::default);
    let hv = vmm::open_hypervisor()?;
    let planned = vmm::template::sandbox_config(config);
    let (mut files, base) = vmm::Vm::boot_files(&planned, hv.as_ref())?;
    drop(hv);
    files.extend(read.map(Path::to_path_buf));
    let mut plan = jail_plan(config, &files, base.as_deref(), None, None)?;
    plan.exposed
        .extend(write.map(|w| vmm::jail::Exposed::ReadWrite(w.to_path_buf())));
    vmm::jail::enter(&plan)?;
    Ok(())
}
