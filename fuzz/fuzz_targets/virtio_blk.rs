//! virtio-blk requests (read, write, flush, get-id, discard, anything)
//! over a layered disk, from a driver that has set the device up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_fuzz::driver::{Driver, Input};

fuzz_target!(|data: &[u8]| {
    let mut driver = Driver::new(vmm_fuzz::block::device());
    driver.setup();
    driver.run(Input(data));
});
