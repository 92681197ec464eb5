//! The agent's caches: entries authorized for this node (from the server's stream), X.509-SVIDs minted for
//! them (keys made here, bounded LRU for entries no workload uses), JWT-SVIDs, and trust bundles.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sigil_proto::admin::v1 as apb;
use sigil_registry::{Entry, Selector};
use sigil_spiffe::bundle::BundleSet;
use sigil_spiffe::{SpiffeId, TrustDomain};
use tokio::sync::{Notify, watch};

/// An X.509-SVID held by the agent.
#[derive(Debug)]
pub struct CachedSvid {
    /// The entry it was minted for.
    pub entry_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 key, made on this node.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Start of validity.
    pub issued_at: SystemTime,
    /// Expiry.
    pub expires_at: SystemTime,
    /// Entry revision it was minted for.
    pub revision: i64,
}

impl CachedSvid {
    /// When to rotate: half-way through its life.
    pub fn renew_at(&self) -> SystemTime {
        sigil_spiffe::half_life(self.issued_at, self.expires_at)
    }
}

struct SvidSlot {
    svid: Arc<CachedSvid>,
    last_used: Instant,
}

/// A cached JWT-SVID.
#[derive(Debug, Clone)]
pub struct CachedJwt {
    /// The token.
    pub token: String,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// When it was fetched.
    pub issued_at: SystemTime,
    /// Expiry.
    pub expires_at: SystemTime,
}

/// Converts an entry from the server (already validated there) into the agent's model.
pub fn entry_from_pb(e: &apb::Entry) -> Option<Entry> {
    let spiffe_id = SpiffeId::parse(&e.spiffe_id).ok()?;
    let parent_id = SpiffeId::parse(&e.parent_id).ok()?;
    let mut selectors: Vec<Selector> = e
        .selectors
        .iter()
        .filter_map(|s| Selector::new(&s.r#type, &s.value).ok())
        .collect();
    selectors.sort();
    Some(Entry {
        id: e.id.clone(),
        spiffe_id,
        parent_id,
        selectors,
        x509_svid_ttl: e.x509_svid_ttl.unwrap_or(0).max(0) as u32,
        jwt_svid_ttl: e.jwt_svid_ttl.unwrap_or(0).max(0) as u32,
        dns_names: e.dns_names.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with: e
            .federates_with
            .iter()
            .filter_map(|t| TrustDomain::parse(t).ok())
            .collect(),
        hint: e.hint.clone(),
        expires_at: e.expires_at,
        revision: e.revision_number,
        created_at: e.created_at,
    })
}

/// Everything the agent's APIs read, and the signals between its tasks.
pub struct Cache {
    /// This trust domain.
    pub td: TrustDomain,
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    svids: Mutex<HashMap<String, SvidSlot>>,
    interest: Mutex<HashMap<String, usize>>,
    jwts: Mutex<HashMap<(String, Vec<String>), CachedJwt>>,
    /// Own and federated bundles.
    pub bundles: Arc<ArcSwap<BundleSet>>,
    /// Bumped on every change a stream may need to push.
    pub version: watch::Sender<u64>,
    /// Wakes the SVID minter.
    pub mint_wanted: Notify,
    /// Most SVIDs kept for entries nobody uses.
    pub max_unused: usize,
    /// Whether the entry snapshot from the server has been received at least once.
    pub synced: watch::Sender<bool>,
}

/// Holds interest in entries while a workload stream is open; dropping it releases them.
pub struct Interest {
    cache: Arc<Cache>,
    ids: Vec<String>,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut m = self
            .cache
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            if let Some(n) = m.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    m.remove(id);
                }
            }
        }
    }
}

fn is_subset(small: &[Selector], big: &[Selector]) -> bool {
    !small.is_empty() && small.iter().all(|s| big.contains(s))
}

impl Cache {
    /// An empty cache for `td`.
    pub fn new(td: TrustDomain, bundles: Arc<ArcSwap<BundleSet>>, max_unused: usize) -> Arc<Self> {
        Arc::new(Cache {
            td,
            entries: RwLock::new(HashMap::new()),
            svids: Mutex::new(HashMap::new()),
            interest: Mutex::new(HashMap::new()),
            jwts: Mutex::new(HashMap::new()),
            bundles,
            version: watch::channel(0).0,
            mint_wanted: Notify::new(),
            max_unused,
            synced: watch::channel(false).0,
        })
    }

    /// Signals streams that something changed.
    pub fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces all entries (a snapshot).
    pub fn replace_entries(&self, entries: Vec<Entry>) {
        let map = entries
            .into_iter()
            .map(|e| (e.id.clone(), Arc::new(e)))
            .collect();
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = map;
        self.drop_orphans();
        self.synced.send_replace(true);
        self.bump();
        self.mint_wanted.notify_one();
    }

    /// Applies a delta.
    pub fn apply(&self, upserts: Vec<Entry>, removed: &[String]) {
        {
            let mut m = self.entries.write().unwrap_or_else(|p| p.into_inner());
            for id in removed {
                m.remove(id);
            }
            for e in upserts {
                m.insert(e.id.clone(), Arc::new(e));
            }
        }
        self.drop_orphans();
        self.bump();
        self.mint_wanted.notify_one();
    }

    /// Drops SVIDs and JWTs of entries that no longer exist or changed identity.
    fn drop_orphans(&self) {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        self.svids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, s| {
                entries
                    .get(id)
                    .is_some_and(|e| e.spiffe_id == s.svid.spiffe_id)
            });
        self.jwts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _), j| entries.get(id).is_some_and(|e| e.spiffe_id == j.spiffe_id));
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Number of cached X.509-SVIDs.
    pub fn svid_count(&self) -> usize {
        self.svids.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Entries whose selectors are all among the workload's selectors; optionally without admin/downstream.
    pub fn matching(&self, selectors: &[Selector], include_privileged: bool) -> Vec<Arc<Entry>> {
        let now = crate::unix_now();
        let mut v: Vec<Arc<Entry>> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.expires_at == 0 || e.expires_at > now)
            .filter(|e| include_privileged || (!e.admin && !e.downstream))
            .filter(|e| is_subset(&e.selectors, selectors))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        v
    }

    /// Registers interest in entries (their SVIDs are kept and rotated while the guard lives).
    pub fn interest(self: &Arc<Self>, entries: &[Arc<Entry>]) -> Interest {
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        {
            let mut m = self.interest.lock().unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                *m.entry(id.clone()).or_insert(0) += 1;
            }
        }
        self.mint_wanted.notify_one();
        Interest {
            cache: self.clone(),
            ids,
        }
    }

    /// The SVIDs of these entries, if every one is cached; marks them used.
    pub fn svids_for(&self, entries: &[Arc<Entry>]) -> Option<Vec<Arc<CachedSvid>>> {
        let mut m = self.svids.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let slot = m.get_mut(&e.id)?;
            slot.last_used = now;
            out.push(slot.svid.clone());
        }
        Some(out)
    }

    /// Entries that need an SVID minted now: wanted ones lacking one or due for rotation, then, while
    /// the unused bound allows, the rest (pre-warming).
    pub fn mint_plan(&self, now: SystemTime) -> Vec<Arc<Entry>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        let svids = self.svids.lock().unwrap_or_else(|p| p.into_inner());
        let mut plan = Vec::new();
        let mut unused_cached = svids
            .keys()
            .filter(|id| !interest.contains_key(*id))
            .count();
        let due = |id: &str, e: &Entry| match svids.get(id) {
            None => true,
            Some(s) => now >= s.svid.renew_at() || s.svid.revision != e.revision,
        };
        // Entries workloads are waiting on come first, so a rotation storm never delays them.
        let mut later = Vec::new();
        for (id, e) in entries.iter() {
            if interest.contains_key(id) {
                if due(id, e) {
                    plan.push(e.clone());
                }
            } else if svids.contains_key(id) {
                if due(id, e) {
                    later.push(e.clone());
                }
            } else if unused_cached < self.max_unused {
                unused_cached += 1;
                later.push(e.clone());
            }
        }
        plan.extend(later);
        plan
    }

    /// The earliest time a cached SVID is due for rotation.
    pub fn next_rotation(&self) -> Option<SystemTime> {
        self.svids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.svid.renew_at())
            .min()
    }

    /// Stores freshly minted SVIDs and trims unused ones beyond the bound (least recently used first).
    pub fn store_svids(&self, minted: Vec<CachedSvid>) {
        if minted.is_empty() {
            return;
        }
        let interest: HashSet<String> = self
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut m = self.svids.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for s in minted {
            let last_used = m.get(&s.entry_id).map(|x| x.last_used).unwrap_or(now);
            m.insert(
                s.entry_id.clone(),
                SvidSlot {
                    svid: Arc::new(s),
                    last_used,
                },
            );
        }
        let mut unused: Vec<(Instant, String)> = m
            .iter()
            .filter(|(id, _)| !interest.contains(*id))
            .map(|(id, s)| (s.last_used, id.clone()))
            .collect();
        if unused.len() > self.max_unused {
            unused.sort();
            let excess = unused.len() - self.max_unused;
            for (_, id) in unused.into_iter().take(excess) {
                m.remove(&id);
            }
        }
        drop(m);
        self.bump();
    }

    /// A cached JWT-SVID still in the first half of its life.
    pub fn jwt(&self, entry_id: &str, audience: &[String], now: SystemTime) -> Option<CachedJwt> {
        let m = self.jwts.lock().unwrap_or_else(|p| p.into_inner());
        let j = m.get(&(entry_id.to_string(), audience.to_vec()))?;
        (now < sigil_spiffe::half_life(j.issued_at, j.expires_at)).then(|| j.clone())
    }

    /// Caches a JWT-SVID.
    pub fn store_jwt(&self, entry_id: &str, audience: &[String], jwt: CachedJwt) {
        self.jwts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((entry_id.to_string(), audience.to_vec()), jwt);
    }

    /// Replaces the bundle set (own + federated).
    pub fn set_bundles(&self, set: BundleSet) {
        self.bundles.store(Arc::new(set));
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(id: &str, uid: u32) -> Entry {
        Entry {
            id: id.into(),
            ..Entry::new(
                SpiffeId::parse(&format!("spiffe://td/{id}")).expect("id"),
                SpiffeId::parse("spiffe://td/sigil/agent/x").expect("id"),
                vec![Selector::new("unix", format!("uid:{uid}")).expect("sel")],
            )
        }
    }

    fn svid(e: &Entry, life: Duration) -> CachedSvid {
        let now = SystemTime::now();
        CachedSvid {
            entry_id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            chain: vec![],
            key: PrivatePkcs8KeyDer::from(vec![0u8; 4]),
            issued_at: now,
            expires_at: now + life,
            revision: e.revision,
        }
    }

    fn cache(max: usize) -> Arc<Cache> {
        Cache::new(
            TrustDomain::parse("td").expect("td"),
            Arc::new(ArcSwap::from_pointee(BundleSet::new())),
            max,
        )
    }

    #[test]
    fn unused_svids_are_bounded_and_wanted_ones_kept() {
        let c = cache(2);
        let entries: Vec<Entry> = (0..5).map(|i| entry(&format!("e{i}"), i)).collect();
        c.replace_entries(entries.clone());
        // Pre-warm stops at the bound.
        assert_eq!(c.mint_plan(SystemTime::now()).len(), 2);
        // A workload wants e4: it is planned even though the bound is reached.
        let wanted = c.matching(&[Selector::new("unix", "uid:4").expect("sel")], true);
        assert_eq!(wanted.len(), 1);
        let _guard = c.interest(&wanted);
        c.store_svids(
            entries
                .iter()
                .map(|e| svid(e, Duration::from_secs(3600)))
                .collect(),
        );
        // Five stored, one wanted: the unused ones are trimmed to the bound, the wanted one stays.
        assert_eq!(c.svid_count(), 3);
        assert!(c.svids_for(&wanted).is_some());
    }

    #[test]
    fn rotation_is_planned_at_half_life_and_removed_entries_drop_svids() {
        let c = cache(10);
        let e = entry("a", 1);
        c.replace_entries(vec![e.clone()]);
        c.store_svids(vec![svid(&e, Duration::from_secs(100))]);
        assert!(c.mint_plan(SystemTime::now()).is_empty());
        assert_eq!(
            c.mint_plan(SystemTime::now() + Duration::from_secs(51))
                .len(),
            1,
            "due at half life"
        );
        c.apply(vec![], &["a".to_string()]);
        assert_eq!(c.svid_count(), 0, "SVID dropped with its entry");
        assert!(
            c.matching(&[Selector::new("unix", "uid:1").expect("sel")], true)
                .is_empty()
        );
    }

    #[test]
    fn privileged_entries_are_filtered_for_delegates() {
        let c = cache(10);
        let mut admin = entry("adm", 1);
        admin.admin = true;
        let mut down = entry("down", 1);
        down.downstream = true;
        c.replace_entries(vec![entry("plain", 1), admin, down]);
        let sels = [Selector::new("unix", "uid:1").expect("sel")];
        assert_eq!(c.matching(&sels, true).len(), 3);
        let unprivileged: Vec<String> = c
            .matching(&sels, false)
            .iter()
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(unprivileged, vec!["plain"]);
    }
}
