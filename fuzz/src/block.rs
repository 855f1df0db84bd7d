//! A block device over a layered disk: a shared base image (made once per
//! process) and a throwaway layer per input.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::block::{Block, LayeredDisk};

use crate::scratch::Scratch;

/// 256 KiB: 64 blocks of 4 KiB.
const BASE_SIZE: usize = 256 * 1024;

fn base() -> &'static PathBuf {
    static BASE: OnceLock<(Scratch, PathBuf)> = OnceLock::new();
    &BASE
        .get_or_init(|| {
            let dir = Scratch::new("blk-base");
            let path = dir.path().join("base.img");
            let pattern: Vec<u8> = (0..BASE_SIZE).map(|i| (i / 512) as u8).collect();
            std::fs::write(&path, pattern).expect("the base image");
            (dir, path)
        })
        .1
}

/// A block device whose writes go to a fresh layer.
pub fn device() -> Box<Block> {
    let disk = LayeredDisk::open(base(), None, false).expect("a layered disk");
    Box::new(Block::new(Arc::new(Mutex::new(disk)), "fuzz"))
}
