//! The in-memory catalog of registration entries: indexes for authorization and the change feed that
//! agents' entry streams follow.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use sigil_datastore::{Entry, Selector};
use sigil_spiffe::SpiffeId;
use tokio::sync::broadcast;

/// Why an agent was revoked: evicted agents may attest again, banned ones may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Its record was deleted.
    Evicted,
    /// It was banned.
    Banned,
}

/// How deep parent chains are followed (agent → node alias → workload → downstream ...).
const MAX_DEPTH: usize = 8;

/// A change that agents' streams may need to forward.
#[derive(Debug, Clone)]
pub enum Change {
    /// An entry was created or updated (old is the previous version, if any).
    Upserted {
        /// The previous version.
        old: Option<Arc<Entry>>,
        /// The new version.
        new: Arc<Entry>,
    },
    /// An entry was deleted.
    Removed(Arc<Entry>),
    /// An agent was evicted or banned: its streams end, with that reason.
    AgentRevoked(SpiffeId, Revocation),
    /// The trust bundle or a federated bundle changed.
    BundlesChanged,
    /// The whole catalog was replaced: streams recompute their sets.
    Resync,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<String, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, HashSet<String>>,
    by_spiffe_id: HashMap<SpiffeId, HashSet<String>>,
}

impl Index {
    fn insert(&mut self, e: Arc<Entry>) {
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_spiffe_id
            .entry(e.spiffe_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_id.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let e = self.by_id.remove(id)?;
        if let Some(s) = self.by_parent.get_mut(&e.parent_id) {
            s.remove(id);
            if s.is_empty() {
                self.by_parent.remove(&e.parent_id);
            }
        }
        if let Some(s) = self.by_spiffe_id.get_mut(&e.spiffe_id) {
            s.remove(id);
            if s.is_empty() {
                self.by_spiffe_id.remove(&e.spiffe_id);
            }
        }
        Some(e)
    }
}

/// The identity of a caller agent, as far as authorization needs it.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// The agent's SPIFFE ID.
    pub id: SpiffeId,
    /// Its node selectors (from attestation).
    pub selectors: Vec<Selector>,
}

/// Entries in memory, indexed, with a broadcast of changes.
pub struct Catalog {
    index: RwLock<Index>,
    server_id: RwLock<SpiffeId>,
    changes: broadcast::Sender<Change>,
}

fn is_subset(small: &[Selector], big: &[Selector]) -> bool {
    small.iter().all(|s| big.contains(s))
}

fn live(e: &Entry, now: i64) -> bool {
    e.expires_at == 0 || e.expires_at > now
}

impl Catalog {
    /// A catalog holding `entries`; `server_id` is the parent of node entries.
    pub fn new(entries: Vec<Entry>, server_id: SpiffeId) -> Self {
        let mut index = Index::default();
        for e in entries {
            index.insert(Arc::new(e));
        }
        let (changes, _) = broadcast::channel(16 * 1024);
        Catalog {
            index: RwLock::new(index),
            server_id: RwLock::new(server_id),
            changes,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The server's SPIFFE ID (parent of node entries).
    pub fn server_id(&self) -> SpiffeId {
        self.server_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the whole catalog (after a trust-domain migration).
    pub fn reset(&self, entries: Vec<Entry>, server_id: SpiffeId) {
        let mut index = Index::default();
        for e in entries {
            index.insert(Arc::new(e));
        }
        *self.write() = index;
        *self.server_id.write().unwrap_or_else(|p| p.into_inner()) = server_id;
        let _ = self.changes.send(Change::Resync);
    }

    /// Subscribes to changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Publishes a change that is not an entry change (agent revoked, bundles changed).
    pub fn publish(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    /// Records a created or updated entry and publishes the change.
    pub fn upsert(&self, e: Entry) {
        let new = Arc::new(e);
        let old = {
            let mut idx = self.write();
            let old = idx.remove(&new.id);
            idx.insert(new.clone());
            old
        };
        let _ = self.changes.send(Change::Upserted { old, new });
    }

    /// Records a deleted entry and publishes the change.
    pub fn remove(&self, id: &str) {
        let removed = self.write().remove(id);
        if let Some(e) = removed {
            let _ = self.changes.send(Change::Removed(e));
        }
    }

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.read().by_id.get(id).cloned()
    }

    /// Whether some entry has this SPIFFE ID.
    pub fn has_spiffe_id(&self, id: &SpiffeId) -> bool {
        self.read().by_spiffe_id.contains_key(id)
    }

    /// Whether a live entry with this SPIFFE ID is marked admin (its workloads may use the admin API
    /// over TLS).
    pub fn is_admin(&self, id: &SpiffeId, now: i64) -> bool {
        let idx = self.read();
        idx.by_spiffe_id.get(id).is_some_and(|ids| {
            ids.iter()
                .filter_map(|i| idx.by_id.get(i))
                .any(|e| e.admin && live(e, now))
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The IDs an agent acts as: its own and those of node entries its selectors satisfy.
    fn agent_ids(idx: &Index, server_id: &SpiffeId, agent: &AgentView, now: i64) -> Vec<SpiffeId> {
        let mut ids = vec![agent.id.clone()];
        if let Some(node_entries) = idx.by_parent.get(server_id) {
            for eid in node_entries {
                if let Some(e) = idx.by_id.get(eid)
                    && live(e, now)
                    && !e.selectors.is_empty()
                    && is_subset(&e.selectors, &agent.selectors)
                    && !ids.contains(&e.spiffe_id)
                {
                    ids.push(e.spiffe_id.clone());
                }
            }
        }
        ids
    }

    /// Every entry the agent is authorized for: descendants of its IDs, following parent chains.
    pub fn authorized(&self, agent: &AgentView, now: i64) -> Vec<Arc<Entry>> {
        let server_id = self.server_id();
        let idx = self.read();
        let mut frontier = Self::agent_ids(&idx, &server_id, agent, now);
        let mut seen_ids: HashSet<SpiffeId> = frontier.iter().cloned().collect();
        let mut out = Vec::new();
        let mut seen_entries = HashSet::new();
        for _ in 0..MAX_DEPTH {
            let mut next = Vec::new();
            for parent in &frontier {
                let Some(children) = idx.by_parent.get(parent) else {
                    continue;
                };
                for cid in children {
                    let Some(e) = idx.by_id.get(cid) else {
                        continue;
                    };
                    if !live(e, now) || !seen_entries.insert(cid.clone()) {
                        continue;
                    }
                    out.push(e.clone());
                    if seen_ids.insert(e.spiffe_id.clone()) {
                        next.push(e.spiffe_id.clone());
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        out
    }

    /// Whether the agent is authorized for this entry (same rule as [`Catalog::authorized`]).
    pub fn is_authorized(&self, agent: &AgentView, entry: &Entry, now: i64) -> bool {
        if !live(entry, now) {
            return false;
        }
        let server_id = self.server_id();
        let idx = self.read();
        let ids = Self::agent_ids(&idx, &server_id, agent, now);
        let mut parents = vec![entry.parent_id.clone()];
        let mut seen: HashSet<SpiffeId> = HashSet::new();
        for _ in 0..MAX_DEPTH {
            let mut next = Vec::new();
            for p in parents {
                if ids.contains(&p) {
                    return true;
                }
                if !seen.insert(p.clone()) {
                    continue;
                }
                if let Some(holders) = idx.by_spiffe_id.get(&p) {
                    for hid in holders {
                        if let Some(h) = idx.by_id.get(hid)
                            && live(h, now)
                        {
                            next.push(h.parent_id.clone());
                        }
                    }
                }
            }
            if next.is_empty() {
                return false;
            }
            parents = next;
        }
        false
    }

    /// Whether a change to this entry can change which *other* entries an agent may have
    /// (it is a node entry or the parent of other entries), so a stream must recompute its whole set.
    pub fn is_structural(&self, e: &Entry) -> bool {
        e.parent_id == self.server_id() || self.read().by_parent.contains_key(&e.spiffe_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("test id")
    }

    fn entry(eid: &str, spiffe: &str, parent: &str, sels: &[&str]) -> Entry {
        let selectors = sels
            .iter()
            .map(|s| Selector::parse(s).expect("selector"))
            .collect();
        Entry {
            id: eid.into(),
            ..Entry::new(id(spiffe), id(parent), selectors)
        }
    }

    const SERVER: &str = "spiffe://td/sigil/server";
    const AGENT: &str = "spiffe://td/sigil/agent/join_token/abc";

    #[test]
    fn agent_gets_direct_alias_and_nested_entries_only() {
        let cat = Catalog::new(
            vec![
                entry("direct", "spiffe://td/w1", AGENT, &["unix:uid:1"]),
                entry(
                    "node",
                    "spiffe://td/node/a",
                    SERVER,
                    &["x509pop:subject:cn:a"],
                ),
                entry(
                    "via-node",
                    "spiffe://td/w2",
                    "spiffe://td/node/a",
                    &["unix:uid:2"],
                ),
                entry(
                    "nested",
                    "spiffe://td/w3",
                    "spiffe://td/w2",
                    &["unix:uid:3"],
                ),
                entry(
                    "other",
                    "spiffe://td/w4",
                    "spiffe://td/sigil/agent/x",
                    &["unix:uid:4"],
                ),
                entry(
                    "other-node",
                    "spiffe://td/node/b",
                    SERVER,
                    &["x509pop:subject:cn:b"],
                ),
                entry(
                    "via-b",
                    "spiffe://td/w5",
                    "spiffe://td/node/b",
                    &["unix:uid:5"],
                ),
            ],
            id(SERVER),
        );
        let agent = AgentView {
            id: id(AGENT),
            selectors: vec![Selector::parse("x509pop:subject:cn:a").expect("sel")],
        };
        let mut got: Vec<String> = cat
            .authorized(&agent, 0)
            .iter()
            .map(|e| e.id.clone())
            .collect();
        got.sort();
        assert_eq!(got, vec!["direct", "nested", "via-node"]);
        for (eid, want) in [
            ("direct", true),
            ("via-node", true),
            ("nested", true),
            ("other", false),
            ("via-b", false),
            ("node", false),
        ] {
            let e = cat.get(eid).expect("entry");
            assert_eq!(cat.is_authorized(&agent, &e, 0), want, "{eid}");
        }
    }

    #[test]
    fn expired_entries_are_not_authorized() {
        let mut e = entry("direct", "spiffe://td/w1", AGENT, &["unix:uid:1"]);
        e.expires_at = 100;
        let cat = Catalog::new(vec![e], id(SERVER));
        let agent = AgentView {
            id: id(AGENT),
            selectors: vec![],
        };
        assert_eq!(cat.authorized(&agent, 50).len(), 1);
        assert_eq!(cat.authorized(&agent, 100).len(), 0);
    }

    #[test]
    fn upsert_and_remove_publish_changes() {
        let cat = Catalog::new(vec![], id(SERVER));
        let mut rx = cat.subscribe();
        cat.upsert(entry("a", "spiffe://td/w1", AGENT, &["unix:uid:1"]));
        cat.remove("a");
        assert!(matches!(
            rx.try_recv(),
            Ok(Change::Upserted { old: None, .. })
        ));
        assert!(matches!(rx.try_recv(), Ok(Change::Removed(_))));
        assert!(cat.is_empty());
    }
}
