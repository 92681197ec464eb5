//! Accepted Unix streams that carry their peer's identity into tonic request extensions.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::PeerIdentity;

/// The peer of a connection as tonic hands it to handlers: `req.extensions().get::<PeerInfo>()`. The error is
/// kept as text so that the value is cheap to clone into every request.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Result<Arc<PeerIdentity>, String>);

/// A Unix stream that tells tonic who the peer is; the identity is captured once, when the stream is wrapped.
#[derive(Debug)]
pub struct AttestedUnixStream {
    inner: UnixStream,
    peer: PeerInfo,
}

impl AttestedUnixStream {
    /// Wraps a freshly accepted stream, reading its peer's credentials and pidfd now.
    pub fn new(s: UnixStream) -> Self {
        let peer = PeerInfo(
            PeerIdentity::from_unix_stream(&s)
                .map(Arc::new)
                .map_err(|e| e.to_string()),
        );
        if let Err(e) = &peer.0 {
            tracing::debug!(error = %e, "cannot identify Unix socket peer");
        }
        AttestedUnixStream { inner: s, peer }
    }

    /// The identity captured in [`Self::new`].
    pub fn peer_info(&self) -> &PeerInfo {
        &self.peer
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &UnixStream {
        &self.inner
    }

    /// Unwraps the stream, dropping the identity (and its pidfd).
    pub fn into_inner(self) -> UnixStream {
        self.inner
    }
}

impl Connected for AttestedUnixStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for AttestedUnixStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AttestedUnixStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections of `listener`, each wrapped with its peer's identity, for tonic's `serve_with_incoming`.
///
/// The identity (credentials, pidfd, executable) is captured inside the accept loop right after
/// `accept()` ([`sigil_daemon::accept::unix_incoming_with`]), not when tonic pulls the connection, so a
/// process that execs after connecting is seen with the executable it connected with. Accept errors
/// back off (10 ms doubling to 1 s) and are logged at most once a second, so exhausted descriptors never
/// make the loop spin.
pub fn accept_stream(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<AttestedUnixStream>> + Send + 'static {
    sigil_daemon::accept::unix_incoming_with(listener, "Workload API", AttestedUnixStream::new)
}
