//! The guest's numbers: a virtio-fs guest speaks Linux's FUSE, so the open
//! flags, errno values, xattr flags, `lseek` whences and rename flags it
//! sends and expects are Linux's. On a Linux host (whose guests have the
//! host's architecture) they are the host's own and pass through
//! unchanged; on macOS (arm64 guests) they are translated here. The
//! translation tables are plain data: they are built into the Linux tests
//! too, and on macOS compile-time checks hold them against the system's
//! headers (through `libc`).

use std::io;

/// Linux's values, as the guest uses them.
pub mod linux {
    pub const O_ACCMODE: u32 = 0o3;
    pub const O_RDONLY: u32 = 0;
    pub const O_WRONLY: u32 = 0o1;
    pub const O_RDWR: u32 = 0o2;
    pub const O_CREAT: u32 = 0o100;
    pub const O_EXCL: u32 = 0o200;
    pub const O_NOCTTY: u32 = 0o400;
    pub const O_TRUNC: u32 = 0o1000;
    pub const O_APPEND: u32 = 0o2000;
    pub const O_NONBLOCK: u32 = 0o4000;
    pub const O_DSYNC: u32 = 0o10000;
    /// O_SYNC is O_DSYNC plus this bit (`__O_SYNC`).
    pub const O_SYNC: u32 = 0o4010000;
    pub const O_CLOEXEC: u32 = 0o2000000;
    /// The generic and arm64 values (x86_64 has others, below).
    #[cfg(not(target_arch = "x86_64"))]
    pub const O_DIRECTORY: u32 = 0o40000;
    #[cfg(not(target_arch = "x86_64"))]
    pub const O_NOFOLLOW: u32 = 0o100000;
    #[cfg(target_arch = "x86_64")]
    pub const O_DIRECTORY: u32 = 0o200000;
    #[cfg(target_arch = "x86_64")]
    pub const O_NOFOLLOW: u32 = 0o400000;

    pub const XATTR_CREATE: u32 = 1;
    pub const XATTR_REPLACE: u32 = 2;

    pub const SEEK_DATA: u32 = 3;
    pub const SEEK_HOLE: u32 = 4;

    pub const RENAME_NOREPLACE: u32 = 1;
    pub const RENAME_EXCHANGE: u32 = 2;
    pub const RENAME_WHITEOUT: u32 = 4;

    pub const ENODATA: i32 = 61;
}

/// The host's open flags for the guest's `flags` (OPEN, CREATE).
pub fn host_open_flags(guest: u32) -> i32 {
    #[cfg(target_os = "linux")]
    {
        guest as i32
    }
    #[cfg(not(target_os = "linux"))]
    {
        darwin::open_flags(guest)
    }
}

/// The guest's errno for the host's `error` (every FUSE reply).
pub fn guest_errno(error: &io::Error) -> i32 {
    let host = error.raw_os_error().unwrap_or(libc::EIO);
    #[cfg(target_os = "linux")]
    {
        host
    }
    #[cfg(not(target_os = "linux"))]
    {
        darwin::errno(host)
    }
}

/// The host's xattr flags (XATTR_CREATE, XATTR_REPLACE) for the guest's.
pub fn host_xattr_flags(guest: u32) -> i32 {
    #[cfg(target_os = "linux")]
    {
        guest as i32
    }
    #[cfg(not(target_os = "linux"))]
    {
        darwin::xattr_flags(guest)
    }
}

/// The host's `lseek` whence for the guest's SEEK_DATA or SEEK_HOLE; the
/// others are refused (EINVAL).
pub fn host_whence(guest: u32) -> io::Result<i32> {
    let host = match guest {
        linux::SEEK_DATA => libc::SEEK_DATA,
        linux::SEEK_HOLE => libc::SEEK_HOLE,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    Ok(host)
}

/// macOS's values and the translations to and from them.
#[cfg(any(not(target_os = "linux"), test))]
mod darwin {
    use super::linux;

    const O_NONBLOCK: i32 = 0x4;
    const O_APPEND: i32 = 0x8;
    const O_SYNC: i32 = 0x80;
    const O_NOFOLLOW: i32 = 0x100;
    const O_CREAT: i32 = 0x200;
    const O_TRUNC: i32 = 0x400;
    const O_EXCL: i32 = 0x800;
    const O_NOCTTY: i32 = 0x20000;
    const O_DIRECTORY: i32 = 0x100000;
    const O_DSYNC: i32 = 0x400000;
    const O_CLOEXEC: i32 = 0x1000000;

    const XATTR_CREATE: i32 = 2;
    const XATTR_REPLACE: i32 = 4;

    /// The guest's open flags as macOS's. The access mode has the same
    /// values; flags macOS lacks (O_DIRECT, O_NOATIME, O_LARGEFILE,
    /// O_PATH, O_TMPFILE) are dropped.
    pub fn open_flags(guest: u32) -> i32 {
        let mut host = (guest & linux::O_ACCMODE) as i32;
        for (g, h) in [
            (linux::O_CREAT, O_CREAT),
            (linux::O_EXCL, O_EXCL),
            (linux::O_NOCTTY, O_NOCTTY),
            (linux::O_TRUNC, O_TRUNC),
            (linux::O_APPEND, O_APPEND),
            (linux::O_NONBLOCK, O_NONBLOCK),
            (linux::O_DIRECTORY, O_DIRECTORY),
            (linux::O_NOFOLLOW, O_NOFOLLOW),
            (linux::O_CLOEXEC, O_CLOEXEC),
        ] {
            if guest & g == g {
                host |= h;
            }
        }
        if guest & linux::O_SYNC == linux::O_SYNC {
            host |= O_SYNC;
        } else if guest & linux::O_DSYNC != 0 {
            host |= O_DSYNC;
        }
        host
    }

    pub fn xattr_flags(guest: u32) -> i32 {
        let mut host = 0;
        if guest & linux::XATTR_CREATE != 0 {
            host |= XATTR_CREATE;
        }
        if guest & linux::XATTR_REPLACE != 0 {
            host |= XATTR_REPLACE;
        }
        host
    }

    /// macOS errno -> Linux errno. 1 to 34 are the same on both but 11
    /// (EDEADLK on macOS, EAGAIN on Linux); the rest by name; anything
    /// without a Linux twin is EIO.
    pub fn errno(host: i32) -> i32 {
        match host {
            11 => 35, // EDEADLK
            1..=34 => host,
            35 => 11,             // EAGAIN
            36 => 115,            // EINPROGRESS
            37 => 114,            // EALREADY
            38 => 88,             // ENOTSOCK
            39 => 89,             // EDESTADDRREQ
            40 => 90,             // EMSGSIZE
            41 => 91,             // EPROTOTYPE
            42 => 92,             // ENOPROTOOPT
            43 => 93,             // EPROTONOSUPPORT
            44 => 94,             // ESOCKTNOSUPPORT
            45 => 95,             // ENOTSUP
            46 => 96,             // EPFNOSUPPORT
            47 => 97,             // EAFNOSUPPORT
            48 => 98,             // EADDRINUSE
            49 => 99,             // EADDRNOTAVAIL
            50 => 100,            // ENETDOWN
            51 => 101,            // ENETUNREACH
            52 => 102,            // ENETRESET
            53 => 103,            // ECONNABORTED
            54 => 104,            // ECONNRESET
            55 => 105,            // ENOBUFS
            56 => 106,            // EISCONN
            57 => 107,            // ENOTCONN
            58 => 108,            // ESHUTDOWN
            59 => 109,            // ETOOMANYREFS
            60 => 110,            // ETIMEDOUT
            61 => 111,            // ECONNREFUSED
            62 => 40,             // ELOOP
            63 => 36,             // ENAMETOOLONG
            64 => 112,            // EHOSTDOWN
            65 => 113,            // EHOSTUNREACH
            66 => 39,             // ENOTEMPTY
            68 => 87,             // EUSERS
            69 => 122,            // EDQUOT
            70 => 116,            // ESTALE
            71 => 66,             // EREMOTE
            77 => 37,             // ENOLCK
            78 => 38,             // ENOSYS
            84 => 75,             // EOVERFLOW
            89 => 125,            // ECANCELED
            90 => 43,             // EIDRM
            91 => 42,             // ENOMSG
            92 => 84,             // EILSEQ
            93 => linux::ENODATA, // ENOATTR: no such attribute
            94 => 74,             // EBADMSG
            95 => 72,             // EMULTIHOP
            96 => linux::ENODATA,
            97 => 67,   // ENOLINK
            98 => 63,   // ENOSR
            99 => 60,   // ENOSTR
            100 => 71,  // EPROTO
            101 => 62,  // ETIME
            102 => 95,  // EOPNOTSUPP
            104 => 131, // ENOTRECOVERABLE
            105 => 130, // EOWNERDEAD
            _ => 5,     // EIO
        }
    }

    // On macOS, the system's headers hold these tables to account.
    #[cfg(target_os = "macos")]
    const _: () = {
        assert!(O_NONBLOCK == libc::O_NONBLOCK && O_APPEND == libc::O_APPEND);
        assert!(O_SYNC == libc::O_SYNC && O_NOFOLLOW == libc::O_NOFOLLOW);
        assert!(O_CREAT == libc::O_CREAT && O_TRUNC == libc::O_TRUNC && O_EXCL == libc::O_EXCL);
        assert!(O_NOCTTY == libc::O_NOCTTY && O_DIRECTORY == libc::O_DIRECTORY);
        assert!(O_DSYNC == libc::O_DSYNC && O_CLOEXEC == libc::O_CLOEXEC);
        assert!(XATTR_CREATE == libc::XATTR_CREATE && XATTR_REPLACE == libc::XATTR_REPLACE);
        assert!(libc::EAGAIN == 35 && libc::ELOOP == 62 && libc::ENOTEMPTY == 66);
        assert!(libc::ESTALE == 70 && libc::ENOSYS == 78 && libc::ENOATTR == 93);
        assert!(libc::EOPNOTSUPP == 102 && libc::ENOTSUP == 45 && libc::ENAMETOOLONG == 63);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_values_are_this_hosts() {
        // The guest's table against the Linux host's own headers.
        assert_eq!(linux::O_CREAT as i32, libc::O_CREAT);
        assert_eq!(linux::O_EXCL as i32, libc::O_EXCL);
        assert_eq!(linux::O_TRUNC as i32, libc::O_TRUNC);
        assert_eq!(linux::O_APPEND as i32, libc::O_APPEND);
        assert_eq!(linux::O_NONBLOCK as i32, libc::O_NONBLOCK);
        assert_eq!(linux::O_DIRECTORY as i32, libc::O_DIRECTORY);
        assert_eq!(linux::O_NOFOLLOW as i32, libc::O_NOFOLLOW);
        assert_eq!(linux::O_SYNC as i32, libc::O_SYNC);
        assert_eq!(linux::O_DSYNC as i32, libc::O_DSYNC);
        assert_eq!(linux::O_CLOEXEC as i32, libc::O_CLOEXEC);
        assert_eq!(linux::XATTR_CREATE as i32, libc::XATTR_CREATE);
        assert_eq!(linux::SEEK_DATA as i32, libc::SEEK_DATA);
        assert_eq!(linux::RENAME_EXCHANGE, libc::RENAME_EXCHANGE);
        assert_eq!(linux::RENAME_WHITEOUT, libc::RENAME_WHITEOUT);
        assert_eq!(linux::ENODATA, libc::ENODATA);
        // And the pass-through on this host.
        assert_eq!(host_open_flags(0o1101), 0o1101);
        let e = io::Error::from_raw_os_error(libc::ENOTEMPTY);
        assert_eq!(guest_errno(&e), libc::ENOTEMPTY);
        assert_eq!(guest_errno(&io::Error::other("no errno")), libc::EIO);
        assert_eq!(host_whence(linux::SEEK_HOLE).unwrap(), libc::SEEK_HOLE);
        assert!(host_whence(0).is_err());
    }

    // Linux's names (libc on Linux) for the expected values.
    #[cfg(target_os = "linux")]
    #[test]
    fn macos_errno_values_become_linux_ones() {
        for (mac, linux_name) in [
            (2, libc::ENOENT),
            (11, libc::EDEADLK),
            (13, libc::EACCES),
            (17, libc::EEXIST),
            (30, libc::EROFS),
            (35, libc::EAGAIN),
            (45, libc::ENOTSUP),
            (62, libc::ELOOP),
            (63, libc::ENAMETOOLONG),
            (66, libc::ENOTEMPTY),
            (69, libc::EDQUOT),
            (70, libc::ESTALE),
            (78, libc::ENOSYS),
            (84, libc::EOVERFLOW),
            (93, libc::ENODATA),
            (102, libc::EOPNOTSUPP),
            (79, libc::EIO), // EFTYPE: no Linux twin
            (0x7fff, libc::EIO),
        ] {
            assert_eq!(darwin::errno(mac), linux_name, "macOS errno {mac}");
        }
    }

    #[test]
    fn guest_open_flags_become_macos_ones() {
        let g = linux::O_RDWR | linux::O_CREAT | linux::O_EXCL | linux::O_NOFOLLOW;
        assert_eq!(darwin::open_flags(g), 0x2 | 0x200 | 0x800 | 0x100);
        assert_eq!(
            darwin::open_flags(linux::O_WRONLY | linux::O_TRUNC),
            0x1 | 0x400
        );
        assert_eq!(darwin::open_flags(linux::O_DIRECTORY), 0x100000);
        // O_SYNC includes O_DSYNC's bit: one or the other, never both.
        assert_eq!(darwin::open_flags(linux::O_SYNC), 0x80);
        assert_eq!(darwin::open_flags(linux::O_DSYNC), 0x400000);
        // Flags macOS lacks (O_DIRECT, O_NOATIME, O_PATH) are dropped.
        assert_eq!(darwin::open_flags(0o10000000 | 0o1000000), 0);
        assert_eq!(darwin::xattr_flags(linux::XATTR_CREATE), 2);
        assert_eq!(darwin::xattr_flags(linux::XATTR_REPLACE), 4);
    }
}
