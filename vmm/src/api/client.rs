//! The client side of the control socket: one typed call per action
//! ([`crate::action`]), carried as that action's HTTP request.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{Error, Result};
use crate::action::{Action, Control, Reply};

/// A client of a VMM's API socket.
pub struct ApiClient {
    path: PathBuf,
    /// Bound on each read and write of a call (none by default: a fork or
    /// a wait for the agent may take long).
    timeout: Option<Duration>,
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
            timeout: None,
        }
    }

    /// The same client, giving up on a read or write after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends one request; returns the JSON body (Null when empty). A
    /// status outside 2xx is [`Error::Status`] with the server's sentence.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut stream = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            path: self.path.clone(),
            source,
        })?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
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
            // Errors carry {"error": sentence}; anything else is shown as is.
            let message = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| body.to_string());
            return Err(Error::Status { status, message });
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(body).map_err(|e| Error::BadAnswer(e.to_string()))
    }

    /// The VM's vsock Unix socket.
    pub fn vsock_path(&self) -> Result<PathBuf> {
        self.describe()?
            .vsock
            .map(|v| v.uds_path)
            .ok_or_else(|| Error::BadAnswer("the VM has no vsock device".into()))
    }
}

impl Control for ApiClient {
    type Error = Error;

    /// Sends `action` as its HTTP request and reads the typed answer.
    fn perform(&self, action: Action) -> Result<Reply> {
        let (method, path) = action.route();
        let answer = self.call(method, path, action.body().as_ref())?;
        Reply::from_http(action.kind(), answer).map_err(|e| Error::BadAnswer(e.to_string()))
    }

    fn unexpected(reply: Reply) -> Error {
        Error::BadAnswer(format!("an answer of the wrong kind: {reply:?}"))
    }
}
