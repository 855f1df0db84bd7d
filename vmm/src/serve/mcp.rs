//! `vmm mcp`: an MCP server on stdio (the official Rust SDK, `rmcp`) for
//! agents that use tools instead of SDKs. Its tools create sandboxes from
//! templates, run commands, move files, fork and destroy, on the same
//! sandbox registry `vmm serve` uses. Results stay within what an agent
//! can read: long output is cut with a note saying how much was left out.

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;
use vmm_agent::{FrameType, Request};

use super::guest::{self, Frame};
use super::sandboxes::{Registry, Sandbox, Spec};

/// The most output bytes of each stream, and of a file read, a result
/// carries.
pub const MAX_OUTPUT: usize = 32 * 1024;
/// How long a sandbox lives unless destroyed (the MCP session's end kills
/// every sandbox anyway).
const SANDBOX_TIMEOUT: Duration = Duration::from_secs(3600);
/// A command's default and longest timeout.
const DEFAULT_COMMAND_TIMEOUT: u64 = 120;
const MAX_COMMAND_TIMEOUT: u64 = 3600;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// The template to start from (`vmm template ls`); default `base`, the
    /// Debian image with Python.
    #[serde(default)]
    pub template: Option<String>,
    /// Whether the sandbox may reach the internet (default true; never the
    /// host or private networks unless `allow` names them).
    #[serde(default)]
    pub internet: Option<bool>,
    /// Destinations to allow: "1.2.3.4", "10.0.0.0/8", "pypi.org",
    /// "*.example.com", each optionally with ":PORT"; "10.0.2.2:PORT" is
    /// the host's loopback.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destinations to deny, as `allow`; a denied one wins.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl CreateArgs {
    /// The egress policy asked for; `None`: the template's.
    fn egress(&self) -> Option<crate::config::EgressConfig> {
        use crate::config::{EgressConfig, EgressDefault};
        if self.internet.is_none() && self.allow.is_empty() && self.deny.is_empty() {
            return None;
        }
        Some(EgressConfig {
            default: match self.internet {
                Some(false) => EgressDefault::Deny,
                _ => EgressDefault::Allow,
            },
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        })
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunArgs {
    pub sandbox_id: String,
    /// A shell command line (run with `sh -c`).
    pub command: String,
    /// Seconds before the command is killed (default 120, at most 3600).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// The working directory (default: the user's home, or the image's).
    #[serde(default)]
    pub cwd: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathArgs {
    pub sandbox_id: String,
    /// An absolute path, or one relative to the home folder.
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteArgs {
    pub sandbox_id: String,
    pub path: String,
    /// The file's new text (missing folders are made).
    pub content: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForkArgs {
    pub sandbox_id: String,
    /// How many copies (1 to 20).
    pub count: u32,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IdArgs {
    pub sandbox_id: String,
}

/// The MCP server.
#[derive(Clone)]
pub struct Mcp {
    registry: Arc<Registry>,
    tool_router: ToolRouter<Self>,
}

fn text(s: impl Into<String>) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::success(vec![ContentBlock::text(s.into())]))
}

fn failure(s: impl Into<String>) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::error(vec![ContentBlock::text(s.into())]))
}

/// `bytes` as text, cut at [`MAX_OUTPUT`] with a note.
pub fn clip(bytes: &[u8], total: usize) -> String {
    let shown = &bytes[..bytes.len().min(MAX_OUTPUT)];
    let mut s = String::from_utf8_lossy(shown).into_owned();
    if total > shown.len() {
        s.push_str(&format!(
            "\n[... {} more bytes not shown]",
            total - shown.len()
        ));
    }
    s
}

/// Collects a stream's first [`MAX_OUTPUT`] bytes and counts the rest.
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: usize,
}

impl Capture {
    fn add(&mut self, d: &[u8]) {
        self.total += d.len();
        let room = MAX_OUTPUT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&d[..d.len().min(room)]);
    }
}

impl Mcp {
    fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>, String> {
        self.registry.get(id).ok_or_else(|| {
            format!("no sandbox {id:?}: create_sandbox makes one, list_sandboxes lists them")
        })
    }

    async fn file_call(&self, id: &str, req: Request) -> Result<vmm_agent::Response, String> {
        let sandbox = self.sandbox(id)?;
        guest::call(&sandbox.vm.vsock, &req)
            .await
            .map_err(|e| e.to_string())
    }
}

#[tool_router]
impl Mcp {
    pub fn new(registry: Arc<Registry>) -> Self {
        Mcp {
            registry,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Create a sandbox: a Linux microVM started from a template (default `base`: Debian with Python 3, on the internet but not the host or private networks; `internet`, `allow` and `deny` change that). Returns its id."
    )]
    async fn create_sandbox(
        &self,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let spec = Spec {
            egress: a.egress(),
            template: a.template.unwrap_or_else(|| super::DEFAULT_TEMPLATE.into()),
            timeout: SANDBOX_TIMEOUT,
            ..Default::default()
        };
        match self.registry.create(spec).await {
            Ok(s) => text(format!("sandbox_id: {}", s.id)),
            Err(e) => failure(e.to_string()),
        }
    }

    #[tool(
        description = "Run a shell command in a sandbox; returns its exit code, stdout and stderr (each cut at 32 KiB)."
    )]
    async fn run_command(
        &self,
        Parameters(a): Parameters<RunArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let sandbox = match self.sandbox(&a.sandbox_id) {
            Ok(s) => s,
            Err(e) => return failure(e),
        };
        let timeout = a
            .timeout_seconds
            .unwrap_or(DEFAULT_COMMAND_TIMEOUT)
            .clamp(1, MAX_COMMAND_TIMEOUT);
        let req = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), a.command],
            env: sandbox.env_vars.clone(),
            cwd: a.cwd,
            stdin: false,
            timeout_ms: Some(timeout * 1000),
            user: None,
            pty: None,
            root: None,
            mounts: Vec::new(),
            isolation: None,
        };
        let (mut reader, _w) = match guest::open(&sandbox.vm.vsock, &req).await {
            Ok(c) => c,
            Err(e) => return failure(e.to_string()),
        };
        let (mut out, mut err) = (Capture::default(), Capture::default());
        let resp = loop {
            match reader.next().await {
                Ok(Frame::Stdout(d)) => out.add(&d),
                Ok(Frame::Stderr(d)) => err.add(&d),
                Ok(Frame::Response(r)) => break r,
                Ok(Frame::Started(_) | Frame::Event(_)) => {}
                Err(e) => return failure(e.to_string()),
            }
        };
        if let Some(e) = resp.error {
            return failure(e);
        }
        let status = match (resp.timed_out, resp.exit_code, resp.signal) {
            (true, _, _) => format!("timed out after {timeout} s (killed)"),
            (_, Some(c), _) => format!("exit code {c}"),
            (_, None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown".into(),
        };
        text(format!(
            "{status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            clip(&out.kept, out.total),
            clip(&err.kept, err.total)
        ))
    }

    #[tool(description = "Read a text file from a sandbox (cut at 32 KiB).")]
    async fn read_file(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let sandbox = match self.sandbox(&a.sandbox_id) {
            Ok(s) => s,
            Err(e) => return failure(e),
        };
        let req = Request::Get {
            path: a.path,
            user: None,
        };
        let (mut reader, _w) = match guest::open(&sandbox.vm.vsock, &req).await {
            Ok(c) => c,
            Err(e) => return failure(e.to_string()),
        };
        let mut data = Capture::default();
        match reader.finish(|d| data.add(&d)).await {
            Ok(_) => text(clip(&data.kept, data.total)),
            Err(e) => failure(e.to_string()),
        }
    }

    #[tool(
        description = "Write a text file in a sandbox (made or replaced; missing folders are made)."
    )]
    async fn write_file(
        &self,
        Parameters(a): Parameters<WriteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let sandbox = match self.sandbox(&a.sandbox_id) {
            Ok(s) => s,
            Err(e) => return failure(e),
        };
        let req = Request::Put {
            path: a.path,
            mode: 0o644,
            user: None,
            parents: true,
        };
        let written = async {
            let (mut reader, mut writer) = guest::open(&sandbox.vm.vsock, &req).await?;
            writer.send(FrameType::Stdin, a.content.as_bytes()).await?;
            if !a.content.is_empty() {
                writer.send(FrameType::Stdin, &[]).await?;
            }
            reader.finish(|_| {}).await
        };
        match written.await {
            Ok(r) => {
                let path = r
                    .entries
                    .and_then(|e| e.into_iter().next())
                    .map(|e| e.path)
                    .unwrap_or_default();
                text(format!("wrote {} bytes to {path}", r.size.unwrap_or(0)))
            }
            Err(e) => failure(e.to_string()),
        }
    }

    #[tool(description = "List a folder in a sandbox: one line per entry (kind, size, path).")]
    async fn list_files(
        &self,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let req = Request::List {
            path: a.path,
            depth: 1,
            user: None,
        };
        match self.file_call(&a.sandbox_id, req).await {
            Ok(r) => {
                let mut lines: Vec<String> = r
                    .entries
                    .unwrap_or_default()
                    .iter()
                    .map(|e| format!("{:7} {:>10} {}", e.kind, e.size, e.path))
                    .collect();
                if r.truncated {
                    lines.push(format!(
                        "[... more than {} entries; list a subfolder]",
                        vmm_agent::MAX_LIST_ENTRIES
                    ));
                }
                let all = lines.join("\n");
                text(clip(all.as_bytes(), all.len()))
            }
            Err(e) => failure(e),
        }
    }

    #[tool(
        description = "Fork a running sandbox into `count` copies (1 to 20) that continue from this instant, each on its own; returns their ids. Use it to try several approaches from one state."
    )]
    async fn fork_sandbox(
        &self,
        Parameters(a): Parameters<ForkArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let sandbox = match self.sandbox(&a.sandbox_id) {
            Ok(s) => s,
            Err(e) => return failure(e),
        };
        if !(1..=20).contains(&a.count) {
            return failure(format!("count must be 1 to 20, not {}", a.count));
        }
        match self.registry.fork(&sandbox, a.count, SANDBOX_TIMEOUT).await {
            Ok(children) => {
                let lines: Vec<String> = children
                    .iter()
                    .map(|c| match c {
                        Ok(s) => format!("sandbox_id: {}", s.id),
                        Err(e) => format!("error: {e}"),
                    })
                    .collect();
                text(lines.join("\n"))
            }
            Err(e) => failure(e.to_string()),
        }
    }

    #[tool(description = "Destroy a sandbox (its VM stops; its files are gone).")]
    async fn destroy_sandbox(
        &self,
        Parameters(a): Parameters<IdArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        match self.registry.kill(&a.sandbox_id).await {
            true => text(format!("destroyed {}", a.sandbox_id)),
            false => failure(format!("no sandbox {:?}", a.sandbox_id)),
        }
    }

    #[tool(description = "List the sandboxes of this session: id and template.")]
    async fn list_sandboxes(&self) -> Result<CallToolResult, ErrorData> {
        let lines: Vec<String> = self
            .registry
            .all()
            .iter()
            .map(|s| format!("{} {}", s.id, s.template))
            .collect();
        text(if lines.is_empty() {
            "no sandboxes".into()
        } else {
            lines.join("\n")
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Mcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("vmm", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Linux microVM sandboxes: create_sandbox, then run_command / read_file / write_file / list_files with its id; fork_sandbox copies a running sandbox; destroy_sandbox when done.",
            )
    }
}

/// Serves MCP on stdin/stdout until the client closes; every sandbox is
/// killed then.
pub async fn serve_stdio(registry: Arc<Registry>) -> Result<(), String> {
    let server = Mcp::new(registry.clone());
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("the MCP session did not start: {e}"))?;
    let ended = running.waiting().await;
    registry.kill_all().await;
    ended
        .map(drop)
        .map_err(|e| format!("the MCP session failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_arguments_become_an_egress_policy() {
        let args = |v: serde_json::Value| serde_json::from_value::<CreateArgs>(v).unwrap();
        assert_eq!(args(serde_json::json!({})).egress(), None);
        let closed = args(serde_json::json!({"internet": false, "allow": ["pypi.org:443"]}));
        let want = crate::config::EgressConfig {
            default: crate::config::EgressDefault::Deny,
            allow: vec!["pypi.org:443".into()],
            deny: vec![],
        };
        assert_eq!(closed.egress(), Some(want));
        let denied = args(serde_json::json!({"deny": ["203.0.113.0/24"]})).egress();
        assert_eq!(
            denied.map(|e| (e.default, e.deny)),
            Some((
                crate::config::EgressDefault::Allow,
                vec!["203.0.113.0/24".to_string()]
            ))
        );
    }

    #[test]
    fn long_output_is_cut_with_a_note() {
        let mut c = Capture::default();
        c.add(&vec![b'a'; MAX_OUTPUT]);
        c.add(b"tail");
        let s = clip(&c.kept, c.total);
        assert!(
            s.ends_with("\n[... 4 more bytes not shown]"),
            "{}",
            &s[s.len() - 40..]
        );
        assert_eq!(clip(b"short", 5), "short");
    }
}
