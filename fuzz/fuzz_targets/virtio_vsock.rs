//! The vsock device: packets on its transmit queue into the muxer
//! (connection requests to host ports nobody listens on, data, credit
//! updates, shutdowns, resets, garbage), and what it queues back.
#![no_main]

use devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::driver::{Driver, Input};
use vmm_fuzz::scratch::Scratch;

fuzz_target!(|data: &[u8]| {
    let dir = Scratch::new("vsock");
    let device = Vsock::new(3, &dir.path().join("vsock.sock")).expect("a vsock device");
    let mut driver = Driver::new(Box::new(device));
    driver.setup();
    driver.run(Input(data));
    driver.serve_all();
});
