//! The shim's settings: a JSON file named by the runtime's `ConfigPath`
//! option (containerd's `[...runtimes.vmm.options] ConfigPath = ...`, or
//! `ctr run --runtime-config-path`), else the defaults.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use serde::Deserialize;

use crate::config::NetworkConfig;

use super::{Error, Result};

/// How a pod's VM starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Booted.
    Cold,
    /// From a template; `default`: one the shim builds on first use (and
    /// again when the kernel, initramfs or base image changed).
    Template { name: String, default: bool },
}

/// What a runtime handler's config file says (docs/containerd.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Start every sandbox from this template (`vmm template create`);
    /// without one, the shim's own for the VM's size and network kind,
    /// `containerd-<vcpus>x<memory>-<network>` (built on first use).
    pub template: Option<String>,
    /// Boot each sandbox instead (slow: for kernels or sizes no template
    /// has).
    pub cold: bool,
    /// The VMM binary; default: `vmm` next to the shim, else on PATH.
    pub vmm: Option<PathBuf>,
    /// Run each VMM jailed (docs/security.md#the-jail).
    pub jail: bool,
    /// vCPUs and memory when the spec sets no limits (must match the
    /// template's).
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VM's network (docs/network.md): default the user network (NAT
    /// in the VMM, the default egress policy: the internet, never the
    /// host or private networks); `null` for none. Its kind must be the
    /// template's; its policy is bound at each start.
    #[serde(default = "default_network")]
    pub network: Option<NetworkConfig>,
}

fn default_network() -> Option<NetworkConfig> {
    Some(NetworkConfig::User {
        egress: Default::default(),
        port_forwards: Vec::new(),
        dns: None,
        mac: None,
        rate_limit: None,
    })
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            template: None,
            cold: false,
            vmm: None,
            jail: true,
            vcpus: 1,
            memory_mib: super::spec::DEFAULT_MEMORY_MIB,
            network: default_network(),
        }
    }
}

impl Settings {
    /// The settings the create request's runtime options point to.
    pub fn from_options(options: Option<&Any>) -> Result<Settings> {
        match options.map(config_path).transpose()?.flatten() {
            Some(path) => Self::from_file(&path),
            None => Ok(Settings::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Settings(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| Error::Settings(format!("{}: {e}", path.display())))
    }

    /// How a VM of `size` (vCPUs, MiB) starts: from the named template
    /// when it is the settings' size, else booted; from the shim's own
    /// template of that size without one.
    pub fn start(&self, size: (u32, u32)) -> Start {
        match (&self.template, self.cold) {
            (_, true) => Start::Cold,
            (Some(name), false) if size == (self.vcpus, self.memory_mib) => Start::Template {
                name: name.clone(),
                default: false,
            },
            (Some(_), false) => Start::Cold,
            (None, false) => {
                let network = self.network.as_ref().map_or("none", NetworkConfig::mode);
                Start::Template {
                    name: format!("containerd-{}x{}-{network}", size.0, size.1),
                    default: true,
                }
            }
        }
    }

    /// The VMM binary to run.
    pub fn vmm_binary(&self) -> PathBuf {
        if let Some(path) = &self.vmm {
            return path.clone();
        }
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vmm")))
            .filter(|p| p.exists());
        sibling.unwrap_or_else(|| PathBuf::from("vmm"))
    }
}

/// The `config_path` of containerd's `runtimeoptions.v1.Options` (fields:
/// 1 type_url, 2 config_path, 3 config_body), which the CRI plugin and
/// `ctr --runtime-config-path` send to shims other than runc's.
fn config_path(any: &Any) -> Result<Option<PathBuf>> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    let bad = |e: &dyn std::fmt::Display| Error::Settings(format!("bad runtime options: {e}"));
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| bad(&e))? {
        match tag {
            // Field 2, length-delimited.
            0x12 => path = Some(input.read_string().map_err(|e| bad(&e))?),
            t => input
                .skip_field(
                    containerd_shim::protos::protobuf::rt::WireType::new(t & 7)
                        .ok_or_else(|| bad(&"unknown wire type"))?,
                )
                .map_err(|e| bad(&e))?,
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(type_url: &str, value: Vec<u8>) -> Any {
        let mut any = Any::new();
        any.type_url = type_url.into();
        any.value = value;
        any
    }

    #[test]
    fn the_config_path_comes_from_runtime_options() {
        // type_url "x" (field 1), config_path "/etc/vmm/shim.json" (field 2).
        let mut v = vec![0x0a, 1, b'x', 0x12, 18];
        v.extend_from_slice(b"/etc/vmm/shim.json");
        let any = options("type.googleapis.com/runtimeoptions.v1.Options", v);
        assert_eq!(
            config_path(&any).unwrap(),
            Some(PathBuf::from("/etc/vmm/shim.json"))
        );
        let other = options(
            "type.googleapis.com/containerd.runc.v1.Options",
            vec![0x12, 1, b'y'],
        );
        assert_eq!(config_path(&other).unwrap(), None);
        let cut = options("runtimeoptions.v1.Options", vec![0x12, 40, b'/']);
        assert!(config_path(&cut).is_err());
    }

    #[test]
    fn the_example_settings_and_template_config_read() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/containerd");
        let s = Settings::from_file(&dir.join("shim.json")).unwrap();
        assert_eq!(
            (s.template.as_deref(), s.vcpus, s.memory_mib),
            (Some("big"), 2, 512)
        );
        let t = crate::config::VmConfig::from_file(&dir.join("template.json")).unwrap();
        assert_eq!((t.vcpus, t.memory_mib), (2, 512));
        assert_eq!(
            t.shares[0].guest_path.to_str(),
            Some(super::super::spec::GUEST_SHARE)
        );
    }

    #[test]
    fn settings_read_with_defaults_and_refuse_unknown_fields() {
        let s: Settings = serde_json::from_str(r#"{"template":"py"}"#).unwrap();
        let py = Start::Template {
            name: "py".into(),
            default: false,
        };
        assert_eq!(s.start((1, 256)), py);
        // Another size than the named template's: booted.
        assert_eq!(s.start((2, 640)), Start::Cold);
        assert!(s.jail);
        let ours = |name: &str| Start::Template {
            name: name.into(),
            default: true,
        };
        assert_eq!(
            Settings::default().start((1, 256)),
            ours("containerd-1x256-user")
        );
        assert_eq!(
            Settings::default().start((2, 640)),
            ours("containerd-2x640-user")
        );
        let cold: Settings = serde_json::from_str(r#"{"cold":true}"#).unwrap();
        assert_eq!(cold.start((1, 256)), Start::Cold);
        assert!(serde_json::from_str::<Settings>(r#"{"templat":"py"}"#).is_err());
        assert!(matches!(s.network, Some(NetworkConfig::User { .. })));
        let none: Settings = serde_json::from_str(r#"{"network":null}"#).unwrap();
        assert_eq!(none.network, None);
    }
}
