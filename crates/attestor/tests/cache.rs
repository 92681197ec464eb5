//! The attestor's caches seen from outside: a second attestation of the same executable is answered without
//! reading it, gives the same selectors, and a changed executable is read again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/client.rs"]
mod client;

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_attestor::{
    CacheStats, MIN_CACHEABLE_AGE, PeerIdentity, Selector, UnixAttestor, WorkloadAttestor,
};

/// Sleeps until `path` last changed at least `MIN_CACHEABLE_AGE` ago, so its digest may be cached (for a
/// test binary built a while ago: not at all).
fn wait_until_settled(path: &Path) {
    let m = std::fs::metadata(path).unwrap();
    let ctime = UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
    let settled = ctime + MIN_CACHEABLE_AGE + Duration::from_millis(10);
    if let Ok(wait) = settled.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
}

fn sha256_selector(selectors: &[Selector]) -> Option<String> {
    selectors
        .iter()
        .find_map(|s| s.value.strip_prefix("sha256:").map(str::to_string))
}

fn me() -> PeerIdentity {
    PeerIdentity::from_pid(std::process::id() as i32).unwrap()
}

/// Test binaries are large (~64 MiB unoptimized) and could outgrow the default limit.
fn roomy() -> UnixAttestor {
    UnixAttestor::default().with_max_hash_bytes(1 << 30)
}

#[test]
fn a_second_attestation_is_answered_from_the_cache() {
    let exe = std::env::current_exe().unwrap();
    wait_until_settled(&exe);
    let me = me();
    let attestor = roomy();

    let first = attestor.attest(&me).unwrap();
    let after_first = attestor.cache_stats();
    assert_eq!(
        (
            after_first.exe_hits,
            after_first.exe_misses,
            after_first.exe_entries
        ),
        (0, 1, 1)
    );
    assert_eq!(sha256_selector(&first), Some(client::sha256_file(&exe)));

    let second = attestor.attest(&me).unwrap();
    let after_second = attestor.cache_stats();
    assert_eq!(
        (
            after_second.exe_hits,
            after_second.exe_misses,
            after_second.exe_entries
        ),
        (1, 1, 1)
    );
    assert_eq!(second, first);
    assert_eq!(
        after_second.name_misses, after_first.name_misses,
        "user and group names are not looked up again"
    );
    assert!(after_second.name_hits > after_first.name_hits);

    // An attestor with empty caches sees exactly the same selectors.
    assert_eq!(roomy().attest(&me).unwrap(), second);
}

#[test]
fn concurrent_attestations_hash_the_executable_once() {
    wait_until_settled(&std::env::current_exe().unwrap());
    let me = Arc::new(me());
    let attestor = Arc::new(roomy());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (me, attestor) = (Arc::clone(&me), Arc::clone(&attestor));
            std::thread::spawn(move || attestor.attest(&me).unwrap())
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let stats = attestor.cache_stats();
    assert_eq!((stats.exe_hits, stats.exe_misses), (7, 1), "{stats:?}");
}

#[test]
fn a_changed_executable_is_read_again() {
    let me = me();
    let root = tempfile::tempdir().unwrap();
    let pid_dir = root.path().join(me.pid.to_string());
    std::fs::create_dir(&pid_dir).unwrap();
    std::fs::write(
        pid_dir.join("status"),
        "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n",
    )
    .unwrap();
    let exe = root.path().join("workload");
    std::fs::write(&exe, b"version 1\n").unwrap();
    symlink(&exe, pid_dir.join("exe")).unwrap();
    // The exec-after-connect snapshot is taken through the same fake procfs the attestor reads.
    let me = me.with_exe_snapshot_through(root.path());
    let attestor = UnixAttestor::default().with_proc_root(root.path());
    let stats = |a: &UnixAttestor| {
        let CacheStats {
            exe_hits,
            exe_misses,
            exe_entries,
            ..
        } = a.cache_stats();
        (exe_hits, exe_misses, exe_entries)
    };

    // Just written: too recent to tell a later same-tick rewrite apart, so hashed each time, never cached.
    let v1 = client::sha256_file(&exe);
    for _ in 0..2 {
        assert_eq!(
            sha256_selector(&attestor.attest(&me).unwrap()),
            Some(v1.clone())
        );
    }
    assert_eq!(stats(&attestor), (0, 2, 0));

    wait_until_settled(&exe);
    assert_eq!(
        sha256_selector(&attestor.attest(&me).unwrap()),
        Some(v1.clone())
    );
    assert_eq!(
        sha256_selector(&attestor.attest(&me).unwrap()),
        Some(v1.clone())
    );
    assert_eq!(stats(&attestor), (1, 3, 1));

    // Same inode, same size, new contents: a miss, and the new digest.
    std::fs::write(&exe, b"version 2\n").unwrap();
    let v2 = client::sha256_file(&exe);
    assert_ne!(v1, v2);
    assert_eq!(sha256_selector(&attestor.attest(&me).unwrap()), Some(v2));
    assert_eq!(stats(&attestor), (1, 4, 1));
}
