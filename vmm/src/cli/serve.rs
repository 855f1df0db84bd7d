//! `vmm serve`: the E2B-compatible sandbox server (docs/agents.md).

use std::net::SocketAddr;
use std::process::{Command, ExitCode};

use super::fail;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where to listen: one port for both E2B APIs.
    #[arg(long, default_value = vmm::serve::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The API key clients must send (X-API-Key); default: the one in
    /// ~/.config/vmm/serve.key, made on first start.
    #[arg(long)]
    api_key: Option<String>,
    /// Run sandboxes without the jail (docs/security.md).
    #[arg(long)]
    no_jail: bool,
    /// Do not build the `base` template (E2B's default) when it is missing.
    #[arg(long)]
    no_base: bool,
    /// Spare sandboxes kept started and warm per template, so a create
    /// takes one at once (0: none; each costs a running VM's memory)
    #[arg(long, default_value_t = 1)]
    warm: usize,
    /// Seconds a paused sandbox stays in memory; then it is snapshotted to
    /// disk and its VMM ends, until a connect restores it (0: never)
    #[arg(long, default_value_t = 600)]
    keep_paused: u64,
}

#[derive(clap::Args)]
pub struct McpArgs {
    /// Run sandboxes without the jail (docs/security.md).
    #[arg(long)]
    no_jail: bool,
    /// Do not build the `base` template (the default one) when it is missing.
    #[arg(long)]
    no_base: bool,
    /// Spare sandboxes kept started and warm per template, so a create
    /// takes one at once (0: none; each costs a running VM's memory)
    #[arg(long, default_value_t = 1)]
    warm: usize,
}

/// `vmm mcp`: the MCP server on stdio (docs/agents.md). Standard output
/// is the protocol's: messages go to standard error.
pub fn mcp(args: McpArgs) -> ExitCode {
    if !args.no_base {
        if let Err(e) = ensure_base() {
            return fail(e);
        }
    }
    match vmm::serve::run_mcp(vmm::serve::sandboxes::Settings {
        jail: !args.no_jail,
        warm: args.warm,
        keep_paused: None,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

pub fn serve(args: ServeArgs) -> ExitCode {
    if !args.no_base {
        if let Err(e) = ensure_base() {
            return fail(e);
        }
    }
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "vmm serve: warning: listening on {}, not loopback: the API is plain HTTP, so its key crosses the network in clear; put a TLS proxy in front",
            args.listen
        );
    }
    let opts = vmm::serve::Options {
        listen: args.listen,
        api_key: args.api_key,
        sandboxes: vmm::serve::sandboxes::Settings {
            jail: !args.no_jail,
            warm: args.warm,
            keep_paused: (args.keep_paused > 0)
                .then(|| std::time::Duration::from_secs(args.keep_paused)),
        },
    };
    let ran = vmm::serve::run(opts, |addr, key| {
        eprintln!("vmm serve: listening on http://{addr}; point an E2B SDK at it with:");
        println!("export E2B_API_URL=http://{addr}");
        println!("export E2B_SANDBOX_URL=http://{addr}");
        println!("export E2B_API_KEY={key}");
    });
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Builds the `base` template when it is missing, and again when what it
/// was built from changed (a rebuilt kernel, initramfs or base image) or
/// it has no network (one built before sandboxes had one), in a process
/// of its own: this one stays free of VM threads. It has the user-mode
/// network (E2B sandboxes reach the internet by default; a create's or an
/// update's rules narrow it), and its warm-up runs what the E2B SDKs run
/// first (a login shell, Python), so their first command finds it in
/// memory.
fn ensure_base() -> Result<(), String> {
    use vmm::template::{self, Template};
    let name = vmm::serve::DEFAULT_TEMPLATE;
    let flag = match Template::open(name).and_then(|t| t.fit(None).map(|c| c.network)) {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => {
            eprintln!("vmm serve: rebuilding the template {name} with a network");
            "--replace"
        }
        Err(template::Error::NoSuchTemplate(_)) => "--if-missing",
        Err(template::Error::Stale { changes, .. }) => {
            eprintln!(
                "vmm serve: rebuilding the template {name}: {}",
                changes.join("; ")
            );
            "--replace"
        }
        Err(e) => return Err(format!("{e} (or start with --no-base)")),
    };
    let scratch = vmm::runtime::RuntimeDir::create("serve-base").map_err(|e| e.to_string())?;
    let config = scratch.path().join("config.json");
    std::fs::write(&config, vmm::serve::BASE_CONFIG)
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmm binary: {e}"))?;
    let status = Command::new(exe)
        .args(["template", "create", name, flag, "--config"])
        .arg(&config)
        .arg("--warmup")
        .arg(vmm::serve::WARMUP)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot build the template {name}: {e}"))?;
    match status.success() {
        true => Ok(()),
        false => Err(format!(
            "building the template {name} failed ({status}); see above, or start with --no-base"
        )),
    }
}
