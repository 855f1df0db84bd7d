//! The VMM's thread roles: each thread's job, and so its seccomp filter
//! on Linux.

/// A thread's job in the VMM process, and so its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs one vCPU: KVM_RUN and the device register accesses it exits
    /// for (the serial port, virtio-mmio registers, device activation).
    Vcpu,
    /// The device event loop: queues, disk, virtio-fs, vsock, the user
    /// network, and the machine's actions (pause, snapshot, fork).
    DeviceLoop,
    /// The control socket's thread: HTTP requests in, actions out.
    Control,
    /// A restored VM's helper that sends the guest agent fresh randomness.
    Reseed,
    /// Starts fork children (`vmm __fork-child`) for the device loop.
    /// Children inherit its filter, so it holds what a whole VMM process
    /// needs, from start-up on, plus starting a process; each child then
    /// narrows its threads to their roles.
    Spawner,
    /// `vmm run`'s main thread once its VM runs: the command through the
    /// guest agent, its output to this process's, and (with `-i`) a thread
    /// that streams standard input.
    RunClient,
    /// A jail's launcher and init once the VMM runs (docs/security.md, "The
    /// jail"): wait for processes, pass signals on, report a status,
    /// remove the jail's folder.
    Jail,
    /// A vhost-user daemon (`vmm device`): the whole process, from before
    /// its first connection: the device's work on the frontend's rings and
    /// memory, and the framework's threads.
    DeviceDaemon,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Vcpu,
        Role::DeviceLoop,
        Role::Control,
        Role::Reseed,
        Role::Spawner,
        Role::RunClient,
        Role::Jail,
        Role::DeviceDaemon,
    ];

    /// The role's name in reports and docs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::DeviceLoop => "device loop",
            Role::Control => "control socket",
            Role::Reseed => "reseed",
            Role::Spawner => "spawner",
            Role::RunClient => "run client",
            Role::Jail => "jail",
            Role::DeviceDaemon => "device daemon",
        }
    }
}
