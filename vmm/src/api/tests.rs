use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_os::event_manager::{EventManager, SubscriberOps};

use super::*;
use crate::action::Control;
use crate::exit::{ExitReason, ExitSignal};
use crate::machine::{Machine, VmInfo, MAX_WAITING};

/// A machine without a VM on its own event loop thread (as the device
/// loop), and an API server on its thread; both stopped when dropped.
struct Served {
    dir: PathBuf,
    path: PathBuf,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    machine: Option<std::thread::JoinHandle<()>>,
    api: Option<ApiThread>,
}

impl Served {
    fn start(name: &str) -> Served {
        let dir = std::env::temp_dir().join(format!("vmm-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Others may enter (for the other-user test).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("api.sock");
        let exit = Arc::new(ExitSignal::new().unwrap());
        let info = VmInfo {
            vcpus: 2,
            memory_mib: 256,
            vsock: Some((3, dir.join("v.sock"))),
        };
        let machine = Machine::new(None, info, exit.clone(), true, None).unwrap();
        let handle = machine.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let running = stop.clone();
        let machine = std::thread::spawn(move || {
            let mut em = EventManager::<Arc<Mutex<Machine>>>::new().unwrap();
            em.add_subscriber(Arc::new(Mutex::new(machine)));
            while !running.load(Ordering::Relaxed) {
                em.run_with_timeout(20).unwrap();
            }
        });
        let api = ApiThread::spawn(ApiServer::bind(&path, handle).unwrap(), true).unwrap();
        Served {
            dir,
            path,
            exit,
            stop,
            machine: Some(machine),
            api: Some(api),
        }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            api.stop();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.machine.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The status line's code of what the server wrote on `stream`.
fn status_of(mut stream: UnixStream) -> u16 {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[test]
fn server_answers_a_client() {
    let s = Served::start("basic");
    let c = s.client();
    let vm = c.call("GET", "/vm", None).unwrap();
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["vsock"]["cid"], 3);
    assert_eq!(vm["agent"], "starting");
    assert!(matches!(
        c.call("GET", "/nope", None),
        Err(Error::Status { status: 404, .. })
    ));
    assert!(matches!(
        c.call("DELETE", "/vm", None),
        Err(Error::Status { status: 405, .. })
    ));
    assert!(matches!(
        c.call("PUT", "/vm/pause", None),
        Err(Error::Status { status: 409, .. })
    ));
    c.call("PUT", "/vm/stop", Some(&json!({}))).unwrap();
    assert_eq!(s.exit.reason(), Some(ExitReason::Stopped { signal: None }));
    let mode = std::fs::metadata(&s.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn silent_and_slow_clients_neither_hold_the_loop_nor_stay() {
    let s = Served::start("slow");
    let start = Instant::now();
    let silent = UnixStream::connect(&s.path).unwrap();
    // A client that keeps sending, one byte at a time, never finishing:
    // a per-read timeout would keep it forever, the per-request deadline
    // does not.
    let mut slow = UnixStream::connect(&s.path).unwrap();
    let mut slow_reader = slow.try_clone().unwrap();
    let dripper = std::thread::spawn(move || {
        for b in b"GET /vm HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 200].iter())
        {
            if slow.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        s.client().call("GET", "/vm", None).unwrap();
        worst = worst.max(t.elapsed());
    }
    assert!(worst < Duration::from_millis(500), "GET /vm took {worst:?}");
    assert_eq!(status_of(silent), 408);
    let mut answer = String::new();
    slow_reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = slow_reader.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let took = start.elapsed();
    assert!(
        took < REQUEST_DEADLINE + Duration::from_secs(2),
        "408 after {took:?}"
    );
    dripper.join().unwrap();
}

#[test]
fn connections_past_the_limit_get_503_and_the_server_recovers() {
    let s = Served::start("many");
    let held: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&s.path).unwrap())
        .collect();
    // The server accepts in order: once the next one is answered 503 at
    // once, the held ones fill every slot.
    let mut extra_status = 0;
    for _ in 0..50 {
        let extra = UnixStream::connect(&s.path).unwrap();
        extra_status = status_of(extra);
        if extra_status == 503 {
            break;
        }
    }
    assert_eq!(extra_status, 503);
    for h in held {
        assert_eq!(status_of(h), 408);
    }
    s.client().call("GET", "/vm", None).unwrap();
}

#[test]
fn agent_waiters_are_bounded() {
    let s = Served::start("waiters");
    let ask = || {
        let mut w = UnixStream::connect(&s.path).unwrap();
        w.write_all(b"GET /vm/agent HTTP/1.1\r\n\r\n").unwrap();
        w
    };
    // One at a time: each waiter's request is in before the GET after it
    // is answered (the loop handles ready sockets in the order they
    // became ready).
    let mut waiting = Vec::new();
    for _ in 0..MAX_WAITING {
        waiting.push(ask());
        s.client().call("GET", "/vm", None).unwrap();
    }
    assert_eq!(status_of(ask()), 503);
    s.client().call("GET", "/vm", None).unwrap();
}

#[test]
fn agent_waiters_are_answered_when_the_agent_announces_itself() {
    let s = Served::start("ready");
    let waiter = std::thread::spawn({
        let c = s.client();
        move || c.wait_agent()
    });
    // The waiter's request is in before the describe after it is answered
    // (the machine handles actions in the order they were sent).
    let mut w = UnixStream::connect(&s.path).unwrap();
    w.write_all(b"GET /vm/agent HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(
        s.client().describe().unwrap().agent,
        crate::action::AgentState::Starting
    );
    // The agent's announcement: a connection to the ready port.
    UnixStream::connect(s.dir.join("v.sock_1023")).unwrap();
    waiter.join().unwrap().unwrap();
    assert_eq!(status_of(w), 200);
    assert_eq!(
        s.client().describe().unwrap().agent,
        crate::action::AgentState::Ready
    );
}

#[test]
fn another_user_is_refused() {
    let s = Served::start("user");
    let path = s.path.clone();
    // With the socket's own mode (0600): no connection at all.
    let connect = crate::runtime::tests::as_nobody(move || UnixStream::connect(&path).map(drop));
    let Some(connect) = connect else {
        return;
    };
    assert_eq!(connect.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    // Opened up by mistake: the peer check still answers 403, before
    // reading anything.
    std::fs::set_permissions(&s.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let path = s.path.clone();
    let status = crate::runtime::tests::as_nobody(move || {
        let mut stream = UnixStream::connect(&path).unwrap();
        let _ = stream.write_all(b"PUT /vm/stop HTTP/1.1\r\n\r\n");
        status_of(stream)
    })
    .unwrap();
    assert_eq!(status, 403);
    assert_eq!(s.exit.reason(), None, "the other user stopped the VM");
}
