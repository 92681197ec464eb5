//! The records the datastore keeps and the filters used to find them.

use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::Selector;

/// A registration entry: which SPIFFE ID a workload (or downstream node) matching `selectors`, attested
/// under `parent_id`, is issued.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Entry ID (a UUID assigned on creation when empty).
    pub id: String,
    /// The SPIFFE ID issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) that may obtain this identity.
    pub parent_id: SpiffeId,
    /// The selectors a workload must present; the store keeps them sorted and deduplicated.
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime in seconds; 0 means the server default.
    pub x509_svid_ttl: u32,
    /// JWT-SVID lifetime in seconds; 0 means the server default.
    pub jwt_svid_ttl: u32,
    /// DNS SANs added to the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Whether the workload may call the server's admin APIs.
    pub admin: bool,
    /// Whether the workload is a downstream server that may mint SVIDs.
    pub downstream: bool,
    /// Trust domains whose bundles are delivered along with this entry's SVIDs.
    pub federates_with: Vec<TrustDomain>,
    /// Free-form hint telling workloads with several identities which one to use.
    pub hint: String,
    /// When the entry stops being valid (unix seconds); 0 means never.
    pub expires_at: i64,
    /// Incremented on every change; set by the store.
    pub revision: i64,
    /// Creation time (unix seconds); set by the store.
    pub created_at: i64,
}

impl Entry {
    /// An entry with no ID yet, default TTLs, no flags and no expiry.
    pub fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: Vec<Selector>) -> Self {
        Entry {
            id: String::new(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: Vec::new(),
            admin: false,
            downstream: false,
            federates_with: Vec::new(),
            hint: String::new(),
            expires_at: 0,
            revision: 0,
            created_at: 0,
        }
    }
}

/// How a filter's selector set is compared with an entry's (SPIRE's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SelectorMatch {
    /// The entry's selectors are exactly the filter's.
    Exact,
    /// The entry's selectors are all among the filter's (what a workload presenting the filter's selectors
    /// is entitled to).
    Subset,
    /// The entry has every one of the filter's selectors, and maybe more.
    Superset,
    /// The entry shares at least one selector with the filter.
    Any,
}

/// Which entries to list or count; `None` fields do not filter, set fields must all match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries issuing this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries whose selectors compare with these as the mode says.
    pub selectors: Option<(Vec<Selector>, SelectorMatch)>,
    /// Only entries with exactly this hint.
    pub hint: Option<String>,
}

/// A node that attested to the server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttestedAgent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The node attestor it used, e.g. `join_token`.
    pub attestation_type: String,
    /// Hex serial number of its current X.509-SVID.
    pub serial: String,
    /// Expiry of its current X.509-SVID (unix seconds).
    pub expires_at: i64,
    /// A banned agent may not renew or re-attest.
    pub banned: bool,
    /// Node selectors from attestation; the store keeps them sorted and deduplicated.
    pub selectors: Vec<Selector>,
    /// Whether the agent may attest again with the same identity.
    pub can_reattest: bool,
    /// Serial of an X.509-SVID issued by a renewal that the agent has not presented yet. Until it does,
    /// both this and `serial` authenticate the agent, so an agent that dies between the server's commit
    /// and its own write of the new SVID is not locked out (SPIRE keeps the same pair).
    #[serde(default)]
    pub pending_serial: Option<String>,
}

/// Which agents to list; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Only agents attested with this attestor.
    pub attestation_type: Option<String>,
    /// Only banned (`true`) or only unbanned (`false`) agents.
    pub banned: Option<bool>,
}

/// A single-use secret an agent presents to attest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinToken {
    /// The token value.
    pub token: String,
    /// Expiry (unix seconds); the token is unusable from this second on.
    pub expires_at: i64,
}

/// The result of trying to use a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// The token was valid and is now used up.
    Consumed(JoinToken),
    /// No such token (never created, or pruned).
    Unknown,
    /// The token was used before.
    AlreadyUsed,
    /// The token expired before use; it stays unused.
    Expired,
}

/// A trust bundle as stored: the SPIFFE bundle document of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredBundle {
    /// Whose bundle this is.
    pub trust_domain: TrustDomain,
    /// The SPIFFE bundle document (JWKS JSON).
    pub json: String,
    /// The bundle's sequence number.
    pub sequence: u64,
}
