//! The gRPC layer's shared pieces for the admin and agent APIs: domain and datastore errors mapped
//! to statuses, blocking datastore work run off the runtime, domain types converted to API messages.

use std::error::Error;

use sigil_datastore::DataStoreError;
use sigil_proto::admin::v1 as pb;
use sigil_spiffe::bundle::Bundle;
use tonic::Status;

use crate::error::MigrateError;
use crate::validate::FieldError;

/// Runs datastore work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// Maps datastore errors to gRPC statuses.
pub fn ds_status(e: DataStoreError) -> Status {
    match &e {
        DataStoreError::NotFound { .. } => Status::not_found(e.to_string()),
        DataStoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        DataStoreError::RevisionMismatch { .. } => Status::failed_precondition(e.to_string()),
        DataStoreError::BadPageToken { .. } | DataStoreError::InvalidEntry { .. } => {
            Status::invalid_argument(e.to_string())
        }
        DataStoreError::JoinTokenExists { .. } => Status::already_exists(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<MigrateError> for Status {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::AlreadyCurrent { .. } => Status::invalid_argument(e.to_string()),
            MigrateError::Rotation(_) => Status::internal(e.to_string()),
            MigrateError::DataStore(e) => ds_status(e),
            MigrateError::State(e) => Status::internal(chain(&e)),
        }
    }
}

/// An error and its sources, `outer: inner: ...`.
fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Converts selectors to their API messages.
pub fn selectors_to_pb(selectors: &[sigil_datastore::Selector]) -> Vec<pb::Selector> {
    selectors
        .iter()
        .map(|s| pb::Selector {
            r#type: s.kind.clone(),
            value: s.value.clone(),
        })
        .collect()
}

/// Converts a bundle to its API message.
pub fn bundle_to_pb(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        spiffe_bundle_json: b.to_json(),
        x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        sequence_number: b.sequence as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StateError;

    #[test]
    fn migration_errors_keep_their_status_codes_and_messages() {
        let td = sigil_spiffe::TrustDomain::parse("example.org").expect("td");
        let s = Status::from(MigrateError::AlreadyCurrent { to: td.clone() });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "to: example.org is already the server's trust domain"
        );

        let missing = DataStoreError::NotFound {
            kind: "entry",
            id: "x".into(),
        };
        let want = missing.to_string();
        let s = Status::from(MigrateError::DataStore(missing));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::NotFound, want.as_str())
        );

        // State failures are internal and carry their causes once each, outermost first.
        let s = Status::from(MigrateError::State(StateError::StoredBundle {
            trust_domain: td.clone(),
            source: sigil_spiffe::bundle::Bundle::from_json(td, b"not json")
                .expect_err("invalid bundle"),
        }));
        assert_eq!(s.code(), tonic::Code::Internal);
        let (outer, inner) = s.message().split_once(": ").expect("a cause");
        assert_eq!(outer, "stored bundle of example.org is invalid");
        assert!(
            !inner.is_empty() && !inner.contains(outer),
            "{}",
            s.message()
        );
    }
}
