//! Loading an arm64 `Image` (the kernel's own boot format: a 64-byte header
//! with the text offset and the image's size in memory) and the initramfs.
//! The command line and the initramfs's place reach the kernel in the
//! device tree (`super::fdt`), written after the devices exist.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::super::load::{self, open_regular_file};
use super::layout::{fdt_addr, FDT_MAX_SIZE, KERNEL_BASE, RAM_START};

/// Memory the kernel needs free beyond its image, the initramfs and the
/// device tree to boot to user space.
pub const MIN_FREE_MEMORY: u64 = 48 << 20;
/// Linux's arm64 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// "ARM\x64", at offset 56 of an Image header.
const IMAGE_MAGIC: u32 = 0x644d_5241;
/// The text offset of Images older than Linux 3.17, whose header gives no
/// size.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel this VMM can boot (an arm64 Image, uncompressed): {reason}")]
    NotAKernel { path: PathBuf, reason: String },
    #[error("cannot load the kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error(transparent)]
    Initramfs(#[from] load::Error),
    #[error("\"memory_mib\" is {have_mib}, but this kernel and initramfs need at least {need_mib} MiB; raise \"memory_mib\"")]
    MemoryTooSmall { have_mib: u64, need_mib: u64 },
    #[error("the kernel command line is {len} bytes; the most is {max}: shorten \"cmdline\"")]
    CmdlineTooLong { len: usize, max: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A kernel file checked before guest memory exists: the highest guest
/// address it will occupy.
#[derive(Debug)]
pub struct KernelImage {
    pub path: PathBuf,
    pub end: u64,
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    file: File,
}

impl KernelImage {
    /// Opens an Image and finds how much memory it needs.
    pub fn open(path: &Path) -> Result<Self> {
        let (mut file, len) = open_regular_file(path).map_err(|source| Error::Open {
            what: "kernel",
            path: path.to_path_buf(),
            source,
        })?;
        let not_a_kernel = |reason: &str| Error::NotAKernel {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut header = [0u8; 64];
        file.read_exact(&mut header)
            .map_err(|_| not_a_kernel("the file is too short"))?;
        let word =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
        let magic = u32::from_le_bytes(header[56..60].try_into().unwrap_or_default());
        if magic != IMAGE_MAGIC {
            let reason = if header.starts_with(&[0x1f, 0x8b]) {
                "it is gzip-compressed (a vmlinuz); unpack it with `zcat` first"
            } else if header.starts_with(b"\x7fELF") {
                "it is an ELF vmlinux; boot its arch/arm64/boot/Image instead"
            } else {
                "no \"ARM\\x64\" magic in the Image header"
            };
            return Err(not_a_kernel(reason));
        }
        let (text_offset, size) = match word(16) {
            0 => (LEGACY_TEXT_OFFSET, len),
            size => (word(8), size),
        };
        let end = KERNEL_BASE
            .checked_add(text_offset)
            .and_then(|a| a.checked_add(size))
            .ok_or_else(|| not_a_kernel("its header's sizes overflow"))?;
        Ok(KernelImage {
            path: path.to_path_buf(),
            end,
            file,
        })
    }
}

/// Checks that `mem_size` bytes hold the kernel, the initramfs, the device
/// tree and what the kernel needs to run.
pub fn check_memory(kernel: &KernelImage, initramfs_size: u64, mem_size: u64) -> Result<()> {
    let need = (kernel.end - RAM_START) + initramfs_size + FDT_MAX_SIZE + MIN_FREE_MEMORY;
    if mem_size < need {
        return Err(Error::MemoryTooSmall {
            have_mib: mem_size >> 20,
            need_mib: need.div_ceil(1 << 20),
        });
    }
    Ok(())
}

/// Where an initramfs of `size` bytes goes: page-aligned, right below the
/// device tree.
pub fn initramfs_addr(mem_size: u64, size: u64) -> u64 {
    (fdt_addr(mem_size) - size) & !0xfff
}

/// What `load` writes in bulk, to populate before: the kernel, then the
/// initramfs of `initramfs_size` bytes.
pub fn bulk_ranges(kernel: &KernelImage, mem_size: u64, initramfs_size: u64) -> [(u64, u64); 2] {
    [
        (KERNEL_BASE, kernel.end - KERNEL_BASE),
        (initramfs_addr(mem_size, initramfs_size), initramfs_size),
    ]
}

/// What the boot vCPU and the device tree need of the loaded kernel.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// The Image's first instruction.
    pub entry: u64,
    /// The initramfs: guest address and size.
    pub initrd: Option<(u64, u64)>,
    pub cmdline: String,
}

/// Loads the kernel (2 MiB into RAM plus its text offset) and the
/// initramfs (below the device tree), and checks the command line.
#[cfg(target_arch = "aarch64")]
pub fn load(
    mem: &vm_memory::GuestMemoryMmap,
    mem_size: u64,
    mut kernel: KernelImage,
    initramfs: Option<load::Initramfs>,
    cmdline: &str,
) -> Result<LoadedKernel> {
    use linux_loader::loader::{pe::PE, KernelLoader};
    use vm_memory::GuestAddress;

    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let loaded = PE::load(mem, Some(GuestAddress(KERNEL_BASE)), &mut kernel.file, None).map_err(
        |source| Error::LoadKernel {
            path: kernel.path.clone(),
            source,
        },
    )?;
    let initrd = match initramfs {
        None => None,
        Some(initramfs) => {
            let addr = initramfs_addr(mem_size, initramfs.total());
            Some((addr, initramfs.load(mem, addr)?))
        }
    };
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0,
        initrd,
        cmdline: cmdline.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("vmm-a64-boot-test-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn image_header(text_offset: u64, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&size.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn an_image_needs_its_size_in_memory_from_the_kernel_base() {
        let path = temp_file("image", &image_header(0, 30 << 20));
        let k = KernelImage::open(&path).unwrap();
        assert_eq!(k.end, KERNEL_BASE + (30 << 20));
        // 2 MiB below the kernel, 30 of kernel, 4 of initramfs, 2 of
        // device tree, 48 free.
        let err = check_memory(&k, 4 << 20, 64 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MemoryTooSmall {
                    have_mib: 64,
                    need_mib: 86
                }
            ),
            "{err}"
        );
        check_memory(&k, 4 << 20, 86 << 20).unwrap();
        let [kernel, initramfs] = bulk_ranges(&k, 128 << 20, 4 << 20);
        assert_eq!(kernel, (KERNEL_BASE, 30 << 20));
        assert_eq!(initramfs.0 + initramfs.1, fdt_addr(128 << 20));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_old_image_without_a_size_loads_at_the_legacy_offset() {
        let mut bytes = image_header(0, 0);
        bytes.resize(0x1000, 0);
        let path = temp_file("old", &bytes);
        let k = KernelImage::open(&path).unwrap();
        assert_eq!(k.end, KERNEL_BASE + LEGACY_TEXT_OFFSET + 0x1000);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn non_images_are_rejected_with_the_reason() {
        for (name, bytes, reason) in [
            ("gz", [0x1f, 0x8b, 8, 0].repeat(16), "zcat"),
            ("elf", [b"\x7fELF".to_vec(), vec![0; 60]].concat(), "ELF"),
            ("text", vec![b'x'; 64], "magic"),
            ("short", b"ARM".to_vec(), "too short"),
        ] {
            let path = temp_file(name, &bytes);
            let err = KernelImage::open(&path).unwrap_err().to_string();
            assert!(err.contains(reason), "{name}: {err}");
            std::fs::remove_file(path).unwrap();
        }
        let missing = KernelImage::open(Path::new("/nonexistent/Image")).unwrap_err();
        assert!(matches!(missing, Error::Open { .. }));
    }
}
