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
    Policy(sigil_policy::PolicyError),
    /// Identity allocation failed.
    #[error("identity: {0}")]
    Identity(sigil_identity::IdentityError),
    /// The reconciler or the policy compiler stopped (netd is shutting down).
    #[error("netd is stopping: {what} is no longer running")]
    Stopped {
        /// Which part.
        what: &'static str,
    },
    /// The datapath (maps, programs, namespaces) failed.
    #[error("datapath: {0}")]
    Datapath(sigil_datapath::DatapathError),
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
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
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
            cause: source,
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

// Not `#[from]`: the messages already print the wrapped errors (see the errors convention).
impl From<sigil_policy::PolicyError> for NetdError {
    fn from(e: sigil_policy::PolicyError) -> Self {
        NetdError::Policy(e)
    }
}

impl From<sigil_identity::IdentityError> for NetdError {
    fn from(e: sigil_identity::IdentityError) -> Self {
        NetdError::Identity(e)
    }
}

impl From<sigil_datapath::DatapathError> for NetdError {
    fn from(e: sigil_datapath::DatapathError) -> Self {
        NetdError::Datapath(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binaries print errors as anyhow chains (`{:#}`): a cause must appear once, whether it is
    /// in a message or a `source()`, through typed wrappers (netd → datapath) and added context.
    #[test]
    fn an_anyhow_chain_prints_each_cause_once() {
        let io = || std::io::Error::other("disk on fire");
        let direct = anyhow::Error::new(NetdError::io("/var/lib/sigil/state.json", io()))
            .context("saving the state file");
        let wrapped = anyhow::Error::new(NetdError::from(sigil_datapath::DatapathError::Io {
            context: "creating the endpoint netns".into(),
            cause: io(),
        }))
        .context("adding endpoint 7");
        for e in [direct, wrapped] {
            let text = format!("{e:#}");
            assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
        }
        let text = format!(
            "{:#}",
            anyhow::Error::new(NetdError::io("/x", io())).context("saving")
        );
        assert_eq!(text, "saving: /x: disk on fire");
    }
}
