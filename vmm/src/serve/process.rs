//! envd's `process.Process` service over the guest agent: a started
//! process is an agent `exec` whose connection this server holds. Its
//! output fans out to every caller attached to it (the `Start` call and
//! any `Connect` calls), its stdin is fed from `SendInput`/`StreamInput`,
//! and signals go through the agent's `signal` request. A process started
//! with a PTY runs on a terminal in the guest (the agent's exec with
//! `pty`): its output is `pty` data, `pty` input is typed into it and
//! `Update` resizes it. A process lives in the table from its start event
//! to its end event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use tokio::sync::mpsc;
use vmm_agent::{FrameType, PtySize, Request, Response};

use super::connect::{Code, Codec, Envelopes, Error, Msg, Result, Stream};
use super::envd::process::{
    process_event, process_input, process_selector, stream_input_request, ListResponse,
    ProcessConfig, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, Pty, Signal,
    StartRequest,
};
use super::guest::{self, Frame};
use super::sandboxes::Sandbox;

/// Events queued for one attached caller before the process's output
/// waits for it.
const SUBSCRIBER_QUEUE: usize = 64;

/// One running process.
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    /// It runs on a terminal.
    pty: bool,
    /// Frames for its connection to the agent: stdin (an empty chunk
    /// closes it) or terminal input and resizes; `None` when started
    /// without stdin.
    input: Option<mpsc::Sender<(FrameType, Vec<u8>)>>,
    subscribers: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
}

/// A sandbox's running processes.
#[derive(Default)]
pub struct Processes {
    map: Mutex<HashMap<u32, Arc<Proc>>>,
    closed: AtomicBool,
}

impl Processes {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every process (the sandbox ends): attached callers see
    /// their streams end.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.map().clear();
    }

    fn find(&self, selector: Option<&ProcessSelector>) -> Result<Arc<Proc>> {
        let map = self.map();
        let found = match selector.and_then(|s| s.selector.as_ref()) {
            Some(process_selector::Selector::Pid(pid)) => map.get(pid).cloned(),
            Some(process_selector::Selector::Tag(tag)) => map
                .values()
                .find(|p| p.tag.as_deref() == Some(tag))
                .cloned(),
            None => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    "no process selected: give a pid or a tag",
                ))
            }
        };
        found.ok_or_else(|| {
            Error::new(
                Code::NotFound,
                "no such process: it ended, or never ran here",
            )
        })
    }
}

/// What the caller's headers add to a call: the user (`Authorization:
/// Basic base64(user:)`) and the keepalive interval.
#[derive(Debug, Clone, Default)]
pub struct CallInfo {
    pub user: Option<String>,
    pub keepalive: Option<Duration>,
    pub deadline: Option<Duration>,
}

fn event(e: process_event::Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}

/// `Start`: runs the process and streams its events to `stream`.
pub async fn start(sandbox: Arc<Sandbox>, req: StartRequest, info: CallInfo, stream: Stream) {
    let wrap = |e| super::envd::process::StartResponse { event: Some(e) };
    let attached = match launch(&sandbox, req, &info).await {
        Ok(a) => a,
        Err(e) => return stream.end(Some(e)).await,
    };
    let (proc, rx) = attached;
    forward(&sandbox, proc, rx, stream, &info, wrap, true).await;
}

/// `Connect`: attaches to a running process.
pub async fn connect(
    sandbox: Arc<Sandbox>,
    selector: Option<ProcessSelector>,
    info: CallInfo,
    stream: Stream,
) {
    let wrap = |e| super::envd::process::ConnectResponse { event: Some(e) };
    let proc = match sandbox.processes.find(selector.as_ref()) {
        Ok(p) => p,
        Err(e) => return stream.end(Some(e)).await,
    };
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let _ = tx.try_send(event(process_event::Event::Start(
        process_event::StartEvent { pid: proc.pid },
    )));
    proc.subscribers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(tx);
    forward(&sandbox, proc, rx, stream, &info, wrap, false).await;
}

/// Starts the process in the guest; returns it and the first caller's
/// event queue (holding the start event).
async fn launch(
    sandbox: &Arc<Sandbox>,
    req: StartRequest,
    info: &CallInfo,
) -> Result<(Arc<Proc>, mpsc::Receiver<ProcessEvent>)> {
    if sandbox.processes.closed.load(Ordering::SeqCst) {
        return Err(Error::new(Code::Unavailable, "the sandbox is ending"));
    }
    let pty = req.pty.map(|p| pty_size(&p));
    let config = req
        .process
        .ok_or_else(|| Error::new(Code::InvalidArgument, "the request has no process"))?;
    if config.cmd.is_empty() {
        return Err(Error::new(
            Code::InvalidArgument,
            "the process has no command",
        ));
    }
    let mut env = sandbox.env_vars.clone();
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    // A terminal always takes input.
    let stdin = pty.is_some() || req.stdin.unwrap_or(true);
    let exec = Request::Exec {
        argv: std::iter::once(config.cmd.clone())
            .chain(config.args.iter().cloned())
            .collect(),
        env,
        cwd: config.cwd.clone().filter(|c| !c.is_empty()),
        stdin,
        timeout_ms: None,
        user: info.user.clone(),
        pty,
        root: None,
        mounts: Vec::new(),
        isolation: None,
    };
    let (mut reader, mut writer) = guest::open(&sandbox.vm.vsock, &exec).await?;
    let pid = match reader.next().await? {
        Frame::Started(pid) => pid as u32,
        Frame::Response(r) => return Err(Error::from(guest::Error::Agent(r))),
        other => {
            return Err(Error::new(
                Code::Internal,
                format!("the agent answered {other:?} first"),
            ))
        }
    };
    let input = stdin.then(|| {
        let (tx, mut rx) = mpsc::channel::<(FrameType, Vec<u8>)>(16);
        tokio::spawn(async move {
            while let Some((kind, chunk)) = rx.recv().await {
                let end = kind == FrameType::Stdin && chunk.is_empty();
                if writer.send(kind, &chunk).await.is_err() || end {
                    break;
                }
            }
        });
        tx
    });
    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let _ = tx.try_send(event(process_event::Event::Start(
        process_event::StartEvent { pid },
    )));
    let proc = Arc::new(Proc {
        pid,
        tag: req.tag,
        config,
        pty: pty.is_some(),
        input,
        subscribers: Mutex::new(vec![tx]),
    });
    let cmd = std::iter::once(&proc.config.cmd)
        .chain(&proc.config.args)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    let mut fields = vec![("pid", pid.to_string()), ("cmd", cmd)];
    if proc.pty {
        fields.push(("pty", "true".into()));
    }
    sandbox
        .log
        .add(super::logs::Level::Info, "Process started", &fields);
    sandbox.processes.map().insert(pid, proc.clone());
    let (sb, p) = (sandbox.clone(), proc.clone());
    tokio::spawn(async move { pump(sb, p, reader).await });
    Ok((proc, rx))
}

/// Reads the process's frames to its end and hands each event to every
/// attached caller.
async fn pump(sandbox: Arc<Sandbox>, proc: Arc<Proc>, mut reader: guest::Reader) {
    use process_event::data_event::Output;
    loop {
        let (ev, last) = match reader.next().await {
            Ok(Frame::Stdout(d)) if proc.pty => (data(Output::Pty(d)), false),
            Ok(Frame::Stdout(d)) => (data(Output::Stdout(d)), false),
            Ok(Frame::Stderr(d)) => (data(Output::Stderr(d)), false),
            Ok(Frame::Response(r)) => (end_event(&r), true),
            Ok(Frame::Started(_) | Frame::Event(_)) => continue,
            Err(e) => (
                event(process_event::Event::End(process_event::EndEvent {
                    exit_code: -1,
                    exited: false,
                    status: "unknown".into(),
                    error: Some(format!("the connection to the process was lost: {e}")),
                })),
                true,
            ),
        };
        if last {
            // Gone from the table before its end is seen, so a caller
            // that saw the end never finds it again.
            sandbox.processes.map().remove(&proc.pid);
            if let Some(process_event::Event::End(end)) = &ev.event {
                let (level, message) = match end.exited || end.status != "unknown" {
                    true => (super::logs::Level::Info, "Process ended"),
                    // The agent's connection broke, or it could not run it.
                    false => (super::logs::Level::Warn, "Process lost"),
                };
                let mut fields = vec![
                    ("pid", proc.pid.to_string()),
                    ("status", end.status.clone()),
                ];
                fields.extend(end.error.clone().map(|e| ("error", e)));
                sandbox.log.add(level, message, &fields);
            }
        }
        let subscribers: Vec<_> = proc
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for s in &subscribers {
            let _ = s.send(ev.clone()).await;
        }
        proc.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| !s.is_closed());
        if last {
            proc.subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return;
        }
    }
}

fn data(output: process_event::data_event::Output) -> ProcessEvent {
    event(process_event::Event::Data(process_event::DataEvent {
        output: Some(output),
    }))
}

/// The end event for the agent's answer, as envd words it (Go's
/// `ProcessState.String()`, also the error of any end but exit 0).
fn end_event(r: &Response) -> ProcessEvent {
    let (exit_code, exited, status) = match (r.exit_code, r.signal) {
        (Some(code), _) => (code, true, format!("exit status {code}")),
        (None, Some(sig)) => (-1, false, format!("signal: {}", signal_name(sig))),
        (None, None) => (-1, false, "unknown".into()),
    };
    let error = match (&r.error, exit_code) {
        (Some(e), _) => Some(e.clone()),
        (None, 0) => None,
        (None, _) => Some(status.clone()),
    };
    event(process_event::Event::End(process_event::EndEvent {
        exit_code,
        exited,
        status,
        error,
    }))
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        n => format!("signal {n}"),
    }
}

/// Copies one caller's events to its stream, with keepalives while the
/// process is quiet, until the end event, the caller leaving or the
/// call's deadline (which kills a process its own `Start` call ran).
async fn forward<M: Msg>(
    sandbox: &Arc<Sandbox>,
    proc: Arc<Proc>,
    mut rx: mpsc::Receiver<ProcessEvent>,
    mut stream: Stream,
    info: &CallInfo,
    wrap: impl Fn(ProcessEvent) -> M,
    owner: bool,
) {
    let keepalive = info.keepalive.unwrap_or(Duration::from_secs(3600));
    let deadline = info.deadline.map(|d| tokio::time::Instant::now() + d);
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, tokio::time::timeout(keepalive, rx.recv()))
                    .await
                    .map_err(|_| ()),
                None => Ok(tokio::time::timeout(keepalive, rx.recv()).await),
            }
        };
        match next.await {
            Err(()) => {
                if owner {
                    let _ = signal(sandbox, &proc, libc::SIGKILL).await;
                }
                let e = Error::new(
                    Code::DeadlineExceeded,
                    "the call's timeout passed; the process was killed",
                );
                return stream.end(Some(e)).await;
            }
            Ok(Err(_quiet)) => {
                let ka = event(process_event::Event::Keepalive(process_event::KeepAlive {}));
                if !stream.send(&wrap(ka)).await {
                    return;
                }
            }
            Ok(Ok(None)) => return stream.end(None).await,
            Ok(Ok(Some(ev))) => {
                let end = matches!(ev.event, Some(process_event::Event::End(_)));
                if !stream.send(&wrap(ev)).await {
                    return;
                }
                if end {
                    return stream.end(None).await;
                }
            }
        }
    }
}

async fn signal(sandbox: &Sandbox, proc: &Proc, sig: i32) -> Result<()> {
    let req = Request::Signal {
        pid: proc.pid as i32,
        signal: sig,
    };
    guest::call(&sandbox.vm.vsock, &req)
        .await
        .map_err(Error::from)
        .map(drop)
}

/// `SendSignal`.
pub async fn send_signal(
    sandbox: &Sandbox,
    selector: Option<ProcessSelector>,
    sig: i32,
) -> Result<()> {
    let proc = sandbox.processes.find(selector.as_ref())?;
    let sig = match Signal::try_from(sig) {
        Ok(Signal::Sigkill) => libc::SIGKILL,
        Ok(Signal::Sigterm) => libc::SIGTERM,
        _ => {
            return Err(Error::new(
                Code::InvalidArgument,
                format!("signal {sig} is not one envd sends: use SIGKILL or SIGTERM"),
            ))
        }
    };
    signal(sandbox, &proc, sig).await
}

/// A terminal size as the agent takes it (larger numbers are cut to the
/// largest a terminal has).
fn pty_size(pty: &Pty) -> PtySize {
    let size = pty.size.unwrap_or_default();
    let cut = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
    PtySize {
        cols: cut(size.cols),
        rows: cut(size.rows),
    }
}

/// `SendInput` and `CloseStdin` (`input` None).
pub async fn send_input(
    sandbox: &Sandbox,
    selector: Option<ProcessSelector>,
    input: Option<ProcessInput>,
) -> Result<()> {
    let proc = sandbox.processes.find(selector.as_ref())?;
    let refuse = |msg: &str| Err(Error::new(Code::FailedPrecondition, msg));
    let chunk = match (input.and_then(|i| i.input), proc.pty) {
        (Some(process_input::Input::Stdin(d) | process_input::Input::Pty(d)), _)
            if d.is_empty() =>
        {
            return Ok(())
        }
        (Some(process_input::Input::Stdin(d)), false) => d,
        (Some(process_input::Input::Pty(d)), true) => d,
        (None, false) => Vec::new(),
        (Some(process_input::Input::Stdin(_)), true) => {
            return refuse("the process runs on a terminal: send its input as pty input")
        }
        (Some(process_input::Input::Pty(_)), false) => {
            return refuse("the process has no terminal: send its input as stdin")
        }
        (None, true) => {
            return refuse(
                "a terminal has no end of input to close: send ^D (0x04) as pty input, \
                 or kill the process",
            )
        }
    };
    feed(&proc, FrameType::Stdin, chunk).await
}

/// Queues one frame for the process's connection to the agent.
async fn feed(proc: &Proc, kind: FrameType, payload: Vec<u8>) -> Result<()> {
    let tx = proc.input.as_ref().ok_or_else(|| {
        Error::new(
            Code::FailedPrecondition,
            "the process was started without stdin: start it with stdin=True",
        )
    })?;
    tx.send((kind, payload))
        .await
        .map_err(|_| Error::new(Code::FailedPrecondition, "the process's stdin is closed"))
}

/// `Update`: resizes the process's terminal (nothing else can change).
pub async fn update(
    sandbox: &Sandbox,
    selector: Option<ProcessSelector>,
    pty: Option<Pty>,
) -> Result<()> {
    let proc = sandbox.processes.find(selector.as_ref())?;
    let Some(pty) = pty else {
        return Ok(());
    };
    if !proc.pty {
        return Err(Error::new(
            Code::FailedPrecondition,
            "the process has no terminal to resize: start it with a PTY",
        ));
    }
    let size = serde_json::to_vec(&pty_size(&pty))
        .map_err(|e| Error::new(Code::Internal, e.to_string()))?;
    feed(&proc, FrameType::Resize, size).await
}

/// `StreamInput`: a start event naming the process, then data events.
pub async fn stream_input(sandbox: &Sandbox, codec: Codec, mut body: Incoming) -> Result<()> {
    use super::envd::process::StreamInputRequest;
    let mut envelopes = Envelopes::default();
    let mut target: Option<ProcessSelector> = None;
    while let Some(msg) = envelopes.next(&mut body).await? {
        let req: StreamInputRequest = codec.decode(&msg)?;
        match req.event {
            Some(stream_input_request::Event::Start(s)) => target = s.process,
            Some(stream_input_request::Event::Data(d)) => {
                let sel = target.clone().ok_or_else(|| {
                    Error::new(Code::InvalidArgument, "data before the start event")
                })?;
                send_input(sandbox, Some(sel), d.input).await?;
            }
            Some(stream_input_request::Event::Keepalive(_)) | None => {}
        }
    }
    Ok(())
}

/// `List`.
pub fn list(sandbox: &Sandbox) -> ListResponse {
    let mut processes: Vec<ProcessInfo> = sandbox
        .processes
        .map()
        .values()
        .map(|p| ProcessInfo {
            config: Some(p.config.clone()),
            pid: p.pid,
            tag: p.tag.clone(),
        })
        .collect();
    processes.sort_by_key(|p| p.pid);
    ListResponse { processes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_like_envd() {
        let code = end_event(&Response {
            exit_code: Some(3),
            ..Default::default()
        });
        let Some(process_event::Event::End(e)) = code.event else {
            panic!()
        };
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (3, true, "exit status 3")
        );
        assert_eq!(e.error.as_deref(), Some("exit status 3"));
        let killed = end_event(&Response {
            signal: Some(libc::SIGKILL),
            ..Default::default()
        });
        let Some(process_event::Event::End(e)) = killed.event else {
            panic!()
        };
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (-1, false, "signal: killed")
        );
        assert_eq!(e.error.as_deref(), Some("signal: killed"));
        let fine = end_event(&Response {
            exit_code: Some(0),
            ..Default::default()
        });
        let Some(process_event::Event::End(e)) = fine.event else {
            panic!()
        };
        assert_eq!(e.error, None);
    }

    #[test]
    fn unknown_processes_are_not_found() {
        let p = Processes::default();
        assert_eq!(p.find(None).err().unwrap().code, Code::InvalidArgument);
        let sel = ProcessSelector {
            selector: Some(process_selector::Selector::Pid(42)),
        };
        assert_eq!(p.find(Some(&sel)).err().unwrap().code, Code::NotFound);
    }
}
