//! What every architecture's boot shares: opening the kernel and initramfs
//! files, and copying an initramfs (with a second archive after it) into
//! guest memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the initramfs {path}: {source}")]
    LoadInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the image's exec defaults after the initramfs to guest memory: {0}")]
    WriteExtra(vm_memory::GuestMemoryError),
}

/// Opens a file that must be a regular file (not a directory or a device);
/// returns it with its size.
pub fn open_regular_file(path: &Path) -> std::io::Result<(File, u64)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

/// An initramfs file to load, and a second archive to load after it.
pub struct Initramfs<'a> {
    pub path: &'a Path,
    pub file: File,
    pub size: u64,
    /// Loaded after the file, 4-byte aligned (the kernel unpacks
    /// concatenated archives); may be empty.
    pub extra: &'a [u8],
}

/// The bytes an initramfs of `size` takes with `extra` bytes after it.
pub fn with_extra(size: u64, extra: usize) -> u64 {
    if extra == 0 {
        size
    } else {
        size.next_multiple_of(4) + extra as u64
    }
}

impl Initramfs<'_> {
    /// The bytes it takes in guest memory.
    pub fn total(&self) -> u64 {
        with_extra(self.size, self.extra.len())
    }

    /// Copies the file and then the extra archive to guest address `addr`;
    /// returns the bytes written ([`Self::total`]).
    pub fn load(mut self, mem: &GuestMemoryMmap, addr: u64) -> Result<u64, Error> {
        mem.read_exact_volatile_from(GuestAddress(addr), &mut self.file, self.size as usize)
            .map_err(|e| Error::LoadInitramfs {
                path: self.path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        if !self.extra.is_empty() {
            mem.write_slice(
                self.extra,
                GuestAddress(addr + self.size.next_multiple_of(4)),
            )
            .map_err(Error::WriteExtra)?;
        }
        Ok(self.total())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_extra_archive_follows_the_file_four_byte_aligned() {
        let path = std::env::temp_dir().join(format!("vmm-load-test-{}", std::process::id()));
        File::create(&path).unwrap().write_all(b"abcde").unwrap();
        let (file, size) = open_regular_file(&path).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let initramfs = Initramfs {
            path: &path,
            file,
            size,
            extra: b"XY",
        };
        assert_eq!(initramfs.total(), 10);
        assert_eq!(initramfs.load(&mem, 0x100).unwrap(), 10);
        let mut got = [0u8; 10];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(&got, b"abcde\0\0\0XY");
        assert_eq!(with_extra(5, 0), 5);
        assert!(open_regular_file(Path::new("/")).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
