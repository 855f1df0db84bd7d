//! Helpers shared by the integration tests: run the `vmm` binary on a
//! config and collect its output and launch report.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm");

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
