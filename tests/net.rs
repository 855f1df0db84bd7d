//! virtio-net on a real guest with the TAP backend, inside a network
//! namespace this test creates (so the host's own network is untouched):
//! the guest fetches a file from an HTTP server on the namespace's side of
//! the TAP link.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{describe, ok, Guest, Scratch};
use serde_json::json;

/// A network namespace with a TAP interface at 10.0.3.1/24, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("vmmtest-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {} (this test needs root and iproute2)",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.0, "tuntap", "add", "vmtap0", "mode", "tap"]);
        ip(&["-n", &ns.0, "addr", "add", "10.0.3.1/24", "dev", "vmtap0"]);
        ip(&["-n", &ns.0, "link", "set", "vmtap0", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_guest_on_a_tap_link_fetches_a_file() {
    let ns = Netns::new();
    let scratch = Scratch::new("net");
    let blob: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(7919) >> 5) as u8)
        .collect();
    let served = scratch.path("www");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("blob"), &blob).unwrap();
    // An HTTP server on the namespace's end of the link; it says when it
    // listens.
    let mut server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c"])
            .arg(
                "import functools, http.server, sys\n\
                 h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n\
                 s = http.server.ThreadingHTTPServer(('10.0.3.1', 8000), h)\n\
                 print('listening', flush=True)\n\
                 s.serve_forever()",
            )
            .arg(&served)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");

    let config = json!({
        "memory_mib": 256,
        "rootfs": {},
        "serial": scratch.path("console.log"),
        "network": {"mode": "tap", "tap": "vmtap0", "address": "10.0.3.2/24",
                    "gateway": "10.0.3.1"},
    });
    let guest = Guest::boot_with(scratch, &config, &["ip", "netns", "exec", &ns.0]);
    let out = ok(guest.sh(
        "python3 -c \"import hashlib, urllib.request; d = urllib.request.urlopen('http://10.0.3.1:8000/blob', timeout=60).read(); print(len(d), hashlib.sha256(d).hexdigest())\"",
    ));
    let sum = {
        let out = Command::new("sha256sum")
            .arg(served_path(&guest))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(out, format!("{} {sum}", blob.len()), "{out}");
    let addr = guest.sh("cat /proc/net/fib_trie | grep -c 10.0.3.2");
    assert!(addr.status.success(), "{}", describe(&addr));
}

fn served_path(g: &Guest) -> std::path::PathBuf {
    g.scratch.path("www").join("blob")
}
