//! Generated gRPC code for sigil's APIs (see `proto/`).

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

/// sigil-server's administration API (Unix socket).
pub mod admin {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("sigil.admin.v1");
    }
}

/// sigil-server's API for node agents (TLS over TCP).
pub mod agent {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("sigil.agent.v1");
    }
}
