//! `epoll` on macOS: the interface of `vmm_sys_util::epoll` (which the
//! devices and the event manager use on Linux) over a kqueue.
//!
//! Differences a caller may see:
//! - readable and writable arrive as two events for one descriptor (a
//!   kqueue has a filter for each), each with its own bit;
//! - `HANG_UP` (and `READ_HANG_UP` on the read side) comes from
//!   `EV_EOF`, `ERROR` from `EV_ERROR`; `PRIORITY`, `WAKE_UP` and
//!   `EXCLUSIVE` are accepted and ignored;
//! - a descriptor closed without `Delete` leaves the kqueue by itself (as
//!   with epoll), and adding its number again replaces the stale entry.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The `epoll_ctl` operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOperation {
    Add,
    Modify,
    Delete,
}

/// Event bits, with epoll's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EventSet(u32);

impl EventSet {
    pub const IN: EventSet = EventSet(0x001);
    pub const PRIORITY: EventSet = EventSet(0x002);
    pub const OUT: EventSet = EventSet(0x004);
    pub const ERROR: EventSet = EventSet(0x008);
    pub const HANG_UP: EventSet = EventSet(0x010);
    pub const READ_HANG_UP: EventSet = EventSet(0x2000);
    pub const EXCLUSIVE: EventSet = EventSet(1 << 28);
    pub const WAKE_UP: EventSet = EventSet(1 << 29);
    pub const ONE_SHOT: EventSet = EventSet(1 << 30);
    pub const EDGE_TRIGGERED: EventSet = EventSet(1 << 31);

    pub const fn empty() -> EventSet {
        EventSet(0)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits_truncate(bits: u32) -> EventSet {
        EventSet(bits)
    }

    pub const fn contains(self, other: EventSet) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: EventSet) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for EventSet {
    type Output = EventSet;
    fn bitor(self, other: EventSet) -> EventSet {
        EventSet(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for EventSet {
    fn bitor_assign(&mut self, other: EventSet) {
        self.0 |= other.0;
    }
}

impl std::ops::BitAnd for EventSet {
    type Output = EventSet;
    fn bitand(self, other: EventSet) -> EventSet {
        EventSet(self.0 & other.0)
    }
}

impl std::ops::Sub for EventSet {
    type Output = EventSet;
    fn sub(self, other: EventSet) -> EventSet {
        EventSet(self.0 & !other.0)
    }
}

/// One event: its bits and the caller's data (conventionally the fd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpollEvent {
    events: u32,
    data: u64,
}

impl EpollEvent {
    pub fn new(events: EventSet, data: u64) -> EpollEvent {
        EpollEvent {
            events: events.bits(),
            data,
        }
    }

    pub fn events(&self) -> u32 {
        self.events
    }

    pub fn event_set(&self) -> EventSet {
        EventSet::from_bits_truncate(self.events)
    }

    pub fn data(&self) -> u64 {
        self.data
    }

    /// The data as a descriptor (for callers that store the fd in it).
    pub fn fd(&self) -> RawFd {
        self.data as RawFd
    }
}

/// An epoll-like instance over a kqueue.
#[derive(Debug)]
pub struct Epoll {
    kq: OwnedFd,
    /// What each descriptor is registered for, to turn a `Modify` into
    /// the filters to add and to delete.
    registered: Mutex<HashMap<RawFd, EventSet>>,
}

fn change(fd: RawFd, filter: i16, flags: u16, data: u64) -> libc::kevent {
    libc::kevent {
        ident: fd as usize,
        filter,
        flags,
        fflags: 0,
        data: 0,
        udata: data as usize as *mut libc::c_void,
    }
}

/// A new close-on-exec kqueue (also the timers' and process exit
/// descriptors' base).
pub(crate) fn new_kqueue() -> io::Result<OwnedFd> {
    // SAFETY: no arguments; the result is checked.
    let kq = unsafe { libc::kqueue() };
    if kq < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `kq` is a new descriptor, ours alone.
    let kq = unsafe { OwnedFd::from_raw_fd(kq) };
    // SAFETY: sets close-on-exec on our descriptor.
    if unsafe { libc::fcntl(kq.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kq)
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        let kq = new_kqueue()?;
        Ok(Epoll {
            kq,
            registered: Mutex::new(HashMap::new()),
        })
    }

    /// Adds, changes or removes `fd`'s interest.
    pub fn ctl(&self, operation: ControlOperation, fd: RawFd, event: EpollEvent) -> io::Result<()> {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        let old = registered.get(&fd).copied();
        let new = match operation {
            ControlOperation::Add => Some(event.event_set()),
            ControlOperation::Modify if old.is_none() => {
                return Err(io::Error::from_raw_os_error(libc::ENOENT))
            }
            ControlOperation::Modify => Some(event.event_set()),
            ControlOperation::Delete if old.is_none() => {
                return Err(io::Error::from_raw_os_error(libc::ENOENT))
            }
            ControlOperation::Delete => None,
        };
        let mut changes = Vec::with_capacity(2);
        for (filter, bit) in [
            (libc::EVFILT_READ, EventSet::IN),
            (libc::EVFILT_WRITE, EventSet::OUT),
        ] {
            let wanted = new.is_some_and(|s| s.contains(bit));
            let had = old.is_some_and(|s| s.contains(bit));
            if wanted {
                let set = new.unwrap_or_default();
                let mut flags = libc::EV_ADD | libc::EV_ENABLE;
                if set.contains(EventSet::EDGE_TRIGGERED) {
                    flags |= libc::EV_CLEAR;
                }
                if set.contains(EventSet::ONE_SHOT) {
                    flags |= libc::EV_ONESHOT;
                }
                changes.push(change(fd, filter, flags, event.data()));
            } else if had {
                changes.push(change(fd, filter, libc::EV_DELETE, 0));
            }
        }
        for kev in &changes {
            // One change at a time: a delete of a filter the kernel has
            // already dropped (the fd was closed) must not stop the rest.
            // SAFETY: one live change, no events out.
            let rc = unsafe {
                libc::kevent(
                    self.kq.as_raw_fd(),
                    kev,
                    1,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                let gone = kev.flags & libc::EV_DELETE != 0
                    && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EBADF));
                if !gone {
                    return Err(e);
                }
            }
        }
        match new {
            Some(set) => registered.insert(fd, set),
            None => registered.remove(&fd),
        };
        Ok(())
    }

    /// Waits up to `timeout` ms (-1: no limit) for events; returns how
    /// many were written to the front of `events`.
    pub fn wait(&self, timeout: i32, events: &mut [EpollEvent]) -> io::Result<usize> {
        let mut raw: Vec<libc::kevent> = vec![change(0, 0, 0, 0); events.len()];
        let limit = (timeout >= 0).then(|| libc::timespec {
            tv_sec: libc::time_t::from(timeout / 1000),
            tv_nsec: libc::c_long::from(timeout % 1000) * 1_000_000,
        });
        // SAFETY: `raw` has room for `raw.len()` events; the timeout, if
        // any, is live for the call.
        let n = unsafe {
            libc::kevent(
                self.kq.as_raw_fd(),
                std::ptr::null(),
                0,
                raw.as_mut_ptr(),
                raw.len() as libc::c_int,
                limit.as_ref().map_or(std::ptr::null(), |t| t as *const _),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (out, kev) in events.iter_mut().zip(&raw[..n]) {
            let mut set = if kev.filter == libc::EVFILT_WRITE {
                EventSet::OUT
            } else {
                EventSet::IN
            };
            if kev.flags & libc::EV_EOF != 0 {
                set |= EventSet::HANG_UP;
                if kev.filter == libc::EVFILT_READ {
                    set |= EventSet::READ_HANG_UP;
                }
            }
            if kev.flags & libc::EV_ERROR != 0 {
                set = EventSet::ERROR;
            }
            *out = EpollEvent::new(set, kev.udata as usize as u64);
        }
        Ok(n)
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.kq.as_raw_fd()
    }
}
