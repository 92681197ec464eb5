//! Identity allocation: the same label set always gets the same number, numbers are reference
//! counted, and a released number is held back for a grace period before another label set
//! may get it (packets and policy maps elsewhere may still carry it).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sigil_labels::{Labels, Source};

use crate::error::IdentityError;
use crate::numeric::{NumericIdentity, reserved_identity_of, reserved_labels};

/// A source of the current time, injectable for tests.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Maps label sets to numeric identities; in-process now, a shared store (etcd) later.
pub trait Allocator: Send + Sync {
    /// The identity of `labels`, allocating it if needed, and whether it was (re)allocated by
    /// this call (reference count went from 0 to 1). Reserved label sets give their reserved
    /// identity (not counted); sets of only `cidr:` labels (optionally with `reserved:world`)
    /// give a node-local CIDR identity.
    fn allocate(&self, labels: &Labels) -> Result<(NumericIdentity, bool), IdentityError>;
    /// Drops one reference; true when that was the last one. Reserved identities: no-op, false.
    fn release(&self, id: NumericIdentity) -> Result<bool, IdentityError>;
    /// The labels of a reserved or currently allocated identity.
    fn lookup(&self, id: NumericIdentity) -> Option<Labels>;
    /// The identity of a reserved or currently allocated label set.
    fn lookup_by_labels(&self, labels: &Labels) -> Option<NumericIdentity>;
    /// Every currently allocated identity (reserved ones excluded), in numeric order.
    fn list(&self) -> Vec<(NumericIdentity, Labels)>;
}

/// A pool of numbers `base | n` for n in `first..=last`.
#[derive(Debug)]
struct Pool {
    scope: &'static str,
    base: u32,
    first: u32,
    last: u32,
    /// Next never-used n; fresh numbers go first so reuse is as late as possible.
    next: u32,
    /// Numbers whose grace period has passed, oldest first.
    free: VecDeque<u32>,
}

impl Pool {
    fn new(scope: &'static str, base: u32, first: u32, last: u32) -> Pool {
        Pool {
            scope,
            base,
            first,
            last,
            next: first,
            free: VecDeque::new(),
        }
    }

    fn take(&mut self) -> Option<u32> {
        if self.next <= self.last {
            let n = self.next;
            self.next += 1;
            return Some(self.base | n);
        }
        self.free.pop_front()
    }

    fn range(&self) -> String {
        format!("{}..={} (base {:#x})", self.first, self.last, self.base)
    }
}

#[derive(Debug)]
struct Entry {
    labels: Arc<Labels>,
    refs: u64,
    /// Set while the reference count is 0 and the number is in its grace period.
    released_at: Option<Instant>,
}

#[derive(Debug)]
struct State {
    by_id: HashMap<u32, Entry>,
    by_labels: HashMap<Arc<Labels>, u32>,
    cluster: Pool,
    cidr: Pool,
    /// Releases in time order; stale items (identity re-allocated since) are skipped.
    pending: VecDeque<(Instant, u32)>,
}

impl State {
    /// Frees the numbers whose grace period has passed; amortized O(1) per release.
    fn sweep(&mut self, now: Instant, grace: Duration) {
        while let Some(&(at, id)) = self.pending.front() {
            if now.saturating_duration_since(at) < grace {
                break;
            }
            self.pending.pop_front();
            let expired = self
                .by_id
                .get(&id)
                .is_some_and(|e| e.refs == 0 && e.released_at == Some(at));
            if !expired {
                continue;
            }
            if let Some(entry) = self.by_id.remove(&id) {
                self.by_labels.remove(&entry.labels);
                if id & NumericIdentity::LOCAL_CIDR_FLAG != 0 {
                    self.cidr.free.push_back(id);
                } else {
                    self.cluster.free.push_back(id);
                }
            }
        }
    }
}

/// The in-process allocator for one node / cluster; thread-safe, O(1) amortized per call.
pub struct LocalAllocator {
    cluster_id: u8,
    grace: Duration,
    clock: Clock,
    state: Mutex<State>,
}

impl std::fmt::Debug for LocalAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAllocator")
            .field("cluster_id", &self.cluster_id)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Highest node-local CIDR number (the 24 bits below the flag).
const MAX_CIDR_LOCAL: u32 = NumericIdentity::LOCAL_CIDR_FLAG - 1;

impl LocalAllocator {
    /// An allocator for `cluster_id` holding released numbers back for `grace`.
    pub fn new(cluster_id: u8, grace: Duration) -> Self {
        Self::with_clock(cluster_id, grace, Arc::new(Instant::now))
    }

    /// Like [`LocalAllocator::new`] with an injected clock.
    pub fn with_clock(cluster_id: u8, grace: Duration, clock: Clock) -> Self {
        let base = u32::from(cluster_id) << NumericIdentity::CLUSTER_ID_SHIFT;
        LocalAllocator {
            cluster_id,
            grace,
            clock,
            state: Mutex::new(State {
                by_id: HashMap::new(),
                by_labels: HashMap::new(),
                cluster: Pool::new(
                    "cluster-local",
                    base,
                    NumericIdentity::MIN_CLUSTER_LOCAL,
                    NumericIdentity::MAX_CLUSTER_LOCAL,
                ),
                cidr: Pool::new(
                    "node-local CIDR",
                    NumericIdentity::LOCAL_CIDR_FLAG,
                    1,
                    MAX_CIDR_LOCAL,
                ),
                pending: VecDeque::new(),
            }),
        }
    }

    /// Narrows the cluster-local numbers to `first..=last` (within 256..=65535), e.g. to test
    /// exhaustion. Call before allocating.
    pub fn with_cluster_range(mut self, first: u32, last: u32) -> Result<Self, IdentityError> {
        let (min, max) = (
            NumericIdentity::MIN_CLUSTER_LOCAL,
            NumericIdentity::MAX_CLUSTER_LOCAL,
        );
        check_range("cluster-local", first, last, min, max)?;
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let base = state.cluster.base;
        state.cluster = Pool::new("cluster-local", base, first, last);
        Ok(self)
    }

    /// Narrows the node-local CIDR numbers to `first..=last` (within 1..=2^24-1).
    pub fn with_cidr_range(mut self, first: u32, last: u32) -> Result<Self, IdentityError> {
        check_range("node-local CIDR", first, last, 1, MAX_CIDR_LOCAL)?;
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        state.cidr = Pool::new(
            "node-local CIDR",
            NumericIdentity::LOCAL_CIDR_FLAG,
            first,
            last,
        );
        Ok(self)
    }

    /// The cluster ID put above every cluster identity.
    pub fn cluster_id(&self) -> u8 {
        self.cluster_id
    }

    /// Number of currently allocated identities (reserved ones excluded).
    pub fn len(&self) -> usize {
        self.lock().by_id.values().filter(|e| e.refs > 0).count()
    }

    /// Whether no identity is allocated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A panic while holding the lock cannot leave the maps half-updated (every update is a
    /// few infallible map operations), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn check_range(
    scope: &'static str,
    first: u32,
    last: u32,
    min: u32,
    max: u32,
) -> Result<(), IdentityError> {
    if first < min || last > max || first > last {
        return Err(IdentityError::InvalidRange {
            scope,
            first,
            last,
            min,
            max,
        });
    }
    Ok(())
}

/// Whether `labels` describe a CIDR: at least one `cidr:` label and otherwise only the world
/// labels Cilium attaches to CIDR identities.
fn is_cidr_set(labels: &Labels) -> bool {
    labels.has_source(Source::Cidr)
        && labels.iter().all(|l| {
            l.source == Source::Cidr
                || (l.source == Source::Reserved
                    && l.value.is_empty()
                    && matches!(l.key.as_str(), "world" | "world-ipv4" | "world-ipv6"))
        })
}

impl Allocator for LocalAllocator {
    fn allocate(&self, labels: &Labels) -> Result<(NumericIdentity, bool), IdentityError> {
        if labels.is_empty() {
            return Err(IdentityError::EmptyLabels);
        }
        if let Some(id) = reserved_identity_of(labels) {
            return Ok((id, false));
        }
        let now = (self.clock)();
        let mut state = self.lock();
        state.sweep(now, self.grace);
        if let Some(&id) = state.by_labels.get(labels)
            && let Some(entry) = state.by_id.get_mut(&id)
        {
            entry.refs += 1;
            entry.released_at = None;
            return Ok((NumericIdentity::new(id), entry.refs == 1));
        }
        let pool = if is_cidr_set(labels) {
            &mut state.cidr
        } else {
            &mut state.cluster
        };
        let Some(id) = pool.take() else {
            return Err(IdentityError::Exhausted {
                scope: pool.scope,
                range: pool.range(),
                labels: labels.sorted_string(),
            });
        };
        let labels = Arc::new(labels.clone());
        state.by_labels.insert(Arc::clone(&labels), id);
        state.by_id.insert(
            id,
            Entry {
                labels,
                refs: 1,
                released_at: None,
            },
        );
        Ok((NumericIdentity::new(id), true))
    }

    fn release(&self, id: NumericIdentity) -> Result<bool, IdentityError> {
        if id.is_reserved() {
            return Ok(false);
        }
        let now = (self.clock)();
        let mut state = self.lock();
        let Some(entry) = state.by_id.get_mut(&id.get()).filter(|e| e.refs > 0) else {
            return Err(IdentityError::NotAllocated { id });
        };
        entry.refs -= 1;
        if entry.refs > 0 {
            return Ok(false);
        }
        entry.released_at = Some(now);
        state.pending.push_back((now, id.get()));
        state.sweep(now, self.grace);
        Ok(true)
    }

    fn lookup(&self, id: NumericIdentity) -> Option<Labels> {
        if id.is_reserved() {
            return reserved_labels(id);
        }
        let state = self.lock();
        state
            .by_id
            .get(&id.get())
            .filter(|e| e.refs > 0)
            .map(|e| Labels::clone(&e.labels))
    }

    fn lookup_by_labels(&self, labels: &Labels) -> Option<NumericIdentity> {
        if let Some(id) = reserved_identity_of(labels) {
            return Some(id);
        }
        let state = self.lock();
        let id = *state.by_labels.get(labels)?;
        state
            .by_id
            .get(&id)
            .filter(|e| e.refs > 0)
            .map(|_| NumericIdentity::new(id))
    }

    fn list(&self) -> Vec<(NumericIdentity, Labels)> {
        let state = self.lock();
        let mut out: Vec<_> = state
            .by_id
            .iter()
            .filter(|(_, e)| e.refs > 0)
            .map(|(id, e)| (NumericIdentity::new(*id), Labels::clone(&e.labels)))
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }
}
