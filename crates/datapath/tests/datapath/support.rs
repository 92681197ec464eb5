//! Test fixtures: a loaded datapath with endpoints in real namespaces, sockets opened inside a
//! namespace, echo servers, and event waits, all cleaned up on drop.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sigil_datapath::netns::{self, EndpointNet, EndpointSpec};
use sigil_datapath::{
    Datapath, Direction, EndpointConfig, Event, EventReader, PolicyEntry, PolicyKey,
};

/// True when the test can run; false (after saying why) when it must skip. Under CI=true a
/// skip is a failure.
pub fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the datapath test")
}

/// One policy map entry: a key (port prefix of `port_prefix_len` bits) and its value.
pub fn rule(
    remote: u32,
    direction: Direction,
    (protocol, port, port_prefix_len): (u8, u16, u8),
    deny: bool,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    let key = PolicyKey {
        identity: remote,
        direction,
        protocol,
        port,
        port_prefix_len,
    };
    let value = PolicyEntry {
        deny,
        rule_cookie: cookie,
        ..PolicyEntry::default()
    };
    (key, value)
}

/// Pin directory for a test: unique per process and tag.
pub fn pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/sigil-test-{}-{tag}",
        std::process::id()
    ))
}

/// An endpoint name unique per process and tag.
pub fn endpoint_name(tag: &str, short: &str) -> String {
    format!("t{}{tag}-{short}", std::process::id())
}

/// Removes endpoints, blackhole routes and pins when dropped.
#[derive(Default)]
pub struct Cleanup {
    pub endpoints: Vec<String>,
    pub routes: Vec<String>,
    pub pin_dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.endpoints {
            if let Err(e) = netns::delete_endpoint(name) {
                eprintln!("cleanup: endpoint {name}: {e}");
            }
        }
        for cidr in &self.routes {
            if let Err(e) = netns::remove_blackhole_route(cidr) {
                eprintln!("cleanup: route {cidr}: {e}");
            }
        }
        for dir in &self.pin_dirs {
            if let Err(e) = Datapath::unpin(dir) {
                eprintln!("cleanup: pins {}: {e}", dir.display());
            }
        }
    }
}

/// A test network: a /24 and a /64 of its own (blackholed on the node so nothing leaves it).
pub struct TestNet {
    pub tag: String,
    pub subnet: u8,
    pub next_host: u8,
    pub cleanup: Cleanup,
}

impl TestNet {
    pub fn new(tag: &str, subnet: u8) -> Self {
        let mut cleanup = Cleanup::default();
        for cidr in [v4_cidr(subnet), v6_cidr(subnet)] {
            netns::blackhole_route(&cidr).expect("blackhole route");
            cleanup.routes.push(cidr);
        }
        Self {
            tag: tag.to_owned(),
            subnet,
            next_host: 10,
            cleanup,
        }
    }

    /// Creates an endpoint (namespace, veth, addresses, routes) without any datapath.
    pub fn endpoint(&mut self, short: &str) -> EndpointNet {
        let name = endpoint_name(&self.tag, short);
        let host = self.next_host;
        self.next_host += 1;
        self.cleanup.endpoints.push(name.clone());
        netns::create_endpoint(&EndpointSpec {
            name,
            mtu: None,
            ipv4: Some(Ipv4Addr::new(10, 231, self.subnet, host)),
            ipv6: Some(Ipv6Addr::new(
                0xfd00,
                0x5347,
                0,
                u16::from(self.subnet),
                0,
                0,
                0,
                u16::from(host),
            )),
        })
        .expect("create endpoint")
    }
}

fn v4_cidr(subnet: u8) -> String {
    format!("10.231.{subnet}.0/24")
}

fn v6_cidr(subnet: u8) -> String {
    format!("fd00:5347:0:{subnet:x}::/64")
}

/// A test network plus a datapath loaded into its own pin dir.
pub struct Fixture {
    pub dp: Datapath,
    pub net: TestNet,
}

impl Fixture {
    pub fn new(tag: &str, subnet: u8) -> Self {
        let mut net = TestNet::new(tag, subnet);
        let dir = pin_dir(tag);
        net.cleanup.pin_dirs.push(dir.clone());
        let dp = Datapath::load(&dir).expect("load datapath");
        Self { dp, net }
    }

    /// Creates an endpoint, registers its addresses under `identity`, and attaches the programs.
    pub fn endpoint(&mut self, short: &str, identity: u32) -> EndpointNet {
        let ep = self.net.endpoint(short);
        register(&mut self.dp, &ep, identity, false, false);
        self.dp.attach(&ep.host_interface).expect("attach");
        ep
    }

    pub fn enforce(&mut self, ep: &EndpointNet, identity: u32, ingress: bool, egress: bool) {
        register(&mut self.dp, ep, identity, ingress, egress);
    }

    pub fn events(&self) -> Events {
        Events::open(self.dp.pin_dir())
    }
}

pub fn register(dp: &mut Datapath, ep: &EndpointNet, identity: u32, ingress: bool, egress: bool) {
    let maps = dp.maps_mut();
    for addr in [ep.ipv4.map(IpAddr::V4), ep.ipv6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
    {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        maps.ipcache.upsert(addr, len, identity).expect("ipcache");
    }
    maps.endpoints
        .set(
            ep.endpoint_id,
            EndpointConfig {
                identity,
                ingress_enforced: ingress,
                egress_enforced: egress,
                ipv4: ep.ipv4,
                ipv6: ep.ipv6,
            },
        )
        .expect("endpoint config");
}

/// Runs `f` on a thread that has entered the endpoint's network namespace; sockets it creates
/// stay in that namespace.
pub fn in_netns<T: Send + 'static>(ep: &EndpointNet, f: impl FnOnce() -> T + Send + 'static) -> T {
    sigil_test_util::netns::in_netns(&ep.netns_path, || Ok(f())).expect("netns thread")
}

/// TCP and UDP echo servers on one port inside an endpoint, stopped on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ep: &EndpointNet, ports: &[u16]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (tcp, udp) = in_netns(ep, move || {
                let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
                let udp = UdpSocket::bind(("::", port)).expect("bind udp");
                (tcp, udp)
            });
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let s = stop.clone();
            threads.push(std::thread::spawn(move || tcp_loop(tcp, s)));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || udp_loop(udp, s)));
        }
        Self { stop, threads }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_loop(listener: TcpListener, stop: Arc<AtomicBool>) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let s = stop.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
                    let mut buf = [0u8; 4096];
                    while !s.load(Ordering::SeqCst) {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                }));
            }
            // Polling the stop flag between accepts; not a wait on the network.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn udp_loop(sock: UdpSocket, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}

/// How long to wait for traffic that should pass, and for traffic that should not.
pub const PASS_WAIT: Duration = Duration::from_secs(5);
pub const BLOCK_WAIT: Duration = Duration::from_millis(700);

/// Opens a TCP connection from inside `from`.
pub fn tcp_connect(
    from: &EndpointNet,
    to: IpAddr,
    port: u16,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    in_netns(from, move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout)
    })
}

/// Connects, sends a message and expects it echoed. `expect_pass` picks the timeout: a flow
/// that should pass gets time to succeed, one that should be dropped only a short one (if it
/// does pass, it passes at once).
pub fn tcp_ok(from: &EndpointNet, to: IpAddr, port: u16, expect_pass: bool) -> bool {
    let wait = if expect_pass { PASS_WAIT } else { BLOCK_WAIT };
    let Ok(mut s) = tcp_connect(from, to, port, wait) else {
        return false;
    };
    echo(&mut s, b"ping", wait)
}

/// Sends on an established connection and expects the echo within `wait`.
pub fn echo(s: &mut TcpStream, msg: &[u8], wait: Duration) -> bool {
    if s.set_read_timeout(Some(wait)).is_err() || s.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg
}

/// Sends a UDP datagram from inside `from` and expects it echoed.
pub fn udp_ok(from: &EndpointNet, to: IpAddr, port: u16, expect_pass: bool) -> bool {
    let wait = if expect_pass { PASS_WAIT } else { BLOCK_WAIT };
    let bind: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = in_netns(from, move || {
        UdpSocket::bind(bind).expect("bind udp client")
    });
    if sock.set_read_timeout(Some(wait)).is_err() || sock.send_to(b"hello", (to, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(sock.recv_from(&mut buf), Ok((5, _))) && &buf[..5] == b"hello"
}

/// The event ring buffer with a runtime to wait on it.
pub struct Events {
    rt: tokio::runtime::Runtime,
    reader: EventReader,
}

impl Events {
    pub fn open(pin_dir: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let reader = rt
            .block_on(async { EventReader::open_pinned(pin_dir) })
            .expect("event reader");
        Self { rt, reader }
    }

    /// Waits (bounded) for an event matching `pred`, skipping others.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        let Self { rt, reader } = self;
        rt.block_on(async {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, reader.next()).await {
                    Ok(Ok(ev)) if pred(&ev) => return ev,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("reading events: {e}"),
                    Err(_) => panic!("no event for {what} within 5 s"),
                }
            }
        })
    }

    /// Discards every queued event.
    pub fn drain(&mut self) {
        while let Ok(Some(_)) = self.reader.try_next() {}
    }
}
