//! Numeric security identities in Cilium's ranges and the allocator that maps each
//! identity-relevant label set to one of them.
//!
//! Ranges (Cilium's defaults): 0 is unknown / any, 1..=255 are reserved (1 host, 2 world,
//! 3 unmanaged, 4 health, 5 init, 6 remote-node, 7 kube-apiserver, 8 ingress), cluster
//! identities are 256..=65535 in the low 16 bits with an 8-bit cluster ID above them (24 bits on
//! the wire), and node-local CIDR identities have bit 24 set. A single cluster therefore holds at
//! most 65 280 label identities, as in Cilium; CIDR identities come from a separate pool of
//! 2^24 - 1 numbers, so a node can hold well over 100 000 identities in total.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod error;
pub mod numeric;

pub use allocator::{Allocator, Clock, LocalAllocator};
pub use error::IdentityError;
pub use numeric::{
    NumericIdentity, reserved_by_name, reserved_identities, reserved_identity_of, reserved_labels,
};
