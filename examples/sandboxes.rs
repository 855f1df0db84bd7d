//! An orchestrator in Rust, on the VMM as a library: no `vmm` process to
//! start, no HTTP to speak. It boots a sandbox, runs a command, moves a
//! file in and out, pauses and resumes it, snapshots it, forks it into two
//! children (each a VM in its own process) that diverge, restores the
//! snapshot as a second sandbox in this process, and stops everything.
//!
//! ```sh
//! cargo run --example sandboxes            # prints what each step saw
//! ```
//!
//! Fork children run this program's own executable: the first line of
//! `main` hands a process started as a child over to the VMM.

use std::error::Error;

use vmm::action::Control;
use vmm::agent::{AgentClient, Exec, ExitStatus};
use vmm::sandbox::Sandbox;
use vmm::snapshot::host::HostSettings;
use vmm::VmConfig;

/// Runs `sh -c script` in the VM; its standard output, trimmed.
fn sh(agent: &AgentClient, script: &str) -> Result<String, Box<dyn Error>> {
    let cmd = Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = agent.exec(&cmd, None, &mut out, &mut err)?;
    if status != ExitStatus::Code(0) {
        let err = String::from_utf8_lossy(&err);
        return Err(format!("`{script}` ended with {status:?}: {err}").into());
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

fn main() -> Result<(), Box<dyn Error>> {
    vmm::fork_child::run_child_if_asked();
    let work = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("sandboxes-{}", std::process::id())));
    std::fs::create_dir_all(&work)?;

    // Boot: the default root disk and agent (what `vmm run` uses).
    let config = VmConfig {
        memory_mib: 256,
        ..Default::default()
    };
    let sandbox = Sandbox::start(config.clone())?;
    let agent = sandbox.agent();
    println!("exec: {}", sh(agent, "echo hello from $(uname -n)")?);

    // Files in and out.
    agent.put("/root/in.txt", &mut &b"a file from the host\n"[..], 0o644)?;
    println!("put: {}", sh(agent, "wc -c < /root/in.txt")?);
    let mut back = Vec::new();
    agent.get("/root/in.txt", &mut back, 1 << 20)?;
    println!("get: {:?}", String::from_utf8(back)?.trim());

    // Pause, resume and describe: typed calls on the machine.
    let machine = sandbox.machine();
    machine.pause()?;
    println!("paused: {:?}", machine.describe()?.state);
    machine.resume()?;
    println!("resumed: {:?}", machine.describe()?.state);

    // A snapshot, then a change the snapshot does not have.
    sh(agent, "echo before > /root/mark; sync")?;
    let snap = work.join("snap");
    let info = machine.snapshot(&snap, None)?;
    println!("snapshot: {} bytes of memory", info.memory_bytes);
    sh(agent, "echo after > /root/mark")?;

    // Two children continue from now and diverge.
    let children = sandbox.fork(2)?;
    for child in &children {
        let id = &child.info().id;
        let agent = child.agent()?;
        sh(agent, &format!("echo {id} > /root/who"))?;
        println!(
            "child {id}: {}",
            sh(agent, "cat /root/mark /root/who | tr '\\n' ' '")?
        );
    }
    println!(
        "parent: {}",
        sh(agent, "cat /root/who 2>/dev/null || echo none")?
    );
    for child in children {
        child.stop()?;
    }

    // The snapshot, restored in this process next to the running sandbox.
    let host = HostSettings {
        config: Some(config),
        trust_snapshot_config: false,
    };
    let restored = Sandbox::restore(&snap, host, None)?;
    println!("restored: {}", sh(restored.agent(), "cat /root/mark")?);
    restored.stop()?;

    let outcome = sandbox.stop()?;
    println!("stopped: {}", outcome.reason);
    if work.starts_with(std::env::temp_dir()) && std::env::args().nth(1).is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}
