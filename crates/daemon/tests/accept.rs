//! `handshake_incoming` on real TCP sockets: idle connections are closed after the handshake
//! timeout, the oldest handshake is dropped at the cap, and a client that completes its handshake
//! is served promptly despite a flood. The handshake here is one byte `H` (TLS is exercised end to
//! end in the sigil-e2e flood test).

use std::time::{Duration, Instant};

use sigil_daemon::accept::{HandshakeLimits, RateLimit, SourceGuard, handshake_incoming};
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
    impl tokio_stream::Stream<Item = std::io::Result<(TcpStream, SourceGuard)>>,
) {
    // On 0.0.0.0 so that clients can come from several loopback addresses (sources).
    let l = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let incoming = handshake_incoming(l, limits, "test", |s, _, g| async move {
        Ok::<_, std::io::Error>((one_byte_handshake(s).await?, g))
    });
    (std::net::SocketAddr::from(([127, 0, 0, 1], port)), incoming)
}

/// A connection to `addr` from the loopback address `from` (127.0.0.0/8 all reach this host).
async fn connect_from(from: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(std::net::SocketAddr::from((from, 0))).expect("bind");
    s.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_timeout_and_good_ones_pass() {
    let limits = HandshakeLimits {
        timeout: Duration::from_millis(300),
        max_pending: 64,
        ..Default::default()
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
        max_pending_per_source: 8,
        ..Default::default()
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

/// Attack: a flood of idle connections from one source (127.0.0.2) while a client from another source
/// (127.0.0.1) is mid-handshake. Only the flooding source's own handshakes are dropped; before, every
/// new connection evicted the oldest handshake, whoever's it was. Control: the other client is served.
#[tokio::test]
async fn a_flooding_source_drops_only_its_own_handshakes() {
    let limits = HandshakeLimits {
        timeout: Duration::from_secs(60),
        max_pending: 8,
        max_pending_per_source: 4,
        max_connections_per_source: 1000,
    };
    let (addr, incoming) = listener(limits).await;
    let mut incoming = Box::pin(incoming);
    let mut good = connect_from([127, 0, 0, 1], addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(connect_from([127, 0, 0, 2], addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    good.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
    assert!(
        matches!(&served, Ok(Some(Ok((_, g)))) if g.source() == std::net::Ipv4Addr::new(127, 0, 0, 1)),
        "the other source's handshake was dropped by the flood"
    );
    let mut dropped = 0;
    for s in flood.iter_mut() {
        if closed(s, Duration::from_millis(50)).await {
            dropped += 1;
        }
    }
    assert_eq!(
        dropped, 36,
        "the flooding source keeps its 4 newest handshakes"
    );
}

/// Attack: one source (127.0.0.3) completes handshakes and holds the connections. Beyond
/// `max_connections_per_source` its new connections are closed at once; once it closes some, it may
/// connect again. Control: another source (127.0.0.1) is served meanwhile.
#[tokio::test]
async fn established_connections_are_capped_per_source() {
    let limits = HandshakeLimits {
        timeout: Duration::from_secs(60),
        max_connections_per_source: 5,
        ..Default::default()
    };
    let (addr, incoming) = listener(limits).await;
    let mut incoming = Box::pin(incoming);
    let mut held = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = connect_from([127, 0, 0, 3], addr).await;
        let _ = c.write_all(b"H").await;
        clients.push(c);
    }
    while let Ok(Some(Ok(s))) =
        tokio::time::timeout(Duration::from_millis(500), incoming.next()).await
    {
        held.push(s);
    }
    assert_eq!(held.len(), 5, "served beyond the per-source cap");
    let mut refused = 0;
    for c in clients.iter_mut() {
        if closed(c, Duration::from_millis(50)).await {
            refused += 1;
        }
    }
    assert_eq!(refused, 5, "the connections beyond the cap were not closed");
    // Control: another source is served.
    let mut other = connect_from([127, 0, 0, 1], addr).await;
    other.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
    assert!(matches!(served, Ok(Some(Ok(_)))), "another source kept out");
    // Closing held connections frees the source's places.
    held.truncate(3);
    let mut again = connect_from([127, 0, 0, 3], addr).await;
    again.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
    assert!(
        matches!(served, Ok(Some(Ok(_)))),
        "a freed place was not reused"
    );
}

#[test]
fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
    use sigil_daemon::accept::source_of;
    let a = |s: &str| source_of(&s.parse().expect("addr"));
    assert_eq!(a("10.1.2.3:5"), a("10.1.2.3:6"));
    assert_ne!(a("10.1.2.3:5"), a("10.1.2.4:5"));
    assert_eq!(a("[2001:db8::1]:5"), a("[2001:db8::ffff:1]:5"));
    assert_ne!(a("[2001:db8::1]:5"), a("[2001:db8:0:1::1]:5"));
    assert_eq!(a("[::ffff:10.1.2.3]:5"), a("10.1.2.3:7"));
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
