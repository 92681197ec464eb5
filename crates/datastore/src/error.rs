//! The one error type of the datastore; every variant names the record or value at fault.

use std::path::PathBuf;

use sigil_spiffe::SpiffeId;

/// Why a datastore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    /// The database itself reported an error.
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    /// The database file could not be opened or configured.
    #[error("cannot open database {}: {cause}", path.display())]
    Open {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    /// No record of this kind has this ID.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// An entry equals an existing one (same SPIFFE ID, parent ID and selector set) or reuses its ID;
    /// `index` is its position in the batch (0 for single-entry operations).
    #[error(
        "entry #{index} ({spiffe_id}) conflicts with existing entry {existing_id:?}: same ID, or same SPIFFE ID, parent ID and selectors"
    )]
    AlreadyExists {
        index: usize,
        spiffe_id: SpiffeId,
        existing_id: String,
    },
    /// A join token with this value already exists (the value is a secret, so it is not displayed).
    #[error("join token already exists")]
    JoinTokenExists { token: String },
    /// An entry is not acceptable for storage.
    #[error("entry #{index} ({spiffe_id}): {reason}")]
    InvalidEntry {
        index: usize,
        spiffe_id: SpiffeId,
        reason: &'static str,
    },
    /// An update carried a revision that is no longer the stored one (someone else changed the entry).
    #[error("entry {id:?}: expected revision {expected}, stored revision is {actual}")]
    RevisionMismatch {
        id: String,
        expected: i64,
        actual: i64,
    },
    /// A stored value no longer parses (edited by hand, or written by an incompatible version).
    #[error("corrupt data in {what}: {value:?}")]
    Corrupt { what: String, value: String },
    /// A value could not be encoded for storage.
    #[error("cannot encode {what}: {cause}")]
    Encode {
        what: &'static str,
        cause: serde_json::Error,
    },
    /// The database was written by a newer sigil whose schema this build does not know.
    #[error(
        "database schema version {found} is newer than version {supported}, the newest this build supports"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A page token that this store did not hand out.
    #[error("bad page token {token:?}")]
    BadPageToken { token: String },
}

// Not `#[from]`: that would make the wrapped error `source()` too, and it is already in the message.
impl From<rusqlite::Error> for DataStoreError {
    fn from(e: rusqlite::Error) -> Self {
        DataStoreError::Sqlite(e)
    }
}
