//! A request's or reply's bytes as a list of memory segments (the guest
//! buffers of one descriptor chain), so file data moves between a host
//! file and guest memory with one `preadv`/`pwritev` and no copy.

use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// The segments of one side (device-readable or device-writable) of a
/// chain. Valid while the memory they point into lives (`'a`).
pub struct IoBuf<'a> {
    segs: Vec<(*mut u8, usize)>,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

/// Most segments one side of a chain may have (Linux's virtio-fs driver
/// uses one per page of a 1 MiB request, plus headers).
const MAX_SEGMENTS: usize = 1024;

/// Why a chain's buffers are not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    #[error("a chain has too many descriptors or bytes")]
    TooLarge,
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
}

impl<'a> IoBuf<'a> {
    /// Splits a chain into its device-readable and device-writable parts
    /// (the readable part must come first, virtio 1.2 2.7.4.2).
    pub fn from_chain(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<(IoBuf<'a>, IoBuf<'a>), ChainError> {
        let mut readable = IoBuf::empty();
        let mut writable = IoBuf::empty();
        for desc in chain {
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let side = if desc.is_write_only() {
                &mut writable
            } else if writable.len > 0 {
                return Err(ChainError::Order);
            } else {
                &mut readable
            };
            let slice = mem
                .get_slice(desc.addr(), len)
                .map_err(|_| ChainError::OutOfMemory)?;
            if side.segs.len() >= MAX_SEGMENTS {
                return Err(ChainError::TooLarge);
            }
            side.len = side.len.checked_add(len).ok_or(ChainError::TooLarge)?;
            side.segs.push((slice.ptr_guard_mut().as_ptr(), len));
        }
        Ok((readable, writable))
    }

    fn empty() -> Self {
        IoBuf {
            segs: Vec::new(),
            len: 0,
            _mem: PhantomData,
        }
    }

    /// Segments over byte vectors (for tests of the request handling).
    pub fn from_vecs(bufs: &'a mut [Vec<u8>]) -> Self {
        let mut b = IoBuf::empty();
        for v in bufs.iter_mut() {
            b.len += v.len();
            b.segs.push((v.as_mut_ptr(), v.len()));
        }
        b
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// iovecs for bytes `[pos, pos + len)` (clipped to the buffer).
    fn iovecs(&self, pos: usize, len: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        let mut skip = pos;
        let mut want = len;
        for &(ptr, seg_len) in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(want);
            out.push(libc::iovec {
                // SAFETY: `skip < seg_len`, so the pointer stays inside the
                // segment.
                iov_base: unsafe { ptr.add(skip) }.cast(),
                iov_len: n,
            });
            want -= n;
            skip = 0;
        }
        out
    }

    /// Copies bytes at `pos` into `out`; fails when fewer are there.
    pub fn read_at(&self, pos: usize, out: &mut [u8]) -> io::Result<()> {
        if pos.checked_add(out.len()).is_none_or(|end| end > self.len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut done = 0;
        for iov in self.iovecs(pos, out.len()) {
            // SAFETY: the iovec lies inside a live segment (see `iovecs`)
            // and `out` has room for it; the two do not overlap (`out` is
            // host memory the caller owns).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.iov_base as *const u8,
                    out[done..].as_mut_ptr(),
                    iov.iov_len,
                )
            };
            done += iov.iov_len;
        }
        Ok(())
    }

    /// Copies `data` to `pos`; fails when it does not fit.
    pub fn write_at(&mut self, pos: usize, data: &[u8]) -> io::Result<()> {
        if pos.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for iov in self.iovecs(pos, data.len()) {
            // SAFETY: the iovec lies inside a live, writable segment (see
            // `iovecs`); `data` is host memory that does not overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data[done..].as_ptr(),
                    iov.iov_base.cast::<u8>(),
                    iov.iov_len,
                )
            };
            done += iov.iov_len;
        }
        Ok(())
    }

    /// Writes up to `len` bytes from `pos` to `fd` at `offset`.
    pub fn write_to_file(
        &self,
        pos: usize,
        len: usize,
        fd: RawFd,
        offset: u64,
    ) -> io::Result<usize> {
        let iov = self.iovecs(pos, len);
        let off =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: every iovec points into a live segment of this buffer;
        // the kernel only reads them.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Reads up to `len` bytes of `fd` at `offset` into the buffer at `pos`.
    pub fn read_from_file(
        &mut self,
        pos: usize,
        len: usize,
        fd: RawFd,
        offset: u64,
    ) -> io::Result<usize> {
        let iov = self.iovecs(pos, len);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into a live, writable segment of this
        // buffer, which the kernel fills.
        let n = unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_cross_segments_and_stay_inside() {
        let mut bufs = vec![vec![1u8, 2, 3], vec![], vec![4, 5]];
        let mut b = IoBuf::from_vecs(&mut bufs);
        assert_eq!(b.len(), 5);
        let mut out = [0u8; 3];
        b.read_at(2, &mut out).unwrap();
        assert_eq!(out, [3, 4, 5]);
        assert!(b.read_at(3, &mut out).is_err());
        assert!(b.read_at(usize::MAX, &mut out).is_err());
        b.write_at(1, &[9, 9, 9]).unwrap();
        assert!(b.write_at(4, &[0, 0]).is_err());
        drop(b);
        assert_eq!(bufs, vec![vec![1, 9, 9], vec![], vec![9, 5]]);
    }

    #[test]
    fn file_io_goes_straight_to_the_segments() {
        let mut file = tempfile();
        use std::io::Write;
        file.write_all(b"hello world").unwrap();
        let mut bufs = vec![vec![0u8; 4], vec![0u8; 4]];
        let mut b = IoBuf::from_vecs(&mut bufs);
        use std::os::fd::AsRawFd;
        assert_eq!(b.read_from_file(1, 6, file.as_raw_fd(), 6).unwrap(), 5);
        assert_eq!(b.write_to_file(1, 5, file.as_raw_fd(), 0).unwrap(), 5);
        drop(b);
        assert_eq!(bufs, vec![b"\0wor".to_vec(), b"ld\0\0".to_vec()]);
        let mut back = vec![0u8; 11];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"world world");
    }

    fn tempfile() -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("iobuf-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
