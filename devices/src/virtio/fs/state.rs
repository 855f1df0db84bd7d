//! A share's saved state: its inodes and open files by path, as
//! snapshots and forks carry it (plain data, on every host).

use std::path::PathBuf;

/// A share's inodes and open files, by path (see `PassthroughFs::save`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    pub inodes: Vec<SavedInode>,
    pub handles: Vec<SavedHandle>,
    pub next_id: u64,
    pub next_fh: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedInode {
    pub id: u64,
    /// Below the share's root.
    pub path: PathBuf,
    pub lookups: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHandle {
    pub fh: u64,
    pub nodeid: u64,
    pub flags: i32,
}
