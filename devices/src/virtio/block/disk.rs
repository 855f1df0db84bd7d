//! A disk made of a read-only base image shared by every VM and a per-VM
//! writable layer, copy-on-write at 4 KiB block granularity.
//!
//! Layer file format (docs/disk.md):
//! ```text
//! 0      header (4 KiB): magic "VMMLAYR1", block size, disk size,
//!        base size, base mtime (to catch a layer used with another base)
//! 4096   bitmap: one bit per block, set = the block lives in the layer
//! D      data: block n at D + n * 4096 (sparse: only written blocks use space)
//! ```
//! Written blocks go to the layer (a block first written partially is first
//! copied from the base); reads take each block from the layer when its bit
//! is set, from the base otherwise. The bitmap is persisted at flush, after
//! the data is synced, so after a crash the layer holds every block of the
//! last flush and its bitmap never points at unwritten data.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Copy-on-write granularity.
pub const BLOCK_SIZE: u64 = 4096;
const MAGIC: &[u8; 8] = b"VMMLAYR1";
const HEADER_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the base image {path}: {source}")]
    OpenBase { path: PathBuf, source: io::Error },
    #[error("cannot open the layer {path}: {source}")]
    OpenLayer { path: PathBuf, source: io::Error },
    #[error("the layer {path} is not a layer file of this VMM (bad header); delete it or choose another path")]
    BadLayer { path: PathBuf },
    #[error("the layer {path} was made for another base image (size or modification time differ); use the base it was made with, or a new layer")]
    WrongBase { path: PathBuf },
    #[error("the base image {path} is empty")]
    EmptyBase { path: PathBuf },
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The base image plus a writable layer, optionally with a frozen layer
/// in between (the state a forked or restored VM starts from).
pub struct LayeredDisk {
    base: File,
    lower: Option<Frozen>,
    layer: File,
    size: u64,
    data_offset: u64,
    bitmap: Vec<u64>,
    /// Bitmap words changed since the last flush.
    dirty_words: Vec<usize>,
    read_only: bool,
}

/// A read-only layer between the base and the writable layer.
struct Frozen {
    file: File,
    bitmap: Vec<u64>,
}

/// Where a block's current content lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Layer,
    Lower,
    Base,
}

fn bit(bitmap: &[u64], block: u64) -> bool {
    bitmap[(block / 64) as usize] & (1 << (block % 64)) != 0
}

/// Reads a layer file's header and bitmap, checking them against the
/// header `expected` (disk size and base identity).
fn read_layer_meta(file: &File, expected: &[u8], words: usize, path: &Path) -> Result<Vec<u64>> {
    let mut found = vec![0u8; HEADER_SIZE as usize];
    file.read_exact_at(&mut found, 0)
        .map_err(|_| Error::BadLayer {
            path: path.to_path_buf(),
        })?;
    if &found[..8] != MAGIC || found[8..24] != expected[8..24] {
        return Err(Error::BadLayer {
            path: path.to_path_buf(),
        });
    }
    if found[24..48] != expected[24..48] {
        return Err(Error::WrongBase {
            path: path.to_path_buf(),
        });
    }
    let mut raw = vec![0u8; words * 8];
    file.read_exact_at(&mut raw, HEADER_SIZE)?;
    Ok(raw
        .chunks_exact(8)
        .map(|bytes| u64::from_le_bytes(bytes.try_into().unwrap_or_default()))
        .collect())
}

fn header(size: u64, base_meta: &std::fs::Metadata) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&base_meta.size().to_le_bytes());
    h[32..40].copy_from_slice(&base_meta.mtime().to_le_bytes());
    h[40..48].copy_from_slice(&base_meta.mtime_nsec().to_le_bytes());
    h
}

impl LayeredDisk {
    /// Opens `base` read-only with the layer at `layer` (created when
    /// missing), or a throwaway layer deleted on drop when `layer` is None.
    pub fn open(base: &Path, layer: Option<&Path>, read_only: bool) -> Result<Self> {
        let base_file = File::open(base).map_err(|source| Error::OpenBase {
            path: base.to_path_buf(),
            source,
        })?;
        Self::open_parts(base_file, base, None, layer, read_only)
    }

    /// Like `open`, from an open base image and optionally a frozen layer
    /// (from [`LayeredDisk::frozen_copy`]) between it and the writable
    /// layer. `base_path` only names the base in errors.
    pub fn open_parts(
        base_file: File,
        base_path: &Path,
        lower: Option<(File, &Path)>,
        layer: Option<&Path>,
        read_only: bool,
    ) -> Result<Self> {
        let meta = base_file.metadata().map_err(|source| Error::OpenBase {
            path: base_path.to_path_buf(),
            source,
        })?;
        let size = meta.len() & !511;
        if size == 0 {
            return Err(Error::EmptyBase {
                path: base_path.to_path_buf(),
            });
        }
        let blocks = size.div_ceil(BLOCK_SIZE);
        let words = blocks.div_ceil(64) as usize;
        let data_offset = (HEADER_SIZE + words as u64 * 8).next_multiple_of(BLOCK_SIZE);
        let expected = header(size, &meta);
        let lower = match lower {
            None => None,
            Some((file, path)) => {
                let bitmap = read_layer_meta(&file, &expected, words, path)?;
                Some(Frozen { file, bitmap })
            }
        };

        let (layer_file, layer_path) = match layer {
            Some(path) => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|source| Error::OpenLayer {
                        path: path.to_path_buf(),
                        source,
                    })?,
                path.to_path_buf(),
            ),
            None => {
                let dir = std::env::temp_dir();
                let file = vmm_os::file::unnamed_file(&dir).map_err(|source| Error::OpenLayer {
                    path: dir.clone(),
                    source,
                })?;
                (file, dir)
            }
        };
        let layer_len = layer_file.metadata()?.len();
        let bitmap = if layer_len == 0 {
            layer_file.write_all_at(&expected, 0)?;
            layer_file.set_len(data_offset + size)?;
            layer_file.sync_all()?;
            vec![0; words]
        } else {
            read_layer_meta(&layer_file, &expected, words, &layer_path)?
        };
        Ok(LayeredDisk {
            base: base_file,
            lower,
            layer: layer_file,
            size,
            data_offset,
            bitmap,
            dirty_words: Vec::new(),
            read_only,
        })
    }

    /// Disk size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The base image, as this disk opened it (a fork child must read the
    /// same file, even if the path now names another).
    pub fn base_file(&self) -> &File {
        &self.base
    }

    fn in_layer(&self, block: u64) -> bool {
        bit(&self.bitmap, block)
    }

    fn source(&self, block: u64) -> Source {
        if self.in_layer(block) {
            Source::Layer
        } else if self.lower.as_ref().is_some_and(|l| bit(&l.bitmap, block)) {
            Source::Lower
        } else {
            Source::Base
        }
    }

    /// The file and offset holding disk byte `pos` when it comes from `source`.
    fn place(&self, source: Source, pos: u64) -> (&File, u64) {
        match (source, &self.lower) {
            (Source::Layer, _) => (&self.layer, self.data_offset + pos),
            (Source::Lower, Some(lower)) => (&lower.file, self.data_offset + pos),
            _ => (&self.base, pos),
        }
    }

    fn mark(&mut self, block: u64) {
        let word = (block / 64) as usize;
        if self.bitmap[word] & (1 << (block % 64)) == 0 {
            self.bitmap[word] |= 1 << (block % 64);
            self.dirty_words.push(word);
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access past the end of the disk",
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / BLOCK_SIZE;
            let in_block = (BLOCK_SIZE - pos % BLOCK_SIZE) as usize;
            // Extend over following blocks that come from the same file.
            let source = self.source(block);
            let mut len = in_block.min(buf.len() - done);
            while done + len < buf.len()
                && self.source(block + (len as u64).div_ceil(BLOCK_SIZE)) == source
            {
                len = (len + BLOCK_SIZE as usize).min(buf.len() - done);
            }
            let (file, at) = self.place(source, pos);
            file.read_exact_at(&mut buf[done..done + len], at)?;
            done += len;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the layer.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            // Nothing to write; `offset` may be the disk's end, past the
            // last block the bitmap has a bit for.
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        // Blocks only partly covered and not yet in the layer are first
        // copied from below.
        for block in [offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE] {
            let start = block * BLOCK_SIZE;
            let partial = offset > start || end < start + BLOCK_SIZE;
            if partial && !self.in_layer(block) {
                let len = BLOCK_SIZE.min(self.size - start) as usize;
                let mut old = vec![0u8; len];
                let (file, at) = self.place(self.source(block), start);
                file.read_exact_at(&mut old, at)?;
                self.layer.write_all_at(&old, self.data_offset + start)?;
                self.mark(block);
            }
        }
        self.layer.write_all_at(buf, self.data_offset + offset)?;
        for block in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
            self.mark(block);
        }
        Ok(())
    }

    /// Makes every completed write durable: data first, then the bitmap.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.layer.sync_data()?;
        if self.dirty_words.is_empty() {
            return Ok(());
        }
        self.dirty_words.sort_unstable();
        self.dirty_words.dedup();
        for &word in &self.dirty_words {
            self.layer.write_all_at(
                &self.bitmap[word].to_le_bytes(),
                HEADER_SIZE + word as u64 * 8,
            )?;
        }
        self.layer.sync_data()?;
        self.dirty_words.clear();
        Ok(())
    }

    /// Bytes of the layer that hold guest data (allocated on the host).
    pub fn layer_allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.layer.metadata()?.blocks() * 512)
    }

    /// Copies every block that differs from the base (the frozen layer's
    /// and the writable layer's) into a new layer file in `dir`, unnamed
    /// when `name` is None. The copy costs the written data, not the disk
    /// size: only those blocks are copied and the file is sparse. A disk
    /// opened with the copy as its frozen layer (`open_parts`) reads
    /// exactly what this disk reads now.
    pub fn frozen_copy(&self, dir: &Path, name: Option<&str>) -> Result<File> {
        let out = match name {
            None => vmm_os::file::unnamed_file(dir),
            Some(name) => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(name)),
        }
        .map_err(|source| Error::OpenLayer {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut head = vec![0u8; HEADER_SIZE as usize];
        self.layer.read_exact_at(&mut head, 0)?;
        out.write_all_at(&head, 0)?;
        let merged: Vec<u64> = match &self.lower {
            Some(lower) => self
                .bitmap
                .iter()
                .zip(&lower.bitmap)
                .map(|(a, b)| a | b)
                .collect(),
            None => self.bitmap.clone(),
        };
        let raw: Vec<u8> = merged.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.write_all_at(&raw, HEADER_SIZE)?;
        out.set_len(self.data_offset + self.size)?;
        // Copy runs of blocks that come from the same layer.
        let blocks = self.size.div_ceil(BLOCK_SIZE);
        let mut block = 0;
        while block < blocks {
            let source = self.source(block);
            let mut end = block + 1;
            while end < blocks && self.source(end) == source {
                end += 1;
            }
            if source != Source::Base {
                let start = block * BLOCK_SIZE;
                let len = (end * BLOCK_SIZE).min(self.size) - start;
                let (file, at) = self.place(source, start);
                copy_range(file, at, &out, self.data_offset + start, len)?;
            }
            block = end;
        }
        Ok(out)
    }
}

/// Copies `len` bytes between files in the kernel where the host can,
/// else by reading and writing.
fn copy_range(src: &File, mut from: u64, dst: &File, mut to: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let n = match vmm_os::file::copy_file_range(src, from, dst, to, len as usize) {
            Ok(n) if n > 0 => n as u64,
            Err(e) if !vmm_os::file::copy_unsupported(&e) => return Err(e),
            // At the end of `src`, or the host cannot: through memory.
            _ => {
                let mut buf = vec![0u8; len.min(1 << 20) as usize];
                src.read_exact_at(&mut buf, from)?;
                dst.write_all_at(&buf, to)?;
                buf.len() as u64
            }
        };
        (from, to, len) = (from + n, to + n, len - n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn base(name: &str, blocks: u64) -> (Dir, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmm-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.img");
        let data: Vec<u8> = (0..blocks * BLOCK_SIZE)
            .map(|i| ((i / BLOCK_SIZE) as u8).wrapping_add(1))
            .collect();
        std::fs::write(&path, data).unwrap();
        (Dir(dir), path)
    }

    #[test]
    fn reads_come_from_the_base_until_written() {
        let (_d, b) = base("read", 4);
        let disk = LayeredDisk::open(&b, None, false).unwrap();
        let mut buf = vec![0u8; 2 * BLOCK_SIZE as usize];
        disk.read_at(&mut buf, BLOCK_SIZE).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 2) && buf[4096..].iter().all(|&x| x == 3));
    }

    #[test]
    fn partial_writes_copy_the_rest_of_the_block_and_spare_the_base() {
        let (d, b) = base("cow", 4);
        let before = std::fs::read(&b).unwrap();
        let layer = d.0.join("layer");
        let mut disk = LayeredDisk::open(&b, Some(&layer), false).unwrap();
        disk.write_at(&[0xaa; 512], BLOCK_SIZE + 1024).unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        disk.read_at(&mut buf, BLOCK_SIZE).unwrap();
        assert!(buf[..1024].iter().all(|&x| x == 2));
        assert!(buf[1024..1536].iter().all(|&x| x == 0xaa));
        assert!(buf[1536..].iter().all(|&x| x == 2));
        // A read spanning base and layer blocks.
        let mut span = vec![0u8; 3 * BLOCK_SIZE as usize];
        disk.read_at(&mut span, 0).unwrap();
        assert_eq!(span[0], 1);
        assert_eq!(span[4096 + 1024], 0xaa);
        assert_eq!(span[8192], 3);
        assert_eq!(std::fs::read(&b).unwrap(), before, "base untouched");
    }

    #[test]
    fn flushed_writes_survive_reopening_and_unflushed_bitmap_is_not_trusted() {
        let (d, b) = base("persist", 8);
        let layer = d.0.join("layer");
        {
            let mut disk = LayeredDisk::open(&b, Some(&layer), false).unwrap();
            disk.write_at(&[7u8; 4096], 2 * BLOCK_SIZE).unwrap();
            disk.flush().unwrap();
            disk.write_at(&[9u8; 4096], 5 * BLOCK_SIZE).unwrap();
            // Dropped without a flush: block 5's bitmap bit is not persisted.
        }
        let disk = LayeredDisk::open(&b, Some(&layer), false).unwrap();
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 2 * BLOCK_SIZE).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        disk.read_at(&mut buf, 5 * BLOCK_SIZE).unwrap();
        assert!(
            buf.iter().all(|&x| x == 6),
            "unflushed block reads as the base"
        );
    }

    #[test]
    fn layer_is_sparse_and_costs_only_written_blocks() {
        let (d, b) = base("sparse", 256);
        let layer = d.0.join("layer");
        let mut disk = LayeredDisk::open(&b, Some(&layer), false).unwrap();
        let empty = disk.layer_allocated_bytes().unwrap();
        disk.write_at(&[1u8; 4096], 100 * BLOCK_SIZE).unwrap();
        disk.flush().unwrap();
        let grown = disk.layer_allocated_bytes().unwrap() - empty;
        assert!(grown <= 4 * BLOCK_SIZE, "grew by {grown} bytes");
    }

    #[test]
    fn out_of_range_and_read_only_are_errors() {
        let (d, b) = base("range", 2);
        let mut disk = LayeredDisk::open(&b, None, false).unwrap();
        let mut buf = [0u8; 512];
        assert!(disk.read_at(&mut buf, 2 * BLOCK_SIZE).is_err());
        assert!(disk.read_at(&mut buf, u64::MAX - 10).is_err());
        assert!(disk.write_at(&buf, 2 * BLOCK_SIZE - 256).is_err());
        let mut ro = LayeredDisk::open(&b, Some(&d.0.join("l")), true).unwrap();
        assert!(ro.write_at(&buf, 0).is_err());
    }

    #[test]
    fn empty_accesses_at_the_start_and_the_end_are_harmless() {
        // 64 blocks: the bitmap is exactly one word, so a bit for the block
        // at the end would be out of bounds.
        let (_d, b) = base("empty", 64);
        let mut disk = LayeredDisk::open(&b, None, false).unwrap();
        let end = disk.size();
        for offset in [0, BLOCK_SIZE - 512, end - 512, end] {
            disk.write_at(&[], offset).unwrap();
            disk.read_at(&mut [], offset).unwrap();
        }
        assert!(disk.write_at(&[], end + 512).is_err());
        // The last sector is written and read back like any other.
        disk.write_at(&[7u8; 512], end - 512).unwrap();
        let mut back = [0u8; 512];
        disk.read_at(&mut back, end - 512).unwrap();
        assert_eq!(back, [7u8; 512]);
    }

    fn contents(disk: &LayeredDisk) -> Vec<u8> {
        let mut all = vec![0u8; disk.size() as usize];
        disk.read_at(&mut all, 0).unwrap();
        all
    }

    #[test]
    fn frozen_copies_carry_the_disk_and_stay_apart_from_it() {
        let (d, b) = base("frozen", 64);
        let mut parent = LayeredDisk::open(&b, None, false).unwrap();
        parent.write_at(&[0x11; 4096], 3 * BLOCK_SIZE).unwrap();
        parent.write_at(&[0x12; 100], 10 * BLOCK_SIZE + 7).unwrap();
        let copy = parent.frozen_copy(&d.0, None).unwrap();
        let open_child = |copy: &File| {
            let lower = copy.try_clone().unwrap();
            LayeredDisk::open_parts(File::open(&b).unwrap(), &b, Some((lower, &b)), None, false)
                .unwrap()
        };
        let mut child = open_child(&copy);
        assert_eq!(contents(&child), contents(&parent));

        // Writes after the copy stay on their own side.
        parent.write_at(&[0x21; 4096], 3 * BLOCK_SIZE).unwrap();
        child.write_at(&[0x31; 10], 10 * BLOCK_SIZE).unwrap();
        let mut blk = vec![0u8; 4096];
        child.read_at(&mut blk, 3 * BLOCK_SIZE).unwrap();
        assert!(blk.iter().all(|&x| x == 0x11));
        child.read_at(&mut blk, 10 * BLOCK_SIZE).unwrap();
        assert!(blk[..10].iter().all(|&x| x == 0x31));
        assert!(blk[10..]
            .iter()
            .zip(10..)
            .all(|(&x, i)| x == if (7..107).contains(&i) { 0x12 } else { 11 }));
        parent.read_at(&mut blk, 10 * BLOCK_SIZE).unwrap();
        assert_eq!(blk[0], 11);

        // A copy of the child (frozen layer + its own writes) for a grandchild.
        let copy2 = child.frozen_copy(&d.0, Some("gen2")).unwrap();
        let grandchild = open_child(&copy2);
        assert_eq!(contents(&grandchild), contents(&child));
        // Only written blocks take space.
        use std::os::unix::fs::MetadataExt;
        assert!(copy2.metadata().unwrap().blocks() * 512 <= 8 * BLOCK_SIZE);
    }

    #[test]
    fn layer_from_another_base_is_refused() {
        let (d, b) = base("wrongbase", 2);
        let layer = d.0.join("layer");
        drop(LayeredDisk::open(&b, Some(&layer), false).unwrap());
        std::fs::write(&b, vec![0u8; 3 * 4096]).unwrap();
        assert!(LayeredDisk::open(&b, Some(&layer), false).is_err());
        let junk = d.0.join("junk");
        std::fs::write(&junk, b"not a layer").unwrap();
        assert!(matches!(
            LayeredDisk::open(&b, Some(&junk), false),
            Err(Error::BadLayer { .. })
        ));
    }
}
