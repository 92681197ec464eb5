//! Cluster-wide identity allocation (Cilium's kvstore allocator model, our own layout): the
//! number's key `identities/id/<n>` → labels and the label set's key `identities/labels/<enc>` →
//! n are created together in one transaction that requires both absent, so a number never gets
//! two label sets nor a label set two numbers; each node using the identity holds a reference
//! `identities/value/<enc>/<node>` → n under its lease. A GC pass deletes a number nobody has
//! referenced for a grace period, in a transaction that checks there are still no references.
//! Lookups are answered from a cache fed by a watch of the id keys.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use rand::Rng as _;
use sigil_identity::{NumericIdentity, reserved_identity_of, reserved_labels};
use sigil_labels::{Label, Labels, Source};
use tokio::sync::{mpsc, watch};

use crate::error::KvError;
use crate::keys::{encode_labels, prefix_end};
use crate::store::{KvStore, Owned};
use crate::watch::{RawEvent, Watch};

/// Longest canonical label text accepted (keys stay far below etcd's request limit).
const MAX_LABELS_LEN: usize = 4096;
/// Transactions tried before an allocation gives up as contended.
const MAX_ATTEMPTS: u32 = 64;

/// A change of the cluster's identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityEvent {
    /// An identity exists with these labels.
    Upsert(NumericIdentity, Labels),
    /// An identity was garbage-collected.
    Delete(NumericIdentity),
    /// Everything before this was the full set (sent after the first list and each resync).
    Synced,
}

/// What one GC pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced identities newly marked.
    pub marked: usize,
    /// Identities deleted (marked for longer than the grace period and still unreferenced).
    pub deleted: usize,
}

#[derive(Default)]
struct CacheState {
    by_id: HashMap<u32, Labels>,
    by_labels: HashMap<String, u32>,
    subscribers: Vec<mpsc::UnboundedSender<IdentityEvent>>,
}

impl CacheState {
    fn publish(&mut self, ev: &IdentityEvent) {
        self.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }

    fn upsert(&mut self, id: u32, labels: Labels) {
        if self.by_id.get(&id) == Some(&labels) {
            return;
        }
        if let Some(old) = self.by_id.insert(id, labels.clone()) {
            self.by_labels.remove(&old.sorted_string());
        }
        self.by_labels.insert(labels.sorted_string(), id);
        self.publish(&IdentityEvent::Upsert(NumericIdentity::new(id), labels));
    }

    fn delete(&mut self, id: u32) {
        if let Some(old) = self.by_id.remove(&id) {
            self.by_labels.remove(&old.sorted_string());
            self.publish(&IdentityEvent::Delete(NumericIdentity::new(id)));
        }
    }
}

struct LocalRef {
    id: u32,
    refs: u64,
    labels: String,
    enc: String,
}

/// The cluster-wide allocator of one node.
///
/// Its API is async, unlike `sigil_identity::Allocator`: allocating and releasing are etcd
/// round trips that may wait for a reconnect, which a sync trait would have to block a runtime
/// thread for. Lookups ([`ClusterAllocator::lookup`] etc.) are sync and local.
pub struct ClusterAllocator {
    store: KvStore,
    base: u32,
    first: u32,
    last: u32,
    cache: Arc<RwLock<CacheState>>,
    synced: watch::Receiver<bool>,
    /// This node's references, by canonical label text. A tokio mutex: held across the etcd
    /// round trips so that this node's allocations of one label set are counted exactly.
    local: tokio::sync::Mutex<HashMap<String, LocalRef>>,
    /// Unreferenced identities seen by GC: when first seen, and the id key's mod revision then.
    marks: Mutex<HashMap<u32, (Instant, i64)>>,
    _watch: Watch<()>,
}

impl std::fmt::Debug for ClusterAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAllocator")
            .field("base", &self.base)
            .field("first", &self.first)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl ClusterAllocator {
    /// An allocator over the cluster ID's whole range (256..=65535 above the cluster ID).
    pub fn new(store: &KvStore) -> Self {
        Self::build(
            store,
            NumericIdentity::MIN_CLUSTER_LOCAL,
            NumericIdentity::MAX_CLUSTER_LOCAL,
        )
    }

    /// An allocator over `first..=last` of the cluster-local numbers (within 256..=65535), e.g.
    /// to test exhaustion. Every node of a cluster must use the same range.
    pub fn with_range(store: &KvStore, first: u32, last: u32) -> Result<Self, KvError> {
        let (min, max) = (
            NumericIdentity::MIN_CLUSTER_LOCAL,
            NumericIdentity::MAX_CLUSTER_LOCAL,
        );
        if first < min || last > max || first > last {
            return Err(KvError::invalid(
                "identity_range",
                format!("{first}..={last}"),
                format!("must lie within {min}..={max}"),
            ));
        }
        Ok(Self::build(store, first, last))
    }

    fn build(store: &KvStore, first: u32, last: u32) -> Self {
        let base = u32::from(store.config().cluster_id) << NumericIdentity::CLUSTER_ID_SHIFT;
        let cache = Arc::new(RwLock::new(CacheState::default()));
        let (synced_tx, synced) = watch::channel(false);
        let prefix = store.inner.keys.id_prefix();
        let c = Arc::clone(&cache);
        let p = prefix.clone();
        let range = (base | first, base | last);
        let watch = crate::watch::spawn(Arc::downgrade(&store.inner), prefix, move |ev| {
            let mut st = c.write().unwrap_or_else(PoisonError::into_inner);
            match ev {
                RawEvent::Put { key, value } => match parse_id_entry(&p, &key, &value, range) {
                    Ok((id, labels)) => st.upsert(id, labels),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring identity entry");
                        if let Some(id) = key.strip_prefix(&p).and_then(|n| n.parse().ok()) {
                            st.delete(id);
                        }
                    }
                },
                RawEvent::Delete { key, .. } => {
                    if let Some(id) = key.strip_prefix(&p).and_then(|n| n.parse().ok()) {
                        st.delete(id);
                    }
                }
                RawEvent::Synced => {
                    st.publish(&IdentityEvent::Synced);
                    synced_tx.send_replace(true);
                }
            }
            None
        });
        ClusterAllocator {
            store: store.clone(),
            base,
            first,
            last,
            cache,
            synced,
            local: tokio::sync::Mutex::new(HashMap::new()),
            marks: Mutex::new(HashMap::new()),
            _watch: watch,
        }
    }

    /// Waits until the cache has seen the whole identity set once.
    pub async fn wait_synced(&self) {
        let mut s = self.synced.clone();
        let _ = s.wait_for(|v| *v).await;
    }

    fn range_text(&self) -> String {
        format!("{}..={}", self.base | self.first, self.base | self.last)
    }

    /// Checks that `id` is one of this cluster's allocatable numbers.
    fn check_id(&self, id: NumericIdentity) -> Result<(), KvError> {
        let v = id.get();
        if v & !0xffff != self.base || (v & 0xffff) < self.first || (v & 0xffff) > self.last {
            return Err(KvError::invalid(
                "identity",
                v,
                format!("not in this cluster's range {}", self.range_text()),
            ));
        }
        Ok(())
    }

    /// The identity of `labels`, allocating it cluster-wide if needed, and whether this node's
    /// reference count went from 0 to 1.
    pub async fn allocate(&self, labels: &Labels) -> Result<(NumericIdentity, bool), KvError> {
        let sorted = validate_labels(labels)?;
        let mut local = self.local.lock().await;
        if let Some(r) = local.get_mut(&sorted) {
            if !self.taken_by_other(r.id, &sorted) {
                r.refs += 1;
                return Ok((NumericIdentity::new(r.id), false));
            }
            // While this node's lease was lost, the number was collected and given to another
            // label set: this node's old references are void; allocate afresh.
            tracing::error!(
                identity = r.id,
                labels = %sorted,
                "identity now belongs to other labels; allocating these labels again"
            );
            local.remove(&sorted);
        }
        let enc = encode_labels(&sorted);
        let id = self.acquire(&sorted, &enc).await?;
        local.insert(
            sorted.clone(),
            LocalRef {
                id,
                refs: 1,
                labels: sorted,
                enc,
            },
        );
        Ok((NumericIdentity::new(id), true))
    }

    /// Whether the cache says number `id` now stands for labels other than `sorted`.
    fn taken_by_other(&self, id: u32, sorted: &str) -> bool {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        cache
            .by_id
            .get(&id)
            .is_some_and(|l| l.sorted_string() != sorted)
    }

    /// Finds or creates the number of `sorted` and writes this node's reference to it.
    async fn acquire(&self, sorted: &str, enc: &str) -> Result<u32, KvError> {
        let inner = &self.store.inner;
        let keys = &inner.keys;
        let node = &inner.cfg.node_name;
        let labels_key = keys.labels(enc);
        let ref_key = keys.reference(enc, node);
        let mut c = inner.client.clone();
        let mut tried = HashSet::new();
        for _ in 0..MAX_ATTEMPTS {
            let lease = inner.lease_id();
            let put_ref = |n: u32| {
                TxnOp::put(
                    ref_key.clone(),
                    n.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            };
            let owned = |n: u32| Owned::IdentityRef {
                id: n,
                labels: sorted.to_owned(),
                enc: enc.to_owned(),
            };
            let got = inner.call("get", c.get(labels_key.clone(), None)).await?;
            if let Some(kv) = got.kvs().first() {
                let n = parse_number(&labels_key, kv.value())?;
                // Reference an existing number, if it still belongs to these labels.
                let txn = Txn::new()
                    .when([
                        Compare::value(keys.id(n), CompareOp::Equal, sorted),
                        Compare::value(labels_key.clone(), CompareOp::Equal, n.to_string()),
                    ])
                    .and_then([put_ref(n)]);
                inner.remember(ref_key.clone(), owned(n));
                match inner.call("txn (reference)", c.txn(txn)).await {
                    Ok(r) if r.succeeded() => return Ok(n),
                    Ok(_) => {
                        inner.forget(&ref_key);
                        continue;
                    }
                    Err(e) => {
                        inner.forget(&ref_key);
                        return Err(e);
                    }
                }
            }
            let n = self.pick_free(&tried).ok_or_else(|| KvError::Exhausted {
                range: self.range_text(),
                labels: sorted.to_owned(),
            })?;
            tried.insert(n);
            let id_key = keys.id(n);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(labels_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(id_key, sorted, None),
                    TxnOp::put(labels_key.clone(), n.to_string(), None),
                    put_ref(n),
                ]);
            inner.remember(ref_key.clone(), owned(n));
            match inner.call("txn (create)", c.txn(txn)).await {
                Ok(r) if r.succeeded() => {
                    if let Ok(labels) = parse_labels(sorted) {
                        self.cache
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .upsert(n, labels);
                    }
                    return Ok(n);
                }
                Ok(_) => {
                    inner.forget(&ref_key);
                }
                Err(e) => {
                    inner.forget(&ref_key);
                    return Err(e);
                }
            }
        }
        Err(KvError::Contended {
            labels: sorted.to_owned(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// A number of the range neither in the cache nor tried yet, from a random start (so
    /// concurrent nodes rarely pick the same one).
    fn pick_free(&self, tried: &HashSet<u32>) -> Option<u32> {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        let size = self.last - self.first + 1;
        let start = rand::rng().random_range(0..size);
        (0..size)
            .map(|i| self.base | (self.first + (start + i) % size))
            .find(|n| !tried.contains(n) && !cache.by_id.contains_key(n))
    }

    /// Drops one of this node's references to `id`; true when it was the last (the node's
    /// reference key is then deleted, and GC may free the number after its grace period).
    pub async fn release(&self, id: NumericIdentity) -> Result<bool, KvError> {
        self.check_id(id)?;
        let mut local = self.local.lock().await;
        let Some((sorted, r)) = local.iter_mut().find(|(_, r)| r.id == id.get()) else {
            return Err(KvError::NotAllocated { id: id.get() });
        };
        if r.refs > 1 {
            r.refs -= 1;
            return Ok(false);
        }
        let sorted = sorted.clone();
        let inner = &self.store.inner;
        let key = inner.keys.reference(&r.enc, &inner.cfg.node_name);
        inner.delete_owned(&key).await?;
        local.remove(&sorted);
        Ok(true)
    }

    /// This node's references: (identity, labels, count).
    pub async fn held(&self) -> Vec<(NumericIdentity, String, u64)> {
        let local = self.local.lock().await;
        let mut v: Vec<_> = local
            .values()
            .map(|r| (NumericIdentity::new(r.id), r.labels.clone(), r.refs))
            .collect();
        v.sort_by_key(|(id, _, _)| *id);
        v
    }

    /// The labels of a reserved identity or of a cluster identity known to the cache.
    pub fn lookup(&self, id: NumericIdentity) -> Option<Labels> {
        if id.is_reserved() {
            return reserved_labels(id);
        }
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        cache.by_id.get(&id.get()).cloned()
    }

    /// The identity of a reserved label set or of a label set known to the cache.
    pub fn lookup_by_labels(&self, labels: &Labels) -> Option<NumericIdentity> {
        if let Some(id) = reserved_identity_of(labels) {
            return Some(id);
        }
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        cache
            .by_labels
            .get(&labels.sorted_string())
            .map(|n| NumericIdentity::new(*n))
    }

    /// Every cluster identity in the cache, in numeric order.
    pub fn list(&self) -> Vec<(NumericIdentity, Labels)> {
        let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = cache
            .by_id
            .iter()
            .map(|(n, l)| (NumericIdentity::new(*n), l.clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// A stream of identity changes: first the current set (then `Synced` if the cache has
    /// synced), then every change.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<IdentityEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = cache.by_id.iter().map(|(n, l)| (*n, l.clone())).collect();
        all.sort_by_key(|(n, _)| *n);
        for (n, l) in all {
            let _ = tx.send(IdentityEvent::Upsert(NumericIdentity::new(n), l));
        }
        if *self.synced.borrow() {
            let _ = tx.send(IdentityEvent::Synced);
        }
        cache.subscribers.push(tx);
        rx
    }

    /// One GC pass: marks identities without references, and deletes those marked at least
    /// `grace` ago whose id key is unchanged, in a transaction that checks there are still no
    /// references (so a reference written meanwhile wins).
    pub async fn gc(&self, grace: Duration) -> Result<GcReport, KvError> {
        let inner = &self.store.inner;
        let keys = &inner.keys;
        let mut c = inner.client.clone();
        let ids = inner
            .call(
                "get (gc)",
                c.get(keys.id_prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let refs = inner
            .call(
                "get (gc)",
                c.get(
                    keys.value_prefix(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await?;
        let vp = keys.value_prefix();
        let referenced: HashSet<String> = refs
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&vp)?;
                Some(k.split_once('/')?.0.to_owned())
            })
            .collect();
        let now = Instant::now();
        let mut report = GcReport::default();
        let mut candidates = Vec::new();
        {
            let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
            let mut seen = HashSet::new();
            let ip = keys.id_prefix();
            for kv in ids.kvs() {
                let Some(n) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&ip))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let enc = encode_labels(&String::from_utf8_lossy(kv.value()));
                if referenced.contains(&enc) {
                    continue;
                }
                seen.insert(n);
                match marks.get(&n) {
                    Some((at, rev)) if *rev == kv.mod_revision() => {
                        if now.duration_since(*at) >= grace {
                            candidates.push((n, enc, kv.mod_revision()));
                        }
                    }
                    _ => {
                        marks.insert(n, (now, kv.mod_revision()));
                        report.marked += 1;
                    }
                }
            }
            marks.retain(|n, _| seen.contains(n));
        }
        for (n, enc, rev) in candidates {
            let refs = keys.refs_of(&enc);
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(keys.id(n), CompareOp::Equal, rev),
                    Compare::create_revision(refs.clone(), CompareOp::Equal, 0)
                        .with_range(prefix_end(&refs)),
                ])
                .and_then([
                    TxnOp::delete(keys.id(n), None),
                    TxnOp::delete(keys.labels(&enc), None),
                ]);
            if inner.call("txn (gc)", c.txn(txn)).await?.succeeded() {
                report.deleted += 1;
                tracing::info!(identity = n, "garbage-collected unused identity");
            }
            self.marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&n);
        }
        Ok(report)
    }
}

impl ClusterAllocator {
    /// Runs [`ClusterAllocator::gc`] every `interval` until the future is dropped (the owner
    /// spawns it and aborts it on shutdown); errors (etcd unreachable) are logged and retried.
    pub async fn gc_loop(&self, interval: Duration, grace: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            match self.gc(grace).await {
                Ok(r) if r.deleted > 0 => tracing::info!(deleted = r.deleted, "identity GC pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "identity GC pass failed"),
            }
        }
    }
}

/// Checks that `labels` may get a cluster identity; returns their canonical text.
pub(crate) fn validate_labels(labels: &Labels) -> Result<String, KvError> {
    let sorted = labels.sorted_string();
    let bad = |reason: String| KvError::invalid("labels", &sorted, reason);
    if labels.is_empty() {
        return Err(bad("an empty label set has no identity".into()));
    }
    if sorted.len() > MAX_LABELS_LEN {
        return Err(bad(format!("longer than {MAX_LABELS_LEN} bytes")));
    }
    if reserved_identity_of(labels).is_some() || labels.has_source(Source::Reserved) {
        return Err(bad(
            "reserved labels have fixed identities, not cluster-allocated ones".into(),
        ));
    }
    if labels.has_source(Source::Cidr) {
        return Err(bad(
            "CIDR identities are node-local, not cluster-allocated".into()
        ));
    }
    for l in labels {
        if l.source == Source::Any {
            return Err(bad(format!(
                "label {l} has source 'any', which only selectors use"
            )));
        }
        if Label::parse(&l.to_string()).as_ref() != Ok(l) {
            return Err(bad(format!("label {l} is not valid label syntax")));
        }
    }
    Ok(sorted)
}

/// Parses canonical label text (`src:k=v;src:k=v`), requiring it to be canonical.
pub(crate) fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for item in s.split(';') {
        labels.insert(Label::parse(item).map_err(|e| e.to_string())?);
    }
    if labels.sorted_string() != s {
        return Err("not in canonical form".into());
    }
    Ok(labels)
}

fn parse_number(key: &str, value: &[u8]) -> Result<u32, KvError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| KvError::Corrupt {
            key: key.to_owned(),
            reason: format!("{:?} is not a number", String::from_utf8_lossy(value)),
        })
}

/// Checks an `identities/id/<n>` entry read from etcd.
fn parse_id_entry(
    prefix: &str,
    key: &str,
    value: &[u8],
    (min, max): (u32, u32),
) -> Result<(u32, Labels), KvError> {
    let corrupt = |reason: String| KvError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let n: u32 = key
        .strip_prefix(prefix)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| corrupt("not an identity number".into()))?;
    if n < min || n > max {
        return Err(corrupt(format!(
            "{n} outside this cluster's range {min}..={max}"
        )));
    }
    let text = std::str::from_utf8(value).map_err(|_| corrupt("labels are not UTF-8".into()))?;
    let labels = parse_labels(text).map_err(|e| corrupt(format!("labels {text:?}: {e}")))?;
    validate_labels(&labels).map_err(|e| corrupt(e.to_string()))?;
    Ok((n, labels))
}
