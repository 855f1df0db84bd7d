//! `stats` (`ctr task metrics`), as containerd's cgroup v1 metrics (what
//! runc's shim reports): a container's figures from its cgroup in the
//! guest (memory, CPU time, processes; its memory limit, else the VM's
//! size), or, when the guest cannot tell them, what its pod's VM costs
//! the host (the memory and CPU time of the VMM's processes: the
//! launcher, the jail's init and the VMM).

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
    metrics(Figures {
        memory: rss,
        limit: u64::from(memory_mib) << 20,
        user_ns: ns(user),
        kernel_ns: ns(kernel),
        processes,
    })
}

/// A container's metrics from its cgroup in the guest (`vm_memory_mib`
/// is the limit when the cgroup has none).
pub fn of_container(c: &vmm_agent::CgroupStats, vm_memory_mib: u32) -> Metrics {
    let us = |v: u64| v.saturating_mul(1000);
    let mut m = metrics(Figures {
        memory: c.memory,
        limit: c.memory_max.unwrap_or(u64::from(vm_memory_mib) << 20),
        user_ns: us(c.cpu_user_usec),
        kernel_ns: us(c.cpu_system_usec),
        processes: c.pids,
    });
    if let Some(usage) = m.cpu.as_mut().and_then(|c| c.usage.as_mut()) {
        usage.total = us(c.cpu_usec);
    }
    m
}

struct Figures {
    memory: u64,
    limit: u64,
    user_ns: u64,
    kernel_ns: u64,
    processes: u64,
}

/// Figures as containerd's cgroup v1 metrics.
fn metrics(f: Figures) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: f.processes,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: f.user_ns + f.kernel_ns,
                user: f.user_ns,
                kernel: f.kernel_ns,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            rss: f.memory,
            usage: MessageField::some(MemoryEntry {
                usage: f.memory,
                limit: f.limit,
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
    fn a_containers_cgroup_figures_become_its_metrics() {
        let mut c = vmm_agent::CgroupStats {
            memory: 5 << 20,
            memory_max: Some(64 << 20),
            cpu_usec: 30,
            cpu_user_usec: 20,
            cpu_system_usec: 10,
            pids: 3,
        };
        let m = of_container(&c, 256);
        let usage = m.memory.usage.as_ref().unwrap();
        assert_eq!((usage.usage, usage.limit), (5 << 20, 64 << 20));
        let cpu = m.cpu.usage.as_ref().unwrap();
        assert_eq!((cpu.total, cpu.user, cpu.kernel), (30_000, 20_000, 10_000));
        assert_eq!(m.pids.current, 3);
        c.memory_max = None;
        assert_eq!(of_container(&c, 256).memory.usage.limit, 256 << 20);
    }

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
