//! virtio-fs: a host folder shared with the guest, with the FUSE server
//! inside the VMM process (no virtiofsd, no vhost-user, so a fork or
//! snapshot of the VM keeps working without shared memory).
//!
//! Queues: 0 = high priority (FORGET, INTERRUPT), 1 = requests. Requests
//! are handled one at a time on the event-loop thread, in queue order.
//! The host side and its confinement are in [`passthrough`].

pub mod abi;
mod device;
pub mod guest_abi;
mod host;
pub mod iobuf;
pub mod passthrough;
pub mod server;
pub mod state;

pub use device::{config_space, serve_queue, Fs, QUEUE_SIZE};
pub use passthrough::PassthroughFs;

use std::path::PathBuf;

/// Errors setting a share up (guest errors are errno values).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open the shared folder {path}: {source}; check that it exists and is a directory"
    )]
    OpenRoot {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// virtio device id of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Longest tag (the config space has 36 bytes for it).
pub const MAX_TAG_LEN: usize = 36;
