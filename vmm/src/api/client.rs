//! The client side of the control socket: one typed call per request.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{Error, Result};

/// A client of a VMM's API socket.
pub struct ApiClient {
    path: PathBuf,
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
        }
    }

    /// Sends one request; returns the JSON body (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: vm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| Error::BadAnswer("no header end".into()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::BadAnswer(head.lines().next().unwrap_or("").into()))?;
        if !(200..300).contains(&status) {
            return Err(Error::Status {
                status,
                body: body.to_string(),
            });
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(body).map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// Waits until the VM's agent serves (`GET /vm/agent`).
    pub fn wait_agent(&self) -> Result<()> {
        let answer = self.call("GET", "/vm/agent", None)?;
        match answer["agent"].as_str() {
            Some("ready") => Ok(()),
            other => Err(Error::BadAnswer(format!("the agent is {other:?}"))),
        }
    }

    /// Pauses the VM (`PUT /vm/pause`).
    pub fn pause(&self) -> Result<()> {
        self.call("PUT", "/vm/pause", None).map(drop)
    }

    /// Resumes a paused VM (`PUT /vm/resume`).
    pub fn resume(&self) -> Result<()> {
        self.call("PUT", "/vm/resume", None).map(drop)
    }

    /// Writes a snapshot into the new directory `dir` (absolute, or
    /// relative to the VMM's working directory), with an `auth` MAC under
    /// `key` when given; returns the answer (`dir`, `memory_bytes`,
    /// `pause_ms`).
    pub fn snapshot(&self, dir: &Path, key: Option<&[u8]>) -> Result<Value> {
        let key = key.map(crate::snapshot::auth::hex);
        self.call(
            "PUT",
            "/vm/snapshot",
            Some(&json!({ "dir": dir, "key": key })),
        )
    }

    /// Forks the VM into `count` children (sockets in `dir`, default the
    /// user's private runtime directory); returns them once their vCPUs
    /// run.
    pub fn fork(&self, count: u32, dir: Option<&Path>) -> Result<Vec<crate::fork::ChildInfo>> {
        let answer = self.call(
            "PUT",
            "/vm/fork",
            Some(&json!({ "count": count, "dir": dir })),
        )?;
        serde_json::from_value(answer["children"].clone())
            .map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// The VM's vsock Unix socket, from `GET /vm`.
    pub fn vsock_path(&self) -> Result<PathBuf> {
        let vm = self.call("GET", "/vm", None)?;
        vm["vsock"]["uds_path"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| Error::BadAnswer("the VM has no vsock device".into()))
    }
}
