//! `vmm bench agent`: the agent path of a sandbox started through the
//! Rust API: ping and `exec true` round trips, vsock throughput both ways,
//! sequential block I/O in the guest. JSON keys: docs/bench.md.

use std::time::Instant;

use serde_json::{json, Value};

use crate::common::{Report, Stats};
use vmm::config::VmConfig;

/// Options of `vmm bench agent`.
pub struct AgentBenchOptions {
    /// Round trips measured for ping and exec.
    pub runs: u32,
    /// MiB moved per throughput measurement.
    pub mib: u64,
}

/// Results of `vmm bench agent` (milliseconds and MiB/s).
#[derive(Debug, Default)]
pub struct AgentBench {
    pub boot_to_agent_ms: f64,
    pub ping_ms: Vec<f64>,
    pub exec_true_ms: Vec<f64>,
    pub host_to_guest_mib_s: f64,
    pub guest_to_host_mib_s: f64,
    pub blk_write_mib_s: Option<f64>,
    pub blk_read_mib_s: Option<f64>,
    pub mib: u64,
}

/// Parses the elapsed seconds out of GNU dd's summary line
/// ("... copied, 1.23 s, 54.5 MB/s").
fn dd_seconds(stderr: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.contains("copied"))?;
    let before = line.split(" s,").next()?;
    before.rsplit(", ").next()?.trim().parse().ok()
}

impl Report for AgentBench {
    fn to_json(&self) -> Value {
        let stats = |v: &[f64]| Stats::of(v).map(Stats::to_json);
        let r = |x: f64| (x * 10.0).round() / 10.0;
        json!({
            "boot_to_agent_ms": r(self.boot_to_agent_ms),
            "agent_ping_ms": stats(&self.ping_ms),
            "exec_true_ms": stats(&self.exec_true_ms),
            "vsock_host_to_guest_mib_s": r(self.host_to_guest_mib_s),
            "vsock_guest_to_host_mib_s": r(self.guest_to_host_mib_s),
            "blk_seq_write_mib_s": self.blk_write_mib_s.map(r),
            "blk_seq_read_mib_s": self.blk_read_mib_s.map(r),
            "transfer_mib": self.mib,
        })
    }

    fn table(&self) -> String {
        let j = self.to_json();
        let mut out = String::from("agent benchmark\n");
        for (k, v) in j.as_object().into_iter().flatten() {
            out.push_str(&format!("{k:<28} {v}\n"));
        }
        out
    }
}

/// Boots a sandbox (default root disk, vsock) and measures the agent path.
pub fn agent(opts: &AgentBenchOptions) -> Result<AgentBench, vmm::sandbox::Error> {
    use std::io::Cursor;
    use vmm::agent::Exec;
    let exec = |argv: &[&str]| Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let start = Instant::now();
    let sandbox = vmm::sandbox::Sandbox::start(VmConfig {
        memory_mib: 256,
        ..Default::default()
    })?;
    let mut result = AgentBench {
        boot_to_agent_ms: start.elapsed().as_secs_f64() * 1000.0,
        mib: opts.mib,
        ..Default::default()
    };
    let agent = sandbox.agent();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for _ in 0..opts.runs {
        let t = Instant::now();
        agent.ping()?;
        result.ping_ms.push(ms(t));
    }
    for _ in 0..opts.runs {
        let t = Instant::now();
        agent.exec(
            &exec(&["true"]),
            None,
            &mut std::io::sink(),
            &mut std::io::sink(),
        )?;
        result.exec_true_ms.push(ms(t));
    }
    let bytes = opts.mib << 20;
    let data = vec![0x5au8; bytes as usize];
    let t = Instant::now();
    agent.exec(
        &exec(&["sh", "-c", "cat > /dev/null"]),
        Some(Box::new(Cursor::new(data))),
        &mut std::io::sink(),
        &mut std::io::sink(),
    )?;
    result.host_to_guest_mib_s = opts.mib as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let count = format!("head -c {bytes} /dev/zero");
    agent.exec(
        &exec(&["sh", "-c", &count]),
        None,
        &mut std::io::sink(),
        &mut std::io::sink(),
    )?;
    result.guest_to_host_mib_s = opts.mib as f64 / t.elapsed().as_secs_f64();
    let dd = |script: &str| -> Result<Option<f64>, vmm::sandbox::Error> {
        let mut err = Vec::new();
        agent.exec(
            &exec(&["sh", "-c", script]),
            None,
            &mut std::io::sink(),
            &mut err,
        )?;
        Ok(dd_seconds(&String::from_utf8_lossy(&err)).map(|s| opts.mib as f64 / s))
    };
    result.blk_write_mib_s = dd(&format!(
        "dd if=/dev/zero of=/root/bench.bin bs=1M count={} conv=fsync",
        opts.mib
    ))?;
    result.blk_read_mib_s =
        dd("sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/root/bench.bin of=/dev/null bs=1M")?;
    sandbox.stop()?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_summary_is_parsed() {
        let s = "64+0 records in\n64+0 records out\n67108864 bytes (67 MB, 64 MiB) copied, 1.23 s, 54.5 MB/s\n";
        assert_eq!(dd_seconds(s), Some(1.23));
        assert_eq!(dd_seconds("nothing"), None);
    }
}
