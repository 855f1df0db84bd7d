//! What each thread role may call, and why (docs/security.md prints these
//! lists; a test keeps the two the same).
//!
//! x86_64 keeps old forms of some calls (open, stat, poll, unlink...) that
//! glibc and Rust's std call there; aarch64 has only the newer ones
//! (openat, newfstatat, ppoll, unlinkat...). Entries for one architecture
//! only are marked with its `cfg`; the lists are x86_64's as printed.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::Role;

/// Which arguments of a call are allowed.
#[derive(Clone, Copy)]
enum Args {
    Any,
    /// ioctl: KVM's (type 0xAE), PAGEMAP_SCAN, and FIONBIO/FIOCLEX on
    /// sockets and files.
    Ioctl,
    /// ioctl: FIONBIO and FIOCLEX only.
    DescriptorFlags,
    /// socket: only these address families (argument 0).
    Families(&'static [i32]),
    /// clone: only a thread of this process (CLONE_THREAD in the flags).
    Thread,
}

/// One allowed call and why the role needs it.
struct Allowed {
    nr: i64,
    args: Args,
    why: &'static str,
}

const fn any(nr: i64, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::Any,
        why,
    }
}

/// What every thread of a Rust program needs to run at all: memory, locks,
/// signals, time, ending the thread.
const RUNTIME: &[Allowed] = &[
    any(libc::SYS_read, "eventfds, sockets and files it was given"),
    any(
        libc::SYS_write,
        "eventfds, sockets, files, log lines on stderr",
    ),
    any(libc::SYS_close, "descriptors it is done with"),
    any(
        libc::SYS_fcntl,
        "descriptor flags (non-blocking, close-on-exec)",
    ),
    any(libc::SYS_futex, "locks, channels, thread parking"),
    any(libc::SYS_mmap, "the allocator"),
    any(libc::SYS_munmap, "the allocator"),
    any(libc::SYS_mremap, "the allocator"),
    any(libc::SYS_mprotect, "the allocator growing a thread's heap"),
    any(libc::SYS_madvise, "the allocator returning memory"),
    any(libc::SYS_brk, "the allocator"),
    any(
        libc::SYS_rt_sigreturn,
        "return from a signal handler (vCPU kicks)",
    ),
    any(libc::SYS_rt_sigprocmask, "thread exit and start masks"),
    any(libc::SYS_sigaltstack, "thread exit frees the signal stack"),
    any(libc::SYS_sched_yield, "spin-then-park locks"),
    any(libc::SYS_clock_gettime, "time when the vDSO is not used"),
    any(libc::SYS_clock_nanosleep, "short waits in retry loops"),
    any(libc::SYS_nanosleep, "short waits in retry loops"),
    any(libc::SYS_getrandom, "hash map seeds"),
    any(libc::SYS_getpid, "the process id in logs and ids"),
    any(libc::SYS_gettid, "the thread id"),
    any(
        libc::SYS_geteuid,
        "checks that a socket's peer is this user",
    ),
    any(libc::SYS_timerfd_settime, "timers of the event loops"),
    #[cfg(target_arch = "x86_64")]
    any(
        libc::SYS_epoll_wait,
        "event loops (a device polls its backend)",
    ),
    any(libc::SYS_epoll_pwait, "event loops"),
    any(libc::SYS_rseq, "glibc's restartable sequences"),
    any(
        libc::SYS_restart_syscall,
        "a call interrupted by a kick resumes",
    ),
    any(libc::SYS_exit, "the thread ends"),
    any(libc::SYS_exit_group, "the process ends"),
];

/// A vCPU thread runs the device code its exits reach: register accesses,
/// and a device's activation, which may drain its backend at once.
const VCPU: &[Allowed] = &[
    Allowed {
        nr: libc::SYS_ioctl,
        args: Args::Ioctl,
        why: "KVM_RUN and the vCPU's register ioctls (pause saves them)",
    },
    any(
        libc::SYS_tgkill,
        "a vCPU that stops the VM kicks the others",
    ),
    any(libc::SYS_readv, "a device's backend at activation"),
    any(libc::SYS_writev, "console output, a device's backend"),
    any(libc::SYS_pread64, "a device's backend at activation"),
    any(libc::SYS_pwrite64, "a device's backend at activation"),
    any(libc::SYS_fsync, "the console file"),
    any(
        libc::SYS_recvfrom,
        "the user network's sockets at activation",
    ),
    any(libc::SYS_sendto, "the user network's sockets at activation"),
    any(libc::SYS_recvmsg, "vsock sockets at activation"),
    any(libc::SYS_sendmsg, "vsock sockets at activation"),
    any(
        libc::SYS_epoll_ctl,
        "a device's backend joins its loop at activation",
    ),
];

/// The device loop: the VM's own calls (KVM, fork children, snapshots),
/// beyond [`DEVICES`].
const DEVICE_LOOP: &[Allowed] = &[
    Allowed {
        nr: libc::SYS_ioctl,
        args: Args::Ioctl,
        why: "irqfd/ioeventfd set-up, interrupt controller and clock state for snapshots and forks",
    },
    any(libc::SYS_tgkill, "pause: kick each vCPU out of KVM_RUN"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_mkdir, "a snapshot's directory"),
    #[cfg(target_arch = "x86_64")]
    any(
        libc::SYS_readlink,
        "the program's path, which fork children run",
    ),
    any(libc::SYS_dup, "descriptors handed to a fork child"),
    any(libc::SYS_memfd_create, "a fork's memory overlay"),
    any(libc::SYS_socketpair, "sockets to fork children"),
    any(libc::SYS_kill, "stop fork children and spares"),
    any(libc::SYS_wait4, "reap fork children"),
    any(libc::SYS_waitid, "reap fork children"),
    any(libc::SYS_pidfd_open, "watch fork children"),
];

/// What the devices' work needs, in a VM's device loop and in a vhost-user
/// daemon alike: disk and share files, vsock and network sockets.
const DEVICES: &[Allowed] = &[
    any(
        libc::SYS_epoll_ctl,
        "devices and sockets join and leave the loop",
    ),
    any(libc::SYS_epoll_create1, "a fork's or snapshot's wait"),
    any(libc::SYS_eventfd2, "devices made at activation"),
    any(libc::SYS_readv, "disk and socket I/O"),
    any(libc::SYS_writev, "disk and socket I/O"),
    any(libc::SYS_pread64, "disk, FUSE READ"),
    any(libc::SYS_pwrite64, "disk, FUSE WRITE"),
    any(libc::SYS_preadv, "disk"),
    any(libc::SYS_pwritev, "disk"),
    any(libc::SYS_preadv2, "disk"),
    any(libc::SYS_pwritev2, "disk"),
    any(libc::SYS_lseek, "disk, FUSE LSEEK"),
    any(libc::SYS_fsync, "disk flush, FUSE FSYNC, snapshot files"),
    any(libc::SYS_fdatasync, "disk flush, FUSE FSYNC"),
    any(libc::SYS_fallocate, "FUSE FALLOCATE, disk discard"),
    any(
        libc::SYS_ftruncate,
        "FUSE SETATTR size, memory files of a fork",
    ),
    any(
        libc::SYS_openat,
        "FUSE LOOKUP/OPEN/CREATE under the share, snapshot files",
    ),
    any(
        libc::SYS_openat2,
        "a fork child's or restored VM's share inodes, opened again by path beneath the share",
    ),
    any(libc::SYS_newfstatat, "FUSE GETATTR/LOOKUP"),
    any(libc::SYS_fstat, "FUSE GETATTR, disk size"),
    any(libc::SYS_statx, "FUSE GETATTR"),
    any(libc::SYS_fstatfs, "FUSE STATFS"),
    any(libc::SYS_syncfs, "FUSE SYNCFS"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_chmod, "sockets made private to this user"),
    any(libc::SYS_getdents64, "FUSE READDIR"),
    any(libc::SYS_mkdirat, "FUSE MKDIR"),
    any(
        libc::SYS_mknodat,
        "FUSE MKNOD (regular files and FIFOs only)",
    ),
    any(libc::SYS_unlinkat, "FUSE UNLINK/RMDIR"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_unlink, "its sockets at stop"),
    any(libc::SYS_renameat, "FUSE RENAME"),
    any(libc::SYS_renameat2, "FUSE RENAME, snapshot commit"),
    any(libc::SYS_linkat, "FUSE LINK"),
    any(libc::SYS_symlinkat, "FUSE SYMLINK"),
    any(libc::SYS_readlinkat, "FUSE READLINK"),
    any(libc::SYS_fchmod, "FUSE SETATTR mode"),
    any(libc::SYS_fchmodat, "FUSE SETATTR mode"),
    any(libc::SYS_fchown, "FUSE SETATTR owner"),
    any(libc::SYS_fchownat, "FUSE SETATTR owner"),
    any(libc::SYS_utimensat, "FUSE SETATTR times"),
    any(libc::SYS_fgetxattr, "FUSE GETXATTR"),
    any(libc::SYS_fsetxattr, "FUSE SETXATTR"),
    any(libc::SYS_flistxattr, "FUSE LISTXATTR"),
    any(libc::SYS_fremovexattr, "FUSE REMOVEXATTR"),
    any(libc::SYS_getxattr, "FUSE GETXATTR through /proc/self/fd"),
    any(libc::SYS_lgetxattr, "FUSE GETXATTR"),
    any(libc::SYS_setxattr, "FUSE SETXATTR through /proc/self/fd"),
    any(libc::SYS_lsetxattr, "FUSE SETXATTR"),
    any(libc::SYS_listxattr, "FUSE LISTXATTR through /proc/self/fd"),
    any(libc::SYS_llistxattr, "FUSE LISTXATTR"),
    any(
        libc::SYS_removexattr,
        "FUSE REMOVEXATTR through /proc/self/fd",
    ),
    any(libc::SYS_lremovexattr, "FUSE REMOVEXATTR"),
    any(
        libc::SYS_copy_file_range,
        "FUSE COPY_FILE_RANGE, disk layer copies",
    ),
    Allowed {
        nr: libc::SYS_socket,
        args: Args::Families(&[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]),
        why: "vsock host sockets (Unix), the user network's host sockets (IPv4/IPv6)",
    },
    any(
        libc::SYS_connect,
        "guest connections to host vsock ports and NAT peers",
    ),
    any(libc::SYS_accept4, "host vsock clients, port forwards"),
    any(
        libc::SYS_bind,
        "port forwards, UDP sockets of the user network",
    ),
    any(libc::SYS_listen, "port forwards"),
    any(libc::SYS_sendto, "sockets"),
    any(libc::SYS_recvfrom, "sockets"),
    any(libc::SYS_sendmsg, "sockets, descriptors to fork children"),
    any(libc::SYS_recvmsg, "sockets"),
    any(libc::SYS_shutdown, "half-closed vsock and TCP connections"),
    any(libc::SYS_getsockopt, "connect results (SO_ERROR)"),
    any(libc::SYS_setsockopt, "socket options"),
    any(libc::SYS_getsockname, "port forward and NAT addresses"),
    any(libc::SYS_getpeername, "NAT peers"),
];

/// A vhost-user daemon (`vmm device`), beyond [`DEVICES`]: the framework's
/// threads and the guest memory the frontend sends. Its threads inherit
/// the filter of the main thread, which installs it before starting them.
const DEVICE_DAEMON: &[Allowed] = &[
    any(
        libc::SYS_epoll_create1,
        "the worker's loop, the vsock host sockets' loop",
    ),
    any(libc::SYS_eventfd2, "the worker's wake-ups and its end"),
    Allowed {
        nr: libc::SYS_ioctl,
        args: Args::DescriptorFlags,
        why: "non-blocking vsock sockets (FIONBIO)",
    },
    any(
        libc::SYS_timerfd_create,
        "the vsock deadlines of a new connection",
    ),
    any(libc::SYS_prctl, "thread names"),
    any(
        libc::SYS_rt_sigaction,
        "glibc's own handlers, installed when the first thread starts",
    ),
    any(libc::SYS_ppoll, "the frontend's socket"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll, "the frontend's socket"),
];

const CONTROL: &[Allowed] = &[
    any(libc::SYS_epoll_ctl, "clients join and leave its loop"),
    any(libc::SYS_accept4, "control socket clients"),
    any(libc::SYS_recvfrom, "requests"),
    any(libc::SYS_sendto, "replies"),
    any(libc::SYS_writev, "replies"),
    Allowed {
        nr: libc::SYS_ioctl,
        args: Args::Ioctl,
        why: "non-blocking client sockets (FIONBIO)",
    },
    any(libc::SYS_getsockopt, "client credentials (SO_PEERCRED)"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_unlink, "its socket at stop"),
    #[cfg(target_arch = "aarch64")]
    any(libc::SYS_unlinkat, "its socket at stop"),
];

/// A client of the guest agent (`agent::AgentClient`): the reseed helper,
/// and `vmm run`'s own thread with more below.
const AGENT_CLIENT: &[Allowed] = &[
    Allowed {
        nr: libc::SYS_socket,
        args: Args::Families(&[libc::AF_UNIX]),
        why: "the vsock socket to the guest agent",
    },
    any(libc::SYS_connect, "the vsock socket to the guest agent"),
    any(libc::SYS_setsockopt, "its timeouts"),
    any(libc::SYS_getsockopt, "socket errors"),
    any(
        libc::SYS_recvfrom,
        "the agent's answers (a command's output)",
    ),
    any(
        libc::SYS_sendto,
        "requests (and a command's standard input)",
    ),
];

/// `vmm run`'s thread, beyond [`AGENT_CLIENT`].
const RUN_CLIENT: &[Allowed] = &[
    any(libc::SYS_shutdown, "the end of standard input"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll, "waits for the agent"),
    #[cfg(target_arch = "aarch64")]
    any(libc::SYS_ppoll, "waits for the agent"),
];

/// Starting threads but no process: `vmm run`'s standard-input thread, a
/// vhost-user daemon's framework threads.
const THREADS: &[Allowed] = &[
    Allowed {
        nr: libc::SYS_clone,
        args: Args::Thread,
        why: "threads of its own (threads only)",
    },
    any(
        libc::SYS_clone3,
        "answered ENOSYS by a filter of its own, so that threads start through clone, whose flags a filter can check",
    ),
    any(libc::SYS_set_robust_list, "thread start"),
    any(
        libc::SYS_sched_getaffinity,
        "thread start (Rust reads the new thread's attributes)",
    ),
];

/// What starting a VMM process needs beyond the roles above: the Rust
/// and glibc start, opening the hypervisor and the VM's files, building
/// the VM, threads, installing filters, starting a child process.
/// A jail's launcher and init: each only waits, passes signals on and
/// reports; the launcher removes the jail's folder at the end.
const JAIL: &[Allowed] = &[
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll, "wait for the status or a signal"),
    any(libc::SYS_ppoll, "wait for the status or a signal"),
    any(libc::SYS_kill, "pass a signal on"),
    any(libc::SYS_wait4, "reap the jail's processes"),
    any(libc::SYS_openat, "remove the jail's folder"),
    any(libc::SYS_getdents64, "remove the jail's folder"),
    any(libc::SYS_newfstatat, "remove the jail's folder"),
    any(libc::SYS_statx, "remove the jail's folder"),
    any(libc::SYS_fstat, "remove the jail's folder"),
    any(libc::SYS_unlinkat, "remove the jail's folder"),
];

const START: &[Allowed] = &[
    any(libc::SYS_execve, "start `vmm __fork-child`"),
    any(libc::SYS_clone, "start a process or thread"),
    any(libc::SYS_clone3, "start a process or thread"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_vfork, "start a process"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_dup2, "a child's standard input"),
    any(libc::SYS_dup3, "a child's standard input"),
    any(libc::SYS_pipe2, "a child's start report"),
    any(libc::SYS_close_range, "a child closes what it does not own"),
    any(libc::SYS_rt_sigaction, "signal handlers"),
    any(libc::SYS_timerfd_create, "timers of the event loops"),
    any(libc::SYS_prctl, "thread names, no_new_privs, death signal"),
    any(libc::SYS_seccomp, "a child installs its threads' filters"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_arch_prctl, "thread-local storage at start"),
    any(libc::SYS_set_tid_address, "thread start"),
    any(libc::SYS_set_robust_list, "thread start"),
    any(libc::SYS_prlimit64, "stack size at start"),
    any(libc::SYS_sched_getaffinity, "CPU count"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll, "standard descriptors checked at start"),
    any(libc::SYS_ppoll, "waits on sockets"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_readlink, "the program's own path"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_open, "files"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_stat, "files"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_lstat, "files"),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_access, "files"),
    #[cfg(target_arch = "aarch64")]
    any(libc::SYS_faccessat, "files"),
    any(libc::SYS_faccessat2, "files"),
    any(libc::SYS_getcwd, "relative paths"),
    any(libc::SYS_getuid, "the runtime directory's owner"),
    any(libc::SYS_geteuid, "the runtime directory's owner"),
    any(libc::SYS_getgid, "the runtime directory's owner"),
    any(libc::SYS_getegid, "the runtime directory's owner"),
    any(libc::SYS_uname, "the host's kernel version"),
    any(libc::SYS_sysinfo, "host memory"),
    any(libc::SYS_setsid, "a detached VM's session"),
    any(libc::SYS_ioctl, "terminal and KVM set-up"),
    any(libc::SYS_pidfd_send_signal, "stop children"),
];

impl Role {
    /// The calls beyond the runtime's that the role needs.
    fn own(self) -> Vec<&'static Allowed> {
        match self {
            Role::Vcpu => VCPU.iter().collect(),
            Role::DeviceLoop => DEVICE_LOOP.iter().chain(DEVICES).collect(),
            Role::DeviceDaemon => [DEVICE_DAEMON, THREADS, DEVICES]
                .into_iter()
                .flatten()
                .collect(),
            Role::Control => CONTROL.iter().collect(),
            Role::Reseed => AGENT_CLIENT.iter().collect(),
            Role::Spawner => [VCPU, DEVICE_LOOP, DEVICES, CONTROL, AGENT_CLIENT, START]
                .into_iter()
                .flatten()
                .collect(),
            Role::RunClient => [AGENT_CLIENT, RUN_CLIENT, THREADS]
                .into_iter()
                .flatten()
                .collect(),
            Role::Jail => JAIL.iter().collect(),
        }
    }

    /// Calls the role's filter allows but a filter of their own answers
    /// ENOSYS: clone3, whose flags sit in memory a filter cannot read, on
    /// a role that may start threads but not processes.
    pub(super) fn not_implemented(self) -> &'static [i64] {
        match self {
            Role::RunClient | Role::DeviceDaemon => &[libc::SYS_clone3],
            _ => &[],
        }
    }

    /// Every call the role may make, each once, with why (the first
    /// reason given for it), sorted by number.
    fn allowed(self) -> Vec<&'static Allowed> {
        let mut seen = BTreeMap::new();
        for a in RUNTIME.iter().chain(self.own()) {
            let entry = seen.entry(a.nr).or_insert(a);
            // The spawner takes ioctl without argument checks (START's).
            if self == Role::Spawner && matches!(a.args, Args::Any) {
                *entry = a;
            }
        }
        seen.into_values().collect()
    }

    /// The role's rules for seccompiler: call number -> argument rules
    /// (none: any arguments).
    pub(super) fn rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.allowed()
            .into_iter()
            .map(|a| (a.nr, arg_rules(a.args)))
            .collect()
    }

    /// `(call, why)` for the docs.
    pub fn calls(self) -> Vec<(&'static str, &'static str)> {
        self.allowed()
            .into_iter()
            .map(|a| (crate::arch::syscall_names::name(a.nr).unwrap_or("?"), a.why))
            .collect()
    }
}

fn arg_rules(args: Args) -> Vec<SeccompRule> {
    let rule = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .expect("a one-condition rule on a valid argument")
    };
    match args {
        Args::Any => Vec::new(),
        Args::Ioctl => vec![
            // _IOC type byte 0xAE: KVM's ioctls.
            rule(1, SeccompCmpOp::MaskedEq(0xff00), 0xae00),
            // PAGEMAP_SCAN (type 'f', number 16): a fork finds the pages
            // the VM changed since its last fork.
            rule(1, SeccompCmpOp::MaskedEq(0xffff), 0x6610),
            rule(1, SeccompCmpOp::Eq, libc::FIONBIO),
            rule(1, SeccompCmpOp::Eq, libc::FIOCLEX),
        ],
        Args::DescriptorFlags => vec![
            rule(1, SeccompCmpOp::Eq, libc::FIONBIO),
            rule(1, SeccompCmpOp::Eq, libc::FIOCLEX),
        ],
        Args::Families(families) => families
            .iter()
            .map(|&f| rule(0, SeccompCmpOp::Eq, f as u64))
            .collect(),
        Args::Thread => {
            let thread = libc::CLONE_THREAD as u64;
            vec![rule(0, SeccompCmpOp::MaskedEq(thread), thread)]
        }
    }
}
