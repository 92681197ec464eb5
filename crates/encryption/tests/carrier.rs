//! The encrypted carrier between two nodes (root): network namespaces on a bridged underlay,
//! a TUN device and a carrier per node, sessions keyed by the real handshake over the underlay.
//! VXLAN-shaped packets from node 0's overlay address reach node 1 with no plaintext on the
//! underlay; a replayed, bit-flipped or truncated packet, or a VNI node 0 does not host, is
//! dropped and counted, and the legitimate packet after each still goes through.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_encryption::carrier::{Carrier, DEFAULT_UDP_PORT, IdentityCheck, PeerStats};
use sigil_encryption::handshake::{self, NodeCredentials};
use sigil_encryption::tun::Tun;
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_test_util::netns::in_netns;
use sigil_test_util::{TestCa, Topology};

const TD: &str = "cluster.test";
const TUN: &str = "sgcrypt0";
const HOSTED: u32 = 70_000;
const NOT_HOSTED: u32 = 70_001;
const SECRET: &[u8] = b"SECRET-PAYLOAD-0123456789";

fn overlay(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, k as u8 + 1)
}

fn node_id(k: usize) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/sigil/agent/node-{k}")).unwrap()
}

fn creds(ca: &TestCa, k: usize) -> NodeCredentials {
    let (cert, key) = ca
        .svid(node_id(k).as_str(), Duration::from_secs(7200))
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(key.into());
    let mut b = Bundle::new(TrustDomain::parse(TD).unwrap());
    b.x509_authorities.push(CertificateDer::from(ca.der()));
    let mut set = BundleSet::new();
    set.insert(b);
    NodeCredentials {
        svid: Arc::new(sigil_tls::certified_key(vec![CertificateDer::from(cert)], &key).unwrap()),
        bundles: Arc::new(ArcSwap::from_pointee(set)),
    }
}

/// Node 0 hosts only [`HOSTED`].
struct Registry(Ipv4Addr);

impl IdentityCheck for Registry {
    fn peer_hosts(&self, node: IpAddr, identity: u32) -> bool {
        node == IpAddr::V4(self.0) && identity == HOSTED
    }
}

/// Runs node `k`'s carrier on a thread inside its namespace; returns its stats reader.
type Stats = Arc<dyn Fn() -> Vec<PeerStats> + Send + Sync>;

fn start_node(
    topo: &Topology,
    k: usize,
    ca: &TestCa,
    ready: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> Stats {
    let me = topo.nodes[k].clone();
    let peer = topo.nodes[1 - k].clone();
    let creds = creds(ca, k);
    let (stats_tx, stats_rx) = mpsc::channel::<Stats>();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&me.netns_path).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tun = Tun::create(TUN).unwrap();
            ready.send(()).unwrap();
            // The test addresses and routes the device, then lets us key the session.
            tokio::task::spawn_blocking(move || go.recv())
                .await
                .unwrap()
                .unwrap();
            let udp = tokio::net::UdpSocket::bind((me.underlay_ip, DEFAULT_UDP_PORT))
                .await
                .unwrap();
            let session = if k == 0 {
                let hs = SocketAddr::from((peer.underlay_ip, handshake::DEFAULT_PORT));
                let start = Instant::now();
                loop {
                    match handshake::initiate(&creds, hs, &node_id(1), 0x1000).await {
                        Ok(s) => break s,
                        // Node 1 may not listen yet.
                        Err(_) if start.elapsed() < Duration::from_secs(10) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("handshake: {e}"),
                    }
                }
            } else {
                let l = tokio::net::TcpListener::bind((me.underlay_ip, handshake::DEFAULT_PORT))
                    .await
                    .unwrap();
                let (tcp, _) = l.accept().await.unwrap();
                let expect = peer.underlay_ip;
                handshake::respond(
                    &creds,
                    tcp,
                    move |ip| (ip == IpAddr::V4(expect)).then(|| node_id(0)),
                    0x2000,
                )
                .await
                .unwrap()
            };
            let carrier = Carrier::new(tun, udp, Arc::new(Registry(peer.underlay_ip)));
            carrier.set_peer(
                SocketAddr::from((peer.underlay_ip, DEFAULT_UDP_PORT)),
                overlay(1 - k),
                session,
                0,
            );
            let c = carrier.clone();
            stats_tx
                .send(Arc::new(move || {
                    c.stats().into_iter().map(|s| s.3).collect()
                }))
                .unwrap();
            let _ = carrier.run().await;
        });
    });
    stats_rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn ip(topo: &Topology, k: usize, args: &[&str]) {
    let out = topo.nodes[k].command("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A VXLAN-shaped datagram with `vni` and [`SECRET`].
fn vxlan(vni: u32) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&vni.to_be_bytes()[1..]);
    p.push(0);
    p.extend_from_slice(SECRET);
    p
}

/// Every UDP payload to the carrier port seen on the underlay bridge while `f` runs.
fn capture(topo: &Topology, f: impl FnOnce()) -> Vec<Vec<u8>> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
    };
    let path = sigil_test_util::netns::named_netns_path(&topo.underlay_netns);
    let fd = in_netns(&path, || {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        Ok(fd)
    })
    .unwrap();
    f();
    let file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let Ok(n) = std::io::Read::read(&mut &file, &mut buf) else {
            continue;
        };
        let frame = &buf[..n];
        // A bridge sees each frame once per port; the payloads dedupe below.
        if frame.len() > 42 && frame[12..14] == [8, 0] && frame[23] == 17 {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let udp = &frame[14 + ihl..];
            if u16::from_be_bytes([udp[2], udp[3]]) == DEFAULT_UDP_PORT {
                out.push(udp[8..].to_vec());
            }
        }
    }
    out.dedup();
    out
}

fn recv(sock: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn wait_stat(stats: &Stats, f: impl Fn(&PeerStats) -> u64, want: u64) -> PeerStats {
    let start = Instant::now();
    loop {
        let s = stats()[0];
        if f(&s) >= want || start.elapsed() > Duration::from_secs(5) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_carrier_hides_the_payload_and_drops_every_forgery() {
    if !sigil_test_util::can_run_as_root_and("the encrypted-carrier test", || {
        (!std::path::Path::new("/dev/net/tun").exists()).then(|| "/dev/net/tun".to_owned())
    }) {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let ca = TestCa::spiffe(TD).unwrap();
    let (mut readies, mut gos, mut stats) = (Vec::new(), Vec::new(), Vec::new());
    std::thread::scope(|s| {
        let mut joins = Vec::new();
        for k in 0..2 {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel();
            readies.push(ready_rx);
            gos.push(go_tx);
            let (topo, ca) = (&topo, &ca);
            joins.push(s.spawn(move || start_node(topo, k, ca, ready_tx, go_rx)));
        }
        // Each node created its TUN device: address and route it, then let them key.
        for (k, r) in readies.iter().enumerate() {
            r.recv_timeout(Duration::from_secs(10)).unwrap();
            ip(
                &topo,
                k,
                &["addr", "add", &format!("{}/32", overlay(k)), "dev", TUN],
            );
            ip(&topo, k, &["link", "set", TUN, "up"]);
            ip(
                &topo,
                k,
                &[
                    "route",
                    "add",
                    &format!("{}/32", overlay(1 - k)),
                    "dev",
                    TUN,
                ],
            );
        }
        for g in &gos {
            g.send(()).unwrap();
        }
        for j in joins {
            stats.push(j.join().unwrap());
        }
    });
    let (n0, n1) = (&stats[0], &stats[1]);

    let node0 = topo.nodes[0].netns_path.clone();
    let node1 = topo.nodes[1].netns_path.clone();
    let rx = in_netns(&node1, || Ok(UdpSocket::bind((overlay(1), 8472))?)).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let tx = in_netns(&node0, || Ok(UdpSocket::bind((overlay(0), 0))?)).unwrap();
    let to = SocketAddr::from((overlay(1), 8472));

    // The legitimate packet arrives; the underlay shows only ciphertext.
    let wire = capture(&topo, || {
        tx.send_to(&vxlan(HOSTED), to).unwrap();
    });
    assert_eq!(
        recv(&rx).as_deref(),
        Some(&vxlan(HOSTED)[..]),
        "delivered through the carrier"
    );
    assert!(!wire.is_empty(), "no carrier packet on the underlay");
    assert!(
        wire.iter()
            .all(|p| !p.windows(SECRET.len()).any(|w| w == SECRET)),
        "plaintext on the underlay"
    );
    let sealed = wire[0].clone();
    // (Counters move after the socket call returns, which may be after delivery: wait for them.)
    assert_eq!(wait_stat(n1, |s| s.rx_packets, 1).rx_packets, 1);

    // Attacks from node 0's own underlay address (the spoofing position of a host on the
    // underlay): replayed, bit-flipped, truncated.
    let raw = in_netns(&node0, || {
        Ok(UdpSocket::bind((topo.nodes[0].underlay_ip, 0))?)
    })
    .unwrap();
    let carrier1 = SocketAddr::from((topo.nodes[1].underlay_ip, DEFAULT_UDP_PORT));
    raw.send_to(&sealed, carrier1).unwrap();
    let s = wait_stat(n1, |s| s.replayed, 1);
    assert_eq!(s.replayed, 1, "{s:?}");
    let mut flipped = sealed.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 0x40;
    // A fresh counter so the replay check does not catch it first.
    flipped[15] = flipped[15].wrapping_add(100);
    raw.send_to(&flipped, carrier1).unwrap();
    let s = wait_stat(n1, |s| s.unauthenticated, 1);
    assert_eq!(s.unauthenticated, 1, "{s:?}");
    let mut truncated = sealed.clone();
    truncated[15] = truncated[15].wrapping_add(101);
    truncated.truncate(truncated.len() - 5);
    raw.send_to(&truncated, carrier1).unwrap();
    let s = wait_stat(n1, |s| s.unauthenticated, 2);
    assert_eq!(s.unauthenticated, 2, "{s:?}");
    assert!(recv(&rx).is_none(), "a forged packet was delivered");

    // A VNI node 0 does not host: authentic, but refused.
    tx.send_to(&vxlan(NOT_HOSTED), to).unwrap();
    let s = wait_stat(n1, |s| s.identity_not_hosted, 1);
    assert_eq!(s.identity_not_hosted, 1, "{s:?}");
    assert!(
        recv(&rx).is_none(),
        "a VNI the peer does not host was delivered"
    );

    // Control: the legitimate packet still goes through, and node 0 counted its sends.
    tx.send_to(&vxlan(HOSTED), to).unwrap();
    assert_eq!(recv(&rx).as_deref(), Some(&vxlan(HOSTED)[..]));
    assert_eq!(wait_stat(n1, |s| s.rx_packets, 2).rx_packets, 2);
    let s = wait_stat(n0, |s| s.tx_packets, 3);
    assert_eq!(s.tx_packets, 3, "{s:?}");
}
