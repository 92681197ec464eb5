//! The stream adapter that runs the rewriter between an accepted socket and tonic's HTTP/2 server.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::normalize::Normalizer;

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// An accepted stream whose client→server bytes go through a [`Normalizer`]; server→client bytes and the
/// peer's connection info (credentials, pidfd) are the inner stream's.
#[derive(Debug)]
pub struct AuthorityNormalizer<S> {
    inner: S,
    normalizer: Normalizer,
    /// Rewritten bytes not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    chunk: Vec<u8>,
    eof: bool,
}

impl<S> AuthorityNormalizer<S> {
    /// Wraps a freshly accepted stream; the client's connection preface must come first.
    pub fn new(inner: S) -> Self {
        AuthorityNormalizer {
            inner,
            normalizer: Normalizer::new(),
            out: Vec::new(),
            out_pos: 0,
            chunk: Vec::new(),
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Wraps every connection of `incoming` (for tonic's `serve_with_incoming`).
pub fn normalize_incoming<St, S, E>(
    incoming: St,
) -> impl Stream<Item = Result<AuthorityNormalizer<S>, E>> + Send + 'static
where
    St: Stream<Item = Result<S, E>> + Send + 'static,
    S: Send + 'static,
    E: Send + 'static,
{
    incoming.map(|r| r.map(AuthorityNormalizer::new))
}

impl<S: Connected> Connected for AuthorityNormalizer<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityNormalizer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.chunk.len() != READ_CHUNK {
                this.chunk.resize(READ_CHUNK, 0);
            }
            let mut rb = ReadBuf::new(&mut this.chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            if let Err(e) = this.normalizer.feed(&this.chunk[..n], &mut this.out) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityNormalizer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
