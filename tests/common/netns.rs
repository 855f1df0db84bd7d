//! Network namespaces the tests make for themselves (traffic stays inside
//! them or on the host's loopback), through iproute2's `ip`.

use std::path::PathBuf;
use std::process::Command;

/// A network namespace of the test's own (`ip netns`), removed on drop
/// with the links in it.
pub struct Netns(pub String);

impl Netns {
    /// `vmmtest-TAG-PID`, with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("vmmtest-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's file (what `setns` and an OCI spec take).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `ip ARGS`, which must succeed; its standard output.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {} (this test needs root and iproute2)",
        super::describe(&out)
    );
    super::text(&out)
}
