//! `handshake_incoming` when the process runs out of descriptors (EMFILE): the accept loop backs off
//! instead of spinning, frees a descriptor by dropping the oldest handshake, and still serves a
//! client that completes its handshake. Its own test binary: it lowers the process's open-file limit.

use std::time::{Duration, Instant};

use sigil_daemon::accept::{HandshakeLimits, handshake_incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn cpu() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(u.user_time()) + t(u.system_time())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_loop_backs_off_and_still_serves() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let l = sigil_daemon::accept::bind_tcp("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = l.local_addr().expect("addr");
    // Clients are connected first (the kernel completes them into the backlog), so that they do
    // not need descriptors once the limit is lowered.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut good = TcpStream::connect(addr).await.expect("connect");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // Room for about 20 accepted connections.
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 20, hard).expect("setrlimit");
    let limits = HandshakeLimits {
        timeout: Duration::from_secs(2),
        max_pending: 1000,
        max_pending_per_source: 1000,
        max_connections_per_source: 1000,
    };
    let incoming = handshake_incoming(l, limits, "test", |mut s: TcpStream, _, g| async move {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>((s, g))
    });
    let mut incoming = Box::pin(incoming);
    let cpu_start = cpu();
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    good.write_all(b"H").await.expect("hello");
    let served = tokio::time::timeout(Duration::from_secs(10), incoming.next()).await;
    let used = cpu() - cpu_start;
    let elapsed = wall.elapsed();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore");
    assert!(
        matches!(served, Ok(Some(Ok(_)))),
        "good client not served while out of descriptors"
    );
    assert!(
        used < elapsed / 2,
        "accept loop spun: {used:?} CPU in {elapsed:?}"
    );
}
