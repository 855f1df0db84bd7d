//! `vmm` processes the benches start and time: one command run to its
//! end, and a VM launched from a template that stays up until dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::common::{Error, ScratchDir};
use vmm::action::Control;
use vmm::api::ApiClient;

pub fn spawn_err(program: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Spawn {
        program: program.display().to_string(),
        source,
    }
}

/// Runs `vmm ARGS` to its end; the wall time (ms).
pub fn timed_vmm(exe: &Path, args: &[&str], what: &'static str, run: u32) -> Result<f64, Error> {
    let t = Instant::now();
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(spawn_err(exe))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        return Err(Error::Run {
            what,
            run,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(ms)
}

/// A `vmm launch --template T --api-socket S` VM, stopped when dropped.
pub struct Running {
    pub process: Child,
    pub api: PathBuf,
}

impl Running {
    pub fn launch(
        exe: &Path,
        template: &str,
        scratch: &ScratchDir,
        name: &str,
    ) -> Result<Running, Error> {
        let api = scratch.path().join(format!("{name}.sock"));
        let process = Command::new(exe)
            .args(["launch", "--template", template, "--api-socket"])
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(spawn_err(exe))?;
        let running = Running { process, api };
        let err = |detail: String| Error::Run {
            what: "running VM",
            run: 0,
            detail,
        };
        loop {
            match ApiClient::new(&running.api).wait_agent() {
                Ok(()) => return Ok(running),
                Err(vmm::api::Error::Connect { .. }) => std::thread::yield_now(),
                Err(e) => return Err(err(e.to_string())),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if ApiClient::new(&self.api).stop().is_err() {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
    }
}
