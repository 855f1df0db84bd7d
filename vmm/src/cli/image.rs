//! The CLI's image commands: `vmm image import|ls|rm|prune`
//! (docs/images.md, `vmm::image`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use vmm::image::{self, human, Input, Removed};

use super::fail;

/// `vmm image ...`.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Import an image as a root disk: a `docker save` archive, an OCI
    /// archive (`skopeo copy ... oci-archive:FILE`), an OCI image layout
    /// folder, or `-` for an archive on standard input. An image already
    /// imported is stored once, whatever its names.
    Import {
        /// The archive or folder; `-` reads standard input.
        path: PathBuf,
        /// The image's name (default: the tag the archive gives it).
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull an image from a registry (OCI distribution protocol) and
    /// import it, named as the reference (e.g. python:3.12,
    /// localhost:5000/team/app:1). Takes the host's entry of a
    /// multi-architecture image; credentials from ~/.docker/config.json;
    /// an interrupted pull resumes when run again.
    Pull {
        /// The image reference.
        reference: String,
        /// The image's name (default: the reference).
        #[arg(long)]
        name: Option<String>,
        /// Allow plain HTTP to this registry (always allowed for
        /// localhost registries).
        #[arg(long)]
        insecure: bool,
    },
    /// List the images: names, digest, size on disk, last use.
    Ls {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image name (the image goes with its last name) or, by
    /// digest, an image and all its names. Refused while a template uses it.
    Rm {
        /// A name or a digest (`sha256:HEX`, or 12 or more hex digits).
        image: String,
    },
    /// Remove the images no name and no template uses (with --all: every
    /// image no template uses), unfinished imports and partial downloads.
    Prune {
        #[arg(long)]
        all: bool,
    },
}

pub fn command(cmd: ImageCommand) -> ExitCode {
    match cmd {
        ImageCommand::Import { path, name } => import(&path, name.as_deref()),
        ImageCommand::Pull {
            reference,
            name,
            insecure,
        } => {
            let options = vmm_image::pull::Options {
                insecure,
                docker_config: None,
            };
            report(
                std::time::Instant::now(),
                image::pull(&reference, name.as_deref(), &options, &mut progress()),
            )
        }
        ImageCommand::Ls { json } => ls(json),
        ImageCommand::Rm { image } => match image::remove(&image, &vmm::template::bases()) {
            Ok(Removed::Name) => {
                println!("removed the name {image} (the image has other names)");
                ExitCode::SUCCESS
            }
            Ok(Removed::Image) => {
                println!("removed {image}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ImageCommand::Prune { all } => match image::prune(all, &vmm::template::bases()) {
            Ok((removed, freed)) => {
                for digest in &removed {
                    println!("removed {digest}");
                }
                let n = removed.len();
                let noun = if n == 1 { "image" } else { "images" };
                println!("{n} {noun} removed, {} freed", human(freed));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

fn import(path: &std::path::Path, name: Option<&str>) -> ExitCode {
    let input = if path.as_os_str() == "-" {
        Input::Stdin
    } else {
        Input::Path(path)
    };
    let started = std::time::Instant::now();
    report(started, image::import(input, name, &mut progress()))
}

/// Progress lines: on a terminal each step (long only for large layers),
/// elsewhere only resumed and retried downloads.
fn progress() -> impl FnMut(&str) {
    let verbose = std::io::stderr().is_terminal();
    move |line: &str| {
        if verbose || line.starts_with("retrying") || line.starts_with("resuming") {
            eprintln!("vmm: {line}");
        }
    }
}

/// Says what an import or pull did.
fn report(started: std::time::Instant, result: image::Result<image::Imported>) -> ExitCode {
    match result {
        Ok(imported) => {
            let record = &imported.image.record;
            let what = if imported.existed {
                "already imported"
            } else {
                "imported"
            };
            println!(
                "{what} {} ({}, {} on disk, {:.1} s){}",
                imported.name.as_deref().unwrap_or(&record.digest),
                short_digest(&record.digest),
                human(imported.image.size_on_disk()),
                started.elapsed().as_secs_f64(),
                if imported.name.is_none() {
                    "; no name: use it by digest or import with --name"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `sha256:` and 12 hex digits.
fn short_digest(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

/// One row of `vmm image ls`.
#[derive(Serialize)]
struct Row {
    names: Vec<String>,
    digest: String,
    /// Bytes its files take on disk.
    size_bytes: u64,
    /// The file system's size (what the guest sees).
    disk_bytes: u64,
    last_used_unix: u64,
    templates: Vec<String>,
    disk: PathBuf,
}

fn ls(json: bool) -> ExitCode {
    let images = match image::list(&vmm::template::bases()) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let now = vmm::names::now_unix();
    let rows: Vec<Row> = images
        .into_iter()
        .map(|l| Row {
            names: l.names,
            digest: l.image.record.digest.clone(),
            size_bytes: l.image.size_on_disk(),
            disk_bytes: l.image.record.size,
            last_used_unix: l
                .image
                .last_used()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            templates: l.templates,
            disk: l.image.disk(),
        })
        .collect();
    let total: u64 = rows.iter().map(|r| r.size_bytes).sum();
    let header = format!(
        "{:<32} {:<19} {:>10} {:>9}  TEMPLATES",
        "NAME", "DIGEST", "SIZE", "USED"
    );
    let code = super::print_listing(json, rows, &header, |r| {
        format!(
            "{:<32} {:<19} {:>10} {:>9}  {}",
            if r.names.is_empty() {
                "-".to_owned()
            } else {
                r.names.join(",")
            },
            short_digest(&r.digest),
            human(r.size_bytes),
            format!(
                "{} ago",
                super::named::uptime(now.saturating_sub(r.last_used_unix))
            ),
            if r.templates.is_empty() {
                "-".to_owned()
            } else {
                r.templates.join(",")
            }
        )
    });
    if !json {
        println!(
            "images: {} on disk; the whole cache ({}): {}",
            human(total),
            vmm::artifacts::cache_dir().display(),
            human(image::cache_usage())
        );
    }
    code
}

/// The image `name` names, pulled first when there is none and `name` is
/// a registry reference (`vmm run --image python:3.12`). The pull runs as
/// a `vmm image pull` process of its own: its download threads must not
/// be in this process, which may enter a jail next (a namespace needs a
/// single-threaded process).
pub fn open_or_pull(name: &str) -> Result<image::StoredImage, String> {
    match image::open(name) {
        Err(image::Error::NotFound(_)) if vmm_image::pull::is_reference(name) => {}
        other => return other.map_err(|e| e.to_string()),
    }
    eprintln!("vmm: no image {name} here: pulling it");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmm binary: {e}"))?;
    let status = std::process::Command::new(exe)
        .args(["image", "pull", name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot start the pull: {e}"))?;
    if !status.success() {
        return Err(format!("pulling {name} failed ({status})"));
    }
    image::open(name).map_err(|e| e.to_string())
}
