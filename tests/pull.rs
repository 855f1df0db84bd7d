//! `vmm image pull` against a real registry: Debian's `docker-registry`
//! (the reference registry) started by the test on 127.0.0.1, the test's
//! images pushed into it with `skopeo`. Nothing leaves the machine. The
//! images are imported into a scratch cache (`VMM_CACHE_DIR`); no VM boots
//! here (tests/image.rs boots imported images).

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{describe, ok, Scratch, VMM};
use serde_json::json;
use vmm_image::fixture::{self, Compression, Layer};

/// A registry on 127.0.0.1, stopped when dropped.
struct Registry {
    process: Child,
    addr: String,
    storage: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Registry {
    fn start(scratch: &Scratch) -> Registry {
        let binary = "/usr/bin/docker-registry";
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: apt-get install docker-registry skopeo (tools/setup.sh does it)"
        );
        // A free port: bound, read, released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = scratch.path("registry");
        let config = scratch.file(
            "registry.yml",
            &format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                storage.display()
            ),
        );
        // Its log (a line per 404, as pushes probe for blobs) goes to a file.
        let log = std::fs::File::create(scratch.path("registry.log")).unwrap();
        let process = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut registry = Registry {
            process,
            addr,
            storage,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&registry.addr).is_err() {
            let ended = registry.process.try_wait().unwrap();
            assert!(ended.is_none(), "the registry ended: {ended:?}");
            assert!(Instant::now() < deadline, "the registry did not listen");
            std::thread::yield_now();
        }
        registry
    }

    /// Pushes the OCI layout `layout` (all its platforms) as `repo:tag`.
    fn push(&self, layout: &Path, name: &str, target: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--insecure-policy",
                "--dest-tls-verify=false",
                "-q",
            ])
            .arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{}/{target}", self.addr))
            .stdin(Stdio::null())
            .output()
            .expect("skopeo (apt-get install skopeo; tools/setup.sh does it)");
        assert!(out.status.success(), "skopeo: {}", describe(&out));
    }

    /// The largest blob the registry stores (skopeo compresses layers it
    /// pushes: the registry's blobs are not the layout's): its digest and
    /// its file.
    fn largest_blob(&self) -> (String, PathBuf) {
        let mut best: Option<(u64, String, PathBuf)> = None;
        let root = self.storage.join("docker/registry/v2/blobs/sha256");
        for prefix in std::fs::read_dir(root).unwrap() {
            for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
                let blob = blob.unwrap();
                let data = blob.path().join("data");
                let len = std::fs::metadata(&data).unwrap().len();
                if best.as_ref().is_none_or(|(l, _, _)| len > *l) {
                    let digest = format!("sha256:{}", blob.file_name().to_string_lossy());
                    best = Some((len, digest, data));
                }
            }
        }
        let (_, digest, data) = best.expect("the registry stores blobs");
        (digest, data)
    }
}

fn vmm(cache: &Path, args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .env("VMM_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Bytes that do not compress (skopeo gzips layers as it pushes them).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn image(tag: &str) -> fixture::Image {
    let upper = Layer::new()
        .file("hello", tag.as_bytes(), 0o644, 0, 0)
        .file("big", &pseudo_random(3 << 20), 0o644, 0, 0)
        .finish();
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/os", b"test", 0o644, 0, 0)
        .finish();
    fixture::Image {
        layers: vec![(lower, Compression::Gzip), (upper, Compression::None)],
        config: json!({"Env": [format!("TAG={tag}")], "Cmd": ["cat", "/hello"]}),
    }
}

#[test]
fn pulls_the_hosts_image_of_an_index_verified_resumed_and_once() {
    let scratch = Scratch::new("pull");
    let cache = scratch.path("cache");
    let registry = Registry::start(&scratch);
    let layout = scratch.path("layout");
    // A multi-architecture index: this host's image and another one.
    let digest = image("multi").write_oci_layout(&layout, "multi", true);
    registry.push(&layout, "multi", "team/app:1");
    let reference = format!("{}/team/app:1", registry.addr);

    // Half of the largest layer is already downloaded, as a pull that was
    // interrupted leaves it: the pull resumes from there.
    let (layer, stored) = registry.largest_blob();
    let hex = layer.trim_start_matches("sha256:");
    let downloads = cache.join("images/downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let bytes = std::fs::read(stored).unwrap();
    assert!(
        bytes.len() > 4096,
        "a layer worth resuming: {} bytes",
        bytes.len()
    );
    std::fs::write(
        downloads.join(format!("{hex}.partial")),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();

    let pulled = vmm(&cache, &["image", "pull", &reference]);
    let said = String::from_utf8_lossy(&pulled.stderr).into_owned();
    let out = ok(pulled);
    assert!(out.starts_with("imported"), "{out}");
    let from = bytes.len() / 2;
    assert!(
        said.contains(&format!("resuming {layer} from byte {from}")),
        "{said}"
    );
    assert!(!downloads.join(format!("{hex}.partial")).exists());
    let listed: serde_json::Value =
        serde_json::from_str(&ok(vmm(&cache, &["image", "ls", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        listed[0]["digest"],
        digest.as_str(),
        "the host's image, not the other one"
    );
    assert_eq!(listed[0]["names"], json!([reference]));
    let record: vmm::image::Record = serde_json::from_slice(
        &std::fs::read(Path::new(listed[0]["disk"].as_str().unwrap()).with_file_name("image.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record.defaults.env, ["TAG=multi"]);
    assert_eq!(record.source, reference);

    // Pulled again under another tag: nothing new is stored.
    registry.push(&layout, "multi", "team/app:again");
    let again = format!("{}/team/app:again", registry.addr);
    let out = ok(vmm(&cache, &["image", "pull", &again]));
    assert!(out.starts_with("already imported"), "{out}");

    // Named images stay through a prune; `--all` takes what no template
    // uses.
    assert!(ok(vmm(&cache, &["image", "prune"])).contains("0 images removed"));
    let out = ok(vmm(&cache, &["image", "prune", "--all"]));
    assert!(
        out.contains(&digest) && out.contains("1 image removed"),
        "{out}"
    );
    assert_eq!(ok(vmm(&cache, &["image", "ls", "--json"])), "[]");
}

#[test]
fn a_corrupted_blob_is_refused_by_digest() {
    let scratch = Scratch::new("pull-corrupt");
    let cache = scratch.path("cache");
    let registry = Registry::start(&scratch);
    let layout = scratch.path("layout");
    image("corrupt").write_oci_layout(&layout, "corrupt", false);
    registry.push(&layout, "corrupt", "team/bad:1");
    // The registry's copy of the largest layer gets one byte changed.
    let (layer, stored) = registry.largest_blob();
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();

    let reference = format!("{}/team/bad:1", registry.addr);
    let out = vmm(&cache, &["image", "pull", &reference]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match its digest") && stderr.contains(&layer),
        "{stderr}"
    );
    let listed = ok(vmm(&cache, &["image", "ls", "--json"]));
    assert_eq!(listed.trim(), "[]", "nothing imported");
}

#[test]
fn a_missing_image_is_said() {
    let scratch = Scratch::new("pull-missing");
    let cache = scratch.path("cache");
    let registry = Registry::start(&scratch);
    let reference = format!("{}/team/none:1", registry.addr);
    let out = vmm(&cache, &["image", "pull", &reference]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&registry.addr),
        "{}",
        describe(&out)
    );
}
