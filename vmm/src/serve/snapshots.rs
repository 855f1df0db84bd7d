//! E2B's snapshots (`create_snapshot`, `list_snapshots`,
//! `delete_snapshot`): a running sandbox's memory and disk, taken by its
//! VMM, become a template of the store (`template::adopt`), so that
//! `Sandbox.create(snapshot_id)` starts sandboxes from that instant, as
//! from any template, and the snapshot outlives its sandbox.

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{self, HttpBody};
use super::sandboxes::{open_template, State};
use super::Server;

#[derive(Deserialize, Default)]
struct Request {
    #[serde(default)]
    name: Option<String>,
    /// False: the file system only (E2B then cold-boots its sandboxes).
    #[serde(default)]
    memory: Option<bool>,
}

fn info(name: &str) -> Value {
    json!({"snapshotID": name, "names": [name]})
}

/// `POST /sandboxes/{id}/snapshots`: 201 with the snapshot's id (the
/// template's name). The sandbox pauses only while its state is captured.
pub async fn create(server: &Arc<Server>, id: &str, body: &[u8]) -> Response<HttpBody> {
    let Some(s) = server.sandboxes.get(id) else {
        return http::error(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"));
    };
    let req: Request = match body.is_empty() {
        true => Request::default(),
        false => match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return http::error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
        },
    };
    if req.memory == Some(false) {
        return http::error(
            StatusCode::NOT_IMPLEMENTED,
            "file-system-only snapshots are not supported by this server: take a full one (the default)",
        );
    }
    let name = req
        .name
        .unwrap_or_else(|| format!("snapshot-{}", crate::runtime::random_hex(6)));
    if let Err(e) = crate::names::check_name(&name) {
        return http::error(
            StatusCode::BAD_REQUEST,
            format!("snapshot name {name:?}: {e} (it names a template of this host)"),
        );
    }
    let from = match open_template(&s.template).await {
        Ok(t) => t,
        Err(e) => return http::error(StatusCode::CONFLICT, e.to_string()),
    };
    // Not paused to disk, nor moving there, while it is captured.
    let _changing = s.transition.lock().await;
    if s.state() == State::OnDisk {
        return http::error(
            StatusCode::CONFLICT,
            format!("sandbox {id:?} is paused on disk: connect to it first"),
        );
    }
    let staging = s.vm.state.join(format!(
        "{}.snapshot-{}",
        s.id,
        crate::runtime::random_hex(4)
    ));
    let dir = staging.clone();
    let taken = s
        .control(move |api| crate::action::Control::snapshot(api, &dir, None))
        .await;
    let memory_bytes = match taken {
        Ok(info) => info.memory_bytes,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return http::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot snapshot sandbox {id:?}: {e}"),
            );
        }
    };
    let (sandbox, made_name) = (s.id.clone(), name.clone());
    let adopted = tokio::task::spawn_blocking(move || {
        crate::template::adopt(&staging, &made_name, &from, &sandbox, memory_bytes).inspect_err(
            |_| {
                let _ = std::fs::remove_dir_all(&staging);
            },
        )
    })
    .await;
    match adopted {
        Ok(Ok(_)) => {
            // Spares of an older snapshot of that name are stale now.
            server.sandboxes.drop_spares(&name).await;
            http::json(StatusCode::CREATED, &info(&name))
        }
        Ok(Err(e)) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /snapshots[?sandboxID=ID][&name=NAME]`: the templates made from
/// sandboxes (of that one; of that name). One page.
pub async fn list(query: Option<&str>) -> Response<HttpBody> {
    let of = http::query_param(query, "sandboxID");
    let named = http::query_param(query, "name");
    let listed = tokio::task::spawn_blocking(crate::template::list).await;
    let templates = match listed {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let out: Vec<Value> = templates
        .iter()
        .filter(|t| match (&t.record.from_sandbox, &of) {
            (None, _) => false,
            (Some(from), Some(want)) => from == want,
            (Some(_), None) => true,
        })
        .filter(|t| named.as_ref().is_none_or(|n| *n == t.record.name))
        .map(|t| info(&t.record.name))
        .collect();
    http::json(StatusCode::OK, &out)
}

/// `DELETE /templates/{name}` (the SDKs' `delete_snapshot`): removes a
/// template made from a sandbox; other templates are `vmm template rm`'s.
pub async fn delete(server: &Arc<Server>, name: &str) -> Response<HttpBody> {
    let owned = name.to_string();
    let found = tokio::task::spawn_blocking(move || crate::template::Template::open(&owned)).await;
    match found {
        Ok(Ok(t)) if t.record.from_sandbox.is_some() => {}
        Ok(Ok(_)) => {
            return http::error(
                StatusCode::NOT_IMPLEMENTED,
                format!("{name:?} is a built template, not a snapshot: remove it with `vmm template rm {name}`"),
            )
        }
        _ => return http::error(StatusCode::NOT_FOUND, format!("no snapshot {name:?}")),
    }
    let owned = name.to_string();
    match tokio::task::spawn_blocking(move || crate::template::remove(&owned)).await {
        Ok(Ok(())) => {
            server.sandboxes.drop_spares(name).await;
            http::empty(StatusCode::NO_CONTENT)
        }
        Ok(Err(e)) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
