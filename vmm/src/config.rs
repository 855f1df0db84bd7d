//! The VM configuration file (`vmm launch --config vm.json`).
//!
//! Reference: docs/config.md. Unknown fields are errors, so a typo never
//! silently falls back to a default.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use devices::rate_limit::RateLimitConfig;
use devices::virtio::net::user::policy::{EgressPolicy, Rule};
use serde::{Deserialize, Serialize};

/// Guest context id of the vsock device the VMM adds when a config has
/// none.
pub const DEFAULT_CID: u64 = 3;

/// Errors reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source} (docs/config.md lists every field)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("\"vcpus\" is 0: a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("\"seccomp\" is true, but seccomp filters exist on Linux only: set \"seccomp\": false on this host (its default here; docs/macos.md)")]
    SeccompNotOnThisHost,
    #[error("\"memory_mib\" is 0: give the guest memory, for example \"memory_mib\": 128")]
    NoMemory,
    #[error("\"memory_mib\" is {0}: the most this VMM supports is {MAX_MEMORY_MIB} MiB")]
    TooMuchMemory(u64),
    #[error("\"vsock\": \"cid\" is {0}; context ids 0, 1, 2 and 4294967295 are reserved, use 3 to 4294967294")]
    ReservedCid(u64),
    #[error("\"rootfs\" gives both \"base\" and \"image\": give one (an image is a base)")]
    BaseAndImage,
    #[error("\"network\": {0}")]
    BadNetwork(String),
    #[error("rate limit of {0}")]
    BadRateLimit(#[from] devices::rate_limit::Error),
    #[error("share tag {0:?} is not valid: use 1 to 36 letters, digits, '.', '_' or '-'")]
    BadShareTag(String),
    #[error("share tag {0:?} is used twice: give each share its own tag")]
    DuplicateShareTag(String),
    #[error("share {tag:?}: \"guest_path\" {path:?} must be an absolute path other than /, without spaces, ',' or ':'")]
    BadGuestPath { tag: String, path: PathBuf },
    #[error("\"jail\": {0}")]
    BadJail(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Which guest kernel flavour to boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// `pvm` on hosts with the kvm_pvm module, `standard` elsewhere.
    #[default]
    Auto,
    /// Minimal microVM kernel for real KVM (VT-x/AMD-V).
    Standard,
    /// Kernel built to run under KVM's instruction emulator on PVM hosts.
    Pvm,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output (and console input from its standard input).
    #[default]
    Stdout,
    /// Discarded.
    Off,
    /// Appended to this file.
    File(PathBuf),
}

impl Serialize for SerialOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            SerialOutput::Stdout => s.serialize_str("stdout"),
            SerialOutput::Off => s.serialize_str("off"),
            SerialOutput::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stdout" => SerialOutput::Stdout,
            "off" => SerialOutput::Off,
            "" => {
                return Err(serde::de::Error::custom(
                    "\"serial\" is empty: use \"stdout\", \"off\" or a file path",
                ))
            }
            _ => SerialOutput::File(PathBuf::from(s)),
        })
    }
}

/// The root disk: a shared read-only base image and this VM's writable layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsConfig {
    /// The base image (ext4). Default: the Debian image the setup command
    /// builds. Never written.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// An imported image (`vmm image import`) as the base, by name or
    /// digest, instead of `base`. Its configuration's `Env`, `WorkingDir`
    /// and `User` become every exec's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// This VM's layer file, created when missing; keep it to keep the VM's
    /// writes across restarts. Default: a throwaway layer deleted at exit.
    #[serde(default)]
    pub layer: Option<PathBuf>,
    /// Present the disk read-only to the guest.
    #[serde(default)]
    pub read_only: bool,
    /// Limits on the guest's disk bandwidth and requests; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

/// Limits on the guest's network traffic, each way (frames count as
/// operations, also spelt `packets`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRateLimit {
    /// Frames to the guest.
    #[serde(default)]
    pub rx: RateLimitConfig,
    /// Frames from the guest.
    #[serde(default)]
    pub tx: RateLimitConfig,
}

/// The host<->guest channel (virtio-vsock, host side on Unix sockets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 to 2^32 - 2; 0-2 and 2^32 - 1 are
    /// reserved).
    pub cid: u64,
    /// Host clients connect here (`CONNECT <port>\n`); guest connections to
    /// host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Gives a copy of a VM (a restore, a fork child) a context id of its
    /// own: a random one. Its guest reads it again on the transport reset
    /// every restore sends.
    pub fn renew_cid(&mut self) {
        let mut bytes = [0u8; 4];
        let drawn = match vmm_os::fill_random(&mut bytes) {
            Ok(()) => u32::from_le_bytes(bytes),
            // getrandom does not fail once the host has booted; should it,
            // the process id still differs from the saved VM's CID (3)
            // most of the time, and any CID in range works.
            Err(_) => std::process::id(),
        };
        // 3 to u32::MAX - 1.
        self.cid = u64::from(drawn % (u32::MAX - 3)) + 3;
    }
}

/// How the guest's network interface (virtio-net) is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum NetworkConfig {
    /// The user-mode network: NAT inside the VMM, DHCP, a DNS forwarder,
    /// an egress policy; no privileges needed (docs/network.md).
    User {
        /// Which destinations the guest may reach; default: the internet,
        /// not the host, link-local (cloud metadata) or private networks.
        #[serde(default)]
        egress: EgressConfig,
        /// Host ports carried to guest ports.
        #[serde(default)]
        port_forwards: Vec<PortForwardConfig>,
        /// Upstream DNS servers ("ip" or "ip:port"); default: the host's
        /// /etc/resolv.conf.
        #[serde(default)]
        dns: Option<Vec<String>>,
        /// The guest's MAC address; default a locally administered one.
        #[serde(default)]
        mac: Option<String>,
        /// Limits on the guest's traffic; default none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_limit: Option<NetRateLimit>,
    },
    /// A host TAP interface (needs CAP_NET_ADMIN or a TAP device made for
    /// the VMM's user); the guest gets a static address.
    Tap {
        /// The TAP interface's name (created when missing and allowed).
        tap: String,
        /// The guest's address with its prefix, e.g. "10.0.3.2/24".
        address: String,
        /// The guest's default gateway, if any.
        #[serde(default)]
        gateway: Option<String>,
        /// The guest's MAC address; default a locally administered one.
        #[serde(default)]
        mac: Option<String>,
        /// Limits on the guest's traffic; default none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_limit: Option<NetRateLimit>,
    },
}

/// Allowed and denied destinations of the user-mode network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// What a destination no rule names gets.
    #[serde(default)]
    pub default: EgressDefault,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            default: EgressDefault::Allow,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}

impl EgressConfig {
    /// The policy the network enforces; an error names the bad rule.
    pub fn policy(&self) -> Result<EgressPolicy> {
        let rules = |list: &[String]| -> Result<Vec<Rule>> {
            list.iter()
                .map(|r| Rule::parse(r).map_err(|e| Error::BadNetwork(format!("egress {e}"))))
                .collect()
        };
        Ok(EgressPolicy {
            default_allow: self.default == EgressDefault::Allow,
            allow: rules(&self.allow)?,
            deny: rules(&self.deny)?,
        })
    }
}

/// A host port whose connections reach a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForwardConfig {
    pub host: u16,
    pub guest: u16,
    /// The host address to listen on; default 127.0.0.1.
    #[serde(default)]
    pub bind: Option<String>,
}

impl PortForwardConfig {
    pub fn bind_addr(&self) -> Result<SocketAddr> {
        let ip: IpAddr = match &self.bind {
            None => Ipv4Addr::LOCALHOST.into(),
            Some(b) => b.parse().map_err(|_| {
                Error::BadNetwork(format!("port forward \"bind\" {b:?} is not an IP address"))
            })?,
        };
        if self.host == 0 || self.guest == 0 {
            return Err(Error::BadNetwork(format!(
                "port forward {} -> {}: ports are 1 to 65535",
                self.host, self.guest
            )));
        }
        Ok(SocketAddr::new(ip, self.host))
    }
}

/// "ip" or "ip:port" of a DNS server.
pub fn parse_dns_server(text: &str) -> Result<SocketAddr> {
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(SocketAddr::from((ip, 53)));
    }
    match text.parse::<SocketAddr>() {
        Ok(a) if a.is_ipv4() => Ok(a),
        _ => Err(Error::BadNetwork(format!(
            "dns server {text:?} is not an IPv4 address or address:port"
        ))),
    }
}

impl NetworkConfig {
    /// The limits on the guest's traffic, if any.
    pub fn rate_limit(&self) -> Option<&NetRateLimit> {
        let (NetworkConfig::User { rate_limit, .. } | NetworkConfig::Tap { rate_limit, .. }) = self;
        rate_limit.as_ref()
    }

    /// Its `mode` as the config writes it: `user` or `tap`.
    pub fn mode(&self) -> &'static str {
        match self {
            NetworkConfig::User { .. } => "user",
            NetworkConfig::Tap { .. } => "tap",
        }
    }

    /// The guest's MAC address when the config names one.
    pub fn mac(&self) -> Option<&str> {
        let (NetworkConfig::User { mac, .. } | NetworkConfig::Tap { mac, .. }) = self;
        mac.as_deref()
    }

    fn validate(&self) -> Result<()> {
        if let Some(limit) = self.rate_limit() {
            limit.rx.validate("\"network\" rx")?;
            limit.tx.validate("\"network\" tx")?;
        }
        match self {
            NetworkConfig::User {
                egress,
                port_forwards,
                dns,
                mac,
                ..
            } => {
                egress.policy()?;
                let mut seen = std::collections::HashSet::new();
                for f in port_forwards {
                    let addr = f.bind_addr()?;
                    if !seen.insert(addr) {
                        return Err(Error::BadNetwork(format!(
                            "port forward {addr} is listed twice"
                        )));
                    }
                }
                for d in dns.iter().flatten() {
                    parse_dns_server(d)?;
                }
                if let Some(m) = mac {
                    parse_mac(m)?;
                }
                Ok(())
            }
            NetworkConfig::Tap {
                address,
                gateway,
                mac,
                ..
            } => {
                parse_cidr(address)?;
                if let Some(g) = gateway {
                    g.parse::<Ipv4Addr>().map_err(|_| {
                        Error::BadNetwork(format!("gateway {g:?} is not an IPv4 address"))
                    })?;
                }
                if let Some(m) = mac {
                    parse_mac(m)?;
                }
                Ok(())
            }
        }
    }
}

/// "a.b.c.d/len" as an address and prefix length.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || {
        Error::BadNetwork(format!(
            "address {text:?} is not IPv4 with a prefix, like 10.0.3.2/24"
        ))
    };
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    Ok((addr, len))
}

/// "02:00:00:00:00:01" as bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    match vmm_agent::parse_mac(text) {
        // A multicast address cannot be an interface's.
        Some(mac) if mac[0] & 1 == 0 => Ok(mac),
        _ => Err(Error::BadNetwork(format!(
            "mac {text:?} is not six hex bytes like 02:00:00:00:00:01"
        ))),
    }
}

/// A host folder shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// The virtio-fs tag (what `mount -t virtiofs TAG DIR` names).
    pub tag: String,
    /// The host folder (anywhere); nothing outside it is reachable.
    pub host_path: PathBuf,
    /// Where the guest agent mounts it.
    pub guest_path: PathBuf,
    /// Refuse every change (enforced by the VMM, not only the guest).
    #[serde(default)]
    pub read_only: bool,
}

impl ShareConfig {
    fn validate(&self) -> Result<()> {
        let tag_ok = !self.tag.is_empty()
            && self.tag.len() <= 36
            && self
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(Error::BadShareTag(self.tag.clone()));
        }
        let path = self.guest_path.to_string_lossy();
        let path_ok = self.guest_path.is_absolute()
            && path != "/"
            && !path
                .chars()
                .any(|c| c.is_whitespace() || c == ',' || c == ':');
        if !path_ok {
            return Err(Error::BadGuestPath {
                tag: self.tag.clone(),
                path: self.guest_path.clone(),
            });
        }
        Ok(())
    }
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

/// A VM's configuration. Every field has a default, so `{}` is a valid config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (default 1).
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory in MiB (default 128).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Guest kernel: an ELF `vmlinux` (fast) or a bzImage. Default: the
    /// kernel of the chosen flavour built by the setup command.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (uncompressed cpio recommended). Default: the one built by
    /// the setup command. `""` boots without one.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended after the VMM's own.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Kernel flavour (default "auto").
    #[serde(default)]
    pub flavour: Flavour,
    /// Replaces the command-line flags the chosen flavour adds (on PVM
    /// hosts: `noxsave clearcpuid=...`). Leave unset unless you know why.
    #[serde(default)]
    pub flavour_cmdline: Option<String>,
    /// Serial console: "stdout" (default), "off", or a file path.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Root disk on virtio-blk (`/dev/vda` in the guest); none when unset.
    #[serde(default)]
    pub rootfs: Option<RootfsConfig>,
    /// virtio-vsock; none when unset.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Host folders shared with the guest (virtio-fs), mounted by the agent.
    #[serde(default)]
    pub shares: Vec<ShareConfig>,
    /// The guest's network interface; none when unset.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Every VMM thread under its seccomp filter (docs/security.md). Off
    /// only for debugging: a bug in a device then reaches every system
    /// call. Linux only: off, and refused when on, on other hosts.
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
    /// The jail the VMM process runs in (docs/security.md); none when
    /// unset (`vmm launch --jail` sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
}

/// The jail's settings: `"jail": {}` jails the VMM with the defaults.
/// The limits are those of a cgroup v2 the jail makes for itself (they
/// need cgroup delegation; docs/security.md): they hold for the jail as
/// a whole, the VMM and the fork children it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// `memory.max`, in MiB: more than the guest's memory, which is
    /// charged as the guest touches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_mib: Option<u64>,
    /// `pids.max`: processes and threads (each vCPU is a thread, each
    /// fork child a VMM of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `cpu.max`, in percent of one CPU (150: one and a half CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_percent: Option<u64>,
}

/// Threads and processes a jailed VMM has besides its vCPUs (measured: the
/// jail's launcher and init; the VMM's main, spawner and control threads,
/// KVM's worker thread and the spawner's helper process), with room to
/// spare. Each fork child adds its vCPUs and 4.
pub const JAIL_BASE_PIDS: u64 = 12;

impl JailConfig {
    /// Whether it asks for any cgroup limit.
    pub fn has_limits(&self) -> bool {
        self.memory_max_mib.is_some() || self.pids_max.is_some() || self.cpu_max_percent.is_some()
    }

    /// Checks the limits against the VM they hold (`memory_mib` of guest
    /// memory, `vcpus` threads).
    pub fn validate(&self, memory_mib: u64, vcpus: u32) -> Result<()> {
        let bad = |s: String| Err(Error::BadJail(s));
        if let Some(m) = self.memory_max_mib {
            if m <= memory_mib {
                return bad(format!("\"memory_max_mib\" is {m}, not above the guest's {memory_mib} MiB: the VMM would be killed once the guest uses its memory; give it the guest's memory plus at least 64"));
            }
        }
        if let Some(p) = self.pids_max {
            let least = u64::from(vcpus) + JAIL_BASE_PIDS;
            if p < least {
                return bad(format!("\"pids_max\" is {p}: a jailed VMM needs a thread per vCPU besides its own threads and the jail's processes; give it at least {least} (vCPUs + {JAIL_BASE_PIDS}), and more for fork children"));
            }
        }
        if let Some(c) = self.cpu_max_percent {
            if !(1..=100 * 1024).contains(&c) {
                return bad(format!(
                    "\"cpu_max_percent\" is {c}: give 1 (a hundredth of a CPU) to 102400"
                ));
            }
        }
        Ok(())
    }
}

/// On where the host has seccomp (Linux).
fn default_seccomp() -> bool {
    cfg!(target_os = "linux")
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: None,
            initramfs: None,
            cmdline: None,
            flavour: Flavour::Auto,
            flavour_cmdline: None,
            serial: SerialOutput::Stdout,
            rootfs: None,
            vsock: None,
            shares: Vec::new(),
            network: None,
            seccomp: default_seccomp(),
            jail: None,
        }
    }
}

impl VmConfig {
    /// Parses a configuration from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let config: VmConfig = serde_json::from_str(text).map_err(|source| Error::Parse {
            path: origin.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Adds a vsock device on `uds_path` (guest CID [`DEFAULT_CID`]) unless
    /// the config has one: the channel to the guest agent.
    pub fn ensure_vsock(&mut self, uds_path: PathBuf) {
        if self.vsock.is_none() {
            self.vsock = Some(VsockConfig {
                cid: DEFAULT_CID,
                uds_path,
            });
        }
    }

    /// Adds what running commands needs where the config leaves it out:
    /// the default root disk (it holds the agent) and a vsock device on
    /// `uds_path`. What `vmm run` boots, and `vmm launch --name` without
    /// a config.
    pub fn ensure_agent(&mut self, uds_path: PathBuf) {
        if self.rootfs.is_none() {
            self.rootfs = Some(RootfsConfig::default());
        }
        self.ensure_vsock(uds_path);
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Checks what can be checked without the host (the host's vCPU limit
    /// and the kernel's memory needs are checked when the VM is built).
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 {
            return Err(Error::NoVcpus);
        }
        if self.seccomp && !cfg!(target_os = "linux") {
            return Err(Error::SeccompNotOnThisHost);
        }
        if self.memory_mib == 0 {
            return Err(Error::NoMemory);
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::TooMuchMemory(self.memory_mib));
        }
        if let Some(v) = &self.vsock {
            if !(3..u64::from(u32::MAX)).contains(&v.cid) {
                return Err(Error::ReservedCid(v.cid));
            }
        }
        if let Some(r) = &self.rootfs {
            if r.base.is_some() && r.image.is_some() {
                return Err(Error::BaseAndImage);
            }
            if let Some(limit) = &r.rate_limit {
                limit.validate("\"rootfs\"")?;
            }
        }
        if let Some(n) = &self.network {
            n.validate()?;
        }
        let mut tags = std::collections::HashSet::new();
        for share in &self.shares {
            share.validate()?;
            if !tags.insert(share.tag.as_str()) {
                return Err(Error::DuplicateShareTag(share.tag.clone()));
            }
        }
        if let Some(j) = &self.jail {
            j.validate(self.memory_mib, self.vcpus)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig> {
        VmConfig::from_json(text, Path::new("vm.json"))
    }

    #[test]
    fn empty_object_gives_defaults() {
        assert_eq!(parse("{}").unwrap(), VmConfig::default());
    }

    #[test]
    fn the_agent_is_added_only_where_the_config_leaves_it_out() {
        let mut bare = VmConfig::default();
        bare.ensure_agent("a.vsock".into());
        assert_eq!(bare.rootfs, Some(RootfsConfig::default()));
        assert_eq!(bare.vsock.as_ref().unwrap().cid, DEFAULT_CID);
        let mut own = parse(r#"{"vsock": {"cid": 7, "uds_path": "own.vsock"}}"#).unwrap();
        own.ensure_vsock("a.vsock".into());
        assert_eq!(own.rootfs, None);
        let vsock = own.vsock.as_ref().unwrap();
        assert_eq!(
            (vsock.cid, vsock.uds_path.as_path()),
            (7, Path::new("own.vsock"))
        );
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"{"vcpus": 2, "memory_mib": 256, "kernel": "/k", "initramfs": "/i",
                "cmdline": "loglevel=7", "flavour": "pvm", "serial": "/tmp/console.log"}"#,
        )
        .unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.flavour, Flavour::Pvm);
        assert_eq!(c.serial, SerialOutput::File("/tmp/console.log".into()));
        assert_eq!(
            parse(r#"{"serial": "off"}"#).unwrap().serial,
            SerialOutput::Off
        );
    }

    #[test]
    fn the_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                VmConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 4, "{seen} examples in {}", dir.display());
    }

    #[test]
    fn jail_limits_are_checked_against_the_vm() {
        let jail = |body: &str| {
            parse(&format!(
                r#"{{"memory_mib": 256, "vcpus": 2, "jail": {body}}}"#
            ))
        };
        let c = jail(r#"{"memory_max_mib": 320, "pids_max": 14, "cpu_max_percent": 50}"#).unwrap();
        assert!(c.jail.unwrap().has_limits());
        assert!(!jail("{}").unwrap().jail.unwrap().has_limits());
        for (bad, says) in [
            (
                r#"{"memory_max_mib": 256}"#,
                "not above the guest's 256 MiB",
            ),
            (r#"{"pids_max": 13}"#, "at least 14"),
            (r#"{"cpu_max_percent": 0}"#, "give 1"),
            (r#"{"cpu_max_percent": 102401}"#, "give 1"),
        ] {
            let err = jail(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(
            jail(r#"{"memory": 1}"#).is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn shares_are_checked() {
        let c = parse(
            r#"{"shares": [{"tag": "work", "host_path": "/srv/p", "guest_path": "/mnt/work"},
                           {"tag": "ro", "host_path": "/x", "guest_path": "/ro", "read_only": true}]}"#,
        )
        .unwrap();
        assert_eq!(c.shares.len(), 2);
        assert!(c.shares[1].read_only && !c.shares[0].read_only);
        let one = |tag: &str, guest: &str| {
            parse(&format!(
                r#"{{"shares": [{{"tag": "{tag}", "host_path": "/h", "guest_path": "{guest}"}}]}}"#
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(one("", "/m").unwrap_err().contains("1 to 36"));
        assert!(one("a b", "/m").is_err());
        assert!(one(&"t".repeat(37), "/m").is_err());
        assert!(one("t", "relative").unwrap_err().contains("absolute"));
        assert!(one("t", "/").is_err());
        assert!(one("t", "/a,b").is_err());
        assert!(one("t", "/a:b").is_err());
        let twice = parse(
            r#"{"shares": [{"tag": "t", "host_path": "/a", "guest_path": "/a"},
                           {"tag": "t", "host_path": "/b", "guest_path": "/b"}]}"#,
        );
        assert!(twice.unwrap_err().to_string().contains("used twice"));
        let typo = parse(r#"{"shares": [{"tag": "t", "host": "/a", "guest_path": "/a"}]}"#);
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn not_json_reports_line_and_column() {
        let err = parse("{\n  \"vcpus\": 1,\n  oops\n}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vm.json"), "{err}");
        assert!(err.contains("line 3 column 3"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(r#"{"vcpu": 2}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn zero_vcpus_and_memory_are_rejected() {
        assert!(matches!(parse(r#"{"vcpus": 0}"#), Err(Error::NoVcpus)));
        assert!(matches!(
            parse(r#"{"memory_mib": 0}"#),
            Err(Error::NoMemory)
        ));
        assert!(matches!(
            parse(r#"{"memory_mib": 2000000}"#),
            Err(Error::TooMuchMemory(_))
        ));
        assert!(parse(r#"{"serial": ""}"#).is_err());
        assert!(matches!(
            parse(r#"{"vsock": {"cid": 2, "uds_path": "/tmp/v"}}"#),
            Err(Error::ReservedCid(2))
        ));
        assert!(matches!(
            parse(r#"{"vsock": {"cid": 4294967295, "uds_path": "/tmp/v"}}"#),
            Err(Error::ReservedCid(4294967295))
        ));
        assert!(parse(r#"{"vsock": {"cid": 3, "uds_path": "/tmp/v"}}"#).is_ok());
        assert!(parse(r#"{"vsock": {"cid": 4294967294, "uds_path": "/tmp/v"}}"#).is_ok());
    }

    #[test]
    fn a_renewed_cid_is_a_usable_one() {
        let mut v = VsockConfig {
            cid: DEFAULT_CID,
            uds_path: "v".into(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            v.renew_cid();
            assert!((3..u64::from(u32::MAX)).contains(&v.cid), "{}", v.cid);
            seen.insert(v.cid);
        }
        assert!(seen.len() > 60, "random context ids repeat: {seen:?}");
    }
}
