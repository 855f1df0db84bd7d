//! A snapshot's `state` file: the framing (magic, version, length,
//! checksum) as found, and the body behind a correct header, so the JSON
//! decoding of the machine state is reached.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("state");
    let _ = vmm::snapshot::decode(data, path);
    if let Ok(state) = vmm::snapshot::decode(&vmm::snapshot::frame(data), path) {
        // What decodes encodes again.
        let again = vmm::snapshot::encode(&state).expect("a decoded state encodes");
        vmm::snapshot::decode(&again, path).expect("an encoded state decodes");
    }
});
