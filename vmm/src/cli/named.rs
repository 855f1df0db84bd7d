//! The CLI's named-VM commands: `launch --name [--detach]`, `ps`, `logs`,
//! and the naming of fork children (docs/names in README, `vmm::names`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use serde::Serialize;
use vmm::action::{Control, ForkRequest, VmState};
use vmm::api::ApiClient;
use vmm::config::{SerialOutput, VmConfig};
use vmm::names::{self, Claim, Entry};

use super::fail;

/// Set in the environment of a detached launch: the VMM prints `ready` on
/// its standard output once the VM runs.
const NOTIFY_ENV: &str = "VMM_LAUNCH_NOTIFY";

/// How long `ps` waits for each VM's answer.
const PS_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes `name` for this process: the VM's control socket and (when the
/// config sends the console to stdout) its console file go into the
/// registry, or for a jailed VM into its folder there. Returns the claim
/// (held while the VM runs) and the socket.
pub fn register(name: &str, config: &mut VmConfig) -> Result<(Claim, PathBuf), names::Error> {
    names::check_name(name)?;
    let registry = names::registry()?;
    let (api_socket, console_file) = match config.jail {
        Some(_) => {
            let dir = names::jail_folder(&registry, name)?;
            (dir.join("api.sock"), dir.join("console"))
        }
        None => (
            names::api_socket(&registry, name),
            names::console_file(&registry, name),
        ),
    };
    let console = match &config.serial {
        SerialOutput::Stdout => {
            let file = console_file;
            config.serial = SerialOutput::File(file.clone());
            Some(file)
        }
        SerialOutput::File(f) => Some(f.clone()),
        SerialOutput::Off => None,
    };
    let mut entry = Entry::new(name, std::process::id(), None, console);
    entry.api_socket = config.jail.as_ref().map(|_| api_socket.clone());
    let claim = names::claim(&registry, entry)?;
    Ok((claim, api_socket))
}

/// The live VM called `name`, if there is one.
pub fn entry(name: &str) -> Option<Entry> {
    names::registry().and_then(|r| names::lookup(&r, name)).ok()
}

/// Called once the VM runs: tells a waiting `launch --detach`.
pub fn notify_started() {
    if std::env::var_os(NOTIFY_ENV).is_none() {
        return;
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready").and_then(|()| out.flush());
    // Nobody reads this pipe any more: standard output goes nowhere.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 of two descriptors this process owns.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// `vmm launch --name NAME --detach`: starts the same launch in the
/// background, in a session of its own, and returns once the VM runs.
pub fn detach(
    name: &str,
    config: Option<&Path>,
    report: Option<&Path>,
    no_seccomp: bool,
    jail: bool,
    template: Option<&str>,
) -> ExitCode {
    let registry = match names::check_name(name).and_then(|()| names::registry()) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // A running VM of that name keeps its log: refuse before touching it.
    if let Ok(held) = names::lookup(&registry, name) {
        return fail(names::Error::InUse {
            name: name.to_string(),
            pid: held.pid,
        });
    }
    let log_path = registry.join(format!("{name}.log"));
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
    };
    let log = match log {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot create {}: {e}", log_path.display())),
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot find the vmm binary: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["launch", "--name", name]);
    if let Some(c) = config {
        cmd.arg("--config")
            .arg(std::path::absolute(c).unwrap_or(c.to_path_buf()));
    }
    if let Some(r) = report {
        cmd.arg("--report")
            .arg(std::path::absolute(r).unwrap_or(r.to_path_buf()));
    }
    if no_seccomp {
        cmd.arg("--no-seccomp");
    }
    if jail {
        cmd.arg("--jail");
    }
    if let Some(t) = template {
        cmd.args(["--template", t]);
    }
    cmd.env(NOTIFY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent: the VM leaves this terminal's session (Ctrl-C here does
        // not stop it).
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the VMM: {e}")),
    };
    eprintln!(
        "vmm: starting {name} in the background (log: {})",
        log_path.display()
    );
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() != "ready" {
        let status = child.wait();
        let said = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprint!("{said}");
        return fail(format!(
            "the VM {name:?} did not start ({}); its log is {}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            log_path.display()
        ));
    }
    let started = serde_json::json!({
        "name": name,
        "pid": child.id(),
        "api_socket": names::lookup(&registry, name)
            .map_or_else(|_| names::api_socket(&registry, name), |e| names::entry_api_socket(&registry, &e)),
        "log": log_path,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&started).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// One row of `vmm ps`.
#[derive(Serialize)]
struct Row {
    name: String,
    pid: u32,
    /// running, paused, or unreachable (the process runs but its control
    /// socket did not answer within 2 s).
    state: String,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    uptime_s: u64,
    parent: Option<String>,
}

pub fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// `vmm ps [--json]`.
pub fn ps(json: bool) -> ExitCode {
    let listed = names::registry().and_then(|r| Ok((names::list(&r)?, r)));
    let (entries, registry) = match listed {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let rows: Vec<Row> = entries
        .into_iter()
        .map(|e| {
            let api = names::entry_api_socket(&registry, &e);
            let vm = ApiClient::new(&api)
                .with_timeout(PS_TIMEOUT)
                .describe()
                .ok();
            Row {
                state: match vm.as_ref().map(|v| v.state) {
                    Some(VmState::Running) => "running",
                    Some(VmState::Paused) => "paused",
                    None => "unreachable",
                }
                .to_string(),
                vcpus: vm.as_ref().map(|v| v.vcpus),
                memory_mib: vm.as_ref().map(|v| v.memory_mib),
                uptime_s: e.uptime_s(),
                name: e.name,
                pid: e.pid,
                parent: e.parent,
            }
        })
        .collect();
    let dash = || "-".to_string();
    let header = format!(
        "{:<20} {:>8} {:<11} {:>5} {:>8} {:>8}  PARENT",
        "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME"
    );
    super::print_listing(json, rows, &header, |r| {
        format!(
            "{:<20} {:>8} {:<11} {:>5} {:>8} {:>8}  {}",
            r.name,
            r.pid,
            r.state,
            r.vcpus.map_or_else(dash, |v| v.to_string()),
            r.memory_mib.map_or_else(dash, |m| format!("{m}M")),
            uptime(r.uptime_s),
            r.parent.unwrap_or_else(dash)
        )
    })
}

/// `vmm logs NAME`: the console output so far.
pub fn logs(name: &str) -> ExitCode {
    let entry = match names::registry().and_then(|r| names::lookup(&r, name)) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let Some(console) = entry.console else {
        return fail(format!(
            "the VM {name:?} keeps no console output (its config sets \"serial\": \"off\")"
        ));
    };
    match std::fs::File::open(&console) {
        Ok(mut f) => match std::io::copy(&mut f, &mut std::io::stdout()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(format!("cannot print {}: {e}", console.display())),
        },
        Err(e) => fail(format!("cannot read {}: {e}", console.display())),
    }
}

/// `vmm fork` with names: children `PREFIX-1`, `PREFIX-2`... registered
/// with their parent `parent` (when it has a name).
pub fn fork(api: &Path, parent: Option<&str>, prefix: &str, count: u32) -> ExitCode {
    let registry = match names::registry() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let parent_entry = parent.and_then(|p| names::lookup(&registry, p).ok());
    // The children's sockets go next to the parent's: the registry, or a
    // jailed parent's folder (its jail sees no other).
    let dir = match &parent_entry {
        Some(e) => names::entry_api_socket(&registry, e)
            .parent()
            .map_or_else(|| registry.clone(), Path::to_path_buf),
        None => registry.clone(),
    };
    let claims = match names::claim_series(&registry, prefix, count, parent) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let request = ForkRequest {
        count,
        dir: Some(dir.clone()),
        names: Some(claims.iter().map(|c| c.entry().name.clone()).collect()),
    };
    // On failure the claims are dropped: the names are free again.
    let info = match ApiClient::new(api).fork_with(request) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    for (claim, child) in claims.into_iter().zip(&info.children) {
        // A child's console is its parent's file with `.<id>` appended.
        let console = parent_entry
            .as_ref()
            .and_then(|e| e.console.as_ref())
            .map(|c| PathBuf::from(format!("{}.{}", c.display(), child.id)));
        // A jailed parent reports the jail's pid of its children.
        let pid = parent_entry
            .as_ref()
            .map_or(child.pid, |e| names::host_pid(e.pid, child.pid));
        let api = (dir != registry).then(|| child.api_socket.clone());
        if let Err(e) = claim.hand_over(pid, console, api) {
            eprintln!("vmm: child {} runs but is not registered: {e}", child.id);
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&info).unwrap_or_default()
    );
    ExitCode::SUCCESS
}
