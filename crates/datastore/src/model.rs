//! The records the datastore keeps and the filters used to find them.

use sigil_spiffe::{SpiffeId, TrustDomain};

use sigil_registry::Selector;

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
