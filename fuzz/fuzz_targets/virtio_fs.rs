//! virtio-fs: FUSE requests from the guest into the server, on a share
//! folder made fresh for each input, next to a folder the guest must never
//! reach (a symlink in the share points at it). After each input, nothing
//! outside the share has changed.
//!
//! Input: a byte whose low bit makes the share read-only, then driver
//! records (`vmm_fuzz::driver`).
#![no_main]

use std::path::Path;

use devices::virtio::fs::{Fs, PassthroughFs};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::driver::{Driver, Input};
use vmm_fuzz::scratch::{fingerprint, Entry, Scratch};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let read_only = input.u8() & 1 == 1;
    let dir = Scratch::new("fs");
    let (share, outside) = (dir.path().join("share"), dir.path().join("outside"));
    plant(&share, &outside);
    let before = outside_share(dir.path(), &share);

    let fs = PassthroughFs::new(&share, read_only).expect("the share");
    let mut driver = Driver::new(Box::new(Fs::new("fuzz", fs)));
    driver.setup();
    driver.run(input);
    drop(driver);

    assert_eq!(
        before,
        outside_share(dir.path(), &share),
        "the server changed something outside its share"
    );
});

fn plant(share: &Path, outside: &Path) {
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::create_dir_all(outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret\n").unwrap();
    std::fs::write(share.join("file"), b"hello\n").unwrap();
    std::fs::write(share.join("sub/inner"), b"inner\n").unwrap();
    std::os::unix::fs::symlink("../outside", share.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", share.join("abs")).unwrap();
}

/// Everything under `root` but the share's contents and the share's own
/// entry (whose times change with its contents).
fn outside_share(root: &Path, share: &Path) -> Vec<(std::path::PathBuf, Entry)> {
    fingerprint(root)
        .into_iter()
        .filter(|(path, _)| !path.starts_with(share))
        .collect()
}
