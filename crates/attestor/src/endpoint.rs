//! `EndpointAttestor`: the selectors of the sigil-netd endpoint whose network namespace the caller is in,
//! in SPIRE's k8s spellings (`k8s:ns:default`, `k8s:pod-name:frontend`...), found by asking netd as SPIRE's
//! k8s attestor asks the kubelet for the caller's pod.

mod netd;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::proc::ProcDir;
use crate::{AttestError, PeerIdentity, Selector, WorkloadAttestor};

pub use netd::{DEFAULT_LOOKUP_TIMEOUT, NetdLookup};

/// The selector kind this attestor produces; anything else an endpoint lookup returns is dropped.
const KIND: &str = "k8s";

/// How often a failing lookup is logged at `warn` (the rest at `debug`, counted in the next warning).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A network namespace: device and inode of its nsfs file (`/proc/<pid>/ns/net`, `/run/netns/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// Device of the nsfs file.
    pub dev: u64,
    /// Inode of the nsfs file (the namespace's number while it exists).
    pub ino: u64,
}

impl NetnsId {
    /// The namespace of the nsfs file (or bind mount of one) at `path`.
    pub fn of_path(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// An endpoint as the attestor needs it: its name (for logs) and its selectors as netd spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint name.
    pub name: String,
    /// Selectors, `kind:value`.
    pub selectors: Vec<String>,
}

/// Why an endpoint lookup gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// netd could not be reached or refused the call.
    #[error("netd at {}: {reason}", socket.display())]
    Unreachable { socket: PathBuf, reason: String },
    /// netd did not answer in time.
    #[error("netd at {}: no answer within {timeout:?}", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
}

/// Finds the endpoint that owns a network namespace. Blocking: called from the attestor's blocking task.
pub trait EndpointLookup: Send + Sync {
    /// The endpoint whose namespace is `netns`, `None` when no endpoint owns it.
    fn by_netns(&self, netns: NetnsId) -> Result<Option<EndpointInfo>, LookupError>;
}

/// Attests a caller by the endpoint its network namespace belongs to.
///
/// It can only add `k8s:` selectors, and only for a caller inside an endpoint: a caller in the agent's own
/// network namespace gets none (no lookup), and when netd is unreachable, slow or owns no such namespace,
/// the caller gets none either and keeps the selectors of the other attestors. A missing selector can only
/// match fewer entries, so every failure here gives a caller fewer SVIDs, never more.
pub struct EndpointAttestor<L> {
    lookup: L,
    proc_root: PathBuf,
    host_netns: NetnsId,
    warned: Mutex<WarnState>,
}

#[derive(Default)]
struct WarnState {
    last: Option<Instant>,
    suppressed: u64,
}

impl<L: EndpointLookup> EndpointAttestor<L> {
    /// An attestor asking `lookup`; the host namespace is the one this process is in.
    pub fn new(lookup: L) -> Result<Self, AttestError> {
        let path = PathBuf::from("/proc/self/ns/net");
        let host_netns = NetnsId::of_path(&path).map_err(|cause| AttestError::Proc {
            pid: std::process::id() as i32,
            op: "reading",
            path,
            cause,
        })?;
        Ok(EndpointAttestor {
            lookup,
            proc_root: PathBuf::from(crate::peer::PROC_ROOT),
            host_netns,
            warned: Mutex::new(WarnState::default()),
        })
    }

    /// Treats `netns` as the host's namespace (whose processes are not looked up) instead of the agent's own.
    pub fn with_host_netns(mut self, netns: NetnsId) -> Self {
        self.host_netns = netns;
        self
    }

    /// Logs a failed lookup at `warn` at most every [`WARN_EVERY`]: a netd that is down would otherwise
    /// log once per Workload API call.
    fn warn_limited(&self, pid: i32, netns: NetnsId, error: &LookupError) {
        let now = Instant::now();
        let Ok(mut w) = self.warned.lock() else {
            return;
        };
        if w.last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            w.suppressed += 1;
            tracing::debug!(pid, %error, "endpoint lookup failed; no k8s selectors for the caller");
            return;
        }
        tracing::warn!(
            pid,
            netns_dev = netns.dev,
            netns_ino = netns.ino,
            %error,
            suppressed = w.suppressed,
            "endpoint lookup failed; the caller gets no k8s selectors (only unix ones) until netd answers"
        );
        w.last = Some(now);
        w.suppressed = 0;
    }
}

impl<L: EndpointLookup> WorkloadAttestor for EndpointAttestor<L> {
    /// The `k8s:` selectors of the caller's endpoint, sorted; empty outside endpoints or without netd.
    fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError> {
        let pid = peer.pid;
        if peer.pidfd().is_none() {
            return Err(AttestError::NoPidfd { pid });
        }
        // The same order as `UnixAttestor::attest`: open `/proc/<pid>`, then check the pidfd, so the
        // directory is the peer's and not a later process's that reused the PID; check again after the
        // read so that a read from a dying process is reported as its exit.
        let dir = ProcDir::open(&self.proc_root, pid);
        peer.ensure_alive()?;
        let netns = dir.and_then(|d| d.netns());
        peer.ensure_alive()?;
        let netns = netns?;
        if netns == self.host_netns {
            return Ok(Vec::new());
        }
        let endpoint = match self.lookup.by_netns(netns) {
            Ok(Some(e)) => e,
            Ok(None) => {
                tracing::debug!(
                    pid,
                    netns_ino = netns.ino,
                    "caller's netns is no endpoint's"
                );
                return Ok(Vec::new());
            }
            Err(e) => {
                self.warn_limited(pid, netns, &e);
                return Ok(Vec::new());
            }
        };
        let mut out = Vec::with_capacity(endpoint.selectors.len());
        for text in &endpoint.selectors {
            match Selector::parse(text) {
                // netd is trusted for its endpoints' k8s facts only: it cannot hand out unix: or other kinds.
                Ok(s) if s.kind == KIND => out.push(s),
                Ok(_) => tracing::warn!(
                    endpoint = endpoint.name,
                    selector = text,
                    "endpoint selector of another kind than k8s ignored"
                ),
                Err(e) => tracing::warn!(
                    endpoint = endpoint.name,
                    error = %e,
                    "invalid endpoint selector ignored"
                ),
            }
        }
        // The answer is about the namespace read while the caller was alive; a caller gone meanwhile gets
        // nothing.
        peer.ensure_alive()?;
        out.sort();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A lookup that answers from a fixed result and counts its calls.
    struct Fake {
        answer: fn(NetnsId) -> Result<Option<EndpointInfo>, LookupError>,
        calls: AtomicUsize,
    }

    impl EndpointLookup for Fake {
        fn by_netns(&self, netns: NetnsId) -> Result<Option<EndpointInfo>, LookupError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            (self.answer)(netns)
        }
    }

    fn fake(answer: fn(NetnsId) -> Result<Option<EndpointInfo>, LookupError>) -> Fake {
        Fake {
            answer,
            calls: AtomicUsize::new(0),
        }
    }

    fn me() -> PeerIdentity {
        PeerIdentity::from_pid(std::process::id() as i32).unwrap()
    }

    /// A namespace no process is in, so that this process counts as inside an endpoint.
    const ELSEWHERE: NetnsId = NetnsId { dev: 0, ino: 1 };

    fn own_netns() -> NetnsId {
        NetnsId::of_path(Path::new("/proc/self/ns/net")).unwrap()
    }

    fn frontend(netns: NetnsId) -> Result<Option<EndpointInfo>, LookupError> {
        // Answers only for this process's namespace, so the test shows the attestor asked about it.
        if netns != NetnsId::of_path(Path::new("/proc/self/ns/net")).unwrap() {
            return Ok(None);
        }
        Ok(Some(EndpointInfo {
            name: "frontend".into(),
            selectors: vec![
                "k8s:pod-name:frontend".into(),
                "k8s:ns:default".into(),
                "unix:uid:0".into(),
                "k8s:".into(),
            ],
        }))
    }

    #[test]
    fn host_netns_callers_are_not_looked_up() {
        let a = EndpointAttestor::new(fake(frontend)).unwrap();
        assert_eq!(a.host_netns, own_netns());
        assert!(a.attest(&me()).unwrap().is_empty());
        assert_eq!(a.lookup.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn endpoint_callers_get_only_its_k8s_selectors() {
        let a = EndpointAttestor::new(fake(frontend))
            .unwrap()
            .with_host_netns(ELSEWHERE);
        let got: Vec<String> = a
            .attest(&me())
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        // `unix:uid:0` from netd and the invalid `k8s:` are dropped.
        assert_eq!(got, ["k8s:ns:default", "k8s:pod-name:frontend"]);
        assert_eq!(a.lookup.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn not_found_gives_no_selectors() {
        let a = EndpointAttestor::new(fake(|_| Ok(None)))
            .unwrap()
            .with_host_netns(ELSEWHERE);
        assert!(a.attest(&me()).unwrap().is_empty());
        assert_eq!(a.lookup.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn unreachable_or_slow_netd_gives_no_selectors() {
        for answer in [
            (|_| {
                Err(LookupError::Unreachable {
                    socket: "/nonexistent".into(),
                    reason: "connection refused".into(),
                })
            }) as fn(NetnsId) -> _,
            |_| {
                Err(LookupError::Timeout {
                    socket: "/nonexistent".into(),
                    timeout: Duration::from_secs(1),
                })
            },
        ] {
            let a = EndpointAttestor::new(fake(answer))
                .unwrap()
                .with_host_netns(ELSEWHERE);
            // Twice: the second failure is within the warning interval and counted, not logged at warn.
            for _ in 0..2 {
                assert!(a.attest(&me()).unwrap().is_empty());
            }
            assert_eq!(a.lookup.calls.load(Ordering::SeqCst), 2);
            assert_eq!(a.warned.lock().unwrap().suppressed, 1);
        }
    }

    #[test]
    fn a_caller_that_exited_is_refused_not_looked_up() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let peer = PeerIdentity::from_pid(child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let a = EndpointAttestor::new(fake(frontend))
            .unwrap()
            .with_host_netns(ELSEWHERE);
        let err = a.attest(&peer).unwrap_err();
        assert!(
            matches!(err, AttestError::ProcessExited { pid } if pid == peer.pid),
            "{err:?}"
        );
        assert_eq!(a.lookup.calls.load(Ordering::SeqCst), 0);
    }
}
