//! `handshake_incoming` on real TCP sockets: idle connections are closed after the handshake
//! timeout, the oldest handshake is dropped at the cap, and a client that completes its handshake
//! is served promptly despite a flood. The handshake here is one byte `H` (TLS is exercised end to
//! end in the sigil-e2e flood test).

use std::time::{Duration, Instant};

use sigil_daemon::accept::{HandshakeLimits, RateLimit, handshake_incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

async fn one_byte_handshake(mut s: TcpStream) -> std::io::Result<TcpStream> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    if b[0] != b'H' {
        return Err(std::io::Error::other("bad hello"));
    }
    Ok(s)
}

/// Whether the server side closed `s` within `wait`.
async fn closed(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn listener(
    limits: HandshakeLimits,
) -> (
    std::net::SocketAddr,
    impl tokio_stream::Stream<Item = std::io::Result<TcpStream>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let incoming = handshake_incoming(l, limits, "test", |s, _| one_byte_handshake(s));
    (addr, incoming)
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_timeout_and_good_ones_pass() {
    let limits = HandshakeLimits {
        timeout: Duration::from_millis(300),
        max_pending: 64,
    };
    let (addr, incoming) = listener(limits).await;
    let mut incoming = Box::pin(incoming);
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    let start = Instant::now();
    assert!(
        closed(&mut idle, Duration::from_secs(5)).await,
        "idle connection kept open"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
    // Control: a client that says hello is handed over.
    let mut good = TcpStream::connect(addr).await.expect("connect");
    good.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
    assert!(matches!(served, Ok(Some(Ok(_)))), "good client not served");
    // A wrong hello is dropped at once, not kept until the timeout.
    let mut bad = TcpStream::connect(addr).await.expect("connect");
    bad.write_all(b"X").await.expect("write");
    assert!(closed(&mut bad, Duration::from_millis(200)).await);
}

#[tokio::test]
async fn at_the_cap_the_oldest_handshake_is_dropped_for_a_new_client() {
    let limits = HandshakeLimits {
        timeout: Duration::from_secs(60),
        max_pending: 8,
    };
    let (addr, incoming) = listener(limits).await;
    let mut incoming = Box::pin(incoming);
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // A good client arriving after the flood is served long before the 60 s timeout.
    let mut good = TcpStream::connect(addr).await.expect("connect");
    good.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
    assert!(
        matches!(served, Ok(Some(Ok(_)))),
        "good client kept out by idle ones"
    );
    // The 32 oldest idle connections were dropped to make room; the newest 8 are still waiting.
    let mut dropped = 0;
    for s in idle.iter_mut() {
        if closed(s, Duration::from_millis(50)).await {
            dropped += 1;
        }
    }
    assert!(
        dropped >= 32,
        "only {dropped} of 40 idle connections dropped at a cap of 8"
    );
    assert!(
        dropped < 40,
        "a pending handshake within the cap was dropped too"
    );
}

#[test]
fn the_limit_is_kept_within_the_open_file_limit() {
    let l = HandshakeLimits::default();
    assert_eq!(l.within_fd_limit(1 << 20).max_pending, 256);
    assert_eq!(l.within_fd_limit(256).max_pending, 64);
    assert_eq!(l.within_fd_limit(0).max_pending, 1);
}

#[test]
fn rate_limit_lets_one_line_through_per_interval_and_counts_the_rest() {
    let mut r = RateLimit::new(Duration::from_millis(200));
    assert_eq!(r.allow(), Some(0));
    for _ in 0..1000 {
        assert_eq!(r.allow(), None);
    }
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(r.allow(), Some(1000));
    assert_eq!(r.allow(), None);
}
