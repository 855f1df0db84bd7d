//! `vmm bench serve`: the E2B path against `vmm exec`, and many sandboxes
//! under one `vmm serve` (issue goals: docs/agents.md).
//!
//! - `e2b`: the official E2B Python SDK, unchanged, runs
//!   tools/bench/e2b/serve_bench.py `one` against a `vmm serve`: create a
//!   sandbox from `base`, run `python3 -c 'print(1)'`, kill it. Timed from
//!   the script's spawn to its exit (what a user's `time python script.py`
//!   shows), and its phases as the script saw them;
//! - `exec`: `vmm exec --api-socket S -- python3 -c 'print(1)'` into a VM
//!   launched from the same `base` template and already running;
//! - `exec_as_sdk`: the same VM, the command as the SDK has the guest run
//!   it: `vmm exec -- /bin/bash -l -c "python3 -c 'print(1)'"` (the SDKs
//!   wrap every command in a login shell; the sandbox's default user, root,
//!   runs it);
//! - `template_as_sdk`: `vmm run --template base -- /bin/bash -l -c ...`:
//!   a sandbox started from the same template for that one command, with
//!   no server (what the server adds is the difference to `e2b`).
//!
//! The four take turns within each run. The server keeps `--warm N` spare
//! sandboxes per template (`vmm serve --warm`, default 1): the E2B run's
//! create takes one, and the bench waits until the server has started and
//! warmed its replacement before it times anything else. With `--many N`, the script's
//! `many N` mode then holds N sandboxes alive at once under the same
//! server, each answering a command, and the bench measures the memory of
//! the server's VMM processes while they are.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use crate::common::{
    kib_field, one_decimal, p50_p99, p50_ratio, percentile, private_kib_of, vmm_exe, Error, Report,
    ScratchDir, Stats,
};
use crate::vmm_process::{spawn_err, timed_vmm, Running};

/// The template `vmm serve` starts sandboxes from by default.
const TEMPLATE: &str = "base";
/// What the SDK has the guest run for `commands.run("python3 -c 'print(1)'")`.
const SDK_ARGV: [&str; 4] = ["/bin/bash", "-l", "-c", "python3 -c 'print(1)'"];
/// The client script, beside this crate's sources.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2b/serve_bench.py");
/// Installs the pinned SDK and prints its virtual environment.
const CLIENT_ENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../client-env.sh");

pub struct ServeBenchOptions {
    pub runs: u32,
    /// Sandboxes held alive at once, if any.
    pub many: Option<u32>,
    /// Of those, created (and driven) at a time.
    pub parallel: u32,
    /// The server's spares per template.
    pub warm: u32,
}

/// Results of `vmm bench serve`.
#[derive(Debug, Default)]
pub struct ServeBench {
    pub runs: u32,
    pub warm: u32,
    /// The SDK script, spawn to exit (ms).
    pub e2b_script_ms: Vec<f64>,
    /// Its phases as it timed them (ms): create, run, kill.
    pub e2b_create_ms: Vec<f64>,
    pub e2b_run_ms: Vec<f64>,
    pub e2b_kill_ms: Vec<f64>,
    /// `vmm exec` of the same command into a running VM (ms),
    pub exec_ms: Vec<f64>,
    /// and of what the SDK has the guest run for it.
    pub exec_as_sdk_ms: Vec<f64>,
    /// `vmm run --template` of what the SDK has the guest run (ms).
    pub template_as_sdk_ms: Vec<f64>,
    pub many: Option<Value>,
}

impl ServeBench {
    fn series(&self) -> [(&'static str, &[f64]); 7] {
        [
            ("e2b_script_ms", &self.e2b_script_ms),
            ("e2b_create_ms", &self.e2b_create_ms),
            ("e2b_run_ms", &self.e2b_run_ms),
            ("e2b_kill_ms", &self.e2b_kill_ms),
            ("exec_ms", &self.exec_ms),
            ("exec_as_sdk_ms", &self.exec_as_sdk_ms),
            ("template_as_sdk_ms", &self.template_as_sdk_ms),
        ]
    }

    /// The SDK script's p50 over another way's (the goal: at most 1.5
    /// over `vmm exec`).
    fn e2b_over(&self, other: &[f64]) -> Option<f64> {
        p50_ratio(&self.e2b_script_ms, other)
    }
}

impl Report for ServeBench {
    fn to_json(&self) -> Value {
        let mut out = json!({
            "runs": self.runs,
            "warm": self.warm,
            "e2b_script_over_exec": self.e2b_over(&self.exec_ms),
            "e2b_script_over_exec_as_sdk": self.e2b_over(&self.exec_as_sdk_ms),
            "e2b_script_over_template_as_sdk": self.e2b_over(&self.template_as_sdk_ms),
            "many": self.many,
        });
        for (name, v) in self.series() {
            out[name] = p50_p99(v);
        }
        out
    }

    fn table(&self) -> String {
        let mut out = format!(
            "serve benchmark: {} runs, {} spare(s) per template, python3 -c 'print(1)' (ms)\n{:<18} {:>10} {:>10}\n",
            self.runs, self.warm, "", "p50", "p99"
        );
        for (name, v) in self.series() {
            let cell = |p| one_decimal(percentile(v, p));
            out.push_str(&format!(
                "{name:<18} {:>10} {:>10}\n",
                cell(50.0),
                cell(99.0)
            ));
        }
        if let Some(r) = self.e2b_over(&self.exec_ms) {
            out.push_str(&format!("e2b_script_over_exec: {r} (goal: at most 1.5)\n"));
        }
        for (name, v) in [
            ("exec_as_sdk", &self.exec_as_sdk_ms),
            ("template_as_sdk", &self.template_as_sdk_ms),
        ] {
            if let Some(r) = self.e2b_over(v) {
                out.push_str(&format!("e2b_script_over_{name}: {r}\n"));
            }
        }
        if let Some(many) = &self.many {
            out.push_str(&format!(
                "many: {}\n",
                serde_json::to_string_pretty(many).unwrap_or_default()
            ));
        }
        out
    }
}

fn run_err(what: &'static str, run: u32) -> impl Fn(String) -> Error {
    move |detail| Error::Run { what, run, detail }
}

/// A `vmm serve` on a free port with a key of its own, stopped (SIGTERM:
/// it kills its sandboxes) when dropped.
struct Serve {
    process: Child,
    /// `E2B_API_URL`, `E2B_SANDBOX_URL`, `E2B_API_KEY`, as it printed them.
    env: Vec<(String, String)>,
}

impl Serve {
    fn start(exe: &Path, scratch: &ScratchDir, warm: u32) -> Result<Serve, Error> {
        // Its progress (the `base` template's build) goes to stderr.
        let mut process = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--warm",
                &warm.to_string(),
            ])
            .env("XDG_CONFIG_HOME", scratch.path().join("config"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(spawn_err(exe))?;
        let mut lines = BufReader::new(process.stdout.take().expect("piped")).lines();
        let mut env = Vec::new();
        while env.len() < 3 {
            let Some(Ok(line)) = lines.next() else {
                let _ = process.kill();
                let status = process.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(run_err("vmm serve", 0)(format!(
                    "it ended before it listened ({status})"
                )));
            };
            if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                env.push((k.to_string(), v.to_string()));
            }
        }
        Ok(Serve { process, env })
    }

    /// `python` with the SDK, pointed at this server.
    fn client(&self, venv: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.arg(SCRIPT).args(args).envs(self.env.iter().cloned());
        cmd
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Returns once the server starts no spare (`GET /vmm/pool?wait=1`).
    fn settle(&self, run: u32) -> Result<(), Error> {
        let fail = run_err("waiting for the spares", run);
        let addr = self
            .env_var("E2B_API_URL")
            .and_then(|u| u.strip_prefix("http://"))
            .ok_or_else(|| fail("the server printed no E2B_API_URL".into()))?;
        let key = self.env_var("E2B_API_KEY").unwrap_or_default();
        let mut stream = TcpStream::connect(addr).map_err(|e| fail(e.to_string()))?;
        let request = format!(
            "GET /vmm/pool?wait=1 HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| fail(e.to_string()))?;
        match answer.starts_with("HTTP/1.1 200") {
            true => Ok(()),
            false => Err(fail(format!("the server answered {answer:?}"))),
        }
    }

    /// Every process under the server (its sandboxes' VMMs).
    fn descendants(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut todo = vec![self.process.id()];
        while let Some(pid) = todo.pop() {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter();
            for task in tasks.flatten().flatten() {
                let text =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                for child in text.split_whitespace().filter_map(|p| p.parse().ok()) {
                    out.push(child);
                    todo.push(child);
                }
            }
        }
        out
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.process.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.process.wait();
    }
}

/// The pinned E2B SDK's virtual environment (installed on first use).
fn python_env() -> Result<PathBuf, Error> {
    let out = Command::new(CLIENT_ENV)
        .arg("python")
        .stderr(Stdio::inherit())
        .output()
        .map_err(spawn_err(Path::new(CLIENT_ENV)))?;
    if !out.status.success() {
        return Err(run_err("client-env.sh python", 0)(out.status.to_string()));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// One JSON line of the script's output.
fn json_line(line: Option<std::io::Result<String>>, what: &'static str) -> Result<Value, Error> {
    let line = line
        .and_then(Result::ok)
        .ok_or_else(|| run_err(what, 0)("the script ended early".into()))?;
    serde_json::from_str(&line).map_err(|e| run_err(what, 0)(format!("{e}: {line:?}")))
}

/// Host memory not in use (MemAvailable, KiB).
fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// `count` sandboxes alive at once: the script's figures, and the memory
/// of the server's processes while they all are.
fn many(serve: &Serve, venv: &Path, count: u32, parallel: u32) -> Result<Value, Error> {
    let before = mem_available_kib();
    let mut child = serve
        .client(venv, &["many", &count.to_string()])
        .env("PARALLEL", parallel.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(spawn_err(Path::new("python")))?;
    let stdout: ChildStdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let result = (|| {
        let alive = lines.next().and_then(Result::ok);
        if alive.as_deref() != Some("alive") {
            return Err(run_err("many", 0)(format!("the script said {alive:?}")));
        }
        let mut figures = json_line(lines.next(), "many")?;
        let vmms = serve.descendants();
        let private_kib: u64 = vmms.iter().filter_map(|&p| private_kib_of(p)).sum();
        let drop_kib = before
            .zip(mem_available_kib())
            .map(|(b, a)| b.saturating_sub(a));
        // Tell the script to kill them.
        let mut stdin = child.stdin.take().expect("piped");
        let _ = stdin.write_all(b"\n");
        drop(stdin);
        let killed = json_line(lines.next(), "many")?;
        for key in ["create_ms", "command_ms"] {
            figures[key] = p50_p99(&Stats::list(&figures, key));
        }
        figures["parallel"] = json!(parallel);
        figures["kill_all_ms"] = killed["kill_all_ms"].clone();
        figures["processes_under_serve"] = json!(vmms.len());
        figures["private_kib_under_serve"] = json!(private_kib);
        figures["private_kib_per_sandbox"] = json!(private_kib / u64::from(count.max(1)));
        figures["mem_available_drop_kib"] = json!(drop_kib);
        Ok(figures)
    })();
    let status = child.wait().map_err(spawn_err(Path::new("python")))?;
    match result {
        Ok(figures) if status.success() => Ok(figures),
        Ok(_) => Err(run_err("many", 0)(format!("the script failed: {status}"))),
        Err(e) => Err(e),
    }
}

pub fn serve(opts: &ServeBenchOptions) -> Result<ServeBench, Error> {
    let exe = vmm_exe()?;
    let venv = python_env()?;
    let scratch = ScratchDir::new("serve")?;
    let server = Serve::start(&exe, &scratch, opts.warm)?;
    // After the server: it builds `base` when it is missing or stale.
    let running = Running::launch(&exe, TEMPLATE, &scratch, "exec")?;
    let api = running.api.to_string_lossy().into_owned();
    let mut result = ServeBench {
        runs: opts.runs,
        warm: opts.warm,
        ..Default::default()
    };
    for run in 1..=opts.runs {
        server.settle(run)?;
        let t = Instant::now();
        let out = server
            .client(&venv, &["one"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(spawn_err(Path::new("python")))?;
        result.e2b_script_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            return Err(run_err("e2b", run)(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let phases: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| run_err("e2b", run)(e.to_string()))?;
        for (key, into) in [
            ("create_ms", &mut result.e2b_create_ms),
            ("run_ms", &mut result.e2b_run_ms),
            ("kill_ms", &mut result.e2b_kill_ms),
        ] {
            into.extend(phases[key].as_f64());
        }
        server.settle(run)?;
        let exec = ["exec", "--api-socket", &api];
        let plain = [&exec[..], &["--", "python3", "-c", "print(1)"]].concat();
        result.exec_ms.push(timed_vmm(&exe, &plain, "exec", run)?);
        let as_sdk = [&exec[..], &["--"], &SDK_ARGV].concat();
        result
            .exec_as_sdk_ms
            .push(timed_vmm(&exe, &as_sdk, "exec as the SDK", run)?);
        let template = [&["run", "--template", TEMPLATE, "--"], &SDK_ARGV[..]].concat();
        result
            .template_as_sdk_ms
            .push(timed_vmm(&exe, &template, "template run", run)?);
    }
    drop(running);
    if let Some(count) = opts.many {
        result.many = Some(many(&server, &venv, count, opts.parallel.max(1))?);
    }
    Ok(result)
}
