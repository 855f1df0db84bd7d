//! Guest memory: one memfd, mapped through vm-memory with file offsets, so
//! snapshot and fork can work by mapping rather than copying.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot seal the frozen guest memory file against writes: {0}; the kernel needs memfd seals (Linux 3.17+, F_SEAL_FUTURE_WRITE 5.1+)")]
    Seal(std::io::Error),
    #[error("cannot map guest memory copy-on-write: {0}")]
    MapPrivate(std::io::Error),
    #[error("cannot find the pages the guest changed (/proc/self/pagemap): {0}")]
    Pagemap(std::io::Error),
    #[error("cannot copy guest memory: {0}")]
    Copy(std::io::Error),
    #[error("the guest memory file is {found} bytes, the VM needs {expected}")]
    ImageSize { expected: u64, found: u64 },
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

/// Guest memory and the files behind it.
///
/// A booted VM's memory is one memfd mapped shared. Once the VM is forked,
/// that file is frozen: every VM of the family maps it copy-on-write
/// (`MAP_PRIVATE`), and each later fork adds an overlay file holding the
/// pages the forking VM had changed since (see [`MemoryImage`]).
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// The base file (frozen once `private`).
    pub file: Arc<File>,
    pub size: u64,
    /// Overlays applied over the base, oldest first.
    overlays: Vec<Overlay>,
    /// Mapped copy-on-write: the files no longer change.
    private: bool,
}

/// Pages of guest memory that differ from the layers below: a file that
/// holds them at their offsets in the base file, and those ranges
/// (file offset, length), page-aligned.
#[derive(Clone)]
pub struct Overlay {
    pub file: Arc<File>,
    pub runs: Vec<(u64, u64)>,
}

/// A frozen view of guest memory, for a new VM (a fork child) to map
/// copy-on-write: the base file, then the overlays over it.
#[derive(Clone)]
pub struct MemoryImage {
    pub size: u64,
    pub base: Arc<File>,
    pub overlays: Vec<Overlay>,
}

const PAGE: u64 = 4096;
/// Overlays a VM keeps before the next fork merges them into one.
pub const MAX_OVERLAYS: usize = 16;

/// Sorts ranges and merges those that touch or overlap.
fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (off, len) in runs {
        match merged.last_mut() {
            Some(last) if off <= last.0 + last.1 => {
                last.1 = last.1.max(off + len - last.0);
            }
            _ => merged.push((off, len)),
        }
    }
    merged
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest memory backed by a new memfd.
    pub fn new(size: u64) -> Result<Self> {
        let file = Arc::new(memfd(c"vmm-guest-ram")?);
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
        Ok(GuestRam {
            memory,
            file,
            size,
            overlays: Vec::new(),
            private: false,
        })
    }

    /// Maps a frozen image copy-on-write: nothing is copied or read until
    /// the guest touches it, so this costs the same at any memory size.
    pub fn from_image(image: &MemoryImage) -> Result<Self> {
        let size = image.size;
        let found = image.base.metadata().map_err(Error::MapPrivate)?.len();
        if found < size {
            return Err(Error::ImageSize {
                expected: size,
                found,
            });
        }
        let mut regions = Vec::new();
        for (gpa, len, off) in ram_ranges(size) {
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::from_arc(image.base.clone(), off))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::MapPrivate(std::io::Error::other(format!("{e:?}"))))?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| Error::MapPrivate(std::io::Error::other("bad region")))?,
            );
        }
        Self::with_overlays(image, regions)
    }

    /// Guest RAM over `regions` (the image's base, mapped copy-on-write),
    /// with the image's overlays mapped over it.
    fn with_overlays(image: &MemoryImage, regions: Vec<GuestRegionMmap>) -> Result<Self> {
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| Error::MapPrivate(std::io::Error::other(format!("{e:?}"))))?;
        let mut ram = GuestRam {
            memory,
            file: image.base.clone(),
            size: image.size,
            overlays: Vec::new(),
            private: true,
        };
        ram.add_overlays(&image.overlays)?;
        Ok(ram)
    }

    /// Maps `overlays` (of an image over this memory's base) over it.
    pub fn add_overlays(&mut self, overlays: &[Overlay]) -> Result<()> {
        for overlay in overlays {
            self.map_overlay(overlay.clone())?;
        }
        Ok(())
    }

    /// The host ranges of file range `off..off+len`, split where RAM is.
    fn host_runs(&self, off: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        for ((_, rlen, rstart), region) in ram_ranges(self.size).into_iter().zip(self.memory.iter())
        {
            let (lo, hi) = (off.max(rstart), (off + len).min(rstart + rlen));
            if lo < hi {
                out.push((
                    region.as_ptr() as usize + (lo - rstart) as usize,
                    lo,
                    hi - lo,
                ));
            }
        }
        out
    }

    /// Maps `file` copy-on-write over host range `addr..addr+len` at `off`.
    fn map_private_at(file: &File, addr: usize, off: u64, len: u64) -> Result<()> {
        // SAFETY: `addr..addr+len` lies inside a guest RAM mapping this
        // GuestRam owns; MAP_FIXED replaces those pages with a private view
        // of `file`, which holds the same guest content, so every pointer
        // into guest memory stays valid. The caller has paused everything
        // that accesses guest memory.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::MapPrivate(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn map_overlay(&mut self, overlay: Overlay) -> Result<()> {
        for &(off, len) in &overlay.runs {
            for (addr, file_off, len) in self.host_runs(off, len) {
                Self::map_private_at(&overlay.file, addr, file_off, len)?;
            }
        }
        self.overlays.push(overlay);
        Ok(())
    }

    /// Freezes the memory as it is now and returns that image, for new VMs
    /// to map copy-on-write. This VM keeps running on the same image, also
    /// copy-on-write. The first freeze copies nothing (the memfd becomes the
    /// frozen base); later ones copy only the pages this VM changed since
    /// the previous freeze into a new overlay. Call it with the VM paused.
    pub fn freeze(&mut self) -> Result<MemoryImage> {
        if !self.private {
            for ((_, len, off), region) in ram_ranges(self.size).into_iter().zip(self.memory.iter())
            {
                Self::map_private_at(&self.file, region.as_ptr() as usize, off, len)?;
            }
            self.private = true;
            seal(&self.file)?;
        } else {
            let mut runs = self.changed_runs()?;
            if !runs.is_empty() {
                if self.overlays.len() >= MAX_OVERLAYS {
                    // One overlay with every page changed since the base.
                    runs.extend(self.overlays.drain(..).flat_map(|o| o.runs));
                    runs = merge_runs(runs);
                }
                let overlay = self.write_overlay(&runs)?;
                self.map_overlay(overlay)?;
            }
        }
        Ok(MemoryImage {
            size: self.size,
            base: self.file.clone(),
            overlays: self.overlays.clone(),
        })
    }

    /// Base-file ranges of the pages this VM wrote since its memory was
    /// mapped copy-on-write (its private pages).
    fn changed_runs(&self) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for ((_, _, off), region) in ram_ranges(self.size).into_iter().zip(self.memory.iter()) {
            let base = region.as_ptr() as u64;
            for (start, end) in
                vmm_os::memory::private_pages(base, base + region.len()).map_err(Error::Pagemap)?
            {
                let (o, l) = (off + (start - base), end - start);
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == o => last.1 += l,
                    _ => runs.push((o, l)),
                }
            }
        }
        Ok(runs)
    }

    /// A new memfd holding the guest pages at `runs` (at their offsets).
    fn write_overlay(&self, runs: &[(u64, u64)]) -> Result<Overlay> {
        let file = memfd(c"vmm-guest-ram-overlay")?;
        file.set_len(self.size).map_err(|source| Error::Size {
            size: self.size,
            source,
        })?;
        self.copy_runs(runs, &file)?;
        seal(&file)?;
        Ok(Overlay {
            file: Arc::new(file),
            runs: runs.to_vec(),
        })
    }

    /// Base-file ranges that may hold non-zero guest data: the base file's
    /// data extents, the overlays' runs and this VM's private pages.
    pub fn data_runs(&self) -> Result<Vec<(u64, u64)>> {
        let mut runs = file_data_extents(&self.file, self.size).map_err(Error::Copy)?;
        for overlay in &self.overlays {
            runs.extend_from_slice(&overlay.runs);
        }
        if self.private {
            runs.extend(self.changed_runs()?);
        }
        Ok(merge_runs(runs))
    }

    /// Writes guest memory as it is now into `out` (sized to the memory,
    /// sparse: only `data_runs` are written). Returns the bytes written.
    /// Call it with the VM paused.
    pub fn write_to(&self, out: &File) -> Result<u64> {
        out.set_len(self.size).map_err(Error::Copy)?;
        let runs = self.data_runs()?;
        self.copy_runs(&runs, out)?;
        Ok(runs.iter().map(|r| r.1).sum())
    }

    /// Copies the guest memory at base-file ranges `runs` into `out` at the
    /// same offsets.
    fn copy_runs(&self, runs: &[(u64, u64)], out: &File) -> Result<()> {
        for &(off, len) in runs {
            for (addr, file_off, len) in self.host_runs(off, len) {
                // SAFETY: the range lies inside guest RAM mapped by this
                // GuestRam, readable, and nothing writes it while the VM is
                // paused.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
                out.write_all_at(bytes, file_off).map_err(Error::Copy)?;
            }
        }
        Ok(())
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

/// Seals a frozen memory file: no write, resize or new writable shared
/// mapping, by this process or any it hands the file to (fork children
/// share the file with their parent and siblings). Copy-on-write mappings
/// stay possible. Hosts without seals (macOS) go on without them.
fn seal(file: &File) -> Result<()> {
    match vmm_os::memory::seal(file).map_err(Error::Seal)? {
        vmm_os::memory::SealOutcome::Sealed => {}
        vmm_os::memory::SealOutcome::Unavailable => {
            tracing::debug!("this host has no file seals: the frozen guest memory stays writable")
        }
    }
    Ok(())
}

fn memfd(name: &std::ffi::CStr) -> Result<File> {
    vmm_os::memory::ram_file(name).map_err(Error::Memfd)
}

/// The data extents (SEEK_DATA/SEEK_HOLE) of `file` below `size`.
fn file_data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = ((data as u64) & !(PAGE - 1), (hole as u64).min(size));
        if start < end {
            extents.push((start, end - start));
        }
        pos = hole;
    }
    Ok(extents)
}

fn populate_host(pieces: &[(usize, u64)]) -> Result<()> {
    for &(addr, len) in pieces {
        vmm_os::memory::populate_write(addr, len as usize).map_err(|source| Error::Allocate {
            addr: addr as u64,
            len,
            source,
        })?;
    }
    Ok(())
}

/// Resident memory of this process outside the guest RAM mapping, in KiB,
/// from /proc/self/smaps.
pub fn overhead_rss_kib() -> Option<u64> {
    overhead_rss_kib_of("self")
}

/// `overhead_rss_kib` of process `pid` ("self" for this one).
pub fn overhead_rss_kib_of(pid: &str) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest_ram = line.contains(MEMFD_NAME);
        } else if first == "Rss:" && !in_guest_ram {
            total += fields.next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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

    fn read(ram: &GuestRam, addr: u64) -> u8 {
        ram.memory.read_obj::<u8>(GuestAddress(addr)).unwrap()
    }

    /// What a fork child gets cannot change: no write, no resize, no hole
    /// punched, no writable shared mapping (a copy-on-write one works).
    /// Linux only: macOS has no seals (docs/macos.md).
    #[cfg(target_os = "linux")]
    fn assert_sealed(file: &File) {
        use std::os::unix::fs::FileExt;
        let err = file.write_at(&[9], 0x1000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert!(file.set_len(1 << 20).is_err());
        let fd = file.as_raw_fd();
        // SAFETY: fallocate on our own descriptor.
        let punched = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            )
        };
        assert_ne!(punched, 0, "a hole was punched in a sealed file");
        for (flags, allowed) in [(libc::MAP_SHARED, false), (libc::MAP_PRIVATE, true)] {
            // SAFETY: a new mapping of our own file, unmapped below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            assert_eq!(p != libc::MAP_FAILED, allowed, "mmap flags {flags:#x}");
            if p != libc::MAP_FAILED {
                // SAFETY: `p` is the 4 KiB mapping made above.
                unsafe { libc::munmap(p, 4096) };
            }
        }
    }

    #[test]
    fn forks_of_forks_see_the_image_and_stay_apart() {
        let mut parent = GuestRam::new(16 << 20).unwrap();
        parent.memory.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        parent.memory.write_obj(2u8, GuestAddress(0x5000)).unwrap();
        // First freeze: no copy, the memfd becomes the base.
        let image = parent.freeze().unwrap();
        assert!(image.overlays.is_empty());
        let mut child = GuestRam::from_image(&image).unwrap();
        assert_eq!((read(&child, 0x1000), read(&child, 0x5000)), (1, 2));

        // Writes after the fork are private to each side.
        parent.memory.write_obj(10u8, GuestAddress(0x1000)).unwrap();
        child.memory.write_obj(20u8, GuestAddress(0x5000)).unwrap();
        child
            .memory
            .write_obj(21u8, GuestAddress(0x80_0000))
            .unwrap();
        assert_eq!((read(&parent, 0x5000), read(&child, 0x1000)), (2, 1));
        let mut base = [0u8; 1];
        image.base.read_exact_at(&mut base, 0x1000).unwrap();
        assert_eq!(base[0], 1, "the frozen base keeps the fork-time content");
        #[cfg(target_os = "linux")]
        {
            assert_sealed(&image.base);
            // Both ways of finding private pages agree.
            let region = child.memory.iter().next().unwrap();
            let start = region.as_ptr() as u64;
            let [scanned, entries] =
                vmm_os::memory::pagemap::both_ways(start, start + region.len()).unwrap();
            assert_eq!(scanned, entries);
            assert_eq!(scanned.len(), 2);
        }

        // A fork of the child: an overlay with exactly the child's pages.
        let image2 = child.freeze().unwrap();
        assert_eq!(image2.overlays.len(), 1);
        #[cfg(target_os = "linux")]
        assert_sealed(&image2.overlays[0].file);
        assert_eq!(
            image2.overlays[0].runs,
            vec![(0x5000, 0x1000), (0x80_0000, 0x1000)]
        );
        let grandchild = GuestRam::from_image(&image2).unwrap();
        assert_eq!(
            (
                read(&grandchild, 0x1000),
                read(&grandchild, 0x5000),
                read(&grandchild, 0x80_0000)
            ),
            (1, 20, 21)
        );
        // The child still reads its own data after remapping onto its overlay.
        child
            .memory
            .write_obj(22u8, GuestAddress(0x80_0000))
            .unwrap();
        assert_eq!((read(&child, 0x5000), read(&child, 0x80_0000)), (20, 22));
        assert_eq!(read(&grandchild, 0x80_0000), 21);

        // A snapshot file holds what the VM sees, sparse.
        let out = tempfile_in_tmp();
        child.write_to(&out).unwrap();
        let mut b = [0u8; 1];
        out.read_exact_at(&mut b, 0x80_0000).unwrap();
        assert_eq!(b[0], 22);
        out.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(b[0], 1);
        use std::os::unix::fs::MetadataExt;
        assert!(out.metadata().unwrap().blocks() * 512 < 1 << 20);
    }

    #[test]
    fn overlays_are_merged_past_the_limit() {
        let mut vm = GuestRam::new(8 << 20).unwrap();
        vm.freeze().unwrap();
        for round in 0..(MAX_OVERLAYS as u64 + 4) {
            vm.memory
                .write_obj(round as u8 + 1, GuestAddress(round * 0x2000))
                .unwrap();
            let image = vm.freeze().unwrap();
            assert!(image.overlays.len() <= MAX_OVERLAYS);
            let copy = GuestRam::from_image(&image).unwrap();
            for r in 0..=round {
                assert_eq!(read(&copy, r * 0x2000), r as u8 + 1, "round {round}");
            }
        }
    }

    fn tempfile_in_tmp() -> File {
        vmm_os::file::unnamed_file(&std::env::temp_dir()).unwrap()
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
