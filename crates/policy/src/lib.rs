//! Network policy engine: Kubernetes NetworkPolicy and Cilium (clusterwide) network policies
//! parsed from YAML into one normalized rule model, evaluated directly or compiled into
//! per-endpoint policy maps keyed the way the datapath looks them up, and traced.
//!
//! - [`parse_documents`] / [`load_path`]: YAML → [`Document`]s (all or nothing).
//! - [`evaluate`]: the direct evaluator, the reference semantics.
//! - [`PolicyEngine`]: selector cache, per-endpoint policy maps, deltas, [`PolicyEngine::lookup`].
//! - [`trace()`]: one flow between two peers, both directions, with the deciding rules.
//!
//! Semantics, following Cilium's documentation, with these choices made explicit:
//! - A namespaced policy's subject is always limited to its namespace; its peer selectors are
//!   too unless they name a namespace, select namespace labels
//!   (`io.cilium.k8s.namespace.labels.*`) or reserved labels. In a clusterwide policy a peer
//!   selector without a namespace requires one to exist (`{}` = any pod). A document without
//!   `metadata.namespace` is in `default`; a clusterwide one's namespace is ignored.
//! - Default deny per direction once a selecting rule has an allow or deny section there,
//!   unless its `enableDefaultDeny` says `false` (an explicit `true` enables it even without
//!   a section); NetworkPolicy: the directions of `policyTypes` (default Ingress, plus Egress
//!   when egress rules exist). Deny beats allow across all policies.
//! - Cilium rule without L3 fields but with `toPorts`: every peer; with neither (`{}`):
//!   nothing; an explicitly empty L3 list: nobody. NetworkPolicy rule without `from`/`to`:
//!   every peer (including world); without `ports`: every protocol and port.
//! - Protocol `ANY` is TCP, UDP and SCTP; port 0 is every port of the protocol; a rule
//!   without `toPorts` covers every protocol (ICMP included).
//! - L7 rules mark their port (protocol, port, endPort) for the proxy: every peer allowed on
//!   that same port is redirected, as Cilium's per-port L4 filter does. Authentication
//!   (`authentication.mode: required`) belongs to the peers of its rule.
//! - Entities: `world` is `reserved:world` and every CIDR identity; `cluster` is every label
//!   identity (no reserved or CIDR label) plus host, remote-node, init, ingress, health,
//!   unmanaged and kube-apiserver; `all` is everything; `none` nothing.
//! - CIDR peers match only CIDR identities (their most specific `cidr:` prefix must lie in the
//!   CIDR and overlap no exception) and, for a `/0` without exceptions, `reserved:world`.
//! - `toFQDNs` is stored and selects nothing until a DNS proxy resolves names.
//! - Named ports are rejected (resolving them needs the pods' container specs); so are real
//!   fields sigil does not implement (`nodeSelector`, `toServices`, `icmps`, ...), with reasons.
//! - YAML is read as YAML 1.2 (`no`, `on`, `n` are strings); duplicate keys are errors.
//! - Enforcement `always`: every endpoint is default deny both ways; `never`: everything is
//!   allowed, deny rules included.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cidr;
pub mod engine;
pub mod error;
pub mod eval;
pub mod model;
pub mod parse;
pub mod trace;

pub use cidr::IpPrefix;
pub use engine::{
    EndpointDelta, InvalidKey, KeyChange, PolicyDeltas, PolicyEngine, PolicyEntry, PolicyKey,
    is_endpoint_identity,
};
pub use error::{DocumentError, PolicyError, Problem};
pub use eval::{Evaluation, RuleMatch, evaluate};
pub use model::*;
pub use parse::{parse_documents, parse_str};
pub use trace::{
    DirectionTrace, Peer, PeerReport, TraceResult, TraceVerdict, load_path, load_paths,
    parse_dport, trace, trace_with_mode,
};
