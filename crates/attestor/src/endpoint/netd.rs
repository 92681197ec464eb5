//! `NetdLookup`: asks sigil-netd's `GetEndpointByNetns` over its Unix socket, from the attestor's blocking
//! task, bounded by a timeout.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::endpoints_client::EndpointsClient;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{EndpointInfo, EndpointLookup, LookupError, NetnsId};

/// How long one lookup may take, connecting included, before the caller is attested without it.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A client of netd's endpoint API. The connection is made on first use and remade after netd restarts;
/// each (re)connection checks that the socket and the process serving it belong to root or to this user
/// (`sigil_daemon::connect_trusted`), so another local user cannot pose as netd.
#[derive(Debug, Clone)]
pub struct NetdLookup {
    socket: PathBuf,
    channel: Channel,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl NetdLookup {
    /// A client of the netd socket at `socket`, running its calls on `runtime` (the agent's).
    pub fn new(socket: impl Into<PathBuf>, runtime: tokio::runtime::Handle) -> Self {
        let socket = socket.into();
        let path = socket.clone();
        // The URI only satisfies tonic's builder: the connector dials the socket whatever it says.
        let channel = {
            let _entered = runtime.enter();
            Endpoint::from_static("http://[::]:50051")
                .connect_timeout(DEFAULT_LOOKUP_TIMEOUT)
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = sigil_daemon::connect_trusted(&path)
                            .await
                            .map_err(std::io::Error::other)?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
        };
        NetdLookup {
            socket,
            channel,
            runtime,
            timeout: DEFAULT_LOOKUP_TIMEOUT,
        }
    }

    /// Sets the bound on one lookup.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket this client asks.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn ask(
        mut client: EndpointsClient<Channel>,
        netns: NetnsId,
    ) -> Result<Option<EndpointInfo>, tonic::Status> {
        let req = pb::GetEndpointByNetnsRequest {
            netns_dev: netns.dev,
            netns_ino: netns.ino,
        };
        match client.get_endpoint_by_netns(req).await {
            Ok(r) => {
                let e = r.into_inner();
                Ok(Some(EndpointInfo {
                    name: e.name,
                    selectors: e.selectors,
                }))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }
}

impl EndpointLookup for NetdLookup {
    /// Runs the call on the agent's runtime and waits for it here. Waiting on a channel rather than
    /// `block_on` keeps this safe to call from any thread; the attestor runs in `spawn_blocking`.
    fn by_netns(&self, netns: NetnsId) -> Result<Option<EndpointInfo>, LookupError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let client = EndpointsClient::new(self.channel.clone());
        let timeout = self.timeout;
        let task = self.runtime.spawn(async move {
            let r = tokio::time::timeout(timeout, Self::ask(client, netns)).await;
            let _ = tx.send(r);
        });
        let timed_out = || LookupError::Timeout {
            socket: self.socket.clone(),
            timeout,
        };
        // A little beyond the task's own bound, in case the runtime is too busy to run the timer on time.
        let answer = rx.recv_timeout(timeout + Duration::from_millis(500));
        task.abort();
        match answer {
            Ok(Ok(Ok(found))) => Ok(found),
            Ok(Ok(Err(status))) => Err(LookupError::Unreachable {
                socket: self.socket.clone(),
                reason: describe(&status),
            }),
            Ok(Err(_)) | Err(_) => Err(timed_out()),
        }
    }
}

/// A failed call in one line: tonic's transport errors say only "transport error" at the top, so the
/// innermost cause is shown with the code.
fn describe(status: &tonic::Status) -> String {
    let mut innermost = None;
    let mut cur = std::error::Error::source(status);
    while let Some(c) = cur {
        innermost = Some(c.to_string());
        cur = c.source();
    }
    let text = innermost.unwrap_or_else(|| status.message().to_string());
    format!("{:?}: {text}", status.code())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let lookup = NetdLookup::new(
            dir.path().join("netd.sock"),
            tokio::runtime::Handle::current(),
        );
        let err = tokio::task::spawn_blocking(move || lookup.by_netns(NetnsId { dev: 0, ino: 1 }))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LookupError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains("netd.sock"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_netd_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netd.sock");
        // Accepts connections and never answers.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let lookup = NetdLookup::new(&path, tokio::runtime::Handle::current())
            .with_timeout(Duration::from_millis(300));
        let start = std::time::Instant::now();
        let err = tokio::task::spawn_blocking(move || lookup.by_netns(NetnsId { dev: 0, ino: 1 }))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LookupError::Timeout { .. }), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        hold.abort();
    }
}
