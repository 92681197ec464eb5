//! Cilium-style labels (`source:key=value`), label sets, the identity-relevant label filter and
//! label selectors: the vocabulary that identities and network policies are written in.
#![forbid(unsafe_code)]

pub mod error;
pub mod filter;
pub mod label;
pub mod selector;

pub use error::LabelError;
pub use filter::LabelFilter;
pub use label::{
    Label, Labels, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, POLICY_CLUSTER_KEY, POLICY_PREFIX,
    SERVICE_ACCOUNT_KEY, SPIFFE_ID_KEY, Source, cidr_label, spiffe_label,
};
pub use selector::{Operator, Requirement, Selector, SelectorKey};
