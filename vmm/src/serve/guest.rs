//! The server's asynchronous side of the guest agent protocol
//! (docs/agent-protocol.md): one connection per request over the VM's
//! vsock Unix socket, frames as `vmm_agent` defines them. The guest is
//! untrusted: every frame is bounded (`vmm_agent::MAX_FRAME`) and every
//! wait for an answer that is not a running command's output has a
//! deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use vmm_agent::{frame_head, parse_head, FrameType, Request, Response};

/// How long the agent gets to answer a request that is not a command.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the sandbox's agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the sandbox's agent refused the connection ({0:?})")]
    Refused(String),
    #[error("the connection to the sandbox's agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the sandbox's agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the sandbox's agent broke the protocol: {0}")]
    Protocol(String),
    /// The agent answered with an error.
    #[error("{}", .0.error.as_deref().unwrap_or("the request failed"))]
    Agent(Response),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A message from the agent.
#[derive(Debug)]
pub enum Frame {
    Started(i32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Event(vmm_agent::WatchEvent),
    Response(Response),
}

/// The reading half of a request's connection.
pub struct Reader(OwnedReadHalf);
/// The writing half of a request's connection.
pub struct Writer(OwnedWriteHalf);

/// Opens a connection to the agent behind `uds` and sends `request`.
pub async fn open(uds: &Path, request: &Request) -> Result<(Reader, Writer)> {
    let connect = async {
        let mut s = UnixStream::connect(uds)
            .await
            .map_err(|source| Error::Connect {
                path: uds.to_path_buf(),
                source,
            })?;
        s.write_all(agent::connect_line().as_bytes()).await?;
        // Byte by byte: nothing after the answer's line may be lost.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !agent::connect_answer_done(&line) {
            if s.read(&mut byte).await? == 0 {
                break;
            }
            line.push(byte[0]);
        }
        agent::connect_answer(&line).map_err(Error::Refused)?;
        Ok::<_, Error>(s)
    };
    let stream = tokio::time::timeout(ANSWER_TIMEOUT, connect)
        .await
        .map_err(|_| Error::Timeout(ANSWER_TIMEOUT))??;
    let (r, w) = stream.into_split();
    let mut writer = Writer(w);
    let json = serde_json::to_vec(request).map_err(|e| Error::Protocol(e.to_string()))?;
    writer.send(FrameType::Request, &json).await?;
    Ok((Reader(r), writer))
}

impl Writer {
    /// Sends one frame (stdin data; empty is end of input).
    pub async fn send(&mut self, kind: FrameType, payload: &[u8]) -> Result<()> {
        for chunk in payload
            .chunks(vmm_agent::MAX_FRAME)
            .chain(payload.is_empty().then_some(&[][..]))
        {
            self.0.write_all(&frame_head(kind, chunk.len())?).await?;
            self.0.write_all(chunk).await?;
        }
        Ok(())
    }
}

impl Reader {
    /// The next frame, waiting as long as it takes (a command's output).
    pub async fn next(&mut self) -> Result<Frame> {
        let mut head = [0u8; 5];
        self.0
            .read_exact(&mut head)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    Error::Protocol("the agent closed the connection early".into())
                }
                _ => Error::Io(e),
            })?;
        let (kind, len) = parse_head(&head)?;
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).await?;
        let json_err = |e: serde_json::Error| Error::Protocol(e.to_string());
        Ok(match kind {
            FrameType::Started => {
                let s: vmm_agent::Started = serde_json::from_slice(&payload).map_err(json_err)?;
                Frame::Started(s.pid)
            }
            FrameType::Event => Frame::Event(serde_json::from_slice(&payload).map_err(json_err)?),
            FrameType::Stdout => Frame::Stdout(payload),
            FrameType::Stderr => Frame::Stderr(payload),
            FrameType::Response => {
                Frame::Response(serde_json::from_slice(&payload).map_err(json_err)?)
            }
            other => return Err(Error::Protocol(format!("unexpected {other:?} frame"))),
        })
    }

    /// Reads to the response, within [`ANSWER_TIMEOUT`]; data frames go to
    /// `on_data`. An error answer is [`Error::Agent`].
    pub async fn finish(&mut self, on_data: impl FnMut(Vec<u8>)) -> Result<Response> {
        self.finish_within(ANSWER_TIMEOUT, on_data).await
    }

    /// [`Reader::finish`] with a deadline of the caller's.
    pub async fn finish_within(
        &mut self,
        timeout: Duration,
        mut on_data: impl FnMut(Vec<u8>),
    ) -> Result<Response> {
        let read = async {
            loop {
                match self.next().await? {
                    Frame::Response(r) if r.error.is_some() => return Err(Error::Agent(r)),
                    Frame::Response(r) => return Ok(r),
                    Frame::Stdout(d) | Frame::Stderr(d) => on_data(d),
                    Frame::Started(_) | Frame::Event(_) => {}
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }
}

/// How a failed request reaches an envd caller: the agent's "not found"
/// and "exists" keep their meaning, its other refusals are the caller's
/// mistake, and a broken connection means the sandbox is unreachable.
impl From<Error> for super::connect::Error {
    fn from(e: Error) -> Self {
        use super::connect::Code;
        match e {
            Error::Agent(r) => {
                let code = match (r.not_found, r.exists) {
                    (true, _) => Code::NotFound,
                    (_, true) => Code::AlreadyExists,
                    _ => Code::InvalidArgument,
                };
                super::connect::Error::new(code, r.error.unwrap_or_default())
            }
            other => super::connect::Error::new(Code::Unavailable, other.to_string()),
        }
    }
}

/// One request without data: its answer.
pub async fn call(uds: &Path, request: &Request) -> Result<Response> {
    let (mut r, _w) = open(uds, request).await?;
    r.finish(|_| {}).await
}
