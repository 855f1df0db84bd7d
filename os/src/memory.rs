//! Guest memory's files and pages, per OS:
//!
//! - [`ram_file`]: the file behind guest RAM. Linux: a memfd (sealable).
//!   macOS: an unnamed file in the temporary folder (no memfd there).
//! - [`seal`]: a frozen file (the base of a fork family) can no longer be
//!   written, resized or mapped shared-writable. Linux: memfd seals.
//!   macOS has no seals: it returns [`SealOutcome::Unavailable`] and the
//!   caller carries on (docs/macos.md says what that leaves open).
//! - [`private_pages`]: the pages of a copy-on-write mapping this process
//!   wrote (Linux: /proc/self/pagemap; macOS: `mincore`'s copied and
//!   anonymous bits).
//! - [`populate_write`]: fault a range in for writing ahead of use.

use std::ffi::CStr;
use std::fs::File;
use std::io;

/// What [`seal`] could do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealOutcome {
    /// No write through any descriptor or new writable shared mapping.
    Sealed,
    /// This OS has no seals.
    Unavailable,
}

/// A new, empty, close-on-exec file for guest RAM, named `name` where the
/// OS shows names (Linux: /proc/PID/maps).
pub fn ram_file(name: &CStr) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a valid NUL-terminated string; the return
        // value is checked before use.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = name;
        crate::file::unnamed_file(&std::env::temp_dir())
    }
}

/// Seals a frozen memory file (see the module's notes).
pub fn seal(file: &File) -> io::Result<SealOutcome> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let rest = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own descriptor with integer arguments.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE | rest) } == 0 {
            return Ok(SealOutcome::Sealed);
        }
        // F_SEAL_WRITE needs no writable shared mapping left; where one
        // is, F_SEAL_FUTURE_WRITE still stops every new write.
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE | rest) } == 0 {
            return Ok(SealOutcome::Sealed);
        }
        Err(io::Error::last_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Ok(SealOutcome::Unavailable)
    }
}

/// Faults `len` bytes at host address `addr` in for writing (where the OS
/// can; elsewhere the pages fault in on first use). The range must lie in
/// a writable mapping the caller owns.
pub fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the caller's range is one of its mappings;
        // MADV_POPULATE_WRITE only faults pages in, it does not change
        // their contents.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // Kernels before 5.14 lack it: the pages then fault in on use.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (addr, len);
        Ok(())
    }
}

/// Ranges of `start..end` (host addresses in this process) holding pages
/// this process wrote in a copy-on-write file mapping: its private pages.
pub fn private_pages(start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    #[cfg(target_os = "linux")]
    {
        pagemap::private_pages(start, end)
    }
    #[cfg(not(target_os = "linux"))]
    {
        mincore::private_pages(start, end)
    }
}

fn push(out: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    match out.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => out.push((s, e)),
    }
}

/// macOS: `mincore` tells, page by page, whether a page was copied on
/// write or is anonymous (or paged out, which only anonymous pages are in
/// a file mapping).
#[cfg(not(target_os = "linux"))]
mod mincore {
    use std::io;

    const MINCORE_PAGED_OUT: u8 = 0x20;
    const MINCORE_COPIED: u8 = 0x40;
    const MINCORE_ANONYMOUS: u8 = 0x80;

    pub fn private_pages(start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let mut out = Vec::new();
        let mut vec = vec![0 as libc::c_char; 4096];
        let mut pos = start;
        while pos < end {
            let pages = ((end - pos).div_ceil(page)).min(vec.len() as u64);
            let len = (pages * page).min(end - pos);
            // SAFETY: `vec` has room for one byte per page of the range,
            // which lies in the caller's mappings.
            let rc = unsafe {
                libc::mincore(pos as *const libc::c_void, len as usize, vec.as_mut_ptr())
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            for (i, &bits) in vec[..pages as usize].iter().enumerate() {
                if bits as u8 & (MINCORE_COPIED | MINCORE_ANONYMOUS | MINCORE_PAGED_OUT) != 0 {
                    let addr = pos + i as u64 * page;
                    super::push(&mut out, addr, (addr + page).min(end));
                }
            }
            pos += len;
        }
        Ok(out)
    }
}

/// Linux: finding a mapping's private (copied-on-write) pages in
/// /proc/self/pagemap.
#[cfg(target_os = "linux")]
pub mod pagemap {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const PAGE: u64 = 4096;
    const PAGE_IS_FILE: u64 = 1 << 2;
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;

    #[repr(C)]
    #[derive(Default)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct PageRegion {
        start: u64,
        end: u64,
        categories: u64,
    }

    /// _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;

    /// Ranges of `start..end` (host addresses in this process) backed by
    /// anonymous pages: in a copy-on-write file mapping, the pages written
    /// since it was mapped. Uses PAGEMAP_SCAN (Linux 6.7+), else reads
    /// /proc/self/pagemap entry by entry.
    pub fn private_pages(start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let file = File::open("/proc/self/pagemap")?;
        match scan(&file, start, end) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTTY)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                read_entries(&file, start, end)
            }
            other => other,
        }
    }

    use super::push;

    fn scan(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        // Present and not file-backed; then swapped out (also anonymous).
        for (inverted, mask) in [
            (PAGE_IS_FILE, PAGE_IS_FILE | PAGE_IS_PRESENT),
            (0, PAGE_IS_SWAPPED),
        ] {
            let mut regions = vec![PageRegion::default(); 512];
            let mut pos = start;
            while pos < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    start: pos,
                    end,
                    vec: regions.as_mut_ptr() as u64,
                    vec_len: regions.len() as u64,
                    category_inverted: inverted,
                    category_mask: mask,
                    return_mask: mask,
                    ..Default::default()
                };
                // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
                // `regions.len()` writable page_region entries that outlive
                // the call.
                let n = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                for r in &regions[..n as usize] {
                    push(&mut out, r.start, r.end);
                }
                if arg.walk_end <= pos {
                    break;
                }
                pos = arg.walk_end;
            }
        }
        out.sort_unstable();
        let mut merged = Vec::with_capacity(out.len());
        for (s, e) in out {
            push(&mut merged, s, e);
        }
        Ok(merged)
    }

    /// Both ways of finding them (PAGEMAP_SCAN, then the entries), for
    /// tests that compare them.
    pub fn both_ways(start: u64, end: u64) -> io::Result<[Vec<(u64, u64)>; 2]> {
        let file = File::open("/proc/self/pagemap")?;
        Ok([scan(&file, start, end)?, read_entries(&file, start, end)?])
    }

    fn read_entries(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8 * 4096];
        let mut page = start / PAGE;
        while page < end / PAGE {
            let count = (end / PAGE - page).min(4096);
            let bytes = &mut buf[..count as usize * 8];
            file.read_exact_at(bytes, page * 8)?;
            for (i, entry) in bytes.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                if e & (PRESENT | SWAPPED) != 0 && e & FILE_OR_SHARED == 0 {
                    let addr = (page + i as u64) * PAGE;
                    push(&mut out, addr, addr + PAGE);
                }
            }
            page += count;
        }
        Ok(out)
    }
}
