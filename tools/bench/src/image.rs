//! `vmm bench image`: importing an image, and booting one.
//!
//! The image is our Debian base (`base/current/base.ext4`, about 116 MiB
//! in 4,900 files), dumped to a folder with `debugfs rdump` and packed as
//! a two-layer OCI layout (gzip layers: python's library apart from the
//! rest), so both sides below work on the same bytes.
//!
//! - `import`: `vmm image import LAYOUT` (a private store under
//!   `VMM_CACHE_DIR`), against the naive floor: `tar -xzf` of each layer
//!   into a folder, then `mkfs.ext4 -b 4096 -d` of the folder (4 KiB
//!   blocks, as ours: for file systems under 512 MiB mkfs would pick 1 KiB
//!   blocks, which pack small files tighter but make a slower root disk);
//!   in turns. Also the disk each result takes.
//! - `boot`: `vmm run --cold --image IMAGE -- true` against `vmm run
//!   --cold -- true` (the Debian base itself), in turns: the same files, so
//!   a difference would be the image path's.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

use crate::common::{percentile, vmm_exe, Error, Report, ScratchDir};
use vmm_image::fixture::{self, Compression};

/// Results of `vmm bench image`.
#[derive(Debug, Default)]
pub struct ImageBench {
    pub runs: u32,
    /// Bytes of the image's files.
    pub tree_bytes: u64,
    pub entries: u64,
    /// `vmm image import` wall times (ms).
    pub import_ms: Vec<f64>,
    /// `tar -xzf` of the layers plus `mkfs.ext4 -d` (ms).
    pub naive_ms: Vec<f64>,
    /// Bytes on disk of the imported image and of the naive one.
    pub import_disk: u64,
    pub naive_disk: u64,
    /// `vmm run --cold -- true` wall times (ms), on the image and on the
    /// Debian base.
    pub boot_image_ms: Vec<f64>,
    pub boot_base_ms: Vec<f64>,
}

fn p50(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

fn ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    Some(p50(a)? / p50(b)?)
}

fn r2(x: Option<f64>) -> Value {
    x.map_or(Value::Null, |v| json!((v * 100.0).round() / 100.0))
}

impl Report for ImageBench {
    fn to_json(&self) -> Value {
        json!({
            "runs": self.runs,
            "image": {"tree_bytes": self.tree_bytes, "entries": self.entries},
            "import_ms": {"p50": r2(p50(&self.import_ms)), "all": self.import_ms},
            "naive_tar_mkfs_ms": {"p50": r2(p50(&self.naive_ms)), "all": self.naive_ms},
            "import_over_naive": r2(ratio(&self.import_ms, &self.naive_ms)),
            "disk_bytes": {"import": self.import_disk, "naive": self.naive_disk},
            "boot_true_ms": {
                "image": {"p50": r2(p50(&self.boot_image_ms)), "all": self.boot_image_ms},
                "debian_base": {"p50": r2(p50(&self.boot_base_ms)), "all": self.boot_base_ms},
            },
            "boot_image_over_base": r2(ratio(&self.boot_image_ms, &self.boot_base_ms)),
        })
    }

    fn table(&self) -> String {
        let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        let r = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        format!(
            "image benchmark: {} runs; the Debian base as an OCI image ({:.0} MiB, {} entries)\n\
             import (vmm image import)        p50 {:>8} ms\n\
             naive (tar -xzf + mkfs.ext4 -d)  p50 {:>8} ms\n\
             import / naive                       {:>8}\n\
             disk: import {:.1} MiB, naive {:.1} MiB\n\
             vmm run --cold -- true: image p50 {} ms, Debian base p50 {} ms, ratio {}\n",
            self.runs,
            self.tree_bytes as f64 / (1 << 20) as f64,
            self.entries,
            f(p50(&self.import_ms)),
            f(p50(&self.naive_ms)),
            r(ratio(&self.import_ms, &self.naive_ms)),
            self.import_disk as f64 / (1 << 20) as f64,
            self.naive_disk as f64 / (1 << 20) as f64,
            f(p50(&self.boot_image_ms)),
            f(p50(&self.boot_base_ms)),
            r(ratio(&self.boot_image_ms, &self.boot_base_ms)),
        )
    }
}

fn run(what: &'static str, i: u32, cmd: &mut Command) -> Result<(), Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: format!("{cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Run {
            what,
            run: i,
            detail: format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

fn timed(what: &'static str, i: u32, cmd: &mut Command) -> Result<f64, Error> {
    let start = Instant::now();
    run(what, i, cmd)?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Bytes allocated to the files under `path`.
fn disk_bytes(path: &Path) -> u64 {
    let st = match std::fs::symlink_metadata(path) {
        Ok(st) => st,
        Err(_) => return 0,
    };
    let own = st.blocks() * 512;
    if !st.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| disk_bytes(&e.path()))
        .sum::<u64>()
}

/// A tar of `args` in `tree` (GNU tar, numeric owners).
fn tar(tree: &Path, args: &[&str]) -> Result<Vec<u8>, Error> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(tree)
        .args(["--numeric-owner", "-cf", "-"])
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            program: "tar".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Run {
            what: "tar",
            run: 0,
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

pub fn image(runs: u32) -> Result<ImageBench, Error> {
    let vmm = vmm_exe()?;
    let base = vmm::artifacts::default_base_image();
    if !base.exists() {
        return Err(Error::Missing {
            what: "base image",
            path: base,
        });
    }
    let scratch = ScratchDir::new("image")?;
    let dir = scratch.path().to_path_buf();
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).map_err(|source| Error::Scratch {
        path: tree.clone(),
        source,
    })?;
    let rdump = format!("rdump / {}", tree.display());
    run(
        "debugfs rdump",
        0,
        Command::new("debugfs").arg("-R").arg(&rdump).arg(&base),
    )?;
    let _ = std::fs::remove_dir(tree.join("lost+found"));
    let mut bench = ImageBench {
        runs,
        tree_bytes: disk_bytes(&tree),
        entries: walk_count(&tree),
        ..Default::default()
    };

    // Two layers, as images have: python's library, and the rest.
    let python = "./usr/lib/python3.11";
    let rest = tar(&tree, &["--exclude", python, "."])?;
    let lib = tar(&tree, &[python])?;
    let oci = fixture::Image {
        layers: vec![(rest, Compression::Gzip), (lib, Compression::Gzip)],
        config: json!({"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
    };
    let layout = dir.join("layout");
    oci.write_oci_layout(&layout, "bench", false);
    let layers = layer_blobs(&layout);

    let store = dir.join("cache");
    let name = format!("bench-image-{}", std::process::id());
    for i in 0..runs {
        // Naive: unpack the layers, then mkfs.
        let naive = dir.join("naive");
        let _ = std::fs::remove_dir_all(&naive);
        std::fs::create_dir(&naive).map_err(|source| Error::Scratch {
            path: naive.clone(),
            source,
        })?;
        let img = dir.join("naive.ext4");
        let start = Instant::now();
        for layer in &layers {
            run(
                "tar -xzf",
                i,
                Command::new("tar")
                    .arg("-xzf")
                    .arg(layer)
                    .arg("-C")
                    .arg(&naive),
            )?;
        }
        let size_mib = ((disk_bytes(&naive) * 5 / 4) >> 20) + 32;
        run(
            "mkfs.ext4 -d",
            i,
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-d"])
                .arg(&naive)
                .arg(&img)
                .arg(format!("{size_mib}M")),
        )?;
        bench.naive_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        bench.naive_disk = disk_bytes(&img);
        let _ = std::fs::remove_dir_all(&naive);
        let _ = std::fs::remove_file(&img);

        // Ours, into a store of its own.
        let _ = std::fs::remove_dir_all(&store);
        bench.import_ms.push(timed(
            "vmm image import",
            i,
            Command::new(&vmm)
                .args(["image", "import"])
                .arg(&layout)
                .args(["--name", &name])
                .env("VMM_CACHE_DIR", &store),
        )?);
        bench.import_disk = disk_bytes(&store.join("images"));
    }
    let _ = std::fs::remove_dir_all(&store);

    // Boots: the image imported into the real cache (next to the kernel),
    // removed after.
    run(
        "vmm image import",
        0,
        Command::new(&vmm)
            .args(["image", "import"])
            .arg(&layout)
            .args(["--name", &name]),
    )?;
    let boots = (|| {
        for i in 0..runs {
            bench.boot_image_ms.push(timed(
                "vmm run --image",
                i,
                Command::new(&vmm).args(["run", "--cold", "--image", &name, "--", "true"]),
            )?);
            bench.boot_base_ms.push(timed(
                "vmm run",
                i,
                Command::new(&vmm).args(["run", "--cold", "--", "true"]),
            )?);
        }
        Ok::<(), Error>(())
    })();
    let _ = Command::new(&vmm).args(["image", "rm", &name]).output();
    boots?;
    Ok(bench)
}

/// The layout's layer blobs, in order (the manifest is the blob that
/// lists `layers`).
fn layer_blobs(layout: &Path) -> Vec<PathBuf> {
    let blobs = layout.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(doc) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(layers) = doc.get("layers").and_then(Value::as_array) {
            return layers
                .iter()
                .filter_map(|l| l["digest"].as_str())
                .map(|d| blobs.join(d.trim_start_matches("sha256:")))
                .collect();
        }
    }
    Vec::new()
}

fn walk_count(path: &Path) -> u64 {
    1 + std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_count(&e.path()),
            _ => 1,
        })
        .sum::<u64>()
}
