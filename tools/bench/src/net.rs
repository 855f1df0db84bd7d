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
    microvm_cmdline, qemu_command, require_built, tail, time_to_marker, vmm_exe, Error, Report,
    Stats,
};
use vmm::artifacts::{self, KernelFlavour};
use vmm::config::{
    EgressConfig, EgressDefault, Flavour, NetworkConfig, RootfsConfig, SerialOutput, VmConfig,
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

/// One target's figures.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub rx_mibs: Vec<f64>,
    pub tx_mibs: Vec<f64>,
    pub connect_ms: Vec<f64>,
}

impl Figures {
    fn parse(lines: &[String]) -> Option<Figures> {
        let v: Value = lines
            .iter()
            .filter_map(|l| l.split_once("netbench ").map(|(_, j)| j))
            .find_map(|j| serde_json::from_str(j.trim()).ok())?;
        Some(Figures {
            rx_mibs: Stats::list(&v, "rx_mibs"),
            tx_mibs: Stats::list(&v, "tx_mibs"),
            connect_ms: Stats::list(&v, "connect_ms"),
        })
    }

    fn medians(&self) -> [Option<f64>; 3] {
        [&self.rx_mibs, &self.tx_mibs, &self.connect_ms].map(|v| Stats::median_of(v))
    }

    fn to_json(&self) -> Value {
        json!({
            "host_to_guest_mibs": Stats::json_of(&self.rx_mibs),
            "guest_to_host_mibs": Stats::json_of(&self.tx_mibs),
            "connect_ms": Stats::json_of(&self.connect_ms),
        })
    }
}

/// Results of `vmm bench net`.
#[derive(Debug, Default)]
pub struct NetBench {
    pub mib: u64,
    pub runs: u32,
    pub vmm: Figures,
    pub qemu: Option<Figures>,
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
            "vmm_user_net": self.vmm.to_json(),
            "qemu_slirp": self.qemu.as_ref().map(Figures::to_json),
            "vmm_vs_qemu": {
                "host_to_guest": ratio(0),
                "guest_to_host": ratio(1),
                "connect_speedup": ratio(2),
            },
            "qemu_skipped": self.qemu_skipped,
        })
    }

    fn table(&self) -> String {
        let mut out = format!(
            "{} MiB per transfer, {} runs; medians\n{:<24} {:>16} {:>16} {:>12}\n",
            self.mib, self.runs, "target", "host->guest MiB/s", "guest->host MiB/s", "connect ms"
        );
        let mut row = |name: &str, f: &Figures| {
            let m = f
                .medians()
                .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")));
            out.push_str(&format!(
                "{name:<24} {:>16} {:>16} {:>12}\n",
                m[0], m[1], m[2]
            ));
        };
        row("vmm user network", &self.vmm);
        if let Some(q) = &self.qemu {
            row("qemu -netdev user", q);
        }
        if let Some(r) = self.ratios() {
            let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
            out.push_str(&format!(
                "vmm / qemu: host->guest {}x, guest->host {}x; connect {}x faster\n",
                f(r[0]),
                f(r[1]),
                f(r[2])
            ));
        }
        if let Some(why) = &self.qemu_skipped {
            out.push_str(&format!("qemu: skipped ({why})\n"));
        }
        out
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
    let hv = vmm::open_hypervisor()?;
    let flavour = KernelFlavour::resolve(Flavour::Auto, hv.kind());
    drop(hv);
    let kernel = artifacts::default_kernel(flavour);
    let initramfs = artifacts::default_minimal_initramfs();
    let base = artifacts::default_base_image();
    require_built(&[
        ("kernel", &kernel),
        ("initramfs", &initramfs),
        ("base image", &base),
    ])?;
    let servers = Servers::start(opts)?;
    let mut result = NetBench {
        mib: opts.mib,
        runs: opts.runs,
        ..Default::default()
    };

    let scratch = std::env::temp_dir().join(format!("vmm-bench-net-{}.json", std::process::id()));
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
        }),
        cmdline: Some(servers.guest_command()),
        ..Default::default()
    };
    let written = std::fs::write(&scratch, serde_json::to_string(&config).unwrap_or_default());
    let exe = vmm_exe()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("launch").arg("--config").arg(&scratch);
    let watched = written
        .map_err(|source| Error::Scratch {
            path: scratch.clone(),
            source,
        })
        .and_then(|_| {
            time_to_marker(cmd, DONE, false).map_err(|source| Error::Spawn {
                program: exe.display().to_string(),
                source,
            })
        });
    let _ = std::fs::remove_file(&scratch);
    let watched = watched?;
    result.vmm = Figures::parse(&watched.lines).ok_or_else(|| Error::Run {
        what: "vmm",
        run: 1,
        detail: format!("no figures; console:\n{}", tail(&watched.lines)),
    })?;

    if !opts.qemu {
        result.qemu_skipped = Some("--no-qemu".into());
        return Ok(result);
    }
    let cmdline = microvm_cmdline(flavour, format!("ip=dhcp {}", servers.guest_command()));
    let mut cmd = qemu_command(&kernel, &initramfs, &cmdline, MEMORY_MIB);
    cmd.args(["-machine", "auto-kernel-cmdline=off"])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            base.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-netdev", "user,id=n0"])
        .args(["-device", "virtio-net-device,netdev=n0"]);
    let watched = time_to_marker(cmd, DONE, true).map_err(|source| Error::Spawn {
        program: "qemu-system-x86_64".into(),
        source,
    })?;
    result.qemu = Some(Figures::parse(&watched.lines).ok_or_else(|| Error::Run {
        what: "qemu",
        run: 1,
        detail: format!("no figures; console:\n{}", tail(&watched.lines)),
    })?);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_read_from_the_console_and_ratios_point_the_same_way() {
        let lines = vec![
            "noise".to_string(),
            r#"[ 1.0] netbench {"rx_mibs": [4.0, 6.0], "tx_mibs": [3.0], "connect_ms": [2.0, 4.0, 9.0]}"#.to_string(),
        ];
        let f = Figures::parse(&lines).unwrap();
        assert_eq!(f.medians(), [Some(5.0), Some(3.0), Some(4.0)]);
        let bench = NetBench {
            vmm: f,
            qemu: Some(Figures {
                rx_mibs: vec![2.5],
                tx_mibs: vec![1.5],
                connect_ms: vec![8.0],
            }),
            ..Default::default()
        };
        assert_eq!(bench.ratios().unwrap(), [Some(2.0), Some(2.0), Some(2.0)]);
        assert!(Figures::parse(&["netbench-done".to_string()]).is_none());
    }
}
