//! Generated gRPC code for sigil's own APIs and for the standard APIs it serves (see `proto/`).
//!
//! The standard ones are wire compatible with their upstream definitions: [`workload`] is the
//! SPIFFE Workload API, [`spire::api::agent::delegatedidentity::v1`] is SPIRE's Delegated Identity
//! API. Module paths mirror protobuf packages because prost links packages with `super::` paths.

pub mod spire;
pub mod workload;

/// Encoded `FileDescriptorSet` of every file above (imports included), for gRPC server reflection:
/// hand it to `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sigil_descriptor");

/// sigil-server's administration API (Unix socket).
pub mod admin {
    /// Version 1.
    #[allow(clippy::all, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("sigil.admin.v1");
    }
}

/// sigil-server's API for node agents (TLS over TCP).
pub mod agent {
    /// Version 1.
    #[allow(clippy::all, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("sigil.agent.v1");
    }
}

/// sigil-netd's API: endpoints, policies, monitor, status (Unix socket).
pub mod netd {
    /// Version 1.
    #[allow(clippy::all, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("sigil.netd.v1");
    }
}
