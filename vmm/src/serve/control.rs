//! The E2B control API (the REST routes of e2b-dev/infra's spec/openapi.yml
//! the `e2b` SDKs call): create, list, get, kill, timeout, pause, resume
//! and connect. Bodies are E2B's, errors `{"code", "message"}` with its
//! statuses; a route this server does not have answers 501, not a hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{self, HttpBody};
use super::network::{self, E2bNetwork, Refusal};
use super::sandboxes::{self, Sandbox, Spec, State};
use super::{Server, ENVD_VERSION};

/// E2B's default sandbox timeout (seconds), and the longest it allows
/// (24 h, its Pro tier's limit).
const DEFAULT_TIMEOUT: u64 = 300;
const MAX_TIMEOUT: u64 = 24 * 3600;
/// The longest `GET /vmm/pool?wait=1` waits for starting spares.
const POOL_WAIT: Duration = Duration::from_secs(300);
/// The client id every sandbox reports (E2B's is its cluster node's).
const CLIENT_ID: &str = "vmm";
/// The most sandboxes one metrics request names (E2B's limit).
const MAX_METRICS_IDS: usize = 100;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    secure: Option<bool>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<E2bNetwork>,
    #[serde(default)]
    volume_mounts: Option<Vec<Value>>,
    #[serde(default)]
    mcp: Option<Value>,
    #[serde(flatten)]
    _rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct Timeout {
    #[serde(default)]
    timeout: Option<u64>,
}

/// An RFC 3339 UTC time, as E2B writes `startedAt`/`endAt`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Paused | State::OnDisk => "paused",
    }
}

/// The create/connect answer (E2B's `Sandbox`).
fn created(s: &Sandbox) -> Value {
    json!({
        "templateID": s.template,
        "sandboxID": s.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": s.access_token,
        "alias": s.template,
        "domain": null,
    })
}

/// A listed sandbox (E2B's `ListedSandbox`; `detail` adds `SandboxDetail`'s).
fn listed(s: &Sandbox, detail: bool) -> Value {
    let mut v = json!({
        "templateID": s.template,
        "alias": s.template,
        "sandboxID": s.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(s.started_at),
        "endAt": rfc3339(s.end_at()),
        "cpuCount": s.sizes.vcpus,
        "memoryMB": s.sizes.memory_mib,
        "diskSizeMB": s.sizes.disk_mib,
        "state": state_name(s.state()),
        "envdVersion": ENVD_VERSION,
        "metadata": s.metadata,
    });
    if detail {
        v["envdAccessToken"] = json!(s.access_token);
        v["domain"] = Value::Null;
    }
    v
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response<HttpBody>> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| http::error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

fn timeout_of(t: Option<u64>) -> Result<Duration, Response<HttpBody>> {
    let secs = t.unwrap_or(DEFAULT_TIMEOUT);
    if secs > MAX_TIMEOUT {
        return Err(http::error(
            StatusCode::BAD_REQUEST,
            format!("a timeout of {secs} s is longer than the {MAX_TIMEOUT} s allowed"),
        ));
    }
    Ok(Duration::from_secs(secs))
}

fn not_found(id: &str) -> Response<HttpBody> {
    http::error(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
}

fn unsupported(what: &str) -> Response<HttpBody> {
    http::error(
        StatusCode::NOT_IMPLEMENTED,
        format!("{what} is not supported by vmm serve (docs/agents.md lists what is)"),
    )
}

/// Answers one control API request (already authenticated).
pub async fn handle(
    server: &Arc<Server>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Response<HttpBody> {
    let v2 = path.starts_with("/v2/");
    let path = path.strip_prefix("/v2").unwrap_or(path);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["sandboxes"]) => create(server, body).await,
        (&Method::GET, ["sandboxes"]) => list(server, query),
        (&Method::GET, ["sandboxes", "metrics"]) => many_metrics(server, query).await,
        (&Method::GET, ["sandboxes", id]) => match server.sandboxes.get(id) {
            Some(s) => http::json(StatusCode::OK, &listed(&s, true)),
            None => not_found(id),
        },
        (&Method::DELETE, ["sandboxes", id]) => match server.sandboxes.kill(id).await {
            true => http::empty(StatusCode::NO_CONTENT),
            false => not_found(id),
        },
        (&Method::POST, ["sandboxes", id, "timeout"]) => {
            let Some(s) = server.sandboxes.get(id) else {
                return not_found(id);
            };
            let t = match parse::<Timeout>(body).and_then(|t| timeout_of(t.timeout)) {
                Ok(t) => t,
                Err(r) => return r,
            };
            s.set_timeout(t);
            http::empty(StatusCode::NO_CONTENT)
        }
        (&Method::POST, ["sandboxes", id, "refreshes"]) => {
            let Some(s) = server.sandboxes.get(id) else {
                return not_found(id);
            };
            #[derive(Deserialize)]
            struct Refresh {
                #[serde(default)]
                duration: Option<u64>,
            }
            let t = match parse::<Refresh>(body).and_then(|r| timeout_of(r.duration)) {
                Ok(t) => t,
                Err(r) => return r,
            };
            if SystemTime::now() + t > s.end_at() {
                s.set_timeout(t);
            }
            http::empty(StatusCode::NO_CONTENT)
        }
        (&Method::POST, ["sandboxes", id, "pause"]) => pause(server, id).await,
        (&Method::POST, ["sandboxes", id, "resume" | "connect"]) => {
            let timeout = match parse::<Timeout>(body).and_then(|t| timeout_of(t.timeout)) {
                Ok(t) => t,
                Err(r) => return r,
            };
            connect(server, id, timeout).await
        }
        (&Method::POST, ["sandboxes", id, "fork"]) => fork(server, id, body).await,
        (&Method::GET, ["vmm", "pool"]) => pool(server, query).await,
        (&Method::GET, ["vmm", "sandboxes", id]) => match server.sandboxes.get(id) {
            Some(s) => {
                let state = match s.state() {
                    State::Running => "running",
                    State::Paused => "paused",
                    State::OnDisk => "on_disk",
                };
                http::json(StatusCode::OK, &json!({"sandboxID": s.id, "state": state}))
            }
            None => not_found(id),
        },
        (&Method::POST, ["sandboxes", id, "snapshots"]) => {
            super::snapshots::create(server, id, body).await
        }
        (&Method::GET, ["snapshots"]) => super::snapshots::list(query).await,
        (&Method::DELETE, ["templates", name]) => super::snapshots::delete(server, name).await,
        (_, ["sandboxes", _, "snapshots"]) | (_, ["snapshots", ..]) => {
            unsupported("this snapshot route")
        }
        (&Method::GET, ["sandboxes", id, "metrics"]) => metrics(server, id).await,
        (&Method::GET, ["sandboxes", id, "logs"]) => logs(server, id, query, v2),
        (&Method::PUT, ["sandboxes", id, "network"]) => update_network(server, id, body).await,
        (_, ["templates", ..]) => unsupported("the template API (use `vmm template`)"),
        (_, ["volumes", ..]) | (_, ["secrets", ..]) => unsupported("this route"),
        _ => http::error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

/// This server's own route (not E2B's): its spares per template; with
/// `wait=1`, once none is starting (at most [`POOL_WAIT`]).
async fn pool(server: &Arc<Server>, query: Option<&str>) -> Response<HttpBody> {
    let wait = matches!(
        http::query_param(query, "wait").as_deref(),
        Some("1" | "true")
    );
    let pool = &server.sandboxes.pool;
    let status = match wait {
        true => tokio::time::timeout(POOL_WAIT, pool.settled()).await.ok(),
        false => None,
    };
    http::json(StatusCode::OK, &status.unwrap_or_else(|| pool.status()))
}

/// One metrics sample of a running sandbox (E2B answers a series).
async fn metrics(server: &Arc<Server>, id: &str) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    if s.state().is_paused() {
        return http::json(StatusCode::OK, &json!([]));
    }
    match super::metrics::sample(&s).await {
        Ok(m) => http::json(StatusCode::OK, &json!([m])),
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `GET /sandboxes/metrics?sandbox_ids=A,B`: one sample of each running
/// sandbox named, taken side by side; unknown and paused ones are left out.
async fn many_metrics(server: &Arc<Server>, query: Option<&str>) -> Response<HttpBody> {
    let asked = http::query_param(query, "sandbox_ids").unwrap_or_default();
    let mut ids: Vec<&str> = asked.split(',').filter(|i| !i.is_empty()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() || ids.len() > MAX_METRICS_IDS {
        let e = format!("give 1 to {MAX_METRICS_IDS} sandbox ids in sandbox_ids=ID,ID");
        return http::error(StatusCode::BAD_REQUEST, e);
    }
    let running: Vec<_> = ids
        .iter()
        .filter_map(|id| server.sandboxes.get(id))
        .filter(|s| !s.state().is_paused())
        .collect();
    let samples =
        futures_util::future::join_all(running.iter().map(|s| super::metrics::sample(s))).await;
    let mut out = serde_json::Map::new();
    for (s, sample) in running.iter().zip(samples) {
        match sample {
            Ok(m) => {
                out.insert(s.id.clone(), m);
            }
            Err(e) => return http::error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    }
    http::json(StatusCode::OK, &json!({ "sandboxes": out }))
}

/// `GET /sandboxes/{id}/logs` (v1: `start`, `limit`) and
/// `GET /v2/sandboxes/{id}/logs` (`cursor`, `limit`, `direction`,
/// `level`, `search`).
fn logs(server: &Arc<Server>, id: &str, query: Option<&str>, v2: bool) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    match super::logs::Query::parse(query) {
        Ok(q) if v2 => http::json(StatusCode::OK, &s.log.v2(&q)),
        Ok(q) => http::json(StatusCode::OK, &s.log.v1(&q)),
        Err(e) => http::error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Network settings this server cannot apply: 501 for a feature it does
/// not have, 400 for settings it cannot express or that are wrong.
fn refused(r: Refusal) -> Response<HttpBody> {
    match r {
        Refusal::Unsupported(what) => unsupported(what),
        Refusal::Bad(message) => http::error(StatusCode::BAD_REQUEST, message),
    }
}

/// `PUT /sandboxes/{id}/network`: a new egress policy, in place at once
/// for new connections.
async fn update_network(server: &Arc<Server>, id: &str, body: &[u8]) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    let egress = match parse::<E2bNetwork>(body).map(|n| network::at_update(&n)) {
        Ok(Ok(e)) => e,
        Ok(Err(r)) => return refused(r),
        Err(r) => return r,
    };
    if !s.sizes.network {
        let e = sandboxes::Error::NoNetwork(s.template.clone());
        return http::error(StatusCode::BAD_REQUEST, e.to_string());
    }
    // Its VMM is there (not moved to disk, nor moving) while it changes.
    let _changing = s.transition.lock().await;
    if s.state() == State::OnDisk {
        return http::error(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is paused on disk: connect to it first"),
        );
    }
    match s
        .control(move |api| crate::action::Control::set_egress(api, egress))
        .await
    {
        Ok(()) => {
            s.log
                .add(super::logs::Level::Info, "Network rules changed", &[]);
            http::empty(StatusCode::NO_CONTENT)
        }
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn create(server: &Arc<Server>, body: &[u8]) -> Response<HttpBody> {
    let req: NewSandbox = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if req.auto_pause == Some(true) {
        return unsupported("autoPause");
    }
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return unsupported("volume mounts");
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return unsupported("an MCP gateway in the sandbox");
    }
    let egress = match network::at_create(req.allow_internet_access, req.network.as_ref()) {
        Ok(e) => e,
        Err(r) => return refused(r),
    };
    let _ = req.secure;
    let timeout = match timeout_of(req.timeout) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let spec = Spec {
        template: req.template_id,
        timeout,
        metadata: req.metadata.unwrap_or_default(),
        env_vars: req.env_vars.unwrap_or_default(),
        egress,
    };
    match server.sandboxes.create(spec).await {
        Ok(s) => http::json(StatusCode::CREATED, &created(&s)),
        Err(e @ (sandboxes::Error::NoTemplate(_) | sandboxes::Error::BadTemplate { .. })) => {
            http::error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ sandboxes::Error::Full) => {
            http::error(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        Err(e @ (sandboxes::Error::NoNetwork(_) | sandboxes::Error::BadEgress(_))) => {
            http::error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn list(server: &Arc<Server>, query: Option<&str>) -> Response<HttpBody> {
    let states = http::query_param(query, "state");
    let wanted: Option<Vec<String>> = states.map(|s| s.split(',').map(str::to_string).collect());
    // `metadata=k1%3Dv1%26k2%3Dv2`: every pair must match.
    let metadata: Vec<(String, String)> = http::query_param(query, "metadata")
        .map(|m| {
            m.split('&')
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((http::decode(k)?, http::decode(v)?)))
                .collect()
        })
        .unwrap_or_default();
    let out: Vec<Value> = server
        .sandboxes
        .all()
        .iter()
        .filter(|s| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|x| x == state_name(s.state())))
        })
        .filter(|s| metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .map(|s| listed(s, false))
        .collect();
    http::json(StatusCode::OK, &out)
}

/// E2B's largest fork count.
const MAX_FORK: u32 = 20;

async fn fork(server: &Arc<Server>, id: &str, body: &[u8]) -> Response<HttpBody> {
    #[derive(Deserialize)]
    struct Fork {
        #[serde(default)]
        timeout: Option<u64>,
        #[serde(default)]
        count: Option<u32>,
    }
    let Some(parent) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    let req: Fork = match parse(body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let count = req.count.unwrap_or(1);
    if !(1..=MAX_FORK).contains(&count) {
        return http::error(
            StatusCode::BAD_REQUEST,
            format!("count must be 1 to {MAX_FORK}, not {count}"),
        );
    }
    let timeout = match timeout_of(req.timeout) {
        Ok(t) => t,
        Err(r) => return r,
    };
    // Not paused, and not moving to disk while it forks.
    let _changing = parent.transition.lock().await;
    if parent.state().is_paused() {
        return http::error(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is paused: connect to it first"),
        );
    }
    match server.sandboxes.fork(&parent, count, timeout).await {
        Ok(children) => {
            let out: Vec<Value> = children
                .iter()
                .map(|c| match c {
                    Ok(s) => json!({"sandbox": created(s)}),
                    Err(e) => json!({"error": {"code": 500, "message": e.to_string()}}),
                })
                .collect();
            http::json(StatusCode::CREATED, &out)
        }
        Err(e @ sandboxes::Error::Full) => {
            http::error(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        Err(e) => http::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot fork sandbox {id:?}: {e}"),
        ),
    }
}

async fn pause(server: &Arc<Server>, id: &str) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    let _changing = s.transition.lock().await;
    if s.state().is_paused() {
        return http::error(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is paused already"),
        );
    }
    match s.control(crate::action::Control::pause).await {
        Ok(()) => {
            s.set_state(State::Paused);
            http::empty(StatusCode::NO_CONTENT)
        }
        Err(e) => http::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot pause sandbox {id:?}: {e}"),
        ),
    }
}

/// Connect (and the older resume): a running sandbox answers 200 with its
/// timeout renewed; a paused one is resumed (from disk if it moved there)
/// and answers 201.
async fn connect(server: &Arc<Server>, id: &str, timeout: Duration) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return not_found(id);
    };
    let changing = s.transition.lock().await;
    let resumed = match s.state() {
        State::Running => None,
        State::Paused => Some(s.control(crate::action::Control::resume).await),
        State::OnDisk => Some(server.sandboxes.from_disk(&s).await),
    };
    let status = match resumed {
        None => StatusCode::OK,
        Some(Ok(())) => {
            s.set_state(State::Running);
            StatusCode::CREATED
        }
        Some(Err(e)) => {
            return http::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot resume sandbox {id:?}: {e}"),
            )
        }
    };
    drop(changing);
    if SystemTime::now() + timeout > s.end_at() {
        s.set_timeout(timeout);
    }
    http::json(status, &created(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_563_445_123);
        assert_eq!(rfc3339(t), "2026-12-06T13:24:05.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
