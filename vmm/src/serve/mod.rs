//! `vmm serve`: a local, E2B-compatible sandbox server (docs/agents.md).
//! One port answers both E2B APIs: the control API (create, list, kill,
//! pause, connect...) and the in-sandbox API (envd's commands and files,
//! routed by the `E2b-Sandbox-Id` header). Each sandbox is a VM in its
//! own VMM process, started from a template.

pub mod connect;
pub mod control;
pub mod envd;
pub mod filesystem;
pub mod guest;
pub mod http;
pub mod key;
pub mod leftovers;
pub mod logs;
pub mod mcp;
pub mod metrics;
pub mod network;
pub mod pool;
pub mod process;
pub mod sandbox_api;
pub mod sandboxes;
pub mod snapshots;
pub mod suspend;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use http::HttpBody;
use sandboxes::Registry;

/// The envd version this server reports: the E2B SDKs adapt to it. 0.5.7
/// means: the sandbox's default user applies unless a call names one
/// (0.4.0), stdin is opt-in and can be closed (0.3.0, 0.5.2), uploads may
/// be octet streams (0.5.7); file metadata (0.6.2) is not offered.
pub const ENVD_VERSION: &str = "0.5.7";
/// The default listening address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:49999";
/// The template a create without one starts (E2B's default is `base`).
pub const DEFAULT_TEMPLATE: &str = "base";
/// The configuration of the `base` template `vmm serve` builds: `vmm
/// run`'s defaults and the user-mode network with its default egress (the
/// internet, not the host or private networks).
pub const BASE_CONFIG: &str = r#"{"network": {"mode": "user"}}"#;
/// The warm-up of the `base` template `vmm serve` builds: what the E2B
/// SDKs' first commands run (every command is `bash -l -c`).
pub const WARMUP: &str = "bash -l -c 'python3 -c \"import json, os, subprocess\"'";
/// The largest control API request body.
const MAX_CONTROL_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Key(#[from] key::Error),
    #[error("cannot listen on {addr}: {source}; is another `vmm serve` running there? Pick another with --listen")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Folder(#[from] crate::runtime::Error),
    #[error(transparent)]
    Claim(#[from] leftovers::Error),
    #[error(transparent)]
    Sandboxes(#[from] sandboxes::Error),
    #[error("cannot find this program to start sandboxes with: {0}")]
    Exe(std::io::Error),
    #[error("{0}")]
    Mcp(String),
}

/// How `vmm serve` runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    /// The API key; `None`: the one in `~/.config/vmm/serve.key`, made on
    /// first start.
    pub api_key: Option<String>,
    /// How sandboxes run.
    pub sandboxes: sandboxes::Settings,
}

/// The server's shared state.
pub struct Server {
    api_key: String,
    pub sandboxes: Arc<Registry>,
}

/// What both servers run on: a runtime, the sandbox registry (in a
/// private runtime folder of its own) and a task that kills sandboxes
/// whose timeout passed.
struct Host {
    runtime: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    _folder: crate::runtime::RuntimeDir,
    _claim: leftovers::Claim,
}

impl Host {
    /// The default template's spares start now.
    fn new(settings: sandboxes::Settings) -> Result<Host, Error> {
        let exe = std::env::current_exe().map_err(Error::Exe)?;
        let states = crate::artifacts::cache_dir().join("serve");
        let stopped = leftovers::sweep(&crate::runtime::user_dir()?, &states);
        if stopped > 0 {
            eprintln!("vmm serve: stopped {stopped} sandbox(es) left by a server that ended");
        }
        let folder = crate::runtime::RuntimeDir::create(leftovers::PREFIX)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        // Sockets in the private runtime folder; snapshots on disk, in a
        // folder of the cache named as that one.
        let name = folder.path().file_name().unwrap_or_default();
        let state = states.join(name);
        // Private: paused sandboxes' memory goes here.
        sandboxes::make_folder(&state)?;
        let claim = leftovers::claim(&[folder.path(), &state])?;
        let root = folder.path().to_path_buf();
        let registry = Arc::new(Registry::new(root, state, exe, settings));
        // The default template's spares are counted as starting before the
        // server answers anything: a `GET /vmm/pool?wait=1` right after the
        // start waits for them.
        if crate::template::Template::open(DEFAULT_TEMPLATE).is_ok() {
            let _entered = runtime.enter();
            registry.refill(DEFAULT_TEMPLATE);
        }
        let reaped = registry.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                reaped.reap_expired().await;
                reaped.move_paused_to_disk().await;
            }
        });
        Ok(Host {
            runtime,
            registry,
            _folder: folder,
            _claim: claim,
        })
    }
}

/// Runs the server until SIGINT or SIGTERM; every sandbox is killed then.
/// `on_listening` gets the bound address and the key once it serves.
pub fn run(opts: Options, on_listening: impl FnOnce(SocketAddr, &str)) -> Result<(), Error> {
    let api_key = match opts.api_key {
        Some(k) => k,
        None => key::load_or_create(&key::default_path())?,
    };
    let host = Host::new(opts.sandboxes)?;
    let server = Arc::new(Server {
        api_key,
        sandboxes: host.registry.clone(),
    });
    host.runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(Error::Runtime)?;
        on_listening(addr, &server.api_key);
        serve(listener, server.clone()).await;
        server.sandboxes.kill_all().await;
        Ok::<(), Error>(())
    })
}

/// Runs the MCP server on stdin/stdout until the client closes it.
pub fn run_mcp(settings: sandboxes::Settings) -> Result<(), Error> {
    let host = Host::new(settings)?;
    host.runtime
        .block_on(mcp::serve_stdio(host.registry.clone()))
        .map_err(Error::Mcp)
}

/// Accepts connections until a stop signal.
async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch for SIGTERM: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(server.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Whether `given` is `expected`, in time that does not depend on where
/// they differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn handle(
    server: Arc<Server>,
    req: Request<Incoming>,
) -> Result<Response<HttpBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let headers = &parts.headers;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let key_ok =
        header("x-api-key").is_some_and(|k| same_secret(k.as_bytes(), server.api_key.as_bytes()));
    if sandbox_api::is_sandbox_route(headers, &path) {
        let id = header("e2b-sandbox-id").unwrap_or_default();
        let Some(sandbox) = server.sandboxes.get(&id) else {
            // As E2B's proxy answers for a sandbox that is not running.
            return Ok(http::error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "sandbox {id:?} not found: it was killed, timed out, or never existed here"
                ),
            ));
        };
        let token_ok = header("x-access-token")
            .is_some_and(|t| same_secret(t.as_bytes(), sandbox.access_token.as_bytes()));
        if !(token_ok || key_ok || path == "/health") {
            return Ok(http::error(StatusCode::UNAUTHORIZED, "this sandbox's access token (X-Access-Token) or the API key (X-API-Key) is required"));
        }
        let resp = sandbox_api::handle(
            sandbox,
            &parts.method,
            &path,
            query.as_deref(),
            headers,
            body,
        )
        .await;
        return Ok(resp);
    }
    if !key_ok {
        return Ok(http::error(StatusCode::UNAUTHORIZED, "a valid API key is required in X-API-Key (vmm serve printed it; it is in ~/.config/vmm/serve.key)"));
    }
    let bytes = match connect::read_body(body, MAX_CONTROL_BODY).await {
        Ok(b) => b,
        Err(e) => return Ok(http::error(StatusCode::PAYLOAD_TOO_LARGE, e.message)),
    };
    Ok(control::handle(&server, &parts.method, &path, query.as_deref(), &bytes).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"e2b_abc", b"e2b_abc"));
        assert!(!same_secret(b"e2b_abd", b"e2b_abc"));
        assert!(!same_secret(b"e2b_ab", b"e2b_abc"));
        assert!(!same_secret(b"", b"e2b_abc"));
    }
}
