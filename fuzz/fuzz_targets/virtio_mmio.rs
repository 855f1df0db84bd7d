//! The virtio-mmio transport's registers and queue set-up, from a driver
//! that starts from nothing (record 4 runs the standard set-up), with a
//! block device behind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_fuzz::driver::{Driver, Input};

fuzz_target!(|data: &[u8]| {
    let mut driver = Driver::new(vmm_fuzz::block::device());
    driver.run(Input(data));
});
