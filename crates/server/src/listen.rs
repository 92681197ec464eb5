//! Listeners: the admin Unix socket in a 0700 directory, and the TLS 1.3 acceptor for the agent API.

use std::path::Path;
use std::sync::Arc;

use futures::Stream;
use sigil_daemon::accept::{HandshakeLimits, SourceGuard, handshake_incoming};
use sigil_tls::{PeerPolicy, SpiffeClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::agent_api::PeerInfo;
use crate::state::State;

/// Binds the admin socket: the directory is made 0700, a stale socket file is replaced, the socket is
/// 0600 (see [`sigil_daemon::bind_unix`]).
pub fn admin_listener(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    Ok(sigil_daemon::bind_unix("admin_socket", path, 0o700, 0o600)?)
}

/// The agent API's TLS acceptor and the bounds on its handshakes.
#[derive(Clone)]
pub struct AgentApiTls {
    /// TLS 1.3, the server's SVID, client SVIDs optional.
    pub acceptor: TlsAcceptor,
    /// Handshake timeout and cap on handshakes in progress (the cap kept within the open-file limit).
    pub limits: HandshakeLimits,
}

/// The TLS acceptor: TLS 1.3, the server's SVID, client SVIDs optional (attestation is anonymous).
pub fn tls_acceptor(state: &Arc<State>) -> anyhow::Result<AgentApiTls> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        state.bundles.clone(),
        PeerPolicy::AnyInBundles,
        false,
    ));
    let cfg = sigil_tls::server_config_with_resolver(state.server_cert.clone(), verifier)?;
    Ok(AgentApiTls {
        acceptor: TlsAcceptor::from(Arc::new(cfg)),
        limits: state
            .config
            .handshake_limits
            .within_fd_limit(sigil_daemon::accept::fd_limit()),
    })
}

/// A TLS connection that tells tonic who the peer is, holding its place in its source's connection
/// count until it is closed.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    _source: SourceGuard,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, each bounded by the handshake
/// timeout, at most `limits.max_pending` at once, with per-source caps on handshakes and open
/// connections (see [`sigil_daemon::accept::handshake_incoming`]).
pub fn tls_incoming(
    tcp: TcpListener,
    tls: AgentApiTls,
) -> impl Stream<Item = Result<PeerStream, std::io::Error>> {
    let acceptor = tls.acceptor;
    handshake_incoming(tcp, tls.limits, "agent API", move |sock, addr, source| {
        let acceptor = acceptor.clone();
        async move {
            let _ = sock.set_nodelay(true);
            let stream = acceptor.accept(sock).await?;
            let certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let info = PeerInfo {
                certs: Arc::new(certs),
                addr: Some(addr),
            };
            Ok::<_, std::io::Error>(PeerStream {
                inner: stream,
                info,
                _source: source,
            })
        }
    })
}
