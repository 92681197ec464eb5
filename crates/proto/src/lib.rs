//! Generated gRPC code for sigil's own APIs and for the standard APIs it serves (see `proto/`).
//!
//! The standard ones are wire compatible with their upstream definitions: [`workload`] is the
//! SPIFFE Workload API, [`spire::api::agent::delegatedidentity::v1`] is SPIRE's Delegated Identity
//! API. Module paths mirror protobuf packages because prost links packages with `super::` paths.
#![forbid(unsafe_code)]

pub mod json;
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

/// The standard gRPC health checking protocol, served by every daemon on its sockets.
pub mod grpc {
    /// `grpc.health`.
    pub mod health {
        /// Version 1.
        #[allow(clippy::all, rust_2018_idioms)]
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

/// Hubble's flow messages (package `flow`), wire compatible with Hubble's.
#[allow(clippy::all, rust_2018_idioms)]
pub mod flow {
    tonic::include_proto!("flow");
}

/// Hubble's Observer API (package `observer`), served by sigil-netd.
#[allow(clippy::all, rust_2018_idioms)]
pub mod observer {
    tonic::include_proto!("observer");
}

/// Hubble Relay's node status messages (package `relay`), used by the Observer API.
#[allow(clippy::all, rust_2018_idioms)]
pub mod relay {
    tonic::include_proto!("relay");
}

/// sigil-netd's API: endpoints, policies, monitor, status (Unix socket).
pub mod netd {
    /// Version 1.
    #[allow(clippy::all, rust_2018_idioms)]
    pub mod v1 {
        tonic::include_proto!("sigil.netd.v1");
    }
}

/// Machine-readable reasons for which sigil-server refuses an agent, carried as a gRPC status detail (a
/// `google.rpc.ErrorInfo` inside `grpc-status-details-bin`, see `RpcStatus` in `agent.proto`), so that the
/// agent never has to read the human message.
pub mod agent_refusal {
    use prost::Message;

    use crate::agent::v1::{ErrorInfo, RpcStatus};

    /// `ErrorInfo.domain` of sigil's agent API.
    pub const DOMAIN: &str = "sigil.agent.v1";
    /// The `Any` type URL of `google.rpc.ErrorInfo`.
    pub const ERROR_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";

    /// Why the server refused the agent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Reason {
        /// The server no longer knows the agent: drop the agent SVID, attest again if possible.
        Evicted,
        /// The agent is banned: stop.
        Banned,
    }

    impl Reason {
        /// The `ErrorInfo.reason` string.
        pub fn as_str(self) -> &'static str {
            match self {
                Reason::Evicted => "AGENT_EVICTED",
                Reason::Banned => "AGENT_BANNED",
            }
        }

        fn parse(s: &str) -> Option<Self> {
            match s {
                "AGENT_EVICTED" => Some(Reason::Evicted),
                "AGENT_BANNED" => Some(Reason::Banned),
                _ => None,
            }
        }
    }

    /// A PermissionDenied status carrying `reason` as its detail.
    pub fn status(reason: Reason, message: impl Into<String>) -> tonic::Status {
        let message = message.into();
        let code = tonic::Code::PermissionDenied;
        let info = ErrorInfo {
            reason: reason.as_str().to_string(),
            domain: DOMAIN.to_string(),
            metadata: Default::default(),
        };
        let detail = RpcStatus {
            code: code as i32,
            message: message.clone(),
            details: vec![prost_types::Any {
                type_url: ERROR_INFO_TYPE_URL.to_string(),
                value: info.encode_to_vec(),
            }],
        };
        tonic::Status::with_details(code, message, detail.encode_to_vec().into())
    }

    /// The refusal reason a status carries, if any (the message text is never consulted).
    pub fn reason(status: &tonic::Status) -> Option<Reason> {
        let detail = RpcStatus::decode(status.details()).ok()?;
        detail
            .details
            .iter()
            .filter(|a| a.type_url == ERROR_INFO_TYPE_URL)
            .filter_map(|a| ErrorInfo::decode(a.value.as_slice()).ok())
            .find(|i| i.domain == DOMAIN)
            .and_then(|i| Reason::parse(&i.reason))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reason_round_trips_and_ignores_the_message() {
            for r in [Reason::Evicted, Reason::Banned] {
                assert_eq!(reason(&status(r, "whatever")), Some(r));
            }
            // The words alone carry no reason.
            let plain = tonic::Status::permission_denied("agent x is banned (evicted)");
            assert_eq!(reason(&plain), None);
            assert_eq!(
                reason(&status(Reason::Evicted, "banned banned banned")),
                Some(Reason::Evicted)
            );
        }
    }
}
