//! The egress policy of the user-mode network: which destinations a guest
//! may open connections to or send datagrams to.
//!
//! A rule is `"CIDR"`, `"CIDR:PORT"`, `"NAME"` or `"NAME:PORT"`. Deny rules
//! win over allow rules, allow rules over the default. A name rule matches
//! the addresses the VM's own DNS forwarder resolved for that name (or, for
//! `*.example.com`, for any name below it). `10.0.2.2` stands for the
//! host's loopback, which only a rule naming `10.0.2.2` itself can open:
//! neither the default nor a wider range such as `0.0.0.0/0` reaches it.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

/// The gateway address, standing for the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// At most this many (address, name) pairs are remembered per VM; older
/// ones are forgotten first.
pub const MAX_LEARNED_NAMES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Net {
        addr: u32,
        prefix: u8,
    },
    /// Lower case; `suffix` means "*.name" (the name itself and below).
    Name {
        name: String,
        suffix: bool,
    },
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    target: Target,
    port: Option<u16>,
}

impl Rule {
    /// Parses `"CIDR"`, `"CIDR:PORT"`, `"NAME"` or `"NAME:PORT"`; the error
    /// says what is wrong with the rule.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("rule {text:?}: port {p:?} is not 1 to 65535"))?;
                (h, Some(port))
            }
            None => (text, None),
        };
        let target = if let Some(net) = parse_net(host) {
            let (addr, prefix) = net.map_err(|e| format!("rule {text:?}: {e}"))?;
            Target::Net { addr, prefix }
        } else {
            let lower = host.to_ascii_lowercase();
            let (name, suffix) = match lower.strip_prefix("*.") {
                Some(rest) => (rest.to_string(), true),
                None => (lower, false),
            };
            if !valid_name(&name) {
                return Err(format!(
                    "rule {text:?} is neither an IPv4 address/range (10.0.0.0/8) nor a host name (example.com, *.example.com)"
                ));
            }
            Target::Name { name, suffix }
        };
        Ok(Rule { target, port })
    }

    fn is_gateway_rule(&self) -> bool {
        self.target
            == Target::Net {
                addr: GATEWAY.into(),
                prefix: 32,
            }
    }

    fn matches(&self, ip: Ipv4Addr, port: u16, names: &LearnedNames) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.target {
            Target::Net { addr, prefix } => {
                let mask = prefix_mask(*prefix);
                u32::from(ip) & mask == addr & mask
            }
            Target::Name { name, suffix } => names.names_of(ip).any(|n| {
                n == name
                    || (*suffix
                        && n.len() > name.len()
                        && n.ends_with(name.as_str())
                        && n.as_bytes()[n.len() - name.len() - 1] == b'.')
            }),
        }
    }
}

/// The netmask of a prefix length (0 to 32), e.g. 24 -> 0xffff_ff00.
pub fn prefix_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// `a.b.c.d` or `a.b.c.d/len`; None when `text` does not look like one.
fn parse_net(text: &str) -> Option<Result<(u32, u8), String>> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix = match len {
        None => 32,
        Some(l) => match l.parse::<u8>() {
            Ok(p) if p <= 32 => p,
            _ => return Some(Err(format!("prefix length {l:?} is not 0 to 32"))),
        },
    };
    Some(Ok((u32::from(addr) & prefix_mask(prefix), prefix)))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && name.bytes().any(|b| !b.is_ascii_digit() && b != b'.')
}

/// The egress policy of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub default_allow: bool,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

impl Default for EgressPolicy {
    /// Everything but the host's loopback.
    fn default() -> Self {
        EgressPolicy {
            default_allow: true,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl EgressPolicy {
    /// Whether the guest may reach `ip:port` (`ip` as the guest sees it:
    /// 10.0.2.2 is the host's loopback). `host_own` says `ip` is one of the
    /// host's own addresses, which is treated like its loopback.
    pub fn allows(&self, ip: Ipv4Addr, port: u16, host_own: bool, names: &LearnedNames) -> bool {
        if self.deny.iter().any(|r| r.matches(ip, port, names)) {
            return false;
        }
        if ip == GATEWAY || host_own {
            let gw_allowed = self
                .allow
                .iter()
                .any(|r| r.is_gateway_rule() && r.port.is_none_or(|p| p == port));
            return gw_allowed
                && (ip == GATEWAY || self.allow.iter().any(|r| r.matches(ip, port, names)));
        }
        self.default_allow || self.allow.iter().any(|r| r.matches(ip, port, names))
    }

    /// Whether any rule names a host, so DNS answers are worth reading.
    pub fn has_name_rules(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|r| matches!(r.target, Target::Name { .. }))
    }
}

/// Addresses the DNS forwarder saw in answers, with the names asked for.
#[derive(Debug, Default)]
pub struct LearnedNames {
    by_addr: HashMap<Ipv4Addr, Vec<String>>,
    order: VecDeque<(Ipv4Addr, String)>,
}

impl LearnedNames {
    pub fn learn(&mut self, name: &str, addr: Ipv4Addr) {
        let name = name.to_ascii_lowercase();
        let list = self.by_addr.entry(addr).or_default();
        if list.contains(&name) {
            return;
        }
        list.push(name.clone());
        self.order.push_back((addr, name));
        while self.order.len() > MAX_LEARNED_NAMES {
            let Some((a, n)) = self.order.pop_front() else {
                break;
            };
            if let Some(list) = self.by_addr.get_mut(&a) {
                list.retain(|x| *x != n);
                if list.is_empty() {
                    self.by_addr.remove(&a);
                }
            }
        }
    }

    fn names_of(&self, addr: Ipv4Addr) -> impl Iterator<Item = &String> {
        self.by_addr.get(&addr).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default_allow: bool, allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy {
            default_allow,
            allow: allow.iter().map(|r| Rule::parse(r).unwrap()).collect(),
            deny: deny.iter().map(|r| Rule::parse(r).unwrap()).collect(),
        }
    }

    #[test]
    fn rules_parse_and_bad_ones_say_why() {
        assert!(Rule::parse("10.0.0.0/8").is_ok());
        assert!(Rule::parse("1.2.3.4:443").is_ok());
        assert!(Rule::parse("example.com:80").is_ok());
        assert!(Rule::parse("*.Example.com").is_ok());
        for bad in [
            "",
            "1.2.3.4/33",
            "a..b",
            "x:0",
            "x:70000",
            "x y",
            "1.2.3.4:",
            "*.",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Rule::parse("1.2.3.4/40").unwrap_err().contains("prefix"));
    }

    #[test]
    fn deny_beats_allow_beats_default_and_loopback_needs_its_own_rule() {
        let names = LearnedNames::default();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let p = policy(true, &[], &["192.168.0.0/16", "8.8.8.8:53"]);
        assert!(p.allows(ip("1.1.1.1"), 80, false, &names));
        assert!(!p.allows(ip("192.168.3.4"), 80, false, &names));
        assert!(!p.allows(ip("8.8.8.8"), 53, false, &names));
        assert!(p.allows(ip("8.8.8.8"), 443, false, &names));
        assert!(!p.allows(GATEWAY, 80, false, &names), "default allow");
        assert!(!p.allows(ip("172.17.0.1"), 80, true, &names), "host's own");

        let p = policy(false, &["0.0.0.0/0", "10.0.2.2:8000"], &[]);
        assert!(p.allows(ip("9.9.9.9"), 1, false, &names));
        assert!(p.allows(GATEWAY, 8000, false, &names));
        assert!(!p.allows(GATEWAY, 8001, false, &names), "wide range");
        let p = policy(false, &["1.2.3.0/24:443"], &[]);
        assert!(p.allows(ip("1.2.3.9"), 443, false, &names));
        assert!(!p.allows(ip("1.2.3.9"), 80, false, &names));
        assert!(!p.allows(ip("1.2.4.9"), 443, false, &names));
    }

    #[test]
    fn name_rules_match_learned_addresses() {
        let mut names = LearnedNames::default();
        let p = policy(
            false,
            &["pypi.org:443", "*.example.com"],
            &["bad.example.com"],
        );
        let a = Ipv4Addr::new(151, 101, 0, 223);
        assert!(!p.allows(a, 443, false, &names), "not resolved yet");
        names.learn("PyPI.org", a);
        assert!(p.allows(a, 443, false, &names));
        assert!(!p.allows(a, 80, false, &names));
        let b = Ipv4Addr::new(93, 184, 216, 34);
        names.learn("www.example.com", b);
        assert!(p.allows(b, 80, false, &names));
        names.learn("bad.example.com", b);
        assert!(!p.allows(b, 80, false, &names), "deny wins");
        let c = Ipv4Addr::new(5, 5, 5, 5);
        names.learn("notexample.com", c);
        assert!(!p.allows(c, 80, false, &names));
        for i in 0..MAX_LEARNED_NAMES as u32 + 10 {
            names.learn(&format!("n{i}.test"), Ipv4Addr::from(i));
        }
        assert_eq!(names.order.len(), MAX_LEARNED_NAMES);
        assert!(!p.allows(a, 443, false, &names), "forgotten, oldest first");
    }
}
