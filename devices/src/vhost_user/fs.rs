//! virtio-fs as a vhost-user backend (`vmm device fs`): the same FUSE
//! server, confinement and read-only enforcement as the in-process share.

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackendMut;
use vmm_os::epoll::EventSet;

use super::{config_bytes, drained, drive, Asked, Memory, Ring, Served, Vring, WorkerExit};
use crate::virtio::fs::server::Server;
use crate::virtio::fs::{config_space, serve_queue, PassthroughFs, QUEUE_SIZE};
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// High-priority queue and one request queue.
const QUEUES: usize = 2;

/// The backend of one share for one frontend connection.
pub struct FsBackend {
    server: Server,
    /// None: the frontend supplies the tag (QEMU's `tag=` does).
    tag: Option<String>,
    memory: Memory,
    /// A ring broke: the device serves nothing more until the frontend
    /// resets it.
    broken: bool,
    exit: WorkerExit,
    asked: Asked,
}

impl FsBackend {
    /// `exit` ends the daemon's worker thread (see [`WorkerExit`]).
    pub fn new(fs: PassthroughFs, tag: Option<String>, exit: WorkerExit) -> Self {
        FsBackend {
            server: Server::new(fs),
            tag,
            memory: Memory::new(Default::default()),
            broken: false,
            exit,
            asked: Asked::default(),
        }
    }
}

impl Served for FsBackend {
    fn served(&self) -> bool {
        self.asked.get()
    }
}

impl VhostUserBackendMut for FsBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE.into()
    }

    fn features(&self) -> u64 {
        self.asked.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if self.tag.is_some() {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.take()
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match &self.tag {
            Some(tag) => config_bytes(&config_space(tag), offset, size),
            None => Vec::new(),
        }
    }

    fn update_memory(&mut self, memory: Memory) -> std::io::Result<()> {
        self.memory = memory;
        Ok(())
    }

    fn reset_device(&mut self) {
        self.server.fs_mut().destroy();
        self.broken = false;
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if self.broken {
            return Ok(());
        }
        let server = &mut self.server;
        let run = drive(
            vring,
            &self.memory,
            Ring::Requests,
            |queue, mem, signal| serve_queue(server, queue, mem, signal),
            drained,
        );
        self.broken = run.is_err();
        Ok(())
    }
}
