//! A client of SPIRE's Delegated Identity API (sigil-agent's admin socket, or a SPIRE agent's):
//! X.509-SVIDs for a selector set and the X.509 bundles, each as a watch that reconnects with
//! backoff and reports every answer and every failure, apart from what the caller does with them
//! (the stream, not its wiring, as linkerd2-proxy's spire-client).
//!
//! Keys stay in memory: [`PrivateKey`] has no `Display` and its `Debug` prints `<redacted>`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sigil_proto::spire::api::agent::delegatedidentity::v1 as dpb;
use sigil_proto::spire::api::types as tpb;
use sigil_registry::Selector;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

/// First wait after a failed subscription; doubled up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two subscription attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What went wrong talking to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The agent refused the caller: it is not an authorized delegate.
    #[error("the agent at {socket} refused the call: {message}")]
    PermissionDenied {
        /// The agent's socket.
        socket: String,
        /// The agent's message.
        message: String,
    },
    /// The agent cannot be reached (no socket, refused, or the socket's owner is not trusted).
    #[error("the agent at {socket} is unreachable: {cause}")]
    Unreachable {
        /// The agent's socket.
        socket: String,
        /// Why.
        cause: String,
    },
    /// The agent answered with another error, or the stream ended.
    #[error("the agent at {socket} failed the call: {message}")]
    Failed {
        /// The agent's socket.
        socket: String,
        /// Its status and message.
        message: String,
    },
    /// The agent sent an SVID that does not hold a valid SPIFFE ID.
    #[error("the agent at {socket} sent an SVID with an invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSvid {
        /// The agent's socket.
        socket: String,
        /// The ID as sent.
        id: String,
        /// Why it is refused.
        reason: String,
    },
}

impl Error {
    fn from_status(socket: &Path, s: &tonic::Status) -> Self {
        let socket = socket.display().to_string();
        match s.code() {
            tonic::Code::PermissionDenied => Self::PermissionDenied {
                socket,
                message: s.message().to_owned(),
            },
            tonic::Code::Unavailable => Self::Unreachable {
                socket,
                cause: root_cause(s),
            },
            code => Self::Failed {
                socket,
                message: format!("{code:?}: {}", s.message()),
            },
        }
    }
}

/// The innermost error of a status (tonic's own layers only say "transport error").
fn root_cause(s: &tonic::Status) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = s;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let inner = cur.to_string();
    if inner == s.to_string() {
        s.message().to_owned()
    } else {
        inner
    }
}

/// A private key (PKCS#8 DER) held in memory only; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Vec<u8>);

impl PrivateKey {
    /// The PKCS#8 DER bytes.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// One X.509-SVID with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    /// The SPIFFE ID.
    pub spiffe_id: sigil_spiffe::SpiffeId,
    /// Leaf first, DER.
    pub cert_chain: Vec<Vec<u8>>,
    /// Its key.
    pub key: PrivateKey,
    /// NotAfter, Unix seconds.
    pub expires_at: i64,
    /// The entry's hint (may be empty).
    pub hint: String,
}

/// The X.509 bundles by trust-domain SPIFFE ID (`spiffe://td`), each the CA certificates' DER
/// concatenated, as the API sends them.
pub type Bundles = BTreeMap<String, Vec<u8>>;

/// One report of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update<T> {
    /// The agent's current answer, replacing the previous one.
    Current(T),
    /// A failed subscription or a broken stream; the watch retries after a backoff. The last
    /// answer still stands as far as the agent has said.
    Error(Error),
}

/// A client for one agent socket. Cheap to clone; connections are made (and their socket
/// checked: owner, directories, peer credentials) on use, and again after a failure.
#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
    channel: Channel,
    backoff: (Duration, Duration),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Client {
    /// A client of the Delegated Identity API at `socket`. Nothing is dialled yet. Call it
    /// within a tokio runtime (the channel's connection task is spawned on it).
    pub fn new(socket: &Path) -> Self {
        let path = socket.to_path_buf();
        // The URI only satisfies tonic's builder: the connector dials the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = sigil_daemon::connect_trusted(&path)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Self {
            socket: socket.to_path_buf(),
            channel,
            backoff: (INITIAL_BACKOFF, MAX_BACKOFF),
        }
    }

    /// The same client with other backoff bounds (first wait, longest wait).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max.max(initial));
        self
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn api(&self) -> dpb::delegated_identity_client::DelegatedIdentityClient<Channel> {
        dpb::delegated_identity_client::DelegatedIdentityClient::new(self.channel.clone())
    }

    /// Whether the agent serves this caller: opens the bundle stream and waits for its first
    /// answer. [`Error::PermissionDenied`] means the caller is not an authorized delegate.
    pub async fn check(&self) -> Result<(), Error> {
        let mut stream = self
            .api()
            .subscribe_to_x509_bundles(dpb::SubscribeToX509BundlesRequest {})
            .await
            .map_err(|s| Error::from_status(&self.socket, &s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(self.ended()),
            Err(s) => Err(Error::from_status(&self.socket, &s)),
        }
    }

    fn ended(&self) -> Error {
        Error::Failed {
            socket: self.socket.display().to_string(),
            message: "the stream ended".to_owned(),
        }
    }

    /// Watches the X.509-SVIDs the agent gives workloads with `selectors` (every entry they
    /// match, in the agent's order). Stops when the [`Watch`] is dropped.
    pub fn watch_x509_svids(&self, selectors: Vec<Selector>) -> Watch<Vec<X509Svid>> {
        let request = dpb::SubscribeToX509sviDsRequest {
            selectors: selectors
                .iter()
                .map(|s| tpb::Selector {
                    r#type: s.kind.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            pid: 0,
        };
        let client = self.clone();
        self.watch(move |tx| {
            let client = client.clone();
            let request = request.clone();
            async move {
                let mut stream = client
                    .api()
                    .subscribe_to_x509svi_ds(request)
                    .await?
                    .into_inner();
                while let Some(msg) = stream.message().await? {
                    let update = match svids(&client.socket, msg) {
                        Ok(v) => Update::Current(v),
                        Err(e) => Update::Error(e),
                    };
                    if tx.send(update).await.is_err() {
                        return Ok(());
                    }
                }
                Err(tonic::Status::unavailable("the stream ended"))
            }
        })
    }

    /// Watches the X.509 bundles. Stops when the [`Watch`] is dropped.
    pub fn watch_x509_bundles(&self) -> Watch<Bundles> {
        let client = self.clone();
        self.watch(move |tx| {
            let client = client.clone();
            async move {
                let mut stream = client
                    .api()
                    .subscribe_to_x509_bundles(dpb::SubscribeToX509BundlesRequest {})
                    .await?
                    .into_inner();
                while let Some(msg) = stream.message().await? {
                    let bundles: Bundles = msg.ca_certificates.into_iter().collect();
                    if tx.send(Update::Current(bundles)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(tonic::Status::unavailable("the stream ended"))
            }
        })
    }

    /// Runs `session` until the receiver goes, again after each failure with a doubling backoff
    /// (reset once a session has delivered something).
    fn watch<T, F, Fut>(&self, session: F) -> Watch<T>
    where
        T: Send + 'static,
        F: Fn(Sender<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
    {
        let (tx, rx) = mpsc::channel(8);
        let socket = self.socket.clone();
        let (initial, max) = self.backoff;
        let task = tokio::spawn(async move {
            let mut backoff = initial;
            loop {
                let delivered = Sender {
                    tx: tx.clone(),
                    sent: Default::default(),
                };
                let sent = std::sync::Arc::clone(&delivered.sent);
                let result = session(delivered).await;
                if tx.is_closed() {
                    return;
                }
                if sent.load(std::sync::atomic::Ordering::Relaxed) {
                    backoff = initial;
                }
                let err = match result {
                    Ok(()) => return,
                    Err(s) => Error::from_status(&socket, &s),
                };
                tracing::debug!(error = %err, retry_in = ?backoff, "delegated identity stream failed");
                if tx.send(Update::Error(err)).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max);
            }
        });
        Watch {
            rx,
            task: Some(task),
        }
    }
}

/// The sending side handed to one session; records whether it delivered anything.
struct Sender<T> {
    tx: mpsc::Sender<Update<T>>,
    sent: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Sender<T> {
    async fn send(&self, u: Update<T>) -> Result<(), ()> {
        self.sent.store(true, std::sync::atomic::Ordering::Relaxed);
        self.tx.send(u).await.map_err(|_| ())
    }
}

fn svids(socket: &Path, msg: dpb::SubscribeToX509sviDsResponse) -> Result<Vec<X509Svid>, Error> {
    let mut out = Vec::with_capacity(msg.x509_svids.len());
    for s in msg.x509_svids {
        let svid = s.x509_svid.unwrap_or_default();
        let id = svid.id.unwrap_or_default();
        let text = format!("spiffe://{}{}", id.trust_domain, id.path);
        let spiffe_id = sigil_spiffe::SpiffeId::parse(&text).map_err(|e| Error::InvalidSvid {
            socket: socket.display().to_string(),
            id: text.clone(),
            reason: e.to_string(),
        })?;
        out.push(X509Svid {
            spiffe_id,
            cert_chain: svid.cert_chain,
            key: PrivateKey(s.x509_svid_key),
            expires_at: svid.expires_at,
            hint: svid.hint,
        });
    }
    Ok(out)
}

/// A running watch: its reports, in order. Dropping it stops the task.
pub struct Watch<T> {
    rx: mpsc::Receiver<Update<T>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl<T> Watch<T> {
    /// The next report; `None` once the watch stopped.
    pub async fn next(&mut self) -> Option<Update<T>> {
        self.rx.recv().await
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_redacted_in_debug() {
        let svid = X509Svid {
            spiffe_id: sigil_spiffe::SpiffeId::parse("spiffe://td/a").expect("id"),
            cert_chain: vec![],
            key: PrivateKey(vec![0x30, 0x82, 0xAB, 0xCD]),
            expires_at: 1,
            hint: String::new(),
        };
        let shown = format!("{svid:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("171") && !shown.contains("205"), "{shown}");
    }

    #[test]
    fn an_invalid_spiffe_id_is_refused_with_the_id() {
        let msg = dpb::SubscribeToX509sviDsResponse {
            x509_svids: vec![dpb::X509svidWithKey {
                x509_svid: Some(tpb::X509svid {
                    id: Some(tpb::Spiffeid {
                        trust_domain: "Bad TD".into(),
                        path: "/x".into(),
                    }),
                    ..Default::default()
                }),
                x509_svid_key: vec![1],
            }],
            federates_with: vec![],
        };
        let e = svids(Path::new("/s"), msg).expect_err("invalid");
        assert!(e.to_string().contains("spiffe://Bad TD/x"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_agent_is_unreachable_and_retried() {
        let dir = std::env::temp_dir().join(format!("sigil-dc-{}", std::process::id()));
        let client = Client::new(&dir.join("none.sock"))
            .with_backoff(Duration::from_millis(10), Duration::from_millis(20));
        let e = client.check().await.expect_err("no agent");
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
        let mut w = client.watch_x509_svids(vec![]);
        for _ in 0..2 {
            match w.next().await {
                Some(Update::Error(Error::Unreachable { .. })) => {}
                other => panic!("want unreachable, got {other:?}"),
            }
        }
    }
}
