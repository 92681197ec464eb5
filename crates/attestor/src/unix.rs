//! `UnixAttestor`: SPIRE's `unix` workload selectors (uid, user, gid, group, supplementary groups, executable
//! path and SHA-256) for a peer process, read so that they cannot belong to a process that reused its PID.

mod cache;
mod exe;
mod names;

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::proc::ProcDir;
use crate::{AttestError, PeerIdentity, Selector, WorkloadAttestor};

pub use exe::MIN_CACHEABLE_AGE;
use exe::{ExeCache, ExeKey, Lookup};
use names::NameCache;

/// Default cap on the size of an executable that is hashed for `unix:sha256`: 64 MiB.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 64 << 20;

/// How many executables' digests are kept; past this, the least recently used is forgotten.
const EXE_CACHE_CAPACITY: usize = 4096;

/// The selector kind of everything this attestor produces.
const KIND: &str = "unix";

/// Attests local processes by their credentials and executable.
///
/// `attest` blocks (it reads `/proc`, looks up names through NSS and, on a cache miss, hashes the
/// executable): call it from `tokio::task::spawn_blocking`. Executable digests and user and group names are
/// cached inside, so share one attestor (e.g. in an `Arc`) rather than building one per connection.
pub struct UnixAttestor {
    max_hash_bytes: u64,
    proc_root: PathBuf,
    exe_cache: ExeCache,
    names: NameCache,
}

/// Counters of the attestor's caches, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Executable digests answered from the cache.
    pub exe_hits: u64,
    /// Executables read and hashed (not cached yet, or changed less than [`MIN_CACHEABLE_AGE`] ago).
    pub exe_misses: u64,
    /// Executable digests currently cached.
    pub exe_entries: usize,
    /// User and group names answered from the cache.
    pub name_hits: u64,
    /// User and group names looked up through NSS.
    pub name_misses: u64,
}

// The agent shares one attestor across blocking tasks as `Arc<dyn WorkloadAttestor>`, built by `default()`.
const _: fn() = || {
    fn shareable<T: Send + Sync + Default + 'static>() {}
    shareable::<UnixAttestor>();
};

impl Default for UnixAttestor {
    fn default() -> Self {
        UnixAttestor {
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
            proc_root: PathBuf::from("/proc"),
            exe_cache: ExeCache::new(EXE_CACHE_CAPACITY),
            names: NameCache::default(),
        }
    }
}

impl fmt::Debug for UnixAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnixAttestor")
            .field("max_hash_bytes", &self.max_hash_bytes)
            .field("proc_root", &self.proc_root)
            .field("cache_stats", &self.cache_stats())
            .finish()
    }
}

impl WorkloadAttestor for UnixAttestor {
    /// Selectors, sorted: `unix:uid`, `unix:gid` (from SO_PEERCRED, which the kernel vouches for),
    /// `unix:user`/`unix:group` when the ids have names, `unix:supplementary_gid`/`unix:supplementary_group`,
    /// `unix:path` and `unix:sha256` of the executable (a deleted executable's path keeps its ` (deleted)`
    /// suffix, so it matches no entry written for the file that replaced it).
    fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError> {
        let pid = peer.pid;
        if peer.pidfd().is_none() {
            return Err(AttestError::NoPidfd { pid });
        }
        // Why this is safe against PID reuse: the pidfd names one process instance. `/proc/<pid>` is opened
        // first and only then is the pidfd checked. If the process is alive at the check, it held the PID
        // continuously since it connected (a PID is freed only when its process is reaped), so the directory
        // opened earlier is that process's. The directory fd stays bound to that process: once it is reaped,
        // reads through the fd fail rather than show the PID's next owner. So every read below is either of
        // the peer or an error. Checking liveness first and opening afterwards would leave a gap in which the
        // peer could die and its PID be reused.
        let dir = ProcDir::open(&self.proc_root, pid);
        peer.ensure_alive()?;
        let selectors = dir.and_then(|dir| self.read_selectors(peer, &dir));
        // A read that failed because the process died mid-way is reported as the exit, not as an I/O error.
        peer.ensure_alive()?;
        let mut selectors = selectors?;
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

impl UnixAttestor {
    /// Sets the size above which an executable is not hashed: `unix:sha256` is then left out (with a
    /// warning), since a missing selector can only narrow what the workload is entitled to.
    pub fn with_max_hash_bytes(mut self, max_hash_bytes: u64) -> Self {
        self.max_hash_bytes = max_hash_bytes;
        self
    }

    /// Sets where procfs is mounted; it must be the procfs of the agent's own PID namespace.
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// How often the caches answered, and how often they had to read a file or ask NSS.
    pub fn cache_stats(&self) -> CacheStats {
        let (exe_hits, exe_misses, exe_entries) = self.exe_cache.stats();
        let (name_hits, name_misses) = self.names.stats();
        CacheStats {
            exe_hits,
            exe_misses,
            exe_entries,
            name_hits,
            name_misses,
        }
    }

    fn read_selectors(
        &self,
        peer: &PeerIdentity,
        dir: &ProcDir,
    ) -> Result<Vec<Selector>, AttestError> {
        let mut out = Selectors(Vec::new());
        out.push("uid", peer.uid.to_string());
        if let Some(name) = self.names.user(peer.uid) {
            out.push("user", name);
        }
        out.push("gid", peer.gid.to_string());
        if let Some(name) = self.names.group(peer.gid) {
            out.push("group", name);
        }
        for gid in dir.status()?.groups {
            out.push("supplementary_gid", gid.to_string());
            if let Some(name) = self.names.group(gid) {
                out.push("supplementary_group", name);
            }
        }
        // One open of the executable serves the exec check, the path check and the hash, so all three are
        // about the same file.
        let path = dir.read_link("exe")?;
        let exe = dir.open_file("exe")?;
        let key = ExeKey::of(&exe).map_err(|source| AttestError::Proc {
            pid: peer.pid,
            op: "reading",
            path: self.proc_root.join(peer.pid.to_string()).join("exe"),
            cause: source,
        })?;
        self.check_exe_unchanged(peer, &key)?;
        match std::str::from_utf8(path.as_bytes()) {
            Ok(p) if same_file_here(p, &key) => out.push("path", p.to_string()),
            Ok(p) => tracing::debug!(
                pid = peer.pid,
                path = p,
                "the executable's path names another file (or none) in the agent's mount namespace; unix:path omitted"
            ),
            Err(_) => {
                tracing::warn!(pid = peer.pid, path = ?path, "executable path is not UTF-8; unix:path omitted")
            }
        }
        if let Some(digest) = self.hash_exe(peer.pid, &exe, key)? {
            out.push("sha256", digest);
        }
        Ok(out.0)
    }

    /// Hex SHA-256 of the running executable, read through `exe` (so the file the process runs, even if it
    /// has since been replaced or deleted), or `None` if it is larger than `max_hash_bytes`.
    ///
    /// The cache is keyed by the `fstat` of the file opened here, and a miss hashes that same descriptor, so
    /// the digest is always of the file this process runs, as it is now.
    fn hash_exe(
        &self,
        pid: i32,
        file: &std::fs::File,
        key: ExeKey,
    ) -> Result<Option<String>, AttestError> {
        let read_err = |source| AttestError::Proc {
            pid,
            op: "reading",
            path: self.proc_root.join(pid.to_string()).join("exe"),
            cause: source,
        };
        let too_big = |size: u64| {
            tracing::warn!(
                pid,
                size,
                limit = self.max_hash_bytes,
                "executable is larger than max_hash_bytes; unix:sha256 omitted"
            );
            Ok(None)
        };
        // The key was taken just before this call; a change after it gets a ctime after the key's, and the
        // re-check below sees it (see `MIN_CACHEABLE_AGE`).
        let now = SystemTime::now();
        if key.size > self.max_hash_bytes {
            return too_big(key.size);
        }
        let settled = key.settled(now);
        let _flight = if settled {
            match self.exe_cache.lookup(&key) {
                Lookup::Hit(digest) => return Ok(Some(hex::encode(digest))),
                Lookup::Miss(flight) => flight,
            }
        } else {
            self.exe_cache.count_uncached();
            None
        };
        let (digest, total) = exe::hash_file(file, self.max_hash_bytes).map_err(read_err)?;
        if total > self.max_hash_bytes {
            return too_big(total);
        }
        // A file that changed while being read hashes to a mix of old and new contents: report it (as an
        // uncached read always could), but do not keep it.
        if settled && total == key.size && ExeKey::of(file).is_ok_and(|after| after == key) {
            self.exe_cache.insert(key, digest);
        }
        Ok(Some(hex::encode(digest)))
    }
}

impl UnixAttestor {
    /// Refuses a peer whose executable is not the one it ran when it connected. The snapshot must have been
    /// read through the procfs this attestor reads (a test's fake one: see
    /// [`PeerIdentity::with_exe_snapshot_through`]); otherwise the peer is refused, never the check skipped.
    fn check_exe_unchanged(&self, peer: &PeerIdentity, now: &ExeKey) -> Result<(), AttestError> {
        if self.proc_root != peer.snapshot_root() {
            return Err(AttestError::ExeSnapshotElsewhere {
                pid: peer.pid,
                snapshot: peer.snapshot_root().to_path_buf(),
                attestor: self.proc_root.clone(),
            });
        }
        match peer.exe_at_connect() {
            Ok(then) if then.dev == now.dev && then.ino == now.ino => Ok(()),
            Ok(_) => Err(AttestError::ExeChanged { pid: peer.pid }),
            Err(reason) => Err(AttestError::ExeUnknownAtConnect {
                pid: peer.pid,
                reason: reason.to_string(),
            }),
        }
    }
}

/// Whether `path`, resolved in the agent's own mount namespace (and root), is the file `key` describes.
/// `/proc/<pid>/exe` reads as a path in the process's mount namespace: a process that bind-mounted another
/// binary over `/usr/bin/sleep` in its own namespace shows `/usr/bin/sleep`, which here is a different file.
/// A deleted executable (` (deleted)` suffix) or one in a container's root names no such file here either.
fn same_file_here(path: &str, key: &ExeKey) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.dev() == key.dev && m.ino() == key.ino)
}

/// Collects `unix:` selectors, dropping (with a warning) values a `Selector` cannot hold, such as a path
/// longer than 1 KiB: leaving a selector out only narrows what the workload can match.
struct Selectors(Vec<Selector>);

impl Selectors {
    fn push(&mut self, name: &str, value: String) {
        match Selector::new(KIND, format!("{name}:{value}")) {
            Ok(s) => self.0.push(s),
            Err(e) => tracing::warn!(error = %e, "unix:{name} selector omitted"),
        }
    }
}
