//! What a template is built from, and how to tell that it changed: the
//! kernel, initramfs and base image files (each by its resolved path,
//! size, modification time and inode: the setup command's builds live in
//! folders named by the hash of their inputs, so a rebuilt one has a new
//! path), the guest-visible machine (vCPUs, memory, command line, which
//! devices it has) and the snapshot format. Host-side settings (share
//! folders, egress policy, port forwards, console) are not inputs: a
//! sandbox started from a template takes them from its own config.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::VmConfig;

/// One input file, as found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// The path with every link resolved.
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    pub inode: u64,
}

impl FileId {
    /// `path` as found now.
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let real = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&real)?;
        Ok(FileId {
            path: real,
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        })
    }
}

/// The guest-visible machine: what a restored guest finds, which a
/// sandbox's config must therefore match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The full kernel command line the VM boots with.
    pub cmdline: String,
    /// The root disk, and whether it is read-only.
    pub rootfs: Option<bool>,
    pub vsock: bool,
    /// Shares: tag, guest path, read-only.
    pub shares: Vec<(String, PathBuf, bool)>,
    /// "user", "tap", or none.
    pub network: Option<String>,
}

impl Layout {
    /// The layout of `config`, booted with `cmdline`.
    pub fn of(config: &VmConfig, cmdline: &str) -> Layout {
        Layout {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            cmdline: cmdline.to_string(),
            rootfs: config.rootfs.as_ref().map(|r| r.read_only),
            vsock: config.vsock.is_some(),
            shares: config
                .shares
                .iter()
                .map(|s| (s.tag.clone(), s.guest_path.clone(), s.read_only))
                .collect(),
            network: config.network.as_ref().map(|n| n.mode().to_string()),
        }
    }
}

/// Everything a template is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub kernel: FileId,
    pub initramfs: Option<FileId>,
    pub base: Option<FileId>,
    pub layout: Layout,
    /// The snapshot format the template's snapshot is in.
    pub snapshot_format: u32,
}

impl Inputs {
    /// A short hash of the inputs (hex), which names default templates.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = sha2::Sha256::digest(&json);
        hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// What differs between these inputs (a template's) and `now`, one
    /// phrase each; empty when nothing does.
    pub fn changes(&self, now: &Inputs) -> Vec<String> {
        let mut out = Vec::new();
        file_change(&mut out, "kernel", Some(&self.kernel), Some(&now.kernel));
        file_change(
            &mut out,
            "initramfs",
            self.initramfs.as_ref(),
            now.initramfs.as_ref(),
        );
        file_change(
            &mut out,
            "base image",
            self.base.as_ref(),
            now.base.as_ref(),
        );
        layout_changes(&mut out, &self.layout, &now.layout);
        if self.snapshot_format != now.snapshot_format {
            out.push(format!(
                "its snapshot is in format {}, this VMM reads {}",
                self.snapshot_format, now.snapshot_format
            ));
        }
        out
    }
}

fn file_change(out: &mut Vec<String>, what: &str, was: Option<&FileId>, now: Option<&FileId>) {
    match (was, now) {
        (None, None) => {}
        (Some(w), None) => out.push(format!(
            "it was built with the {what} {}, the config now has none",
            w.path.display()
        )),
        (None, Some(n)) => out.push(format!(
            "it was built without a {what}, the config now has {}",
            n.path.display()
        )),
        (Some(w), Some(n)) if w.path != n.path => out.push(format!(
            "the {what} is now {}, it was built with {}",
            n.path.display(),
            w.path.display()
        )),
        (Some(w), Some(n)) if w != n => out.push(format!(
            "the {what} {} changed since it was built ({} bytes then, {} now; modified since)",
            n.path.display(),
            w.size,
            n.size
        )),
        _ => {}
    }
}

fn layout_changes(out: &mut Vec<String>, was: &Layout, now: &Layout) {
    let mut differs = |what: &str, then: String, now: String| {
        if then != now {
            out.push(format!(
                "the config's {what} is {now}, the template's {then}"
            ));
        }
    };
    differs("vCPU count", was.vcpus.to_string(), now.vcpus.to_string());
    differs(
        "memory",
        format!("{} MiB", was.memory_mib),
        format!("{} MiB", now.memory_mib),
    );
    differs(
        "kernel command line",
        format!("{:?}", was.cmdline),
        format!("{:?}", now.cmdline),
    );
    let disk = |d: Option<bool>| match d {
        None => "none".to_string(),
        Some(true) => "read-only".into(),
        Some(false) => "writable".into(),
    };
    differs("root disk", disk(was.rootfs), disk(now.rootfs));
    differs("vsock device", was.vsock.to_string(), now.vsock.to_string());
    let shares = |s: &[(String, PathBuf, bool)]| {
        let list: Vec<String> = s
            .iter()
            .map(|(tag, path, ro)| {
                format!(
                    "{tag} at {}{}",
                    path.display(),
                    if *ro { " (ro)" } else { "" }
                )
            })
            .collect();
        format!("[{}]", list.join(", "))
    };
    differs("shares", shares(&was.shares), shares(&now.shares));
    let net = |n: &Option<String>| n.clone().unwrap_or_else(|| "none".into());
    differs("network", net(&was.network), net(&now.network));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> FileId {
        FileId {
            path: path.into(),
            size,
            mtime_ns: 1,
            inode: 7,
        }
    }

    fn inputs() -> Inputs {
        Inputs {
            kernel: file("/c/kernel/pvm-1/vmlinux", 10),
            initramfs: Some(file("/c/initramfs/2/initramfs.cpio", 20)),
            base: Some(file("/c/base/3/base.ext4", 30)),
            layout: Layout {
                vcpus: 1,
                memory_mib: 256,
                cmdline: "console=ttyS0".into(),
                rootfs: Some(false),
                vsock: true,
                shares: vec![("work".into(), "/mnt/work".into(), false)],
                network: Some("user".into()),
            },
            snapshot_format: 2,
        }
    }

    #[test]
    fn every_changed_input_is_named_and_equal_inputs_have_one_digest() {
        let a = inputs();
        assert!(a.changes(&inputs()).is_empty());
        assert_eq!(a.digest(), inputs().digest());
        assert_eq!(a.digest().len(), 16);

        let mut b = inputs();
        b.initramfs.as_mut().unwrap().size = 21;
        b.initramfs.as_mut().unwrap().mtime_ns = 2;
        b.kernel.path = "/c/kernel/pvm-9/vmlinux".into();
        b.layout.memory_mib = 512;
        b.layout.shares.clear();
        b.base = None;
        assert_ne!(a.digest(), b.digest());
        let changes = a.changes(&b);
        assert_eq!(changes.len(), 5, "{changes:#?}");
        assert!(changes[0].contains("kernel is now /c/kernel/pvm-9/vmlinux"));
        assert!(changes[1].contains("initramfs /c/initramfs/2/initramfs.cpio changed"));
        assert!(changes[1].contains("20 bytes then, 21 now"));
        assert!(changes[2].contains("built with the base image /c/base/3/base.ext4"));
        assert!(changes[3].contains("memory is 512 MiB, the template's 256 MiB"));
        assert!(changes[4].contains("shares is [], the template's [work at /mnt/work]"));
    }

    #[test]
    fn a_file_is_found_through_its_links() {
        let dir = std::env::temp_dir().join(format!("vmm-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("real"), b"abc").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let id = FileId::of(&dir.join("link")).unwrap();
        assert_eq!(id.path, std::fs::canonicalize(dir.join("real")).unwrap());
        assert_eq!(id.size, 3);
        assert_eq!(id, FileId::of(&dir.join("real")).unwrap());
        std::fs::write(dir.join("real"), b"abcd").unwrap();
        assert_ne!(id, FileId::of(&dir.join("link")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
