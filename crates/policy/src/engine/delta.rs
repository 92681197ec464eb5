//! What an engine operation changed: per-endpoint key changes, computed by merging two
//! ordered entry lists.

use std::sync::Arc;

use serde::Serialize;
use sigil_identity::NumericIdentity;

use super::key::{self, PolicyEntry, PolicyKey, Prefix};
use crate::model::Direction;

/// One changed key of one endpoint's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeyChange {
    /// The key.
    pub key: PolicyKey,
    /// The value before; `None` when the key is new.
    pub old: Option<PolicyEntry>,
    /// The value after; `None` when the key is removed.
    pub new: Option<PolicyEntry>,
}

/// The changes to one endpoint's map (shared between endpoints with the same change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDelta {
    /// The endpoint (its identity).
    pub endpoint: NumericIdentity,
    /// The changed keys, ordered by key.
    pub changes: Arc<[KeyChange]>,
}

/// Everything one engine operation changed, per endpoint. An endpoint may appear more than
/// once (for example when an identity is re-added with new labels); apply in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDeltas {
    /// Per-endpoint changes.
    pub endpoints: Vec<EndpointDelta>,
}

impl PolicyDeltas {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.endpoints.iter().all(|e| e.changes.is_empty())
    }

    /// Total number of key changes over all endpoints.
    pub fn total_changes(&self) -> usize {
        self.endpoints.iter().map(|e| e.changes.len()).sum()
    }

    /// The changes reported for one endpoint, in order.
    pub fn for_endpoint(&self, endpoint: NumericIdentity) -> Vec<KeyChange> {
        self.endpoints
            .iter()
            .filter(|e| e.endpoint == endpoint)
            .flat_map(|e| e.changes.iter().copied())
            .collect()
    }

    pub(crate) fn push(&mut self, endpoint: u32, changes: &Arc<[KeyChange]>) {
        if !changes.is_empty() {
            self.endpoints.push(EndpointDelta {
                endpoint: NumericIdentity::new(endpoint),
                changes: Arc::clone(changes),
            });
        }
    }

    pub(crate) fn extend(&mut self, other: PolicyDeltas) {
        self.endpoints.extend(other.endpoints);
    }
}

/// Changes between two ordered entry lists of one direction.
pub(crate) fn diff_into(
    d: Direction,
    old: impl Iterator<Item = (u32, Prefix, PolicyEntry)>,
    new: impl Iterator<Item = (u32, Prefix, PolicyEntry)>,
    out: &mut Vec<KeyChange>,
) {
    let mut old = old.peekable();
    let mut new = new.peekable();
    let key = |id, p| PolicyKey::from_parts(id, d, p);
    loop {
        match (old.peek().copied(), new.peek().copied()) {
            (None, None) => break,
            (Some((i, p, v)), None) => {
                out.push(KeyChange {
                    key: key(i, p),
                    old: Some(v),
                    new: None,
                });
                old.next();
            }
            (None, Some((i, p, v))) => {
                out.push(KeyChange {
                    key: key(i, p),
                    old: None,
                    new: Some(v),
                });
                new.next();
            }
            (Some((oi, op, ov)), Some((ni, np, nv))) => {
                let ok = key::pack(oi, op);
                let nk = key::pack(ni, np);
                if ok < nk {
                    out.push(KeyChange {
                        key: key(oi, op),
                        old: Some(ov),
                        new: None,
                    });
                    old.next();
                } else if nk < ok {
                    out.push(KeyChange {
                        key: key(ni, np),
                        old: None,
                        new: Some(nv),
                    });
                    new.next();
                } else {
                    if ov != nv {
                        out.push(KeyChange {
                            key: key(oi, op),
                            old: Some(ov),
                            new: Some(nv),
                        });
                    }
                    old.next();
                    new.next();
                }
            }
        }
    }
}
