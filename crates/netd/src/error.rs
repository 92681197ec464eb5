//! The crate's error type: every variant says what failed and carries the offending value.

use std::path::PathBuf;

/// Errors of the daemon's operations; the API maps them to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    /// A request field holds a value that cannot be used.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Something named does not exist.
    #[error("{what} {name:?} not found")]
    NotFound {
        /// What kind of thing (endpoint, policy).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// Something with this name exists already.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// What kind of thing.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A pod CIDR has no free address left.
    #[error("pod CIDR {cidr} has no free address")]
    AddressesExhausted {
        /// The CIDR.
        cidr: String,
    },
    /// The policy documents were refused (nothing was applied).
    #[error("policy: {0}")]
    Policy(#[from] sigil_policy::PolicyError),
    /// Identity allocation failed.
    #[error("identity: {0}")]
    Identity(#[from] sigil_identity::IdentityError),
    /// The datapath (maps, programs, namespaces) failed.
    /// The reconciler or the policy compiler stopped (netd is shutting down).
    #[error("netd is stopping: {what} is no longer running")]
    Stopped {
        /// Which part.
        what: &'static str,
    },
    #[error("datapath: {0}")]
    Datapath(#[from] sigil_datapath::DatapathError),
    /// Restoring identities from the state file gave other numbers than recorded.
    #[error("restoring identity {want} for labels {labels}: the allocator gave {got}")]
    Restore {
        /// The recorded identity.
        want: u32,
        /// The identity allocated instead.
        got: u32,
        /// The labels.
        labels: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file does not parse.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl NetdError {
    /// An [`NetdError::Invalid`].
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        Self::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An [`NetdError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<NetdError> for tonic::Status {
    fn from(e: NetdError) -> Self {
        let msg = e.to_string();
        match e {
            NetdError::Invalid { .. } | NetdError::Policy(_) => {
                tonic::Status::invalid_argument(msg)
            }
            NetdError::NotFound { .. } => tonic::Status::not_found(msg),
            NetdError::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            NetdError::AddressesExhausted { .. }
            | NetdError::Datapath(sigil_datapath::DatapathError::PolicyMapFull { .. }) => {
                tonic::Status::resource_exhausted(msg)
            }
            NetdError::Datapath(sigil_datapath::DatapathError::PolicyRolledBack { .. }) => {
                tonic::Status::aborted(msg)
            }
            NetdError::Stopped { .. } => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}
