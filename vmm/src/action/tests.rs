use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;

fn examples() -> Vec<Action> {
    vec![
        Action::Describe,
        Action::WaitAgent,
        Action::Pause,
        Action::Resume,
        Action::Stop,
        Action::Snapshot(SnapshotRequest {
            dir: "/tmp/snap".into(),
            key: None,
        }),
        Action::Snapshot(SnapshotRequest {
            dir: "/tmp/snap".into(),
            key: Some(vec![7; 16]),
        }),
        Action::Fork(ForkRequest {
            count: 3,
            dir: None,
            names: None,
        }),
        Action::Fork(ForkRequest {
            count: 2,
            dir: Some("/tmp/kids".into()),
            names: Some(vec!["a-1".into(), "a-2".into()]),
        }),
        Action::SetEgress(crate::config::EgressConfig {
            default: crate::config::EgressDefault::Deny,
            allow: vec!["pypi.org:443".into(), "10.0.2.2".into()],
            deny: vec!["203.0.113.0/24".into()],
        }),
    ]
}

#[test]
fn every_action_survives_its_http_form() {
    for action in examples() {
        let (method, path) = action.route();
        let body = action.body().map(|b| b.to_string()).unwrap_or_default();
        let back = Action::from_http(method, path, body.as_bytes()).unwrap();
        assert_eq!(back, action, "{method} {path} {body}");
    }
}

#[test]
fn bad_requests_get_their_status() {
    let status =
        |m: &str, p: &str, b: &str| Action::from_http(m, p, b.as_bytes()).unwrap_err().status();
    assert_eq!(status("GET", "/nope", ""), 404);
    assert_eq!(status("DELETE", "/vm", ""), 405);
    assert_eq!(status("GET", "/vm/fork", ""), 405);
    assert_eq!(status("PUT", "/vm/fork", ""), 400);
    assert_eq!(status("PUT", "/vm/fork", r#"{"count": 0}"#), 400);
    assert_eq!(status("PUT", "/vm/fork", r#"{"count": 1025}"#), 400);
    assert_eq!(
        status("PUT", "/vm/fork", r#"{"count": 1, "extra": 1}"#),
        400
    );
    assert_eq!(
        status("PUT", "/vm/snapshot", r#"{"dir": "/x", "key": "zz"}"#),
        400
    );
    assert_eq!(
        status("PUT", "/vm/snapshot", r#"{"dir": "/x", "key": "0011"}"#),
        400
    );
    assert_eq!(status("PUT", "/vm/snapshot", r#"{"key": "00"}"#), 400);
    assert_eq!(
        status("PUT", "/vm/egress", r#"{"allow": ["no rule!"]}"#),
        400
    );
    assert_eq!(status("PUT", "/vm/egress", r#"{"default": "maybe"}"#), 400);
    assert_eq!(status("PUT", "/vm/egress", r#"{"allow": [], "x": 1}"#), 400);
    let err = Action::from_http("PUT", "/vm/fork", b"{")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a fork request"), "{err}");
}

#[test]
fn replies_survive_their_http_form() {
    let replies = [
        (
            Kind::Describe,
            Reply::Vm(VmDescription {
                state: VmState::Paused,
                vcpus: 2,
                memory_mib: 256,
                vsock: Some(VsockInfo {
                    cid: 3,
                    uds_path: "/run/v.sock".into(),
                }),
                agent: AgentState::Starting,
            }),
        ),
        (
            Kind::WaitAgent,
            Reply::Agent(AgentReply {
                agent: AgentState::Ready,
            }),
        ),
        (
            Kind::Snapshot,
            Reply::Snapshot(SnapshotInfo {
                dir: "/s".into(),
                memory_bytes: 4096,
                pause_ms: 1.5,
            }),
        ),
        (Kind::Fork, Reply::Fork(fork_info())),
        (Kind::Pause, Reply::Done),
    ];
    for (kind, reply) in replies {
        let (status, body) = reply.to_http();
        assert_eq!(status, if reply == Reply::Done { 204 } else { 200 });
        assert_eq!(Reply::from_http(kind, body).unwrap(), reply);
    }
}

fn fork_info() -> ForkInfo {
    ForkInfo {
        children: vec![ChildInfo {
            id: "1-0".into(),
            pid: 9,
            api_socket: "/r/1-0.api.sock".into(),
            vsock_socket: Some("/r/1-0.vsock".into()),
        }],
        parent_pause_ms: 2.0,
    }
}

/// A very small reader of docs/api.yaml's shape: the keys under the node
/// at `path` (each step a key, found below the previous one by indent).
fn yaml_keys(text: &str, path: &[&str]) -> BTreeSet<String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| (l.len() - l.trim_start().len(), l.trim()))
        .collect();
    let key = |l: &str| {
        l.split_once(':')
            .map(|(k, _)| k.trim_matches('"').to_string())
    };
    let (mut at, mut indent) = (0usize, None::<usize>);
    for step in path {
        let parent = indent;
        let (i, ind) = lines
            .iter()
            .enumerate()
            .skip(at)
            .take_while(|(_, (ind, _))| parent.is_none_or(|p| *ind > p))
            .find(|(_, (_, l))| key(l).as_deref() == Some(step))
            .map(|(i, (ind, _))| (i, *ind))
            .unwrap_or_else(|| panic!("docs/api.yaml has no {path:?} (at {step})"));
        indent = Some(ind);
        at = i + 1;
    }
    let parent = indent.unwrap_or(0);
    let below: Vec<&(usize, &str)> = lines[at..]
        .iter()
        .take_while(|(i, _)| *i > parent)
        .collect();
    let child = below.first().map_or(0, |(i, _)| *i);
    below
        .iter()
        .filter(|(i, l)| *i == child && !l.starts_with('-'))
        .filter_map(|(_, l)| key(l))
        .collect()
}

fn keys_of(value: impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(value).unwrap() {
        Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn the_openapi_file_matches_the_action_types() {
    let text = include_str!("../../../docs/api.yaml");
    let mut documented = BTreeSet::new();
    for path in yaml_keys(text, &["paths"]) {
        for method in yaml_keys(text, &["paths", &path]) {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routes);

    let schema = |name: &str| yaml_keys(text, &["components", "schemas", name, "properties"]);
    let example = VmDescription {
        state: VmState::Running,
        vcpus: 1,
        memory_mib: 1,
        vsock: None,
        agent: AgentState::None,
    };
    assert_eq!(schema("Vm"), keys_of(example));
    assert_eq!(schema("Child"), keys_of(&fork_info().children[0]));
    assert_eq!(
        yaml_keys(
            text,
            &[
                "components",
                "schemas",
                "Vm",
                "properties",
                "vsock",
                "properties"
            ]
        ),
        keys_of(VsockInfo {
            cid: 3,
            uds_path: PathBuf::new()
        })
    );
    let json_at = |path: &str, what: &[&str]| {
        let mut p = vec!["paths", path, "put"];
        p.extend_from_slice(what);
        p.extend_from_slice(&["content", "application/json", "schema", "properties"]);
        yaml_keys(text, &p)
    };
    let request = ["requestBody"];
    let answer = ["responses", "200"];
    let snapshot = SnapshotRequest {
        dir: "/s".into(),
        key: Some(vec![1; 16]),
    };
    assert_eq!(json_at("/vm/snapshot", &request), keys_of(snapshot));
    let fork = ForkRequest {
        count: 1,
        dir: Some("/d".into()),
        names: Some(vec!["a".into()]),
    };
    assert_eq!(json_at("/vm/fork", &request), keys_of(fork));
    let egress = crate::config::EgressConfig::default();
    assert_eq!(json_at("/vm/egress", &request), keys_of(egress));
    let written = SnapshotInfo {
        dir: "/s".into(),
        memory_bytes: 0,
        pause_ms: 0.0,
    };
    assert_eq!(json_at("/vm/snapshot", &answer), keys_of(written));
    assert_eq!(json_at("/vm/fork", &answer), keys_of(fork_info()));
    let agent = json!({"agent": "ready"});
    let mut p = vec!["paths", "/vm/agent", "get", "responses", "200"];
    p.extend_from_slice(&["content", "application/json", "schema", "properties"]);
    assert_eq!(yaml_keys(text, &p), keys_of(agent));
}
