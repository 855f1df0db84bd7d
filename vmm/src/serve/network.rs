//! E2B's sandbox network settings (`allow_internet_access`, `network:
//! {allowOut, denyOut, ...}` at create, `PUT /sandboxes/{id}/network`
//! later) as our egress policy (docs/network.md), which the sandbox's VMM
//! applies while it runs.
//!
//! E2B lets an `allowOut` entry win over a `denyOut` one; our policy lets
//! a deny rule win. The two agree when `denyOut` holds `0.0.0.0/0` (our
//! default becomes deny, `allowOut` the allow rules) and when no allowed
//! entry can fall inside a denied one; the rest (an allowed name beside
//! denied ranges, overlapping ranges) is refused with a message rather
//! than enforced differently from what was asked.

use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{EgressConfig, EgressDefault};

/// E2B's "all traffic" range.
const ALL_TRAFFIC: &str = "0.0.0.0/0";

/// The network object of a create, or the body of a network update.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct E2bNetwork {
    #[serde(default)]
    pub allow_out: Option<Vec<String>>,
    #[serde(default)]
    pub deny_out: Option<Vec<String>>,
    /// Name servers to allow when `allowOut` names a host: ours is the
    /// VM's own forwarder, always reachable, so these are not needed.
    #[serde(default)]
    pub dns_servers: Option<Vec<String>>,
    #[serde(default)]
    pub egress_proxy: Option<Value>,
    /// Per-domain request rewriting: not offered.
    #[serde(default)]
    pub rules: Option<Value>,
    /// About sandbox URLs reached from outside, which this server has not.
    #[serde(default)]
    pub allow_public_traffic: Option<bool>,
    #[serde(default)]
    pub mask_request_host: Option<String>,
    #[serde(default)]
    pub https_ports: Option<Vec<u16>>,
    /// Only in an update's body (a create has it beside `network`).
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
}

/// Why settings cannot be applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A feature this server does not offer (501).
    Unsupported(&'static str),
    /// Settings that are wrong or that our policy cannot express (400).
    Bad(String),
}

impl E2bNetwork {
    /// Whether it asks for anything at all.
    fn is_empty(&self) -> bool {
        self.allow_out.as_ref().is_none_or(Vec::is_empty)
            && self.deny_out.as_ref().is_none_or(Vec::is_empty)
            && self.allow_internet_access.is_none()
    }
}

/// The egress policy a create asks for; `None`: the template's own.
pub fn at_create(
    allow_internet_access: Option<bool>,
    network: Option<&E2bNetwork>,
) -> Result<Option<EgressConfig>, Refusal> {
    let empty = E2bNetwork::default();
    let network = network.unwrap_or(&empty);
    if allow_internet_access.is_none() && network.is_empty() {
        check_unsupported(network)?;
        return Ok(None);
    }
    egress_of(allow_internet_access, network).map(Some)
}

/// The egress policy an update sets: the whole policy, what it leaves out
/// cleared (as E2B does).
pub fn at_update(network: &E2bNetwork) -> Result<EgressConfig, Refusal> {
    egress_of(network.allow_internet_access, network)
}

fn check_unsupported(network: &E2bNetwork) -> Result<(), Refusal> {
    if network.egress_proxy.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(Refusal::Unsupported("an egress proxy"));
    }
    let has_rules = match &network.rules {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    };
    if has_rules {
        return Err(Refusal::Unsupported("per-domain request rules"));
    }
    Ok(())
}

fn egress_of(
    allow_internet_access: Option<bool>,
    network: &E2bNetwork,
) -> Result<EgressConfig, Refusal> {
    check_unsupported(network)?;
    let allow = network.allow_out.clone().unwrap_or_default();
    let mut deny = network.deny_out.clone().unwrap_or_default();
    if let Some(name) = deny.iter().find(|d| net_of(d).is_none()) {
        return Err(Refusal::Bad(format!(
            "denyOut takes addresses and ranges (\"1.2.3.4\", \"10.0.0.0/8\"), not host names: {name:?}"
        )));
    }
    let deny_all = allow_internet_access == Some(false) || deny.iter().any(|d| d == ALL_TRAFFIC);
    let egress = if deny_all {
        // Everything not allowed is denied: the other deny entries add
        // nothing, and allowOut wins over them as in E2B.
        EgressConfig {
            default: EgressDefault::Deny,
            allow,
            deny: Vec::new(),
        }
    } else {
        deny.retain(|d| d != ALL_TRAFFIC);
        if let Some((a, d)) = first_overlap(&allow, &deny) {
            return Err(Refusal::Bad(format!(
                "allowOut {a:?} may fall inside denyOut {d:?}: E2B lets the allowed entry win, this server's policy lets the denied one win; deny all (\"0.0.0.0/0\") and list what to allow instead"
            )));
        }
        EgressConfig {
            default: EgressDefault::Allow,
            allow,
            deny,
        }
    };
    egress
        .policy()
        .map_err(|e| Refusal::Bad(format!("{e} (docs/network.md lists the rule forms)")))?;
    Ok(egress)
}

/// An allowed entry that may match a denied one: any name (it resolves to
/// any address), or ranges that meet.
fn first_overlap<'a>(allow: &'a [String], deny: &'a [String]) -> Option<(&'a str, &'a str)> {
    let d0 = deny.first()?;
    for a in allow {
        let Some((a_addr, a_len)) = net_of(a) else {
            return Some((a, d0));
        };
        for d in deny {
            if let Some((d_addr, d_len)) = net_of(d) {
                let mask = devices::virtio::net::user::policy::prefix_mask(a_len.min(d_len));
                if u32::from(a_addr) & mask == u32::from(d_addr) & mask {
                    return Some((a, d));
                }
            }
        }
    }
    None
}

/// `a.b.c.d`, `a.b.c.d/len`, either with `:port`: the range; `None` for a
/// name (or anything else, which the policy's parser then names).
fn net_of(entry: &str) -> Option<(Ipv4Addr, u8)> {
    let host = entry.rsplit_once(':').map_or(entry, |(h, _)| h);
    let (addr, len) = match host.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32)?),
        None => (host, 32),
    };
    Some((addr.parse().ok()?, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(allow: &[&str], deny: &[&str]) -> E2bNetwork {
        E2bNetwork {
            allow_out: Some(allow.iter().map(|s| s.to_string()).collect()),
            deny_out: Some(deny.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    fn egress(default: EgressDefault, allow: &[&str], deny: &[&str]) -> EgressConfig {
        EgressConfig {
            default,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn nothing_asked_keeps_the_templates_policy() {
        assert_eq!(at_create(None, None), Ok(None));
        assert_eq!(at_create(None, Some(&net(&[], &[]))), Ok(None));
    }

    #[test]
    fn no_internet_denies_everything_not_allowed() {
        let none = egress(EgressDefault::Deny, &[], &[]);
        assert_eq!(at_create(Some(false), None), Ok(Some(none)));
        let only = net(&["pypi.org", "10.0.2.2"], &[ALL_TRAFFIC, "8.8.8.8"]);
        let want = egress(EgressDefault::Deny, &["pypi.org", "10.0.2.2"], &[]);
        assert_eq!(at_create(None, Some(&only)), Ok(Some(want.clone())));
        // An update says the same in its own body.
        let update = E2bNetwork {
            allow_internet_access: Some(false),
            ..net(&["pypi.org", "10.0.2.2"], &[])
        };
        assert_eq!(at_update(&update), Ok(want));
    }

    #[test]
    fn denied_ranges_beside_the_internet() {
        let n = net(&["10.0.2.2"], &["203.0.113.0/24", "198.51.100.7"]);
        let want = egress(
            EgressDefault::Allow,
            &["10.0.2.2"],
            &["203.0.113.0/24", "198.51.100.7"],
        );
        assert_eq!(at_create(Some(true), Some(&n)), Ok(Some(want)));
        // An empty update clears every rule.
        let cleared = egress(EgressDefault::Allow, &[], &[]);
        assert_eq!(at_update(&E2bNetwork::default()), Ok(cleared));
    }

    #[test]
    fn what_our_policy_would_enforce_differently_is_refused() {
        for (allow, deny) in [
            ("203.0.113.5", "203.0.113.0/24"),
            ("203.0.0.0/8", "203.0.113.9"),
            ("example.com", "203.0.113.0/24"),
        ] {
            match at_update(&net(&[allow], &[deny])) {
                Err(Refusal::Bad(m)) => assert!(m.contains(allow) && m.contains(deny), "{m}"),
                other => panic!("{allow} beside {deny}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_and_unsupported_settings_are_named() {
        match at_update(&net(&[], &["example.com"])) {
            Err(Refusal::Bad(m)) => assert!(m.contains("not host names"), "{m}"),
            other => panic!("{other:?}"),
        }
        match at_update(&net(&["not a rule!"], &[])) {
            Err(Refusal::Bad(m)) => assert!(m.contains("not a rule!"), "{m}"),
            other => panic!("{other:?}"),
        }
        let proxy = E2bNetwork {
            egress_proxy: Some(serde_json::json!({"address": "socks5://x"})),
            ..Default::default()
        };
        assert_eq!(
            at_create(None, Some(&proxy)),
            Err(Refusal::Unsupported("an egress proxy"))
        );
        let rules = E2bNetwork {
            rules: Some(serde_json::json!({"api.example.com": {}})),
            ..Default::default()
        };
        assert_eq!(
            at_update(&rules),
            Err(Refusal::Unsupported("per-domain request rules"))
        );
    }

    #[test]
    fn the_sdks_body_parses() {
        let body = r#"{"allowOut":["pypi.org"],"denyOut":["0.0.0.0/0"],"dnsServers":["8.8.8.8"],"allowPublicTraffic":true,"maskRequestHost":"x","httpsPorts":[8443]}"#;
        let n: E2bNetwork = serde_json::from_str(body).unwrap();
        let want = egress(EgressDefault::Deny, &["pypi.org"], &[]);
        assert_eq!(at_create(None, Some(&n)), Ok(Some(want)));
    }
}
