//! Where an image comes from: an OCI image layout (a folder, or a tar of
//! one: `oci-archive`), or a `docker save` archive (a tar, or a folder it
//! was unpacked into). Both give an image configuration and its layers in
//! order; blobs are read in place from the tar (no unpacking).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Largest JSON document (index, manifest, configuration) read.
const MAX_JSON: u64 = 8 << 20;
/// How deep image indexes may nest.
const MAX_NESTING: usize = 4;
/// The annotation naming an image in an OCI layout.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's and Docker's annotation with the image's full name.
const IMAGE_NAME: &str = "io.containerd.image.name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is neither an OCI image layout (no oci-layout and index.json) nor a docker save archive (no manifest.json)")]
    UnknownFormat(PathBuf),
    #[error("{0} is missing from the image")]
    MissingBlob(String),
    #[error("{name} is larger than {MAX_JSON} bytes: not an image document")]
    TooLarge { name: String },
    #[error("{name} is not valid: {detail}")]
    Invalid { name: String, detail: String },
    #[error("the image has no {arch} Linux entry (it has: {found})")]
    NoPlatform { arch: &'static str, found: String },
    #[error("the archive holds {0} images; import one at a time (docker save IMAGE, skopeo copy ... oci-archive:FILE)")]
    SeveralImages(usize),
    #[error("the image has {layers} layers but its configuration lists {diff_ids} layer digests")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("{what} {name} does not match its digest (expected {expected}, got {actual}): the image is corrupt")]
    DigestMismatch {
        what: &'static str,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported digest {0:?}: only sha256 is supported")]
    UnsupportedDigest(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(name: &str, detail: impl std::fmt::Display) -> Error {
    Error::Invalid {
        name: name.to_owned(),
        detail: detail.to_string(),
    }
}

/// The files of an image folder or image tar, by relative name.
enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        file: File,
        /// name -> (offset of the contents, size)
        members: HashMap<String, (u64, u64)>,
    },
}

impl Files {
    fn open(path: &Path) -> Result<Self, Error> {
        let st = std::fs::metadata(path).map_err(io(path))?;
        if st.is_dir() {
            return Ok(Files::Dir(path.to_owned()));
        }
        let mut file = File::open(path).map_err(io(path))?;
        let mut members = HashMap::new();
        let mut archive = tar::Archive::new(&mut file);
        for entry in archive.entries_with_seek().map_err(io(path))? {
            let entry = entry.map_err(io(path))?;
            if entry.header().entry_type().is_file() {
                let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                members.insert(clean(&name), (entry.raw_file_position(), entry.size()));
            }
        }
        file.rewind().map_err(io(path))?;
        Ok(Files::Tar {
            path: path.to_owned(),
            file,
            members,
        })
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Files::Dir(dir) => safe(name).is_some_and(|rel| dir.join(rel).is_file()),
            Files::Tar { members, .. } => members.contains_key(&clean(name)),
        }
    }

    /// A reader of member `name` and its size.
    fn reader(&self, name: &str) -> Result<(Box<dyn Read + Send + '_>, u64), Error> {
        let missing = || Error::MissingBlob(name.to_owned());
        match self {
            Files::Dir(dir) => {
                let path = dir.join(safe(name).ok_or_else(missing)?);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => missing(),
                    _ => io(&path)(e),
                })?;
                let size = file.metadata().map_err(io(&path))?.len();
                Ok((Box::new(file), size))
            }
            Files::Tar { file, members, .. } => {
                let &(offset, size) = members.get(&clean(name)).ok_or_else(missing)?;
                Ok((
                    Box::new(RangeReader {
                        file,
                        offset,
                        left: size,
                    }),
                    size,
                ))
            }
        }
    }

    /// A whole small document.
    fn read_json(&self, name: &str) -> Result<Vec<u8>, Error> {
        let (reader, size) = self.reader(name)?;
        if size > MAX_JSON {
            return Err(Error::TooLarge { name: name.into() });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader
            .take(MAX_JSON)
            .read_to_end(&mut bytes)
            .map_err(io(&self.path().join(name)))?;
        Ok(bytes)
    }

    fn path(&self) -> &Path {
        match self {
            Files::Dir(dir) => dir,
            Files::Tar { path, .. } => path,
        }
    }
}

/// Reads a byte range of a file with positioned reads (no shared cursor).
struct RangeReader<'a> {
    file: &'a File,
    offset: u64,
    left: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A member name without `./` or a leading `/`.
fn clean(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_owned()
}

/// A relative name that stays inside its folder, or `None`.
fn safe(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| path.to_owned())
}

/// One layer of an image, as stored in its source.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The member holding the layer (compressed or not).
    member: String,
    /// The stored blob's digest, when the source names one (OCI layouts).
    blob_digest: Option<String>,
    /// The uncompressed tar's digest, from the image configuration.
    pub diff_id: String,
    /// Bytes stored.
    pub size: u64,
}

/// An image found in a source: its configuration and layers.
pub struct Image {
    files: Files,
    /// `sha256:` and the hex digest of `config_bytes`: the image's identity.
    pub config_digest: String,
    pub config: ImageConfiguration,
    pub layers: Vec<Layer>,
    /// The name the source gives the image (`docker save`'s first tag, or an
    /// OCI layout's name annotation).
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Image {
    /// Opens the image at `path` (a folder or a tar file).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let files = Files::open(path)?;
        if files.exists("oci-layout") && files.exists("index.json") {
            Self::open_oci(files)
        } else if files.exists("manifest.json") {
            Self::open_docker(files)
        } else {
            Err(Error::UnknownFormat(path.to_owned()))
        }
    }

    fn open_oci(files: Files) -> Result<Self, Error> {
        let index_bytes = files.read_json("index.json")?;
        let index =
            ImageIndex::from_reader(&index_bytes[..]).map_err(|e| invalid("index.json", e))?;
        let mut name = None;
        let manifest = pick_manifest(&files, index.manifests(), &mut name, 0)?;
        let config_name = blob_name(manifest.config())?;
        let (config_bytes, config_digest) = read_config(&files, &config_name)?;
        check(
            "configuration",
            &config_name,
            manifest.config().digest().as_ref(),
            &config_digest,
        )?;
        let config = parse_config(&config_bytes)?;
        let diff_ids = diff_ids(&config, manifest.layers().len())?;
        let layers = manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(d, diff_id)| {
                Ok(Layer {
                    member: blob_name(d)?,
                    blob_digest: Some(d.digest().to_string()),
                    diff_id: diff_id.clone(),
                    size: d.size(),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Image {
            files,
            config_digest,
            config,
            layers,
            name,
        })
    }

    fn open_docker(files: Files) -> Result<Self, Error> {
        let bytes = files.read_json("manifest.json")?;
        let mut entries: Vec<DockerEntry> =
            serde_json::from_slice(&bytes).map_err(|e| invalid("manifest.json", e))?;
        if entries.len() != 1 {
            return Err(Error::SeveralImages(entries.len()));
        }
        let entry = entries.remove(0);
        let (config_bytes, config_digest) = read_config(&files, &entry.config)?;
        let config = parse_config(&config_bytes)?;
        let diff_ids = diff_ids(&config, entry.layers.len())?;
        let mut layers = Vec::new();
        for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
            let (_, size) = files.reader(member)?;
            layers.push(Layer {
                member: member.clone(),
                blob_digest: None,
                diff_id: diff_id.clone(),
                size,
            });
        }
        let name = entry.repo_tags.and_then(|tags| tags.into_iter().next());
        Ok(Image {
            files,
            config_digest,
            config,
            layers,
            name,
        })
    }

    /// Streams layer `layer`'s uncompressed tar to `apply`, then checks the
    /// stored and the uncompressed digests. gzip and zstd layers are
    /// recognised by their first bytes.
    pub fn read_layer<T, E: From<Error>>(
        &self,
        layer: &Layer,
        apply: impl FnOnce(&mut dyn Read) -> Result<T, E>,
    ) -> Result<T, E> {
        let (reader, _) = self.files.reader(&layer.member)?;
        let mut stored = Hashing::new(reader);
        let tar_stream =
            decompress(&mut stored).map_err(io(&self.files.path().join(&layer.member)))?;
        let mut tar_hashing = Hashing::new(tar_stream);
        let result = apply(&mut tar_hashing)?;
        // The tar ends before its trailing padding: hash all of it.
        std::io::copy(&mut tar_hashing, &mut std::io::sink())
            .map_err(io(&self.files.path().join(&layer.member)))?;
        let tar_digest = tar_hashing.finish();
        drop(tar_hashing);
        if let Some(expected) = &layer.blob_digest {
            std::io::copy(&mut stored, &mut std::io::sink())
                .map_err(io(&self.files.path().join(&layer.member)))?;
            check("layer", &layer.member, expected, &stored.finish())?;
        }
        check("layer", &layer.member, &layer.diff_id, &tar_digest)?;
        Ok(result)
    }
}

/// Picks the host's Linux manifest from an index's entries, following nested
/// indexes; records a name annotation when one is given.
fn pick_manifest(
    files: &Files,
    entries: &[Descriptor],
    name: &mut Option<String>,
    depth: usize,
) -> Result<ImageManifest, Error> {
    let chosen = host_entry(entries)?;
    if let Some(annotations) = chosen.annotations() {
        if let Some(n) = annotations
            .get(IMAGE_NAME)
            .or_else(|| annotations.get(REF_NAME))
        {
            name.get_or_insert_with(|| n.clone());
        }
    }
    let member = blob_name(chosen)?;
    let bytes = files.read_json(&member)?;
    check(
        "manifest",
        &member,
        chosen.digest().as_ref(),
        &sha256(&bytes),
    )?;
    let is_index = match chosen.media_type() {
        MediaType::ImageIndex => true,
        MediaType::Other(t) => t.contains("manifest.list"),
        _ => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some()),
    };
    if is_index {
        if depth >= MAX_NESTING {
            return Err(invalid(&member, "image indexes nest too deep"));
        }
        let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| invalid(&member, e))?;
        return pick_manifest(files, index.manifests(), name, depth + 1);
    }
    ImageManifest::from_reader(&bytes[..]).map_err(|e| invalid(&member, e))
}

/// The entry of an index for this host: Linux on this architecture, or
/// one without a platform; refused when several distinct images fit.
pub fn host_entry(entries: &[Descriptor]) -> Result<&Descriptor, Error> {
    let arch = host_arch();
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| match d.platform() {
            Some(p) => *p.os() == Os::Linux && *p.architecture() == arch,
            None => true,
        })
        .collect();
    let distinct: std::collections::HashSet<String> =
        candidates.iter().map(|d| d.digest().to_string()).collect();
    if distinct.len() > 1 {
        return Err(Error::SeveralImages(distinct.len()));
    }
    candidates.first().copied().ok_or_else(|| {
        let found: Vec<String> = entries
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| format!("{}/{}", p.os(), p.architecture()))
            .collect();
        Error::NoPlatform {
            arch: arch_name(),
            found: if found.is_empty() {
                "nothing".into()
            } else {
                found.join(", ")
            },
        }
    })
}

fn host_arch() -> Arch {
    match std::env::consts::ARCH {
        "aarch64" => Arch::ARM64,
        _ => Arch::Amd64,
    }
}

fn arch_name() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// `blobs/sha256/HEX` for a descriptor.
fn blob_name(d: &Descriptor) -> Result<String, Error> {
    let digest = d.digest();
    let algorithm = digest.algorithm().as_ref();
    let hex = digest.digest();
    if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::UnsupportedDigest(digest.to_string()));
    }
    Ok(format!("blobs/{algorithm}/{hex}"))
}

fn read_config(files: &Files, name: &str) -> Result<(Vec<u8>, String), Error> {
    let bytes = files.read_json(name)?;
    let digest = sha256(&bytes);
    Ok((bytes, digest))
}

/// The configuration's layer digests, which must be one per layer.
fn diff_ids(config: &ImageConfiguration, layers: usize) -> Result<&[String], Error> {
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers {
        return Err(Error::LayerCount {
            layers,
            diff_ids: diff_ids.len(),
        });
    }
    Ok(diff_ids)
}

fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, Error> {
    ImageConfiguration::from_reader(bytes).map_err(|e| invalid("the image configuration", e))
}

fn check(what: &'static str, name: &str, expected: &str, actual: &str) -> Result<(), Error> {
    if !expected.starts_with("sha256:") {
        return Err(Error::UnsupportedDigest(expected.to_owned()));
    }
    if expected != actual {
        return Err(Error::DigestMismatch {
            what,
            name: name.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        });
    }
    Ok(())
}

/// `sha256:HEX` of some bytes.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(&mut self) -> String {
        format!(
            "sha256:{}",
            hex(&std::mem::take(&mut self.hasher).finalize())
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Whether a stream's first bytes say gzip or zstd.
fn is_compressed(head: &[u8]) -> bool {
    head.starts_with(GZIP_MAGIC) || head.starts_with(ZSTD_MAGIC)
}

/// The uncompressed stream of `buffered`: gzip and zstd by their magic
/// bytes, else as is.
fn decoder<'a, R: std::io::BufRead + 'a>(mut buffered: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let head = buffered.fill_buf()?;
    Ok(if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(ZSTD_MAGIC) {
        crate::zstd::reader(buffered)?
    } else {
        Box::new(buffered)
    })
}

/// The uncompressed stream of a layer.
fn decompress<'a>(stored: &'a mut dyn Read) -> std::io::Result<Box<dyn Read + 'a>> {
    decoder(std::io::BufReader::with_capacity(1 << 20, stored))
}

/// A reader of the decompressed contents of the file at `path` when it is
/// gzip or zstd compressed (by its first bytes); `None` when it is not.
pub fn decompressed(path: &Path) -> std::io::Result<Option<Box<dyn Read>>> {
    let mut file = std::io::BufReader::new(File::open(path)?);
    if !is_compressed(std::io::BufRead::fill_buf(&mut file)?) {
        return Ok(None);
    }
    decoder(file).map(Some)
}
