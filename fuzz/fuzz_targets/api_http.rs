//! The control socket's HTTP parsing, and the routing of a parsed request
//! to an action (all that the device loop is handed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::action::Action;

fuzz_target!(|data: &[u8]| {
    // Prefixes too: the server parses a request as its bytes arrive.
    for cut in [data.len() / 3, data.len() / 2, data.len()] {
        if let Ok(Some(req)) = vmm::api::parse_request(&data[..cut]) {
            let _ = Action::from_http(&req.method, &req.path, &req.body);
        }
    }
});
