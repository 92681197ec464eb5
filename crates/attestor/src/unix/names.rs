//! User and group names by id through NSS, cached for a short while: a lookup can cost a file parse or a
//! directory-service round trip, and names change rarely.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};

use super::cache::Lru;

/// How long a looked-up name (or the absence of one) is reused: a renamed user shows up this late.
pub(crate) const NAME_TTL: Duration = Duration::from_secs(30);

/// Distinct uids, and separately gids, remembered.
const NAME_CAPACITY: usize = 1024;

/// Cached uid → user name and gid → group name; `None` (no such id) is cached too, a failed lookup is not.
#[derive(Debug)]
pub(crate) struct NameCache {
    users: Mutex<Lru<u32, Option<String>>>,
    groups: Mutex<Lru<u32, Option<String>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for NameCache {
    fn default() -> Self {
        NameCache {
            users: Mutex::new(Lru::new(NAME_CAPACITY, Some(NAME_TTL))),
            groups: Mutex::new(Lru::new(NAME_CAPACITY, Some(NAME_TTL))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

/// The map is consistent after every call on it, so a poisoned lock still guards a usable map.
fn lock(m: &Mutex<Lru<u32, Option<String>>>) -> MutexGuard<'_, Lru<u32, Option<String>>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NameCache {
    /// The name of user `uid`, if it has one.
    pub(crate) fn user(&self, uid: u32) -> Option<String> {
        self.cached(&self.users, uid, || {
            User::from_uid(Uid::from_raw(uid))
                .map(|u| u.map(|u| u.name))
                .inspect_err(
                    |e| tracing::warn!(uid, error = %e, "looking up user name; unix:user omitted"),
                )
        })
    }

    /// The name of group `gid`, if it has one.
    pub(crate) fn group(&self, gid: u32) -> Option<String> {
        self.cached(&self.groups, gid, || {
            Group::from_gid(Gid::from_raw(gid))
                .map(|g| g.map(|g| g.name))
                .inspect_err(|e| tracing::warn!(gid, error = %e, "looking up group name; unix:group omitted"))
        })
    }

    /// The lock is not held during the lookup, so a slow directory service delays only callers missing too.
    fn cached<E>(
        &self,
        map: &Mutex<Lru<u32, Option<String>>>,
        id: u32,
        look_up: impl FnOnce() -> Result<Option<String>, E>,
    ) -> Option<String> {
        if let Some(name) = lock(map).get(&id, Instant::now()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return name;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let name = look_up().ok()?;
        lock(map).insert(id, name.clone(), Instant::now());
        name
    }

    /// Lookups answered from the cache, and lookups that went to NSS.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_once_and_failures_not_cached() {
        let cache = NameCache::default();
        // uid 0 is root everywhere; the NSS answer is the reference.
        let root = User::from_uid(Uid::from_raw(0)).unwrap().map(|u| u.name);
        assert_eq!(cache.user(0), root);
        assert_eq!(cache.user(0), root);
        assert_eq!(cache.stats(), (1, 1));
        // Users and groups are separate maps: gid 0 is not answered from uid 0's entry.
        let root_group = Group::from_gid(Gid::from_raw(0)).unwrap().map(|g| g.name);
        assert_eq!(cache.group(0), root_group);
        assert_eq!(cache.stats(), (1, 2));

        let failed = cache.cached(&cache.users, 4242, || Err("directory down"));
        assert_eq!(failed, None);
        let later = cache.cached(&cache.users, 4242, || Ok::<_, ()>(Some("back".to_string())));
        assert_eq!(
            later.as_deref(),
            Some("back"),
            "a failure is retried next time"
        );
        let cached = cache.cached(&cache.users, 4242, || Ok::<_, ()>(None));
        assert_eq!(cached.as_deref(), Some("back"));
    }
}
