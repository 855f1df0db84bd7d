//! The task service containerd calls: each pod a VM, each container's
//! processes run by that VM's guest agent.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};

use super::container::{Container, Pods};
use super::process::{Process, Status, Stdio};
use super::{spec, Error, Result};

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pods: Pods,
}

impl Inner {
    fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) =
            self.publisher
                .publish(Context::default(), &topic, &self.namespace, Box::new(event))
        {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no container {id:?} in this shim")))
    }
}

fn timestamp(at: SystemTime) -> MessageField<Timestamp> {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    MessageField::some(t)
}

/// The task service of one shim process.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                publisher,
                exit,
                containers: Mutex::new(HashMap::new()),
                pods: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn start_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        let c = self.inner.container(id)?;
        let process = c.process(exec_id)?;
        let inner = self.inner.clone();
        let pid = c.pod.vm.pid();
        let (container_id, process_id) = (
            id.to_string(),
            if exec_id.is_empty() { id } else { exec_id }.to_string(),
        );
        process.start(c.pod.vm.agent(), move |code, at| {
            log::info!("{container_id}: exited");
            inner.publish(TaskExit {
                container_id,
                id: process_id,
                pid,
                exit_status: code,
                exited_at: timestamp(at),
                ..Default::default()
            });
        })?;
        Ok(pid)
    }

    fn delete_process(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let c = self.inner.container(id)?;
        let process = c.process(exec_id)?;
        let (code, at) = match process.status() {
            Status::Running => {
                return Err(Error::State("the process is running: kill it first".into()))
            }
            Status::Created => {
                let code = 128 + libc::SIGKILL as u32;
                (code, process.stopped(code))
            }
            Status::Stopped { code, at } => (code, at),
        };
        if exec_id.is_empty() {
            c.tear_down(&self.inner.pods);
            self.containers().remove(id);
            self.inner.publish(TaskDelete {
                container_id: id.to_string(),
                pid: c.pod.vm.pid(),
                exit_status: code,
                exited_at: timestamp(at),
                ..Default::default()
            });
        } else {
            c.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(exec_id);
        }
        let mut response = api::DeleteResponse::new();
        response.pid = c.pod.vm.pid();
        response.exit_status = code;
        response.exited_at = timestamp(at);
        Ok(response)
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.containers().contains_key(&req.id) {
            return Err(Error::Exists(format!("container {:?} exists already", req.id)).into());
        }
        let container = Arc::new(Container::create(
            &req,
            &self.inner.namespace,
            &self.inner.pods,
        )?);
        let pid = container.pod.vm.pid();
        self.containers().insert(req.id.clone(), container);
        self.inner.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let t = std::time::Instant::now();
        let pid = self.start_process(&req.id, &req.exec_id)?;
        log::info!("{}: started in {} ms", req.id, t.elapsed().as_millis());
        match req.exec_id.is_empty() {
            true => self.inner.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
            false => self.inner.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }),
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.delete_process(&req.id, &req.exec_id)?)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.inner.container(&req.id)?;
        let process = c.process(&req.exec_id)?;
        let mut r = api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: c.pod.vm.pid(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        let status = match process.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running if c.paused.load(Ordering::SeqCst) => TaskStatus::PAUSED,
            Status::Running => TaskStatus::RUNNING,
            Status::Stopped { code, at } => {
                r.exit_status = code;
                r.exited_at = timestamp(at);
                TaskStatus::STOPPED
            }
        };
        r.status = status.into();
        Ok(r)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = self.inner.container(&req.id)?.process(&req.exec_id)?;
        let (code, at) = process.wait();
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id)?;
        let process = c.process(&req.exec_id)?;
        process.signal(c.pod.vm.agent(), req.signal)?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id)?;
        let json = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process = spec::exec_process(json)?;
        // It joins the first process's namespaces, by its guest pid.
        if c.init.status() != Status::Running {
            return Err(Error::State(format!(
                "container {:?} is not running: an exec needs its first process running",
                req.id
            ))
            .into());
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let p = Process::new(c.exec_command(&process), stdio)?;
        {
            let mut execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(Error::Exists(format!("exec {:?} exists already", req.exec_id)).into());
            }
            execs.insert(req.exec_id.clone(), p);
        }
        self.inner.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let process = self.inner.container(&req.id)?.process(&req.exec_id)?;
        process.resize(req.width, req.height)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let process = self.inner.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            process.close_stdin()?;
        }
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.inner.container(&req.id)?;
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        let processes = std::iter::once(&c.init)
            .chain(execs.values())
            .map(|p| p.guest_pid())
            .filter(|pid| *pid > 0)
            .map(|pid| ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id)?;
        c.pod.vm.pause()?;
        c.paused.store(true, Ordering::SeqCst);
        self.inner.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id)?;
        c.pod.vm.resume()?;
        c.paused.store(false, Ordering::SeqCst);
        self.inner.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("checkpoints (use `vmm snapshot` on the VM)".into()).into())
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(Error::Unsupported("changing a running container's resources".into()).into())
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.inner.container(&req.id)?;
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        let running = std::iter::once(&c.init)
            .chain(execs.values())
            .filter(|p| p.status() == Status::Running)
            .count() as u64;
        drop(execs);
        let memory_mib = c.pod.vm.memory_mib;
        let metrics = match c.cgroup_stats() {
            Ok(figures) => super::stats::of_container(&figures, memory_mib),
            Err(e) => {
                log::warn!("{}: the VM's figures: {e}", c.id);
                super::stats::of_vm(c.pod.vm.pid(), memory_mib, running)
            }
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| Error::Io(format!("cannot encode the metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .container(&req.id)
            .map(|c| c.pod.vm.pid())
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.containers().is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
