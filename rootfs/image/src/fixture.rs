//! Test images made in code: layers written as tar files entry by entry,
//! packed as an OCI image layout or a `docker save` archive. Used by this
//! crate's tests and the VMM's image tests (feature `fixture`); no network
//! and no container tool needed.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::source::sha256;

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer tar, built entry by entry (modification time 1000000000).
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

const MTIME: u64 = 1_000_000_000;

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Layer {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(size);
        h.set_mtime(MTIME);
        h
    }

    /// A regular file owned by `uid:gid`.
    pub fn file(mut self, path: &str, contents: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(
            tar::EntryType::Regular,
            mode,
            uid,
            gid,
            contents.len() as u64,
        );
        self.tar.append_data(&mut h, path, contents).unwrap();
        self
    }

    /// A regular file with extended attributes (as PAX `SCHILY.xattr.`
    /// records, the way Docker writes file capabilities).
    pub fn file_with_xattrs(
        mut self,
        path: &str,
        contents: &[u8],
        mode: u32,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        let mut records = Vec::new();
        for (name, value) in xattrs {
            let body = [format!(" SCHILY.xattr.{name}=").as_bytes(), value, b"\n"].concat();
            // The length counts itself.
            let mut len = body.len() + 1;
            while format!("{len}").len() + body.len() != len {
                len += 1;
            }
            records.extend_from_slice(format!("{len}").as_bytes());
            records.extend_from_slice(&body);
        }
        let mut h = Self::header(tar::EntryType::XHeader, 0o644, 0, 0, records.len() as u64);
        self.tar
            .append_data(&mut h, "PaxHeaders/x", &records[..])
            .unwrap();
        self.file(path, contents, mode, 0, 0)
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, 0, 0);
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        self.tar.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.tar.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// Deletes `path` of the layers below.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let marker = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&marker, b"", 0o644, 0, 0)
    }

    /// Hides everything the layers below put in folder `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644, 0, 0)
    }

    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// An image: layers and the configuration's `config` object.
pub struct Image {
    pub layers: Vec<(Vec<u8>, Compression)>,
    /// `Env`, `Cmd`, `Entrypoint`, `WorkingDir`, `User`...
    pub config: serde_json::Value,
}

fn compress(tar: &[u8], how: Compression) -> Vec<u8> {
    match how {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(tar).unwrap();
            enc.finish().unwrap()
        }
        Compression::Zstd => crate::zstd::compress(tar),
    }
}

fn media_type(how: Compression) -> &'static str {
    match how {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

impl Image {
    /// The configuration document.
    pub fn config_json(&self, arch: &str) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(|(t, _)| sha256(t)).collect();
        serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    /// Writes the blobs and returns (config digest, config size, manifest
    /// bytes) for an image of architecture `arch`.
    fn write_blobs(&self, blobs: &Path, arch: &str) -> (String, Vec<u8>) {
        let config = self.config_json(arch);
        let config_digest = sha256(&config);
        std::fs::write(blobs.join(hex(&config_digest)), &config).unwrap();
        let mut layers = Vec::new();
        for (tar, how) in &self.layers {
            let blob = compress(tar, *how);
            let digest = sha256(&blob);
            std::fs::write(blobs.join(hex(&digest)), &blob).unwrap();
            layers
                .push(json!({"mediaType": media_type(*how), "digest": digest, "size": blob.len()}));
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        std::fs::write(blobs.join(hex(&sha256(&manifest))), &manifest).unwrap();
        (config_digest, manifest)
    }

    /// Writes an OCI image layout at `dir` (created). With `other_arch`, the
    /// index is a multi-architecture one whose other entry (an arm64 or
    /// amd64 image with no layers) must not be picked.
    pub fn write_oci_layout(&self, dir: &Path, name: &str, other_arch: bool) -> String {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let host = if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            "amd64"
        };
        let other = if host == "amd64" { "arm64" } else { "amd64" };
        let (config_digest, manifest) = self.write_blobs(&blobs, host);
        let entry = |m: &[u8], arch: &str| {
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(m),
                   "size": m.len(), "platform": {"architecture": arch, "os": "linux"}})
        };
        let mut entries = vec![entry(&manifest, host)];
        if other_arch {
            let decoy = Image {
                layers: Vec::new(),
                config: json!({}),
            };
            let (_, other_manifest) = decoy.write_blobs(&blobs, other);
            entries.insert(0, entry(&other_manifest, other));
        }
        let inner = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }))
        .unwrap();
        std::fs::write(blobs.join(hex(&sha256(&inner))), &inner).unwrap();
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&inner),
                           "size": inner.len(), "annotations": {"org.opencontainers.image.ref.name": name}}],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        config_digest
    }

    /// Writes a `docker save` archive (legacy layout: `ID/layer.tar`,
    /// uncompressed) at `path`, tagged `tag`.
    pub fn write_docker_archive(&self, path: &Path, tag: &str) -> String {
        let arch = if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            "amd64"
        };
        let config = self.config_json(arch);
        let config_digest = sha256(&config);
        let mut out = tar::Builder::new(std::fs::File::create(path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            out.append_data(&mut h, name, data).unwrap();
        };
        let config_name = format!("{}.json", hex(&config_digest));
        add(&config_name, &config);
        let mut names = Vec::new();
        for (i, (tar, _)) in self.layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            add(&name, tar);
            names.push(name);
        }
        let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        out.into_inner().unwrap().flush().unwrap();
        config_digest
    }
}

/// Packs folder `dir` as a tar at `out` (an `oci-archive` from a layout).
pub fn tar_folder(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}
