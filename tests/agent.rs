//! The guest agent over virtio-vsock, on a real guest: one VM serves every
//! check here, then is shut down through the agent.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Scratch, VMM};
use vmm::agent::{AgentClient, Exec, ExitStatus, ReadyListener};

/// Kills the VMM if a check fails before the orderly shutdown.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(
    client: &AgentClient,
    argv: &[&str],
    stdin: Option<Vec<u8>>,
) -> (ExitStatus, Vec<u8>, Vec<u8>) {
    let cmd = Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let input = stdin.map(|d| Box::new(std::io::Cursor::new(d)) as Box<dyn Read + Send>);
    let status = client.exec(&cmd, input, &mut out, &mut err).unwrap();
    (status, out, err)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn agent_runs_commands_and_moves_files_over_vsock() {
    let s = Scratch::new("agent");
    let uds = s.path("vsock.sock");
    let ready = ReadyListener::bind(&uds).unwrap();
    let config = s.file(
        "vm.json",
        &format!(
            r#"{{"vcpus": 2, "memory_mib": 256, "vsock": {{"cid": 3, "uds_path": "{}"}}}}"#,
            uds.display()
        ),
    );
    let mut vm = Vm(Command::new(VMM)
        .args(["launch", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    ready
        .wait(Duration::from_secs(300), None)
        .expect("the agent came up");
    let client = AgentClient::new(&uds);

    assert!(client.ping().unwrap().starts_with("vmm-agent"));

    let (status, out, _) = run(&client, &["uname", "-a"], None);
    assert_eq!(status, ExitStatus::Code(0));
    assert!(
        String::from_utf8_lossy(&out).starts_with("Linux sandbox"),
        "{out:?}"
    );

    assert_eq!(
        run(&client, &["sh", "-c", "exit 3"], None).0,
        ExitStatus::Code(3)
    );
    assert_eq!(
        run(&client, &["sh", "-c", "echo err >&2; kill -9 $$"], None).0,
        ExitStatus::Signal(9)
    );
    let (_, _, err) = run(&client, &["sh", "-c", "echo oops >&2"], None);
    assert_eq!(err, b"oops\n");
    let missing = client.exec(
        &Exec {
            argv: vec!["/nonexistent".into()],
            ..Default::default()
        },
        None,
        &mut Vec::new(),
        &mut Vec::new(),
    );
    assert!(missing.is_err());

    // stdin is streamed to the command.
    let input = pattern(300 * 1024, 7);
    let (status, out, _) = run(&client, &["cat"], Some(input.clone()));
    assert_eq!(status, ExitStatus::Code(0));
    assert!(
        out == input,
        "cat returned {} bytes of {}",
        out.len(),
        input.len()
    );

    // Timeouts kill the command.
    let timed = Exec {
        argv: vec!["sleep".into(), "600".into()],
        timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let status = client
        .exec(&timed, None, &mut Vec::new(), &mut Vec::new())
        .unwrap();
    assert_eq!(status, ExitStatus::TimedOut);

    // A 1 MiB file put then got back is the same.
    let file = pattern(1 << 20, 3);
    assert_eq!(
        client.put("/tmp/blob", &mut &file[..], 0o600).unwrap(),
        1 << 20
    );
    let mut back = Vec::new();
    assert_eq!(
        client.get("/tmp/blob", &mut back, 2 << 20).unwrap(),
        1 << 20
    );
    assert!(back == file, "the file came back different");

    // 8 concurrent streams each carry 1 MiB intact, both ways (the
    // muxer interleaves their packets; the size only adds guest time).
    let streams: Vec<_> = (0..8u8)
        .map(|i| {
            let client = client.clone();
            std::thread::spawn(move || {
                let data = pattern(1 << 20, i);
                let path = format!("/tmp/stream{i}");
                let put = client.put(&path, &mut &data[..], 0o600).unwrap();
                let mut back = Vec::new();
                let got = client.get(&path, &mut back, 1 << 30).unwrap();
                put == 1 << 20 && got == 1 << 20 && back == data
            })
        })
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        assert!(t.join().unwrap(), "stream {i} lost data");
    }

    client.shutdown().unwrap();
    let status = vm.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
