//! Guest memory: one memfd, mapped through vm-memory with file offsets, so
//! snapshot and fork can work by mapping rather than copying.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}; is there enough memory (or /dev/shm space)?")]
    Size { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory with the hypervisor: {0}")]
    Register(hypervisor::Error),
    #[error("cannot allocate {len} bytes of guest memory (host address {addr:#x}): {source}; is there enough free memory?")]
    Allocate {
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Name of the guest RAM memfd (visible in /proc/<pid>/maps).
pub const MEMFD_NAME: &str = "vmm-guest-ram";

/// Guest memory and the file behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub file: Arc<File>,
    pub size: u64,
}

/// The guest-physical ranges for `size` bytes of RAM: below the MMIO gap,
/// then above 4 GiB. Each entry is (guest address, length, file offset).
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, MMIO_GAP_START, 0),
            (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START),
        ]
    }
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest memory backed by a new memfd.
    pub fn new(size: u64) -> Result<Self> {
        // SAFETY: the name is a valid NUL-terminated string; the return value
        // is checked before use.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created file descriptor that nothing else owns.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|source| Error::Size { size, source })?;
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(gpa, len, off)| {
                (
                    GuestAddress(gpa),
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), off)),
                )
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|source| Error::Map { size, source })?;
        Ok(GuestRam { memory, file, size })
    }

    /// Allocates the backing pages of the guest ranges `(gpa, len)` and
    /// fills in the VMM's page tables for them, ahead of writing them:
    /// faulting 4 KiB pages in one at a time costs several times more. The
    /// work is split across two threads. Ranges past the end of RAM are
    /// clipped.
    pub fn populate(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let pieces = self.host_pieces(ranges);
        let total: u64 = pieces.iter().map(|p| p.1).sum();
        // Split the pieces into two halves of about equal size.
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let mut taken = 0;
        for (addr, len) in pieces {
            let room = (total / 2).saturating_sub(taken);
            let head = (len.min(room)) & !0xfff;
            if head > 0 {
                first.push((addr, head));
            }
            if len > head {
                second.push((addr + head as usize, len - head));
            }
            taken += head;
        }
        std::thread::scope(|scope| {
            let helper = scope.spawn(|| populate_host(&second));
            let mine = populate_host(&first);
            let theirs = helper.join().unwrap_or(Ok(()));
            mine.and(theirs)
        })
    }

    /// Host addresses and lengths of the RAM inside guest ranges.
    fn host_pieces(&self, ranges: &[(u64, u64)]) -> Vec<(usize, u64)> {
        let mut pieces = Vec::new();
        for &(gpa, len) in ranges {
            let end = gpa.saturating_add(len);
            for region in self.memory.iter() {
                let start = region.start_addr().0;
                let (lo, hi) = (gpa.max(start) & !0xfff, end.min(start + region.len()));
                if lo < hi {
                    pieces.push((region.as_ptr() as usize + (lo - start) as usize, hi - lo));
                }
            }
        }
        pieces
    }

    /// Maps every RAM region into `vm`, slots numbered from 0.
    pub fn register(&self, vm: &dyn hypervisor::Vm) -> Result<()> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = hypervisor::MemorySlot {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping belongs to `self.memory`, which the VM
            // object keeps alive for as long as the hypervisor VM exists.
            unsafe { vm.set_memory_slot(slot) }.map_err(Error::Register)?;
        }
        Ok(())
    }
}

fn populate_host(pieces: &[(usize, u64)]) -> Result<()> {
    for &(addr, len) in pieces {
        // SAFETY: the range lies inside a guest RAM mapping owned by a live
        // GuestRam; MADV_POPULATE_WRITE only faults pages in, it does not
        // change their contents.
        let rc = unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // Kernels before 5.14 lack it: the pages then fault in on use.
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(Error::Allocate {
                addr: addr as u64,
                len,
                source: err,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_memory_is_one_range_large_memory_skips_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20, 0)]);
        let big = 4u64 << 30;
        assert_eq!(
            ram_ranges(big),
            vec![
                (0, MMIO_GAP_START, 0),
                (MMIO_GAP_END, big - MMIO_GAP_START, MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn memory_is_backed_by_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(2 << 20).unwrap();
        ram.memory
            .write_obj(0xabcd_u16, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 2];
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u16::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn populate_backs_the_ranges_and_keeps_contents() {
        use std::os::unix::fs::MetadataExt;
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory.write_obj(7u8, GuestAddress(0x2000)).unwrap();
        ram.populate(&[(0, 3 << 20), (5 << 20, 1 << 20)]).unwrap();
        // Allocated blocks are counted in 512-byte units.
        assert!(ram.file.metadata().unwrap().blocks() * 512 >= 4 << 20);
        assert_eq!(ram.memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 7);
        // Ranges past the end of RAM are clipped, not errors.
        ram.populate(&[(6 << 20, 4 << 20), (1 << 40, 4096)])
            .unwrap();
    }
}
