//! Loading the kernel and initramfs, and the Linux boot parameters
//! ("zero page") with the e820 memory map and command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, SETUP_RNG_SEED};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::super::load::{self, open_regular_file, Initramfs};
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_END, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    MPTABLE_START, RNG_SEED_START, ZERO_PAGE_START,
};

/// Memory the kernel needs free beyond its image and the initramfs to boot
/// to user space (page tables, memmap, slab, the unpacked initramfs).
pub const MIN_FREE_MEMORY: u64 = 48 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a kernel this VMM can boot (an x86_64 ELF vmlinux or a bzImage): {reason}"
    )]
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
    #[error("the kernel command line is not valid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot read the host's random generator for the guest's boot seed: {0}; check that getrandom(2) works on this host")]
    Seed(std::io::Error),
    #[error("cannot write the {what} to guest memory: {source}")]
    Write {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Kernel image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A kernel file checked before guest memory exists: its format and the
/// highest guest address it will occupy.
#[derive(Debug)]
pub struct KernelImage {
    pub path: PathBuf,
    pub format: KernelFormat,
    pub end: u64,
    file: File,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

impl KernelImage {
    /// Opens a kernel and finds how much memory it needs.
    pub fn open(path: &Path) -> Result<Self> {
        let (mut file, _) = open_regular_file(path).map_err(|source| Error::Open {
            what: "kernel",
            path: path.to_path_buf(),
            source,
        })?;
        let not_a_kernel = |reason: &str| Error::NotAKernel {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut ident = [0u8; 0x40];
        read_at(&mut file, 0, &mut ident).map_err(|_| not_a_kernel("the file is too short"))?;
        let (format, end) = if &ident[..4] == b"\x7fELF" {
            if ident[4] != 2 || u16::from_le_bytes([ident[0x12], ident[0x13]]) != 0x3e {
                return Err(not_a_kernel("the ELF file is not x86_64"));
            }
            let phoff = u64::from_le_bytes(ident[0x20..0x28].try_into().unwrap_or_default());
            let phentsize = u16::from_le_bytes([ident[0x36], ident[0x37]]) as u64;
            let phnum = u16::from_le_bytes([ident[0x38], ident[0x39]]) as u64;
            let mut end = 0u64;
            for i in 0..phnum.min(64) {
                let mut ph = [0u8; 0x38];
                read_at(&mut file, phoff + i * phentsize, &mut ph)
                    .map_err(|_| not_a_kernel("truncated ELF program headers"))?;
                const PT_LOAD: u32 = 1;
                if u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default()) != PT_LOAD {
                    continue;
                }
                let paddr = u64::from_le_bytes(ph[0x18..0x20].try_into().unwrap_or_default());
                let memsz = u64::from_le_bytes(ph[0x28..0x30].try_into().unwrap_or_default());
                end = end.max(paddr.saturating_add(memsz));
            }
            if end == 0 {
                return Err(not_a_kernel("the ELF file has nothing to load"));
            }
            (KernelFormat::Elf, end)
        } else {
            let mut hdr = [0u8; 0x270];
            read_at(&mut file, 0, &mut hdr).map_err(|_| not_a_kernel("the file is too short"))?;
            if &hdr[0x202..0x206] != b"HdrS" {
                return Err(not_a_kernel(
                    "no ELF header and no bzImage \"HdrS\" signature",
                ));
            }
            // `init_size`: the memory the kernel needs from its load address.
            let init_size = u32::from_le_bytes(hdr[0x260..0x264].try_into().unwrap_or_default());
            (KernelFormat::BzImage, HIMEM_START + u64::from(init_size))
        };
        Ok(KernelImage {
            path: path.to_path_buf(),
            format,
            end,
            file,
        })
    }
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Checks that `mem_size` bytes hold the kernel, the initramfs and what the
/// kernel needs to run.
pub fn check_memory(kernel: &KernelImage, initramfs_size: u64, mem_size: u64) -> Result<()> {
    let need = kernel.end + initramfs_size + MIN_FREE_MEMORY;
    let low_ram = mem_size.min(MMIO_GAP_START);
    if low_ram < need {
        return Err(Error::MemoryTooSmall {
            have_mib: mem_size >> 20,
            need_mib: need.div_ceil(1 << 20),
        });
    }
    Ok(())
}

/// Where an initramfs of `size` bytes goes: page-aligned, at the top of
/// the RAM below the MMIO gap.
pub fn initramfs_addr(mem_size: u64, size: u64) -> u64 {
    (mem_size.min(MMIO_GAP_START) - size) & !0xfff
}

/// What `load` writes in bulk, to populate before: the kernel, then the
/// initramfs of `initramfs_size` bytes.
pub fn bulk_ranges(kernel: &KernelImage, mem_size: u64, initramfs_size: u64) -> [(u64, u64); 2] {
    [
        (HIMEM_START, kernel.end - HIMEM_START),
        (initramfs_addr(mem_size, initramfs_size), initramfs_size),
    ]
}

/// Wrapper so the zero page can be written with vm-memory.
#[derive(Clone, Copy, Default)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a plain-old-data C struct (integers and arrays of
// them) for which every bit pattern is valid.
unsafe impl ByteValued for ZeroPage {}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The e820 memory map for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Loads the kernel, the initramfs (at the top of low memory) and the
/// command line, and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    mut kernel: KernelImage,
    initramfs: Option<Initramfs>,
    cmdline: &str,
) -> Result<LoadedKernel> {
    let load_err = |source| Error::LoadKernel {
        path: kernel.path.clone(),
        source,
    };
    let mut params = ZeroPage::default();
    let entry = match kernel.format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            r.kernel_load.0
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            if let Some(hdr) = r.setup_header {
                params.0.hdr = hdr;
            }
            // The 64-bit entry point is 0x200 past the protected-mode code.
            r.kernel_load.0 + 0x200
        }
    };

    let hdr = &mut params.0.hdr;
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.kernel_alignment = 0x100_0000;

    if let Some(initramfs) = initramfs {
        let addr = initramfs_addr(mem_size, initramfs.total());
        let total = initramfs.load(mem, addr)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = total as u32;
    }

    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    cl.insert_str(cmdline).map_err(Error::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|_| {
        Error::Write {
            what: "command line",
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(CMDLINE_START)),
        }
    })?;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;

    let map = e820_map(mem_size);
    for (slot, (addr, size, type_)) in params.0.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.0.e820_entries = map.len() as u8;

    let mut seed = [0u8; RNG_SEED_BYTES];
    vmm_os::fill_random(&mut seed).map_err(Error::Seed)?;
    mem.write_slice(&rng_seed_setup_data(&seed), GuestAddress(RNG_SEED_START))
        .map_err(|source| Error::Write {
            what: "random seed",
            source,
        })?;
    params.0.hdr.setup_data = RNG_SEED_START;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| Error::Write {
            what: "boot parameters",
            source,
        })?;
    Ok(LoadedKernel { entry })
}

/// Bytes of host randomness the guest kernel gets at boot.
const RNG_SEED_BYTES: usize = 32;

/// A `setup_data` entry carrying `seed`: next (none), type, length, data.
/// The kernel credits it to its random generator at boot when it trusts
/// the boot loader (`random.trust_bootloader`, on by default in Debian's
/// kernels and ours), so its generator is ready at once instead of after
/// seconds of gathering timing jitter (8 s of an emulated PVM guest's
/// boot), and wipes it from memory after use.
fn rng_seed_setup_data(seed: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(16 + seed.len());
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    data.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    data.extend_from_slice(seed);
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_boot_seed_is_one_setup_data_entry_between_the_page_tables_and_the_cmdline() {
        let seed: Vec<u8> = (1..=RNG_SEED_BYTES as u8).collect();
        let data = rng_seed_setup_data(&seed);
        assert_eq!(&data[..8], &[0; 8], "no next entry");
        assert_eq!(u32::from_le_bytes(data[8..12].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_le_bytes(data[12..16].try_into().unwrap()),
            RNG_SEED_BYTES as u32
        );
        assert_eq!(&data[16..], &seed[..]);
        use super::super::layout::PDE_START;
        const { assert!(RNG_SEED_START >= PDE_START + 0x1000) };
        assert!(RNG_SEED_START + data.len() as u64 <= CMDLINE_START);
    }

    #[test]
    fn e820_skips_the_mptable_and_the_mmio_gap() {
        let small = e820_map(128 << 20);
        assert_eq!(small[0], (0, MPTABLE_START, E820_RAM));
        assert_eq!(small[1].2, E820_RESERVED);
        assert_eq!(small[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(small.len(), 3);
        let big = e820_map(5 << 30);
        assert_eq!(big[3], (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START, E820_RAM));
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("vmm-boot-test-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn non_kernels_are_rejected_with_the_reason() {
        let path = temp_file("text", &[b'x'; 0x400]);
        let err = KernelImage::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a kernel"), "{err}");
        let short = temp_file("short", b"\x7fELF");
        let err = KernelImage::open(&short).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let missing = KernelImage::open(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(missing, Error::Open { .. }));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(short).unwrap();
    }

    #[test]
    fn memory_check_counts_kernel_initramfs_and_headroom() {
        // A minimal ELF64 x86_64 header with one PT_LOAD ending at 20 MiB.
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x12] = 0x3e;
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        elf[ph + 0x18..ph + 0x20].copy_from_slice(&(16u64 << 20).to_le_bytes());
        elf[ph + 0x28..ph + 0x30].copy_from_slice(&(4u64 << 20).to_le_bytes());
        let path = temp_file("elf", &elf);
        let k = KernelImage::open(&path).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.end, 20 << 20);
        let err = check_memory(&k, 2 << 20, 32 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MemoryTooSmall {
                    have_mib: 32,
                    need_mib: 70
                }
            ),
            "{err}"
        );
        check_memory(&k, 2 << 20, 70 << 20).unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
