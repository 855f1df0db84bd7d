//! `stats` (`ctr task metrics`): what a pod's VM costs the host, as
//! containerd's cgroup v1 metrics (what runc's shim reports): the memory
//! and CPU time of the VMM's processes (the launcher, the jail's init and
//! the VMM), the VM's memory size as the limit, and the container's
//! running processes. A pod's containers share their VM's figures.

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::MessageField;

/// The metrics of the VMM process tree under `pid`.
pub fn of_vm(pid: u32, memory_mib: u32, processes: u64) -> Metrics {
    let (mut rss, mut user, mut kernel) = (0u64, 0u64, 0u64);
    for p in tree(pid) {
        rss += status_kib(p, "VmRSS:").unwrap_or(0) * 1024;
        let (u, k) = cpu_ticks(p).unwrap_or((0, 0));
        user += u;
        kernel += k;
    }
    // SAFETY: sysconf(3) with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000 / hz);
    let limit = u64::from(memory_mib) << 20;
    Metrics {
        pids: MessageField::some(PidsStat {
            current: processes,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: ns(user + kernel),
                user: ns(user),
                kernel: ns(kernel),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            rss,
            usage: MessageField::some(MemoryEntry {
                usage: rss,
                limit,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() && all.len() < 64 {
        let p = all[i];
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    all
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// utime and stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's name (in parentheses, which may hold
    // spaces): state is the 3rd field, utime the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_tree_has_memory_and_cpu_time() {
        let m = of_vm(std::process::id(), 256, 2);
        let memory = m.memory.as_ref().unwrap();
        assert!(memory.rss > 0);
        assert_eq!(memory.usage.as_ref().unwrap().limit, 256 << 20);
        assert_eq!(m.pids.as_ref().unwrap().current, 2);
        let mut spin = 0u64;
        for i in 0..20_000_000u64 {
            spin = spin.wrapping_add(i * i);
        }
        assert!(spin > 0);
        let cpu = of_vm(std::process::id(), 256, 2)
            .cpu
            .as_ref()
            .unwrap()
            .usage
            .as_ref()
            .unwrap()
            .total;
        assert!(cpu > 0, "no CPU time after spinning");
    }
}
