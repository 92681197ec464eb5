//! Generates the gRPC code from `proto/` with the system `protoc` (Debian package `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        return Err(
            "protoc not found: install it with `apt-get install -y protobuf-compiler`".into(),
        );
    }
    let protos = [
        "proto/sigil/admin/v1/admin.proto",
        "proto/sigil/agent/v1/agent.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
