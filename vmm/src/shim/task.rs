//! The task service containerd calls: each container a VM of its own,
//! each of its processes run by that VM's guest agent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

use super::options::Settings;
use super::process::{Process, Status, Stdio};
use super::vm::{Vm, VmSpec};
use super::{spec, Error, Result};

/// One container: its VM, its root file system, its processes.
struct Container {
    bundle: PathBuf,
    rootfs: PathBuf,
    /// The shim mounted `rootfs` (containerd's snapshot) and unmounts it.
    mounted: bool,
    dir: PathBuf,
    vm: Vm,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no process {exec_id:?} in this container")))
    }

    /// Stops the VM and undoes what the shim made on the host.
    fn tear_down(&self) {
        let t = std::time::Instant::now();
        self.vm.stop();
        log::info!(
            "VM {} stopped in {} ms",
            self.vm.pid(),
            t.elapsed().as_millis()
        );
        undo(&self.rootfs, self.mounted, &self.dir, &self.bundle);
    }
}

/// Removes what a container left on the host: the root file system's
/// mount (when the shim made it), the runtime folder, the state file.
fn undo(rootfs: &Path, mounted: bool, dir: &Path, bundle: &Path) {
    if mounted && super::is_mount_point(rootfs) {
        if let Ok(path) = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) on a NUL-terminated path.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = std::io::Error::last_os_error();
                log::warn!("cannot unmount {}: {e}", rootfs.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(bundle.join(STATE_FILE));
}

/// In the bundle: where the shim keeps what `delete` needs after a crash.
const STATE_FILE: &str = "vmm-shim.json";

/// Cleans up after a shim that ended without deleting its container.
pub fn clean_up(namespace: &str, id: &str, bundle: &Path) {
    let state: serde_json::Value = std::fs::read(bundle.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mounted = state["mounted"].as_bool().unwrap_or(false);
    let rootfs = state["rootfs"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| bundle.join("rootfs"));
    let dir = match super::vm::runtime_dir(namespace, id) {
        Ok(d) => d,
        Err(_) => return,
    };
    // The VMM died with its shim (it is started with PR_SET_PDEATHSIG).
    undo(&rootfs, mounted, &dir, bundle);
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
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

    fn create(&self, req: &api::CreateTaskRequest) -> Result<Container> {
        if !req.checkpoint.is_empty() {
            return Err(Error::Unsupported("restoring a checkpoint".into()));
        }
        let mut settings = Settings::from_options(req.options.as_ref())?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = spec::load(&bundle)?;
        let mounts = spec::mounts(&spec)?;
        let process = spec
            .process()
            .as_ref()
            .expect("spec::load checks the process");
        let command = spec::command(process);
        let (vcpus, memory_mib) = match spec::size(&spec) {
            (None, None) => (settings.vcpus, settings.memory_mib),
            // Limits other than the template's size: a VM of that size,
            // booted.
            (v, m) => {
                let size = (
                    v.unwrap_or(settings.vcpus),
                    m.unwrap_or(settings.memory_mib),
                );
                settings.cold |= size != (settings.vcpus, settings.memory_mib);
                size
            }
        };
        let rootfs = spec::rootfs(&bundle, &spec);
        let mounted = mount_rootfs(&req.rootfs, &rootfs)?;
        let dir = super::vm::runtime_dir(&self.namespace, &req.id)?;
        let undo_here = |e: Error| {
            undo(&rootfs, mounted, &dir, &bundle);
            e
        };
        if !rootfs.is_dir() {
            return Err(undo_here(Error::Rootfs(format!(
                "{} is not a folder",
                rootfs.display()
            ))));
        }
        let _ = std::fs::remove_dir_all(&dir);
        make_private_dir(&dir).map_err(undo_here)?;
        let state = serde_json::json!({ "rootfs": rootfs, "mounted": mounted });
        let _ = std::fs::write(bundle.join(STATE_FILE), state.to_string());
        let started = std::time::Instant::now();
        let vm = Vm::start(&VmSpec {
            rootfs: &rootfs,
            vcpus,
            memory_mib,
            settings: &settings,
            dir: &dir,
        })
        .map_err(undo_here)?;
        let booted = started.elapsed();
        if let Err(e) = vm.agent().mount(spec::GUEST_ROOT, mounts) {
            vm.stop();
            return Err(undo_here(e.into()));
        }
        log::info!(
            "{}: VM {} up in {} ms, its mounts in {} ms",
            req.id,
            vm.pid(),
            booted.as_millis(),
            (started.elapsed() - booted).as_millis()
        );
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new(command, stdio)
            .inspect_err(|_| vm.stop())
            .map_err(undo_here)?;
        Ok(Container {
            bundle,
            rootfs,
            mounted,
            dir,
            vm,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        })
    }
}

/// Mounts containerd's snapshot on the bundle's rootfs folder; `false`
/// when containerd sent none (the bundle holds the files itself).
fn mount_rootfs(
    mounts: &[containerd_shim::protos::types::mount::Mount],
    target: &Path,
) -> Result<bool> {
    let m = match mounts {
        [] => return Ok(false),
        [m] => m,
        _ => {
            return Err(Error::Unsupported(
                "a root file system of more than one mount".into(),
            ))
        }
    };
    let fail = |why: String| {
        Error::Rootfs(format!(
            "{} {} on {}: {why}",
            m.type_,
            m.source,
            target.display()
        ))
    };
    let options = vmm_agent::mount::Options::parse(&m.options);
    // mount(2) takes one page of data: an image of very many layers
    // would need containerd's lowerdir shortening, not done here.
    if options.data.len() >= 4096 {
        return Err(fail(
            "its options are longer than a page (too many layers)".into(),
        ));
    }
    let cstr = |s: &str| std::ffi::CString::new(s).map_err(|_| fail("a NUL in it".into()));
    let (source, kind, data) = (cstr(&m.source)?, cstr(&m.type_)?, cstr(&options.data)?);
    let target_c = cstr(&target.to_string_lossy())?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            kind.as_ptr(),
            options.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    Ok(true)
}

fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Io(format!("cannot make {}: {e}", dir.display())))
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
        let pid = c.vm.pid();
        let (container_id, process_id) = (
            id.to_string(),
            if exec_id.is_empty() { id } else { exec_id }.to_string(),
        );
        process.start(c.vm.agent(), move |code, at| {
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
            c.tear_down();
            self.containers().remove(id);
            self.inner.publish(TaskDelete {
                container_id: id.to_string(),
                pid: c.vm.pid(),
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
        response.pid = c.vm.pid();
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
        let container = Arc::new(self.inner.create(&req)?);
        let pid = container.vm.pid();
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
        let pid = self.start_process(&req.id, &req.exec_id)?;
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
            pid: c.vm.pid(),
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
        process.signal(c.vm.agent(), req.signal)?;
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
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let p = Process::new(spec::command(&process), stdio)?;
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
        c.vm.pause()?;
        c.paused.store(true, Ordering::SeqCst);
        self.inner.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let c = self.inner.container(&req.id)?;
        c.vm.resume()?;
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

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .container(&req.id)
            .map(|c| c.vm.pid())
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
