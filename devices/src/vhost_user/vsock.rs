//! virtio-vsock as a vhost-user backend (`vmm device vsock`): the same
//! muxer and Unix-socket scheme as the in-process device.
//!
//! The host sockets (listener, connections, timer) sit in an epoll of the
//! backend's own, whose descriptor the daemon's thread watches next to the
//! rings' kicks ([`VsockBackend::host_events_fd`], event
//! [`HOST_EVENTS`]).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringT};
use virtio_queue::QueueT;
use vmm_os::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{config_bytes, drained, drive, Asked, Memory, Ring, Served, Vring, WorkerExit};
use crate::virtio::vsock::muxer::FdChange;
use crate::virtio::vsock::{config_space, VsockCore, EVENTS, RX, TX};
use vmm_sys_util::event::{EventConsumer, EventNotifier};

const QUEUES: usize = 3;
/// The largest ring a frontend may set: QEMU's vhost-user-vsock sets 1024
/// (our own transport offers 256); the core serves any size.
const MAX_QUEUE_SIZE: usize = 1024;
/// The event id of the host sockets' epoll (above the queues' ids and the
/// framework's own, which is the number of queues).
pub const HOST_EVENTS: u16 = QUEUES as u16 + 1;
/// Host events served per wake-up of the daemon's thread.
const HOST_EVENTS_PER_RUN: usize = 64;

/// The backend of one guest CID for one frontend connection.
pub struct VsockBackend {
    cid: u64,
    core: VsockCore,
    host: Epoll,
    memory: Memory,
    /// A ring broke: the device serves nothing more until the frontend
    /// resets it.
    broken: bool,
    exit: WorkerExit,
    asked: Asked,
}

impl VsockBackend {
    /// The backend for guest `cid`, its host side listening on `uds_path`;
    /// `exit` ends the daemon's worker thread (see [`WorkerExit`]).
    pub fn new(cid: u64, uds_path: &Path, exit: WorkerExit) -> std::io::Result<Self> {
        let core = VsockCore::new(cid, uds_path)?;
        let host = Epoll::new()?;
        for fd in core.host_fds() {
            host.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )?;
        }
        Ok(VsockBackend {
            cid,
            core,
            host,
            memory: Memory::new(Default::default()),
            broken: false,
            exit,
            asked: Asked::default(),
        })
    }

    /// The descriptor the daemon's thread watches, as event [`HOST_EVENTS`].
    pub fn host_events_fd(&self) -> RawFd {
        self.host.as_raw_fd()
    }

    fn process_rx(&mut self, vrings: &[Vring]) {
        let core = &mut self.core;
        let run = drive(
            &vrings[RX],
            &self.memory,
            Ring::Receive,
            |queue, mem, signal| core.process_rx(queue, mem, signal),
            |_| true,
        );
        self.broken |= run.is_err();
    }

    fn process_tx(&mut self, vrings: &[Vring]) {
        let core = &mut self.core;
        let run = drive(
            &vrings[TX],
            &self.memory,
            Ring::Requests,
            |queue, mem, signal| core.process_tx(queue, mem, signal),
            drained,
        );
        self.broken |= run.is_err();
    }

    /// Serves the host sockets that are ready.
    fn host_events(&mut self) {
        let mut ready = [EpollEvent::default(); HOST_EVENTS_PER_RUN];
        let n = match self.host.wait(0, &mut ready) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("vsock: cannot read the host sockets' events: {e}");
                return;
            }
        };
        for event in &ready[..n] {
            self.core
                .host_event(event.fd(), EventSet::from_bits_truncate(event.events));
        }
    }

    /// Applies the muxer's watch changes to the host epoll.
    fn apply_changes(&mut self) {
        for change in self.core.take_changes() {
            let (op, fd, set) = match change {
                FdChange::Watch(fd, set) => (ControlOperation::Add, fd, set),
                FdChange::Modify(fd, set) => (ControlOperation::Modify, fd, set),
                FdChange::Unwatch(fd) => (ControlOperation::Delete, fd, EventSet::empty()),
            };
            if let Err(e) = self.host.ctl(op, fd, EpollEvent::new(set, fd as u64)) {
                tracing::debug!("vsock: watch change failed: {e}");
            }
        }
        self.core.release_closed();
    }
}

impl Served for VsockBackend {
    fn served(&self) -> bool {
        self.asked.get()
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.asked.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.take()
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_bytes(&config_space(self.cid), offset, size)
    }

    fn update_memory(&mut self, memory: Memory) -> std::io::Result<()> {
        self.memory = memory;
        Ok(())
    }

    fn reset_device(&mut self) {
        self.broken = false;
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if vrings.len() != QUEUES {
            return Ok(());
        }
        match usize::from(device_event) {
            TX if !self.broken => self.process_tx(vrings),
            EVENTS => self.core.events_returned(),
            _ if device_event == HOST_EVENTS => self.host_events(),
            _ => {}
        }
        // Transmitted packets may have produced answers, host sockets may
        // have data, new receive buffers may unblock waiting data.
        if !self.broken && vrings[RX].get_ref().get_queue().ready() {
            self.process_rx(vrings);
        }
        self.apply_changes();
        Ok(())
    }
}
