//! `vmm bench start`: how long from "give me a sandbox" to the end of its
//! first command, for `true` and `python3 -c 'print(1)'`, four ways, in
//! turns within each run (so drift in the host's speed hits all alike):
//!
//! - `cold`: `vmm run --cold -- CMD` (boots);
//! - `template`: `vmm run --template T -- CMD` (restores T);
//! - `fork`: a fork of a warm parent (`Template::warm`: T restored in this
//!   process and kept running): fork one child, run the command through
//!   its agent;
//! - `exec`: `vmm exec --api-socket S -- CMD` into a VM already running.
//!
//! T is built as `vmm run` builds its default template (the default
//! configuration and warm-up). Also the breakdown of a template start done
//! in this process (restore
//! to vCPUs running, to the agent's answer, to the command's end), the
//! `vmm` process's own start, the agent's ping round trip in a running
//! VM, and the memory each started sandbox has of its own right after the
//! command (Private_Dirty of its VMM process). JSON keys: docs/bench.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    kib_field, one_decimal, p50_p99, p50_ratio, percentile, vmm_exe, Error, Report, ScratchDir,
};
use crate::vmm_process::{spawn_err, timed_vmm, Running};
use vmm::action::{Action, Control};
use vmm::agent::{AgentClient, Exec};
use vmm::api::ApiClient;
use vmm::config::{SerialOutput, VmConfig};
use vmm::snapshot::host::HostSettings;

/// The commands timed, by label.
const COMMANDS: [(&str, &[&str]); 2] = [
    ("true", &["true"]),
    ("python", &["python3", "-c", "print(1)"]),
];

/// The ways a sandbox starts, in the order each run takes them.
const WAYS: [&str; 4] = ["cold", "template", "fork", "exec"];

/// How long the bench waits for a VM's agent.
const AGENT_WAIT: Duration = Duration::from_secs(600);

/// Results of `vmm bench start`.
#[derive(Debug, Default)]
pub struct StartBench {
    pub runs: u32,
    /// Wall times (ms) by command label, then way.
    pub wall_ms: BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>>,
    /// `vmm --version`: spawn to exit.
    pub process_start_ms: Vec<f64>,
    /// In-process template starts, from the start of the restore: to
    /// every vCPU running,
    pub restore_ms: Vec<f64>,
    /// to the agent's answer (reseeded, clock stepped),
    pub agent_ready_ms: Vec<f64>,
    /// to `true` done.
    pub command_done_ms: Vec<f64>,
    /// The agent's ping round trip in a running VM.
    pub ping_ms: Vec<f64>,
    /// Private_Dirty of a template-started VMM right after `true` (KiB).
    pub template_private_dirty_kib: Vec<f64>,
    /// The same for a fork child of the warm parent.
    pub fork_private_dirty_kib: Vec<f64>,
}

impl StartBench {
    fn wall(&self, command: &str, way: &str) -> &[f64] {
        self.wall_ms
            .get(command)
            .and_then(|w| w.get(way))
            .map_or(&[], Vec::as_slice)
    }

    fn breakdown(&self) -> [(&'static str, &[f64]); 7] {
        [
            ("process_start_ms", &self.process_start_ms),
            ("restore_ms", &self.restore_ms),
            ("agent_ready_ms", &self.agent_ready_ms),
            ("command_done_ms", &self.command_done_ms),
            ("ping_ms", &self.ping_ms),
            (
                "template_private_dirty_kib",
                &self.template_private_dirty_kib,
            ),
            ("fork_private_dirty_kib", &self.fork_private_dirty_kib),
        ]
    }

    /// The goals' ratios (docs/templates.md).
    fn ratios(&self) -> Value {
        json!({
            "template_over_exec_true": p50_ratio(self.wall("true", "template"), self.wall("true", "exec")),
            "cold_over_template_true": p50_ratio(self.wall("true", "cold"), self.wall("true", "template")),
            "fork_over_template_true": p50_ratio(self.wall("true", "fork"), self.wall("true", "template")),
            "agent_ready_over_ping": p50_ratio(&self.agent_ready_ms, &self.ping_ms),
        })
    }
}

impl Report for StartBench {
    fn to_json(&self) -> Value {
        let mut wall = json!({});
        for (command, ways) in &self.wall_ms {
            for (way, values) in ways {
                wall[command][way] = p50_p99(values);
            }
        }
        let mut out = json!({"runs": self.runs, "wall_ms": wall, "ratios": self.ratios()});
        for (name, values) in self.breakdown() {
            out[name] = p50_p99(values);
        }
        out
    }

    fn table(&self) -> String {
        let mut out = format!(
            "start benchmark: {} runs, wall time from the request to the command's end (ms)\n{:<10} {:<10} {:>10} {:>10}\n",
            self.runs, "command", "way", "p50", "p99"
        );
        for (command, ways) in &self.wall_ms {
            for way in WAYS {
                let v = ways.get(way).map_or(&[][..], Vec::as_slice);
                out.push_str(&format!(
                    "{command:<10} {way:<10} {:>10} {:>10}\n",
                    one_decimal(percentile(v, 50.0)),
                    one_decimal(percentile(v, 99.0))
                ));
            }
        }
        out.push_str(&format!(
            "{:<38} {:>10} {:>10}\n",
            "breakdown", "p50", "p99"
        ));
        for (name, v) in self.breakdown() {
            out.push_str(&format!(
                "{name:<38} {:>10} {:>10}\n",
                one_decimal(percentile(v, 50.0)),
                one_decimal(percentile(v, 99.0))
            ));
        }
        if let Some(ratios) = self.ratios().as_object() {
            for (k, v) in ratios {
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
        out
    }
}

/// Private_Dirty of process `pid` (KiB).
fn private_dirty_kib(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&rollup, "Private_Dirty:").map(|k| k as f64)
}

fn exec_argv(argv: &[&str]) -> Exec {
    Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs `argv` through `agent`, output discarded; fails unless it exits 0.
fn agent_exec(agent: &AgentClient, argv: &[&str]) -> Result<(), String> {
    let status = agent
        .exec(
            &exec_argv(argv),
            None,
            &mut std::io::sink(),
            &mut std::io::sink(),
        )
        .map_err(|e| e.to_string())?;
    match status.shell_code() {
        0 => Ok(()),
        code => Err(format!("exit status {code}")),
    }
}

/// The template the bench builds and removes.
struct BenchTemplate {
    exe: PathBuf,
    name: String,
}

impl BenchTemplate {
    fn build(exe: &Path) -> Result<BenchTemplate, Error> {
        let name = format!("bench-start-{}", std::process::id());
        let status = Command::new(exe)
            .args(["template", "create", &name])
            .args(["--warmup", vmm::template::DEFAULT_WARMUP])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(spawn_err(exe))?;
        if !status.success() {
            return Err(Error::Run {
                what: "template create",
                run: 0,
                detail: status.to_string(),
            });
        }
        Ok(BenchTemplate {
            exe: exe.to_path_buf(),
            name,
        })
    }

    fn open(&self) -> Result<vmm::template::Template, Error> {
        vmm::template::Template::open(&self.name).map_err(|e| Error::Run {
            what: "template",
            run: 0,
            detail: e.to_string(),
        })
    }
}

impl Drop for BenchTemplate {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .args(["template", "rm", &self.name])
            .output();
    }
}

/// Restores `template` in this process and times its start: to every
/// vCPU running, to the agent's answer, to `true` done (ms, from the
/// start of the restore). The VM is stopped after.
fn template_start_breakdown(
    template: &vmm::template::Template,
    scratch: &ScratchDir,
) -> Result<[f64; 3], String> {
    let start = Instant::now();
    let vsock = scratch.path().join("breakdown.vsock");
    let _ = std::fs::remove_file(&vsock);
    let mut config = vmm::template::sandbox_config(&template.record.config);
    config.serial = SerialOutput::Off;
    let opts = vmm::snapshot::RestoreOptions {
        vsock_socket: vsock.clone(),
        host: HostSettings {
            config: Some(config),
            trust_snapshot_config: false,
        },
        key: None,
    };
    let source = vmm::snapshot::restore_source(&template.snapshot_dir(), &opts)
        .map_err(|e| e.to_string())?;
    let hv = vmm::open_hypervisor().map_err(|e| e.to_string())?;
    let vm = vmm::Vm::restore(source, hv.as_ref(), start).map_err(|e| e.to_string())?;
    let (tx, started) = std::sync::mpsc::channel();
    let run = vmm::RunOptions {
        on_started: Some(Box::new(move |machine| {
            let _ = tx.send((start.elapsed(), machine));
        })),
        watch_agent: true,
        ..Default::default()
    };
    // On a thread of its own: the thread that runs a VM ends under the
    // device loop's seccomp filter, and this one has more to do.
    std::thread::scope(|s| {
        let vm_thread = s.spawn(|| vm.run(run));
        let (running, machine) = started
            .recv()
            .map_err(|_| "the restored VM never ran".to_string())?;
        let timed = (|| {
            machine
                .perform_within(Action::WaitAgent, AGENT_WAIT)
                .map_err(|e| e.to_string())?;
            let ready = start.elapsed();
            agent_exec(&AgentClient::new(&vsock), &["true"])?;
            Ok::<_, String>([running, ready, start.elapsed()])
        })();
        let _ = machine.stop();
        let _ = vm_thread.join();
        timed.map(|t| t.map(|d| d.as_secs_f64() * 1e3))
    })
}

/// `runs` runs of every way, for both commands.
pub fn start(runs: u32) -> Result<StartBench, Error> {
    let exe = vmm_exe()?;
    let scratch = ScratchDir::new("start")?;
    let built = BenchTemplate::build(&exe)?;
    let template = built.open()?;
    let running = Running::launch(&exe, &built.name, &scratch, "running")?;
    let running_agent = ApiClient::new(&running.api)
        .vsock_path()
        .map(|p| AgentClient::new(&p))
        .map_err(|e| Error::Run {
            what: "running VM",
            run: 0,
            detail: e.to_string(),
        })?;
    let parent = template
        .warm(Some(VmConfig {
            serial: SerialOutput::Off,
            ..template.record.config.clone()
        }))
        .map_err(|e| Error::Run {
            what: "warm parent",
            run: 0,
            detail: e.to_string(),
        })?;
    let mut result = StartBench {
        runs,
        ..Default::default()
    };
    let api = running.api.to_string_lossy().into_owned();
    for run in 1..=runs {
        let err = |what: &'static str| move |detail: String| Error::Run { what, run, detail };
        for (label, argv) in COMMANDS {
            let row = result.wall_ms.entry(label).or_default();
            // `vmm PREFIX... -- CMD`, timed.
            let timed = |prefix: &[&str], what| {
                let args: Vec<&str> = prefix.iter().chain(&["--"]).chain(argv).copied().collect();
                timed_vmm(&exe, &args, what, run)
            };
            let cold = timed(&["run", "--cold"], "cold run")?;
            row.entry("cold").or_default().push(cold);
            let restored = timed(&["run", "--template", &built.name], "template run")?;
            row.entry("template").or_default().push(restored);
            // A fork of the warm parent: its child's agent runs the command.
            let t = Instant::now();
            let child = parent.start().map_err(|e| err("fork")(e.to_string()))?;
            agent_exec(child.agent()?, argv).map_err(err("fork"))?;
            row.entry("fork")
                .or_default()
                .push(t.elapsed().as_secs_f64() * 1e3);
            if label == "true" {
                if let Some(kib) = private_dirty_kib(child.info().pid) {
                    result.fork_private_dirty_kib.push(kib);
                }
            }
            child.stop()?;
            let exec = timed(&["exec", "--api-socket", &api], "exec")?;
            row.entry("exec").or_default().push(exec);
        }
        let t = Instant::now();
        running_agent
            .ping()
            .map_err(|e| err("ping")(e.to_string()))?;
        result.ping_ms.push(t.elapsed().as_secs_f64() * 1e3);
        result
            .process_start_ms
            .push(timed_vmm(&exe, &["--version"], "vmm --version", run)?);
        let [to_running, to_agent, to_done] =
            template_start_breakdown(&template, &scratch).map_err(err("breakdown"))?;
        result.restore_ms.push(to_running);
        result.agent_ready_ms.push(to_agent);
        result.command_done_ms.push(to_done);
        // A template-started VMM's own memory right after a command.
        let one = Running::launch(&exe, &built.name, &scratch, "measured")?;
        let pid = one.process.id();
        agent_exec(
            &AgentClient::new(&PathBuf::from(format!("{}.vsock", one.api.display()))),
            &["true"],
        )
        .map_err(err("memory"))?;
        if let Some(kib) = private_dirty_kib(pid) {
            result.template_private_dirty_kib.push(kib);
        }
    }
    drop(parent);
    Ok(result)
}
