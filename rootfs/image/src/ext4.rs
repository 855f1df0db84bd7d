//! Turning the staging tree into an ext4 image: `mkfs.ext4 -d` copies the
//! tree (contents, links, hard links, times), then one `debugfs -w` script
//! writes what host files could not carry: the image's owners, set-id and
//! sticky bits, extended attributes (file capabilities among them) and
//! device nodes. No step needs root, a loop device or a mount.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tree::{self, Meta, Special, Tree};

// An inode's file type bits, as ext4 stores them (the POSIX values; a
// host's libc may give them another integer type: macOS's are 16 bits).
const S_IFMT: u32 = 0o170_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;

/// Free room in the file system beyond its contents, for what a VM writes
/// (those blocks go to the VM's own layer; the image file stays sparse).
const HEADROOM: u64 = 1 << 30;
/// Journal size in MiB: what mkfs gives a file system of the Debian
/// base's size; a larger one (mkfs's default for our size is 64 MiB) is
/// written out in full and would cost its size on disk in every image.
const JOURNAL_MIB: u64 = 4;
/// Bytes of file system per inode mkfs.ext4 uses by default.
const BYTES_PER_INODE: u64 = 16384;
/// The file system's label.
pub const LABEL: &str = "vmm-image";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot walk the staging tree: {0}")]
    Walk(#[from] walkdir::Error),
    #[error(transparent)]
    Tree(#[from] tree::Error),
    #[error("{0} is missing: apt-get install e2fsprogs (it provides mkfs.ext4 and debugfs)")]
    Missing(&'static str),
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error(
        "the image has a file name with a line break ({0:?}), which this importer cannot store"
    )]
    LineBreak(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The finished image's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    /// Files, folders, links and nodes in the image.
    pub entries: u64,
    /// The file system's size (the image file's apparent size).
    pub size: u64,
    /// Lines of the metadata script debugfs ran.
    pub fixups: u64,
}

/// Writes `tree` as an ext4 image at `out`, using `work` (an empty private
/// folder) for the metadata script and attribute values.
pub fn build(tree: &Tree, out: &Path, work: &Path) -> Result<Built, Error> {
    let plan = plan(tree, work)?;
    let used = plan.bytes + plan.entries * 4096;
    let size = (used + used / 4 + HEADROOM).div_ceil(1 << 20) << 20;
    let inodes = (plan.entries + plan.entries / 2 + 4096).max(size / BYTES_PER_INODE);
    let root = tree.root_meta();
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-b", "4096", "-L", LABEL, "-J"])
        .arg(format!("size={JOURNAL_MIB}"))
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!("root_owner={}:{}", root.uid, root.gid))
        .arg("-d")
        .arg(tree.root())
        .arg(out)
        .arg(format!("{}M", size >> 20));
    run(&mut mkfs, "mkfs.ext4")?;
    if !plan.script.is_empty() {
        let script = work.join("metadata.debugfs");
        std::fs::write(&script, &plan.script).map_err(io(&script))?;
        let mut debugfs = Command::new("debugfs");
        debugfs.arg("-w").arg("-f").arg(&script).arg(out);
        let stderr = run(&mut debugfs, "debugfs")?;
        // debugfs says what failed on stderr and still exits 0; its first
        // line is its version banner.
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        if !errors.is_empty() {
            return Err(Error::Tool {
                tool: "debugfs",
                detail: errors.join("; "),
            });
        }
    }
    Ok(Built {
        entries: plan.entries,
        size,
        fixups: plan.script.iter().filter(|&&b| b == b'\n').count() as u64,
    })
}

/// Runs a tool; returns its standard error.
fn run(cmd: &mut Command, tool: &'static str) -> Result<String, Error> {
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing(tool),
            _ => Error::Tool {
                tool,
                detail: e.to_string(),
            },
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(Error::Tool {
            tool,
            detail: format!("{}: {}", output.status, stderr.trim()),
        });
    }
    Ok(stderr)
}

struct Plan {
    entries: u64,
    bytes: u64,
    script: Vec<u8>,
}

/// Walks the tree: counts it, puts folder times back (adding entries
/// changed them), and writes the debugfs commands that give each node what
/// its host file lacks.
fn plan(tree: &Tree, work: &Path) -> Result<Plan, Error> {
    let mut plan = Plan {
        entries: 0,
        bytes: 0,
        script: Vec::new(),
    };
    let mut seen = HashSet::new();
    let mut values = 0u64;
    let root_meta = tree.root_meta().clone();
    for entry in walkdir::WalkDir::new(tree.root()).follow_links(false) {
        let entry = entry?;
        let host = entry.path();
        let st = entry.metadata()?;
        let rel = host.strip_prefix(tree.root()).unwrap_or(host);
        let image_path = Path::new("/").join(rel);
        if image_path.as_os_str().as_bytes().contains(&b'\n') {
            return Err(Error::LineBreak(image_path));
        }
        let is_root = rel.as_os_str().is_empty();
        plan.entries += 1;
        if !seen.insert(st.ino()) {
            continue;
        }
        plan.bytes += st.blocks() * 512;
        let meta = match (is_root, tree.meta(st.ino())) {
            (true, _) => &root_meta,
            (false, Some(meta)) => meta,
            (false, None) => &Meta::implied_dir(),
        };
        if st.is_dir() {
            tree::restore_mtime(host, meta)?;
        }
        let p = quote(&image_path).bytes();
        let s = &mut plan.script;
        let type_bits = st.mode() & S_IFMT;
        let uid_owned = if is_root { meta.uid } else { st.uid() };
        let gid_owned = if is_root { meta.gid } else { st.gid() };
        let mut owners_differ = meta.uid != uid_owned || meta.gid != gid_owned;
        let mut mode_differs = !st.file_type().is_symlink() && st.mode() & 0o7777 != meta.mode;
        if let Some(special) = meta.special {
            let (kind, major, minor, bits) = match special {
                Special::Char(a, b) => ('c', a, b, S_IFCHR),
                Special::Block(a, b) => ('b', a, b, S_IFBLK),
            };
            let dir = quote(image_path.parent().unwrap_or(Path::new("/"))).bytes();
            let name = quote(Path::new(tree::file_name(&image_path))).bytes();
            line(s, &[b"rm ", &p]);
            line(s, &[b"cd ", &dir]);
            let numbers = format!(" {kind} {major} {minor}");
            line(s, &[b"mknod ", &name, numbers.as_bytes()]);
            line(s, &[b"cd /"]);
            line(
                s,
                &[
                    b"sif ",
                    &p,
                    format!(" mode 0{:o}", bits | meta.mode).as_bytes(),
                ],
            );
            owners_differ = meta.uid != 0 || meta.gid != 0;
            mode_differs = false;
        }
        if mode_differs {
            let mode = format!(" mode 0{:o}", type_bits | meta.mode);
            line(s, &[b"sif ", &p, mode.as_bytes()]);
        }
        if owners_differ {
            line(s, &[b"sif ", &p, format!(" uid {}", meta.uid).as_bytes()]);
            line(s, &[b"sif ", &p, format!(" gid {}", meta.gid).as_bytes()]);
        }
        for (name, value) in &meta.xattrs {
            values += 1;
            let file = work.join(format!("xattr-{values}"));
            std::fs::write(&file, value).map_err(io(&file))?;
            let file = quote(&file).bytes();
            let name = quote(Path::new(name)).bytes();
            line(s, &[b"ea_set -f ", &file, b" ", &p, b" ", &name]);
        }
    }
    Ok(plan)
}

/// Appends one script line made of `parts`.
fn line(script: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        script.extend_from_slice(part);
    }
    script.push(b'\n');
}

/// A path as one debugfs argument: in double quotes, a quote doubled.
fn quote(path: &Path) -> Quoted<'_> {
    Quoted(path.as_os_str().as_bytes())
}

/// Bytes written as one quoted debugfs argument.
struct Quoted<'a>(&'a [u8]);

impl Quoted<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in self.0 {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote(Path::new("/a b/q\"x")).bytes(), b"\"/a b/q\"\"x\"");
    }
}
