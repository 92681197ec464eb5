//! Generates the gRPC code from `proto/` with the system `protoc` (Debian package
//! `protobuf-compiler`), and a file descriptor set for gRPC server reflection.

use std::path::PathBuf;

/// Every file we compile; imports among them are found through the `proto` include root.
const PROTOS: &[&str] = &[
    "proto/sigil/admin/v1/admin.proto",
    "proto/sigil/agent/v1/agent.proto",
    "proto/sigil/netd/v1/netd.proto",
    "proto/workload.proto",
    "proto/grpc/health/v1/health.proto",
    "proto/spire/api/types/selector.proto",
    "proto/spire/api/types/spiffeid.proto",
    "proto/spire/api/types/x509svid.proto",
    "proto/spire/api/types/jwtsvid.proto",
    "proto/spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
    "proto/flow/flow.proto",
    "proto/relay/relay.proto",
    "proto/observer/observer.proto",
];

// google.protobuf.Struct (ValidateJWTSVIDResponse.claims) maps to `::prost_types::Struct`: prost
// points every well-known type at prost-types by default.

/// Messages that hold a private key or a bearer token: their `Debug` is written by hand in
/// `src/lib.rs` so that logging one never prints the secret.
const SECRET_MESSAGES: &[&str] = &[
    ".X509SVID",
    ".JWTSVID",
    ".ValidateJWTSVIDRequest",
    ".spire.api.types.JWTSVID",
    ".spire.api.agent.delegatedidentity.v1.X509SVIDWithKey",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        return Err(
            "protoc not found: install it with `apt-get install -y protobuf-compiler`".into(),
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .file_descriptor_set_path(out_dir.join("sigil_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])
        .map_err(|e| {
            // protoc looks for google/protobuf/*.proto beside itself; Debian ships them apart.
            if e.to_string().contains("google/protobuf") {
                format!(
                    "{e}\ninstall the well-known types with `apt-get install -y libprotobuf-dev`"
                )
            } else {
                e.to_string()
            }
        })?;
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
