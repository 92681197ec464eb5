//! Accepting connections without spinning or flooding the log: back-off after accept errors,
//! rate-limited warnings, the open-file limit raised at start-up, and a TCP acceptor that runs each
//! handshake (TLS) in its own task with a timeout and a cap on handshakes in progress.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

/// First pause after an accept error.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after repeated accept errors.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Default bound on one handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on handshakes in progress.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 256;
/// Default cap on handshakes in progress from one source address.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 32;
/// Default cap on open connections (handshaking or established) from one source address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 128;
/// At most one warning of a kind per this interval; the rest are counted.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Length of the kernel's queue of connections not yet accepted (tokio's default is 128).
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a TCP listener with a backlog of [`LISTEN_BACKLOG`], so that a burst of connections waits
/// in the kernel instead of being refused while the accept loop catches up.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the open-file soft limit to the hard limit: every connection holds a descriptor. Returns
/// the soft limit in effect afterwards.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The open-file soft limit now (1024 if it cannot be read).
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Whether an accept error means the process or system ran out of something (descriptors, buffers,
/// memory): retrying at once would only spin.
pub fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

/// Exponential back-off after accept errors: 10 ms doubling to 1 s, reset by a successful accept.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The pause to take now; the next one is twice as long (up to [`BACKOFF_MAX`]).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    /// Back to the shortest pause.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Lets one log line through per interval and counts the ones held back.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// A limiter letting one line through per `interval`.
    pub fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be written now (`n` lines were held back since the last one), else
    /// `None` (this line is counted).
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A rate-limited warning shared by tasks.
#[derive(Debug, Clone)]
struct Warn(Arc<Mutex<RateLimit>>);

impl Warn {
    fn new() -> Self {
        Warn(Arc::new(Mutex::new(RateLimit::new(LOG_INTERVAL))))
    }

    fn allow(&self) -> Option<u64> {
        // A poisoned lock only means a panicking logger: keep counting with its state.
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.allow()
    }
}

/// Accepts on a Unix listener for tonic's `serve_with_incoming`: after an error it backs off (see
/// [`Backoff`]) and logs at most one warning per second with the count of suppressed ones. The loop
/// ends when the returned stream is dropped.
pub fn unix_incoming(
    listener: UnixListener,
    what: &'static str,
) -> impl Stream<Item = std::io::Result<UnixStream>> + Send + 'static {
    unix_incoming_with(listener, what, |s| s)
}

/// [`unix_incoming`] that runs `on_accept` on each connection inside the accept loop, right after
/// `accept()` returns and before the connection waits for tonic to pull it: what it records about
/// the peer (credentials, pidfd, executable) is as close to `connect()` as the server gets.
pub fn unix_incoming_with<T, F>(
    listener: UnixListener,
    what: &'static str,
    on_accept: F,
) -> impl Stream<Item = std::io::Result<T>> + Send + 'static
where
    T: Send + 'static,
    F: Fn(UnixStream) -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut limit = RateLimit::new(LOG_INTERVAL);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            match accepted {
                Ok((s, _)) => {
                    backoff.reset();
                    if tx.send(Ok(on_accept(s))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    if let Some(suppressed) = limit.allow() {
                        tracing::warn!(api = what, error = %e, suppressed, "accept failed; backing off");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Bounds on the handshakes of a [`handshake_incoming`] listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// A connection whose handshake has not completed by then is closed.
    pub timeout: Duration,
    /// Most handshakes in progress; at the cap one of the source holding the most is dropped.
    pub max_pending: usize,
    /// Most handshakes in progress from one source; at the cap that source's oldest is dropped.
    pub max_pending_per_source: usize,
    /// Most open connections (handshaking or established) from one source; more are closed at once.
    pub max_connections_per_source: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        }
    }
}

impl HandshakeLimits {
    /// The limits with `max_pending` lowered to a quarter of the open-file limit, so that
    /// half-open connections can never take the descriptors that the other sockets and files need.
    pub fn within_fd_limit(self, nofile: u64) -> Self {
        let quarter = usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(1);
        let max_pending = self.max_pending.min(quarter);
        HandshakeLimits {
            max_pending,
            max_pending_per_source: self.max_pending_per_source.min(max_pending),
            ..self
        }
    }
}

/// The source a connection is accounted to: its IPv4 address, or the /64 of its IPv6 address (one
/// host usually holds a whole /64).
pub fn source_of(addr: &SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Open connections per source, shared by the accept loop and the [`SourceGuard`]s.
type SourceCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One open connection counted against its source's `max_connections_per_source`; the count drops
/// when the guard does. [`handshake_incoming`] hands one to each handshake: keep it in the stream
/// type that carries the connection (so it lives exactly as long as the connection).
#[derive(Debug)]
pub struct SourceGuard {
    counts: SourceCounts,
    source: IpAddr,
}

impl SourceGuard {
    /// Counts a connection from `source` unless it already has `max` open: then `None`.
    fn try_new(counts: &SourceCounts, source: IpAddr, max: usize) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(source).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            counts: counts.clone(),
            source,
        })
    }

    /// The source the connection is counted against.
    pub fn source(&self) -> IpAddr {
        self.source
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.source);
            }
        }
    }
}

/// Handshakes in progress, oldest first, and which source each came from, so that the one to drop
/// can be taken from the source holding the most.
#[derive(Default)]
struct Pending {
    next_id: u64,
    tasks: BTreeMap<u64, (tokio::task::AbortHandle, IpAddr)>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
}

impl Pending {
    fn insert(&mut self, id: u64, task: tokio::task::AbortHandle, source: IpAddr) {
        self.tasks.insert(id, (task, source));
        self.by_source.entry(source).or_default().insert(id);
    }

    fn remove(&mut self, id: u64) -> Option<tokio::task::AbortHandle> {
        let (task, source) = self.tasks.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(task)
    }

    fn count(&self, source: &IpAddr) -> usize {
        self.by_source.get(source).map_or(0, BTreeSet::len)
    }

    /// Drops the oldest handshake of `source`; false if it has none.
    fn evict_oldest_of(&mut self, source: &IpAddr) -> bool {
        let oldest = self
            .by_source
            .get(source)
            .and_then(|ids| ids.first().copied());
        match oldest.and_then(|id| self.remove(id)) {
            Some(t) => {
                t.abort();
                true
            }
            None => false,
        }
    }

    /// Drops the oldest handshake of the source holding the most (so a flood from one source
    /// evicts its own handshakes, not everyone's); false if there is none.
    fn evict_from_largest(&mut self) -> bool {
        let largest = self
            .by_source
            .iter()
            .max_by_key(|(_, ids)| ids.len())
            .map(|(s, _)| *s);
        largest.is_some_and(|s| self.evict_oldest_of(&s))
    }
}

/// Accepts TCP connections on `listener` and runs `handshake` on each in its own task, yielding the
/// completed streams (for tonic's `serve_with_incoming`).
///
/// The accept loop never spins: after an error it backs off (10 ms doubling to 1 s); when the process
/// is out of descriptors it first drops a handshake in progress (of the source holding the most) to
/// free one. A handshake that does not complete within `limits.timeout` is closed. Sources (IPv4
/// address, IPv6 /64) are accounted separately: one source has at most
/// `limits.max_pending_per_source` handshakes in progress (beyond that its own oldest is dropped) and
/// at most `limits.max_connections_per_source` connections open, handshaking or established (beyond
/// that new ones are closed at once); the [`SourceGuard`] given to `handshake` holds the connection's
/// place and must travel with the stream it returns. At most `limits.max_pending` handshakes run at
/// once: beyond that one of the source holding the most is dropped, so a flood from a few sources
/// cannot keep other clients waiting. Accept, refusal and handshake failures are logged at most once a
/// second each, with the count of the ones suppressed. The loop ends when the returned stream is
/// dropped.
pub fn handshake_incoming<S, E, F, Fut>(
    listener: TcpListener,
    limits: HandshakeLimits,
    what: &'static str,
    handshake: F,
) -> impl Stream<Item = std::io::Result<S>> + Send + 'static
where
    S: Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Fn(TcpStream, SocketAddr, SourceGuard) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S, E>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<S>>(64);
    let max_pending = limits.max_pending.max(1);
    let per_source = limits.max_pending_per_source.max(1);
    let max_conns = limits.max_connections_per_source.max(1);
    tokio::spawn(async move {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let counts = SourceCounts::default();
        let accept_warn = Warn::new();
        let refuse_warn = Warn::new();
        let evict_warn = Warn::new();
        let handshake_warn = Warn::new();
        let mut backoff = Backoff::default();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            let (sock, addr) = match accepted {
                Ok(x) => {
                    backoff.reset();
                    x
                }
                Err(e) => {
                    let freed = is_resource_error(&e)
                        && pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .evict_from_largest();
                    if let Some(suppressed) = accept_warn.allow() {
                        tracing::warn!(api = what, error = %e, suppressed, freed_oldest_handshake = freed, "accept failed; backing off");
                    }
                    let delay = if freed {
                        BACKOFF_MIN
                    } else {
                        backoff.next_delay()
                    };
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let source = source_of(&addr);
            let Some(guard) = SourceGuard::try_new(&counts, source, max_conns) else {
                drop(sock);
                if let Some(suppressed) = refuse_warn.allow() {
                    tracing::warn!(api = what, peer = %addr, %source, max_connections_per_source = max_conns, suppressed, "too many connections from one source; closed the new one");
                }
                continue;
            };
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            let dropped = if p.count(&source) >= per_source {
                p.evict_oldest_of(&source).then_some("the source's oldest")
            } else if p.tasks.len() >= max_pending {
                p.evict_from_largest()
                    .then_some("the oldest of the source with the most")
            } else {
                None
            };
            if let Some(which) = dropped
                && let Some(suppressed) = evict_warn.allow()
            {
                tracing::warn!(
                    api = what,
                    %source,
                    max_pending,
                    max_pending_per_source = per_source,
                    suppressed,
                    "too many handshakes in progress; dropped {which}"
                );
            }
            let id = p.next_id;
            p.next_id += 1;
            let fut = handshake(sock, addr, guard);
            let tx = tx.clone();
            let pending_t = pending.clone();
            let warn = handshake_warn.clone();
            let timeout = limits.timeout;
            // The task removes itself from `pending` under the lock, so it cannot run before it is
            // inserted below (the lock is held until then).
            let task = tokio::spawn(async move {
                let outcome = tokio::time::timeout(timeout, fut).await;
                pending_t
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                match outcome {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        if let Some(suppressed) = warn.allow() {
                            tracing::warn!(api = what, peer = %addr, error = %e, suppressed, "handshake failed");
                        }
                    }
                    Err(_) => {
                        if let Some(suppressed) = warn.allow() {
                            tracing::warn!(api = what, peer = %addr, timeout = ?timeout, suppressed, "handshake timed out; connection closed");
                        }
                    }
                }
            });
            p.insert(id, task.abort_handle(), source);
            drop(p);
        }
        // The stream was dropped: stop the handshakes still running.
        let p = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (t, _) in p.tasks.values() {
            t.abort();
        }
    });
    ReceiverStream::new(rx)
}
