//! `GET /sandboxes/{id}/metrics` (the SDKs' `get_metrics()`): one sample,
//! taken when asked, as the guest sees itself: CPU from `/proc/stat`
//! (busy time since the previous sample, or since boot for the first),
//! memory from `/proc/meminfo`, the root file system from `df`. E2B
//! samples every 5 s and answers a series; this server keeps no series,
//! so every answer holds one entry, now.

use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};
use vmm_agent::Request;

use super::guest;
use super::sandboxes::Sandbox;

/// The most bytes read of each source (`/proc/stat` grows with CPUs and
/// interrupts; a few KiB here).
const MAX_SOURCE: usize = 256 << 10;

/// Jiffies the guest's CPUs spent in total and idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    total: u64,
    idle: u64,
}

/// The previous sample of a sandbox, for the next one's CPU figure.
pub type LastCpu = Mutex<Option<CpuTimes>>;

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (guest time is already in user).
fn cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 5 {
        return None;
    }
    Some(CpuTimes {
        total: fields.iter().sum(),
        idle: fields[3] + fields[4],
    })
}

/// Busy percentage between two samples (all CPUs together, 0 to 100).
fn busy_pct(prev: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    let idle = now.idle.saturating_sub(prev.idle);
    match total {
        0 => 0.0,
        t => (t.saturating_sub(idle)) as f64 * 100.0 / t as f64,
    }
}

/// Memory in bytes: total, used (total less available) and page cache.
fn memory(meminfo: &str) -> Option<(u64, u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        kib.checked_mul(1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((
        total,
        total.saturating_sub(available),
        field("Cached:").unwrap_or(0),
    ))
}

/// `df -B1 --output=size,used /`: total and used bytes.
fn disk(df: &str) -> Option<(u64, u64)> {
    let mut numbers = df
        .lines()
        .nth(1)?
        .split_whitespace()
        .map(|n| n.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// What the agent answers to `request`, at most [`MAX_SOURCE`] bytes.
async fn read(sandbox: &Sandbox, request: Request) -> guest::Result<String> {
    let (mut reader, _w) = guest::open(&sandbox.vm.vsock, &request).await?;
    let mut out = Vec::new();
    reader
        .finish(|d| {
            let room = MAX_SOURCE.saturating_sub(out.len());
            out.extend_from_slice(&d[..d.len().min(room)]);
        })
        .await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn get(path: &str) -> Request {
    Request::Get {
        path: path.into(),
        user: None,
    }
}

/// One sample of the sandbox, as E2B's `SandboxMetric`.
pub async fn sample(sandbox: &Sandbox) -> Result<Value, String> {
    let broken = |what: &str| format!("the guest's {what} could not be read");
    let stat = read(sandbox, get("/proc/stat"))
        .await
        .map_err(|e| e.to_string())?;
    let meminfo = read(sandbox, get("/proc/meminfo"))
        .await
        .map_err(|e| e.to_string())?;
    let df = Request::Exec {
        argv: ["df", "-B1", "--output=size,used", "/"]
            .map(String::from)
            .to_vec(),
        env: Default::default(),
        cwd: None,
        stdin: false,
        timeout_ms: Some(30_000),
        user: None,
        pty: None,
        root: None,
        mounts: Vec::new(),
        isolation: None,
    };
    let df = read(sandbox, df).await.map_err(|e| e.to_string())?;
    let now = cpu_times(&stat).ok_or_else(|| broken("/proc/stat"))?;
    let (mem_total, mem_used, mem_cache) =
        memory(&meminfo).ok_or_else(|| broken("/proc/meminfo"))?;
    let (disk_total, disk_used) = disk(&df).ok_or_else(|| broken("df output"))?;
    let prev = sandbox
        .last_cpu
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(now)
        .unwrap_or_default();
    let at = SystemTime::now();
    let unix = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(json!({
        "timestamp": super::control::rfc3339(at),
        "timestampUnix": unix,
        "cpuCount": sandbox.sizes.vcpus,
        "cpuUsedPct": (busy_pct(prev, now) * 100.0).round() / 100.0,
        "memTotal": mem_total,
        "memUsed": mem_used,
        "memCache": mem_cache,
        "diskTotal": disk_total,
        "diskUsed": disk_used,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_busy_time_between_samples() {
        let a = cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\n");
        let b = cpu_times("cpu  160 0 70 900 70 0 0 0 0 0\n");
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                idle: 850
            }
        );
        // 200 jiffies passed, 120 of them idle.
        assert_eq!(busy_pct(a, b), 40.0);
        assert_eq!(busy_pct(CpuTimes::default(), a), 15.0);
        assert_eq!(busy_pct(b, b), 0.0);
        // A counter that went back (a restored guest) is no panic.
        assert_eq!(busy_pct(b, a), 0.0);
        assert_eq!(cpu_times("intr 5\n"), None);
        assert_eq!(cpu_times("cpu  1 2 x 4 5\n"), None);
    }

    #[test]
    fn memory_and_disk_read_as_bytes() {
        let meminfo = "MemTotal:         120000 kB\nMemFree:  1 kB\nMemAvailable:      90000 kB\nBuffers: 1 kB\nCached:            20000 kB\n";
        assert_eq!(
            memory(meminfo),
            Some((120000 * 1024, 30000 * 1024, 20000 * 1024))
        );
        assert_eq!(memory("MemTotal: 5 kB\n"), None);
        let df = "     1B-blocks       Used\n    1023303680  512000000\n";
        assert_eq!(disk(df), Some((1023303680, 512000000)));
        assert_eq!(disk("header only\n"), None);
        assert_eq!(disk("h\nx y\n"), None);
    }
}
