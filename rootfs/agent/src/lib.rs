//! The guest agent's wire protocol, shared by the agent (in the guest) and
//! the host client (the `vmm` library). Reference: docs/agent-protocol.md.
//!
//! One request per connection. Every message is a frame: a type byte, a
//! 32-bit little-endian payload length, the payload.

#[cfg(target_os = "linux")]
pub mod mount;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the agent connects to (and writes `ready\n`) once it
/// listens: with the hybrid Unix-socket scheme, a host program listening on
/// `<uds_path>_1023` learns the agent is up without polling.
pub const READY_PORT: u32 = 1023;
/// Largest frame payload accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Host to guest, first frame: a JSON [`Request`].
    Request = 1,
    /// Host to guest: bytes for the command's stdin or the file being put;
    /// an empty payload is end-of-file.
    Stdin = 2,
    /// Guest to host: the command's stdout, or the file being read.
    Stdout = 3,
    /// Guest to host: the command's stderr.
    Stderr = 4,
    /// Guest to host, last frame: a JSON [`Response`].
    Response = 5,
    /// Guest to host, exec only, before any output: a JSON [`Started`]
    /// (the command's process id, for `signal`).
    Started = 6,
    /// Guest to host, watch only: a JSON [`WatchEvent`].
    Event = 7,
    /// Host to guest, exec on a terminal only: a JSON [`PtySize`], the
    /// terminal's new size.
    Resize = 8,
}

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameType::Request,
            2 => FrameType::Stdin,
            3 => FrameType::Stdout,
            4 => FrameType::Stderr,
            5 => FrameType::Response,
            6 => FrameType::Started,
            7 => FrameType::Event,
            8 => FrameType::Resize,
            _ => return None,
        })
    }
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there?
    Ping,
    /// Run a command. Its stdin comes in `Stdin` frames (when `stdin` is
    /// true; otherwise it reads /dev/null), its output goes out in `Stdout`
    /// and `Stderr` frames.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        stdin: bool,
        /// Kill the command (SIGKILL) after this many milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// Run as this user: `NAME`, `UID`, `NAME:GROUP` or `UID:GID`
        /// (names from the guest's /etc/passwd and /etc/group). Default:
        /// the image's user (see [`ImageDefaults`]), else root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Run the command on a new terminal of this size: its stdin,
        /// stdout and stderr are the terminal, its output comes in
        /// `Stdout` frames, `Stdin` frames are typed into it (`stdin` is
        /// implied) and `Resize` frames change its size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pty: Option<PtySize>,
        /// Run the command inside this guest folder as its root (chroot):
        /// a container's root file system. `cwd` is inside it, `user` is
        /// resolved from its /etc/passwd and /etc/group, and the image's
        /// defaults do not apply (the request says everything).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
        /// Mounted inside `root` first, in order, as [`Request::Mount`]
        /// mounts them (a container's spec mounts, with its first
        /// process): the command does not run when one fails.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mounts: Vec<Mount>,
        /// A container's isolation inside the guest: the namespaces the
        /// command gets new or joins, its hostname and its cgroup (needs
        /// `root`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        isolation: Option<Box<Isolation>>,
    },
    /// Write a file from the `Stdin` frames that follow. A relative path
    /// is taken from `user`'s home (see [`Request::Stat`]); with `user`
    /// the file is theirs; with `parents` missing folders are made.
    Put {
        path: String,
        #[serde(default = "default_mode")]
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        parents: bool,
    },
    /// Read a file; its bytes come back in `Stdout` frames.
    Get {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Send `signal` to the process `pid` (one an exec started: its
    /// [`Started`] frame names it).
    Signal { pid: i32, signal: i32 },
    /// Describe one path (the link itself for a symbolic link), in
    /// `entries`. A relative path is taken from the home folder of `user`
    /// (default: the image's user, else root), as every file request does.
    Stat {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// The entries of a folder, in `entries`, down to `depth` levels
    /// (1: the folder's own entries; at most [`MAX_LIST_DEPTH`]).
    List {
        path: String,
        #[serde(default = "default_depth")]
        depth: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Make a folder and its missing parents; `entries` holds it. An
    /// existing folder is an error (`exists: true` in the response).
    Mkdir {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Rename `from` to `to`; `entries` holds the result.
    Move {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Stream the changes in a folder (and its subfolders, with
    /// `recursive`) as [`WatchEvent`]s until the host closes the
    /// connection, or the folder goes (then the response comes).
    Watch {
        path: String,
        #[serde(default)]
        recursive: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Remove a file, link or whole folder.
    Remove {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Sync and power the VM off.
    Shutdown,
    /// Mount file systems inside `root` (a container's root file system),
    /// in order: what an OCI runtime spec's `mounts` ask for. A `/dev`
    /// tmpfs gets the standard device nodes, as runtimes make them.
    Mount { root: String, mounts: Vec<Mount> },
    /// Unmount everything mounted at or under `root` (a container's, when
    /// it ends while its VM goes on: a pod's other containers).
    Unmount { root: String },
    /// A container's figures from its cgroup `name` (see [`Cgroup`]), in
    /// `cgroup`.
    CgroupStats { name: String },
    /// The VM was forked or restored: mix `seed` (fresh host randomness,
    /// hex) into the kernel's random pool and reseed its generator, so the
    /// copies of one VM do not produce the same random bytes; and step the
    /// wall clock to `unix_ns` (the host's time, nanoseconds since the Unix
    /// epoch), which stood still while the VM was saved.
    /// With `mac`, the VM's network interface takes that address (a copy
    /// of a VM gets one of its own); with `address` ("a.b.c.d/len"), that
    /// IPv4 address in place of its own and a default route through
    /// `gateway` in place of its own, and with `mtu` that MTU (a copy on a
    /// TAP link of another network, such as a pod's).
    Reseed {
        seed: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unix_ns: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mtu: Option<u16>,
    },
}

/// The mount types [`Mount::kind`] may name.
pub const MOUNT_KINDS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bind",
];

/// One file system to mount ([`Request::Mount`]), as an OCI runtime
/// spec's mount: `destination` inside the root; `kind` one of proc, sysfs,
/// tmpfs, devpts, mqueue, cgroup, cgroup2 or bind (then `source` is a
/// guest path); `options` the spec's (flags such as `nosuid`, `ro`,
/// `rbind`, and data such as `mode=755`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
}

/// The namespace kinds [`Namespace::kind`] may name (the OCI runtime
/// spec's words). No `network`: the VM is the pod's network; no `user`.
pub const NAMESPACE_KINDS: &[&str] = &["pid", "ipc", "uts", "mount", "cgroup"];

/// One namespace of a container's process: a new one of `kind`, or with
/// `join` the one of that kind the guest process `join` is in (an exec
/// into a running container joins its first process's; a pod's container
/// the pod's sandbox's, where its spec names one). A kind not listed is
/// the VM's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<i32>,
}

/// A container's cgroup: `name` under the guest's /sys/fs/cgroup (one
/// path component, made when missing and removed when the process that
/// made it ends), with the limits given (cgroup v2's files; a limit not
/// given is left as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cgroup {
    pub name: String,
    /// memory.max, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// cpu.max: the quota and the period, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<(u64, u64)>,
    /// pids.max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
}

/// What isolates a container's process from the rest of the guest
/// ([`Request::Exec`]'s `isolation`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Isolation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
    /// Set in the command's new uts namespace (only with one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Cgroup>,
    /// The process's capability sets (absent: root's, all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// No new privileges on exec (set-user-ID and file capabilities do
    /// not raise them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_new_privileges: bool,
}

/// A process's capability sets, by name (`CAP_CHOWN`, ...), as an OCI
/// runtime spec's `process.capabilities`: the bounding set limits what it
/// and its children can ever have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// A container's figures from its cgroup ([`Request::CgroupStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// memory.current, bytes.
    pub memory: u64,
    /// memory.max, bytes; none when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// cpu.stat's usage_usec, user_usec and system_usec.
    pub cpu_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// pids.current.
    pub pids: u64,
}

/// Where the VMM puts an image's exec defaults, in a small archive it adds
/// to the initramfs of a VM booted from an OCI image. The agent reads it
/// before switching to the root disk.
pub const IMAGE_DEFAULTS_PATH: &str = "/vmm/image.json";

/// What an OCI image's configuration says every command runs with, unless
/// an exec request says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDefaults {
    /// `K=V` entries; a request's variable of the same name wins.
    #[serde(default)]
    pub env: Vec<String>,
    /// The working directory (created when the image lacks it).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The user, as [`Request::Exec`]'s `user`.
    #[serde(default)]
    pub user: Option<String>,
}

fn default_mode() -> u32 {
    0o644
}

fn default_depth() -> u32 {
    1
}

/// The deepest `list` a request may ask for.
pub const MAX_LIST_DEPTH: u32 = 16;
/// The most entries one `list` answers with (a frame holds at most
/// [`MAX_FRAME`] bytes): past it the answer says `truncated`.
pub const MAX_LIST_ENTRIES: usize = 2000;

/// The [`FrameType::Started`] frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Started {
    pub pid: i32,
}

/// A terminal's size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// A change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchEvent {
    /// The path, relative to the watched folder (empty for `start`).
    pub name: String,
    /// `start` (the first, once the watch is on), `create`, `write`,
    /// `remove`, `rename` (moved away) or `chmod`.
    pub kind: String,
}

/// What a file request says about one path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The last component.
    pub name: String,
    /// The absolute path.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    /// The permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// The owner's and group's names (numbers when the guest has no name).
    pub owner: String,
    pub group: String,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// A MAC address from its text (six hex bytes, `02:00:00:00:00:01`), as
/// configs and `Reseed`'s `mac` write it; `None` when it is not one.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts
            .next()
            .filter(|p| p.bytes().all(|c| c.is_ascii_hexdigit()))?;
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `mac` as text, the way [`parse_mac`] reads it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The agent's answer, the last frame of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Set when the request could not be carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Exec: the exit status, when the command exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Exec: the signal that killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Exec: the command was killed because it ran past its timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Ping: the agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Put/get: the file size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Put, stat, list, mkdir, move: the entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<Entry>>,
    /// List: there were more than [`MAX_LIST_ENTRIES`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The error is "no such file or folder".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_found: bool,
    /// The error is "it exists already" (mkdir).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exists: bool,
    /// CgroupStats: the figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupStats>,
}

impl Response {
    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// A frame's 5-byte head for a payload of `len` bytes.
pub fn frame_head(kind: FrameType, len: usize) -> io::Result<[u8; 5]> {
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(head)
}

/// The type and payload length a frame's head announces; an unknown type
/// or a length past [`MAX_FRAME`] is an error.
pub fn parse_head(head: &[u8; 5]) -> io::Result<(FrameType, usize)> {
    let kind = FrameType::from_byte(head[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown frame type"))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    Ok((kind, len))
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: FrameType, payload: &[u8]) -> io::Result<()> {
    w.write_all(&frame_head(kind, payload.len())?)?;
    w.write_all(payload)
}

/// Writes a JSON frame.
pub fn write_json<T: Serialize>(w: &mut impl Write, kind: FrameType, value: &T) -> io::Result<()> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_frame(w, kind, &json)
}

/// Reads one frame; None at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(FrameType, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let (kind, len) = parse_head(&head)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_json(&mut buf, FrameType::Request, &Request::Ping).unwrap();
        write_frame(&mut buf, FrameType::Stdin, b"").unwrap();
        let mut r = &buf[..];
        let (kind, payload) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(kind, FrameType::Request);
        assert_eq!(
            serde_json::from_slice::<Request>(&payload).unwrap(),
            Request::Ping
        );
        assert_eq!(
            read_frame(&mut r).unwrap().unwrap(),
            (FrameType::Stdin, vec![])
        );
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn mac_text_round_trips_and_bad_text_is_refused() {
        let mac = [0x02, 0xab, 0, 0x10, 0xff, 1];
        assert_eq!(format_mac(&mac), "02:ab:00:10:ff:01");
        assert_eq!(parse_mac("02:ab:00:10:ff:01"), Some(mac));
        assert_eq!(parse_mac("02:AB:0:10:ff:1"), Some(mac));
        for bad in [
            "",
            "02:ab:00:10:ff",
            "02:ab:00:10:ff:01:02",
            "02:ab:00:10:ff:100",
            "02:ab:00:10:ff:zz",
            "02-ab-00-10-ff-01",
            "02:+b:00:10:ff:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(read_frame(&mut &[9u8, 0, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &[1u8, 0xff, 0xff, 0xff, 0xff][..]).is_err());
        assert!(read_frame(&mut &[1u8, 5, 0][..]).is_err());
    }

    #[test]
    fn exec_request_json() {
        let r: Request =
            serde_json::from_str(r#"{"op":"exec","argv":["true"],"stdin":true}"#).unwrap();
        assert!(matches!(r, Request::Exec { stdin: true, ref mounts, .. } if mounts.is_empty()));
        assert!(serde_json::from_str::<Request>(r#"{"op":"exec","argv":[],"bogus":1}"#).is_err());
        // A container's first process: its mounts come along; without
        // them the request reads as it did before they could.
        let with = r#"{"op":"exec","argv":["true"],"root":"/c","mounts":[{"destination":"/proc","type":"proc"}]}"#;
        let r: Request = serde_json::from_str(with).unwrap();
        assert!(matches!(&r, Request::Exec { mounts, .. } if mounts[0].kind == "proc"));
        let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
        assert!(!serde_json::to_string(&r).unwrap().contains("mounts"));
        let resp = serde_json::to_string(&Response {
            exit_code: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(resp, r#"{"exit_code":3}"#);
    }
}
