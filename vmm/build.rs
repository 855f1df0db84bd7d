//! Generates the E2B envd API types (`vmm serve`) from the .proto files in
//! proto/: prost for the binary protobuf encoding, pbjson for the protobuf
//! JSON mapping the E2B SDKs use. protox compiles the .proto files, so no
//! `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/process/process.proto",
        "proto/filesystem/filesystem.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let set = prost::Message::encode_to_vec(&descriptors);
    prost_build::Config::new()
        .out_dir(&out)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .out_dir(&out)
        .register_descriptors(&set)?
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
