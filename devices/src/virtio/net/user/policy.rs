//! The egress policy of the user-mode network: which destinations a guest
//! may open connections to or send datagrams to.
//!
//! A rule is `"CIDR"`, `"CIDR:PORT"`, `"NAME"` or `"NAME:PORT"`. Deny rules
//! win over allow rules, allow rules over the default. A name rule matches
//! the addresses the VM's own DNS forwarder resolved for that name (or, for
//! `*.example.com`, for any name below it). `10.0.2.2` stands for the
//! host's loopback, which only a rule naming `10.0.2.2` itself can open:
//! neither the default nor a wider range such as `0.0.0.0/0` reaches it.
//!
//! Under every policy sits a floor ([`FLOOR`]): link-local addresses
//! (169.254/16, where clouds serve instance metadata and credentials) open
//! only to an allow rule naming the exact address, and private networks
//! (10/8, 172.16/12, 192.168/16, 100.64/10) only to an allow rule inside
//! that network. Neither the default, nor a wider range such as
//! `0.0.0.0/0`, nor a name rule (a public name may resolve to a private
//! address: DNS rebinding) reaches them. Learned names expire with their
//! DNS TTL, kept between [`MIN_NAME_TTL`] and [`MAX_NAME_TTL`].

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The gateway address, standing for the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// At most this many (address, name) pairs are remembered per VM; older
/// ones are forgotten first.
pub const MAX_LEARNED_NAMES: usize = 4096;
/// A learned name is kept at least this long, whatever its TTL (the guest
/// connects right after it resolved, and some answers carry TTL 0).
pub const MIN_NAME_TTL: Duration = Duration::from_secs(30);
/// A learned name is forgotten after this long at most.
pub const MAX_NAME_TTL: Duration = Duration::from_secs(3600);

/// Networks no policy reaches unless an allow rule names an address or
/// range inside them: (network, prefix length, rule prefix needed).
/// Link-local needs the exact address (/32).
pub const FLOOR: [(Ipv4Addr, u8, u8); 5] = [
    (Ipv4Addr::new(169, 254, 0, 0), 16, 32),
    (Ipv4Addr::new(10, 0, 0, 0), 8, 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12, 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16, 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10, 10),
];

/// The rule prefix an allow rule needs to open `ip`, when `ip` is in the
/// floor.
fn floor_prefix(ip: Ipv4Addr) -> Option<u8> {
    FLOOR.iter().find_map(|&(net, len, needed)| {
        let mask = prefix_mask(len);
        (u32::from(ip) & mask == u32::from(net)).then_some(needed)
    })
}

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

    /// Whether this rule is an address or range of at least `prefix` bits
    /// that holds `ip:port` (what opens an address of the floor).
    fn names_exactly(&self, ip: Ipv4Addr, port: u16, prefix: u8) -> bool {
        matches!(self.target, Target::Net { prefix: p, .. } if p >= prefix)
            && self.matches(ip, port, &LearnedNames::default())
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
    /// Everything but the host (its loopback and own addresses) and the
    /// floor (link-local and private networks).
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
                && (ip == GATEWAY || self.allow.iter().any(|r| r.names_exactly(ip, port, 0)));
        }
        if let Some(prefix) = floor_prefix(ip) {
            return self.allow.iter().any(|r| r.names_exactly(ip, port, prefix));
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

/// One VM's egress policy, shared between its network (which reads it)
/// and its controller (which may replace it while the VM runs). A new
/// policy applies to connections and flows that start after it;
/// connections already open stay open.
#[derive(Debug, Clone, Default)]
pub struct SharedPolicy(Arc<Mutex<EgressPolicy>>);

impl SharedPolicy {
    pub fn new(policy: EgressPolicy) -> SharedPolicy {
        SharedPolicy(Arc::new(Mutex::new(policy)))
    }

    pub fn set(&self, policy: EgressPolicy) {
        *self.get() = policy;
    }

    pub fn get(&self) -> MutexGuard<'_, EgressPolicy> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Addresses the DNS forwarder saw in answers, with the names asked for
/// and when each pair expires.
#[derive(Debug, Default)]
pub struct LearnedNames {
    by_addr: HashMap<Ipv4Addr, Vec<(String, Instant)>>,
    order: VecDeque<(Ipv4Addr, String)>,
}

impl LearnedNames {
    /// Remembers that `name` resolved to `addr`, for `ttl` (kept between
    /// [`MIN_NAME_TTL`] and [`MAX_NAME_TTL`]).
    pub fn learn(&mut self, name: &str, addr: Ipv4Addr, ttl: Duration) {
        let expires = Instant::now() + ttl.clamp(MIN_NAME_TTL, MAX_NAME_TTL);
        self.learn_until(name, addr, expires);
    }

    fn learn_until(&mut self, name: &str, addr: Ipv4Addr, expires: Instant) {
        let name = name.to_ascii_lowercase();
        let list = self.by_addr.entry(addr).or_default();
        if let Some(known) = list.iter_mut().find(|(n, _)| *n == name) {
            known.1 = known.1.max(expires);
            return;
        }
        list.push((name.clone(), expires));
        self.order.push_back((addr, name));
        while self.order.len() > MAX_LEARNED_NAMES {
            let Some((a, n)) = self.order.pop_front() else {
                break;
            };
            if let Some(list) = self.by_addr.get_mut(&a) {
                list.retain(|(x, _)| *x != n);
                if list.is_empty() {
                    self.by_addr.remove(&a);
                }
            }
        }
    }

    /// (address, name) pairs remembered, expired ones included.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The names `addr` currently stands for (expired ones left out).
    fn names_of(&self, addr: Ipv4Addr) -> impl Iterator<Item = &String> {
        let now = Instant::now();
        self.by_addr
            .get(&addr)
            .into_iter()
            .flatten()
            .filter(move |(_, expires)| *expires > now)
            .map(|(n, _)| n)
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
        names.learn("PyPI.org", a, Duration::ZERO);
        assert!(p.allows(a, 443, false, &names));
        assert!(!p.allows(a, 80, false, &names));
        let b = Ipv4Addr::new(93, 184, 216, 34);
        names.learn("www.example.com", b, Duration::from_secs(60));
        assert!(p.allows(b, 80, false, &names));
        names.learn("bad.example.com", b, Duration::from_secs(60));
        assert!(!p.allows(b, 80, false, &names), "deny wins");
        let c = Ipv4Addr::new(5, 5, 5, 5);
        names.learn("notexample.com", c, Duration::from_secs(60));
        assert!(!p.allows(c, 80, false, &names));
        for i in 0..MAX_LEARNED_NAMES as u32 + 10 {
            names.learn(&format!("n{i}.test"), Ipv4Addr::from(i), Duration::ZERO);
        }
        assert_eq!(names.order.len(), MAX_LEARNED_NAMES);
        assert!(!p.allows(a, 443, false, &names), "forgotten, oldest first");
    }

    #[test]
    fn learned_names_expire() {
        let mut names = LearnedNames::default();
        let p = policy(false, &["pypi.org"], &[]);
        let a = Ipv4Addr::new(151, 101, 0, 223);
        names.learn_until("pypi.org", a, Instant::now() - Duration::from_secs(1));
        assert!(!p.allows(a, 443, false, &names), "expired");
        names.learn("pypi.org", a, Duration::from_secs(5));
        assert!(p.allows(a, 443, false, &names), "learned again");
    }

    #[test]
    fn the_floor_holds_under_every_policy() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let mut names = LearnedNames::default();
        let floor = [
            "169.254.169.254",
            "169.254.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
        ];
        // A public name that resolves into the floor (DNS rebinding).
        for f in floor {
            names.learn("evil.example.com", ip(f), Duration::from_secs(60));
        }
        for p in [
            EgressPolicy::default(),
            policy(
                true,
                &["0.0.0.0/0", "evil.example.com", "*.example.com"],
                &[],
            ),
            policy(false, &["0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1"], &[]),
            policy(
                false,
                &["evil.example.com:80", "169.254.0.0/16", "100.0.0.0/8"],
                &[],
            ),
        ] {
            for f in floor {
                assert!(!p.allows(ip(f), 80, false, &names), "{f} under {p:?}");
            }
        }
        // Just outside the floor, the default still allows.
        for outside in ["172.32.0.1", "100.128.0.1", "169.255.0.1", "11.0.0.1"] {
            assert!(EgressPolicy::default().allows(ip(outside), 80, false, &names));
        }
        // Only a rule inside the network opens it; link-local needs /32.
        let p = policy(
            true,
            &["169.254.169.254:80", "10.0.0.0/8:5432", "192.168.1.0/24"],
            &[],
        );
        assert!(p.allows(ip("169.254.169.254"), 80, false, &names));
        assert!(!p.allows(ip("169.254.169.254"), 443, false, &names));
        assert!(!p.allows(ip("169.254.169.253"), 80, false, &names));
        assert!(p.allows(ip("10.9.9.9"), 5432, false, &names));
        assert!(!p.allows(ip("10.9.9.9"), 5433, false, &names));
        assert!(p.allows(ip("192.168.1.7"), 22, false, &names));
        assert!(!p.allows(ip("192.168.2.7"), 22, false, &names));
        // Deny still beats such a rule.
        let p = policy(true, &["10.0.0.0/8"], &["10.0.0.5"]);
        assert!(!p.allows(ip("10.0.0.5"), 80, false, &names));
        // The host's own addresses open only to an address rule.
        names.learn("me.example.com", ip("203.0.113.9"), Duration::from_secs(60));
        let p = policy(false, &["10.0.2.2", "me.example.com"], &[]);
        assert!(!p.allows(ip("203.0.113.9"), 80, true, &names));
        let p = policy(false, &["10.0.2.2", "203.0.113.9"], &[]);
        assert!(p.allows(ip("203.0.113.9"), 80, true, &names));
    }
}
