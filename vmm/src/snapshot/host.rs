//! Host-side settings of a restore: which come from the operator, which
//! from the snapshot.
//!
//! A snapshot records the whole configuration of the VM it came from. Its
//! guest-visible part (vCPUs, memory, which devices exist: shares by tag
//! and guest path, the network, the root disk) must be what the restored
//! guest finds, so it is taken from the snapshot. The network's MAC (and a
//! TAP link's address) are the operator's when named, else the snapshot's:
//! the restored guest's agent moves its interface to them. Its
//! host-side part says what the VMM opens on the host and how much of it
//! the guest may use: share folders, the console file, the egress policy,
//! port forwards and their binds, DNS servers, the TAP interface, the
//! disk's base image, the rate limits. A snapshot from elsewhere must not
//! choose those, so they come from the operator: the restoring config
//! (`vmm restore --config`), else safe defaults (console on standard
//! output, the default egress policy with its floor, no port forwards, the
//! host's resolvers, the default base image, no rate limits). A share has
//! no safe default: the operator names its folder or the restore stops. With
//! `trust_snapshot_config` the snapshot's own host-side settings fill in
//! what the operator's config does not set.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{NetworkConfig, SerialOutput, ShareConfig, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the restoring config does not fit the snapshot: {0}; a restored guest keeps its devices, so give the snapshot's values")]
    Mismatch(String),
    #[error("the snapshot has share {tag:?}, whose host folder only the operator may choose: name it in --config (\"shares\": [{{\"tag\": {tag:?}, \"host_path\": ...}}]), or pass --trust-snapshot-config to use {path:?} from the snapshot")]
    ShareFolder { tag: String, path: PathBuf },
    #[error("the snapshot's network is the TAP interface {0:?}: name the TAP in --config, or pass --trust-snapshot-config")]
    Tap(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where a restore takes host-side settings from.
#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    /// The operator's configuration (`vmm restore --config`).
    pub config: Option<VmConfig>,
    /// Use the snapshot's host-side settings where `config` gives none.
    pub trust_snapshot_config: bool,
}

fn mismatch(what: String) -> Error {
    Error::Mismatch(what)
}

/// Checks that `operator` describes the same guest-visible machine.
fn check_guest_visible(snap: &VmConfig, op: &VmConfig) -> Result<()> {
    if (snap.vcpus, snap.memory_mib) != (op.vcpus, op.memory_mib) {
        return Err(mismatch(format!(
            "the snapshot has {} vCPUs and {} MiB, the config {} and {}",
            snap.vcpus, snap.memory_mib, op.vcpus, op.memory_mib
        )));
    }
    let disk = |c: &VmConfig| c.rootfs.as_ref().map(|r| r.read_only);
    if disk(snap) != disk(op) {
        return Err(mismatch(
            "\"rootfs\" (present, read_only) differs from the snapshot's".into(),
        ));
    }
    let shares = |c: &VmConfig| -> BTreeMap<String, PathBuf> {
        c.shares
            .iter()
            .map(|s| (s.tag.clone(), s.guest_path.clone()))
            .collect()
    };
    if shares(snap) != shares(op) {
        return Err(mismatch(format!(
            "the snapshot's shares (tag -> guest path) are {:?}, the config's {:?}",
            shares(snap),
            shares(op)
        )));
    }
    let net = |c: &VmConfig| c.network.as_ref().map_or("none", NetworkConfig::mode);
    if net(snap) != net(op) {
        return Err(mismatch(format!(
            "the snapshot's network is {}, the config's {}",
            net(snap),
            net(op)
        )));
    }
    Ok(())
}

/// The network's host side from the operator (`op`), from the snapshot
/// when trusted, else defaults; the MAC the operator's when named, else
/// the snapshot's.
fn network(
    snap: Option<&NetworkConfig>,
    op: Option<&NetworkConfig>,
    trust: bool,
) -> Result<Option<NetworkConfig>> {
    let named_mac = op.and_then(NetworkConfig::mac);
    Ok(match (snap, op) {
        (None, _) => None,
        (
            Some(NetworkConfig::User { mac, .. }),
            Some(NetworkConfig::User {
                egress,
                port_forwards,
                dns,
                rate_limit,
                ..
            }),
        ) => Some(NetworkConfig::User {
            egress: egress.clone(),
            port_forwards: port_forwards.clone(),
            dns: dns.clone(),
            mac: named_mac.or(mac.as_deref()).map(str::to_string),
            rate_limit: rate_limit.clone(),
        }),
        (Some(n @ NetworkConfig::User { .. }), _) if trust => Some(n.clone()),
        (Some(NetworkConfig::User { mac, .. }), _) => Some(NetworkConfig::User {
            egress: Default::default(),
            port_forwards: Vec::new(),
            dns: None,
            mac: mac.clone(),
            rate_limit: None,
        }),
        (
            Some(NetworkConfig::Tap { mac, .. }),
            Some(NetworkConfig::Tap {
                tap,
                address,
                gateway,
                rate_limit,
                ..
            }),
        ) => Some(NetworkConfig::Tap {
            tap: tap.clone(),
            address: address.clone(),
            gateway: gateway.clone(),
            mac: named_mac.or(mac.as_deref()).map(str::to_string),
            rate_limit: rate_limit.clone(),
        }),
        (Some(n @ NetworkConfig::Tap { .. }), _) if trust => Some(n.clone()),
        (Some(NetworkConfig::Tap { tap, .. }), _) => return Err(Error::Tap(tap.clone())),
    })
}

/// The configuration and base image a restore of `snap` (whose resolved
/// base image was `snap_base`) runs with under `settings`.
pub fn resolve(
    snap: &VmConfig,
    snap_base: Option<PathBuf>,
    settings: &HostSettings,
) -> Result<(VmConfig, Option<PathBuf>)> {
    let trust = settings.trust_snapshot_config;
    if let Some(op) = &settings.config {
        check_guest_visible(snap, op)?;
    }
    let op = settings.config.as_ref();
    let mut out = snap.clone();

    // Shares: the folder (and read-only) from the operator, by tag.
    out.shares = snap
        .shares
        .iter()
        .map(|s| {
            let chosen = op.and_then(|o| o.shares.iter().find(|x| x.tag == s.tag));
            match (chosen, trust) {
                (Some(o), _) => Ok(ShareConfig {
                    host_path: o.host_path.clone(),
                    read_only: o.read_only,
                    ..s.clone()
                }),
                (None, true) => Ok(s.clone()),
                (None, false) => Err(Error::ShareFolder {
                    tag: s.tag.clone(),
                    path: s.host_path.clone(),
                }),
            }
        })
        .collect::<Result<_>>()?;

    // seccomp: the operator's; a snapshot cannot turn its filters off.
    out.seccomp = match (op, trust) {
        (Some(o), _) => o.seccomp,
        (None, true) => snap.seccomp,
        (None, false) => true,
    };

    // The jail: the operator's, never the snapshot's.
    out.jail = op.and_then(|o| o.jail.clone());

    // The console: the operator's, else standard output.
    out.serial = match (op, trust) {
        (Some(o), _) => o.serial.clone(),
        (None, true) => snap.serial.clone(),
        (None, false) => SerialOutput::Stdout,
    };

    out.network = network(
        snap.network.as_ref(),
        op.and_then(|o| o.network.as_ref()),
        trust,
    )?;

    // The disk's base image: the operator's, else the snapshot's when
    // trusted, else the default one. The layer records the base's size
    // and time, so another image is refused when the disk opens. Its rate
    // limit: the operator's when the config has a disk, else the
    // snapshot's when trusted, else none.
    let mut base = None;
    if let Some(rootfs) = &mut out.rootfs {
        let op_disk = op.and_then(|o| o.rootfs.as_ref());
        rootfs.base = op_disk.and_then(|r| r.base.clone());
        if rootfs.base.is_none() && trust {
            base = snap_base;
        }
        rootfs.rate_limit = match (op_disk, trust) {
            (Some(r), _) => r.rate_limit,
            (None, true) => rootfs.rate_limit,
            (None, false) => None,
        };
    }
    Ok((out, base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RootfsConfig;

    fn snapshot_config() -> VmConfig {
        VmConfig::from_json(
            r#"{
                "vcpus": 2, "memory_mib": 256,
                "rootfs": {"base": "/elsewhere/base.ext4",
                           "rate_limit": {"ops": {"size": 1, "refill_time_ms": 1000}}},
                "serial": "/home/victim/.bashrc",
                "shares": [{"tag": "work", "host_path": "/", "guest_path": "/mnt/work"}],
                "network": {"mode": "user", "mac": "02:00:00:00:00:07",
                            "egress": {"allow": ["169.254.169.254"]},
                            "port_forwards": [{"host": 22, "guest": 22, "bind": "0.0.0.0"}],
                            "dns": ["10.0.0.53"],
                            "rate_limit": {"rx": {"packets": {"size": 5, "refill_time_ms": 10}}}}
            }"#,
            std::path::Path::new("snapshot"),
        )
        .unwrap()
    }

    #[test]
    fn without_trust_nothing_host_side_comes_from_the_snapshot() {
        let snap = snapshot_config();
        let base = Some(PathBuf::from("/elsewhere/base.ext4"));
        // No operator config: the share has no folder, so the restore stops.
        let err = resolve(&snap, base.clone(), &HostSettings::default()).unwrap_err();
        assert!(matches!(err, Error::ShareFolder { .. }), "{err}");
        // The operator names the folder; everything else is a safe default.
        let mut op = snap.clone();
        op.shares[0].host_path = PathBuf::from("/srv/project");
        op.serial = SerialOutput::Off;
        op.network = Some(NetworkConfig::User {
            egress: Default::default(),
            port_forwards: Vec::new(),
            dns: None,
            mac: None,
            rate_limit: None,
        });
        op.rootfs = Some(RootfsConfig::default());
        let settings = HostSettings {
            config: Some(op),
            trust_snapshot_config: false,
        };
        let (out, out_base) = resolve(&snap, base, &settings).unwrap();
        assert_eq!(out.shares[0].host_path, PathBuf::from("/srv/project"));
        assert_eq!(out.serial, SerialOutput::Off);
        assert_eq!(out_base, None);
        assert_eq!(
            out.rootfs.unwrap(),
            RootfsConfig::default(),
            "no base, no limit"
        );
        match out.network.unwrap() {
            NetworkConfig::User {
                egress,
                port_forwards,
                dns,
                mac,
                rate_limit,
            } => {
                assert_eq!(rate_limit, None);
                assert!(egress.allow.is_empty());
                assert!(port_forwards.is_empty());
                assert_eq!(dns, None);
                assert_eq!(mac.as_deref(), Some("02:00:00:00:00:07"), "guest-visible");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_operator_cannot_change_what_the_guest_sees() {
        let snap = snapshot_config();
        for change in [
            |c: &mut VmConfig| c.vcpus = 1,
            |c: &mut VmConfig| c.memory_mib = 512,
            |c: &mut VmConfig| c.shares.clear(),
            |c: &mut VmConfig| c.shares[0].guest_path = PathBuf::from("/mnt/other"),
            |c: &mut VmConfig| c.network = None,
            |c: &mut VmConfig| c.rootfs = None,
        ] {
            let mut op = snap.clone();
            change(&mut op);
            let settings = HostSettings {
                config: Some(op),
                trust_snapshot_config: false,
            };
            assert!(matches!(
                resolve(&snap, None, &settings),
                Err(Error::Mismatch(_))
            ));
        }
    }

    #[test]
    fn the_operator_may_name_the_mac_a_restored_guest_moves_to() {
        let snap = snapshot_config();
        let mut op = snap.clone();
        op.network = Some(NetworkConfig::User {
            egress: Default::default(),
            port_forwards: Vec::new(),
            dns: None,
            mac: Some("02:00:00:00:00:99".into()),
            rate_limit: None,
        });
        let settings = HostSettings {
            config: Some(op),
            trust_snapshot_config: false,
        };
        let (out, _) = resolve(&snap, None, &settings).unwrap();
        assert!(matches!(
            out.network,
            Some(NetworkConfig::User { mac: Some(m), .. }) if m == "02:00:00:00:00:99"
        ));
    }

    #[test]
    fn trust_fills_in_from_the_snapshot_and_the_operator_still_wins() {
        let snap = snapshot_config();
        let base = Some(PathBuf::from("/elsewhere/base.ext4"));
        let settings = HostSettings {
            config: None,
            trust_snapshot_config: true,
        };
        let (out, out_base) = resolve(&snap, base.clone(), &settings).unwrap();
        assert_eq!(
            out.rootfs.as_ref().unwrap().rate_limit,
            snap.rootfs.as_ref().unwrap().rate_limit
        );
        assert_eq!(out.shares, snap.shares);
        assert_eq!(out.serial, snap.serial);
        assert_eq!(out.network, snap.network);
        assert_eq!(out_base, base);
        let mut op = snap.clone();
        op.shares[0].host_path = PathBuf::from("/srv/project");
        op.rootfs = Some(RootfsConfig {
            base: Some(PathBuf::from("/mine/base.ext4")),
            ..Default::default()
        });
        let settings = HostSettings {
            config: Some(op),
            trust_snapshot_config: true,
        };
        let (out, out_base) = resolve(&snap, base, &settings).unwrap();
        assert_eq!(out.shares[0].host_path, PathBuf::from("/srv/project"));
        assert_eq!(out_base, None);
        let rootfs = out.rootfs.unwrap();
        assert_eq!(rootfs.base, Some(PathBuf::from("/mine/base.ext4")));
        assert_eq!(rootfs.rate_limit, None, "the operator's disk has no limit");
    }
}
