//! The numeric identity type, its ranges and the reserved identities.

use std::fmt;

use serde::{Deserialize, Serialize};
use sigil_labels::{Label, Labels, Source};

/// A security identity as carried in packets: reserved, cluster-scoped or node-local CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NumericIdentity(u32);

impl NumericIdentity {
    /// Unknown identity; in policy maps it stands for "any identity".
    pub const UNKNOWN: NumericIdentity = NumericIdentity(0);
    /// The local host.
    pub const HOST: NumericIdentity = NumericIdentity(1);
    /// Anything outside the cluster.
    pub const WORLD: NumericIdentity = NumericIdentity(2);
    /// Endpoints not managed by the network plane.
    pub const UNMANAGED: NumericIdentity = NumericIdentity(3);
    /// Health-check endpoints.
    pub const HEALTH: NumericIdentity = NumericIdentity(4);
    /// Endpoints whose labels are not known yet.
    pub const INIT: NumericIdentity = NumericIdentity(5);
    /// Other nodes of the cluster.
    pub const REMOTE_NODE: NumericIdentity = NumericIdentity(6);
    /// The Kubernetes API server.
    pub const KUBE_APISERVER: NumericIdentity = NumericIdentity(7);
    /// The ingress proxy.
    pub const INGRESS: NumericIdentity = NumericIdentity(8);

    /// First cluster-local number (below it: unknown and reserved).
    pub const MIN_CLUSTER_LOCAL: u32 = 256;
    /// Last cluster-local number (16 bits).
    pub const MAX_CLUSTER_LOCAL: u32 = 65535;
    /// Shift of the cluster ID above the cluster-local number.
    pub const CLUSTER_ID_SHIFT: u32 = 16;
    /// Bit marking node-local (CIDR) identities.
    pub const LOCAL_CIDR_FLAG: u32 = 1 << 24;

    /// Wraps a raw number (no range check: any u32 can arrive from the wire).
    pub const fn new(v: u32) -> Self {
        NumericIdentity(v)
    }

    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this is one of the reserved identities 1..=255.
    pub const fn is_reserved(self) -> bool {
        self.0 > 0 && self.0 < Self::MIN_CLUSTER_LOCAL
    }

    /// Whether this is a node-local CIDR identity (bit 24 set).
    pub const fn is_cidr(self) -> bool {
        self.0 & Self::LOCAL_CIDR_FLAG != 0
    }

    /// The cluster ID of a cluster identity; 0 for reserved and node-local identities.
    pub const fn cluster_id(self) -> u8 {
        if self.is_cidr() {
            return 0;
        }
        // Truncation keeps exactly the 8 cluster-ID bits.
        ((self.0 >> Self::CLUSTER_ID_SHIFT) & 0xff) as u8
    }

    /// The name of a reserved identity (`host`, `world`, ...).
    pub fn reserved_name(self) -> Option<&'static str> {
        RESERVED.iter().find(|(_, id)| *id == self).map(|(n, _)| *n)
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<NumericIdentity> for u32 {
    fn from(id: NumericIdentity) -> u32 {
        id.0
    }
}

/// Reserved entities by name, as in `reserved:<name>`.
const RESERVED: [(&str, NumericIdentity); 8] = [
    ("host", NumericIdentity::HOST),
    ("world", NumericIdentity::WORLD),
    ("unmanaged", NumericIdentity::UNMANAGED),
    ("health", NumericIdentity::HEALTH),
    ("init", NumericIdentity::INIT),
    ("remote-node", NumericIdentity::REMOTE_NODE),
    ("kube-apiserver", NumericIdentity::KUBE_APISERVER),
    ("ingress", NumericIdentity::INGRESS),
];

/// The reserved identity named `name` (`host`, `world`, `remote-node`, ...).
pub fn reserved_by_name(name: &str) -> Option<NumericIdentity> {
    RESERVED.iter().find(|(n, _)| *n == name).map(|(_, id)| *id)
}

/// The labels of a reserved identity: the single label `reserved:<name>`.
pub fn reserved_labels(id: NumericIdentity) -> Option<Labels> {
    id.reserved_name()
        .map(|name| std::iter::once(Label::new(Source::Reserved, name, "")).collect())
}

/// Every reserved identity with its labels, in numeric order.
pub fn reserved_identities() -> Vec<(NumericIdentity, Labels)> {
    RESERVED
        .iter()
        .map(|(name, id)| {
            let labels = std::iter::once(Label::new(Source::Reserved, *name, "")).collect();
            (*id, labels)
        })
        .collect()
}

/// The reserved identity a label set stands for: any set holding `reserved:host` is the host
/// (the host also carries node labels), otherwise only a set that is exactly one
/// `reserved:<name>` label.
pub fn reserved_identity_of(labels: &Labels) -> Option<NumericIdentity> {
    if labels.contains(&Label::new(Source::Reserved, "host", "")) {
        return Some(NumericIdentity::HOST);
    }
    let mut iter = labels.iter();
    match (iter.next(), iter.next()) {
        (Some(l), None) if l.source == Source::Reserved && l.value.is_empty() => {
            reserved_by_name(&l.key)
        }
        _ => None,
    }
}
