//! The root disk on virtio-blk, driven by the guest kernel's own driver and
//! made the guest's root by the init: the shared base image stays
//! untouched, each VM's writes go to its layer, a flushed write survives a
//! restart on the same layer, and two VMs on one base do not see each
//! other's writes.

mod common;

use std::path::Path;

use common::{launch, sha256_file, Scratch};

fn default_base() -> std::path::PathBuf {
    let cache = std::env::var_os("VMM_CACHE_DIR")
        .map(Into::into)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| Path::new(&d).join("vmm")))
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache/vmm"));
    let base = cache.join("base/current/base.ext4");
    assert!(
        base.exists(),
        "{} is missing: run tools/setup.sh",
        base.display()
    );
    base
}

/// Config JSON for a VM on the default base that runs `script` in busybox sh.
fn vm_with_disk(rootfs: &str, script: &str) -> String {
    format!(r#"{{"memory_mib": 192, "rootfs": {rootfs}, "cmdline": "-- sh -c \"{script}\""}}"#)
}

#[test]
fn layers_keep_flushed_writes_and_isolate_vms_on_one_base() {
    let base = default_base();
    let before = sha256_file(&base);
    let s = Scratch::new("disk-layers");
    let layer_a = s.path("a.layer");
    let layer_b = s.path("b.layer");
    // VM A writes and syncs a file, then its VMM process ends.
    let run = launch(
        &s,
        &vm_with_disk(
            &format!(r#"{{"layer": "{}"}}"#, layer_a.display()),
            "echo from-a > /root/a.txt && sync && echo wrote",
        ),
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stdout.contains("wrote"), "{}", run.describe());

    // A new VM on the same layer sees it.
    let read_a = "cat /root/a.txt; cat /etc/debian_version";
    let run = launch(
        &s,
        &vm_with_disk(&format!(r#"{{"layer": "{}"}}"#, layer_a.display()), read_a),
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stdout.contains("from-a"), "{}", run.describe());

    // A VM on another layer of the same base does not.
    let run = launch(
        &s,
        &vm_with_disk(&format!(r#"{{"layer": "{}"}}"#, layer_b.display()), read_a),
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(!run.stdout.contains("from-a"), "{}", run.describe());
    assert!(
        run.stdout.contains("12."),
        "the base is Debian 12: {}",
        run.describe()
    );

    // The layers are sparse: a few MiB of writes, not a copy of the base.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&layer_a).unwrap().blocks() * 512;
    let base_size = std::fs::metadata(&base).unwrap().len();
    assert!(allocated < base_size / 4, "layer holds {allocated} bytes");
    assert_eq!(sha256_file(&base), before, "the base image changed");
}

#[test]
fn missing_base_image_is_a_clear_error() {
    let s = Scratch::new("disk-nobase");
    let run = launch(&s, r#"{"rootfs": {"base": "/nonexistent/base.ext4"}}"#);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr
            .contains("cannot open the base image /nonexistent/base.ext4"),
        "{}",
        run.describe()
    );
}

/// Bytes and seconds from GNU dd's summary line ("N bytes (...) copied,
/// T s, R kB/s").
fn dd_summary(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.contains(" copied, "))?;
    let bytes = line.split_whitespace().next()?.parse().ok()?;
    let secs = line
        .split(" copied, ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some((bytes, secs))
}

/// Also: a read-only disk refuses writes (one VM for both: a cold boot
/// costs half a minute on PVM hosts).
#[test]
fn a_read_only_disk_refuses_writes_and_a_rate_limited_one_reads_at_its_limit() {
    // 256 KiB per 2 s: 128 KiB/s after the first full bucket. The disk is
    // read-only so no ext4 write-back shares the budget, and dd reads past
    // the guest's page cache. The write checks come after dd, so they take
    // nothing from the bucket dd starts with.
    const BUCKET: f64 = 256.0 * 1024.0;
    const LIMIT: f64 = 128.0 * 1024.0;
    let s = Scratch::new("disk-limit");
    let run = launch(
        &s,
        &vm_with_disk(
            r#"{"read_only": true, "rate_limit": {"bandwidth": {"size": 262144, "refill_time_ms": 2000}}}"#,
            "dd if=/dev/vda of=/dev/null bs=64k count=32 iflag=direct 2>&1; \
             cat /etc/hostname; cat /sys/block/vda/ro; touch /x || echo refused",
        ),
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert!(run.stdout.contains("sandbox"), "{}", run.describe());
    assert!(run.stdout.contains("refused"), "{}", run.describe());
    let (bytes, secs) = dd_summary(&run.stdout).unwrap_or_else(|| panic!("{}", run.describe()));
    assert_eq!(bytes, 2.0 * 1024.0 * 1024.0, "{}", run.describe());
    // What the bucket held when dd started came at once; the rest at the
    // limit.
    let rate = (bytes - BUCKET) / secs;
    eprintln!("rate-limited read: {bytes} bytes in {secs} s, {rate:.0} B/s beyond the first bucket (limit {LIMIT})");
    assert!(
        (rate - LIMIT).abs() <= 0.15 * LIMIT,
        "{rate:.0} B/s is not within 15% of {LIMIT}: {}",
        run.describe()
    );
}
