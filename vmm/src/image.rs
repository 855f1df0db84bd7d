//! Images (docs/images.md): OCI and Docker images imported as read-only
//! ext4 root disks, stored once in the artifact cache by their
//! configuration's digest, and named.
//!
//! Layout of `<cache>/images/`:
//! - `sha256-HEX/rootfs.ext4`: the disk every VM, template and fork of the
//!   image shares (read-only; each VM writes to its own layer);
//! - `sha256-HEX/image.json`: a [`Record`] (where it came from, its size,
//!   what its configuration says commands run with);
//! - `sha256-HEX/used`: touched when a VM boots from it (its time is the
//!   image's last use);
//! - `names/NAME`: a name (`/` written `%2F`), holding `sha256:HEX`;
//! - `.NAME.partial-RANDOM/`: imports under way (see `partial`).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use vmm_agent::ImageDefaults;

/// The disk's file name in an image's folder.
const DISK: &str = "rootfs.ext4";
const RECORD: &str = "image.json";
const USED: &str = "used";
const NAMES: &str = "names";
/// Largest `image.json` read.
const MAX_RECORD: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot import the image: {0}")]
    Import(#[from] vmm_image::import::Error),
    #[error("cannot read the image: {0}")]
    Source(#[from] vmm_image::source::Error),
    #[error("cannot pull the image: {0}")]
    Pull(#[from] vmm_image::pull::Error),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no image {0:?}; `vmm image ls` lists them, `vmm image import` adds one")]
    NotFound(String),
    #[error("{0:?} matches several images; give more of the digest")]
    Ambiguous(String),
    #[error("{0:?} is not an image name: use 1 to 255 printable characters without spaces, not starting with '.' or '-'")]
    BadName(String),
    #[error("the image {name:?} is used by template {}; remove {} first (`vmm template rm`)", templates.join(", "), if templates.len() == 1 { "it" } else { "them" })]
    InUse {
        name: String,
        templates: Vec<String>,
    },
    #[error(
        "the image {dir} is damaged ({detail}); remove it with `vmm image rm` and import it again"
    )]
    Damaged { dir: PathBuf, detail: String },
    #[error(transparent)]
    Partial(#[from] crate::partial::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `image.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// `sha256:HEX` of the image's configuration: its identity.
    pub digest: String,
    /// What it was imported from (a path, `-`, or a registry reference).
    pub source: String,
    /// Seconds since the Unix epoch.
    pub imported: u64,
    pub layers: usize,
    /// Files, folders and links in it.
    pub entries: u64,
    /// The disk's apparent size (its file is sparse).
    pub size: u64,
    /// `Env`, `WorkingDir` and `User`: every exec's defaults.
    pub defaults: ImageDefaults,
    /// `Entrypoint`: what `vmm run --image` runs, before its command.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`: what `vmm run --image` runs when given no command.
    #[serde(default)]
    pub cmd: Vec<String>,
}

impl Record {
    /// The command `vmm run --image` runs: the entrypoint with `args`, or
    /// with `Cmd` when `args` is empty.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub dir: PathBuf,
    pub record: Record,
}

impl StoredImage {
    fn open_dir(dir: &Path) -> Result<StoredImage> {
        let path = dir.join(RECORD);
        let damaged = |detail: String| Error::Damaged {
            dir: dir.to_path_buf(),
            detail,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_RECORD).read_to_end(&mut bytes))
            .map_err(|e| damaged(format!("{RECORD}: {e}")))?;
        let record =
            serde_json::from_slice(&bytes).map_err(|e| damaged(format!("{RECORD}: {e}")))?;
        Ok(StoredImage {
            dir: dir.to_path_buf(),
            record,
        })
    }

    /// The ext4 root disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// Bytes the image takes on disk (the disk file is sparse).
    pub fn size_on_disk(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// When a VM last booted from it (else when it was imported).
    pub fn last_used(&self) -> SystemTime {
        std::fs::metadata(self.dir.join(USED))
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.record.imported)
            })
    }

    /// Notes a use now (best effort: a jailed VM cannot write the store).
    pub fn mark_used(&self) {
        let _ = std::fs::File::create(self.dir.join(USED));
    }
}

/// The image store folder.
pub fn store_dir() -> PathBuf {
    crate::artifacts::cache_dir().join("images")
}

fn store() -> Result<PathBuf> {
    let dir = store_dir();
    std::fs::create_dir_all(dir.join(NAMES)).map_err(io("create", &dir))?;
    Ok(dir)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control()));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

/// A name as a file name: `%` and `/` escaped.
fn name_file(store: &Path, name: &str) -> PathBuf {
    store
        .join(NAMES)
        .join(name.replace('%', "%25").replace('/', "%2F"))
}

fn name_of_file(file: &str) -> String {
    file.replace("%2F", "/").replace("%25", "%")
}

fn folder_of(digest: &str) -> String {
    digest.replace(':', "-")
}

/// Where `vmm image import` reads an image from.
pub enum Input<'a> {
    /// A tar (docker save, oci-archive; gzip or zstd compressed or not) or
    /// an OCI image layout folder.
    Path(&'a Path),
    /// A tar on standard input.
    Stdin,
}

/// What an import did.
#[derive(Debug)]
pub struct Imported {
    pub image: StoredImage,
    /// The name given to it (the one asked, else the source's own), if any.
    pub name: Option<String>,
    /// It was in the store already (nothing was written but the name).
    pub existed: bool,
}

/// Imports an image into the store; `progress` gets one line per step.
pub fn import(
    input: Input,
    name: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<Imported> {
    if let Some(n) = name {
        check_name(n)?;
    }
    let store = store()?;
    crate::partial::sweep(&store);
    let (work, _held) = crate::partial::create(&store, "import")?;
    let shown = match input {
        Input::Path(p) => p.display().to_string(),
        Input::Stdin => "-".to_owned(),
    };
    let result = import_in(&store, &work, input, &shown, name, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Pulls `reference` from its registry and imports it, named
/// `name` (default: the reference as given). Layers of an image imported
/// before are not downloaded. Partial downloads stay in the store's
/// `downloads` folder, so a pull run again resumes them.
pub fn pull(
    reference: &str,
    name: Option<&str>,
    options: &vmm_image::pull::Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Imported> {
    let name = name.unwrap_or(reference);
    check_name(name)?;
    let store = store()?;
    crate::partial::sweep(&store);
    let (work, _held) = crate::partial::create(&store, "pull")?;
    let layout = work.join("layout");
    let have = |digest: &str| store.join(folder_of(digest)).join(DISK).exists();
    let mut events = |e: vmm_image::pull::Event| match e {
        vmm_image::pull::Event::Config { digest } => progress(&format!("image {digest}")),
        vmm_image::pull::Event::Blob {
            digest,
            done,
            total,
        } => progress(&format!(
            "downloading {} {} of {}",
            &digest[..digest.len().min(19)],
            human(done),
            human(total)
        )),
        vmm_image::pull::Event::Resume { digest, from } => {
            progress(&format!("resuming {digest} from byte {from}"))
        }
        vmm_image::pull::Event::Retry {
            digest,
            attempt,
            error,
        } => progress(&format!(
            "retrying {digest} (attempt {attempt} failed: {error})"
        )),
    };
    let result = vmm_image::pull::pull(
        reference,
        &layout,
        &store.join("downloads"),
        options,
        &have,
        &mut events,
    )
    .map_err(Error::from)
    .and_then(|pulled| {
        if pulled.complete {
            let input = Input::Path(&layout);
            return import_in(&store, &work, input, reference, Some(name), progress);
        }
        let digest = pulled.config_digest;
        set_name(&store, name, &digest, &work)?;
        Ok(Imported {
            image: StoredImage::open_dir(&store.join(folder_of(&digest)))?,
            name: Some(name.to_owned()),
            existed: true,
        })
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Imports `input` (shown as `source` in its record) using the partial
/// folder `work`.
fn import_in(
    store: &Path,
    work: &Path,
    input: Input,
    source: &str,
    name: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<Imported> {
    let path = match input {
        Input::Path(p) => spool_if_compressed(p, work, progress)?,
        Input::Stdin => {
            let spooled = work.join("stdin.tar");
            progress("reading the image from standard input");
            spool(&mut std::io::stdin().lock(), &spooled)?;
            spool_if_compressed(&spooled, work, progress)?
        }
    };
    let image = vmm_image::Image::open(&path)?;
    let name = name.map(str::to_owned).or_else(|| image.name.clone());
    if let Some(n) = &name {
        check_name(n)?;
    }
    let target = store.join(folder_of(&image.config_digest));
    let existed = target.join(DISK).exists();
    if !existed {
        let out = work.join("image");
        std::fs::create_dir(&out).map_err(io("create", &out))?;
        let mut step = |s: vmm_image::Step| match s {
            vmm_image::Step::Layer { index, count, size } => {
                progress(&format!("layer {index}/{count} ({})", human(size)))
            }
            vmm_image::Step::Disk => progress("writing the ext4 disk"),
        };
        let built = vmm_image::build_disk(&image, work, &out.join(DISK), &mut step)?;
        let disk = out.join(DISK);
        std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o444))
            .map_err(io("protect", &disk))?;
        let config = image.config.config().clone().unwrap_or_default();
        let record = Record {
            digest: image.config_digest.clone(),
            source: source.to_owned(),
            imported: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            layers: image.layers.len(),
            entries: built.entries,
            size: built.size,
            defaults: ImageDefaults {
                env: config.env().clone().unwrap_or_default(),
                working_dir: config.working_dir().clone(),
                user: config.user().clone(),
            },
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
        };
        let record_path = out.join(RECORD);
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        std::fs::write(&record_path, json).map_err(io("write", &record_path))?;
        match std::fs::rename(&out, &target) {
            Ok(()) => {}
            // Another import of the same image finished first: same bytes.
            Err(e) if target.join(DISK).exists() => drop(e),
            Err(e) => return Err(io("install", &target)(e)),
        }
    }
    if let Some(n) = &name {
        set_name(store, n, &image.config_digest, work)?;
    }
    Ok(Imported {
        image: StoredImage::open_dir(&target)?,
        name,
        existed,
    })
}

/// Points `name` at `digest` (replacing what it named).
fn set_name(store: &Path, name: &str, digest: &str, work: &Path) -> Result<()> {
    let tmp = work.join("name");
    std::fs::write(&tmp, digest).map_err(io("write", &tmp))?;
    let file = name_file(store, name);
    std::fs::rename(&tmp, &file).map_err(io("name the image as", &file))
}

/// Copies `from` to the file `to`.
fn spool(from: &mut dyn Read, to: &Path) -> Result<()> {
    let mut file = std::fs::File::create(to).map_err(io("create", to))?;
    std::io::copy(from, &mut file).map_err(io("write", to))?;
    Ok(())
}

/// A compressed tar (`docker save | gzip`) decompressed into `work`; any
/// other path as it is.
fn spool_if_compressed(
    path: &Path,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some(mut decoder) = vmm_image::source::decompressed(path).map_err(io("read", path))? else {
        return Ok(path.to_path_buf());
    };
    progress("decompressing the archive");
    let out = work.join("input.tar");
    spool(&mut decoder, &out)?;
    Ok(out)
}

/// The image `reference` names: a name, or a digest (`sha256:HEX`, or 12 or
/// more of its first hex digits).
pub fn open(reference: &str) -> Result<StoredImage> {
    let store = store_dir();
    let not_found = || Error::NotFound(reference.to_owned());
    if check_name(reference).is_ok() {
        match std::fs::read_to_string(name_file(&store, reference)) {
            Ok(digest) => return StoredImage::open_dir(&store.join(folder_of(digest.trim()))),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("read", &name_file(&store, reference))(e))
            }
            Err(_) => {}
        }
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    if hex.len() < 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let prefix = format!("sha256-{}", hex.to_ascii_lowercase());
    let found: Vec<PathBuf> = std::fs::read_dir(&store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => StoredImage::open_dir(one),
        [] => Err(not_found()),
        _ => Err(Error::Ambiguous(reference.to_owned())),
    }
}

/// The files besides its disk a VM booted from image `reference` reads,
/// for the jail: its record, and its name's file.
pub fn boot_files(reference: &str) -> Result<Vec<PathBuf>> {
    let image = open(reference)?;
    let mut files = vec![image.dir.join(RECORD)];
    let name = name_file(&store_dir(), reference);
    if name.exists() {
        files.push(name);
    }
    Ok(files)
}

/// One image and its names, as `vmm image ls` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub names: Vec<String>,
    pub image: StoredImage,
    /// Templates built from it.
    pub templates: Vec<String>,
}

/// (template name, base image path) of templates, to tell which images
/// they use (`vmm::template::bases()`).
pub type TemplateBases = [(String, PathBuf)];

/// Every image in the store, newest first; `templates` says which
/// templates use each.
pub fn list(templates: &TemplateBases) -> Result<Vec<Listed>> {
    let store = store_dir();
    let names = names(&store);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&store).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.starts_with("sha256-") {
            continue;
        }
        let Ok(image) = StoredImage::open_dir(&entry.path()) else {
            continue;
        };
        out.push(Listed {
            names: names
                .iter()
                .filter(|(_, d)| *d == image.record.digest)
                .map(|(n, _)| n.clone())
                .collect(),
            templates: users(templates, &image),
            image,
        });
    }
    out.sort_by_key(|l| std::cmp::Reverse(l.image.record.imported));
    Ok(out)
}

/// (name, digest) of every name in the store.
fn names(store: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(store.join(NAMES))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let digest = std::fs::read_to_string(e.path()).ok()?;
            Some((
                name_of_file(&e.file_name().to_string_lossy()),
                digest.trim().to_owned(),
            ))
        })
        .collect();
    out.sort();
    out
}

fn users(templates: &TemplateBases, image: &StoredImage) -> Vec<String> {
    let disk = std::fs::canonicalize(image.disk()).unwrap_or_else(|_| image.disk());
    templates
        .iter()
        .filter(|(_, base)| *base == disk)
        .map(|(name, _)| name.clone())
        .collect()
}

/// What `remove` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// The name is gone; the image stays under its other names.
    Name,
    /// The image is gone, with every name it had.
    Image,
}

/// Removes `reference`: a name (the image goes with its last name) or a
/// digest (the image and all its names). Refused while one of `templates`
/// uses it.
pub fn remove(reference: &str, templates: &TemplateBases) -> Result<Removed> {
    let store = store_dir();
    let image = open(reference)?;
    let templates = users(templates, &image);
    if !templates.is_empty() {
        return Err(Error::InUse {
            name: reference.to_owned(),
            templates,
        });
    }
    let all = names(&store);
    let by_name = all.iter().any(|(n, _)| n == reference);
    let others = all
        .iter()
        .filter(|(n, d)| *d == image.record.digest && n != reference)
        .count();
    if by_name {
        let file = name_file(&store, reference);
        std::fs::remove_file(&file).map_err(io("remove", &file))?;
        if others > 0 {
            return Ok(Removed::Name);
        }
    } else {
        for (n, _) in all.iter().filter(|(_, d)| *d == image.record.digest) {
            let file = name_file(&store, n);
            std::fs::remove_file(&file).map_err(io("remove", &file))?;
        }
    }
    std::fs::remove_dir_all(&image.dir).map_err(io("remove", &image.dir))?;
    Ok(Removed::Image)
}

/// Removes the images nothing uses: no name and no template (with `all`,
/// named ones no template uses too), the folders of imports that ended
/// unfinished, and the partial downloads of pulls that did. Returns the digests removed and the bytes freed.
pub fn prune(all: bool, templates: &TemplateBases) -> Result<(Vec<String>, u64)> {
    let store = store()?;
    crate::partial::sweep(&store);
    let downloads = store.join("downloads");
    if downloads.exists() {
        std::fs::remove_dir_all(&downloads).map_err(io("remove", &downloads))?;
    }
    let mut removed = Vec::new();
    let mut freed = 0;
    for listed in list(templates)? {
        if !listed.templates.is_empty() || (!listed.names.is_empty() && !all) {
            continue;
        }
        for n in &listed.names {
            let _ = std::fs::remove_file(name_file(&store, n));
        }
        freed += listed.image.size_on_disk();
        std::fs::remove_dir_all(&listed.image.dir).map_err(io("remove", &listed.image.dir))?;
        removed.push(listed.image.record.digest);
    }
    Ok((removed, freed))
}

/// Bytes the whole artifact cache takes on disk (kernels, initramfs,
/// base images, imported images, templates), for `vmm doctor` and `vmm
/// image ls`.
pub fn cache_usage() -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.blocks() * 512),
                _ => 0,
            })
            .sum()
    }
    walk(&crate::artifacts::cache_dir())
}

/// Bytes in a unit people read.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_slashes_and_percent() {
        let store = Path::new("/s");
        let f = name_file(store, "localhost:5000/team/py:3.12%");
        assert_eq!(f, Path::new("/s/names/localhost:5000%2Fteam%2Fpy:3.12%25"));
        assert_eq!(
            name_of_file(&f.file_name().unwrap().to_string_lossy()),
            "localhost:5000/team/py:3.12%"
        );
        assert!(check_name("python:3.12").is_ok());
        for bad in ["", ".hidden", "-x", "a b", "tab\t"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_command_is_the_entrypoint_with_args_or_cmd() {
        let r = Record {
            digest: "sha256:00".into(),
            source: "-".into(),
            imported: 0,
            layers: 0,
            entries: 0,
            size: 0,
            defaults: ImageDefaults::default(),
            entrypoint: vec!["/bin/tini".into(), "--".into()],
            cmd: vec!["python3".into()],
        };
        assert_eq!(r.command(&[]), vec!["/bin/tini", "--", "python3"]);
        assert_eq!(r.command(&["sh".into()]), vec!["/bin/tini", "--", "sh"]);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
