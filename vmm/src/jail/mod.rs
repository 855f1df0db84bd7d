//! The jail a VMM process runs in (docs/security.md, "The jail"): new
//! user, mount, PID, IPC and UTS namespaces, a private root with only what
//! the VM uses, no capabilities, resource limits, Landlock and a cgroup.
//!
//! [`probe`] finds out what this host allows (`vmm doctor` reports it).

pub mod probe;
