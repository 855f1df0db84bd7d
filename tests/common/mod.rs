//! Helpers shared by the integration tests: run the `vmm` binary on a
//! config and collect its output and launch report.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::action::Control;

pub mod netns;
pub mod shares;

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Says that (part of) a test was skipped, and why, where the test
/// harness does not hide it: straight to standard error, which the
/// harness captures only through `eprintln!`.
pub fn skipped(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `cmd` from a thread that lives as long as this test process,
/// with `signal` sent to it when the process ends (PR_SET_PDEATHSIG
/// follows the thread that spawned): statics are never dropped, so this
/// is what stops a VM or server that tests share.
pub fn spawn_for_the_tests(mut cmd: Command, signal: i32) -> std::io::Result<Child> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: die_with_parent is async-signal-safe and touches
        // nothing of the parent's memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let _ = vmm_os::process::die_with_parent(signal);
                Ok(())
            });
        }
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(std::io::Error::other)?
}

/// Result of one `vmm launch`.
pub struct Launch {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<serde_json::Value>,
}

impl Launch {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.output.status, self.stdout, self.stderr
        )
    }
}

/// Runs `vmm launch` on `config` (JSON text) and waits for it to end.
pub fn launch(scratch: &Scratch, config: &str) -> Launch {
    let config_path = scratch.file("vm.json", config);
    launch_file(scratch, &config_path)
}

pub fn launch_file(scratch: &Scratch, config_path: &Path) -> Launch {
    let report = scratch.path("report.json");
    let _ = std::fs::remove_file(&report);
    let output = Command::new(VMM)
        .arg("launch")
        .arg("--config")
        .arg(config_path)
        .arg("--report")
        .arg(&report)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vmm");
    Launch {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        report: std::fs::read_to_string(&report)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok()),
        output,
    }
}

/// A VM with a root disk and an API socket, booted for a whole test file
/// and killed with the test process.
pub struct Guest {
    pub scratch: Scratch,
    pub api: PathBuf,
    pub process: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Guest {
    /// Launches `config` with an API socket in `scratch` and waits for the
    /// guest agent.
    pub fn boot(scratch: Scratch, config: &serde_json::Value) -> Guest {
        Self::boot_with(scratch, config, &[])
    }

    /// `boot`, with the VMM started through `wrapper` (for example
    /// `ip netns exec NAME`).
    pub fn boot_with(scratch: Scratch, config: &serde_json::Value, wrapper: &[&str]) -> Guest {
        let config_path = scratch.file("vm.json", &config.to_string());
        let api = scratch.path("api.sock");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(VMM),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(VMM);
                c
            }
        };
        cmd.args(["launch", "--config"])
            .arg(&config_path)
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null());
        let process = spawn_for_the_tests(cmd, libc::SIGKILL).unwrap();
        let mut guest = Guest {
            scratch,
            api,
            process,
        };
        // The API socket appears within milliseconds of the VMM's start;
        // then the call waits for the guest agent by itself.
        loop {
            match vmm::api::ApiClient::new(&guest.api).wait_agent() {
                Ok(()) => break,
                Err(vmm::api::Error::Connect { .. }) => {
                    let status = guest.process.try_wait().unwrap();
                    assert!(status.is_none(), "the VMM ended: {status:?}");
                }
                Err(e) => panic!("the guest agent did not come up: {e}"),
            }
        }
        guest
    }

    /// Runs `script` with `sh -c` in the guest.
    pub fn sh(&self, script: &str) -> Output {
        exec(&self.api, script)
    }

    /// After a hostile action: the VMM still answers `GET /vm` within 1 s,
    /// its own resident memory (everything outside the guest RAM mapping) is under
    /// [`MAX_OWN_RSS_MIB`], and the guest agent still runs a command.
    pub fn assert_healthy(&self, after: &str) {
        let client = vmm::api::ApiClient::new(&self.api);
        let start = Instant::now();
        let vm = client.describe();
        let took = start.elapsed();
        assert!(vm.is_ok(), "after {after}: GET /vm failed: {vm:?}");
        assert!(
            took < Duration::from_secs(1),
            "after {after}: GET /vm took {took:?}"
        );
        // Not RssAnon: once the VM has been forked, guest pages it writes
        // are private copies of the frozen memory file and count as anon.
        let rss = vmm::memory::overhead_rss_kib_of(&self.process.id().to_string())
            .expect("the VMM's /proc/PID/smaps")
            / 1024;
        eprintln!("after {after}: GET /vm {took:?}, VMM's own memory {rss} MiB");
        assert!(
            rss < MAX_OWN_RSS_MIB,
            "after {after}: the VMM holds {rss} MiB of its own (bound {MAX_OWN_RSS_MIB} MiB)"
        );
        assert_eq!(ok(self.sh("echo alive")), "alive", "after {after}");
    }
}

/// The VMM's own resident memory (heap and stacks, not guest memory) may
/// not pass this, whatever the guest does.
pub const MAX_OWN_RSS_MIB: u64 = 96;

/// `vmm exec --api-socket api -- sh -c script`, waiting for the VMM's API
/// socket to appear first (the VMM creates it within milliseconds).
pub fn exec(api: &Path, script: &str) -> Output {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    loop {
        let out = Command::new(VMM)
            .arg("exec")
            .arg("--api-socket")
            .arg(api)
            // A guest command stuck for good fails its test instead of
            // holding the suite (the slowest, 64 MiB through a share, takes
            // about 4 minutes on PVM hosts).
            .args(["--timeout", "900"])
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("cannot reach") || Instant::now() > deadline {
            // Where a test file spends its time (seen with --nocapture).
            let took = start.elapsed();
            if took > Duration::from_secs(20) {
                let head: String = script.chars().take(60).collect();
                eprintln!("exec took {took:.1?}: {head:?}");
            }
            return out;
        }
    }
}

/// `vmm ARGS...` with no standard input; its output.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The SHA-256 of `data`, in hex (as `sha256sum` prints it).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The SHA-256 of the file at `path`, in hex, read in pieces.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", describe(&out));
    text(&out)
}

/// Forks the VM behind `api` into `count` children: (id, API socket, pid).
pub fn fork(api: &Path, count: u32) -> Vec<(String, PathBuf, u32)> {
    let answer = vmm::api::ApiClient::new(api).fork(count, None).unwrap();
    assert_eq!(answer.children.len(), count as usize, "{answer:?}");
    answer
        .children
        .into_iter()
        .map(|c| (c.id, c.api_socket, c.pid))
        .collect()
}

/// Stops a VM at once and waits until its process is gone.
pub fn stop_now(api: &Path, pid: u32) {
    vmm::api::ApiClient::new(api).stop().unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The parent reaps its children: the /proc entry goes away then.
    while proc_dir.exists() {
        assert!(Instant::now() < deadline, "process {pid} did not end");
        std::thread::yield_now();
    }
}

/// The children of process `pid` (all its threads').
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// The folder of the official clients of one kind (`python`: a virtual
/// environment from tests/python/requirements.txt; `node`: node_modules
/// from tests/node/package.json), made once by tools/client-env.sh and
/// cached outside the repository. Panics with the reason when they cannot
/// be installed (no python3 or npm, no network to the registry).
pub fn client_env(kind: &str) -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/client-env.sh");
    let out = Command::new(script)
        .arg(kind)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {kind} failed: {}",
        describe(&out)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Waits until process `pid` (any, not only a child) has ended, at most
/// `timeout`; false if it still runs then.
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let fd = match vmm_os::process::exit_fd(pid) {
        Ok(fd) => fd,
        // ESRCH: it has ended (and was reaped) already.
        Err(e) => return e.raw_os_error() == Some(libc::ESRCH),
    };
    vmm_os::process::ended_within(&fd, timeout)
}
