//! Snapshot authentication: an HMAC-SHA256, under a key the operator
//! keeps, over every file of a snapshot, so a snapshot that moves between
//! hosts is restored only if nobody changed it on the way.
//!
//! The `auth` file holds `vmm-snapshot-hmac-sha256 v1\n` and the MAC in
//! hex. The MAC covers a domain string, then for each of `state`,
//! `memory` and `disk-layer` (when present) its name, its length (u64 LE)
//! and its bytes. Checking it reads every byte of the snapshot, so a
//! keyed restore costs a read of the whole memory file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The file holding the MAC.
pub const AUTH_FILE: &str = "auth";
const HEADER: &str = "vmm-snapshot-hmac-sha256 v1\n";
const DOMAIN: &[u8] = b"vmm snapshot v1\0";
/// Shortest key accepted.
pub const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the snapshot key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the snapshot key {path} has {len} bytes; use at least {MIN_KEY_BYTES} random bytes (e.g. `head -c 32 /dev/urandom > {path}`)")]
    ShortKey { path: PathBuf, len: usize },
    #[error("cannot read {path} to authenticate the snapshot: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the snapshot {dir} has no `auth` file: it was not written with a key, so it cannot be authenticated; restore it without --snapshot-key only if you trust where it came from")]
    Missing { dir: PathBuf },
    #[error("the snapshot {dir} does not match its key: it was changed after it was written, or written with another key; it is not restored")]
    Mismatch { dir: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Reads a key file (raw bytes, at least [`MIN_KEY_BYTES`]).
pub fn read_key(path: &Path) -> Result<Vec<u8>> {
    let key = std::fs::read(path).map_err(|source| Error::ReadKey {
        path: path.to_path_buf(),
        source,
    })?;
    if key.len() < MIN_KEY_BYTES {
        return Err(Error::ShortKey {
            path: path.to_path_buf(),
            len: key.len(),
        });
    }
    Ok(key)
}

/// One file covered by the MAC: its name, its length and its bytes.
struct Part<'a> {
    name: &'static str,
    len: u64,
    data: &'a mut dyn Read,
}

/// The MAC of `parts` under `key`, not finalized. `dir` names errors.
fn mac(dir: &Path, key: &[u8], parts: &mut [Part]) -> Result<Hmac<Sha256>> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Error::ShortKey {
        path: dir.to_path_buf(),
        len: key.len(),
    })?;
    m.update(DOMAIN);
    let mut buf = vec![0u8; 1 << 20];
    for part in parts {
        m.update(part.name.as_bytes());
        m.update(&part.len.to_le_bytes());
        let mut left = part.len;
        while left > 0 {
            let want = buf.len().min(left as usize);
            part.data
                .read_exact(&mut buf[..want])
                .map_err(|source| Error::Read {
                    path: dir.join(part.name),
                    source,
                })?;
            m.update(&buf[..want]);
            left -= want as u64;
        }
    }
    Ok(m)
}

fn file_len(dir: &Path, name: &str, file: &File) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| Error::Read {
            path: dir.join(name),
            source,
        })
}

/// Bytes as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `auth` file's content for the snapshot files in `dir`.
pub fn sign(dir: &Path, key: &[u8]) -> Result<String> {
    let open = |name: &str| {
        File::open(dir.join(name)).map_err(|source| Error::Read {
            path: dir.join(name),
            source,
        })
    };
    let (mut state, memory) = (open(super::STATE_FILE)?, open(super::MEMORY_FILE)?);
    let disk = match File::open(dir.join(super::DISK_LAYER_FILE)) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(Error::Read {
                path: dir.join(super::DISK_LAYER_FILE),
                source,
            })
        }
    };
    let mut state_bytes = Vec::new();
    state
        .read_to_end(&mut state_bytes)
        .map_err(|source| Error::Read {
            path: dir.join(super::STATE_FILE),
            source,
        })?;
    let m = mac_of(dir, key, &state_bytes, &memory, disk.as_ref())?;
    Ok(format!("{HEADER}{}\n", hex(&m.finalize().into_bytes())))
}

/// Reads a file from offset 0 with positioned reads, leaving the file's
/// own offset alone.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The MAC of a snapshot: its `state` bytes, its memory file and its disk
/// layer.
fn mac_of(
    dir: &Path,
    key: &[u8],
    state: &[u8],
    memory: &File,
    disk: Option<&File>,
) -> Result<Hmac<Sha256>> {
    let mut state_reader = state;
    let mut memory_reader = ReadAt {
        file: memory,
        pos: 0,
    };
    let mut disk_reader = disk.map(|file| ReadAt { file, pos: 0 });
    let mut parts = vec![
        Part {
            name: super::STATE_FILE,
            len: state.len() as u64,
            data: &mut state_reader,
        },
        Part {
            name: super::MEMORY_FILE,
            len: file_len(dir, super::MEMORY_FILE, memory)?,
            data: &mut memory_reader,
        },
    ];
    if let (Some(file), Some(reader)) = (disk, disk_reader.as_mut()) {
        parts.push(Part {
            name: super::DISK_LAYER_FILE,
            len: file_len(dir, super::DISK_LAYER_FILE, file)?,
            data: reader,
        });
    }
    mac(dir, key, &mut parts)
}

/// Checks a snapshot opened from `dir` (its `state` bytes and the very
/// files it will run from) against `key`.
pub fn verify(
    dir: &Path,
    key: &[u8],
    state: &[u8],
    memory: &File,
    disk: Option<&File>,
) -> Result<()> {
    let path = dir.join(AUTH_FILE);
    // Bounded: the file is a line of hex; a hostile one is not read whole.
    let mut text = String::new();
    match File::open(&path).and_then(|f| f.take(4096).read_to_string(&mut text)) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                dir: dir.to_path_buf(),
            })
        }
        Err(source) => return Err(Error::Read { path, source }),
    }
    let claimed = text
        .strip_prefix(HEADER)
        .and_then(|rest| unhex(rest.trim()))
        .unwrap_or_default();
    let m = mac_of(dir, key, state, memory, disk)?;
    // verify_slice compares in constant time.
    m.verify_slice(&claimed).map_err(|_| Error::Mismatch {
        dir: dir.to_path_buf(),
    })
}

/// Hex text as bytes; None when it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dir: &Path, key: &[u8]) -> Result<()> {
        let state = std::fs::read(dir.join(super::super::STATE_FILE)).unwrap();
        let memory = File::open(dir.join(super::super::MEMORY_FILE)).unwrap();
        let disk = File::open(dir.join(super::super::DISK_LAYER_FILE)).ok();
        verify(dir, key, &state, &memory, disk.as_ref())
    }

    #[test]
    fn a_changed_file_or_another_key_fails_and_the_signed_snapshot_passes() {
        let dir = std::env::temp_dir().join(format!("vmm-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(super::super::STATE_FILE), b"state bytes").unwrap();
        std::fs::write(dir.join(super::super::MEMORY_FILE), vec![7u8; 3 << 20]).unwrap();
        let key = b"0123456789abcdef0123456789abcdef";
        assert!(matches!(check(&dir, key), Err(Error::Missing { .. })));
        std::fs::write(dir.join(AUTH_FILE), sign(&dir, key).unwrap()).unwrap();
        check(&dir, key).unwrap();
        assert!(matches!(
            check(&dir, b"another key, long enough"),
            Err(Error::Mismatch { .. })
        ));
        // One byte of memory changed.
        let mut mem = std::fs::read(dir.join(super::super::MEMORY_FILE)).unwrap();
        mem[2 << 20] ^= 1;
        std::fs::write(dir.join(super::super::MEMORY_FILE), &mem).unwrap();
        assert!(matches!(check(&dir, key), Err(Error::Mismatch { .. })));
        mem[2 << 20] ^= 1;
        std::fs::write(dir.join(super::super::MEMORY_FILE), &mem).unwrap();
        check(&dir, key).unwrap();
        // A disk layer added afterwards.
        std::fs::write(dir.join(super::super::DISK_LAYER_FILE), b"x").unwrap();
        assert!(matches!(check(&dir, key), Err(Error::Mismatch { .. })));
        // A garbled auth file.
        std::fs::write(dir.join(AUTH_FILE), "vmm-snapshot-hmac-sha256 v1\nzz\n").unwrap();
        assert!(matches!(check(&dir, key), Err(Error::Mismatch { .. })));
        let short = dir.join("short.key");
        std::fs::write(&short, b"short").unwrap();
        assert!(matches!(read_key(&short), Err(Error::ShortKey { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
