//! The SPIFFE Workload API (`proto/workload.proto`, no protobuf package): messages, the
//! `SpiffeWorkloadApi` server trait and the client, plus the security header every call carries.

use std::fmt;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

#[allow(clippy::all, rust_2018_idioms)]
mod generated {
    // prost names the output of a file without a package `_.rs`.
    tonic::include_proto!("_");
}

pub use generated::*;

/// gRPC metadata key that every Workload API request must carry, with [`SECURITY_HEADER_VALUE`].
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The only value of [`SECURITY_HEADER`] a server accepts.
pub const SECURITY_HEADER_VALUE: &str = "true";

/// Server interceptor: rejects a request without `workload.spiffe.io: true` as InvalidArgument,
/// as the SPIFFE specification asks (use with `SpiffeWorkloadApiServer::with_interceptor`).
pub fn require_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(v) if v == SECURITY_HEADER_VALUE => Ok(request),
        Some(v) => Err(Status::invalid_argument(format!(
            "security header {SECURITY_HEADER} must be {SECURITY_HEADER_VALUE:?}, got {v:?}"
        ))),
        None => Err(Status::invalid_argument(format!(
            "security header {SECURITY_HEADER} missing from request"
        ))),
    }
}

/// Client interceptor: adds `workload.spiffe.io: true` to a request (use with
/// `SpiffeWorkloadApiClient::with_interceptor`).
pub fn insert_security_header(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.metadata_mut().insert(
        SECURITY_HEADER,
        MetadataValue::from_static(SECURITY_HEADER_VALUE),
    );
    Ok(request)
}

// The messages below hold private keys or bearer tokens: their Debug leaves those out so that a
// logged message never leaks them.

impl fmt::Debug for X509svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("x509_svid_len", &self.x509_svid.len())
            .field("x509_svid_key", &"<redacted>")
            .field("bundle_len", &self.bundle.len())
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for Jwtsvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwtsvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("svid", &"<redacted>")
            .field("hint", &self.hint)
            .finish()
    }
}

impl fmt::Debug for ValidateJwtsvidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateJwtsvidRequest")
            .field("audience", &self.audience)
            .field("svid", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_header_is_required_with_value_true() {
        let ok = insert_security_header(Request::new(())).and_then(require_security_header);
        assert!(ok.is_ok());

        let missing = require_security_header(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::InvalidArgument);
        assert!(
            missing.message().contains("workload.spiffe.io"),
            "{missing:?}"
        );

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("yes"));
        let wrong = require_security_header(wrong).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
        assert!(wrong.message().contains("\"yes\""), "{wrong:?}");
    }

    #[test]
    fn debug_leaves_out_keys_and_tokens() {
        let svid = X509svid {
            spiffe_id: "spiffe://example.org/w".into(),
            x509_svid: vec![1, 2, 3],
            x509_svid_key: b"KEYBYTES".to_vec(),
            bundle: vec![4],
            hint: "internal".into(),
        };
        let text = format!("{svid:?}");
        assert!(text.contains("spiffe://example.org/w") && text.contains("internal"));
        assert!(
            !text.contains("75, 69, 89") && !text.contains("KEYBYTES"),
            "{text}"
        );

        let jwt = Jwtsvid {
            spiffe_id: "spiffe://example.org/w".into(),
            svid: "header.claims.signature".into(),
            hint: String::new(),
        };
        assert!(!format!("{jwt:?}").contains("signature"));
        let req = ValidateJwtsvidRequest {
            audience: "aud".into(),
            svid: "header.claims.signature".into(),
        };
        let text = format!("{req:?}");
        assert!(
            text.contains("aud") && !text.contains("signature"),
            "{text}"
        );
    }
}
