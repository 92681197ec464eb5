//! What every daemon does around its servers: binding its Unix sockets, telling when it serves
//! (readiness), draining on shutdown, and one metrics registry its subsystems register into.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// Default bound on draining in-flight calls after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A Unix socket that could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path has no parent directory.
    #[error("{key}: {path} has no directory")]
    NoDirectory {
        /// The configuration key of the socket.
        key: &'static str,
        /// The socket path.
        path: String,
    },
    /// The directory is not trusted (see [`crate::own_dir`]).
    #[error("{key}: directory")]
    Directory {
        /// The configuration key of the socket.
        key: &'static str,
        /// Why.
        #[source]
        source: crate::DirError,
    },
    /// A process already serves on the socket.
    #[error("{key}: {path} is in use by a running daemon")]
    InUse {
        /// The configuration key of the socket.
        key: &'static str,
        /// The socket path.
        path: String,
    },
    /// Removing a stale socket, binding or setting the mode failed.
    #[error("{key}: cannot {what} {path}")]
    Io {
        /// The configuration key of the socket.
        key: &'static str,
        /// The step that failed.
        what: &'static str,
        /// The socket path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the Unix socket of a gRPC server the same way in every daemon: its directory created with
/// `dir_mode` and checked with every ancestor (owned by root or us, no shared directory on the way,
/// see [`crate::own_dir`]), a stale socket file replaced (a live one refused), the socket given
/// `sock_mode`. `key` is the configuration key, named in errors.
pub fn bind_unix(
    key: &'static str,
    path: &Path,
    dir_mode: u32,
    sock_mode: u32,
) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = || path.display().to_string();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| BindError::NoDirectory { key, path: shown() })?;
    crate::own_dir(dir, dir_mode).map_err(|source| BindError::Directory { key, source })?;
    let io = |what, source| BindError::Io {
        key,
        what,
        path: shown(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse { key, path: shown() });
        }
        std::fs::remove_file(path).map_err(|e| io("remove stale", e))?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(sock_mode))
        .map_err(|e| io("chmod", e))?;
    Ok(l)
}

/// Whether the daemon serves: false until every listener has been bound and its server started,
/// false again once draining begins. Health checks and the "ready" log line follow it.
#[derive(Debug, Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Marks the daemon ready (call once its servers run).
    pub fn set_ready(&self) {
        self.tx.send_replace(true);
    }

    /// Marks the daemon not ready (draining).
    pub fn set_not_ready(&self) {
        self.tx.send_replace(false);
    }

    /// Whether the daemon serves now.
    pub fn is_ready(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver that sees every change of readiness.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Waits until the daemon is ready.
    pub async fn wait_ready(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Waits for `served` (a server told to stop accepting, finishing its in-flight calls) for at most
/// `timeout`. Returns false if calls were still running at the deadline (they are then dropped).
pub async fn drain<F: Future>(what: &str, served: F, timeout: Duration) -> Option<F::Output> {
    match tokio::time::timeout(timeout, served).await {
        Ok(out) => {
            tracing::info!(what, "drained");
            Some(out)
        }
        Err(_) => {
            tracing::warn!(
                what,
                timeout_ms = timeout.as_millis() as u64,
                "drain timeout reached; ending the calls still in flight"
            );
            None
        }
    }
}

/// Parses a `drain_timeout` value (e.g. `10s`, `500ms`, `2m`; 0 ends in-flight calls at once).
pub fn parse_drain_timeout(value: &str) -> Result<Duration, String> {
    let (num, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| value.split_at(i))
        .unwrap_or((value, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| "want a whole number with ms, s or m (e.g. 10s)".to_string())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" if n <= 60 => Ok(Duration::from_secs(n * 60)),
        "m" => Err("at most 60m".to_string()),
        _ => Err("want a whole number with ms, s or m (e.g. 10s)".to_string()),
    }
}

/// What a daemon creates once at start and passes down to its servers and subsystems.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// Whether the daemon serves.
    pub ready: Readiness,
    /// The one metrics registry.
    pub metrics: Metrics,
}

/// The daemon's one Prometheus registry, created at start and passed down: each subsystem registers
/// its metrics under its own prefix (e.g. `sigil_agent`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<prometheus_client::registry::Registry>>,
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `metric` as `<prefix>_<name>` (a counter also gets `_total`).
    pub fn register(
        &self,
        prefix: &str,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut r = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.sub_registry_with_prefix(prefix)
            .register(name, help, metric);
    }

    /// Registers a collector (metrics computed at scrape time) under `prefix`.
    pub fn register_collector(
        &self,
        prefix: &str,
        collector: impl prometheus_client::collector::Collector,
    ) {
        let mut r = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.sub_registry_with_prefix(prefix)
            .register_collector(Box::new(collector));
    }

    /// Registers `metric` under its full `name` (no prefix added; for names another project
    /// defined, such as Hubble's `hubble_flows_processed`).
    pub fn register_unprefixed(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut r = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.register(name, help, metric);
    }

    /// The OpenMetrics text format of every registered metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let r = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_counter_is_encoded_under_its_prefix() {
        use prometheus_client::metrics::counter::Counter;
        let m = Metrics::new();
        let c: Counter = Counter::default();
        m.register("sigil_agent", "svids_minted", "SVIDs minted", c.clone());
        c.inc_by(3);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("# TYPE sigil_agent_svids_minted counter"),
            "{text}"
        );
        assert!(text.contains("sigil_agent_svids_minted_total 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn readiness_starts_false_and_follows_the_daemon() {
        let r = Readiness::new();
        assert!(!r.is_ready());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        r.set_ready();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert!(r.is_ready());
        r.set_not_ready();
        assert!(!r.is_ready());
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_work_up_to_the_timeout() {
        let quick = drain("t", async { 7 }, Duration::from_secs(1)).await;
        assert_eq!(quick, Some(7));
        let slow = drain(
            "t",
            tokio::time::sleep(Duration::from_secs(60)),
            Duration::from_millis(20),
        )
        .await;
        assert!(slow.is_none());
        assert_eq!(parse_drain_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_drain_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_drain_timeout("3"), Ok(Duration::from_secs(3)));
        assert!(parse_drain_timeout("soon").is_err());
        assert!(parse_drain_timeout("5h").is_err());
    }

    #[tokio::test]
    async fn bind_unix_replaces_a_stale_socket_and_refuses_a_live_one() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("run/api.sock");
        let l = bind_unix("api_socket", &path, 0o700, 0o600).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = bind_unix("api_socket", &path, 0o700, 0o600).expect_err("live");
        assert!(e.to_string().starts_with("api_socket: "), "{e}");
        assert!(matches!(e, BindError::InUse { .. }));
        drop(l);
        // The file remains after the listener is gone: a stale socket, replaced.
        assert!(path.exists());
        bind_unix("api_socket", &path, 0o700, 0o600).expect("rebind over stale");
        // A shared directory is refused, naming the key.
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = bind_unix("socket_path", &shared.join("s.sock"), 0o700, 0o600).expect_err("shared");
        assert!(
            matches!(
                e,
                BindError::Directory {
                    key: "socket_path",
                    ..
                }
            ),
            "{e}"
        );
    }
}
