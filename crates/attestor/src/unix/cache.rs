//! A small bounded map for the attestor's caches: least-recently-used eviction, optional expiry.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// At most `capacity` entries; when full, an insert first drops expired entries, then the least recently
/// used one. Eviction scans the map, which is fine for the few thousand entries kept here: it only runs on a
/// miss, which costs a file hash or an NSS lookup anyway.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    map: HashMap<K, Slot<V>>,
    capacity: usize,
    ttl: Option<Duration>,
    /// Bumped on every use; the entry with the smallest stamp is the least recently used.
    clock: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    used: u64,
    stored: Instant,
}

impl<K: Eq + Hash + Clone, V: Clone> Lru<K, V> {
    /// An empty map holding at most `capacity` (at least 1) entries, each for at most `ttl` if given.
    pub(crate) fn new(capacity: usize, ttl: Option<Duration>) -> Self {
        Lru {
            map: HashMap::new(),
            capacity: capacity.max(1),
            ttl,
            clock: 0,
        }
    }

    fn expired(&self, slot: &Slot<V>, now: Instant) -> bool {
        self.ttl
            .is_some_and(|ttl| now.saturating_duration_since(slot.stored) >= ttl)
    }

    /// The value for `key` unless absent or expired at `now`; marks it recently used.
    pub(crate) fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let slot = self.map.get(key)?;
        if self.expired(slot, now) {
            self.map.remove(key);
            return None;
        }
        self.clock += 1;
        let clock = self.clock;
        let slot = self.map.get_mut(key)?;
        slot.used = clock;
        Some(slot.value.clone())
    }

    /// Stores `value` for `key` as of `now`, evicting if the map is full.
    pub(crate) fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            if self.ttl.is_some() {
                let ttl = self.ttl;
                self.map.retain(|_, slot| {
                    ttl.is_some_and(|ttl| now.saturating_duration_since(slot.stored) < ttl)
                });
            }
            if self.map.len() >= self.capacity {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, slot)| slot.used)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.map.remove(&oldest);
                }
            }
        }
        self.clock += 1;
        let used = self.clock;
        self.map.insert(
            key,
            Slot {
                value,
                used,
                stored: now,
            },
        );
    }

    /// How many entries are stored (expired ones included until they are dropped).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let now = Instant::now();
        let mut lru = Lru::new(2, None);
        lru.insert(1, "a", now);
        lru.insert(2, "b", now);
        assert_eq!(lru.get(&1, now), Some("a"));
        lru.insert(3, "c", now);
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.get(&2, now), None, "2 was used least recently");
        assert_eq!(lru.get(&1, now), Some("a"));
        assert_eq!(lru.get(&3, now), Some("c"));
        // Replacing a key's value does not evict anything.
        lru.insert(3, "C", now);
        assert_eq!(
            (lru.len(), lru.get(&1, now), lru.get(&3, now)),
            (2, Some("a"), Some("C"))
        );
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut lru = Lru::new(2, Some(ttl));
        lru.insert(1, "a", t0);
        assert_eq!(lru.get(&1, t0 + ttl - Duration::from_millis(1)), Some("a"));
        assert_eq!(lru.get(&1, t0 + ttl), None);
        assert_eq!(lru.len(), 0, "an expired entry is dropped when seen");

        // A full map drops its expired entries before evicting a live one, however recently used.
        lru.insert(1, "a", t0);
        lru.insert(2, "b", t0 + ttl);
        assert_eq!(lru.get(&1, t0), Some("a"));
        lru.insert(3, "c", t0 + ttl);
        assert_eq!(lru.get(&2, t0 + ttl), Some("b"));
        assert_eq!(lru.get(&3, t0 + ttl), Some("c"));
    }
}
