//! The one error type of this crate.

use std::time::Duration;

/// Why a kvstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// etcd answered with an error, or could not be reached.
    #[error("etcd {op} at {endpoints}: {cause}")]
    Etcd {
        /// What was being done (`put`, `txn`, `lease grant`...).
        op: &'static str,
        /// The configured endpoints, comma-separated.
        endpoints: String,
        /// The client's error.
        cause: etcd_client::Error,
    },
    /// etcd did not answer in time (unreachable or overloaded).
    #[error("etcd {op} at {endpoints}: no answer after {after:?}")]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The configured endpoints, comma-separated.
        endpoints: String,
        /// The request timeout.
        after: Duration,
    },
    /// A configuration or argument value is invalid.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The field or argument (`cluster_name`, `labels`, `identity`...).
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Every number of the cluster's identity range is taken.
    #[error("no free cluster identity in {range} for labels {labels:?}")]
    Exhausted {
        /// The range, as text.
        range: String,
        /// The labels that could not get an identity.
        labels: String,
    },
    /// Release of an identity this node holds no reference to.
    #[error("identity {id} is not allocated on this node")]
    NotAllocated {
        /// The identity.
        id: u32,
    },
    /// Allocation kept losing races (another node changed the same keys every time).
    #[error("identity allocation for labels {labels:?} lost {attempts} races in a row")]
    Contended {
        /// The labels.
        labels: String,
        /// How many transactions were tried.
        attempts: u32,
    },
    /// No free pod CIDR in the cluster range.
    #[error("no free /{prefix_len} pod CIDR in cluster range {cluster_cidr}")]
    PodCidrExhausted {
        /// The cluster range.
        cluster_cidr: String,
        /// The size asked for.
        prefix_len: u8,
    },
    /// A claim (node name, pod CIDR) is held by another live node.
    #[error("{what} {value:?} is already held by node {holder:?}")]
    Conflict {
        /// What was claimed (`node name`, `pod CIDR`).
        what: &'static str,
        /// The value claimed.
        value: String,
        /// Who holds it.
        holder: String,
    },
    /// A value read from etcd is not what sigil writes there.
    #[error("corrupt etcd value at {key:?}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl KvError {
    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        reason: impl ToString,
    ) -> Self {
        KvError::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}
