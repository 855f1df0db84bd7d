//! The sandboxes one `vmm serve` owns: each a VM in its own VMM process
//! (`vmm launch --template T --api-socket ...`), started from a template,
//! driven through its control socket (pause, resume, stop) and its
//! agent's vsock socket (commands, files). The registry is the only
//! state the server keeps; a sandbox ends when it is killed, when its
//! timeout passes, or when the server stops.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::action::Control;
use crate::api::ApiClient;

use super::guest;
use super::pool::{Pool, Spare, Version};
use super::process::Processes;

/// How long a sandbox may take from its process start to its agent
/// answering (a restore from a template takes about a second here; a
/// loaded host more).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a spare's warm-up may take. It runs in the background, and on
/// a loaded host (many sandboxes starting) it can take minutes; cutting it
/// short throws the work away and starts it again.
const WARM_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a killed sandbox's VMM gets to end after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The most sandboxes one server runs at once.
pub const MAX_SANDBOXES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("template {0:?} not found: make it with `vmm template create {0}` (`vmm template ls` lists them)")]
    NoTemplate(String),
    #[error("template {name:?} cannot be used: {reason}")]
    BadTemplate { name: String, reason: String },
    #[error("this server runs {MAX_SANDBOXES} sandboxes already: kill one first")]
    Full,
    #[error("cannot start the sandbox's VMM: {0}")]
    Spawn(std::io::Error),
    #[error("the sandbox's VMM failed to start: {0}")]
    Start(String),
    #[error("the sandbox's VMM did not start within {0:?}")]
    StartTimeout(Duration),
    #[error("the sandbox's control socket failed: {0}")]
    Api(String),
    #[error("the spare's warm-up failed: {0}")]
    Warm(String),
    #[error("the template {0:?} has no network, so there is no egress to allow or deny: build it with \"network\": {{\"mode\": \"user\"}} in its config (docs/agents.md)")]
    NoNetwork(String),
    #[error("bad egress rules: {0} (docs/network.md lists the rule forms)")]
    BadEgress(String),
    #[error("cannot make the private folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a create request asks for.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub template: String,
    pub timeout: Duration,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    /// An egress policy to set; `None`: the template's.
    pub egress: Option<crate::config::EgressConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// Paused, in memory.
    Paused,
    /// Paused past the server's limit: snapshotted to disk, its VMM gone
    /// (`suspend.rs`).
    OnDisk,
}

impl State {
    pub fn is_paused(self) -> bool {
        self != State::Running
    }
}

/// Its size and devices, as the template made them.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    /// It has a user-mode network, whose egress policy can be set.
    pub network: bool,
}

impl Sizes {
    fn of(t: &crate::template::Template) -> Sizes {
        let config = &t.record.config;
        Sizes {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib as u32,
            disk_mib: t.size_on_disk() >> 20,
            network: matches!(
                config.network,
                Some(crate::config::NetworkConfig::User { .. })
            ),
        }
    }
}

/// A running VM: its control and agent sockets, its folder and, for one
/// this server started, its VMM process.
pub struct Machine {
    pub api_socket: PathBuf,
    pub vsock: PathBuf,
    /// The folder of the VM's sockets (and, for one this server started,
    /// its VMM's log): a fork's children put theirs in their parent's,
    /// which goes when the last of them does.
    pub dir: PathBuf,
    /// A folder on disk its VMM may write even when jailed (its exit
    /// report's; a fork child's is its parent's): its snapshots go here.
    pub state: PathBuf,
    /// The VMM process, for a VM this server started; a fork child is its
    /// parent VMM's child, stopped through its control socket.
    child: tokio::sync::Mutex<Option<Child>>,
    /// This server started its VMM process (it is no fork child).
    pub own_process: bool,
}

impl Machine {
    pub fn new(
        api_socket: PathBuf,
        vsock: PathBuf,
        dir: PathBuf,
        state: PathBuf,
        child: Option<Child>,
    ) -> Self {
        Machine {
            api_socket,
            vsock,
            dir,
            state,
            own_process: child.is_some(),
            child: tokio::sync::Mutex::new(child),
        }
    }

    /// The VMM process that now runs this VM (restored from disk).
    pub async fn set_process(&self, child: Child) {
        *self.child.lock().await = Some(child);
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&self.api_socket)
    }

    /// Ends the VMM: SIGTERM (the VM stops), SIGKILL if it lingers; a
    /// fork child through its control socket. Then removes its sockets,
    /// and its folder once nothing else is in it.
    pub async fn stop(&self) {
        let mut guard = self.child.lock().await;
        match guard.take() {
            Some(mut child) => {
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                let _ = std::fs::remove_file(self.dir.join("vmm.log"));
            }
            None => {
                // A VM that is gone already is as good as stopped.
                let api = self.api();
                let _ = tokio::task::spawn_blocking(move || Control::stop(&api)).await;
            }
        }
        let ready = crate::agent::ready_socket_path(&self.vsock);
        for socket in [&self.api_socket, &self.vsock, &ready] {
            let _ = std::fs::remove_file(socket);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Runs `command` (`sh -c`) in the VM and checks it succeeds: a VM's
    /// first commands after a restore are slow until they have touched
    /// what they use.
    async fn warm(&self, command: &str) -> Result<()> {
        let req = vmm_agent::Request::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), command.into()],
            env: Default::default(),
            cwd: None,
            stdin: false,
            timeout_ms: None,
            user: None,
            pty: None,
            root: None,
            mounts: Vec::new(),
            isolation: None,
        };
        let answer = async {
            let (mut answers, _w) = guest::open(&self.vsock, &req).await?;
            answers.finish_within(WARM_TIMEOUT, |_| {}).await
        }
        .await;
        match answer.map_err(|e| Error::Warm(e.to_string()))? {
            r if r.exit_code == Some(0) => Ok(()),
            r => Err(Error::Warm(format!("`{command}` ended with {r:?}"))),
        }
    }
}

/// One sandbox.
pub struct Sandbox {
    pub id: String,
    pub template: String,
    /// Sent by the SDK as `X-Access-Token` on every in-sandbox request.
    pub access_token: String,
    pub started_at: SystemTime,
    pub end_at: Mutex<SystemTime>,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub sizes: Sizes,
    pub state: Mutex<State>,
    /// When it was paused, while it is.
    pub paused_at: Mutex<Option<std::time::Instant>>,
    /// Held across a change of state (pause, resume, a move to disk), so
    /// that two never interleave.
    pub transition: tokio::sync::Mutex<()>,
    pub vm: Machine,
    pub processes: Processes,
    pub watchers: super::filesystem::Watchers,
    /// The previous metrics sample's CPU times.
    pub last_cpu: super::metrics::LastCpu,
    /// What happened to it and in it (`GET /sandboxes/{id}/logs`).
    pub log: super::logs::Log,
}

impl Sandbox {
    /// A sandbox of `vm`, as `spec` asks (its template chosen, its
    /// egress policy set).
    fn new(id: String, vm: Machine, spec: Spec, sizes: Sizes) -> Arc<Sandbox> {
        let log = super::logs::Log::default();
        log.add(
            super::logs::Level::Info,
            "Sandbox started",
            &[("template", spec.template.clone())],
        );
        Arc::new(Sandbox {
            id,
            template: spec.template,
            paused_at: Mutex::new(None),
            transition: tokio::sync::Mutex::new(()),
            access_token: crate::runtime::random_hex(20),
            started_at: SystemTime::now(),
            end_at: Mutex::new(SystemTime::now() + spec.timeout),
            metadata: spec.metadata,
            env_vars: spec.env_vars,
            sizes,
            state: Mutex::new(State::Running),
            vm,
            processes: Processes::default(),
            watchers: Default::default(),
            last_cpu: Default::default(),
            log,
        })
    }

    pub fn api(&self) -> ApiClient {
        self.vm.api()
    }

    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new state (the caller holds `transition`).
    pub fn set_state(&self, state: State) {
        let was = std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            state,
        );
        let what = match state {
            State::Running => "Sandbox resumed",
            State::Paused => "Sandbox paused",
            State::OnDisk => "Sandbox moved to disk (its VMM process ended)",
        };
        if was != state {
            self.log.add(super::logs::Level::Info, what, &[]);
        }
        *self.paused_at.lock().unwrap_or_else(|e| e.into_inner()) =
            (state == State::Paused).then(std::time::Instant::now);
    }

    pub fn end_at(&self) -> SystemTime {
        *self.end_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_timeout(&self, timeout: Duration) {
        *self.end_at.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now() + timeout;
    }

    /// Runs one control action on a blocking thread.
    pub async fn control<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ApiClient) -> std::result::Result<T, crate::api::Error> + Send + 'static,
    ) -> Result<T> {
        let api = self.api();
        tokio::task::spawn_blocking(move || f(&api))
            .await
            .map_err(|e| Error::Api(e.to_string()))?
            .map_err(|e| Error::Api(e.to_string()))
    }
}

/// How a server runs its sandboxes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Each sandbox's VMM in a jail (docs/security.md).
    pub jail: bool,
    /// Spares kept ready per template ([`Pool`]).
    pub warm: usize,
    /// How long a paused sandbox stays in memory before it moves to disk
    /// (`None`: for ever).
    pub keep_paused: Option<Duration>,
}

/// How a sandbox's VMM starts.
pub(super) enum Boot<'a> {
    Template(&'a str),
    /// Restored from a snapshot this server took (its host-side settings
    /// trusted).
    Snapshot {
        dir: &'a Path,
    },
}

/// Every sandbox of the server, and its spares.
pub struct Registry {
    /// Where sandboxes' folders go (sockets: the runtime folder).
    root: PathBuf,
    /// Where their folders on disk go (snapshots).
    state_root: PathBuf,
    /// The `vmm` binary the sandboxes run.
    exe: PathBuf,
    pub(super) settings: Settings,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    pub pool: Pool,
}

impl Registry {
    pub fn new(root: PathBuf, state_root: PathBuf, exe: PathBuf, settings: Settings) -> Registry {
        Registry {
            root,
            state_root,
            exe,
            pool: Pool::new(settings.warm),
            settings,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.map().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        let mut all: Vec<_> = self.map().values().cloned().collect();
        all.sort_by_key(|s| s.started_at);
        all
    }

    /// VMs this server runs or is starting: sandboxes and spares.
    fn vms(&self) -> usize {
        self.map().len() + self.pool.count()
    }

    /// Starts a sandbox from `spec.template` (a ready spare of it when
    /// there is one); returns once its agent answers. Then tops up the
    /// template's spares.
    pub async fn create(self: &Arc<Self>, spec: Spec) -> Result<Arc<Sandbox>> {
        if self.map().len() >= MAX_SANDBOXES {
            return Err(Error::Full);
        }
        let t = open_template(&spec.template).await?;
        let sizes = Sizes::of(&t);
        if let Some(egress) = &spec.egress {
            if !sizes.network {
                return Err(Error::NoNetwork(spec.template));
            }
            // Before a VM is taken for it.
            egress
                .policy()
                .map_err(|e| Error::BadEgress(e.to_string()))?;
        }
        let room = MAX_SANDBOXES.saturating_sub(self.vms());
        let taken = self.pool.take(&spec.template, Version::of(&t), room);
        for old in taken.stale {
            tokio::spawn(async move { old.vm.stop().await });
        }
        let (id, vm) = match taken.spare {
            Some(spare) => {
                self.start_spares(&spec.template, taken.start);
                (spare.id, spare.vm)
            }
            None => {
                if self.vms() >= MAX_SANDBOXES {
                    return Err(Error::Full);
                }
                let id = new_id();
                let vm = self.start(&spec.template, &id).await?;
                // After this start, not beside it.
                self.refill(&spec.template);
                (id, vm)
            }
        };
        if let Some(egress) = spec.egress.clone() {
            let api = vm.api();
            let set = tokio::task::spawn_blocking(move || api.set_egress(egress)).await;
            if let Err(e) = set
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                vm.stop().await;
                return Err(Error::Api(e));
            }
        }
        let sandbox = Sandbox::new(id.clone(), vm, spec, sizes);
        self.map().insert(id, sandbox.clone());
        Ok(sandbox)
    }

    /// Starts spares of `template` in the background until it has its
    /// count (none when the pool is off, closed or the server is full).
    pub fn refill(self: &Arc<Self>, template: &str) {
        let room = MAX_SANDBOXES.saturating_sub(self.vms());
        self.start_spares(template, self.pool.reserve(template, room));
    }

    /// Starts `count` spares the pool has counted as starting.
    fn start_spares(self: &Arc<Self>, template: &str, count: usize) {
        for _ in 0..count {
            let registry = self.clone();
            let template = template.to_string();
            tokio::spawn(async move {
                match registry.start_spare(&template).await {
                    Ok(spare) => {
                        if let Some(late) = registry.pool.put(&template, spare) {
                            late.vm.stop().await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("a spare of the template {template} did not start: {e}");
                        registry.pool.failed(&template);
                    }
                }
            });
        }
    }

    /// One spare: started, and warmed. Its template's warm-up is not run
    /// again (it may change things: an install, a file), except the one
    /// `vmm serve` gives `base`, which only reads; any other spare runs
    /// `true`.
    async fn start_spare(&self, template: &str) -> Result<Spare> {
        let t = open_template(template).await?;
        let id = new_id();
        let vm = self.start(template, &id).await?;
        let command = match t.record.warmup.as_slice() {
            [only] if only == super::WARMUP => super::WARMUP,
            _ => "true",
        };
        if let Err(e) = vm.warm(command).await {
            vm.stop().await;
            return Err(e);
        }
        Ok(Spare {
            id,
            vm,
            version: Version::of(&t),
        })
    }

    /// Starts a VM from `template` in folders named `id`; returns once its
    /// agent answers.
    async fn start(&self, template: &str, id: &str) -> Result<Machine> {
        let (dir, state) = (self.root.join(id), self.state_root.join(id));
        make_folder(&dir)?;
        make_folder(&state)?;
        let api_socket = dir.join("api.sock");
        let boot = Boot::Template(template);
        match self.spawn(boot, &api_socket, &dir, &state).await {
            Ok((child, vsock)) => Ok(Machine::new(api_socket, vsock, dir, state, Some(child))),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_dir_all(&state);
                Err(e)
            }
        }
    }

    /// Starts the VMM process and waits for its agent; returns the process
    /// and the agent's vsock socket.
    pub(super) async fn spawn(
        &self,
        boot: Boot<'_>,
        api_socket: &Path,
        dir: &Path,
        state: &Path,
    ) -> Result<(Child, PathBuf)> {
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(Error::Spawn)?;
        let mut cmd = Command::new(&self.exe);
        match boot {
            Boot::Template(name) => cmd.args(["launch", "--template", name]),
            Boot::Snapshot { dir } => cmd
                .args(["restore", "--snapshot"])
                .arg(dir)
                .arg("--trust-snapshot-config"),
        };
        // The report's folder is one the jailed VMM may write: its
        // snapshots go there.
        cmd.arg("--api-socket")
            .arg(api_socket)
            .arg("--report")
            .arg(state.join("report.json"))
            .env("VMM_LAUNCH_NOTIFY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if self.settings.jail {
            cmd.arg("--jail");
        }
        let mut child = super::leftovers::spawn(cmd).await.map_err(Error::Spawn)?;
        let stdout = child.stdout.take();
        let api = ApiClient::new(api_socket);
        let ready = async {
            // The VMM prints `ready` once the VM runs and its socket serves.
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = BufReader::new(out).read_line(&mut line).await;
            }
            if line.trim() != "ready" {
                let why = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
                let why = why
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("it exited");
                return Err(Error::Start(why.to_string()));
            }
            agent_ready(api).await
        };
        match tokio::time::timeout(START_TIMEOUT, ready).await {
            Ok(Ok(vsock)) => Ok((child, vsock)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::StartTimeout(START_TIMEOUT)),
        }
    }

    /// Forks `parent` into `count` new sandboxes that continue from this
    /// instant (its memory shared copy-on-write); each answers once its
    /// agent does. A child whose agent does not come up is an error in
    /// its place.
    pub async fn fork(
        &self,
        parent: &Arc<Sandbox>,
        count: u32,
        timeout: Duration,
    ) -> Result<Vec<Result<Arc<Sandbox>>>> {
        if self.vms() + count as usize > MAX_SANDBOXES {
            return Err(Error::Full);
        }
        let ids: Vec<String> = (0..count).map(|_| new_id()).collect();
        let req = crate::action::ForkRequest {
            count,
            dir: Some(parent.vm.dir.clone()),
            names: Some(ids),
        };
        let info = parent
            .control(
                move |api| match api.perform(crate::action::Action::Fork(req))? {
                    crate::action::Reply::Fork(info) => Ok(info),
                    other => Err(<ApiClient as Control>::unexpected(other)),
                },
            )
            .await?;
        let mut out = Vec::new();
        for child in info.children {
            let vsock = match agent_ready(ApiClient::new(&child.api_socket)).await {
                Ok(v) => v,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let (dir, state) = (parent.vm.dir.clone(), parent.vm.state.clone());
            let vm = Machine::new(child.api_socket, vsock, dir, state, None);
            let spec = Spec {
                template: parent.template.clone(),
                timeout,
                metadata: parent.metadata.clone(),
                env_vars: parent.env_vars.clone(),
                // They keep the parent's policy.
                egress: None,
            };
            let sandbox = Sandbox::new(child.id.clone(), vm, spec, parent.sizes);
            self.map().insert(child.id, sandbox.clone());
            out.push(Ok(sandbox));
        }
        Ok(out)
    }

    /// Kills one sandbox; false when there is none of that id.
    pub async fn kill(&self, id: &str) -> bool {
        let Some(sandbox) = self.map().remove(id) else {
            return false;
        };
        sandbox.processes.close_all();
        sandbox.watchers.close_all();
        sandbox.vm.stop().await;
        super::suspend::remove_snapshot(&sandbox);
        if sandbox.vm.own_process {
            let _ = std::fs::remove_file(sandbox.vm.state.join("report.json"));
        }
        // Once nothing else (a fork child's snapshot) is in it.
        let _ = std::fs::remove_dir(&sandbox.vm.state);
        true
    }

    /// Kills every running sandbox whose timeout has passed.
    pub async fn reap_expired(&self) {
        let now = SystemTime::now();
        let expired: Vec<String> = self
            .map()
            .values()
            // A paused sandbox waits for its connect, which sets a new
            // timeout (E2B keeps paused sandboxes too).
            .filter(|s| s.end_at() <= now && !s.state().is_paused())
            .map(|s| s.id.clone())
            .collect();
        for id in expired {
            tracing::info!("sandbox {id}: its timeout passed; killing it");
            self.kill(&id).await;
        }
    }

    /// Stops the spares of `template` (it was removed or replaced).
    pub async fn drop_spares(&self, template: &str) {
        for spare in self.pool.forget(template) {
            spare.vm.stop().await;
        }
    }

    /// Kills every sandbox and spare (the server stops).
    pub async fn kill_all(&self) {
        for spare in self.pool.close() {
            spare.vm.stop().await;
        }
        let ids: Vec<String> = self.map().keys().cloned().collect();
        for id in ids {
            self.kill(&id).await;
        }
        let _ = std::fs::remove_dir_all(&self.state_root);
    }
}

/// Makes a private folder (and its parents) if missing.
pub(super) fn make_folder(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::Folder {
            path: path.to_path_buf(),
            source,
        })
}

/// Opens a template by name, off the event loop.
pub(super) async fn open_template(name: &str) -> Result<crate::template::Template> {
    let owned = name.to_string();
    let found = tokio::task::spawn_blocking(move || crate::template::Template::open(&owned))
        .await
        .map_err(|e| Error::Start(e.to_string()))?;
    match found {
        Ok(t) => Ok(t),
        Err(crate::template::Error::NoSuchTemplate(_)) => Err(Error::NoTemplate(name.to_string())),
        Err(e) => Err(Error::BadTemplate {
            name: name.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Waits for the agent of the VM behind `api` (at most [`START_TIMEOUT`]);
/// its vsock socket.
async fn agent_ready(api: ApiClient) -> Result<PathBuf> {
    let ready =
        tokio::task::spawn_blocking(move || api.wait_agent().and_then(|()| api.vsock_path()));
    match tokio::time::timeout(START_TIMEOUT, ready).await {
        Ok(Ok(Ok(vsock))) => Ok(vsock),
        Ok(Ok(Err(e))) => Err(Error::Api(e.to_string())),
        Ok(Err(e)) => Err(Error::Api(e.to_string())),
        Err(_) => Err(Error::StartTimeout(START_TIMEOUT)),
    }
}

/// A sandbox id: 20 lowercase letters and digits, as E2B's look.
fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 20];
    let _ = vmm_os::fill_random(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_e2b_ones_and_differ() {
        let a = new_id();
        assert_eq!(a.len(), 20);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_ne!(a, new_id());
    }
}
