//! Generates the protobuf types from hivemind 1.1.12's `.proto` files in `proto/` with prost.
//! protox parses them in pure Rust, so no system `protoc` is needed on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const FILES: &[&str] = &[
        "proto/auth.proto",
        "proto/averaging.proto",
        "proto/crypto.proto",
        "proto/dht.proto",
        "proto/p2pd.proto",
        "proto/runtime.proto",
        "proto/test.proto",
    ];
    for f in FILES {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(FILES, ["proto"])?;
    prost_build::Config::new()
        // `bytes::Bytes` for every bytes field: decoding a tensor buffer is a slice, not a copy.
        .bytes(["."])
        .compile_fds(fds)?;
    Ok(())
}
