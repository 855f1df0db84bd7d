//! The user-mode network: a TCP/IP stack (smoltcp) inside the VMM that
//! terminates the guest's TCP connections and UDP flows and opens them
//! again from ordinary host sockets (NAT). No root, no TAP, nothing on the
//! host changes.
//!
//! Addresses are qemu's: the guest is 10.0.2.15/24 (handed out by DHCP),
//! 10.0.2.2 is the gateway and stands for the host's loopback, 10.0.2.3 is
//! the DNS forwarder (it relays to the host's resolvers, or to the ones the
//! config names). Every new TCP connection and UDP flow passes the
//! [`policy::EgressPolicy`]; a refused one is answered at once (TCP reset,
//! ICMP "prohibited") and logged with its destination.
//!
//! A guest TCP connection is only accepted (SYN-ACK) once the host
//! connection to its destination is up; until then its SYN is held. Flow
//! control is end to end: smoltcp's socket buffers are the only buffers,
//! and data is read from a host socket only while its buffer has room.
//!
//! Limits per VM (hostile guests): [`MAX_TCP_FLOWS`] TCP connections
//! (connecting ones included; more are reset), [`MAX_UDP_FLOWS`] UDP flows
//! (the least recently used is closed for a new one), [`TCP_BUFFER`] bytes
//! of buffer each way per TCP connection, [`TO_GUEST_BYTES`] of frames
//! waiting for the guest's receive buffers (datagrams past it are dropped),
//! [`policy::MAX_LEARNED_NAMES`] remembered DNS answers.
//!
//! Everything runs on the VMM's event-loop thread: the host sockets and a
//! timer for the stack sit in one epoll instance whose descriptor is the
//! backend's [`NetBackend::fd`].

pub mod policy;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket,
};
use vmm_os::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_os::timerfd::TimerFd;

use super::NetBackend;
use policy::{EgressPolicy, LearnedNames, SharedPolicy};

pub use policy::GATEWAY;
/// The DNS forwarder's address.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address (its only DHCP lease).
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The guest link's MTU: the link is virtual, so frames as large as IPv4
/// allows save the guest per-packet work.
pub const MTU: u16 = 65520;
/// TCP connections per VM.
pub const MAX_TCP_FLOWS: usize = 256;
/// UDP flows (guest port, destination) per VM.
pub const MAX_UDP_FLOWS: usize = 128;
/// Buffer per TCP connection and direction.
pub const TCP_BUFFER: usize = 256 * 1024;
/// Frames waiting for the guest's receive buffers, in bytes.
pub const TO_GUEST_BYTES: usize = 4 << 20;
/// How long the list of the host's own addresses is trusted before it is
/// read again (on the next new flow).
const HOST_ADDRS_TTL: Duration = Duration::from_secs(2);
/// Frames from the guest waiting for smoltcp (ARP, ICMP, DHCP, DNS), at most.
const MAX_FROM_GUEST: usize = 256;
/// A UDP flow nothing went through for this long is closed (DNS: 10 s).
const UDP_IDLE: Duration = Duration::from_secs(60);
const DNS_IDLE: Duration = Duration::from_secs(10);
/// The gateway's (and DNS forwarder's) MAC address.
const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
const LEASE_SECS: u32 = 86400;
/// How often idle UDP flows are looked for.
const SWEEP: Duration = Duration::from_secs(5);

/// Errors setting the user-mode network up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("port forward: cannot listen on {addr}: {source} (is the port in use? pick another \"host\" port)")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("user-mode network: cannot create its {what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

/// A host port whose connections are carried to a guest port: its
/// listener (from [`listen`]) and the guest port.
#[derive(Debug)]
pub struct PortForward {
    pub listener: TcpListener,
    pub guest_port: u16,
}

/// A listener for a port forward on `bind`.
pub fn listen(bind: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(bind).map_err(|source| Error::Listen { addr: bind, source })
}

/// What one VM's user-mode network is allowed and told.
#[derive(Debug, Default)]
pub struct UserNetConfig {
    pub guest_mac: [u8; 6],
    pub policy: EgressPolicy,
    /// Where DNS queries go; the first one is used.
    pub dns: Vec<SocketAddr>,
    pub port_forwards: Vec<PortForward>,
}

/// The IPv4 name servers of the host's /etc/resolv.conf (read, never
/// changed).
pub fn host_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|a| SocketAddr::V4(SocketAddrV4::new(a, 53)))
        .collect()
}

/// The host's own IPv4 addresses (reaching them is like reaching its
/// loopback).
fn host_addresses() -> Vec<Ipv4Addr> {
    // fib_trie lists local addresses as "/32 host LOCAL" (through
    // /proc/self: a jail's /proc has nothing but its processes).
    let text = std::fs::read_to_string("/proc/self/net/fib_trie").unwrap_or_default();
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim().trim_start_matches(['|', '-', '+', ' ']);
        if let Some(a) = t.split_whitespace().next().and_then(|a| a.parse().ok()) {
            last = Some(a);
        } else if t.contains("/32 host LOCAL") {
            if let Some(a) = last {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
    }
    out
}

/// smoltcp's side of the link: frames from the guest wait in `from_guest`,
/// frames for the guest in `to_guest`.
#[derive(Default)]
struct Frames {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    to_guest_bytes: usize,
    /// A smaller cap than [`TO_GUEST_BYTES`] under a receive rate limit
    /// ([`NetBackend::pace`]).
    paced_cap: Option<usize>,
    /// Frames dropped because `to_guest` was full.
    dropped: u64,
}

impl Frames {
    fn room(&self) -> bool {
        self.to_guest_bytes < self.paced_cap.unwrap_or(TO_GUEST_BYTES)
    }

    /// The one way into `to_guest`: past [`TO_GUEST_BYTES`] the frame is
    /// dropped (a guest that posts no receive buffers loses frames, the
    /// VMM does not grow).
    fn push(&mut self, frame: Vec<u8>) {
        if !self.room() {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::debug!(
                    "network: {TO_GUEST_BYTES} bytes wait for the guest; {} frames dropped so far",
                    self.dropped
                );
            }
            return;
        }
        self.to_guest_bytes += frame.len();
        self.to_guest.push_back(frame);
    }

    /// A frame from the guest for smoltcp; dropped when smoltcp is already
    /// [`MAX_FROM_GUEST`] frames behind.
    fn push_from_guest(&mut self, frame: &[u8]) {
        if self.from_guest.len() < MAX_FROM_GUEST {
            self.from_guest.push_back(frame.to_vec());
        }
    }
}

struct RxFrame(Vec<u8>);
struct TxFrame<'a>(&'a mut Frames);

impl phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxFrame<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // smoltcp always gets a buffer to write into (`len` is at most the
        // link's MTU); the frame is then queued under the same cap as
        // every other, so replies to the guest's own packets (echo
        // replies, resets, ARP) cannot grow the queue either.
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl phy::Device for Frames {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxFrame<'a>;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.from_guest.pop_front()?;
        Some((RxFrame(frame), TxFrame(self)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        self.room().then_some(TxFrame(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(MTU) + 14;
        // The guest is the only sender on this link: its checksums are not
        // worth checking (with checksum offload it leaves them partial);
        // ours are always filled in.
        let mut sums = ChecksumCapabilities::default();
        sums.ipv4 = Checksum::Tx;
        sums.tcp = Checksum::Tx;
        sums.udp = Checksum::Tx;
        sums.icmpv4 = Checksum::Tx;
        caps.checksum = sums;
        caps
    }
}

/// (guest port, destination as the guest sees it, destination port).
type FlowKey = (u16, Ipv4Addr, u16);

enum TcpState {
    /// The host connection is being opened; the guest's SYN waits (`ack`
    /// is what a reset for it acknowledges).
    Connecting {
        syn: Vec<u8>,
        ack: TcpSeqNumber,
    },
    Open(SocketHandle),
}

struct TcpFlow {
    stream: TcpStream,
    state: TcpState,
    key: Option<FlowKey>,
    /// Readiness of the host socket as last reported (edge-triggered).
    readable: bool,
    writable: bool,
    host_eof: bool,
    shut_write: bool,
}

struct UdpFlow {
    sock: UdpSocket,
    key: FlowKey,
    last: Instant,
}

impl UdpFlow {
    fn is_dns(&self) -> bool {
        self.key.1 == DNS
    }
}

const KIND_MISC: u64 = 0;
const KIND_TCP: u64 = 1;
const KIND_UDP: u64 = 2;
const TIMER_TOKEN: u64 = KIND_MISC;

/// Why a destination is not reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Policy,
    Unroutable,
}

/// The user-mode network of one VM; a [`NetBackend`].
pub struct UserNet {
    epoll: Epoll,
    timer: TimerFd,
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    tcp: HashMap<u64, TcpFlow>,
    tcp_keys: HashMap<FlowKey, u64>,
    udp: HashMap<u64, UdpFlow>,
    udp_keys: HashMap<FlowKey, u64>,
    listeners: Vec<(TcpListener, u16)>,
    policy: SharedPolicy,
    names: LearnedNames,
    dns: Option<SocketAddr>,
    guest_mac: EthernetAddress,
    /// The host's own addresses, and when they were read.
    host_addrs: (Vec<Ipv4Addr>, Instant),
    next_id: u64,
    next_port: u16,
    start: Instant,
    last_sweep: Instant,
    /// Policy refusals so far.
    refused: u64,
}

fn setup<T>(what: &'static str, r: io::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Setup { what, source })
}

impl UserNet {
    pub fn new(config: UserNetConfig) -> Result<UserNet, Error> {
        let epoll = setup("epoll instance", Epoll::new())?;
        let timer = setup("timer", vmm_os::timerfd::nonblocking())?;
        setup(
            "timer",
            epoll.ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TIMER_TOKEN),
            ),
        )?;
        let mut listeners = Vec::new();
        for (i, f) in config.port_forwards.into_iter().enumerate() {
            let listener = f.listener;
            setup("port forward", listener.set_nonblocking(true))?;
            setup(
                "port forward",
                epoll.ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, ((i as u64 + 1) << 2) | KIND_MISC),
                ),
            )?;
            listeners.push((listener, f.guest_port));
        }
        let mut frames = Frames::default();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(GATEWAY_MAC));
        iface_config.random_seed = random_seed();
        let now = smoltcp::time::Instant::from_micros(0);
        let mut iface = Interface::new(iface_config, &mut frames, now);
        iface.update_ip_addrs(|addrs| {
            for a in [GATEWAY, DNS] {
                // Two addresses fit smoltcp's default table.
                let _ = addrs.push(IpCidr::new(a.into(), 24));
            }
        });
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        iface.set_any_ip(true);
        Ok(UserNet {
            epoll,
            timer,
            iface,
            sockets: SocketSet::new(Vec::new()),
            frames,
            tcp: HashMap::new(),
            tcp_keys: HashMap::new(),
            udp: HashMap::new(),
            udp_keys: HashMap::new(),
            listeners,
            policy: SharedPolicy::new(config.policy),
            names: LearnedNames::default(),
            dns: config.dns.first().copied(),
            guest_mac: EthernetAddress(config.guest_mac),
            host_addrs: (host_addresses(), Instant::now()),
            next_id: 1,
            next_port: 49152,
            start: Instant::now(),
            last_sweep: Instant::now(),
            refused: 0,
        })
    }

    /// The VM's egress policy, to change while it runs.
    pub fn policy(&self) -> SharedPolicy {
        self.policy.clone()
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn token(&mut self, kind: u64) -> u64 {
        self.next_id += 1;
        (self.next_id << 2) | kind
    }

    fn watch(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events | EventSet::EDGE_TRIGGERED, token),
        )
    }

    /// Logs a refusal: policy refusals at warn (the first 100, then every
    /// 1000th, so a guest cannot flood the log).
    fn refuse(&mut self, proto: &str, dst: Ipv4Addr, port: u16, why: Refusal) {
        match why {
            Refusal::Policy => {
                self.refused += 1;
                let n = self.refused;
                if n <= 100 || n.is_multiple_of(1000) {
                    tracing::warn!(
                        "network: egress policy refused {proto} to {dst}:{port} ({n} refused so far)"
                    );
                }
            }
            Refusal::Unroutable => {
                tracing::debug!("network: {proto} to {dst}:{port} is not routable")
            }
        }
    }

    /// Where the guest's `dst:port` is on the host, or why it is refused.
    fn host_target(&mut self, dst: Ipv4Addr, port: u16) -> Result<SocketAddr, Refusal> {
        if dst == DNS {
            return match self.dns {
                Some(addr) if port == 53 => Ok(addr),
                _ => Err(Refusal::Unroutable),
            };
        }
        let o = dst.octets();
        let local_net = o[..3] == [10, 0, 2];
        if (local_net && dst != GATEWAY)
            || o[0] == 0
            || dst.is_loopback()
            || dst.is_multicast()
            || dst.is_broadcast()
            || port == 0
        {
            return Err(Refusal::Unroutable);
        }
        // The host's addresses change (DHCP, VPNs, containers): read again
        // when the list is older than HOST_ADDRS_TTL.
        if self.host_addrs.1.elapsed() > HOST_ADDRS_TTL {
            self.host_addrs = (host_addresses(), Instant::now());
        }
        let host_own = self.host_addrs.0.contains(&dst);
        if !self.policy.get().allows(dst, port, host_own, &self.names) {
            return Err(Refusal::Policy);
        }
        let host = if dst == GATEWAY {
            Ipv4Addr::LOCALHOST
        } else {
            dst
        };
        Ok(SocketAddr::V4(SocketAddrV4::new(host, port)))
    }

    /// One frame from the guest.
    fn guest_frame(&mut self, frame: &[u8]) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        // The guest's interface may change its address (a restored or
        // forked VM takes a new one): the frames made here follow it.
        if eth.src_addr().is_unicast() {
            self.guest_mac = eth.src_addr();
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                // Only the gateway and the DNS forwarder answer ARP (any_ip
                // would otherwise claim every address, the guest's too).
                let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
                    return;
                };
                if let Ok(ArpRepr::EthernetIpv4 {
                    operation,
                    target_protocol_addr,
                    ..
                }) = ArpRepr::parse(&arp)
                {
                    if operation != ArpOperation::Request
                        || [GATEWAY, DNS].contains(&target_protocol_addr)
                    {
                        self.frames.push_from_guest(frame);
                    }
                }
            }
            EthernetProtocol::Ipv4 => self.ipv4_from_guest(frame, eth.payload()),
            _ => {}
        }
    }

    fn ipv4_from_guest(&mut self, frame: &[u8], packet: &[u8]) {
        let Ok(packet) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        let Ok(ip) = Ipv4Repr::parse(&packet, &ChecksumCapabilities::ignored()) else {
            return;
        };
        let payload = packet.payload();
        match ip.next_header {
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(payload) else {
                    return;
                };
                if udp.dst_port() == 67 && udp.src_port() == 68 {
                    if let Some(reply) = wire::dhcp_reply(GATEWAY_MAC, udp.payload(), LEASE_SECS) {
                        self.frames.push(reply);
                    }
                } else if ip.src_addr == GUEST {
                    self.udp_from_guest(&ip, payload, &udp);
                }
            }
            IpProtocol::Tcp if ip.src_addr == GUEST => {
                let Ok(tcp) = TcpPacket::new_checked(payload) else {
                    return;
                };
                if tcp.syn() && !tcp.ack() {
                    let Ok(repr) = TcpRepr::parse(
                        &tcp,
                        &ip.src_addr.into(),
                        &ip.dst_addr.into(),
                        &ChecksumCapabilities::ignored(),
                    ) else {
                        return;
                    };
                    self.tcp_syn(frame, &ip, &repr);
                } else {
                    self.frames.push_from_guest(frame);
                }
            }
            IpProtocol::Icmp if ip.src_addr == GUEST && [GATEWAY, DNS].contains(&ip.dst_addr) => {
                // Pings to the gateway and the forwarder are answered.
                self.frames.push_from_guest(frame);
            }
            _ => {}
        }
    }

    fn tcp_syn(&mut self, frame: &[u8], ip: &Ipv4Repr, tcp: &TcpRepr) {
        let key = (tcp.src_port, ip.dst_addr, tcp.dst_port);
        if let Some(flow) = self.tcp_keys.get(&key).and_then(|id| self.tcp.get(id)) {
            if matches!(flow.state, TcpState::Open(_)) {
                // A repeated SYN of a flow smoltcp already has.
                self.frames.push_from_guest(frame);
            }
            return;
        }
        let ack = tcp.seq_number + tcp.segment_len();
        let reset = |net: &mut Self| net.reset_guest(key, ack);
        let target = match self.host_target(ip.dst_addr, tcp.dst_port) {
            Ok(t) => t,
            Err(why) => {
                self.refuse("tcp", ip.dst_addr, tcp.dst_port, why);
                return reset(self);
            }
        };
        if self.tcp.len() >= MAX_TCP_FLOWS {
            tracing::debug!("network: {MAX_TCP_FLOWS} TCP connections open; a new one is reset");
            return reset(self);
        }
        let Ok(stream) = connect_nonblocking(target) else {
            return reset(self);
        };
        let state = TcpState::Connecting {
            syn: frame.to_vec(),
            ack,
        };
        if !self.add_tcp(stream, state, Some(key)) {
            reset(self);
        }
    }

    /// Watches `stream` and keeps it as a TCP flow; false when it cannot
    /// be watched (the flow is dropped).
    fn add_tcp(&mut self, stream: TcpStream, state: TcpState, key: Option<FlowKey>) -> bool {
        let id = self.token(KIND_TCP);
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP;
        if self.watch(stream.as_raw_fd(), events, id).is_err() {
            if let TcpState::Open(h) = state {
                self.sockets.remove(h);
            }
            return false;
        }
        if let Some(key) = key {
            self.tcp_keys.insert(key, id);
        }
        // Ready until a read or write says otherwise.
        let flow = TcpFlow {
            stream,
            state,
            key,
            readable: true,
            writable: true,
            host_eof: false,
            shut_write: false,
        };
        self.tcp.insert(id, flow);
        true
    }

    /// The host connection of a held SYN finished: on success the guest's
    /// SYN goes to a socket listening just for it, else the guest gets a
    /// reset.
    fn connected(&mut self, id: u64) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let (TcpState::Connecting { syn, ack }, Some(key)) = (&mut flow.state, flow.key) else {
            return;
        };
        let (syn, ack, (_, dst, port)) = (std::mem::take(syn), *ack, key);
        let failed =
            !matches!(flow.stream.take_error(), Ok(None)) || flow.stream.peer_addr().is_err();
        if failed {
            self.remove_tcp(id);
            self.reset_guest(key, ack);
            return;
        }
        let mut socket = new_tcp_socket();
        if socket
            .listen(IpListenEndpoint {
                addr: Some(dst.into()),
                port,
            })
            .is_err()
        {
            self.remove_tcp(id);
            return;
        }
        let handle = self.sockets.add(socket);
        if let Some(flow) = self.tcp.get_mut(&id) {
            flow.state = TcpState::Open(handle);
        }
        // Only this socket listens now, so the SYN is surely its own.
        self.frames.from_guest.push_front(syn);
        let now = self.now();
        self.iface.poll(now, &mut self.frames, &mut self.sockets);
    }

    /// Refuses the guest's connection `key` with a reset.
    fn reset_guest(&mut self, key: FlowKey, ack: TcpSeqNumber) {
        let rst = wire::tcp_reset(self.guest_mac, GATEWAY_MAC, key, ack);
        self.frames.push(rst);
    }

    fn remove_tcp(&mut self, id: u64) {
        if let Some(flow) = self.tcp.remove(&id) {
            if let Some(key) = flow.key {
                self.tcp_keys.remove(&key);
            }
            if let TcpState::Open(h) = flow.state {
                self.sockets.remove(h);
            }
            // Closing the stream takes it out of the epoll set.
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some((listener, guest_port)) = self.listeners.get(index) else {
                return;
            };
            let guest_port = *guest_port;
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("network: port forward accept failed: {e}");
                    return;
                }
            };
            if self.tcp.len() >= MAX_TCP_FLOWS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let mut socket = new_tcp_socket();
            self.next_port = self.next_port.checked_add(1).unwrap_or(49152);
            let local = IpListenEndpoint {
                addr: Some(GATEWAY.into()),
                port: self.next_port,
            };
            if socket
                .connect(self.iface.context(), (GUEST, guest_port), local)
                .is_err()
            {
                continue;
            }
            let handle = self.sockets.add(socket);
            self.add_tcp(stream, TcpState::Open(handle), None);
        }
    }

    /// A datagram (`datagram`: UDP header and data) from the guest.
    fn udp_from_guest(&mut self, ip: &Ipv4Repr, datagram: &[u8], udp: &UdpPacket<&[u8]>) {
        let (src_port, dst_port, data) = (udp.src_port(), udp.dst_port(), udp.payload());
        let key = (src_port, ip.dst_addr, dst_port);
        let id = match self.udp_keys.get(&key) {
            Some(id) => *id,
            None => {
                let target = match self.host_target(ip.dst_addr, dst_port) {
                    Ok(t) => t,
                    Err(why) => {
                        self.refuse("udp", ip.dst_addr, dst_port, why);
                        let icmp = wire::icmp_prohibited(self.guest_mac, GATEWAY_MAC, ip, datagram);
                        self.frames.push(icmp);
                        return;
                    }
                };
                match self.open_udp(key, target) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        if let Some(flow) = self.udp.get_mut(&id) {
            flow.last = Instant::now();
            if let Err(e) = flow.sock.send(data) {
                tracing::debug!("network: udp to {}:{} not sent: {e}", key.1, key.2);
            }
        }
    }

    fn open_udp(&mut self, key: FlowKey, target: SocketAddr) -> Option<u64> {
        if self.udp.len() >= MAX_UDP_FLOWS {
            let oldest = self
                .udp
                .iter()
                .min_by_key(|(_, f)| f.last)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.remove_udp(id);
            }
        }
        let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let sock = UdpSocket::bind(bind).ok()?;
        sock.connect(target).ok()?;
        sock.set_nonblocking(true).ok()?;
        let id = self.token(KIND_UDP);
        self.watch(sock.as_raw_fd(), EventSet::IN, id).ok()?;
        self.udp_keys.insert(key, id);
        self.udp.insert(
            id,
            UdpFlow {
                sock,
                key,
                last: Instant::now(),
            },
        );
        Some(id)
    }

    fn remove_udp(&mut self, id: u64) {
        if let Some(flow) = self.udp.remove(&id) {
            self.udp_keys.remove(&flow.key);
        }
    }

    /// Datagrams from the host for a UDP flow.
    fn udp_readable(&mut self, id: u64) {
        let mut buf = vec![0u8; 65536];
        loop {
            let Some(flow) = self.udp.get_mut(&id) else {
                return;
            };
            let n = match flow.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP error from the destination; the next datagram
                // may get through.
                Err(_) => continue,
            };
            flow.last = Instant::now();
            let (src_port, remote, remote_port) = flow.key;
            let dns = flow.is_dns();
            let data = &buf[..n.min(usize::from(MTU) - 28)];
            if dns && self.policy.get().has_name_rules() {
                if let Some(answer) = wire::dns_answers(data) {
                    for (a, ttl) in answer.addrs {
                        self.names
                            .learn(&answer.name, a, Duration::from_secs(ttl.into()));
                    }
                }
            }
            let frame = wire::udp_frame(
                self.guest_mac,
                GATEWAY_MAC,
                remote,
                remote_port,
                GUEST,
                src_port,
                data,
            );
            self.frames.push(frame);
        }
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        match token & 3 {
            KIND_MISC if token == TIMER_TOKEN => {
                let _ = self.timer.wait();
            }
            KIND_MISC => self.accept((token >> 2) as usize - 1),
            KIND_TCP => {
                let Some(flow) = self.tcp.get_mut(&token) else {
                    return;
                };
                let bad = EventSet::ERROR | EventSet::HANG_UP;
                if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | bad) {
                    flow.readable = true;
                }
                if events.intersects(EventSet::OUT | bad) {
                    flow.writable = true;
                }
                if matches!(flow.state, TcpState::Connecting { .. })
                    && events.intersects(EventSet::OUT | bad)
                {
                    self.connected(token);
                }
            }
            KIND_UDP => self.udp_readable(token),
            _ => {}
        }
    }

    /// Moves data between each open connection's host socket and its
    /// smoltcp socket; true when anything moved.
    fn service_tcp(&mut self) -> bool {
        let mut progress = false;
        let mut dead = Vec::new();
        for (id, flow) in self.tcp.iter_mut() {
            let TcpState::Open(handle) = flow.state else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            progress |= pump_tcp(flow, socket);
            if matches!(
                socket.state(),
                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
            ) {
                dead.push(*id);
            }
        }
        for id in dead {
            self.remove_tcp(id);
        }
        progress
    }

    fn sweep_udp(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < SWEEP {
            return;
        }
        self.last_sweep = now;
        let idle: Vec<u64> = self
            .udp
            .iter()
            .filter(|(_, f)| {
                now.duration_since(f.last) > if f.is_dns() { DNS_IDLE } else { UDP_IDLE }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.remove_udp(id);
        }
    }

    /// Handles whatever the host sockets and the timer reported, then runs
    /// the stack until nothing moves.
    fn pump(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            for ev in &events[..n] {
                self.host_event(ev.data(), ev.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        for _ in 0..16 {
            let mut progress = self.service_tcp();
            let now = self.now();
            progress |=
                self.iface.poll(now, &mut self.frames, &mut self.sockets) != PollResult::None;
            if !progress {
                break;
            }
        }
        self.sweep_udp();
        let now = self.now();
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(SWEEP)
            .clamp(Duration::from_micros(200), SWEEP);
        let _ = self.timer.reset(delay, None);
    }
}

/// Moves what each side can take; true when anything moved.
fn pump_tcp(flow: &mut TcpFlow, socket: &mut tcp::Socket) -> bool {
    let mut progress = false;
    // Guest -> host.
    while flow.writable && socket.can_recv() {
        let stream = &flow.stream;
        match socket.recv(|buf| match (&*stream).write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(_)) => progress = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.writable = false,
            Ok(Err(_)) => {
                socket.abort();
                return true;
            }
        }
    }
    let guest_closed = matches!(
        socket.state(),
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    );
    if guest_closed && !flow.shut_write && socket.recv_queue() == 0 {
        let _ = flow.stream.shutdown(Shutdown::Write);
        flow.shut_write = true;
        progress = true;
    }
    // Host -> guest.
    while flow.readable && !flow.host_eof && socket.can_send() {
        let stream = &flow.stream;
        match socket.send(|buf| match (&*stream).read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(0)) => {
                flow.host_eof = true;
                socket.close();
                progress = true;
            }
            Ok(Ok(_)) => progress = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                socket.abort();
                return true;
            }
            Err(_) => break,
        }
    }
    progress
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
    );
    socket.set_ack_delay(None);
    socket.set_nagle_enabled(false);
    socket
}

fn connect_nonblocking(target: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    u64::from_ne_bytes(seed)
}

impl NetBackend for UserNet {
    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.guest_frame(frame);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.frames.to_guest.is_empty() {
            self.pump();
        }
        while let Some(frame) = self.frames.to_guest.pop_front() {
            self.frames.to_guest_bytes -= frame.len();
            if frame.len() <= buf.len() {
                buf[..frame.len()].copy_from_slice(&frame);
                return Ok(Some(frame.len()));
            }
        }
        Ok(None)
    }

    fn poll(&mut self) {
        self.pump();
    }

    /// A quarter of a second of frames (a frame is let in whenever less
    /// waits, so one always can be): the stack's TCP retransmits when an
    /// answer takes much longer than the round trips it measured (0.7 s
    /// before the first), so a longer queue only makes it resend what
    /// still waits, which the limit then charges again (a 4 MiB queue at
    /// 256 KiB/s cut the goodput to a quarter).
    fn pace(&mut self, bytes_per_sec: u64) {
        let quarter = usize::try_from(bytes_per_sec / 4).unwrap_or(usize::MAX);
        self.frames.paced_cap = Some(quarter.clamp(1, TO_GUEST_BYTES));
    }

    fn mtu(&self) -> Option<u16> {
        Some(MTU)
    }

    fn checksum_offload(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetRepr, Icmpv4Packet, Icmpv4Repr, TcpControl, UdpRepr};

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x15];

    /// An IPv4 frame from the guest carrying `l4` (already emitted).
    fn from_guest(dst: Ipv4Addr, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
        let guest = EthernetAddress(GUEST_MAC);
        wire::ip_frame(GATEWAY_MAC, guest, GUEST, dst, proto, l4.len(), |p| {
            p.copy_from_slice(l4)
        })
    }

    fn syn(dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
        let repr = TcpRepr {
            src_port,
            dst_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 64240,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let mut l4 = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut l4[..]),
            &GUEST.into(),
            &dst.into(),
            &ChecksumCapabilities::default(),
        );
        from_guest(dst, IpProtocol::Tcp, &l4)
    }

    fn udp(dst: Ipv4Addr, src_port: u16, dst_port: u16, data: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8 + data.len()];
        UdpRepr { src_port, dst_port }.emit(
            &mut UdpPacket::new_unchecked(&mut l4[..]),
            &GUEST.into(),
            &dst.into(),
            data.len(),
            |d| d.copy_from_slice(data),
            &ChecksumCapabilities::default(),
        );
        from_guest(dst, IpProtocol::Udp, &l4)
    }

    fn drain(net: &mut UserNet) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        let mut out = Vec::new();
        while let Some(n) = net.recv(&mut buf).unwrap() {
            out.push(buf[..n].to_vec());
        }
        out
    }

    fn tcp_flags(frame: &[u8]) -> Option<(bool, bool)> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some((tcp.rst(), tcp.syn()))
    }

    fn net(policy: EgressPolicy, dns: Vec<SocketAddr>) -> UserNet {
        UserNet::new(UserNetConfig {
            guest_mac: GUEST_MAC,
            policy,
            dns,
            port_forwards: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn the_hosts_own_addresses_are_known() {
        let own = host_addresses();
        assert!(own.contains(&Ipv4Addr::LOCALHOST), "{own:?}");
    }

    #[test]
    fn the_hosts_addresses_are_read_again_when_old() {
        let Some(own) = host_addresses().into_iter().find(|a| !a.is_loopback()) else {
            eprintln!("skipped: this host has no IPv4 address but loopback");
            return;
        };
        // Allowed by an exact rule, but no rule for 10.0.2.2: once known as
        // the host's own, the address is refused. Nothing is sent.
        let policy = EgressPolicy {
            default_allow: true,
            allow: vec![policy::Rule::parse(&own.to_string()).unwrap()],
            deny: Vec::new(),
        };
        let mut net = net(policy, Vec::new());
        assert_eq!(net.host_target(own, 80), Err(Refusal::Policy));
        net.host_addrs = (Vec::new(), Instant::now());
        assert!(
            net.host_target(own, 80).is_ok(),
            "a fresh (empty) list is trusted"
        );
        net.host_addrs.1 -= HOST_ADDRS_TTL * 2;
        assert_eq!(net.host_target(own, 80), Err(Refusal::Policy), "read again");
    }

    #[test]
    fn a_policy_changed_while_running_applies_to_new_connections() {
        let mut net = net(EgressPolicy::default(), Vec::new());
        let handle = net.policy();
        let public = Ipv4Addr::new(203, 0, 113, 7);
        assert!(net.host_target(public, 80).is_ok());
        assert_eq!(net.host_target(GATEWAY, 8000), Err(Refusal::Policy));
        handle.set(EgressPolicy {
            default_allow: false,
            allow: vec![policy::Rule::parse("10.0.2.2:8000").unwrap()],
            deny: Vec::new(),
        });
        assert_eq!(net.host_target(public, 80), Err(Refusal::Policy));
        assert!(net.host_target(GATEWAY, 8000).is_ok());
        handle.set(EgressPolicy::default());
        assert!(net.host_target(public, 80).is_ok());
    }

    #[test]
    fn malformed_frames_are_dropped_without_harm() {
        // Only the gateway is allowed: a SYN that survives the corruption
        // reaches nothing outside this host.
        let policy = EgressPolicy {
            default_allow: false,
            allow: vec![policy::Rule::parse("10.0.2.2").unwrap()],
            deny: Vec::new(),
        };
        let mut net = net(policy, Vec::new());
        let mut seed = 0x1234_5678_u32;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let good = syn(GATEWAY, 1000, 1);
        for i in 0..5000 {
            let mut f = if i % 2 == 0 {
                good.clone()
            } else {
                udp(DNS, 5000, 53, b"query")
            };
            // Corrupt a few bytes past the Ethernet header, cut the frame.
            for _ in 0..(rand() % 4 + 1) {
                let at = 14 + rand() as usize % (f.len() - 14);
                f[at] = rand() as u8;
            }
            f.truncate(rand() as usize % (f.len() + 1));
            net.send(&f).unwrap();
            net.poll();
        }
        for len in [0usize, 1, 13, 14, 33, 34, 60] {
            net.send(&vec![0xff; len]).unwrap();
        }
        drain(&mut net);
        assert!(net.tcp.len() <= MAX_TCP_FLOWS);
        assert!(net.udp.len() <= MAX_UDP_FLOWS);
    }

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut frame = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        frame
    }

    fn ping(dst: Ipv4Addr, seq_no: u16, data: &[u8]) -> Vec<u8> {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no,
            data,
        };
        let mut l4 = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut l4[..]),
            &ChecksumCapabilities::default(),
        );
        from_guest(dst, IpProtocol::Icmp, &l4)
    }

    #[test]
    fn replies_to_a_guest_that_stops_reading_stay_within_the_cap() {
        let mut net = net(EgressPolicy::default(), Vec::new());
        // The guest asks for the gateway's MAC (so smoltcp knows the
        // guest's), then a ping is answered: the flood below makes replies.
        net.send(&arp_request(GATEWAY)).unwrap();
        net.poll();
        assert_eq!(drain(&mut net).len(), 1, "no ARP reply");
        net.send(&ping(GATEWAY, 0, b"hello")).unwrap();
        net.poll();
        assert_eq!(drain(&mut net).len(), 1, "no echo reply");
        // 64 KiB pings while the guest takes no frames: the replies come
        // from smoltcp itself, the path that once had no cap.
        let data = vec![0x5a; 60_000];
        for seq in 1..400 {
            net.send(&ping(GATEWAY, seq, &data)).unwrap();
            net.poll();
            assert!(
                net.frames.to_guest_bytes <= TO_GUEST_BYTES + 70_000,
                "{} bytes wait for the guest after {seq} pings",
                net.frames.to_guest_bytes
            );
        }
        assert!(net.frames.dropped > 0);
        assert!(net.frames.from_guest.len() <= MAX_FROM_GUEST);
        // The guest reads again: what waits is delivered, then new replies.
        drain(&mut net);
        net.send(&ping(GATEWAY, 500, b"again")).unwrap();
        net.poll();
        assert_eq!(drain(&mut net).len(), 1);
    }

    /// SYNs from the guest to each of `dsts`: how many were reset.
    fn resets_for(net: &mut UserNet, dsts: &[Ipv4Addr]) -> usize {
        for (i, dst) in dsts.iter().enumerate() {
            net.send(&syn(*dst, 30_000 + i as u16, 80)).unwrap();
        }
        net.poll();
        drain(net)
            .iter()
            .filter(|f| tcp_flags(f) == Some((true, false)))
            .count()
    }

    #[test]
    fn frames_made_for_the_guest_go_to_the_address_it_sends_from() {
        let mut net = net(EgressPolicy::default(), Vec::new());
        let refused = "10.0.0.7".parse::<Ipv4Addr>().unwrap();
        let dst_of_reset = |net: &mut UserNet, from: Option<[u8; 6]>| {
            let mut frame = syn(refused, 30_000, 80);
            if let Some(mac) = from {
                frame[6..12].copy_from_slice(&mac);
            }
            net.send(&frame).unwrap();
            net.poll();
            let frames = drain(net);
            let reset = frames
                .iter()
                .find(|f| tcp_flags(f) == Some((true, false)))
                .expect("the refused SYN is reset");
            EthernetFrame::new_checked(&reset[..]).unwrap().dst_addr().0
        };
        assert_eq!(dst_of_reset(&mut net, None), GUEST_MAC);
        let moved = [2, 0x11, 0x22, 0x33, 0x44, 0x55];
        assert_eq!(dst_of_reset(&mut net, Some(moved)), moved);
        // A multicast source is no address to answer to: ignored.
        assert_eq!(dst_of_reset(&mut net, Some([3, 0, 0, 0, 0, 1])), moved);
    }

    #[test]
    fn the_egress_floor_holds_against_names_that_resolve_into_it() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let floor = [
            ip("169.254.169.254"),
            ip("10.0.0.7"),
            ip("172.16.5.5"),
            ip("192.168.0.1"),
            ip("100.64.1.1"),
        ];
        // The default policy: every floor address is refused (a reset),
        // and no connection is attempted.
        let mut open = net(EgressPolicy::default(), Vec::new());
        assert_eq!(resets_for(&mut open, &floor), floor.len());
        assert!(open.tcp.is_empty());
        // A name rule whose name resolves into the floor (DNS rebinding):
        // the answer is learned, the addresses stay refused.
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        let policy = EgressPolicy {
            default_allow: false,
            allow: vec![policy::Rule::parse("evil.test").unwrap()],
            deny: Vec::new(),
        };
        let mut net = net(policy, vec![upstream.local_addr().unwrap()]);
        net.send(&udp(DNS, 5353, 53, b"query for evil.test"))
            .unwrap();
        net.poll();
        let mut buf = [0u8; 512];
        let (_, from) = upstream.recv_from(&mut buf).unwrap();
        let addrs: Vec<[u8; 4]> = floor.iter().map(|a| a.octets()).collect();
        upstream
            .send_to(&wire::tests::answer("evil.test", &addrs), from)
            .unwrap();
        let start = Instant::now();
        while net.names.is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "answer not read");
            net.poll();
        }
        assert_eq!(net.names.len(), floor.len());
        assert_eq!(resets_for(&mut net, &floor), floor.len());
        assert!(net.tcp.is_empty());
    }

    #[test]
    fn floods_stay_within_the_flow_limits_and_are_answered() {
        // A host server that never accepts: connections complete in its
        // backlog and stay open.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent_dns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let policy = EgressPolicy {
            default_allow: false,
            allow: vec![policy::Rule::parse("10.0.2.2").unwrap()],
            deny: Vec::new(),
        };
        let mut net = net(policy, vec![silent_dns.local_addr().unwrap()]);
        let flood = MAX_TCP_FLOWS as u16 + 200;
        for p in 0..flood {
            net.send(&syn(GATEWAY, 10_000 + p, port)).unwrap();
        }
        net.poll();
        let frames = drain(&mut net);
        assert_eq!(net.tcp.len(), MAX_TCP_FLOWS, "connections past the limit");
        let resets = frames
            .iter()
            .filter(|f| tcp_flags(f) == Some((true, false)));
        assert_eq!(resets.count(), 200, "each SYN past the limit is reset");
        // Denied and unroutable destinations: resets, no flows.
        for dst in [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::LOCALHOST, GUEST] {
            net.send(&syn(dst, 9, 80)).unwrap();
        }
        net.poll();
        let frames = drain(&mut net);
        assert_eq!(
            frames
                .iter()
                .filter(|f| tcp_flags(f) == Some((true, false)))
                .count(),
            3
        );
        assert_eq!(net.tcp.len(), MAX_TCP_FLOWS);
        // A DNS flood from many ports: the oldest flows make room.
        let mut buf = [0u8; 64];
        let mut got = 0;
        silent_dns.set_nonblocking(true).unwrap();
        for batch in 0..10u16 {
            for p in 0..100 {
                net.send(&udp(DNS, 20_000 + batch * 100 + p, 53, b"\x12\x34query"))
                    .unwrap();
            }
            net.poll();
            assert!(net.udp.len() <= MAX_UDP_FLOWS);
            while silent_dns.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        assert_eq!(net.udp.len(), MAX_UDP_FLOWS);
        assert_eq!(got, 1000, "every query reached the upstream server");
    }
}
