//! The host side of the guest agent protocol: the connect handshake and
//! the frames a (hostile) agent answers `exec`, `get`, `put` and `ping`
//! with. The "agent" is a thread of the target that sends the input's
//! bytes over the vsock socket and closes its side.
//!
//! Input: an operation byte (0 exec, 1 get, 2 put, 3 ping; bit 7 skips
//! the `OK 1024` handshake line the target otherwise sends first), then
//! what the agent sends.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmm::agent::{AgentClient, Exec};
use vmm_fuzz::scratch::Scratch;

fuzz_target!(|data: &[u8]| {
    let Some((&op, answer)) = data.split_first() else {
        return;
    };
    let dir = Scratch::new("agent");
    let path = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&path).expect("the agent's socket");
    let mut sent = Vec::new();
    if op & 0x80 == 0 {
        sent.extend_from_slice(b"OK 1024\n");
    }
    sent.extend_from_slice(answer);
    let agent = std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.write_all(&sent);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Until the client hangs up.
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
    });
    // Every answer is complete once the agent closed its side: a client
    // still waiting after this long is a bug.
    let client = AgentClient::new(&path).with_timeout(Duration::from_secs(10));
    match op & 0x7f {
        0 => {
            let exec = Exec {
                argv: vec!["true".into()],
                ..Default::default()
            };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let _ = client.exec(&exec, None, &mut out, &mut err);
        }
        1 => {
            let mut out = Vec::new();
            let _ = client.get("/etc/hostname", &mut out, 4096);
            assert!(out.len() <= 4096, "get wrote past its limit");
        }
        2 => {
            let mut data: &[u8] = b"some data";
            let _ = client.put("/tmp/x", &mut data as &mut dyn Read, 0o644);
        }
        _ => {
            let _ = client.ping();
        }
    }
    drop(client);
    agent.join().expect("the agent thread");
});
