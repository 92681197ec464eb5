//! Hashing of executables, with a cache keyed by the identity of the opened file so that the file is read
//! once, not on every attestation, and a file that changed is never answered from the cache.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::cache::Lru;

/// A SHA-256 digest.
pub(crate) type Sha256Digest = [u8; 32];

/// How long ago an executable must have last changed (its ctime) before its digest is cached; one that
/// changed more recently is hashed on every attestation. Timestamps are coarse (a clock tick on ext4 or xfs,
/// 1 s or 2 s on some filesystems), so a file rewritten within the tick of its last change can keep all its
/// `fstat` fields; past this age, any later change gets a newer ctime.
pub const MIN_CACHEABLE_AGE: Duration = Duration::from_secs(3);

/// The identity of an opened file's contents, from `fstat` on the descriptor: the same key means the same
/// file, not rewritten since. The ctime matters most: the kernel sets it on every write, truncate, rename,
/// chmod or `utimensat`, and no call can set it back, unlike the mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ExeKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
}

impl ExeKey {
    /// The key of the file open as `file`.
    pub(crate) fn of(file: &File) -> io::Result<ExeKey> {
        let m = file.metadata()?;
        Ok(ExeKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Whether, at `now`, the file last changed at least [`MIN_CACHEABLE_AGE`] ago. A ctime in the future
    /// (clock skew, a clock stepped back) is not settled either.
    pub(crate) fn settled(&self, now: SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let changed = match (u64::try_from(secs), u32::try_from(nanos)) {
            (Ok(secs), Ok(nanos)) => UNIX_EPOCH + Duration::new(secs, nanos),
            // Before 1970: long settled, if the clock is to be believed at all.
            _ => UNIX_EPOCH,
        };
        now.duration_since(changed)
            .is_ok_and(|age| age >= MIN_CACHEABLE_AGE)
    }
}

/// Hashes at most `limit + 1` bytes of `file` from its current offset: the digest and the bytes read (more
/// than `limit` means the file is over the limit and the digest is of a prefix).
pub(crate) fn hash_file(mut file: &File, limit: u64) -> io::Result<(Sha256Digest, u64)> {
    let mut reader = (&mut file).take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Digests of executables by [`ExeKey`], plus the keys being hashed right now: when many workloads running
/// the same binary connect at once (say, all of them reconnecting after an agent restart), one caller hashes
/// and the others wait for its result instead of each reading the file.
#[derive(Debug)]
pub(crate) struct ExeCache {
    state: Mutex<ExeState>,
    hashed: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug)]
struct ExeState {
    digests: Lru<ExeKey, Sha256Digest>,
    hashing: HashSet<ExeKey>,
    /// Callers blocked in [`ExeCache::lookup`] on a key being hashed.
    waiting: usize,
}

/// The outcome of [`ExeCache::lookup`].
pub(crate) enum Lookup<'a> {
    /// The cached digest.
    Hit(Sha256Digest),
    /// Not cached: the caller hashes the file. With a [`Flight`], others asking for the key meanwhile wait
    /// for it; dropping it (after [`ExeCache::insert`], or on failure) wakes them.
    Miss(Option<Flight<'a>>),
}

/// Marks a key as being hashed until dropped.
pub(crate) struct Flight<'a> {
    cache: &'a ExeCache,
    key: ExeKey,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.cache.lock().hashing.remove(&self.key);
        self.cache.hashed.notify_all();
    }
}

impl ExeCache {
    /// An empty cache of at most `capacity` digests.
    pub(crate) fn new(capacity: usize) -> Self {
        ExeCache {
            state: Mutex::new(ExeState {
                digests: Lru::new(capacity, None),
                hashing: HashSet::new(),
                waiting: 0,
            }),
            hashed: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Every critical section leaves the state consistent, so a panic elsewhere under the lock cannot have
    /// left it half-updated.
    fn lock(&self) -> MutexGuard<'_, ExeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The digest for `key`, waiting if another caller is hashing the same file. If that caller cached
    /// nothing (it failed, or found the file changing), this caller hashes on its own rather than queueing.
    pub(crate) fn lookup(&self, key: &ExeKey) -> Lookup<'_> {
        let mut state = self.lock();
        let mut waited = false;
        while state.hashing.contains(key) {
            waited = true;
            state.waiting += 1;
            state = self
                .hashed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        }
        if let Some(digest) = state.digests.get(key, Instant::now()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Hit(digest);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if waited {
            return Lookup::Miss(None);
        }
        state.hashing.insert(*key);
        Lookup::Miss(Some(Flight {
            cache: self,
            key: *key,
        }))
    }

    /// Counts a hash done without consulting the cache (a file that changed too recently).
    pub(crate) fn count_uncached(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Caches `digest` for `key`.
    pub(crate) fn insert(&self, key: ExeKey, digest: Sha256Digest) {
        self.lock().digests.insert(key, digest, Instant::now());
    }

    /// Lookups answered from the cache, lookups that had to hash, and digests stored.
    pub(crate) fn stats(&self) -> (u64, u64, usize) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.lock().digests.len(),
        )
    }
}

#[cfg(test)]
impl ExeCache {
    /// Blocks until `n` callers wait on a key being hashed.
    fn await_waiters(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.lock().waiting < n {
            assert!(
                Instant::now() < deadline,
                "{n} waiters not seen within 10 s"
            );
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use std::sync::Arc;

    fn key_of(path: &std::path::Path) -> ExeKey {
        ExeKey::of(&File::open(path).unwrap()).unwrap()
    }

    /// Waits until the clock has moved past `key`'s ctime by more than a timestamp tick, so that the next
    /// change cannot share it (ext4 and tmpfs stamp with a clock tick of at most 10 ms).
    fn past_tick(key: &ExeKey) {
        let (secs, nanos) = key.ctime;
        let ctime = UNIX_EPOCH + Duration::new(secs as u64, nanos as u32);
        let until = ctime + Duration::from_millis(20);
        if let Ok(wait) = until.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
    }

    #[test]
    fn key_changes_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        std::fs::write(&path, b"first").unwrap();
        let first = key_of(&path);
        assert_eq!(key_of(&path), first, "an unchanged file keeps its key");
        assert_eq!(first.size, 5);

        past_tick(&first);
        std::fs::write(&path, b"other").unwrap();
        let rewritten = key_of(&path);
        assert_ne!(rewritten, first, "same size, same inode, new contents");
        assert_eq!((rewritten.ino, rewritten.size), (first.ino, first.size));

        // Setting the mtime back does not restore the key: the ctime moves on.
        past_tick(&rewritten);
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::new(first.mtime.0 as u64, first.mtime.1 as u32))
            .unwrap();
        let touched = ExeKey::of(&f).unwrap();
        assert_eq!(touched.mtime, first.mtime);
        assert_ne!(touched, rewritten);
        assert_ne!(touched, first);

        // A copy with the same contents is another file.
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy).unwrap();
        assert_ne!(key_of(&copy).ino, touched.ino);
    }

    #[test]
    fn only_files_unchanged_for_a_while_are_settled() {
        let key = ExeKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (100, 5),
            ctime: (100, 5),
        };
        let changed = UNIX_EPOCH + Duration::new(100, 5);
        assert!(!key.settled(changed));
        assert!(!key.settled(changed + MIN_CACHEABLE_AGE - Duration::from_nanos(1)));
        assert!(key.settled(changed + MIN_CACHEABLE_AGE));
        assert!(
            !key.settled(changed - Duration::from_secs(60)),
            "ctime in the future"
        );
    }

    #[test]
    fn one_caller_hashes_while_the_others_wait() {
        let cache = Arc::new(ExeCache::new(8));
        let key = ExeKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (0, 0),
            ctime: (0, 0),
        };
        let Lookup::Miss(Some(flight)) = cache.lookup(&key) else {
            panic!("first lookup of an empty cache must miss and hash");
        };
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || match cache.lookup(&key) {
                    Lookup::Hit(d) => Some(d),
                    Lookup::Miss(_) => None,
                })
            })
            .collect();
        cache.await_waiters(4);
        cache.insert(key, [7; 32]);
        drop(flight);
        for w in waiters {
            assert_eq!(w.join().unwrap(), Some([7; 32]));
        }
        assert_eq!(cache.stats(), (4, 1, 1));

        // A hasher that caches nothing releases the waiters to hash on their own, without a flight each.
        let other = ExeKey { ino: 9, ..key };
        let Lookup::Miss(Some(flight)) = cache.lookup(&other) else {
            panic!("uncached key must miss");
        };
        let waiter = {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || matches!(cache.lookup(&other), Lookup::Miss(None)))
        };
        cache.await_waiters(1);
        drop(flight);
        assert!(waiter.join().unwrap());
    }
}
