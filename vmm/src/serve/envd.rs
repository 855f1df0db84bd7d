//! The E2B envd API's messages, generated from vmm/proto (build.rs):
//! prost structs with pbjson's protobuf-JSON serde impls.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}
