//! `vmm bench confinement`: what seccomp and the jail cost. Boots (spawn
//! to the init's line, each a fresh `vmm launch`) and forks (of a `vmm
//! launch --api-socket` parent, through its control socket) with both and
//! with neither, in turns, so that drift in the host's speed hits both
//! alike. JSON keys: docs/bench.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use crate::boot::{boot_once, median_ratio};
use crate::common::{vmm_exe, Error, GuestArtifacts, Report, ScratchDir, Stats};
use vmm::action::Control;
use vmm::api::ApiClient;
use vmm::config::{SerialOutput, VmConfig};

/// Results of `vmm bench confinement`.
#[derive(Debug, Default)]
pub struct ConfinementBench {
    pub runs: u32,
    pub boot_confined_ms: Vec<f64>,
    pub boot_unconfined_ms: Vec<f64>,
    pub setup_confined_ms: Vec<f64>,
    pub setup_unconfined_ms: Vec<f64>,
    pub fork_confined_ms: Vec<f64>,
    pub fork_unconfined_ms: Vec<f64>,
}

impl ConfinementBench {
    fn rows(&self) -> [(&'static str, &[f64]); 6] {
        [
            ("boot_confined_ms", &self.boot_confined_ms),
            ("boot_unconfined_ms", &self.boot_unconfined_ms),
            ("setup_confined_ms", &self.setup_confined_ms),
            ("setup_unconfined_ms", &self.setup_unconfined_ms),
            ("fork_confined_ms", &self.fork_confined_ms),
            ("fork_unconfined_ms", &self.fork_unconfined_ms),
        ]
    }
}

impl Report for ConfinementBench {
    fn to_json(&self) -> Value {
        let mut out = json!({
            "runs": self.runs,
            "boot_ratio": median_ratio(&self.boot_confined_ms, &self.boot_unconfined_ms),
            "fork_ratio": median_ratio(&self.fork_confined_ms, &self.fork_unconfined_ms),
        });
        for (name, values) in self.rows() {
            out[name] = Stats::of(values).map(Stats::to_json).into();
        }
        out
    }

    fn table(&self) -> String {
        let mut out = format!(
            "confinement benchmark: {} runs each, seccomp + jail (confined) and neither\n{:<24} {:>10} {:>10} {:>10}\n",
            self.runs, "metric", "median", "min", "max"
        );
        for (name, values) in self.rows() {
            match Stats::of(values) {
                Some(s) => out.push_str(&format!(
                    "{name:<24} {:>10.1} {:>10.1} {:>10.1}\n",
                    s.median, s.min, s.max
                )),
                None => out.push_str(&format!("{name:<24} {:>10}\n", "-")),
            }
        }
        let json = self.to_json();
        for key in ["boot_ratio", "fork_ratio"] {
            if let Some(r) = json[key].as_f64() {
                out.push_str(&format!("{key} (confined / unconfined): {r:.3}\n"));
            }
        }
        out
    }
}

/// `config` with seccomp and the jail, or with neither.
fn confined(config: &VmConfig, on: bool) -> VmConfig {
    VmConfig {
        seccomp: on,
        jail: on.then(Default::default),
        ..config.clone()
    }
}

/// A `vmm launch --api-socket` parent, stopped when dropped.
struct Parent {
    process: Child,
    api: PathBuf,
}

impl Parent {
    fn launch(config: &VmConfig, scratch: &ScratchDir, name: &str) -> Result<Parent, Error> {
        let path = scratch.write(&format!("{name}.json"), serde_json::to_string(config)?)?;
        let api = scratch.path().join(format!("{name}.sock"));
        let exe = vmm_exe()?;
        let process = Command::new(&exe)
            .arg("launch")
            .arg("--config")
            .arg(&path)
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: exe.display().to_string(),
                source,
            })?;
        let mut parent = Parent { process, api };
        loop {
            match ApiClient::new(&parent.api).wait_agent() {
                Ok(()) => return Ok(parent),
                Err(vmm::api::Error::Connect { .. }) => {
                    if let Ok(Some(status)) = parent.process.try_wait() {
                        return Err(parent_failed(name, format!("the VMM ended: {status}")));
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(parent_failed(name, e.to_string())),
            }
        }
    }

    /// Forks one child, stops it; the fork call's time in ms.
    fn fork_once(&self, run: u32) -> Result<f64, Error> {
        let err = |detail: String| Error::Run {
            what: "fork",
            run,
            detail,
        };
        let t = Instant::now();
        let info = ApiClient::new(&self.api)
            .fork(1, None)
            .map_err(|e| err(e.to_string()))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        for child in info.children {
            stop(&child.api_socket).map_err(&err)?;
        }
        Ok(ms)
    }
}

fn parent_failed(name: &str, detail: String) -> Error {
    Error::Run {
        what: if name == "confined" {
            "confined parent"
        } else {
            "unconfined parent"
        },
        run: 0,
        detail,
    }
}

fn stop(api: &Path) -> Result<(), String> {
    ApiClient::new(api).stop().map_err(|e| e.to_string())
}

impl Drop for Parent {
    fn drop(&mut self) {
        if stop(&self.api).is_err() {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
    }
}

/// Boots and forks `runs` times each way.
pub fn confinement(runs: u32) -> Result<ConfinementBench, Error> {
    let guest = GuestArtifacts::resolve(false)?;
    let scratch = ScratchDir::new("confinement")?;
    let boot_config = VmConfig {
        memory_mib: 128,
        kernel: Some(guest.kernel.clone()),
        initramfs: Some(guest.initramfs.clone()),
        serial: SerialOutput::Stdout,
        ..Default::default()
    };
    let mut result = ConfinementBench {
        runs,
        ..Default::default()
    };
    for run in 1..=runs {
        let b = boot_once(&confined(&boot_config, true), &scratch, run)?;
        result.boot_confined_ms.push(b.ready_ms);
        result.setup_confined_ms.push(b.setup_ms);
        let b = boot_once(&confined(&boot_config, false), &scratch, run)?;
        result.boot_unconfined_ms.push(b.ready_ms);
        result.setup_unconfined_ms.push(b.setup_ms);
    }
    // Parents with the agent (the initramfs serves it on the vsock the
    // API socket adds), forked in turns.
    let parent_config = VmConfig {
        memory_mib: 256,
        serial: SerialOutput::Off,
        ..boot_config
    };
    let on = Parent::launch(&confined(&parent_config, true), &scratch, "confined")?;
    let off = Parent::launch(&confined(&parent_config, false), &scratch, "unconfined")?;
    for run in 1..=runs {
        result.fork_confined_ms.push(on.fork_once(run)?);
        result.fork_unconfined_ms.push(off.fork_once(run)?);
    }
    Ok(result)
}
