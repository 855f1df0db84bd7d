//! The host side of virtio-vsock: guest stream connections mapped onto Unix
//! sockets, in Firecracker's hybrid scheme.
//!
//! - Host-initiated: a client connects to `uds_path`, writes
//!   `CONNECT <port>\n`; the muxer asks the guest (REQUEST to that port) and
//!   on RESPONSE writes `OK <host_port>\n` back; then bytes flow both ways.
//! - Guest-initiated: a guest connection to host port P is connected to the
//!   Unix socket `<uds_path>_<P>`; nobody listening there means RST.
//!
//! Flow control follows the virtio credit scheme: the muxer sends the guest
//! no more than the guest's advertised buffer space, and advertises
//! `BUF_ALLOC` bytes of its own, counting bytes as forwarded only once the
//! host socket took them. A guest that overruns that credit is reset.
//!
//! Nothing here blocks or grows without bound on the guest's behalf: host
//! sockets are connected without blocking (a full backlog is a reset), a VM
//! holds at most [`MAX_GUEST_CONNECTIONS`] connections it opened and
//! [`MAX_HOST_CONNECTIONS`] the host opened (so a guest that fills its
//! share never locks the host's agent calls out), connections both sides
//! closed are reset if the guest does not finish them within
//! [`CLOSE_TIMEOUT`], and the listener pauses briefly when the process is
//! out of descriptors instead of spinning.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};
use vmm_os::event_manager::EventSet;
use vmm_os::timerfd::TimerFd;
use vmm_os::EventFd;

use super::packet::*;

/// Receive buffer space advertised to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told about freed space.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First host-side port for host-initiated connections.
const LOCAL_PORT_START: u32 = 1 << 30;

/// A random first host-side port: a restored or forked guest may still
/// hold closing sockets of its parent's connections, which used the
/// parent's ports; starting elsewhere keeps new connections apart from
/// them.
fn first_local_port() -> u32 {
    let mut r = [0u8; 4];
    let offset = if vmm_os::fill_random(&mut r).is_ok() {
        u32::from_le_bytes(r) % (1 << 29)
    } else {
        0
    };
    LOCAL_PORT_START + offset
}
/// Control packets waiting for guest receive buffers, at most.
const MAX_PENDING_CONTROL: usize = 1024;
/// Largest data payload read from a host socket per packet.
const MAX_READ: usize = 64 * 1024;
/// Connections the guest opened to host ports, per VM; past it the
/// guest's requests are reset.
pub const MAX_GUEST_CONNECTIONS: usize = 1024;
/// Connections host clients opened (those that have not sent their
/// `CONNECT` line included), per VM; past it new clients are closed.
pub const MAX_HOST_CONNECTIONS: usize = 256;
/// How long a connection closed on the host side waits for the guest's
/// RST after the muxer sent SHUTDOWN, before the muxer resets it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client may take to send its `CONNECT` line, and the
/// guest to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listener rests after an accept failed for lack of file
/// descriptors (it is level-triggered: watching it would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// How often deadlines are checked while any is pending.
const TICK: Duration = Duration::from_millis(250);

/// Connects to a Unix socket without blocking: a listener whose backlog is
/// full answers EAGAIN at once, never a wait.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// Host-side port.
    local: u32,
    /// Guest-side port.
    peer: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest bytes the host socket has not taken yet.
    to_host: VecDeque<u8>,
    /// The host socket has data (or EOF) we have not read yet.
    host_readable: bool,
    /// The host peer closed both directions.
    host_hup: bool,
    /// We read EOF from the host and told the guest.
    host_eof: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// What the event loop watches for this socket (None = not watched).
    watched: Option<EventSet>,
    /// When the muxer resets the connection unless the guest finished it
    /// (a REQUEST unanswered, a SHUTDOWN not followed by the guest's RST).
    deadline: Option<Instant>,
    /// The guest opened it (counted against MAX_GUEST_CONNECTIONS).
    from_guest: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_host: VecDeque::new(),
            host_readable: false,
            host_hup: false,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            watched: None,
            deadline: None,
            from_guest: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub((self.tx_cnt - self.peer_fwd_cnt).0)
    }

    fn can_send_to_guest(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state == State::Established
            && self.can_send_to_guest()
            && !self.host_readable
            && !self.host_hup
            && self.peer_credit() > 0
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() && !self.host_hup {
            set |= EventSet::OUT;
        }
        set
    }
}

/// A change the event loop must make to the descriptors it watches.
#[derive(Debug, PartialEq, Eq)]
pub enum FdChange {
    Watch(RawFd, EventSet),
    Modify(RawFd, EventSet),
    Unwatch(RawFd),
}

/// All vsock connections of one VM.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    /// Of `conns`, those the guest opened.
    guest_conns: usize,
    by_fd: HashMap<RawFd, Key>,
    /// Host clients that have not sent their CONNECT line yet, with the
    /// time by which they must.
    pending: HashMap<RawFd, (UnixStream, Vec<u8>, Instant)>,
    control: VecDeque<Header>,
    next_local: u32,
    changes: Vec<FdChange>,
    /// Sockets unwatched but not closed yet (closed after the event loop
    /// applied the `Unwatch`, so a reused descriptor number is never confused).
    closing: Vec<UnixStream>,
    /// Written when `changes` gets entries outside the event loop.
    wake: EventFd,
    /// Fires every [`TICK`] while a deadline is pending.
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is unwatched until then (out of descriptors).
    listener_resumes: Option<Instant>,
    /// Device and inode of the socket file at `uds_path`.
    socket_id: Option<(u64, u64)>,
}

impl Muxer {
    /// Listens on `uds_path`, mode 0600 (a stale socket of this user there
    /// is replaced; anything else is an error).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        let listener = crate::unix_socket::bind_private(uds_path)?;
        listener.set_nonblocking(true)?;
        let socket_id = std::fs::symlink_metadata(uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            guest_conns: 0,
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_local: first_local_port(),
            changes: Vec::new(),
            closing: Vec::new(),
            wake: EventFd::new(vmm_os::EFD_NONBLOCK)?,
            timer: vmm_os::timerfd::nonblocking()?,
            timer_armed: false,
            listener_resumes: None,
            socket_id,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Readable when fd changes wait to be applied.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Readable when deadlines are due: call [`Muxer::on_timer`].
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Number of open guest connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Takes the pending watch changes (and clears the wake eventfd).
    pub fn take_changes(&mut self) -> Vec<FdChange> {
        let _ = self.wake.read();
        std::mem::take(&mut self.changes)
    }

    /// Runs the deadline timer (call it whenever a deadline is set); `tick`
    /// stops it once none is left, so the event path never scans for them.
    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        match self.timer.reset(TICK, Some(TICK)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::warn!("vsock: cannot set the deadline timer: {e}"),
        }
    }

    /// Connections host clients hold, those still sending `CONNECT`
    /// included.
    fn host_held(&self) -> usize {
        self.conns.len() - self.guest_conns + self.pending.len()
    }

    /// The timer fired (its descriptor is readable).
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.tick(Instant::now());
    }

    /// Enforces the deadlines due at `now`: resets connections the guest
    /// left unfinished, closes host clients that never sent `CONNECT`, and
    /// watches the listener again after a pause.
    fn tick(&mut self, now: Instant) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(
                "vsock: guest port {} did not finish in time; reset",
                key.peer
            );
            self.reset(key);
        }
        let silent: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, (_, _, by))| *by <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in silent {
            self.close_pending(fd);
        }
        if self.listener_resumes.is_some_and(|at| at <= now) {
            self.listener_resumes = None;
            self.push_change(FdChange::Watch(self.listener.as_raw_fd(), EventSet::IN));
        }
        let pending = self.listener_resumes.is_some()
            || !self.pending.is_empty()
            || self.conns.values().any(|c| c.deadline.is_some());
        if !pending && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    /// Closes the sockets whose `Unwatch` the event loop has applied.
    pub fn release_closed(&mut self) {
        self.closing.clear();
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0),
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            tracing::warn!("vsock: the guest posts no receive buffers; dropping a control packet");
            return;
        }
        if let Some(c) = self.conns.get_mut(&Key {
            local: hdr.src_port,
            peer: hdr.dst_port,
        }) {
            c.last_fwd_cnt_sent = Wrapping(hdr.fwd_cnt);
        }
        self.control.push_back(hdr);
    }

    fn push_change(&mut self, change: FdChange) {
        self.changes.push(change);
        let _ = self.wake.write(1);
    }

    fn reset(&mut self, key: Key) {
        let hdr = self.header(key, OP_RST);
        self.remove(key);
        self.push_control(hdr);
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.from_guest {
                self.guest_conns -= 1;
            }
            let fd = conn.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if conn.watched.is_some() {
                self.push_change(FdChange::Unwatch(fd));
            }
            self.closing.push(conn.stream);
        }
    }

    fn update_watch(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = conn.wanted_events();
        let fd = conn.stream.as_raw_fd();
        let change = match conn.watched {
            None => FdChange::Watch(fd, wanted),
            Some(now) if now != wanted => FdChange::Modify(fd, wanted),
            Some(_) => return,
        };
        conn.watched = Some(wanted);
        self.push_change(change);
    }

    // ---- guest -> host ----

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: dropped a packet with cids {} -> {} (op {}, ports {} -> {})",
                hdr.src_cid,
                hdr.dst_cid,
                hdr.op,
                hdr.src_port,
                hdr.dst_port
            );
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.reset(key);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(key, hdr),
                OP_RST => {}
                _ => self.reset(key),
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                conn.deadline = None;
                // The client waits for this line before it sends anything, so
                // the socket buffer has room for it.
                let line = format!("OK {}\n", key.local);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key);
                    return;
                }
            }
            OP_RW if conn.state == State::Established && !conn.guest_shut_send => {
                if conn.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    tracing::warn!("vsock: guest port {} overran its credit; reset", key.peer);
                    self.reset(key);
                    return;
                }
                conn.to_host.extend(payload);
                if self.flush_to_host(key).is_err() {
                    self.reset(key);
                    return;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let hdr = self.header(key, OP_CREDIT_UPDATE);
                self.push_control(hdr);
            }
            OP_SHUTDOWN => {
                conn.guest_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                conn.guest_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                if conn.guest_shut_send && conn.guest_shut_rcv {
                    // Both directions closed: acknowledge with RST.
                    self.reset(key);
                    return;
                }
                if conn.guest_shut_send && conn.to_host.is_empty() {
                    let _ = conn.stream.shutdown(Shutdown::Write);
                }
            }
            OP_RST => {
                self.remove(key);
                return;
            }
            _ => {
                self.reset(key);
                return;
            }
        }
        self.update_watch(key);
    }

    fn connect_to_host(&mut self, key: Key, hdr: &Header) {
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.local));
        let connected = if self.guest_conns >= MAX_GUEST_CONNECTIONS {
            Err(io::Error::other(format!(
                "the guest holds {MAX_GUEST_CONNECTIONS} connections"
            )))
        } else {
            connect_nonblocking(&path)
        };
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to host port {} refused: {e}",
                    key.local
                );
                let mut rst = self.header(key, OP_RST);
                rst.fwd_cnt = 0;
                self.push_control(rst);
                return;
            }
        };
        let mut conn = Conn::new(stream, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        conn.from_guest = true;
        self.guest_conns += 1;
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        let response = self.header(key, OP_RESPONSE);
        self.push_control(response);
        self.update_watch(key);
    }

    /// Writes what the host socket takes of the guest's bytes.
    fn flush_to_host(&mut self, key: Key) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match conn.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if conn.to_host.is_empty() && conn.guest_shut_send {
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        if (conn.fwd_cnt - conn.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            let hdr = self.header(key, OP_CREDIT_UPDATE);
            self.push_control(hdr);
        }
        Ok(())
    }

    // ---- host events ----

    /// Accepts waiting host clients; they must then send `CONNECT <port>\n`.
    pub fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !crate::unix_socket::peer_is_trusted(&stream) {
                        tracing::warn!(
                            "vsock: a process of another user connected to the VM's socket; closed"
                        );
                        continue;
                    }
                    if self.host_held() >= MAX_HOST_CONNECTIONS {
                        tracing::warn!(
                            "vsock: host clients hold {MAX_HOST_CONNECTIONS} connections; a new one is closed"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let by = Instant::now() + CONNECT_TIMEOUT;
                    self.pending.insert(fd, (stream, Vec::new(), by));
                    self.arm_timer();
                    self.push_change(FdChange::Watch(fd, EventSet::IN));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.accept_failed(&e);
                    break;
                }
            }
        }
    }

    /// Out of descriptors, the listener stays readable: stop watching it
    /// for [`ACCEPT_BACKOFF`] rather than spin.
    fn accept_failed(&mut self, e: &io::Error) {
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
            && self.listener_resumes.is_none()
        {
            tracing::warn!("vsock: cannot accept a host client ({e}); retrying shortly");
            self.listener_resumes = Some(Instant::now() + ACCEPT_BACKOFF);
            self.arm_timer();
            self.push_change(FdChange::Unwatch(self.listener.as_raw_fd()));
        }
    }

    fn close_pending(&mut self, fd: RawFd) {
        if let Some((stream, _, _)) = self.pending.remove(&fd) {
            self.push_change(FdChange::Unwatch(fd));
            self.closing.push(stream);
        }
    }

    /// Whether `fd` belongs to the muxer's host sockets.
    pub fn owns(&self, fd: RawFd) -> bool {
        self.by_fd.contains_key(&fd) || self.pending.contains_key(&fd)
    }

    /// A host socket reported `events`.
    pub fn host_event(&mut self, fd: RawFd, events: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if conn.state == State::Connecting {
            if hup {
                // The client left before the guest answered.
                self.reset(key);
            }
            return;
        }
        if events.contains(EventSet::IN) || hup {
            conn.host_readable = true;
        }
        if hup {
            conn.host_hup = true;
        }
        if events.contains(EventSet::OUT) && self.flush_to_host(key).is_err() {
            self.reset(key);
            return;
        }
        if hup {
            // Level-triggered hang-ups would repeat: stop watching and drain
            // what is left through the receive path.
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.watched = None;
            }
            self.push_change(FdChange::Unwatch(fd));
            return;
        }
        self.update_watch(key);
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some((stream, line, _)) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let outcome = match stream.read(&mut buf) {
            Ok(0) => Err(()),
            Ok(n) => {
                line.extend_from_slice(&buf[..n]);
                match line.iter().position(|&b| b == b'\n') {
                    Some(end) => parse_connect(&line[..end]).ok_or(()).map(Some),
                    None if line.len() >= MAX_CONNECT_LINE => Err(()),
                    None => Ok(None),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        match outcome {
            Ok(None) => {}
            Err(()) => self.close_pending(fd),
            Ok(Some(port)) => {
                let Some((stream, _, _)) = self.pending.remove(&fd) else {
                    return;
                };
                let key = Key {
                    local: self.alloc_local_port(),
                    peer: port,
                };
                let mut conn = Conn::new(stream, State::Connecting);
                conn.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
                // Watched for hang-ups only until the guest answers.
                conn.watched = Some(EventSet::empty());
                self.push_change(FdChange::Modify(fd, EventSet::empty()));
                self.by_fd.insert(fd, key);
                self.conns.insert(key, conn);
                self.arm_timer();
                let request = self.header(key, OP_REQUEST);
                self.push_control(request);
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        // Ports wrap around within [LOCAL_PORT_START, u32::MAX].
        loop {
            let port = self.next_local;
            self.next_local = self.next_local.checked_add(1).unwrap_or(LOCAL_PORT_START);
            if !self.conns.keys().any(|k| k.local == port) {
                return port;
            }
        }
    }

    // ---- host -> guest ----

    /// Whether a control packet is waiting (data readiness is found by
    /// `next_packet`).
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` data bytes.
    pub fn next_packet(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, Vec::new()));
        }
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.host_readable && c.can_send_to_guest() && c.peer_credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            if let Some(packet) = self.read_from_host(key, max_payload) {
                return Some(packet);
            }
        }
        None
    }

    fn read_from_host(&mut self, key: Key, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        let conn = self.conns.get_mut(&key)?;
        let want = max_payload.min(conn.peer_credit() as usize).min(MAX_READ);
        if want == 0 {
            return None;
        }
        let mut buf = vec![0u8; want];
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.host_readable = false;
                conn.host_eof = true;
                let flags = if conn.host_hup {
                    // Both ways closed: the guest owes an RST, within
                    // CLOSE_TIMEOUT.
                    conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    SHUTDOWN_SEND | SHUTDOWN_RCV
                } else {
                    SHUTDOWN_SEND
                };
                let mut hdr = self.header(key, OP_SHUTDOWN);
                hdr.flags = flags;
                if flags & SHUTDOWN_RCV != 0 {
                    self.arm_timer();
                }
                self.update_watch(key);
                Some((hdr, Vec::new()))
            }
            Ok(n) => {
                buf.truncate(n);
                conn.tx_cnt += Wrapping(n as u32);
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                let mut hdr = self.header(key, OP_RW);
                hdr.len = n as u32;
                Some((hdr, buf))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.host_readable = false;
                self.update_watch(key);
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => {
                let hdr = self.header(key, OP_RST);
                self.remove(key);
                Some((hdr, Vec::new()))
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

impl Drop for Muxer {
    /// Removes the socket unless another listener took its path since (a
    /// vhost-user daemon's next connection binds it again).
    fn drop(&mut self) {
        let ours = |m: &std::fs::Metadata| Some((m.dev(), m.ino())) == self.socket_id;
        if std::fs::symlink_metadata(&self.uds_path).is_ok_and(|m| ours(&m)) {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    const CID: u64 = 3;

    struct Setup {
        dir: PathBuf,
        mux: Muxer,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn setup(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("vmm-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mux = Muxer::new(CID, &dir.join("v.sock")).unwrap();
        Setup { dir, mux }
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"HELLO 52"), None);
    }

    #[test]
    fn guest_connection_to_a_closed_port_is_reset() {
        let mut s = setup("closed");
        s.mux.handle_guest_packet(&guest(OP_REQUEST, 1000, 77), &[]);
        let (hdr, _) = s.mux.next_packet(4096).unwrap();
        assert_eq!((hdr.op, hdr.dst_port, hdr.src_port), (OP_RST, 1000, 77));
        assert_eq!(s.mux.connection_count(), 0);
    }

    #[test]
    fn guest_connection_to_a_listener_carries_data_both_ways() {
        let mut s = setup("guestconn");
        let listener = UnixListener::bind(s.dir.join("v.sock_52")).unwrap();
        s.mux.handle_guest_packet(&guest(OP_REQUEST, 1000, 52), &[]);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        let mut rw = guest(OP_RW, 1000, 52);
        rw.len = 5;
        s.mux.handle_guest_packet(&rw, b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        host.write_all(b"world").unwrap();
        let fd = s.mux.by_fd.keys().copied().next().unwrap();
        s.mux.host_event(fd, EventSet::IN);
        let (hdr, data) = s.mux.next_packet(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.len, data.as_slice()),
            (OP_RW, 5, &b"world"[..])
        );
        // Host half-closes: the guest gets SHUTDOWN(SEND), the connection stays.
        host.shutdown(Shutdown::Write).unwrap();
        s.mux.host_event(fd, EventSet::IN);
        let (hdr, _) = s.mux.next_packet(4096).unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        rw.len = 3;
        s.mux.handle_guest_packet(&rw, b"bye");
        host.read_exact(&mut got[..3]).unwrap();
        assert_eq!(&got[..3], b"bye");
        // Guest closes both ways: RST, connection gone, host sees EOF.
        let mut shut = guest(OP_SHUTDOWN, 1000, 52);
        shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        s.mux.handle_guest_packet(&shut, &[]);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RST);
        assert_eq!(s.mux.connection_count(), 0);
        s.mux.release_closed();
        assert_eq!(host.read(&mut got).unwrap(), 0);
    }

    #[test]
    fn host_connection_handshake() {
        let mut s = setup("hostconn");
        let mut client = UnixStream::connect(s.dir.join("v.sock")).unwrap();
        s.mux.accept_host();
        let fd = *s.mux.pending.keys().next().unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        s.mux.host_event(fd, EventSet::IN);
        let (req, _) = s.mux.next_packet(4096).unwrap();
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
        assert!(req.src_port >= LOCAL_PORT_START);
        s.mux
            .handle_guest_packet(&guest(OP_RESPONSE, 1024, req.src_port), &[]);
        let mut line = String::new();
        std::io::BufReader::new(&client)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port));
    }

    #[test]
    fn bad_connect_lines_close_the_client() {
        let mut s = setup("badline");
        let mut client = UnixStream::connect(s.dir.join("v.sock")).unwrap();
        s.mux.accept_host();
        let fd = *s.mux.pending.keys().next().unwrap();
        client.write_all(b"GIMME 1\n").unwrap();
        s.mux.host_event(fd, EventSet::IN);
        assert!(s.mux.take_changes().contains(&FdChange::Unwatch(fd)));
        s.mux.release_closed();
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert!(!s.mux.has_control());
    }

    #[test]
    fn credit_is_respected_and_overruns_reset() {
        let mut s = setup("credit");
        let listener = UnixListener::bind(s.dir.join("v.sock_9")).unwrap();
        let mut req = guest(OP_REQUEST, 7, 9);
        req.buf_alloc = 3; // the guest can take 3 bytes
        s.mux.handle_guest_packet(&req, &[]);
        s.mux.next_packet(4096).unwrap();
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"abcdef").unwrap();
        let fd = s.mux.by_fd.keys().copied().next().unwrap();
        s.mux.host_event(fd, EventSet::IN);
        let (_, data) = s.mux.next_packet(4096).unwrap();
        assert_eq!(data, b"abc");
        assert!(s.mux.next_packet(4096).is_none(), "no credit left");
        let mut update = guest(OP_CREDIT_UPDATE, 7, 9);
        update.buf_alloc = 3;
        update.fwd_cnt = 3;
        s.mux.handle_guest_packet(&update, &[]);
        assert_eq!(s.mux.next_packet(4096).unwrap().1, b"def");
        // A guest sending more than BUF_ALLOC without the host reading is reset.
        let big = vec![0u8; BUF_ALLOC as usize + 1];
        let mut rw = guest(OP_RW, 7, 9);
        rw.len = big.len() as u32;
        s.mux.handle_guest_packet(&rw, &big);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RST);
        assert_eq!(s.mux.connection_count(), 0);
    }

    /// A listener at `path` whose accept backlog holds `backlog` clients.
    fn listener_with_backlog(path: &Path, backlog: i32) -> UnixListener {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.bind(&SockAddr::unix(path).unwrap()).unwrap();
        socket.listen(backlog).unwrap();
        UnixListener::from(std::os::fd::OwnedFd::from(socket))
    }

    #[test]
    fn a_full_backlog_is_a_reset_not_a_wait() {
        let s = setup("backlog");
        // Nobody accepts: after the backlog fills, a blocking connect would
        // wait forever (and with it the VMM's event loop).
        let _listener = listener_with_backlog(&s.dir.join("v.sock_52"), 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let mut s = s;
            let mut ops = Vec::new();
            for port in 0..8 {
                s.mux
                    .handle_guest_packet(&guest(OP_REQUEST, 2000 + port, 52), &[]);
                ops.push(s.mux.next_packet(4096).unwrap().0.op);
            }
            let _ = tx.send(ops);
            s
        });
        let ops = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a guest connection to a busy port blocked the muxer");
        assert_eq!(ops[0], OP_RESPONSE, "{ops:?}");
        assert_eq!(*ops.last().unwrap(), OP_RST, "{ops:?}");
        let s = worker.join().unwrap();
        assert!(s.mux.connection_count() < 8);
    }

    #[test]
    fn connections_per_vm_are_capped() {
        let mut s = setup("cap");
        let listener = listener_with_backlog(&s.dir.join("v.sock_52"), 4096);
        listener.set_nonblocking(true).unwrap();
        let mut accepted = Vec::new();
        let (mut responses, mut resets) = (0, 0);
        for port in 0..(MAX_GUEST_CONNECTIONS as u32 + 500) {
            s.mux
                .handle_guest_packet(&guest(OP_REQUEST, 10_000 + port, 52), &[]);
            match s.mux.next_packet(4096).unwrap().0.op {
                OP_RESPONSE => responses += 1,
                OP_RST => resets += 1,
                op => panic!("op {op}"),
            }
            while let Ok((c, _)) = listener.accept() {
                accepted.push(c);
            }
        }
        assert_eq!(responses, MAX_GUEST_CONNECTIONS);
        assert_eq!(resets, 500);
        assert_eq!(s.mux.connection_count(), MAX_GUEST_CONNECTIONS);
        // The guest's connections leave the host's share alone: host
        // clients are taken up to their own cap, then closed at once.
        let clients: Vec<UnixStream> = (0..MAX_HOST_CONNECTIONS + 1)
            .map(|_| UnixStream::connect(s.dir.join("v.sock")).unwrap())
            .collect();
        s.mux.accept_host();
        assert_eq!(s.mux.pending.len(), MAX_HOST_CONNECTIONS);
        let mut buf = [0u8; 1];
        let mut last = clients.last().unwrap();
        assert_eq!(last.read(&mut buf).unwrap(), 0);
        // A closed connection makes room again.
        s.mux.handle_guest_packet(&guest(OP_RST, 10_000, 52), &[]);
        s.mux
            .handle_guest_packet(&guest(OP_REQUEST, 50_000, 52), &[]);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RESPONSE);
    }

    #[test]
    fn unfinished_connections_are_reset_after_their_deadline() {
        let mut s = setup("deadline");
        let listener = UnixListener::bind(s.dir.join("v.sock_52")).unwrap();
        s.mux.handle_guest_packet(&guest(OP_REQUEST, 1000, 52), &[]);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RESPONSE);
        // The host side closes; the guest is told, and never answers.
        drop(listener.accept().unwrap().0);
        let fd = s.mux.by_fd.keys().copied().next().unwrap();
        s.mux.host_event(fd, EventSet::IN | EventSet::HANG_UP);
        let (hdr, _) = s.mux.next_packet(4096).unwrap();
        assert_eq!(
            (hdr.op, hdr.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
        );
        assert!(!s.mux.take_changes().is_empty());
        assert!(s.mux.timer_armed, "a deadline is pending: the timer runs");
        s.mux.tick(Instant::now());
        assert_eq!(s.mux.connection_count(), 1, "not yet");
        s.mux.tick(Instant::now() + CLOSE_TIMEOUT);
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RST);
        assert_eq!(s.mux.connection_count(), 0);
        // A host client that never sends CONNECT, and a REQUEST the guest
        // never answers.
        let _silent = UnixStream::connect(s.dir.join("v.sock")).unwrap();
        let mut asking = UnixStream::connect(s.dir.join("v.sock")).unwrap();
        s.mux.accept_host();
        asking.write_all(b"CONNECT 5000\n").unwrap();
        let fds: Vec<RawFd> = s.mux.pending.keys().copied().collect();
        for fd in fds {
            s.mux.host_event(fd, EventSet::IN);
        }
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_REQUEST);
        assert_eq!((s.mux.pending.len(), s.mux.connection_count()), (1, 1));
        s.mux.tick(Instant::now() + CONNECT_TIMEOUT);
        assert_eq!((s.mux.pending.len(), s.mux.connection_count()), (0, 0));
        assert_eq!(s.mux.next_packet(4096).unwrap().0.op, OP_RST);
        assert!(!s.mux.timer_armed, "nothing pending: the timer stops");
        s.mux.release_closed();
        let mut buf = [0u8; 1];
        assert_eq!(asking.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn out_of_descriptors_the_listener_rests_instead_of_spinning() {
        let mut s = setup("emfile");
        let listener = s.mux.listener_fd();
        s.mux
            .accept_failed(&io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(s.mux.take_changes(), vec![FdChange::Unwatch(listener)]);
        assert!(s.mux.timer_armed);
        s.mux.tick(Instant::now());
        assert!(s.mux.take_changes().is_empty(), "still resting");
        s.mux.tick(Instant::now() + ACCEPT_BACKOFF);
        assert_eq!(
            s.mux.take_changes(),
            vec![FdChange::Watch(listener, EventSet::IN)]
        );
        // Other accept errors do not pause it.
        s.mux
            .accept_failed(&io::Error::from_raw_os_error(libc::ECONNABORTED));
        assert!(s.mux.take_changes().is_empty());
    }

    #[test]
    fn foreign_cids_and_unknown_ops_never_panic() {
        let mut s = setup("hostile");
        let mut h = guest(OP_RW, 1, 2);
        h.src_cid = 99;
        s.mux.handle_guest_packet(&h, b"x");
        assert!(!s.mux.has_control(), "foreign source cid: dropped");
        s.mux.handle_guest_packet(&guest(0x55, 1, 2), &[]);
        assert_eq!(s.mux.next_packet(10).unwrap().0.op, OP_RST);
        let mut dgram = guest(OP_REQUEST, 1, 2);
        dgram.type_ = 2;
        s.mux.handle_guest_packet(&dgram, &[]);
        assert_eq!(s.mux.next_packet(10).unwrap().0.op, OP_RST);
        s.mux.handle_guest_packet(&guest(OP_RST, 1, 2), &[]);
        assert!(!s.mux.has_control(), "RST for nothing: no answer");
        for _ in 0..(MAX_PENDING_CONTROL + 10) {
            s.mux.handle_guest_packet(&guest(OP_RW, 1, 2), &[]);
        }
        assert_eq!(s.mux.control.len(), MAX_PENDING_CONTROL, "bounded");
    }
}
