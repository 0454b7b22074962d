//! Compiles `loadlab/**/*.proto` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "loadlab/feed/v1/feed.proto",
    "loadlab/timeline/v1/timeline.proto",
    "loadlab/presence/v1/presence.proto",
    "loadlab/runner/v1/runner.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set also feeds gRPC reflection.
    std::fs::write(
        out.join("loadlab_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
