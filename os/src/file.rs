//! Files the VMM makes, copies and renames: an unnamed scratch file
//! (Linux: `O_TMPFILE`; elsewhere, or where the file system lacks it: a
//! named file unlinked at once), in-kernel copies (Linux:
//! `copy_file_range`; macOS has none for arbitrary ranges, and callers
//! fall back to reading and writing), and atomic renames that refuse to
//! replace or that swap (Linux: `renameat2`; macOS: `renameatx_np`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A new read-write file in `dir` that has no name (nothing to clean up
/// if the process dies), mode 0600.
pub fn unnamed_file(dir: &Path) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    if let Ok(f) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        return Ok(f);
    }
    named_then_unlinked(dir)
}

/// The portable way: create a file with a name nobody else uses, then
/// remove the name.
fn named_then_unlinked(dir: &Path) -> io::Result<File> {
    let mut attempt = 0u32;
    loop {
        let mut tag = [0u8; 8];
        crate::fill_random(&mut tag)?;
        let path = dir.join(format!(
            ".vmm-scratch-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(tag)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Copies up to `len` bytes from `src` at `from` to `dst` at `to` inside
/// the kernel; returns how many (0 at the end of `src`). Where the host
/// cannot (another OS, another file system), an `Unsupported`-kind error
/// (`ENOSYS`, `EXDEV`, `EINVAL`, `EOPNOTSUPP`) tells the caller to copy
/// through memory.
pub fn copy_file_range(
    src: &File,
    from: u64,
    dst: &File,
    to: u64,
    len: usize,
) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (mut off_in, mut off_out) = (from as i64, to as i64);
        // SAFETY: both descriptors are open files owned by the caller; the
        // offsets are valid pointers to locals; the kernel copies at most
        // `len` bytes between the files and touches no user memory.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (src, from, dst, to, len);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

/// Whether a `copy_file_range` error means "copy through memory instead".
pub fn copy_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Renames `from` to `to`, failing with `EEXIST` if `to` exists (even as
/// an empty directory, which a plain rename would replace).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let flags = libc::RENAME_NOREPLACE;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::RENAME_EXCL;
    rename_with(from, to, flags)
}

/// Swaps `from` and `to` (both must exist) in one step.
pub fn rename_exchange(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let flags = libc::RENAME_EXCHANGE;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::RENAME_SWAP;
    rename_with(from, to, flags)
}

fn rename_with(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: the call reads two valid C strings; AT_FDCWD resolves them
    // as paths.
    #[cfg(target_os = "linux")]
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    // SAFETY: as above.
    #[cfg(not(target_os = "linux"))]
    let rc = unsafe {
        libc::renameatx_np(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn scratch_files_have_no_name() {
        let dir = std::env::temp_dir().join(format!("vmm-os-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for mut f in [
            unnamed_file(&dir).unwrap(),
            named_then_unlinked(&dir).unwrap(),
        ] {
            f.write_all(b"scratch").unwrap();
            f.rewind().unwrap();
            let mut back = String::new();
            f.read_to_string(&mut back).unwrap();
            assert_eq!(back, "scratch");
        }
        // Nothing left behind in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn renames_refuse_to_replace_or_swap() {
        let dir = std::env::temp_dir().join(format!("vmm-os-rename-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("a/tag"), "a").unwrap();
        // An empty directory is in the way: not replaced.
        let e = rename_noreplace(&dir.join("a"), &dir.join("b")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        rename_exchange(&dir.join("a"), &dir.join("b")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("b/tag")).unwrap(), "a");
        rename_noreplace(&dir.join("b"), &dir.join("c")).unwrap();
        assert!(dir.join("c/tag").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copies_in_the_kernel_or_says_to_fall_back() {
        let dir = std::env::temp_dir();
        let mut src = unnamed_file(&dir).unwrap();
        src.write_all(b"0123456789").unwrap();
        let dst = unnamed_file(&dir).unwrap();
        match copy_file_range(&src, 2, &dst, 0, 4) {
            Ok(n) => {
                assert_eq!(n, 4);
                let mut buf = [0u8; 4];
                std::os::unix::fs::FileExt::read_exact_at(&dst, &mut buf, 0).unwrap();
                assert_eq!(&buf, b"2345");
            }
            Err(e) => assert!(copy_unsupported(&e), "{e}"),
        }
        assert!(copy_unsupported(&io::Error::from_raw_os_error(
            libc::ENOSYS
        )));
        assert!(!copy_unsupported(&io::Error::from_raw_os_error(libc::EIO)));
    }
}
