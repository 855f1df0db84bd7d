//! Pulling an image from a registry (the OCI distribution protocol, spoken
//! by the `oci-client` crate) into an OCI image layout folder, which
//! [`crate::Image::open`] then reads like any other: the host's entry of a
//! multi-architecture index, every blob checked against its digest,
//! interrupted downloads resumed where they stopped (the partial blobs
//! stay in a downloads folder between attempts and runs), credentials
//! from `~/.docker/config.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use crate::source;

/// Tries per blob or manifest before a pull fails.
const ATTEMPTS: u32 = 5;
/// Largest manifest or configuration accepted.
const MAX_DOCUMENT: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0:?} is not an image reference (like python:3.12 or localhost:5000/team/app:1): {1}"
    )]
    Reference(String, String),
    #[error("registry {registry}: {detail}")]
    Registry { registry: String, detail: String },
    #[error("{what} {digest} from {registry} does not match its digest (got {actual}): the registry sent corrupt data; nothing was imported")]
    Corrupt {
        what: &'static str,
        registry: String,
        digest: String,
        actual: String,
    },
    #[error("{0}")]
    Source(#[from] source::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is larger than {MAX_DOCUMENT} bytes: not an image document")]
    TooLarge { what: String },
    #[error("cannot start the download runtime: {0}")]
    Runtime(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Plain HTTP for any registry (otherwise only for localhost ones).
    pub insecure: bool,
    /// Docker's client configuration, for credentials (default:
    /// `~/.docker/config.json`, or `$DOCKER_CONFIG/config.json`).
    pub docker_config: Option<PathBuf>,
}

/// What a pull is doing, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The image's configuration digest is known: the image's identity.
    Config { digest: String },
    /// `done` of `total` bytes of blob `digest` are in.
    Blob {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A download continues from byte `from`, where an earlier one
    /// stopped.
    Resume { digest: String, from: u64 },
    /// A download failed and is tried again (from where it stopped).
    Retry {
        digest: String,
        attempt: u32,
        error: String,
    },
}

/// What a pull got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The image's configuration digest: its identity.
    pub config_digest: String,
    /// The layout holds the whole image (false: `have` said it is
    /// imported already, and its layers were not downloaded).
    pub complete: bool,
}

/// Pulls `reference` into the OCI layout folder `layout` (created), with
/// partial blobs kept in `downloads`. `have(config_digest)` says the image
/// is imported already: then its layers are not downloaded.
pub fn pull(
    reference: &str,
    layout: &Path,
    downloads: &Path,
    options: &Options,
    have: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(Event),
) -> Result<Pulled, Error> {
    let image: Reference = reference
        .parse()
        .map_err(|e: oci_client::ParseError| Error::Reference(reference.into(), e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let puller = Puller::new(&image, options);
    runtime.block_on(puller.run(reference, layout, downloads, have, progress))
}

/// Whether `text` reads as an image reference a pull could fetch.
pub fn is_reference(text: &str) -> bool {
    text.parse::<Reference>().is_ok()
}

/// Whether a registry host is this machine (plain HTTP allowed).
pub fn is_local(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

struct Puller<'a> {
    image: &'a Reference,
    client: Client,
    auth: RegistryAuth,
    registry: String,
}

impl<'a> Puller<'a> {
    fn new(image: &'a Reference, options: &Options) -> Self {
        let registry = image.resolve_registry().to_owned();
        let protocol = if options.insecure || is_local(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = credentials(&registry, options.docker_config.as_deref());
        Puller {
            image,
            client,
            auth,
            registry,
        }
    }

    fn registry_error(&self, e: impl std::error::Error) -> Error {
        // The causes say what went wrong (connection refused, a TLS
        // failure): the top error only names the request.
        let mut detail = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            detail.push_str(": ");
            detail.push_str(&c.to_string());
            cause = c.source();
        }
        Error::Registry {
            registry: self.registry.clone(),
            detail,
        }
    }

    async fn run(
        &self,
        reference: &str,
        layout: &Path,
        downloads: &Path,
        have: &dyn Fn(&str) -> bool,
        progress: &mut dyn FnMut(Event),
    ) -> Result<Pulled, Error> {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        std::fs::create_dir_all(downloads).map_err(io(downloads))?;
        // The reference's manifest (an index or an image manifest).
        let (top, top_digest) = self.manifest(self.image).await?;
        let top_type = media_type(&top);
        write_blob(&blobs, &top_digest, &top)?;
        let manifest_bytes = if is_index(&top) {
            let index = ImageIndex::from_reader(&top[..]).map_err(|e| source::Error::Invalid {
                name: "the image index".into(),
                detail: e.to_string(),
            })?;
            let chosen = source::host_entry(index.manifests())?;
            let digest = chosen.digest().to_string();
            let by_digest = self.image.clone_with_digest(digest.clone());
            let (bytes, got) = self.manifest(&by_digest).await?;
            self.check("manifest", &digest, &got)?;
            write_blob(&blobs, &digest, &bytes)?;
            bytes
        } else {
            top.clone()
        };
        let manifest = ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| {
            source::Error::Invalid {
                name: "the image manifest".into(),
                detail: e.to_string(),
            }
        })?;
        let config = manifest.config();
        let config_digest = config.digest().to_string();
        self.blob(&blobs, downloads, &config_digest, config.size(), progress)
            .await?;
        progress(Event::Config {
            digest: config_digest.clone(),
        });
        if have(&config_digest) {
            return Ok(Pulled {
                config_digest,
                complete: false,
            });
        }
        for layer in manifest.layers() {
            let digest = layer.digest().to_string();
            self.blob(&blobs, downloads, &digest, layer.size(), progress)
                .await?;
        }
        write_layout(layout, &top_digest, &top_type, top.len(), reference)?;
        Ok(Pulled {
            config_digest,
            complete: true,
        })
    }

    /// A manifest's bytes and its digest (computed here, not taken from
    /// the registry's header), tried again on failures.
    async fn manifest(&self, image: &Reference) -> Result<(Vec<u8>, String), Error> {
        let accepted = [
            OCI_IMAGE_INDEX_MEDIA_TYPE,
            IMAGE_MANIFEST_LIST_MEDIA_TYPE,
            OCI_IMAGE_MEDIA_TYPE,
            IMAGE_MANIFEST_MEDIA_TYPE,
        ];
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self
                .client
                .pull_manifest_raw(image, &self.auth, &accepted)
                .await
            {
                Ok((bytes, _)) if bytes.len() > MAX_DOCUMENT => {
                    return Err(Error::TooLarge {
                        what: format!("the manifest of {image}"),
                    })
                }
                Ok((bytes, _)) => {
                    let digest = source::sha256(&bytes);
                    if let Some(expected) = image.digest() {
                        self.check("manifest", expected, &digest)?;
                    }
                    return Ok((bytes.to_vec(), digest));
                }
                Err(e) if is_final(&e) => return Err(self.registry_error(e)),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(self.registry_error(e)),
            None => Err(self.registry_error(std::io::Error::other("no attempt was made"))),
        }
    }

    fn check(&self, what: &'static str, expected: &str, actual: &str) -> Result<(), Error> {
        if expected == actual {
            return Ok(());
        }
        Err(Error::Corrupt {
            what,
            registry: self.registry.clone(),
            digest: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }

    /// Downloads blob `digest` into `blobs`, resuming a partial download
    /// in `downloads`; checks the digest of the whole.
    async fn blob(
        &self,
        blobs: &Path,
        downloads: &Path,
        digest: &str,
        size: u64,
        progress: &mut dyn FnMut(Event),
    ) -> Result<(), Error> {
        let hex = hex_of(digest)?;
        let done_path = blobs.join(hex);
        let partial = downloads.join(format!("{hex}.partial"));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download(digest, size, &partial, progress).await {
                Ok(()) => break,
                Err(e)
                    if attempt < ATTEMPTS
                        && !matches!(e, Error::Corrupt { .. } | Error::Io { .. }) =>
                {
                    progress(Event::Retry {
                        digest: digest.to_owned(),
                        attempt,
                        error: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let actual = file_digest(&partial)?;
        if actual != digest {
            let _ = std::fs::remove_file(&partial);
            return Err(Error::Corrupt {
                what: "blob",
                registry: self.registry.clone(),
                digest: digest.to_owned(),
                actual,
            });
        }
        std::fs::rename(&partial, &done_path).map_err(io(&done_path))
    }

    /// One attempt: appends to `partial` from its current size.
    async fn download(
        &self,
        digest: &str,
        size: u64,
        partial: &Path,
        progress: &mut dyn FnMut(Event),
    ) -> Result<(), Error> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .map_err(io(partial))?;
        let mut have = file.metadata().map_err(io(partial))?.len();
        if have >= size && size > 0 {
            return Ok(());
        }
        let response = self
            .client
            .pull_blob_stream_partial(self.image, digest, have, None)
            .await
            .map_err(|e| self.registry_error(e))?;
        let mut stream = match response {
            BlobResponse::Partial(s) => {
                progress(Event::Resume {
                    digest: digest.to_owned(),
                    from: have,
                });
                s.stream
            }
            // The registry sent it all: start over.
            BlobResponse::Full(s) => {
                file.set_len(0).map_err(io(partial))?;
                have = 0;
                s.stream
            }
        };
        let mut reported = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.registry_error(e))?;
            have += chunk.len() as u64;
            if have > size {
                return Err(Error::Corrupt {
                    what: "blob",
                    registry: self.registry.clone(),
                    digest: digest.to_owned(),
                    actual: format!("more than its {size} bytes"),
                });
            }
            file.write_all(&chunk).map_err(io(partial))?;
            // A line per 8 MiB at most.
            if have - reported >= 8 << 20 || have == size {
                reported = have;
                progress(Event::Blob {
                    digest: digest.to_owned(),
                    done: have,
                    total: size,
                });
            }
        }
        Ok(())
    }
}

/// Errors a retry cannot mend (a missing image, refused credentials).
fn is_final(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    matches!(
        e,
        E::AuthenticationFailure(_)
            | E::UnauthorizedError { .. }
            | E::ImageManifestNotFoundError(_)
    ) || {
        let text = e.to_string().to_ascii_lowercase();
        ["manifest unknown", "name unknown", "unauthorized", "denied"]
            .iter()
            .any(|w| text.contains(w))
    }
}

fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .is_some_and(|v| v.get("manifests").is_some())
}

fn media_type(bytes: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match value.get("mediaType").and_then(|m| m.as_str()) {
        Some(t) => t.to_owned(),
        None if is_index(bytes) => OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned(),
        None => OCI_IMAGE_MEDIA_TYPE.to_owned(),
    }
}

fn hex_of(digest: &str) -> Result<&str, Error> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(source::Error::UnsupportedDigest(digest.to_owned()).into()),
    }
}

fn write_blob(blobs: &Path, digest: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = blobs.join(hex_of(digest)?);
    std::fs::write(&path, bytes).map_err(io(&path))
}

fn file_digest(path: &Path) -> Result<String, Error> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}"))
}

/// Writes `oci-layout` and an `index.json` naming the top manifest.
fn write_layout(
    layout: &Path,
    digest: &str,
    media_type: &str,
    size: usize,
    name: &str,
) -> Result<(), Error> {
    let marker = layout.join("oci-layout");
    std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&marker))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    let path = layout.join("index.json");
    std::fs::write(&path, index.to_string()).map_err(io(&path))
}

/// Credentials for `registry` from Docker's client configuration
/// (`auths.<registry>.auth`, base64 of `user:password`); anonymous when
/// there are none.
fn credentials(registry: &str, config: Option<&Path>) -> RegistryAuth {
    let path = config.map(Path::to_path_buf).or_else(|| {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        Some(dir.join("config.json"))
    });
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return RegistryAuth::Anonymous;
    };
    auth_from_config(registry, &text)
}

/// The `auths` entry of Docker's configuration text that names
/// `registry` (with or without a scheme or path; Docker Hub as
/// `https://index.docker.io/v1/`).
pub fn auth_from_config(registry: &str, text: &str) -> RegistryAuth {
    let Ok(config) = serde_json::from_str::<serde_json::Value>(text) else {
        return RegistryAuth::Anonymous;
    };
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return RegistryAuth::Anonymous;
    };
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    for (key, entry) in auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        if host != registry && !(hub(host) && hub(registry)) {
            continue;
        }
        let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()) else {
            continue;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            continue;
        };
        let text = String::from_utf8_lossy(&decoded);
        if let Some((user, password)) = text.split_once(':') {
            return RegistryAuth::Basic(user.to_owned(), password.to_owned());
        }
    }
    RegistryAuth::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_registries_are_told_apart() {
        for local in [
            "localhost:5000",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "index.docker.io",
            "ghcr.io",
            "localhost.evil.com:5000",
            "10.0.0.1:5000",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
    }

    #[test]
    fn credentials_come_from_docker_config() {
        let config = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "localhost:5000": {"auth": "bG9jYWw6cHc="}
        }}"#;
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        assert_eq!(
            auth_from_config("index.docker.io", config),
            basic("hub", "secret")
        );
        assert_eq!(
            auth_from_config("localhost:5000", config),
            basic("local", "pw")
        );
        assert_eq!(auth_from_config("ghcr.io", config), RegistryAuth::Anonymous);
        assert_eq!(
            auth_from_config("ghcr.io", "not json"),
            RegistryAuth::Anonymous
        );
    }
}
