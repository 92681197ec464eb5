//! The one error type of this crate.

use crate::numeric::NumericIdentity;

/// Why an identity operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Every number of the pool is in use or still in its grace period.
    #[error("no free {scope} identity in {range} for labels {labels:?}")]
    Exhausted {
        /// "cluster-local" or "node-local CIDR".
        scope: &'static str,
        /// The pool's range, as text.
        range: String,
        /// The labels that could not get an identity.
        labels: String,
    },
    /// An empty label set has no identity.
    #[error("cannot allocate an identity for an empty label set")]
    EmptyLabels,
    /// Release of an identity that is not allocated.
    #[error("identity {id} is not allocated")]
    NotAllocated {
        /// The identity released.
        id: NumericIdentity,
    },
    /// The allocator's backend (the cluster's kvstore) could not be asked.
    #[error("identity backend unavailable for labels {labels:?}: {reason}")]
    Unavailable {
        /// The labels asked for.
        labels: String,
        /// Why (the backend's error).
        reason: String,
    },
    /// A range given to the allocator lies outside the allowed bounds.
    #[error("invalid {scope} identity range {first}..={last} (must lie within {min}..={max})")]
    InvalidRange {
        /// Which pool.
        scope: &'static str,
        /// First number asked for.
        first: u32,
        /// Last number asked for.
        last: u32,
        /// Lowest allowed number.
        min: u32,
        /// Highest allowed number.
        max: u32,
    },
}
