//! Against the real `h2` server tonic runs on: the header block a gRPC C-core client sends on a Unix
//! socket (socket path as `:authority`) is reset by h2 with PROTOCOL_ERROR when it arrives as is, and is
//! served when it goes through `AuthorityNormalizer`.
#![allow(clippy::unwrap_used)]

#[path = "support/frames.rs"]
mod support;

use std::time::Duration;

use sigil_h2_authority::AuthorityNormalizer;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// What the client saw on stream 1.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A response HEADERS frame.
    Response,
    /// RST_STREAM with this error code.
    Reset(u32),
}

/// Runs an h2 server on `io`, sending the authority of each request it accepts to `seen`.
async fn serve<T: AsyncRead + AsyncWrite + Unpin>(io: T, seen: mpsc::UnboundedSender<String>) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        let authority = req.uri().authority().map(|a| a.to_string());
        let _ = seen.send(authority.unwrap_or_default());
        let _ = respond.send_response(http::Response::new(()), true);
    }
}

/// Sends one request whose header block is `block` and reads until stream 1 gets an answer.
async fn call(mut client: UnixStream, block: &[u8]) -> Outcome {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, block));
    client.write_all(&out).await.unwrap();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            client.read_exact(&mut head).await.unwrap();
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
            match (head[3], stream) {
                (SETTINGS, 0) if head[4] & 1 == 0 => {
                    client.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
                }
                (HEADERS, 1) => return Outcome::Response,
                (RST_STREAM, 1) => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer on stream 1")
}

/// The header block grpcio 1.85 sends for a unary call on `unix:tmp/sigil-agent/public/api.sock`, as
/// literals (C-core would index them; indexing is covered by the rewriter's own tests).
fn c_core_block() -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let list = grpc_request(
        "tmp%2Fsigil-agent%2Fpublic%2Fapi.sock",
        "/SpiffeWorkloadAPI/FetchJWTSVID",
    );
    enc.encode(list.iter().map(|(n, v)| (&n[..], &v[..])))
}

#[tokio::test]
async fn h2_resets_a_c_core_request_that_arrives_as_sent() {
    let (client, server) = UnixStream::pair().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(serve(server, tx));
    assert_eq!(call(client, &c_core_block()).await, Outcome::Reset(1)); // PROTOCOL_ERROR
    task.abort();
    assert!(seen.try_recv().is_err(), "h2 must not hand the request on");
}

#[tokio::test]
async fn h2_serves_the_same_request_through_the_normalizer() {
    let (client, server) = UnixStream::pair().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(serve(AuthorityNormalizer::new(server), tx));
    assert_eq!(call(client, &c_core_block()).await, Outcome::Response);
    assert_eq!(seen.recv().await.unwrap(), "localhost");
    task.abort();
}

#[tokio::test]
async fn a_valid_authority_reaches_h2_unchanged() {
    let (client, server) = UnixStream::pair().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(serve(AuthorityNormalizer::new(server), tx));
    let mut enc = loona_hpack::Encoder::new();
    let list = grpc_request("sigil.local:443", "/a.B/C");
    let block = enc.encode(list.iter().map(|(n, v)| (&n[..], &v[..])));
    assert_eq!(call(client, &block).await, Outcome::Response);
    assert_eq!(seen.recv().await.unwrap(), "sigil.local:443");
    task.abort();
}
