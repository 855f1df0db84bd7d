//! `vmm bench containerd`: our containerd shim against runc, containerd's
//! default runtime, through a containerd of the bench's own (config, root
//! and state in a scratch folder; the shim beside `vmm` on its PATH) and a
//! busybox image made here:
//!
//! - `run`: `ctr run --rm IMAGE ID true`, ours (`--runtime
//!   io.containerd.vmm.v2`, from the shim's default template) and runc's,
//!   in turns;
//! - `exec`: `ctr task exec true` into a running container of each: for
//!   ours the guest's own command cost (the agent starting a process in
//!   the guest), for runc ctr's and containerd's own.
//!
//! The goal (docs/containerd.md): ours at most 2x runc plus the guest's
//! command cost. JSON keys: docs/bench.md.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{percentile, vmm_exe, Error, Report, ScratchDir};
use vmm_image::fixture::{Compression, Image, Layer};

const RUNTIME: &str = "io.containerd.vmm.v2";
const IMAGE: &str = "docker.io/library/vmmbench:latest";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Results of `vmm bench containerd` (wall times, ms).
#[derive(Debug, Default)]
pub struct ContainerdBench {
    pub runs: u32,
    pub vmm_run_ms: Vec<f64>,
    pub runc_run_ms: Vec<f64>,
    pub vmm_exec_ms: Vec<f64>,
    pub runc_exec_ms: Vec<f64>,
}

fn p50(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

fn r1(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!((v * 10.0).round() / 10.0))
}

impl ContainerdBench {
    /// 2 x runc's run plus our exec: the goal for our run.
    fn goal_ms(&self) -> Option<f64> {
        Some(2.0 * p50(&self.runc_run_ms)? + p50(&self.vmm_exec_ms)?)
    }
}

impl Report for ContainerdBench {
    fn to_json(&self) -> Value {
        let goal = self.goal_ms();
        json!({
            "runs": self.runs,
            "run_true_ms": {
                "vmm": {"p50": r1(p50(&self.vmm_run_ms)), "all": self.vmm_run_ms},
                "runc": {"p50": r1(p50(&self.runc_run_ms)), "all": self.runc_run_ms},
            },
            "exec_true_ms": {
                "vmm": {"p50": r1(p50(&self.vmm_exec_ms)), "all": self.vmm_exec_ms},
                "runc": {"p50": r1(p50(&self.runc_exec_ms)), "all": self.runc_exec_ms},
            },
            "goal_ms": r1(goal),
            "goal_met": p50(&self.vmm_run_ms).zip(goal).map(|(v, g)| v <= g),
        })
    }

    fn table(&self) -> String {
        let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        format!(
            "containerd benchmark: {} runs (p50, ms)\n\
             ctr run --rm IMAGE true        vmm {:>6}   runc {:>6}\n\
             ctr task exec true (running)   vmm {:>6}   runc {:>6}\n\
             goal: vmm run <= 2 x runc run + vmm exec = {} ms\n",
            self.runs,
            f(p50(&self.vmm_run_ms)),
            f(p50(&self.runc_run_ms)),
            f(p50(&self.vmm_exec_ms)),
            f(p50(&self.runc_exec_ms)),
            f(self.goal_ms()),
        )
    }
}

/// A containerd of the bench's own; ended when dropped.
struct Containerd {
    dir: ScratchDir,
    process: Child,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Containerd {
    fn start() -> Result<Containerd, Error> {
        let shim = vmm_exe()?.with_file_name("containerd-shim-vmm-v2");
        if !shim.exists() {
            return Err(Error::Missing {
                what: "containerd shim",
                path: shim,
            });
        }
        let dir = ScratchDir::new("ctrd")?;
        let d = dir.path().display().to_string();
        let bin = dir.path().join("bin");
        let scratch = |source| Error::Scratch {
            path: bin.clone(),
            source,
        };
        std::fs::create_dir_all(&bin).map_err(scratch)?;
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-vmm-v2")).map_err(scratch)?;
        let config = dir.write(
            "config.toml",
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
            ),
        )?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut process = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: "containerd (apt-get install containerd runc)".into(),
                source,
            })?;
        // Its log goes to a file; its line saying it serves is the signal.
        let stderr = process.stderr.take();
        let mut log = std::fs::File::create(dir.path().join("containerd.log")).map_err(scratch)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr
                .map(BufReader::new)
                .into_iter()
                .flat_map(|r| r.lines())
                .map_while(Result::ok)
            {
                let _ = writeln!(log, "{line}");
                if line.contains("containerd successfully booted") {
                    let _ = tx.send(());
                }
            }
        });
        let ctrd = Containerd { dir, process };
        if rx.recv_timeout(BOOT_TIMEOUT).is_err() {
            return Err(Error::Run {
                what: "containerd",
                run: 1,
                detail: format!("it did not come up within {BOOT_TIMEOUT:?}"),
            });
        }
        Ok(ctrd)
    }

    /// Runs `ctr ARGS`; its wall time (ms), or why it failed.
    fn ctr(&self, what: &'static str, run: u32, args: &[&str]) -> Result<f64, Error> {
        let t = Instant::now();
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["-n", "bench"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: "ctr".into(),
                source,
            })?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match out.status.success() {
            true => Ok(ms),
            false => Err(Error::Run {
                what,
                run,
                detail: format!(
                    "ctr {}: {}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            }),
        }
    }

    /// Imports a static busybox image.
    fn import_image(&self) -> Result<(), Error> {
        let busybox = Path::new("/bin/busybox");
        let bytes = std::fs::read(busybox).map_err(|_| Error::Missing {
            what: "static busybox (busybox-static)",
            path: busybox.to_path_buf(),
        })?;
        let mut layer = Layer::new().dir("bin", 0o755).dir("tmp", 0o1777).file(
            "bin/busybox",
            &bytes,
            0o755,
            0,
            0,
        );
        for applet in ["sh", "true", "sleep"] {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
        let image = Image {
            layers: vec![(layer.finish(), Compression::None)],
            config: json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]}),
        };
        let archive = self.dir.path().join("image.tar");
        image.write_docker_archive(&archive, IMAGE);
        self.ctr(
            "import",
            1,
            &["image", "import", &archive.to_string_lossy()],
        )?;
        Ok(())
    }
}

pub fn containerd(runs: u32) -> Result<ContainerdBench, Error> {
    let c = Containerd::start()?;
    c.import_image()?;
    let vmm_run = |id: &str, i| {
        c.ctr(
            "vmm run",
            i,
            &["run", "--runtime", RUNTIME, "--rm", IMAGE, id, "true"],
        )
    };
    let runc_run = |id: &str, i| c.ctr("runc run", i, &["run", "--rm", IMAGE, id, "true"]);
    // Once each first: the shim's template (built on first use), caches.
    vmm_run("warm-vmm", 0)?;
    runc_run("warm-runc", 0)?;
    let mut bench = ContainerdBench {
        runs,
        ..Default::default()
    };
    for i in 1..=runs {
        bench.vmm_run_ms.push(vmm_run(&format!("v{i}"), i)?);
        bench.runc_run_ms.push(runc_run(&format!("r{i}"), i)?);
    }
    let long = |id: &str, runtime: &str| {
        c.ctr(
            "start",
            1,
            &[
                "run",
                "-d",
                "--runtime",
                runtime,
                IMAGE,
                id,
                "sleep",
                "3600",
            ],
        )
    };
    long("long-vmm", RUNTIME)?;
    long("long-runc", "io.containerd.runc.v2")?;
    for i in 1..=runs {
        for (id, times) in [
            ("long-vmm", &mut bench.vmm_exec_ms),
            ("long-runc", &mut bench.runc_exec_ms),
        ] {
            times.push(c.ctr(
                "exec",
                i,
                &["task", "exec", "--exec-id", &format!("x{i}"), id, "true"],
            )?);
        }
    }
    for id in ["long-vmm", "long-runc"] {
        // `delete --force` kills the task and waits for it.
        c.ctr("stop", 1, &["task", "delete", "--force", id])?;
        c.ctr("stop", 1, &["container", "delete", id])?;
    }
    Ok(bench)
}
