//! Workload attestation for sigil-agent: who is at the other end of a Workload API Unix socket, and which
//! selectors describe it, without ever reporting the selectors of a process that merely reused its PID.
//!
//! The kernel identifies the peer at accept time ([`PeerIdentity`], holding a pidfd for exactly that process);
//! [`UnixAttestor`] turns it into `unix:*` selectors by reading `/proc` in a way tied to that same process;
//! [`EndpointAttestor`] adds the `k8s:*` selectors of the sigil-netd endpoint whose network namespace the
//! process is in; [`ChainAttestor`] combines them.

mod chain;
mod endpoint;
mod error;
mod peer;
mod proc;
mod stream;
mod unix;

pub use chain::ChainAttestor;
pub use endpoint::{
    DEFAULT_LOOKUP_TIMEOUT, EndpointAttestor, EndpointInfo, EndpointLookup, LookupError,
    NetdLookup, NetnsId,
};
pub use error::AttestError;
pub use peer::PeerIdentity;
pub use sigil_registry::Selector;
pub use stream::{AttestedUnixStream, PeerInfo, accept_stream};
pub use unix::{CacheStats, DEFAULT_MAX_HASH_BYTES, MIN_CACHEABLE_AGE, UnixAttestor};

/// Turns a connected peer into the selectors that describe it; the agent chains several (Unix, endpoints...).
pub trait WorkloadAttestor: Send + Sync {
    /// The selectors of `peer`, or why they could not be established (never another process's selectors).
    fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError>;
}
