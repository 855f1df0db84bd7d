//! The `vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[path = "cli/device.rs"]
mod device;
#[path = "cli/image.rs"]
mod image;
#[path = "cli/named.rs"]
mod named;
#[path = "cli/run.rs"]
mod run;
#[path = "cli/serve.rs"]
mod serve;
#[path = "cli/template.rs"]
mod template;

use vmm::action::{Action, Control, ForkRequest, SnapshotRequest};
use vmm::config::VmConfig;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A microVM monitor for AI-agent sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM from a JSON config and run it until the guest shuts down.
    Launch(LaunchArgs),
    /// Run a command in a running VM; exit with its status.
    Exec {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        cmd: ExecArgs,
    },
    /// Boot a fresh VM, run one command in it, shut it down; exit with the
    /// command's status.
    Run {
        /// The VM configuration; `{}` (every default) when not given.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from this template (`vmm template create`) instead of
        /// booting: a restore, with the host-side settings of --config (or
        /// of the template's own config).
        #[arg(long, conflicts_with = "cold")]
        template: Option<String>,
        /// Boot this imported image (`vmm image ls`) as the root disk; with
        /// no command, run its entrypoint and command (docs/images.md).
        #[arg(long, conflicts_with = "template")]
        image: Option<String>,
        /// Boot from scratch instead of starting from the configuration's
        /// default template (which the first run builds).
        #[arg(long)]
        cold: bool,
        /// Run without seccomp filters (docs/security.md). For debugging
        /// only: it takes a layer of the boundary away.
        #[arg(long)]
        no_seccomp: bool,
        /// Run without the jail `vmm run` uses wherever the host allows
        /// user namespaces (docs/security.md).
        #[arg(long)]
        no_jail: bool,
        #[command(flatten)]
        cmd: ExecArgs,
    },
    /// Stop a VM: the guest syncs and powers off (with --force: stop it at
    /// once).
    Stop {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        force: bool,
    },
    /// Pause a VM (its vCPUs stop; devices idle).
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused VM.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Replace a running VM's egress policy (docs/network.md); it applies
    /// to connections that start from now on.
    Egress {
        #[command(flatten)]
        target: Target,
        /// What a destination no rule names gets: allow or deny.
        #[arg(long, default_value = "allow", value_parser = ["allow", "deny"])]
        default: String,
        /// A destination to allow: CIDR, NAME, *.NAME, optionally :PORT (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// A destination to deny, as --allow (repeatable).
        #[arg(long)]
        deny: Vec<String>,
    },
    /// Write a snapshot of a running VM into a new directory; the VM
    /// continues (docs/snapshot.md).
    Snapshot {
        #[command(flatten)]
        target: Target,
        /// The snapshot directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Authenticate the snapshot with this key file (at least 16 random
        /// bytes): a restore given the same key refuses a changed snapshot.
        #[arg(long)]
        snapshot_key: Option<PathBuf>,
    },
    /// Start a VM from a snapshot directory and run it until it stops.
    /// Host-side settings (share folders, console file, egress policy, port
    /// forwards, DNS, base image) come from --config, not from the
    /// snapshot (docs/snapshot.md).
    Restore {
        /// The directory `vmm snapshot` wrote.
        #[arg(long)]
        snapshot: PathBuf,
        /// Serve the control API here.
        #[arg(long)]
        api_socket: PathBuf,
        /// The restored VM's vsock socket (default: `<api-socket>.vsock`).
        #[arg(long)]
        vsock_socket: Option<PathBuf>,
        /// The host-side settings for the restored VM, in the config format
        /// (docs/config.md); what the guest sees (vCPUs, memory, devices)
        /// must match the snapshot.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use the snapshot's own host-side settings where --config gives
        /// none: only for snapshots you made on this host or can vouch for.
        #[arg(long)]
        trust_snapshot_config: bool,
        /// Refuse the snapshot unless it carries a MAC made with this key.
        #[arg(long)]
        snapshot_key: Option<PathBuf>,
        /// Write a JSON report here when the VM ends.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Run without seccomp filters (docs/security.md). For debugging
        /// only: it takes a layer of the boundary away.
        #[arg(long)]
        no_seccomp: bool,
        /// Run the restored VMM in a jail (docs/security.md), as
        /// `vmm launch --jail` does.
        #[arg(long)]
        jail: bool,
    },
    /// Fork a running VM into N children that continue from this instant,
    /// copy-on-write; prints a JSON list of the children and their sockets.
    /// Children of a named VM are named `NAME-1`, `NAME-2`, ... (the first
    /// free numbers).
    Fork {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Name the children `PREFIX-1`, `PREFIX-2`, ... (default: the
        /// parent's name).
        #[arg(long = "name", value_name = "PREFIX", conflicts_with = "dir")]
        prefix: Option<String>,
        /// Where an unnamed VM's children's sockets go (default: this
        /// user's private runtime directory, `$XDG_RUNTIME_DIR/vmm` or
        /// `/tmp/vmm-<uid>`).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the named VMs of this user: name, pid, state, vCPUs, memory,
    /// uptime, parent.
    Ps {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a named VM's console output.
    Logs {
        /// The VM's name.
        name: String,
    },
    /// Templates: VMs snapshotted once their agent is ready, which
    /// sandboxes start from in milliseconds (docs/templates.md).
    Template {
        #[command(subcommand)]
        command: template::TemplateCommand,
    },
    /// Images: OCI and Docker images imported as root disks
    /// (docs/images.md).
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Serve the E2B sandbox API on a local port: any E2B SDK pointed at
    /// it (E2B_API_URL, E2B_SANDBOX_URL) gets sandboxes here (docs/agents.md).
    Serve(serve::ServeArgs),
    /// Serve MCP on stdin/stdout: tools that create sandboxes, run
    /// commands, move files, fork and destroy (docs/agents.md).
    Mcp(serve::McpArgs),
    /// Our devices as vhost-user daemons for other VMMs (QEMU, Cloud
    /// Hypervisor): `vmm device fs`, `vmm device vsock` (docs/vhost-user.md).
    Device {
        #[command(subcommand)]
        command: device::DeviceCommand,
    },
    /// Check that this host can run VMs and say how to fix what is missing.
    Doctor,
    /// Benchmarks (`vmm bench --help`): runs the `vmm-bench` program
    /// installed next to `vmm` (built with `cargo build -p vmm-bench`).
    #[command(disable_help_flag = true)]
    Bench {
        /// What `vmm-bench` takes: boot, start, agent, fork, snapshot, fs, net, confinement.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Which VM a command is for.
#[derive(clap::Args)]
struct Target {
    /// The VM's name (`vmm launch --name`, or a fork child's).
    #[arg(required_unless_present = "api_socket", conflicts_with = "api_socket")]
    name: Option<String>,
    /// Or the VM's control socket (`vmm launch --api-socket`).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

impl Target {
    /// The control socket of the VM this names.
    fn api_socket(&self) -> Result<PathBuf, vmm::names::Error> {
        match (&self.api_socket, &self.name) {
            (Some(path), _) => Ok(path.clone()),
            (None, name) => {
                let name = name.as_deref().unwrap_or_default();
                let registry = vmm::names::registry()?;
                let entry = vmm::names::lookup(&registry, name)?;
                Ok(vmm::names::entry_api_socket(&registry, &entry))
            }
        }
    }
}

#[derive(clap::Args, Clone)]
struct ExecArgs {
    /// Environment variables for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the guest (default: the image's, else /).
    #[arg(long)]
    cwd: Option<String>,
    /// Run as this user: NAME, UID, NAME:GROUP or UID:GID (default: the
    /// image's, else root).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Stream this process's standard input to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// The command and its arguments.
    #[arg(last = true)]
    argv: Vec<String>,
}

impl ExecArgs {
    fn to_exec(&self) -> Result<vmm::agent::Exec, String> {
        if self.argv.is_empty() {
            return Err("no command: give it after `--` (vmm exec -- CMD ARGS...)".into());
        }
        let mut env = std::collections::BTreeMap::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--env {kv}: expected K=V"))?;
            env.insert(k.to_string(), v.to_string());
        }
        Ok(vmm::agent::Exec {
            argv: self.argv.clone(),
            env,
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout: self.timeout.map(std::time::Duration::from_secs_f64),
            root: None,
            mounts: Vec::new(),
            isolation: None,
        })
    }

    /// Runs the command through `agent`, streaming to this process's stdio.
    fn run(&self, agent: &vmm::agent::AgentClient) -> ExitCode {
        let exec = match self.to_exec() {
            Ok(e) => e,
            Err(e) => return fail(e),
        };
        let stdin: Option<Box<dyn std::io::Read + Send>> = if self.interactive {
            Some(Box::new(std::io::stdin()))
        } else {
            None
        };
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        match agent.exec(&exec, stdin, &mut out, &mut err) {
            Ok(status) => ExitCode::from(status.shell_code().clamp(0, 255) as u8),
            Err(e) => fail(e),
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(1)
}

/// Prints a listing (`vmm ps`, `vmm template ls`): `rows` as JSON, or a
/// table of `header` and each row's `line`.
fn print_listing<R: serde::Serialize>(
    json: bool,
    rows: Vec<R>,
    header: &str,
    line: impl Fn(R) -> String,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
    } else {
        println!("{header}");
        for r in rows {
            println!("{}", line(r));
        }
    }
    ExitCode::SUCCESS
}

/// What `vmm launch` was given.
#[derive(clap::Args)]
struct LaunchArgs {
    /// The VM configuration (docs/config.md). With --name and without
    /// it: `vmm run`'s defaults (the Debian root disk, the agent). With
    /// --template: the host-side settings (default: the template's).
    #[arg(long, required_unless_present_any = ["name", "template"])]
    config: Option<PathBuf>,
    /// Start from this template (`vmm template create`) instead of
    /// booting; needs --api-socket or --name.
    #[arg(long)]
    template: Option<String>,
    /// Write a JSON report (exit reason, boot timings) here when the VM ends.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Serve the control API here (docs/api.yaml) and keep the VM running
    /// for `vmm exec`; adds a vsock device at `<PATH>.vsock` if the config
    /// has none.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Name the VM, so other commands find it by name (`vmm exec NAME`,
    /// `vmm ps`); its sockets and console go into this user's private
    /// runtime directory.
    #[arg(long, conflicts_with = "api_socket")]
    name: Option<String>,
    /// With --name: run the VM in the background and return once it
    /// runs (its messages go to `<runtime dir>/vms/NAME.log`).
    #[arg(long, short = 'd', requires = "name")]
    detach: bool,
    /// Run without seccomp filters (docs/security.md). For debugging
    /// only: it takes a layer of the boundary away.
    #[arg(long)]
    no_seccomp: bool,
    /// Run the VMM in a jail (docs/security.md): its own namespaces, a
    /// private root with only what the VM uses, no capabilities. The same
    /// as `"jail": {}` in the config.
    #[arg(long)]
    jail: bool,
}

fn launch(args: LaunchArgs, start: Instant) -> ExitCode {
    if let (Some(name), true) = (&args.name, args.detach) {
        return named::detach(
            name,
            args.config.as_deref(),
            args.report.as_deref(),
            args.no_seccomp,
            args.jail,
            args.template.as_deref(),
        );
    }
    if let Some(name) = args.template.clone() {
        return launch_template(&name, args, start);
    }
    let mut config = match &args.config {
        Some(path) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
        // Only with --name: what `vmm run` boots (the agent added below).
        None => VmConfig::default(),
    };
    config.seccomp &= !args.no_seccomp;
    if args.jail {
        config.jail.get_or_insert_with(Default::default);
    }
    // A named VM holds its name until it ends.
    let (_claim, api_socket) = match &args.name {
        Some(name) => match named::register(name, &mut config) {
            Ok((claim, api)) => (Some(claim), Some(api)),
            Err(e) => return fail(e),
        },
        None => (None, args.api_socket),
    };
    if let Some(api) = &api_socket {
        let vsock = PathBuf::from(format!("{}.vsock", api.display()));
        match args.config {
            Some(_) => config.ensure_vsock(vsock),
            None => config.ensure_agent(vsock),
        }
    }
    let hv = match vmm::open_hypervisor() {
        Ok(hv) => hv,
        Err(e) => return fail(e),
    };
    if config.jail.is_some() {
        let jailed = vmm::Vm::boot_files(&config, hv.as_ref())
            .map_err(Into::into)
            .and_then(|(files, base)| {
                jail(
                    &mut config,
                    &files,
                    base.as_deref(),
                    api_socket.as_deref(),
                    args.report.as_deref(),
                )
            });
        if let Err(e) = jailed {
            return fail(e);
        }
    }
    match vmm::Vm::build(&config, hv.as_ref(), start) {
        Ok(vm) => run_vm(vm, api_socket, args.report),
        Err(e) => fail(e),
    }
}

/// `vmm launch --template NAME`: restores the template as a new VM with
/// the host-side settings of --config (or the template's own).
fn launch_template(name: &str, args: LaunchArgs, start: Instant) -> ExitCode {
    let config = match args.config.as_deref().map(VmConfig::from_file).transpose() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (t, config) = match template::for_run(name, config) {
        Ok(found) => found,
        Err(e) => return fail(e),
    };
    // The root disk and the agent's vsock device, as the template has.
    let mut config = vmm::template::sandbox_config(&config);
    if args.jail {
        config.jail.get_or_insert_with(Default::default);
    }
    // A named VM holds its name until it ends.
    let (_claim, api_socket) = match (&args.name, args.api_socket) {
        (Some(vm), _) => match named::register(vm, &mut config) {
            Ok((claim, api)) => (Some(claim), api),
            Err(e) => return fail(e),
        },
        (None, Some(api)) => (None, api),
        (None, None) => {
            return fail("--template needs --api-socket or --name: the restored VM is driven through its control socket")
        }
    };
    let opts = vmm::snapshot::RestoreOptions {
        vsock_socket: PathBuf::from(format!("{}.vsock", api_socket.display())),
        host: vmm::snapshot::host::HostSettings {
            config: Some(config),
            trust_snapshot_config: false,
        },
        key: None,
    };
    let flags = RestoreFlags {
        no_seccomp: args.no_seccomp,
        jail: args.jail,
    };
    restore(
        &t.snapshot_dir(),
        &opts,
        flags,
        api_socket,
        args.report,
        start,
    )
}

/// Jails this process for the VM of `config`, which reads `files` and the
/// disk's `base` image (returns in the jailed VMM; the launcher exits
/// with its status).
fn jail(
    config: &mut VmConfig,
    files: &[PathBuf],
    base: Option<&std::path::Path>,
    api_socket: Option<&std::path::Path>,
    report: Option<&std::path::Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let plan = jail_plan(config, files, base, api_socket, report)?;
    vmm::jail::enter(&plan)?;
    Ok(())
}

/// What [`jail`] enters: the plan of the VM of `config`, its sockets'
/// folders writable.
fn jail_plan(
    config: &mut VmConfig,
    files: &[PathBuf],
    base: Option<&std::path::Path>,
    api_socket: Option<&std::path::Path>,
    report: Option<&std::path::Path>,
) -> Result<vmm::jail::Plan, vmm::jail::Error> {
    vmm::jail::prepare(config);
    let mut sockets: Vec<&std::path::Path> = api_socket.into_iter().collect();
    if let Some(v) = &config.vsock {
        sockets.push(&v.uds_path);
    }
    vmm::jail::Plan::for_vm(config, files, base, &sockets, report)
}

/// Whether `e` says the host forbids the jail's namespaces (nothing was
/// changed then: the process may go on unjailed).
fn is_namespace_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        e.downcast_ref::<vmm::jail::Error>(),
        Some(vmm::jail::Error::Namespaces(_))
    )
}

/// `vmm restore`'s switches.
struct RestoreFlags {
    no_seccomp: bool,
    jail: bool,
}

fn restore(
    snapshot: &std::path::Path,
    opts: &vmm::snapshot::RestoreOptions,
    flags: RestoreFlags,
    api_socket: PathBuf,
    report: Option<PathBuf>,
    start: Instant,
) -> ExitCode {
    let mut source = match vmm::snapshot::restore_source(snapshot, opts) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let config = &mut source.state.config;
    config.seccomp &= !flags.no_seccomp;
    if flags.jail {
        config.jail.get_or_insert_with(Default::default);
    }
    let hv = match vmm::open_hypervisor() {
        Ok(hv) => hv,
        Err(e) => return fail(e),
    };
    if source.state.config.jail.is_some() {
        // The memory and the disk's layer are open already: the jail
        // needs the base image and the folders the VMM writes to.
        let jailed = vmm::Vm::restore_base(&source)
            .map_err(Into::into)
            .and_then(|base| {
                jail(
                    &mut source.state.config,
                    &[],
                    base.as_deref(),
                    Some(&api_socket),
                    report.as_deref(),
                )
            });
        if let Err(e) = jailed {
            return fail(e);
        }
    }
    match vmm::Vm::restore(source, hv.as_ref(), start) {
        Ok(vm) => run_vm(vm, Some(api_socket), report),
        Err(e) => fail(e),
    }
}

/// Runs a built VM until it ends, stopping on SIGINT/SIGTERM; exits with
/// its status.
fn run_vm(vm: vmm::Vm, api_socket: Option<PathBuf>, report: Option<PathBuf>) -> ExitCode {
    let stop = match vmm::signals::install() {
        Ok(evt) => evt,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    let opts = vmm::RunOptions {
        stop_evt: Some(stop),
        api_socket,
        on_started: Some(Box::new(|_| named::notify_started())),
        ..Default::default()
    };
    let outcome = match vm.run(opts) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if let Some(path) = report {
        let json = outcome.report_json();
        if let Err(e) = std::fs::write(&path, json.to_string()) {
            eprintln!("vmm: cannot write the report {}: {e}", path.display());
        }
    }
    let code = outcome.reason.exit_code();
    if outcome.reason.is_clean() {
        tracing::info!("{}", outcome.reason);
    } else {
        eprintln!("vmm: error: {}", outcome.reason);
    }
    ExitCode::from(code as u8)
}

/// One action on the VM `target`; prints its answer as JSON when it has
/// one.
fn control(target: &Target, action: vmm::action::Action) -> ExitCode {
    let api = match target.api_socket() {
        Ok(path) => vmm::api::ApiClient::new(&path),
        Err(e) => return fail(e),
    };
    match api.perform(action) {
        Ok(reply) => {
            let (_, body) = reply.to_http();
            if !body.is_null() {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn exec(cmd: &ExecArgs, target: &Target) -> ExitCode {
    let api = match target.api_socket() {
        Ok(path) => vmm::api::ApiClient::new(&path),
        Err(e) => return fail(e),
    };
    // A VM just launched may still be booting: wait for its agent.
    if let Err(e) = api.wait_agent() {
        return fail(e);
    }
    match api.vsock_path() {
        Ok(uds) => cmd.run(&vmm::agent::AgentClient::new(&uds)),
        Err(e) => fail(e),
    }
}

fn stop(target: &Target, force: bool) -> ExitCode {
    let api = match target.api_socket() {
        Ok(path) => vmm::api::ApiClient::new(&path),
        Err(e) => return fail(e),
    };
    // A named VM's process is known: `stop` returns once it has ended.
    let entry = target.name.as_deref().and_then(named::entry);
    let ended = |timeout| entry.as_ref().is_none_or(|e| e.wait_exit(timeout));
    let vm = match api.describe() {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    // A clean stop when the agent serves: the guest syncs its disks and
    // powers off. Otherwise (or with --force) the VMM stops the VM at once.
    if let (false, Some(vsock), vmm::action::AgentState::Ready) = (force, &vm.vsock, vm.agent) {
        match vmm::agent::AgentClient::new(&vsock.uds_path).shutdown() {
            Ok(()) if ended(STOP_GRACE) => return ExitCode::SUCCESS,
            Ok(()) => eprintln!(
                "vmm: the guest did not power off within {} s; stopping the VM",
                STOP_GRACE.as_secs()
            ),
            Err(e) => eprintln!("vmm: the guest agent did not shut down ({e}); stopping the VM"),
        }
    }
    match api.stop() {
        Ok(()) if ended(STOP_GRACE) => ExitCode::SUCCESS,
        Ok(()) => fail(format!(
            "the VMM was told to stop but still runs after {} s",
            STOP_GRACE.as_secs()
        )),
        // Powered off meanwhile.
        Err(_) if entry.as_ref().is_some_and(|e| !e.alive()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// How long `vmm stop NAME` waits for a VM to end.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// `vmm bench ARGS`: runs `vmm-bench ARGS` (next to this executable, else
/// on PATH) in place of this process.
fn bench(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let next_to_us = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("vmm-bench")))
        .filter(|p| p.exists());
    let program = next_to_us.unwrap_or_else(|| PathBuf::from("vmm-bench"));
    let err = std::process::Command::new(&program).args(args).exec();
    fail(format!(
        "cannot run the benchmarks' program {}: {err}; build it with `cargo build -p vmm-bench` (it goes next to vmm)",
        program.display()
    ))
}

fn main() -> ExitCode {
    // Boot timings count from here: the first thing the process does.
    let start = Instant::now();
    // A fork child (started by a forking VMM, not by users).
    vmm::fork_child::run_child_if_asked();
    let cli = Cli::parse();
    vmm::init_logging();
    match cli.command {
        Command::Launch(args) => launch(args, start),
        Command::Exec { cmd, target } => exec(&cmd, &target),
        Command::Run {
            config,
            template,
            image,
            cold,
            no_seccomp,
            no_jail,
            cmd,
        } => {
            let start = match (template, cold) {
                (Some(name), _) => run::RunStart::Template(name),
                (None, true) => run::RunStart::Cold,
                (None, false) => run::RunStart::Default,
            };
            let how = run::RunHow {
                start,
                image,
                no_seccomp,
                no_jail,
            };
            run::run(config, how, &cmd)
        }
        Command::Template { command } => template::command(command),
        Command::Image { command } => image::command(command),
        Command::Serve(args) => serve::serve(args),
        Command::Mcp(args) => serve::mcp(args),
        Command::Device { command } => device::command(command),
        Command::Stop { target, force } => stop(&target, force),
        Command::Pause { target } => control(&target, Action::Pause),
        Command::Resume { target } => control(&target, Action::Resume),
        Command::Egress {
            target,
            default,
            allow,
            deny,
        } => {
            let default = match default.as_str() {
                "deny" => vmm::config::EgressDefault::Deny,
                _ => vmm::config::EgressDefault::Allow,
            };
            let egress = vmm::config::EgressConfig {
                default,
                allow,
                deny,
            };
            control(&target, Action::SetEgress(egress))
        }
        Command::Snapshot {
            target,
            out,
            snapshot_key,
        } => {
            // The VMM resolves relative paths against its own directory.
            let out = std::path::absolute(&out).unwrap_or(out);
            let key = match snapshot_key.as_deref().map(vmm::snapshot::auth::read_key) {
                None => None,
                Some(Ok(key)) => Some(key),
                Some(Err(e)) => return fail(e),
            };
            control(&target, Action::Snapshot(SnapshotRequest { dir: out, key }))
        }
        Command::Ps { json } => named::ps(json),
        Command::Logs { name } => named::logs(&name),
        Command::Restore {
            snapshot,
            api_socket,
            vsock_socket,
            config,
            trust_snapshot_config,
            snapshot_key,
            report,
            no_seccomp,
            jail,
        } => {
            let vsock_socket = vsock_socket
                .unwrap_or_else(|| PathBuf::from(format!("{}.vsock", api_socket.display())));
            let host = vmm::snapshot::host::HostSettings {
                config: match config.as_deref().map(VmConfig::from_file).transpose() {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                },
                trust_snapshot_config,
            };
            let key = match snapshot_key.as_deref().map(vmm::snapshot::auth::read_key) {
                None => None,
                Some(Ok(key)) => Some(key),
                Some(Err(e)) => return fail(e),
            };
            let opts = vmm::snapshot::RestoreOptions {
                vsock_socket,
                host,
                key,
            };
            let flags = RestoreFlags { no_seccomp, jail };
            restore(&snapshot, &opts, flags, api_socket, report, start)
        }
        Command::Fork {
            target,
            count,
            prefix,
            dir,
        } => match prefix.as_deref().or(target.name.as_deref()) {
            // Children named after their parent, unless --dir asks for
            // unnamed ones somewhere else.
            Some(prefix) if dir.is_none() => match target.api_socket() {
                Ok(api) => named::fork(&api, target.name.as_deref(), prefix, count),
                Err(e) => fail(e),
            },
            _ => {
                let dir = dir.map(|d| std::path::absolute(&d).unwrap_or(d));
                let names = None;
                control(&target, Action::Fork(ForkRequest { count, dir, names }))
            }
        },
        Command::Doctor => {
            let report = vmm::doctor::run();
            print!("{report}");
            if report.can_launch() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Bench { args } => bench(&args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
