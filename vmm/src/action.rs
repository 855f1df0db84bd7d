//! The one action type: what every entry point (the CLI, the control
//! socket, the Rust API) asks of a running VM, what it gets back, and how
//! it fails. The HTTP mapping lives here too, in one table ([`ROUTES`]),
//! so the server and the client cannot disagree, and a test checks
//! docs/api.yaml against it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::fork::{ChildInfo, ForkRequest};
use crate::snapshot::auth;
pub use crate::snapshot::SnapshotInfo;

/// Children one fork may ask for.
pub const MAX_FORK_COUNT: u32 = 1024;

/// What an entry point asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The VM's description and state.
    Describe,
    /// Answers once the guest agent serves (at once when it does).
    WaitAgent,
    /// Stop every vCPU at an instruction boundary.
    Pause,
    /// Continue a paused VM.
    Resume,
    /// Write a snapshot into a new directory.
    Snapshot(SnapshotRequest),
    /// Start children that continue from this instant.
    Fork(ForkRequest),
    /// Replace the user-mode network's egress policy (docs/network.md).
    SetEgress(crate::config::EgressConfig),
    /// Stop the VM at once.
    Stop,
}

/// `Action::Snapshot`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The directory to create (absolute, or relative to the VMM's
    /// working directory); it must not exist.
    pub dir: PathBuf,
    /// An HMAC key (docs/snapshot.md), hex on the wire.
    #[serde(default, with = "hex_key", skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<u8>>,
}

/// A successful action's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Vm(VmDescription),
    Agent(AgentReply),
    Snapshot(SnapshotInfo),
    Fork(ForkInfo),
    /// Done, nothing to report.
    Done,
}

/// What `Action::Describe` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vsock: Option<VsockInfo>,
    pub agent: AgentState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
}

/// The guest agent: absent (no vsock device), starting, or serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    None,
    Starting,
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockInfo {
    pub cid: u64,
    pub uds_path: PathBuf,
}

/// What `Action::WaitAgent` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReply {
    pub agent: AgentState,
}

/// What `Action::Fork` made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkInfo {
    pub children: Vec<ChildInfo>,
    /// How long the parent's vCPUs were stopped.
    pub parent_pause_ms: f64,
}

/// Why an action was not done. Each says what to do and carries its HTTP
/// status ([`ActionError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no such endpoint: {0}; docs/api.yaml lists them")]
    NotFound(String),
    #[error("{method} is not allowed on {path}; docs/api.yaml lists the methods")]
    MethodNotAllowed { method: String, path: String },
    #[error("this VM cannot be paused, snapshotted or forked (it runs without a controller)")]
    NotControllable,
    #[error("a fork is starting its children; try again when it answers")]
    ForkInProgress,
    #[error("the VM has stopped; it takes no more actions")]
    Stopped,
    #[error("the VM did not answer within {0:?}; see its console log for why")]
    NoAnswer(std::time::Duration),
    #[error("the VM answered with the wrong kind of reply ({0}): a bug, please report it")]
    Unexpected(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Control(#[from] crate::control::Error),
}

impl ActionError {
    /// The HTTP status that carries this error.
    pub fn status(&self) -> u16 {
        match self {
            ActionError::BadRequest(_) => 400,
            ActionError::NotFound(_) => 404,
            ActionError::MethodNotAllowed { .. } => 405,
            ActionError::NotControllable | ActionError::ForkInProgress | ActionError::Stopped => {
                409
            }
            ActionError::Busy(_) => 503,
            ActionError::NoAnswer(_) => 504,
            ActionError::Unexpected(_) => 500,
            ActionError::Control(crate::control::Error::TapNetwork) => 409,
            ActionError::Control(crate::control::Error::NoUserNetwork) => 409,
            ActionError::Control(crate::control::Error::BadEgress(_)) => 400,
            ActionError::Control(_) => 500,
        }
    }
}

/// The kinds of action, for the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Describe,
    WaitAgent,
    Pause,
    Resume,
    Snapshot,
    Fork,
    SetEgress,
    Stop,
}

/// Every action's HTTP method and path.
pub const ROUTES: [(&str, &str, Kind); 8] = [
    ("GET", "/vm", Kind::Describe),
    ("GET", "/vm/agent", Kind::WaitAgent),
    ("PUT", "/vm/pause", Kind::Pause),
    ("PUT", "/vm/resume", Kind::Resume),
    ("PUT", "/vm/snapshot", Kind::Snapshot),
    ("PUT", "/vm/fork", Kind::Fork),
    ("PUT", "/vm/egress", Kind::SetEgress),
    ("PUT", "/vm/stop", Kind::Stop),
];

impl Action {
    pub fn kind(&self) -> Kind {
        match self {
            Action::Describe => Kind::Describe,
            Action::WaitAgent => Kind::WaitAgent,
            Action::Pause => Kind::Pause,
            Action::Resume => Kind::Resume,
            Action::Snapshot(_) => Kind::Snapshot,
            Action::Fork(_) => Kind::Fork,
            Action::SetEgress(_) => Kind::SetEgress,
            Action::Stop => Kind::Stop,
        }
    }

    /// The HTTP method and path that carry this action.
    pub fn route(&self) -> (&'static str, &'static str) {
        let kind = self.kind();
        ROUTES
            .iter()
            .find(|(_, _, k)| *k == kind)
            .map(|(m, p, _)| (*m, *p))
            .expect("every kind has a route")
    }

    /// The JSON body that carries this action's arguments, if any.
    pub fn body(&self) -> Option<Value> {
        let body = match self {
            Action::Snapshot(r) => serde_json::to_value(r),
            Action::Fork(r) => serde_json::to_value(r),
            Action::SetEgress(r) => serde_json::to_value(r),
            _ => return None,
        };
        // Plain structs of paths, numbers and strings always encode.
        Some(body.unwrap_or_default())
    }

    /// The action an HTTP request asks for, its arguments checked.
    pub fn from_http(method: &str, path: &str, body: &[u8]) -> Result<Action, ActionError> {
        let Some(&(_, _, kind)) = ROUTES.iter().find(|(m, p, _)| *m == method && *p == path) else {
            return Err(if ROUTES.iter().any(|(_, p, _)| *p == path) {
                ActionError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                }
            } else {
                ActionError::NotFound(path.to_string())
            });
        };
        let action = match kind {
            Kind::Describe => Action::Describe,
            Kind::WaitAgent => Action::WaitAgent,
            Kind::Pause => Action::Pause,
            Kind::Resume => Action::Resume,
            Kind::Stop => Action::Stop,
            Kind::Snapshot => Action::Snapshot(parse_body(body, "snapshot")?),
            Kind::Fork => Action::Fork(parse_body(body, "fork")?),
            Kind::SetEgress => Action::SetEgress(parse_body(body, "egress")?),
        };
        action.check()?;
        Ok(action)
    }

    /// Checks the arguments' ranges.
    pub fn check(&self) -> Result<(), ActionError> {
        match self {
            Action::Fork(r) if r.count == 0 || r.count > MAX_FORK_COUNT => Err(
                ActionError::BadRequest(format!("\"count\" must be 1 to {MAX_FORK_COUNT}")),
            ),
            Action::Fork(ForkRequest {
                count,
                names: Some(names),
                ..
            }) => {
                if names.len() != *count as usize {
                    return Err(ActionError::BadRequest(format!(
                        "{} \"names\" for {count} children: give one per child",
                        names.len()
                    )));
                }
                names
                    .iter()
                    .try_for_each(|n| crate::names::check_name(n))
                    .map_err(|e| ActionError::BadRequest(e.to_string()))
            }
            Action::SetEgress(egress) => egress
                .policy()
                .map(drop)
                .map_err(|e| ActionError::BadRequest(e.to_string())),
            Action::Snapshot(SnapshotRequest { key: Some(k), .. })
                if k.len() < auth::MIN_KEY_BYTES =>
            {
                Err(ActionError::BadRequest(format!(
                    "\"key\" must be at least {} bytes in hex",
                    auth::MIN_KEY_BYTES
                )))
            }
            _ => Ok(()),
        }
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, ActionError> {
    serde_json::from_slice(body)
        .map_err(|e| ActionError::BadRequest(format!("not a {what} request: {e}")))
}

impl Reply {
    /// The HTTP status and JSON body that carry this reply (Null: none).
    pub fn to_http(&self) -> (u16, Value) {
        let body = match self {
            Reply::Vm(v) => serde_json::to_value(v),
            Reply::Agent(a) => serde_json::to_value(a),
            Reply::Snapshot(s) => serde_json::to_value(s),
            Reply::Fork(f) => serde_json::to_value(f),
            Reply::Done => return (204, Value::Null),
        };
        // Plain structs of paths, numbers and strings always encode.
        (200, body.unwrap_or_default())
    }

    /// The reply to `kind` carried by a successful HTTP answer's body.
    pub fn from_http(kind: Kind, body: Value) -> Result<Reply, serde_json::Error> {
        Ok(match kind {
            Kind::Describe => Reply::Vm(serde_json::from_value(body)?),
            Kind::WaitAgent => Reply::Agent(serde_json::from_value(body)?),
            Kind::Snapshot => Reply::Snapshot(serde_json::from_value(body)?),
            Kind::Fork => Reply::Fork(serde_json::from_value(body)?),
            Kind::Pause | Kind::Resume | Kind::SetEgress | Kind::Stop => Reply::Done,
        })
    }
}

/// An optional byte string as hex in JSON.
mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(k) => s.serialize_str(&super::auth::hex(k)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            super::auth::unhex(&t).ok_or_else(|| serde::de::Error::custom("\"key\" is not hex"))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests;

/// Typed calls for every action, over anything that performs actions: a
/// running VM's [`crate::machine::MachineHandle`] in this process, or an
/// [`crate::api::ApiClient`] on another VMM's control socket.
pub trait Control {
    type Error;

    /// Has the VM do `action`.
    fn perform(&self, action: Action) -> Result<Reply, Self::Error>;

    /// The error for an answer of the wrong kind (a bug on the other side).
    fn unexpected(reply: Reply) -> Self::Error;

    /// The VM's description and state.
    fn describe(&self) -> Result<VmDescription, Self::Error> {
        match self.perform(Action::Describe)? {
            Reply::Vm(vm) => Ok(vm),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Waits until the VM's agent serves (a VM without vsock has none: an
    /// error of the wrong kind).
    fn wait_agent(&self) -> Result<(), Self::Error> {
        match self.perform(Action::WaitAgent)? {
            Reply::Agent(a) if a.agent == AgentState::Ready => Ok(()),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Stops every vCPU; the VM keeps its state.
    fn pause(&self) -> Result<(), Self::Error> {
        self.perform(Action::Pause).map(drop)
    }

    /// Resumes a paused VM.
    fn resume(&self) -> Result<(), Self::Error> {
        self.perform(Action::Resume).map(drop)
    }

    /// Stops the VM at once (the guest does not sync; the agent's shutdown
    /// does).
    fn stop(&self) -> Result<(), Self::Error> {
        self.perform(Action::Stop).map(drop)
    }

    /// Writes a snapshot into the new directory `dir` (absolute, or
    /// relative to the VMM's working directory), with an `auth` MAC under
    /// `key` when given.
    fn snapshot(&self, dir: &Path, key: Option<&[u8]>) -> Result<SnapshotInfo, Self::Error> {
        let action = Action::Snapshot(SnapshotRequest {
            dir: dir.to_path_buf(),
            key: key.map(<[u8]>::to_vec),
        });
        match self.perform(action)? {
            Reply::Snapshot(info) => Ok(info),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Forks the VM into `count` children (sockets in `dir`, default the
    /// user's private runtime directory); answers once their vCPUs run.
    fn fork(&self, count: u32, dir: Option<&Path>) -> Result<ForkInfo, Self::Error> {
        self.fork_with(ForkRequest {
            count,
            dir: dir.map(Path::to_path_buf),
            names: None,
        })
    }

    /// Forks the VM as `request` says.
    fn fork_with(&self, request: ForkRequest) -> Result<ForkInfo, Self::Error> {
        match self.perform(Action::Fork(request))? {
            Reply::Fork(info) => Ok(info),
            other => Err(Self::unexpected(other)),
        }
    }

    /// Replaces the user-mode network's egress policy; it applies to
    /// connections that start from now on.
    fn set_egress(&self, egress: crate::config::EgressConfig) -> Result<(), Self::Error> {
        self.perform(Action::SetEgress(egress)).map(drop)
    }
}
