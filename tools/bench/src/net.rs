//! `vmm bench net`: TCP throughput host -> guest and guest -> host and
//! connection set-up time through the user-mode network, and the same
//! through qemu's user-mode network (`-netdev user`, slirp) with the same
//! kernel, initramfs, root image and guest script, in the same run.
//!
//! The servers run in this process on the host's loopback; each guest
//! reaches them as 10.0.2.2, fetches `netbench.py` from one of them as its
//! init's command, prints its figures on the console and powers off. JSON
//! keys: docs/bench.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use serde_json::{json, Value};

use crate::common::{
    launch_to_marker, qemu_spawn_error, qemu_to_marker, qemu_with_root_disk, two_decimals, Error,
    Figures, GuestArtifacts, MedianTable, Report, ScratchDir, Watched,
};
use vmm::config::{
    EgressConfig, EgressDefault, NetworkConfig, RootfsConfig, SerialOutput, VmConfig,
};

const SCRIPT: &str = include_str!("netbench.py");
const DONE: &str = "netbench-done";
const MEMORY_MIB: u64 = 512;

pub struct NetBenchOptions {
    /// MiB per throughput figure.
    pub mib: u64,
    /// Figures per direction (in one boot).
    pub runs: u32,
    /// Connection set-ups timed.
    pub connects: u32,
    /// Also run qemu with `-netdev user`.
    pub qemu: bool,
}

/// A target's figures, as the guest script prints them and in JSON:
/// MiB/s each way, ms per connection set-up.
const KEYS: [&str; 3] = ["host_to_guest_mibs", "guest_to_host_mibs", "connect_ms"];

/// The figures on the `netbench` console line of a run.
fn parse(watched: &Watched) -> Option<Figures<3>> {
    let v: Value = watched
        .lines
        .iter()
        .filter_map(|l| l.split_once("netbench ").map(|(_, j)| j))
        .find_map(|j| serde_json::from_str(j.trim()).ok())?;
    Some(Figures::parse(&v, KEYS))
}

/// Results of `vmm bench net`.
#[derive(Debug, Default)]
pub struct NetBench {
    pub mib: u64,
    pub runs: u32,
    pub vmm: Figures<3>,
    pub qemu: Option<Figures<3>>,
    pub qemu_skipped: Option<String>,
}

impl NetBench {
    /// vmm / qemu for the throughputs, qemu / vmm for the set-up time
    /// (above 1 is better for us in all three).
    fn ratios(&self) -> Option<[Option<f64>; 3]> {
        let q = self.qemu.as_ref()?.medians();
        let v = self.vmm.medians();
        Some([
            Some(v[0]? / q[0]?),
            Some(v[1]? / q[1]?),
            Some(q[2]? / v[2]?),
        ])
    }
}

impl Report for NetBench {
    fn to_json(&self) -> Value {
        let ratio = |i: usize| self.ratios().and_then(|r| r[i]);
        json!({
            "mib": self.mib,
            "runs": self.runs,
            "vmm_user_net": self.vmm.to_json(KEYS),
            "qemu_slirp": self.qemu.as_ref().map(|q| q.to_json(KEYS)),
            "vmm_vs_qemu": {
                "host_to_guest": ratio(0),
                "guest_to_host": ratio(1),
                "connect_speedup": ratio(2),
            },
            "qemu_skipped": self.qemu_skipped,
        })
    }

    fn table(&self) -> String {
        let title = format!("{} MiB per transfer, {} runs; medians", self.mib, self.runs);
        let columns = [
            ("target", 24),
            ("host->guest MiB/s", 16),
            ("guest->host MiB/s", 16),
            ("connect ms", 12),
        ];
        let mut table = MedianTable::new(&title, &columns);
        table.row("vmm user network", &self.vmm.medians());
        if let Some(q) = &self.qemu {
            table.row("qemu -netdev user", &q.medians());
        }
        if let Some(r) = self.ratios() {
            table.note(&format!(
                "vmm / qemu: host->guest {}x, guest->host {}x; connect {}x faster",
                two_decimals(r[0]),
                two_decimals(r[1]),
                two_decimals(r[2])
            ));
        }
        if let Some(why) = &self.qemu_skipped {
            table.note(&format!("qemu: skipped ({why})"));
        }
        table.finish()
    }
}

/// The host side: four listeners on 127.0.0.1, served by threads that
/// live as long as the bench process (a handful of idle threads).
struct Servers {
    script: u16,
}

/// A server on a free loopback port that runs `serve` on each connection
/// in a thread of its own; its port.
fn listen(
    what: &'static str,
    serve: impl Fn(TcpStream) + Send + Sync + 'static,
) -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Spawn {
        program: format!("the {what} server"),
        source,
    })?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
    Ok(port)
}

impl Servers {
    fn start(opts: &NetBenchOptions) -> Result<Servers, Error> {
        let source = listen("source", |mut conn| {
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                return;
            }
            let mut left: usize = line.trim().parse().unwrap_or(0);
            let chunk = vec![0x5au8; 1 << 20];
            while left > 0 {
                let n = left.min(chunk.len());
                if conn.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        })?;
        let sink = listen("sink", |mut conn| {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    let _ = conn.write_all(b"ok");
                    return;
                }
            }
        })?;
        let accept = listen("accept", |_| {})?;
        let header = format!(
            "MIB, RUNS, CONNECTS, SOURCE, SINK, ACCEPT = {}, {}, {}, {source}, {sink}, {accept}\n",
            opts.mib, opts.runs, opts.connects
        );
        let script = header + SCRIPT;
        let script = listen("script", move |mut conn| {
            let _ = conn.write_all(script.as_bytes());
        })?;
        Ok(Servers { script })
    }

    /// The guest's init command: fetch the script and run it.
    fn guest_command(&self) -> String {
        format!(
            "-- python3 -c \"import socket;s=socket.create_connection(('10.0.2.2',{}));exec(s.makefile().read())\"",
            self.script
        )
    }
}

pub fn net(opts: &NetBenchOptions) -> Result<NetBench, Error> {
    let guest = GuestArtifacts::resolve(true)?;
    let servers = Servers::start(opts)?;
    let mut result = NetBench {
        mib: opts.mib,
        runs: opts.runs,
        ..Default::default()
    };

    let config = VmConfig {
        memory_mib: MEMORY_MIB,
        serial: SerialOutput::Stdout,
        rootfs: Some(RootfsConfig::default()),
        network: Some(NetworkConfig::User {
            egress: EgressConfig {
                default: EgressDefault::Deny,
                allow: vec!["10.0.2.2".into()],
                deny: Vec::new(),
            },
            port_forwards: Vec::new(),
            dns: None,
            mac: None,
            rate_limit: None,
        }),
        cmdline: Some(servers.guest_command()),
        ..Default::default()
    };
    let watched = launch_to_marker(&config, &ScratchDir::new("net")?, &[], DONE)?;
    result.vmm = parse(&watched).ok_or_else(|| Error::no_figures("vmm", &watched))?;

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
        return Ok(result);
    }
    let extra = format!("ip=dhcp {}", servers.guest_command());
    let mut cmd = qemu_with_root_disk(&guest, extra, MEMORY_MIB);
    cmd.args(["-netdev", "user,id=n0"])
        .args(["-device", "virtio-net-device,netdev=n0"]);
    let watched = qemu_to_marker(cmd, DONE).map_err(qemu_spawn_error)?;
    result.qemu = Some(parse(&watched).ok_or_else(|| Error::no_figures("qemu", &watched))?);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(lines: &[&str]) -> Watched {
        Watched {
            seen: None,
            success: true,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn figures_are_read_from_the_console_and_ratios_point_the_same_way() {
        let f = parse(&watched(&[
            "noise",
            r#"[ 1.0] netbench {"host_to_guest_mibs": [4.0, 6.0], "guest_to_host_mibs": [3.0], "connect_ms": [2.0, 4.0, 9.0]}"#,
        ]))
        .unwrap();
        assert_eq!(f.medians(), [Some(5.0), Some(3.0), Some(4.0)]);
        let bench = NetBench {
            vmm: f,
            qemu: Some(Figures([vec![2.5], vec![1.5], vec![8.0]])),
            ..Default::default()
        };
        assert_eq!(bench.ratios().unwrap(), [Some(2.0), Some(2.0), Some(2.0)]);
        assert!(parse(&watched(&["netbench-done"])).is_none());
    }
}
