//! The gRPC layer's shared pieces for the admin and agent APIs: datastore errors mapped to statuses,
//! blocking datastore work run off the runtime, domain types converted to API messages.

use sigil_datastore::DataStoreError;
use sigil_proto::admin::v1 as pb;
use sigil_spiffe::bundle::Bundle;
use tonic::Status;

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

/// Converts a bundle to its API message.
pub fn bundle_to_pb(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        spiffe_bundle_json: b.to_json(),
        x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        sequence_number: b.sequence as i64,
    }
}
