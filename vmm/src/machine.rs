//! The machine's side of every action. A [`Machine`] lives on the device
//! event loop (the thread that runs the devices), where it is the only
//! place that describes, pauses, resumes, snapshots, forks and stops the
//! VM: no device touches guest memory while it works, and nothing else
//! does it. Every entry point (the HTTP control socket on its own thread,
//! the Rust API, the CLI through the socket) sends it [`Action`]s through
//! a [`MachineHandle`] and gets each answer through a [`Responder`], so no
//! client is ever served on, or waited for by, the device loop.
//!
//! The machine also knows whether the guest agent is ready (it listens on
//! the agent's ready port, `<uds_path>_1023`) and answers `WaitAgent` when
//! it is; a fork is answered once its children run, without the loop
//! waiting for them.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::timer::Ticker;
use vmm_os::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_os::EventFd;

use crate::action::{
    Action, ActionError, AgentReply, AgentState, Control, ForkInfo, ForkRequest, Reply,
    SnapshotInfo, SnapshotRequest, VmDescription, VmState, VsockInfo,
};
use crate::control::Controller;
use crate::exit::{ExitReason, ExitSignal};
use crate::fork;
use hypervisor::VcpuState;

/// `WaitAgent` callers waiting for the agent at once; more get 503.
pub const MAX_WAITING: usize = 64;
/// How often a starting fork's deadline is checked.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for the agent's ready announcement on {path}: {source}; check that its folder exists and is writable")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the machine's event sources: {0}")]
    Setup(#[from] std::io::Error),
}

/// Listens (without blocking) where the agent announces itself.
fn listen_ready(path: &std::path::Path) -> Result<UnixListener, Error> {
    let listen = || {
        let listener = devices::unix_socket::bind_private(path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    listen().map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// An action's answer.
pub type ActionResult = std::result::Result<Reply, ActionError>;

/// Takes an action's answer, on the machine's thread. One dropped without
/// an answer (the VM stopped first) answers [`ActionError::Stopped`].
pub struct Responder(Option<Box<dyn FnOnce(ActionResult) + Send>>);

impl Responder {
    pub fn new(answer: impl FnOnce(ActionResult) + Send + 'static) -> Self {
        Responder(Some(Box::new(answer)))
    }

    pub fn answer(mut self, result: ActionResult) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(ActionError::Stopped));
        }
    }
}

/// Sends actions to a machine from any thread. Cheap to clone.
#[derive(Clone)]
pub struct MachineHandle {
    tx: mpsc::Sender<(Action, Responder)>,
    wake: Arc<EventFd>,
}

impl MachineHandle {
    /// Sends `action`; `responder` gets the answer on the machine's thread
    /// (at once with [`ActionError::Stopped`] if the machine is gone).
    pub fn submit(&self, action: Action, responder: Responder) {
        match self.tx.send((action, responder)) {
            Ok(()) => {
                let _ = self.wake.write(1);
            }
            Err(mpsc::SendError((_, responder))) => responder.answer(Err(ActionError::Stopped)),
        }
    }

    /// Does `action` and waits at most `timeout` for its answer.
    pub fn perform_within(&self, action: Action, timeout: Duration) -> ActionResult {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            action,
            Responder::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        let answer = match Instant::now().checked_add(timeout) {
            Some(_) => rx.recv_timeout(timeout).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ActionError::NoAnswer(timeout),
                mpsc::RecvTimeoutError::Disconnected => ActionError::Stopped,
            }),
            None => rx.recv().map_err(|_| ActionError::Stopped),
        };
        answer.unwrap_or_else(Err)
    }
}

impl Control for MachineHandle {
    type Error = ActionError;

    fn perform(&self, action: Action) -> ActionResult {
        self.perform_within(action, Duration::MAX)
    }

    fn unexpected(reply: Reply) -> ActionError {
        ActionError::Unexpected(format!("{reply:?}"))
    }
}

/// What the machine reports about itself.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub vsock: Option<(u64, PathBuf)>,
}

/// A fork whose children are starting, and who waits for it.
struct ForkWait {
    responder: Responder,
    pending: fork::Pending,
    parent_pause_ms: f64,
}

/// Where a machine is in its life: the one record of it.
#[derive(Debug)]
enum Lifecycle {
    /// Built; its vCPU threads do not run yet.
    Created,
    Running,
    /// Every vCPU parked, with its saved state.
    Paused(Vec<VcpuState>),
    /// Told to stop: it takes no more actions.
    Stopping,
}

/// What a machine whose vCPUs do not run yet answers.
fn starting() -> ActionError {
    ActionError::Busy("the VM is starting; try again".into())
}

/// The machine on the device event loop (see the module comment).
pub struct Machine {
    lifecycle: Lifecycle,
    /// Pause, resume, snapshot and fork (absent in unit tests).
    control: Option<Controller>,
    info: VmInfo,
    exit: Arc<ExitSignal>,
    tx: mpsc::Sender<(Action, Responder)>,
    inbox: mpsc::Receiver<(Action, Responder)>,
    wake: Arc<EventFd>,
    ready_listener: Option<UnixListener>,
    ready_path: Option<PathBuf>,
    /// Written when a restored guest's agent is ready (after its reseed).
    agent_ready_evt: Option<EventFd>,
    agent_ready: bool,
    /// `WaitAgent` callers waiting for the agent.
    waiting: Vec<Responder>,
    /// The fork whose children are starting (one at a time).
    forking: Option<ForkWait>,
    /// Fires every [`TICK`] while a fork is starting.
    timer: Ticker,
    /// Fork children still running, by pidfd (reaped when they end).
    children: Vec<(OwnedFd, std::process::Child)>,
}

impl Machine {
    /// A machine controlled through `control`; with a vsock device and
    /// `watch_agent` it listens for the agent's ready announcement.
    /// `agent_ready_evt` (for a restored guest, whose agent does not
    /// announce itself again) is written once the agent is ready.
    pub fn new(
        control: Option<Controller>,
        info: VmInfo,
        exit: Arc<ExitSignal>,
        watch_agent: bool,
        agent_ready_evt: Option<EventFd>,
    ) -> Result<Self, Error> {
        let ready_path = info
            .vsock
            .as_ref()
            .filter(|_| watch_agent)
            .map(|(_, uds)| crate::agent::ready_socket_path(uds));
        let ready_listener = ready_path.as_deref().map(listen_ready).transpose()?;
        let (tx, inbox) = mpsc::channel();
        Ok(Machine {
            lifecycle: Lifecycle::Created,
            control,
            info,
            exit,
            tx,
            inbox,
            wake: Arc::new(EventFd::new(vmm_os::EFD_NONBLOCK)?),
            ready_listener,
            ready_path,
            agent_ready_evt,
            agent_ready: false,
            waiting: Vec::new(),
            forking: None,
            timer: Ticker::new(TICK)?,
            children: Vec::new(),
        })
    }

    /// A handle that sends this machine actions.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// The vCPU threads run (kicked when pausing): the machine runs.
    pub fn set_vcpu_threads(&mut self, threads: Vec<libc::pthread_t>) {
        if let Some(c) = &mut self.control {
            c.threads = threads;
        }
        self.lifecycle = Lifecycle::Running;
    }

    fn control(&mut self) -> std::result::Result<&mut Controller, ActionError> {
        self.control.as_mut().ok_or(ActionError::NotControllable)
    }

    fn pause(&mut self) -> ActionResult {
        let control = self.control.as_mut().ok_or(ActionError::NotControllable)?;
        match self.lifecycle {
            Lifecycle::Running => self.lifecycle = Lifecycle::Paused(control.pause()?),
            Lifecycle::Paused(_) => {}
            Lifecycle::Created => return Err(starting()),
            Lifecycle::Stopping => return Err(ActionError::Stopped),
        }
        Ok(Reply::Done)
    }

    fn resume(&mut self) -> ActionResult {
        let control = self.control.as_mut().ok_or(ActionError::NotControllable)?;
        match self.lifecycle {
            Lifecycle::Paused(_) => {
                control.resume();
                self.lifecycle = Lifecycle::Running;
            }
            Lifecycle::Running => {}
            Lifecycle::Created => return Err(starting()),
            Lifecycle::Stopping => return Err(ActionError::Stopped),
        }
        Ok(Reply::Done)
    }

    /// Runs `f` on the paused machine: pausing it first, and resuming it
    /// after, unless it was paused already. Returns what `f` returned and
    /// how long the vCPUs stood (milliseconds).
    fn paused_for<T>(
        &mut self,
        f: impl FnOnce(&mut Controller, &[VcpuState]) -> crate::control::Result<T>,
    ) -> std::result::Result<(T, f64), ActionError> {
        let t0 = Instant::now();
        let control = self.control.as_mut().ok_or(ActionError::NotControllable)?;
        let result = match &self.lifecycle {
            Lifecycle::Paused(vcpus) => f(control, vcpus),
            Lifecycle::Running => {
                let vcpus = control.pause()?;
                let result = f(control, &vcpus);
                control.resume();
                result
            }
            Lifecycle::Created => return Err(starting()),
            Lifecycle::Stopping => return Err(ActionError::Stopped),
        };
        Ok((result?, t0.elapsed().as_secs_f64() * 1e3))
    }

    fn snapshot(&mut self, request: SnapshotRequest) -> ActionResult {
        let ready = self.agent_ready;
        crate::jail::check_host_sees(&request.dir).map_err(ActionError::BadRequest)?;
        let writer =
            crate::snapshot::Writer::create(&request.dir).map_err(crate::control::Error::from)?;
        let key = request.key.as_deref();
        let (memory_bytes, pause_ms) =
            self.paused_for(|c, vcpus| c.snapshot(vcpus, writer, ready, key))?;
        Ok(Reply::Snapshot(SnapshotInfo {
            dir: request.dir,
            memory_bytes,
            pause_ms,
        }))
    }

    fn agent_state(&self) -> AgentState {
        match (&self.info.vsock, self.agent_ready) {
            (None, _) => AgentState::None,
            (Some(_), false) => AgentState::Starting,
            (Some(_), true) => AgentState::Ready,
        }
    }

    fn describe(&self) -> VmDescription {
        VmDescription {
            state: match self.lifecycle {
                Lifecycle::Paused(_) => VmState::Paused,
                _ => VmState::Running,
            },
            vcpus: self.info.vcpus,
            memory_mib: self.info.memory_mib,
            vsock: self.info.vsock.as_ref().map(|(cid, path)| VsockInfo {
                cid: *cid,
                uds_path: path.clone(),
            }),
            agent: self.agent_state(),
        }
    }

    /// Does one action: answers it now, or keeps its responder until it
    /// can (the agent's readiness, a fork's children).
    fn act(&mut self, action: Action, responder: Responder, ops: &mut EventOps) {
        if let Lifecycle::Stopping = self.lifecycle {
            return responder.answer(Err(ActionError::Stopped));
        }
        let result = match action {
            Action::Describe => Ok(Reply::Vm(self.describe())),
            Action::WaitAgent if self.agent_state() == AgentState::Starting => {
                if self.waiting.len() >= MAX_WAITING {
                    let error =
                        format!("{MAX_WAITING} clients already wait for the agent; try again");
                    Err(ActionError::Busy(error))
                } else {
                    return self.waiting.push(responder);
                }
            }
            Action::WaitAgent => Ok(Reply::Agent(AgentReply {
                agent: self.agent_state(),
            })),
            Action::Stop => {
                self.lifecycle = Lifecycle::Stopping;
                self.exit.report(ExitReason::Stopped { signal: None });
                Ok(Reply::Done)
            }
            Action::Pause => self.pause(),
            Action::Resume => self.resume(),
            Action::Snapshot(request) => self.snapshot(request),
            Action::SetEgress(egress) => self
                .control()
                .and_then(|c| Ok(c.set_egress(egress)?))
                .map(|()| Reply::Done),
            Action::Fork(request) => return self.fork(&request, responder, ops),
        };
        responder.answer(result);
    }

    /// Starts a fork; `responder` is answered once the children run.
    fn fork(&mut self, request: &ForkRequest, responder: Responder, ops: &mut EventOps) {
        if self.forking.is_some() {
            return responder.answer(Err(ActionError::ForkInProgress));
        }
        if let Some(dir) = &request.dir {
            if let Err(e) = crate::jail::check_host_sees(dir) {
                return responder.answer(Err(ActionError::BadRequest(e)));
            }
        }
        let ready = self.agent_ready;
        // Paused only while what the children need is captured (memory
        // frozen, the disk's changes copied); they start once it runs.
        let started = self
            .control()
            .and_then(|c| Ok(c.check_forkable()?))
            .and_then(|()| self.paused_for(|c, vcpus| c.capture(vcpus, ready)))
            .and_then(|(capture, pause_ms)| {
                let pending = self.control()?.spawn_children(&capture, request)?;
                Ok((pending, pause_ms))
            });
        let (mut pending, parent_pause_ms) = match started {
            Ok(p) => p,
            Err(e) => return responder.answer(Err(e)),
        };
        for fd in pending.fds() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                pending.kill_all();
                let error = format!("cannot watch a fork child: {e:?}; try again");
                return responder.answer(Err(ActionError::Busy(error)));
            }
        }
        self.forking = Some(ForkWait {
            responder,
            pending,
            parent_pause_ms,
        });
    }

    /// A starting fork child answered (or the tick checks the deadline).
    fn fork_progress(&mut self, fd: Option<RawFd>, ops: &mut EventOps) {
        let Some(wait) = self.forking.as_mut() else {
            return;
        };
        let outcome = match fd {
            Some(fd) => wait.pending.on_readable(fd),
            None if Instant::now() >= wait.pending.deadline => Err(wait.pending.timed_out()),
            None => Ok(false),
        };
        if outcome.as_ref().is_ok_and(|done| !done) {
            return;
        }
        let Some(mut wait) = self.forking.take() else {
            return;
        };
        for fd in wait.pending.fds() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        if let Err(e) = outcome {
            wait.pending.kill_all();
            return wait.responder.answer(Err(ActionError::Control(e.into())));
        }
        let spawned = wait.pending.finish();
        let info = ForkInfo {
            children: spawned.iter().map(|s| s.info.clone()).collect(),
            parent_pause_ms: wait.parent_pause_ms,
        };
        for s in spawned {
            match vmm_os::process::exit_fd(s.process.id()) {
                Ok(fd) => {
                    if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                        tracing::warn!("cannot watch fork child {}: {e:?}", s.info.id);
                    }
                    self.children.push((fd, s.process));
                }
                // Without a pidfd the child is reaped when the VMM ends.
                Err(e) => tracing::warn!("cannot watch fork child {}: {e}", s.info.id),
            }
        }
        wait.responder.answer(Ok(Reply::Fork(info)));
        // A VM forked once is likely forked again.
        if let Some(c) = &mut self.control {
            c.prepare_spare();
        }
    }

    /// A fork child ended: reap it.
    fn on_child_exit(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(i) = self.children.iter().position(|(p, _)| p.as_raw_fd() == fd) {
            let _ = ops.remove(Events::empty_raw(fd));
            let (pidfd, mut child) = self.children.swap_remove(i);
            // Closed before the reap: once the child is gone from /proc,
            // nothing of it is left in this process.
            drop(pidfd);
            let _ = child.wait();
        }
    }

    /// The agent is ready: answer everyone waiting for it.
    fn set_agent_ready(&mut self) {
        self.agent_ready = true;
        for w in self.waiting.drain(..) {
            w.answer(Ok(Reply::Agent(AgentReply {
                agent: AgentState::Ready,
            })));
        }
    }

    /// The agent connected to the ready port.
    fn on_agent_ready(&mut self) {
        let Some(listener) = &self.ready_listener else {
            return;
        };
        let mut announced = false;
        while let Ok((stream, _)) = listener.accept() {
            // The announcement is the connection itself; its `ready` line
            // is not needed.
            drop(stream);
            announced = true;
        }
        if announced {
            self.set_agent_ready();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(p) = &self.ready_path {
            let _ = std::fs::remove_file(p);
        }
        if let Some(mut wait) = self.forking.take() {
            wait.pending.kill_all();
        }
    }
}

impl MutEventSubscriber for Machine {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![self.wake.as_raw_fd(), self.timer.as_raw_fd()];
        fds.extend(self.ready_listener.as_ref().map(|l| l.as_raw_fd()));
        fds.extend(self.agent_ready_evt.as_ref().map(|e| e.as_raw_fd()));
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("machine: cannot watch descriptor {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            while let Ok((action, responder)) = self.inbox.try_recv() {
                self.act(action, responder, ops);
            }
        } else if fd == self.timer.as_raw_fd() {
            self.timer.acknowledge();
            self.fork_progress(None, ops);
        } else if self.ready_listener.as_ref().map(|l| l.as_raw_fd()) == Some(fd) {
            self.on_agent_ready();
        } else if self.agent_ready_evt.as_ref().map(|e| e.as_raw_fd()) == Some(fd) {
            if let Some(evt) = &self.agent_ready_evt {
                let _ = evt.read();
            }
            self.set_agent_ready();
        } else if self
            .forking
            .as_ref()
            .is_some_and(|w| w.pending.fds().contains(&fd))
        {
            self.fork_progress(Some(fd), ops);
        } else {
            self.on_child_exit(fd, ops);
        }
        self.timer.run_while(self.forking.is_some(), "machine");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::sync::Locked;
    use std::sync::Mutex;
    use vmm_os::event_manager::{EventManager, SubscriberOps};

    fn machine() -> (Machine, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let info = VmInfo {
            vcpus: 1,
            memory_mib: 128,
            vsock: None,
        };
        (
            Machine::new(None, info, exit.clone(), true, None).unwrap(),
            exit,
        )
    }

    #[test]
    fn actions_from_another_thread_are_done_on_the_machines_loop() {
        let (machine, exit) = machine();
        let handle = machine.handle();
        let machine = Arc::new(Mutex::new(machine));
        let mut em = EventManager::<Arc<Mutex<Machine>>>::new().unwrap();
        em.add_subscriber(machine.clone());
        let caller = std::thread::spawn(move || {
            let described = handle.perform(Action::Describe);
            let paused = handle.perform(Action::Pause);
            let stopped = handle.perform(Action::Stop);
            (described, paused, stopped)
        });
        while exit.reason().is_none() {
            em.run_with_timeout(1000).unwrap();
        }
        let (described, paused, stopped) = caller.join().unwrap();
        match described.unwrap() {
            Reply::Vm(vm) => assert_eq!((vm.vcpus, vm.agent), (1, AgentState::None)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(paused, Err(ActionError::NotControllable)));
        assert!(matches!(stopped, Ok(Reply::Done)));
        assert_eq!(exit.reason(), Some(ExitReason::Stopped { signal: None }));
        drop(machine.locked());
    }

    #[test]
    fn a_machine_that_is_gone_answers_stopped() {
        let (machine, _) = machine();
        let handle = machine.handle();
        // Sent, never done: the machine ends with the action in its inbox.
        let (tx, rx) = mpsc::channel();
        handle.submit(
            Action::Describe,
            Responder::new(move |r| tx.send(r).unwrap()),
        );
        drop(machine);
        assert!(matches!(rx.recv().unwrap(), Err(ActionError::Stopped)));
        assert!(matches!(
            handle.perform(Action::Describe),
            Err(ActionError::Stopped)
        ));
    }
}
