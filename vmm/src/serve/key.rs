//! The server's API key: `e2b_` and 40 hex digits (the shape E2B keys
//! have, so SDKs that check it accept it), made on first start and kept
//! in `~/.config/vmm/serve.key` (mode 0600).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the API key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the API key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the API key file {path} is readable by others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Open { path: PathBuf, mode: u32 },
    #[error("the API key file {0} holds no key: remove it and start again for a new one")]
    Empty(PathBuf),
    #[error("cannot make random bytes for the API key: {0}")]
    Random(std::io::Error),
}

/// `$XDG_CONFIG_HOME/vmm/serve.key`, else `~/.config/vmm/serve.key`.
pub fn default_path() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    config.join("vmm").join("serve.key")
}

/// A new key.
pub fn generate() -> Result<String, Error> {
    let mut bytes = [0u8; 20];
    vmm_os::fill_random(&mut bytes).map_err(Error::Random)?;
    Ok(format!(
        "e2b_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The key in `path`, made there (0600) when the file does not exist.
pub fn load_or_create(path: &Path) -> Result<String, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(Error::Open {
                    path: path.into(),
                    mode,
                });
            }
            let key = text.trim().to_string();
            if key.is_empty() {
                return Err(Error::Empty(path.into()));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate()?;
            let write = |source| Error::Write {
                path: path.into(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(write)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(write)?;
            writeln!(f, "{key}").map_err(write)?;
            Ok(key)
        }
        Err(source) => Err(Error::Read {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/serve.key");
        let key = load_or_create(&path).unwrap();
        assert!(key.starts_with("e2b_") && key.len() == 44, "{key}");
        assert!(key[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create(&path), Err(Error::Open { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(load_or_create(&path), Err(Error::Empty(_))));
    }
}
