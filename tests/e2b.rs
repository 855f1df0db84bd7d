//! `vmm serve` driven by clients nobody here wrote: the official E2B
//! Python SDK (pinned in tests/python/requirements.txt) runs
//! tests/e2b/sdk_test.py against it, the official JavaScript SDK (pinned
//! in tests/node/package.json) runs tests/e2b/sdk_test.cjs; and hostile input on its port
//! (malformed Connect frames, huge lengths, unknown sandboxes, another
//! sandbox's token) gets errors while the server keeps serving. One
//! server is shared by the file's tests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use common::{client_env, describe, spawn_for_the_tests, Scratch, VMM};

struct Server {
    _scratch: Scratch,
    process: Child,
    addr: String,
    key: String,
}

/// A server a test started for itself stops (with its sandboxes) when
/// the test ends; the shared one, a static, when the test process does.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.process.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
            let _ = self.process.wait();
        }
    }
}

/// The shared `vmm serve` (it builds the `base` template on first use).
/// It keeps no warm spares: a spare's warm-up is guest work the other
/// tests would wait behind; the spare test starts its own server.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_server("e2b", &["--keep-paused", "3", "--warm", "0"]))
}

/// Starts `vmm serve` with `args` in a scratch folder named `name`; once
/// it listens, checks the environment it prints and its key file.
fn start_server(name: &str, args: &[&str]) -> Server {
    let scratch = Scratch::new(name);
    let mut cmd = Command::new(VMM);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("XDG_CONFIG_HOME", scratch.path("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SIGTERM when the tests end: the server kills its sandboxes.
    let mut process = spawn_for_the_tests(cmd, libc::SIGTERM).unwrap();
    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
    let mut env = std::collections::HashMap::new();
    while env.len() < 3 {
        let line = lines
            .next()
            .expect("vmm serve ended before it listened")
            .unwrap();
        let (k, v) = line
            .strip_prefix("export ")
            .unwrap()
            .split_once('=')
            .unwrap();
        env.insert(k.to_string(), v.to_string());
    }
    let url = &env["E2B_API_URL"];
    assert_eq!(url, &env["E2B_SANDBOX_URL"]);
    let key = env["E2B_API_KEY"].clone();
    assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
    let mode = std::fs::metadata(scratch.path("config/vmm/serve.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    Server {
        addr: url.strip_prefix("http://").unwrap().to_string(),
        key,
        _scratch: scratch,
        process,
    }
}

/// One HTTP/1.1 request; the status and body.
fn request(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{head}\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json_call(method: &str, path: &str, body: &str, key: &str) -> (u16, serde_json::Value) {
    json_call_to(server(), method, path, body, key)
}

fn json_call_to(
    s: &Server,
    method: &str,
    path: &str,
    body: &str,
    key: &str,
) -> (u16, serde_json::Value) {
    let head =
        format!("{method} {path} HTTP/1.1\r\nX-API-Key: {key}\r\nContent-Type: application/json");
    let (status, text) = request(&s.addr, &head, body.as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Runs an SDK script against the shared server; fails unless it ends
/// with `all done`.
fn run_sdk_script(mut cmd: Command) {
    let s = server();
    let out = cmd
        .env("E2B_API_URL", format!("http://{}", s.addr))
        .env("E2B_SANDBOX_URL", format!("http://{}", s.addr))
        .env("E2B_API_KEY", &s.key)
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the SDK script failed: {}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all done"));
}

#[test]
fn the_official_python_sdk_drives_sandboxes() {
    // The sandboxes' network checks connect to the host's loopback here.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for _ in host.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut cmd = Command::new(client_env("python").join("bin/python"));
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2b/sdk_test.py"
    ))
    .env("HOST_PORT", port.to_string());
    run_sdk_script(cmd);
    // The two allowed connections arrived; the refused ones never left.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn the_official_javascript_sdk_drives_sandboxes() {
    let mut cmd = Command::new("node");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2b/sdk_test.cjs"
    ))
    .env("NODE_PATH", client_env("node").join("node_modules"));
    run_sdk_script(cmd);
}

/// A sandbox made through the control API: its id and access token.
fn new_sandbox() -> (String, String) {
    new_sandbox_on(server())
}

fn new_sandbox_on(s: &Server) -> (String, String) {
    let key = &s.key;
    let (status, body) = json_call_to(
        s,
        "POST",
        "/sandboxes",
        r#"{"templateID":"base","timeout":300}"#,
        key,
    );
    assert_eq!(status, 201, "{body}");
    (
        body["sandboxID"].as_str().unwrap().into(),
        body["envdAccessToken"].as_str().unwrap().into(),
    )
}

/// `vmm serve --warm 1` keeps one warm spare of `base`: one is ready
/// whenever none is starting, and a create's is replaced.
#[test]
fn a_warm_spare_is_ready_and_replaced_after_a_create() {
    // After the shared server has built `base`, so the two do not both.
    server();
    let s = start_server("e2b-warm", &["--warm", "1"]);
    let settled = || {
        let (status, body) = json_call_to(&s, "GET", "/vmm/pool?wait=1", "", &s.key);
        assert_eq!(status, 200, "{body}");
        body
    };
    let before = settled();
    assert_eq!(before["per_template"], 1, "{before}");
    assert_eq!(before["templates"]["base"]["ready"], 1, "{before}");
    let (id, _) = new_sandbox_on(&s);
    let path = format!("/sandboxes/{id}");
    assert_eq!(json_call_to(&s, "DELETE", &path, "", &s.key).0, 204);
    let after = settled();
    assert_eq!(after["templates"]["base"]["ready"], 1, "{after}");
    assert_eq!(json_call_to(&s, "GET", "/vmm/pool", "", "").0, 401);
    killed_servers_leave_nothing(s);
}

/// A server killed outright (SIGKILL: no clean-up of its own) takes its
/// sandboxes' VMM processes with it, and the next server to start removes
/// the folders it left.
fn killed_servers_leave_nothing(mut s: Server) {
    let server = s.process.id();
    let processes = descendants(server);
    assert!(!processes.is_empty(), "the server runs its spare's VMM");
    // Its folders: the one its sandboxes' sockets are in (a VMM's
    // --api-socket is <folder>/<sandbox>/api.sock) and its state folder.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", processes[0])).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let socket = &args[args.iter().position(|a| a == "--api-socket").unwrap() + 1];
    let folder = std::path::Path::new(socket).ancestors().nth(2).unwrap();
    let name = folder.file_name().unwrap().to_owned();
    let state = vmm::artifacts::cache_dir().join("serve").join(&name);
    assert!(folder.exists() && state.exists(), "{folder:?} {state:?}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    s.process.wait().unwrap();
    for pid in processes {
        assert!(
            common::wait_for_exit(pid, Duration::from_secs(30)),
            "process {pid} of the killed server still runs"
        );
    }
    assert!(folder.exists(), "nothing cleaned up yet");
    let next = start_server("e2b-next", &["--warm", "0"]);
    assert!(
        !folder.exists() && !state.exists(),
        "{folder:?} {state:?} left"
    );
    drop(next);
}

/// The processes below `pid`, children first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = common::children(pid);
    let mut i = 0;
    while i < found.len() {
        found.extend(common::children(found[i]));
        i += 1;
    }
    found
}

fn rpc(id: &str, token: &str, method: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "POST /{method} HTTP/1.1\r\nE2b-Sandbox-Id: {id}\r\nX-Access-Token: {token}\r\nContent-Type: {content_type}\r\nConnect-Protocol-Version: 1"
    );
    request(&server().addr, &head, body)
}

#[test]
fn hostile_requests_get_errors_and_the_server_keeps_serving() {
    let key = server().key.clone();
    // The control API without the key, with a wrong one, with garbage.
    assert_eq!(json_call("GET", "/sandboxes", "", "").0, 401);
    assert_eq!(
        json_call("GET", "/sandboxes", "", &format!("e2b_{}", "1".repeat(40))).0,
        401
    );
    let (status, body) = json_call("POST", "/sandboxes", "{not json", &key);
    assert_eq!(status, 400, "{body}");
    let (status, body) = json_call(
        "POST",
        "/sandboxes",
        r#"{"templateID":"no-such-template"}"#,
        &key,
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("vmm template create"),
        "{body}"
    );
    assert_eq!(json_call("GET", "/sandboxes/nosuch", "", &key).0, 404);
    assert_eq!(json_call("DELETE", "/sandboxes/nosuch", "", &key).0, 404);
    assert_eq!(json_call("POST", "/sandboxes/x/fork", "{}", &key).0, 404);
    assert_eq!(json_call("GET", "/sandboxes/x/logs", "", &key).0, 404);
    let (status, body) = json_call("GET", "/sandboxes/metrics", "", &key);
    assert_eq!(status, 400, "{body}");
    let ids = vec!["x"; 101].join(",");
    let (status, body) = json_call(
        "GET",
        &format!("/sandboxes/metrics?sandbox_ids={ids}"),
        "",
        &key,
    );
    assert_eq!(status, 200, "duplicates count once: {body}");
    let ids: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    let path = format!("/sandboxes/metrics?sandbox_ids={}", ids.join(","));
    assert_eq!(json_call("GET", &path, "", &key).0, 400);
    let big = format!(
        r#"{{"templateID":"base","metadata":{{"a":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    assert_eq!(json_call("POST", "/sandboxes", &big, &key).0, 413);
    // Network settings it cannot apply are refused before anything starts.
    for (network, want) in [
        (r#"{"denyOut":["example.com"]}"#, 400),
        (
            r#"{"allowOut":["203.0.113.5"],"denyOut":["203.0.113.0/24"]}"#,
            400,
        ),
        (r#"{"allowOut":["no such rule!"]}"#, 400),
        (r#"{"allowOut":5}"#, 400),
        (r#"{"egressProxy":{"address":"socks5://127.0.0.1:1"}}"#, 501),
    ] {
        let create = format!(r#"{{"templateID":"base","network":{network}}}"#);
        let (status, body) = json_call("POST", "/sandboxes", &create, &key);
        assert_eq!(status, want, "{network}: {body}");
    }
    assert_eq!(
        json_call("PUT", "/sandboxes/nosuch/network", "{}", &key).0,
        404
    );

    let (a, token_a) = new_sandbox();
    let (b, _token_b) = new_sandbox();
    for bad in ["level=loud", "limit=5000", "direction=up", "cursor=soon"] {
        let path = format!("/v2/sandboxes/{a}/logs?{bad}");
        assert_eq!(json_call("GET", &path, "", &key).0, 400, "{bad}");
    }
    let list = br#"{}"#;
    // Unknown sandbox; another sandbox's token; no token.
    assert_eq!(
        rpc(
            "nosuch",
            &token_a,
            "process.Process/List",
            "application/json",
            list
        )
        .0,
        502
    );
    assert_eq!(
        rpc(
            &b,
            &token_a,
            "process.Process/List",
            "application/json",
            list
        )
        .0,
        401
    );
    assert_eq!(
        rpc(&a, "", "process.Process/List", "application/json", list).0,
        401
    );
    assert_eq!(
        rpc(
            &a,
            &token_a,
            "process.Process/List",
            "application/json",
            list
        )
        .0,
        200
    );
    // Malformed messages and envelopes.
    let (status, body) = rpc(
        &a,
        &token_a,
        "process.Process/List",
        "application/proto",
        b"\xff\xff\xff",
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = rpc(
        &a,
        &token_a,
        "process.Process/SendSignal",
        "application/json",
        b"[1,2",
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = rpc(&a, &token_a, "process.Process/List", "text/plain", b"");
    assert_eq!(status, 400, "{body}");
    for envelope in [
        &[0u8, 0xff, 0xff, 0xff, 0xff][..], // 4 GiB announced
        &[0u8, 0, 0, 0, 9, b'{'][..],       // shorter than announced
        &[1u8, 0, 0, 0, 2, b'{', b'}'][..], // compressed
        &[][..],                            // nothing
    ] {
        let (status, body) = rpc(
            &a,
            &token_a,
            "process.Process/Start",
            "application/connect+json",
            envelope,
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"error\""), "{envelope:?}: {body}");
    }
    let (_, body) = rpc(
        &a,
        &token_a,
        "process.Process/Start",
        "application/connect+json",
        b"\x00\x00\x00\x00\x02{}",
    );
    assert!(body.contains("no process"), "{body}");
    // A unary method called as a stream, an unknown method, a bad signal.
    let (_, body) = rpc(
        &a,
        &token_a,
        "process.Process/List",
        "application/connect+json",
        b"\x00\x00\x00\x00\x02{}",
    );
    assert!(body.contains("unary"), "{body}");
    assert_eq!(
        rpc(
            &a,
            &token_a,
            "process.Process/Nope",
            "application/json",
            list
        )
        .0,
        501
    );
    let sig = br#"{"process":{"pid":1},"signal":"SIGNAL_SIGKILL"}"#;
    assert_eq!(
        rpc(
            &a,
            &token_a,
            "process.Process/SendSignal",
            "application/json",
            sig
        )
        .0,
        404
    );
    // Files: a missing path, a missing file, a folder.
    let files = |q: &str| {
        let head =
            format!("GET /files{q} HTTP/1.1\r\nE2b-Sandbox-Id: {a}\r\nX-Access-Token: {token_a}");
        request(&server().addr, &head, b"").0
    };
    assert_eq!(files(""), 400);
    assert_eq!(files("?path=/nonexistent"), 404);
    assert_eq!(files("?path=/etc"), 400);
    // Still serving: the sandbox runs a command.
    let start = br#"{"process":{"cmd":"/bin/echo","args":["still here"]}}"#;
    let mut env = vec![0u8];
    env.extend_from_slice(&(start.len() as u32).to_be_bytes());
    env.extend_from_slice(start);
    let (status, body) = rpc(
        &a,
        &token_a,
        "process.Process/Start",
        "application/connect+json",
        &env,
    );
    assert_eq!(status, 200);
    assert!(body.contains("c3RpbGwgaGVyZQo="), "{body}"); // base64 of "still here\n"
    for id in [a, b] {
        assert_eq!(
            json_call("DELETE", &format!("/sandboxes/{id}"), "", &key).0,
            204
        );
    }
}
