//! `Entry`: a registration entry, the rule that gives workloads (or downstream nodes) matching its
//! selectors a SPIFFE ID.

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
