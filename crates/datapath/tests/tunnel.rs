//! The VXLAN carrier between nodes, against the real kernel: two "nodes" as network namespaces
//! on a bridged underlay (sigil-test-util's `Topology`), each with its own pinned datapath and
//! collect-metadata VXLAN device, endpoints in namespaces behind each. Root and bpffs only.
//!
//! Pod addresses: node i hosts 10.(i+1).0.0/16. The underlay is captured with an AF_PACKET
//! socket in the underlay namespace; forged VXLAN packets are plain UDP datagrams to port 8472.

#[allow(dead_code)]
#[path = "datapath/support.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, recv, setsockopt,
    socket, sockopt,
};
use sigil_datapath::netns::{self, EndpointNet};
use sigil_datapath::tunnel::{DEFAULT_DEVICE, DEFAULT_PORT, TunnelConfig};
use sigil_datapath::{
    AuthKey, DROP_AUTH_REQUIRED, DROP_INVALID_IDENTITY, DROP_INVALID_SIP, DROP_NO_LOCAL_ENDPOINT,
    DROP_POLICY_DENIED, DROP_UNKNOWN_SENDER, Datapath, DatapathError, Direction, EndpointConfig,
    Event, IDENTITY_REMOTE_NODE, PROTO_TCP, PROTO_UDP, PolicyEntry, PolicyKey, Verdict,
};
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink};
use sigil_test_util::netns::in_netns;
use sigil_test_util::topology::{NODE_UPLINK, Topology};
use support::{BLOCK_WAIT, EchoServer, Events, PASS_WAIT, can_run, rule, tcp_ok, udp_ok};

const FRONTEND: u32 = 1001;
const BACKEND: u32 = 1002;
const OTHER: u32 = 1003;
const NEIGHBOUR: u32 = 1004;
/// A node-local (CIDR-style) identity: bit 24, Cilium's local scope.
const NODE_LOCAL: u32 = 0x100_0001;
const PORT: u16 = 8080;
const MARK_MAGIC_IDENTITY: u32 = 0x5300_0000;

fn allow(remote: u32, protocol: u8) -> (PolicyKey, PolicyEntry) {
    rule(
        remote,
        Direction::Ingress,
        (protocol, PORT, 16),
        false,
        remote,
    )
}

/// One node: its namespace, underlay address, datapath and tunnel device.
struct NodeDp {
    dp: Datapath,
    ip: Ipv4Addr,
    path: PathBuf,
    pin: PathBuf,
    vxlan: u32,
}

/// Removes the pin directories on drop (the namespaces go with the topology).
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Err(e) = Datapath::unpin(dir) {
                eprintln!("cleanup: pins {}: {e}", dir.display());
            }
        }
    }
}

/// Who encapsulates and decapsulates endpoints' packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    /// The programs themselves, on the node's uplink (what netd sets up without encryption).
    Direct,
    /// The VXLAN device for every packet (what the encrypted carrier needs).
    Device,
}

/// Two nodes with tunnels, routes to each other's pod CIDR and node entries for each other.
/// Fields drop in order: datapaths, pins, then the namespaces.
struct Cluster {
    nodes: Vec<NodeDp>,
    _pins: Pins,
    topo: Topology,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        Self::with(tag, Carrier::Direct)
    }

    fn with(tag: &str, carrier: Carrier) -> Self {
        let topo = Topology::new(2).expect("topology");
        let mut pins = Pins(Vec::new());
        let mut nodes = Vec::new();
        for node in &topo.nodes {
            let pin = support::pin_dir(&format!("{tag}-n{}", node.index));
            pins.0.push(pin.clone());
            let ip = node.underlay_ip;
            let (dp, vxlan) = in_netns(&node.netns_path, || {
                let mut dp = Datapath::load(&pin)?;
                let cfg = match carrier {
                    Carrier::Direct => TunnelConfig::direct(ip, NODE_UPLINK),
                    Carrier::Device => TunnelConfig::new(ip),
                };
                let vxlan = dp.setup_tunnel(&cfg)?;
                Ok((dp, vxlan))
            })
            .expect("datapath and tunnel");
            nodes.push(NodeDp {
                dp,
                ip,
                path: node.netns_path.clone(),
                pin,
                vxlan,
            });
        }
        let mut c = Cluster {
            nodes,
            _pins: pins,
            topo,
        };
        for i in 0..c.nodes.len() {
            for j in 0..c.nodes.len() {
                if i == j {
                    continue;
                }
                let peer_ip = c.nodes[j].ip;
                let n = &mut c.nodes[i];
                n.dp.maps_mut()
                    .ipcache
                    .upsert_node(peer_ip)
                    .expect("node entry");
                let dp = &mut n.dp;
                in_netns(&n.path, || {
                    Ok(dp.route_via_tunnel(IpAddr::V4(pod_cidr(j)), 16)?)
                })
                .expect("route to the peer's pods");
            }
        }
        c
    }

    /// An endpoint on `node` with address 10.(node+1).0.`host`, attached and registered
    /// under `identity` on its node, and as a tunnelled address on every other node.
    fn pod(&mut self, node: usize, host: u8, identity: u32, ingress_enforced: bool) -> EndpointNet {
        let ip = pod_ip(node, host);
        let ep = self.topo.add_endpoint(node, ip).expect("endpoint");
        let n = &mut self.nodes[node];
        let dp = &mut n.dp;
        let iface = ep.node_interface.clone();
        let ifindex = in_netns(&n.path, || {
            let ifindex = netns::ifindex(&iface)?;
            dp.attach(&iface)?;
            Ok(ifindex)
        })
        .expect("attach");
        let pod = EndpointNet {
            name: ep.netns.clone(),
            netns: ep.netns.clone(),
            netns_path: ep.netns_path.clone(),
            host_interface: iface,
            endpoint_id: ifindex,
            interface: "eth0".into(),
            ipv4: Some(ip),
            ipv6: None,
        };
        self.register(node, &pod, identity, ingress_enforced);
        pod
    }

    /// (Re-)registers a pod's identity and enforcement on its node and on the others.
    fn register(&mut self, node: usize, pod: &EndpointNet, identity: u32, ingress: bool) {
        let host_ip = self.nodes[node].ip;
        let addrs: Vec<(IpAddr, u8)> = [
            pod.ipv4.map(|a| (IpAddr::V4(a), 32)),
            pod.ipv6.map(|a| (IpAddr::V6(a), 128)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let maps = n.dp.maps_mut();
            for &(addr, len) in &addrs {
                if i == node {
                    maps.ipcache
                        .upsert(addr, len, identity)
                        .expect("local ipcache");
                } else {
                    maps.ipcache
                        .upsert_tunneled(addr, len, identity, host_ip)
                        .expect("remote ipcache");
                }
            }
            if i == node {
                maps.endpoints
                    .set(
                        pod.endpoint_id,
                        EndpointConfig {
                            identity,
                            ingress_enforced: ingress,
                            egress_enforced: false,
                            ipv4: pod.ipv4,
                            ipv6: pod.ipv6,
                        },
                    )
                    .expect("endpoint config");
            }
        }
    }

    /// Gives a pod an IPv6 address fd00:5347:(node+1)::`host` (default via fe80::1, which its
    /// host veth gets), routed to it on its node, and registers it.
    fn add_ipv6(
        &mut self,
        node: usize,
        pod: &mut EndpointNet,
        host: u16,
        identity: u32,
        ingress: bool,
    ) {
        let v6 = Ipv6Addr::new(0xfd00, 0x5347, node as u16 + 1, 0, 0, 0, 0, host);
        let gw = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let nl = RtNetlink::new();
        let p = Ns::Named(&pod.netns);
        nl.add_address(p, "eth0", IpAddr::V6(v6), 128, true)
            .expect("pod v6");
        nl.replace_route(
            p,
            &Route::via(Prefix::default_v6(), IpAddr::V6(gw), Some("eth0")),
        )
        .expect("pod v6 default");
        let node_ns = self.topo.nodes[node].netns.clone();
        let n = Ns::Named(&node_ns);
        nl.set_sysctl(n, "net/ipv6/conf/all/forwarding", "1")
            .expect("v6 forwarding");
        nl.add_address(n, &pod.host_interface, IpAddr::V6(gw), 64, true)
            .expect("gateway");
        nl.replace_route(
            n,
            &Route::dev(Prefix::host(IpAddr::V6(v6)), &pod.host_interface),
        )
        .expect("v6 host route");
        pod.ipv6 = Some(v6);
        self.register(node, pod, identity, ingress);
    }

    fn policy(&mut self, node: usize, pod: &EndpointNet, entries: &[(PolicyKey, PolicyEntry)]) {
        self.nodes[node]
            .dp
            .maps_mut()
            .policy
            .replace_policy(pod.endpoint_id, entries)
            .expect("policy");
    }

    fn events(&self, node: usize) -> Events {
        Events::open(&self.nodes[node].pin)
    }

    fn capture(&self) -> Capture {
        Capture::start(&support_path(&self.topo.underlay_netns))
    }

    /// Packets received and sent by a node's VXLAN device so far (its /proc/net/dev line, read
    /// from inside the node's namespace).
    fn device_packets(&self, node: usize) -> (u64, u64) {
        let dev = in_netns(&self.nodes[node].path, || {
            Ok(std::fs::read_to_string("/proc/thread-self/net/dev")?)
        })
        .expect("/proc/net/dev");
        let line = dev
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{DEFAULT_DEVICE}:")))
            .unwrap_or_else(|| panic!("no {DEFAULT_DEVICE} in {dev}"));
        let n: Vec<u64> = line
            .split_whitespace()
            .map(|v| v.parse().expect("counter"))
            .collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        (n[1], n[9])
    }
}

/// Sends `len` bytes over one TCP connection and reads them back from the echo server: large
/// writes leave as GSO packets, which cross the carrier whole.
fn bulk_ok(from: &EndpointNet, to: IpAddr, port: u16, len: usize) -> bool {
    use std::io::{Read, Write};
    let Ok(s) = support::tcp_connect(from, to, port, PASS_WAIT) else {
        return false;
    };
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let Ok(mut w) = s.try_clone() else {
        return false;
    };
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).is_ok());
    let mut back = vec![0u8; len];
    let read = s.set_read_timeout(Some(PASS_WAIT)).is_ok() && (&s).read_exact(&mut back).is_ok();
    writer.join().unwrap_or(false) && read && back == data
}

fn support_path(netns: &str) -> PathBuf {
    sigil_test_util::netns::named_netns_path(netns)
}

fn pod_cidr(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, node as u8 + 1, 0, 0)
}

fn pod_ip(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, node as u8 + 1, 0, host)
}

fn v4(ep: &EndpointNet) -> IpAddr {
    IpAddr::V4(ep.ipv4.expect("v4 pod"))
}

/// One VXLAN packet seen on the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    vni: u32,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
}

/// An AF_PACKET capture of every interface of a namespace, keeping the VXLAN packets.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Seen>>>,
}

impl Capture {
    fn start(netns: &Path) -> Self {
        let fd: OwnedFd = in_netns(netns, || {
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::EthAll,
            )?;
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(0, 50_000),
            )?;
            Ok(fd)
        })
        .expect("packet socket");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            // After the stop, what is queued is still read: the loop ends at the first receive
            // that times out once stopped (a thread scheduled late loses nothing).
            let mut stopped_at: Option<std::time::Instant> = None;
            loop {
                let stopping = s.load(Ordering::SeqCst);
                if stopping {
                    // A busy underlay cannot keep the drain going for ever.
                    let at = *stopped_at.get_or_insert_with(std::time::Instant::now);
                    if at.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                }
                match recv(
                    fd.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => {
                        if let Some(v) = parse_vxlan(&buf[..n])
                            && !seen.contains(&v)
                        {
                            seen.push(v);
                        }
                    }
                    Err(_) if stopping => break,
                    Err(_) => {}
                }
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An Ethernet frame carrying IPv4/UDP to port 8472 with a VXLAN header and an inner IPv4
/// packet.
fn parse_vxlan(f: &[u8]) -> Option<Seen> {
    let ip4 =
        |b: &[u8], at: usize| Some(Ipv4Addr::new(*b.get(at)?, b[at + 1], b[at + 2], b[at + 3]));
    if f.get(12..14)? != [0x08, 0x00] || *f.get(23)? != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    if u16::from_be_bytes([*f.get(udp + 2)?, f[udp + 3]]) != DEFAULT_PORT {
        return None;
    }
    let vx = udp + 8;
    let vni = u32::from_be_bytes([0, *f.get(vx + 4)?, f[vx + 5], f[vx + 6]]);
    let inner = vx + 8 + 14;
    Some(Seen {
        outer_src: ip4(f, 26)?,
        outer_dst: ip4(f, 30)?,
        vni,
        inner_src: ip4(f, inner + 12)?,
        inner_dst: ip4(f, inner + 16)?,
    })
}

/// Writes the header checksum of the 20-byte IPv4 header `ip`.
fn set_ipv4_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// A VXLAN payload (header and inner Ethernet/IPv4/UDP frame) as a peer would send it.
fn vxlan_payload(vni: u32, src: Ipv4Addr, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut p = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    let total = (20 + 8 + data.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    set_ipv4_checksum(&mut ip);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// Sends one UDP datagram from inside the namespace at `netns`, from `src` (bound with
/// IP_TRANSPARENT when `spoof`, so it may be an address the namespace does not have), with
/// `mark` as SO_MARK when given.
fn send_udp(
    netns: &Path,
    src: Option<Ipv4Addr>,
    spoof: bool,
    mark: Option<u32>,
    to: SocketAddr,
    data: &[u8],
) {
    let data = data.to_vec();
    in_netns(netns, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::empty(),
            None,
        )?;
        if spoof {
            setsockopt(&fd, sockopt::IpTransparent, &true)?;
        }
        if let Some(m) = mark {
            setsockopt(&fd, sockopt::Mark, &m)?;
        }
        if let Some(a) = src {
            bind(
                fd.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(IpAddr::V4(a), 0)),
            )?;
        }
        let sock = UdpSocket::from(fd);
        sock.send_to(&data, to)?;
        Ok(())
    })
    .expect("send udp");
}

/// Sends a forged VXLAN packet to `node`'s port 8472.
fn inject(netns: &Path, outer_src: Ipv4Addr, spoof: bool, node: Ipv4Addr, payload: &[u8]) {
    send_udp(
        netns,
        Some(outer_src),
        spoof,
        None,
        SocketAddr::new(IpAddr::V4(node), DEFAULT_PORT),
        payload,
    );
}

/// A drop of an IPv4 packet at `endpoint` (the endpoints' own IPv6 link-local chatter, which
/// these tests do not look at, is left out).
fn is_drop_at(e: &Event, endpoint: u32) -> bool {
    e.verdict == Verdict::Dropped && e.endpoint_id == endpoint && e.saddr.is_ipv4()
}

/// A new IPv4 connection into `endpoint` passed.
fn is_allowed_into(e: &Event, endpoint: u32) -> bool {
    e.verdict == Verdict::Allowed
        && e.endpoint_id == endpoint
        && e.direction == Direction::Ingress
        && e.saddr.is_ipv4()
}

#[test]
fn pods_on_two_nodes_talk_through_the_tunnel_under_the_source_identitys_policy() {
    if !can_run() {
        return;
    }
    matrix(Carrier::Direct, "tun-matrix");
}

#[test]
fn the_vxlan_device_carries_the_same_policy_when_it_does_all_the_work() {
    if !can_run() {
        return;
    }
    matrix(Carrier::Device, "tun-matrix-dev");
}

fn matrix(carrier: Carrier, tag: &str) {
    let mut c = Cluster::with(tag, carrier);
    let fe = c.pod(0, 2, FRONTEND, false);
    let other = c.pod(0, 3, OTHER, false);
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(
        1,
        &be,
        &[allow(FRONTEND, PROTO_TCP), allow(FRONTEND, PROTO_UDP)],
    );
    let mut ev0 = c.events(0);
    let mut ev1 = c.events(1);
    let cap = c.capture();
    let (before0, before1) = (c.device_packets(0), c.device_packets(1));

    assert!(tcp_ok(&fe, v4(&be), PORT, true), "frontend -> backend TCP");
    let (after0, after1) = (c.device_packets(0), c.device_packets(1));
    let through_device = (after0.1 - before0.1, after1.0 - before1.0);
    match carrier {
        // Both ends of the connection skip the device: the programs encapsulate (node 0 sends)
        // and decapsulate (node 1 receives).
        Carrier::Direct => assert_eq!(through_device, (0, 0), "sent, received by the device"),
        Carrier::Device => assert!(
            through_device.0 > 0 && through_device.1 > 0,
            "sent, received by the device: {through_device:?}"
        ),
    }
    let sent = ev0.wait_for("the connection leaving the frontend", |e| {
        e.verdict == Verdict::Allowed
            && e.endpoint_id == fe.endpoint_id
            && e.direction == Direction::Egress
            && e.protocol == PROTO_TCP
    });
    assert_eq!(
        (sent.src_identity, sent.dst_identity, sent.via_tunnel),
        (FRONTEND, BACKEND, true),
        "the sender reports the identity it puts in the VNI"
    );
    let opened = ev1.wait_for("the allowed connection at the backend", |e| {
        is_allowed_into(e, be.endpoint_id) && e.protocol == PROTO_TCP
    });
    assert_eq!(
        (opened.src_identity, opened.via_tunnel, opened.saddr),
        (FRONTEND, true, v4(&fe)),
        "identity from the VNI"
    );
    assert!(udp_ok(&fe, v4(&be), PORT, true), "frontend -> backend UDP");
    // Bulk data: GSO packets, which the direct path sends itself and (on kernels that cannot
    // clear their tunnel offload state from a program) leaves to the device on receipt.
    assert!(
        bulk_ok(&fe, v4(&be), PORT, 8 << 20),
        "8 MiB cross intact both ways"
    );

    ev1.drain();
    assert!(
        !tcp_ok(&other, v4(&be), PORT, false),
        "other -> backend TCP"
    );
    let ev = ev1.wait_for("the denied TCP connection", |e| {
        is_drop_at(e, be.endpoint_id) && e.protocol == PROTO_TCP
    });
    assert_eq!(
        (ev.drop_reason, ev.src_identity, ev.via_tunnel),
        (DROP_POLICY_DENIED, OTHER, true)
    );
    assert!(
        !udp_ok(&other, v4(&be), PORT, false),
        "other -> backend UDP"
    );
    let ev = ev1.wait_for("the denied datagram", |e| {
        is_drop_at(e, be.endpoint_id) && e.protocol == PROTO_UDP
    });
    assert_eq!(
        (ev.drop_reason, ev.src_identity),
        (DROP_POLICY_DENIED, OTHER)
    );

    // Policy follows the identity, not the address: allowing OTHER lets it in.
    c.policy(
        1,
        &be,
        &[allow(FRONTEND, PROTO_TCP), allow(OTHER, PROTO_TCP)],
    );
    assert!(tcp_ok(&other, v4(&be), PORT, true), "other allowed now");
    assert!(
        !udp_ok(&fe, v4(&be), PORT, false),
        "frontend UDP no longer allowed"
    );

    let seen = cap.finish();
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    for (src, vni) in [(v4(&fe), FRONTEND), (v4(&other), OTHER)] {
        assert!(
            seen.iter().any(|s| IpAddr::V4(s.inner_src) == src
                && s.vni == vni
                && (s.outer_src, s.outer_dst) == (n0, n1)),
            "VXLAN from {n0} to {n1} with VNI {vni} for {src}: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .any(|s| IpAddr::V4(s.inner_src) == v4(&be) && s.vni == BACKEND && s.outer_src == n1),
        "replies carry the backend's identity: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.vni == FRONTEND || s.vni == OTHER || s.vni == BACKEND),
        "no other VNI: {seen:?}"
    );
}

#[test]
fn ipv6_pods_are_carried_over_the_ipv4_underlay() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-v6");
    let mut fe = c.pod(0, 2, FRONTEND, false);
    let mut other = c.pod(0, 3, OTHER, false);
    let mut be = c.pod(1, 2, BACKEND, true);
    c.add_ipv6(0, &mut fe, 2, FRONTEND, false);
    c.add_ipv6(0, &mut other, 3, OTHER, false);
    c.add_ipv6(1, &mut be, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(
        1,
        &be,
        &[allow(FRONTEND, PROTO_TCP), allow(FRONTEND, PROTO_UDP)],
    );
    let mut ev1 = c.events(1);
    let cap = c.capture();
    let be6 = IpAddr::V6(be.ipv6.expect("v6"));
    assert!(
        tcp_ok(&fe, be6, PORT, true),
        "frontend -> backend TCP over IPv6"
    );
    assert!(
        udp_ok(&fe, be6, PORT, true),
        "frontend -> backend UDP over IPv6"
    );
    assert!(!udp_ok(&other, be6, PORT, false), "other -> backend denied");
    let ev = ev1.wait_for("the denied IPv6 datagram", |e| {
        e.verdict == Verdict::Dropped
            && e.endpoint_id == be.endpoint_id
            && e.saddr.is_ipv6()
            && e.protocol == PROTO_UDP
            && e.dport == PORT
    });
    assert_eq!(
        (ev.drop_reason, ev.src_identity, ev.via_tunnel),
        (DROP_POLICY_DENIED, OTHER, true)
    );
    let seen = cap.finish();
    assert!(
        seen.iter()
            .any(|s| s.vni == FRONTEND && s.outer_src == c.nodes[0].ip),
        "IPv6 inside VXLAN with VNI {FRONTEND}: {seen:?}"
    );
}

#[test]
fn the_hosts_own_traffic_leaves_as_the_node() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-host");
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(1, &be, &[allow(IDENTITY_REMOTE_NODE, PROTO_UDP)]);
    let mut ev1 = c.events(1);
    let cap = c.capture();
    let to = SocketAddr::new(v4(&be), PORT);
    let node0 = c.nodes[0].path.clone();
    let echoed = |wait: Duration| {
        in_netns(&node0, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(wait))?;
            s.send_to(b"host", to)?;
            let mut buf = [0u8; 16];
            Ok(matches!(s.recv_from(&mut buf), Ok((4, _))))
        })
        .expect("host socket")
    };
    assert!(
        echoed(PASS_WAIT),
        "node 0's host reaches the backend as remote-node"
    );
    let ev = ev1.wait_for("the host's datagram", |e| {
        is_allowed_into(e, be.endpoint_id)
    });
    assert_eq!(
        (ev.src_identity, ev.via_tunnel, ev.saddr),
        (IDENTITY_REMOTE_NODE, true, IpAddr::V4(c.nodes[0].ip))
    );
    let seen = cap.finish();
    assert!(
        seen.iter()
            .any(|s| s.vni == IDENTITY_REMOTE_NODE && s.outer_src == c.nodes[0].ip),
        "VNI 6 from node 0: {seen:?}"
    );

    c.policy(1, &be, &[allow(FRONTEND, PROTO_UDP)]);
    ev1.drain();
    assert!(!echoed(BLOCK_WAIT), "remote-node no longer allowed");
    let ev = ev1.wait_for("the host's denied datagram", |e| {
        is_drop_at(e, be.endpoint_id)
    });
    assert_eq!(
        (ev.drop_reason, ev.src_identity),
        (DROP_POLICY_DENIED, IDENTITY_REMOTE_NODE)
    );
}

#[test]
fn a_node_local_identity_never_goes_on_the_wire() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-local");
    let fe = c.pod(0, 2, NODE_LOCAL, false);
    let be = c.pod(1, 2, BACKEND, false);
    let _srv = EchoServer::start(&be, &[PORT]);
    let mut ev0 = c.events(0);
    let cap = c.capture();
    assert!(
        !udp_ok(&fe, v4(&be), PORT, false),
        "node-local identity stays home"
    );
    let ev = ev0.wait_for("the 171 drop at the sender", |e| {
        is_drop_at(e, fe.endpoint_id)
    });
    assert_eq!(
        (ev.drop_reason, ev.direction, ev.src_identity, ev.via_tunnel),
        (DROP_INVALID_IDENTITY, Direction::Egress, NODE_LOCAL, true)
    );
    let seen = cap.finish();
    assert!(
        !seen.iter().any(|s| IpAddr::V4(s.inner_src) == v4(&fe)),
        "nothing of it on the underlay: {seen:?}"
    );

    // Control: the same endpoint with a cluster identity is carried.
    c.register(0, &fe, FRONTEND, false);
    assert!(udp_ok(&fe, v4(&be), PORT, true), "cluster identity travels");
}

#[test]
fn forged_tunnel_packets_are_dropped_at_the_tunnel_device() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-forge");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(1, &be, &[allow(FRONTEND, PROTO_UDP)]);
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let vx1 = c.nodes[1].vxlan;
    let node0 = c.nodes[0].path.clone();
    let underlay = support_path(&c.topo.underlay_netns);
    // An attacker on the underlay with an address of its own, not a cluster node's.
    let attacker = Ipv4Addr::new(n0.octets()[0], n0.octets()[1], n0.octets()[2], 200);
    RtNetlink::new()
        .add_address(
            Ns::Named(&c.topo.underlay_netns),
            "br0",
            IpAddr::V4(attacker),
            24,
            true,
        )
        .expect("attacker address");
    let fe_ip = fe.ipv4.expect("v4");
    let be_ip = be.ipv4.expect("v4");
    let mut ev1 = c.events(1);

    // Control: a well-formed packet from node 0 with the frontend's identity is delivered.
    inject(
        &node0,
        n0,
        false,
        n1,
        &vxlan_payload(FRONTEND, fe_ip, be_ip, PORT, b"ok"),
    );
    let ev = ev1.wait_for("the genuine packet", |e| is_allowed_into(e, be.endpoint_id));
    assert_eq!((ev.src_identity, ev.via_tunnel), (FRONTEND, true));

    // A forged VNI from an address that is not a cluster node.
    inject(
        &underlay,
        attacker,
        false,
        n1,
        &vxlan_payload(FRONTEND, fe_ip, be_ip, PORT, b"x"),
    );
    let ev = ev1.wait_for("unknown sender", |e| is_drop_at(e, vx1));
    assert_eq!(
        (ev.drop_reason, ev.src_identity, ev.via_tunnel),
        (DROP_UNKNOWN_SENDER, FRONTEND, true)
    );

    // VNI 0 and reserved identities from a real node.
    for vni in [0, 1, 2, 5, 255] {
        inject(
            &node0,
            n0,
            false,
            n1,
            &vxlan_payload(vni, fe_ip, be_ip, PORT, b"x"),
        );
        let ev = ev1.wait_for(&format!("VNI {vni}"), |e| is_drop_at(e, vx1));
        assert_eq!(
            (ev.drop_reason, ev.src_identity),
            (DROP_INVALID_IDENTITY, vni),
            "VNI {vni}"
        );
    }

    // A node speaking for an address another node hosts, or for none.
    for src in [n1, pod_ip(1, 99), Ipv4Addr::new(8, 8, 8, 8)] {
        inject(
            &node0,
            n0,
            false,
            n1,
            &vxlan_payload(FRONTEND, src, be_ip, PORT, b"x"),
        );
        let ev = ev1.wait_for(&format!("inner source {src}"), |e| is_drop_at(e, vx1));
        assert_eq!(ev.drop_reason, DROP_INVALID_SIP, "inner source {src}");
    }
    // The backend's own address, sent from another node.
    inject(
        &node0,
        n0,
        false,
        n1,
        &vxlan_payload(FRONTEND, be_ip, be_ip, PORT, b"x"),
    );
    let ev = ev1.wait_for("inner source = local endpoint", |e| is_drop_at(e, vx1));
    assert_eq!(ev.drop_reason, DROP_INVALID_SIP);

    // A node is no relay: inner destinations that are not on this node.
    for dst in [Ipv4Addr::new(8, 8, 8, 8), attacker, pod_ip(0, 2)] {
        inject(
            &node0,
            n0,
            false,
            n1,
            &vxlan_payload(FRONTEND, fe_ip, dst, PORT, b"x"),
        );
        let ev = ev1.wait_for(&format!("inner destination {dst}"), |e| is_drop_at(e, vx1));
        assert_eq!(
            ev.drop_reason, DROP_NO_LOCAL_ENDPOINT,
            "inner destination {dst}"
        );
    }

    // Every forged packet is counted at the tunnel device (1 + 5 + 3 + 1 + 3 above).
    let dropped = c.nodes[1]
        .dp
        .maps()
        .counters
        .get(vx1, Verdict::Dropped)
        .expect("counter");
    assert!(dropped.packets >= 13, "{dropped:?}");

    // Control again: the genuine path still works.
    assert!(udp_ok(&fe, v4(&be), PORT, true));
}

#[test]
fn remote_addresses_are_accepted_only_through_the_tunnel() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-spoof");
    let target = c.pod(0, 2, FRONTEND, false);
    let spoofer = c.pod(0, 3, OTHER, false);
    let be = c.pod(1, 2, BACKEND, false);
    let n1 = c.nodes[1].ip;
    let node0 = c.nodes[0].path.clone();
    let be_ip = be.ipv4.expect("v4");
    let mut ev0 = c.events(0);
    let listen = |ep: &EndpointNet, port: u16| {
        support::in_netns(ep, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            s
        })
    };
    let got = |s: &UdpSocket, wait: Duration| {
        let _ = s.set_read_timeout(Some(wait));
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from))
    };
    let sink = listen(&target, 7000);
    let to_target = SocketAddr::new(v4(&target), 7000);

    // Control: the host with its own address reaches the endpoint.
    send_udp(&node0, None, false, None, to_target, b"own");
    assert_eq!(got(&sink, PASS_WAIT).map(|g| g.0), Some(b"own".to_vec()));

    // The host (root, IP_TRANSPARENT) claiming a remote endpoint's or a node's address.
    for src in [be_ip, n1] {
        ev0.drain();
        send_udp(&node0, Some(src), true, None, to_target, b"forged");
        let ev = ev0.wait_for(&format!("host as {src}"), |e| {
            is_drop_at(e, target.endpoint_id)
        });
        assert_eq!(
            (ev.drop_reason, ev.saddr, ev.via_tunnel),
            (DROP_INVALID_SIP, IpAddr::V4(src), false),
            "{src}"
        );
        assert_eq!(got(&sink, BLOCK_WAIT), None, "{src} must not arrive");
    }

    // A local endpoint claiming a remote endpoint's address, to a local and a remote peer.
    for to in [to_target, SocketAddr::new(v4(&be), 7000)] {
        ev0.drain();
        send_udp(&spoofer.netns_path, Some(be_ip), true, None, to, b"forged");
        let ev = ev0.wait_for("endpoint as the backend", |e| {
            is_drop_at(e, spoofer.endpoint_id)
        });
        assert_eq!(
            (ev.drop_reason, ev.direction, ev.src_identity),
            (DROP_INVALID_SIP, Direction::Egress, OTHER)
        );
    }
    assert_eq!(got(&sink, BLOCK_WAIT), None);
}

#[test]
fn a_forged_identity_mark_from_the_host_or_an_endpoint_is_not_honoured() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-mark");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, true);
    let neighbour = c.pod(1, 3, NEIGHBOUR, false);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(1, &be, &[allow(FRONTEND, PROTO_UDP)]);
    let node1 = c.nodes[1].path.clone();
    let mut ev1 = c.events(1);
    let to = SocketAddr::new(v4(&be), PORT);
    let mark = Some(MARK_MAGIC_IDENTITY | FRONTEND);

    // Control: the frontend's identity, carried by the tunnel, is allowed.
    assert!(udp_ok(&fe, v4(&be), PORT, true));

    // The host of node 1 marks its packet as if it came from the frontend.
    ev1.drain();
    send_udp(&node1, None, false, mark, to, b"marked");
    let ev = ev1.wait_for("the host's marked datagram", |e| {
        is_drop_at(e, be.endpoint_id)
    });
    assert_eq!(ev.drop_reason, DROP_POLICY_DENIED);
    assert!(ev.src_identity != FRONTEND && !ev.via_tunnel, "{ev:?}");

    // So does a local endpoint.
    ev1.drain();
    send_udp(&neighbour.netns_path, None, false, mark, to, b"marked");
    let ev = ev1.wait_for("the endpoint's marked datagram", |e| {
        is_drop_at(e, be.endpoint_id)
    });
    assert_eq!(
        (ev.drop_reason, ev.src_identity, ev.via_tunnel),
        (DROP_POLICY_DENIED, NEIGHBOUR, false)
    );
}

/// The exposure until the authenticated carrier (issue 12): the VNI is not authenticated, so a
/// host on the underlay that can send with a cluster node's address can claim any cluster
/// identity for an address that node hosts. docs/security.md records it.
#[test]
fn known_exposure_a_spoofed_node_address_can_forge_identities() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-expose");
    let fe = c.pod(0, 2, OTHER, false);
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(1, &be, &[allow(FRONTEND, PROTO_UDP)]);
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let underlay = support_path(&c.topo.underlay_netns);
    let attacker = Ipv4Addr::new(n0.octets()[0], n0.octets()[1], n0.octets()[2], 201);
    RtNetlink::new()
        .add_address(
            Ns::Named(&c.topo.underlay_netns),
            "br0",
            IpAddr::V4(attacker),
            24,
            true,
        )
        .expect("attacker address");
    let mut ev1 = c.events(1);

    // The real endpoint (OTHER) is denied.
    assert!(!udp_ok(&fe, v4(&be), PORT, false));
    // The attacker, spoofing node 0's underlay address, claims FRONTEND for it: accepted.
    ev1.drain();
    let payload = vxlan_payload(
        FRONTEND,
        fe.ipv4.expect("v4"),
        be.ipv4.expect("v4"),
        PORT,
        b"x",
    );
    inject(&underlay, n0, true, n1, &payload);
    let ev = ev1.wait_for("the forged identity", |e| {
        e.endpoint_id == be.endpoint_id && e.direction == Direction::Ingress && e.saddr.is_ipv4()
    });
    assert_eq!(
        (ev.verdict, ev.src_identity, ev.via_tunnel),
        (Verdict::Allowed, FRONTEND, true),
        "forged with node 0's address: accepted (issue 12 closes this)"
    );
    // With its own address it is refused (the control).
    inject(&underlay, attacker, false, n1, &payload);
    let ev = ev1.wait_for("the attacker's own address", |e| {
        is_drop_at(e, c.nodes[1].vxlan)
    });
    assert_eq!(ev.drop_reason, DROP_UNKNOWN_SENDER);
}

#[test]
fn setup_is_idempotent_and_teardown_disarms_the_carrier() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-idem");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, false);
    let _srv = EchoServer::start(&be, &[PORT]);
    let n0 = &mut c.nodes[0];
    let ip = n0.ip;
    let first = n0.vxlan;
    let dp = &mut n0.dp;
    let direct = TunnelConfig::direct(ip, NODE_UPLINK);
    let again = in_netns(&n0.path, || Ok(dp.setup_tunnel(&direct)?)).expect("setup again");
    assert_eq!(again, first, "the device is adopted");
    assert_eq!(n0.dp.tunnel().expect("tunnel"), Some((first, ip)));
    let filters_on = |path: &Path, dev: &str, hook: &str| {
        let out = sigil_netlink::command_in_netns(path, "tc")
            .args(["filter", "show", "dev", dev, hook])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout)
            .matches("handle 0x5347 sigil_")
            .count()
    };
    // The VXLAN device's two hooks and the underlay's ingress.
    let filters = |path: &Path| {
        (
            filters_on(path, DEFAULT_DEVICE, "ingress"),
            filters_on(path, DEFAULT_DEVICE, "egress"),
            filters_on(path, NODE_UPLINK, "ingress"),
        )
    };
    assert_eq!(filters(&n0.path), (1, 1, 1));
    assert!(udp_ok(&fe, v4(&be), PORT, true));
    // What netd finds as the underlay: the uplink that holds the node's address, never lo.
    let found = in_netns(&n0.path, || {
        Ok((
            sigil_datapath::tunnel::underlay_of(ip)?,
            sigil_datapath::tunnel::device_with_address(Ipv4Addr::LOCALHOST)?,
        ))
    })
    .expect("underlay");
    assert_eq!(found, (Some((NODE_UPLINK.to_owned(), 1500)), None));

    // A restarted daemon: the loader's process is gone (its Datapath dropped), the filters and
    // pins stay; a fresh load reads the tunnel back from its map, and set-up adopts the device.
    let (pin, path) = (c.nodes[0].pin.clone(), c.nodes[0].path.clone());
    let old = std::mem::replace(
        &mut c.nodes[0].dp,
        in_netns(&path, || Ok(Datapath::load(&pin)?)).expect("reload"),
    );
    drop(old);
    assert!(udp_ok(&fe, v4(&be), PORT, true), "carried with no loader");
    assert_eq!(c.nodes[0].dp.tunnel().expect("tunnel"), Some((first, ip)));
    let dp = &mut c.nodes[0].dp;
    let readopted = in_netns(&path, || Ok(dp.setup_tunnel(&direct)?)).expect("re-adopt");
    assert_eq!(readopted, first);
    assert_eq!(filters(&path), (1, 1, 1));
    assert!(
        udp_ok(&fe, v4(&be), PORT, true),
        "carried after the restart"
    );

    // Set up again for the device to do all the work (as for the encrypted carrier, which
    // needs plaintext VXLAN to reach it through the stack): the underlay's filter goes, even
    // one this load did not attach (its pins removed, it would keep an armed map of its own).
    let dp = &mut c.nodes[0].dp;
    let old = in_netns(&path, || Ok(Datapath::load(&pin)?)).expect("another load");
    let _ = std::mem::replace(dp, old);
    let dp = &mut c.nodes[0].dp;
    in_netns(&path, || Ok(dp.setup_tunnel(&TunnelConfig::new(ip))?)).expect("device mode");
    assert_eq!(filters(&path), (1, 1, 0), "no filter left on the underlay");
    let before = c.device_packets(0);
    assert!(udp_ok(&fe, v4(&be), PORT, true), "carried by the device");
    // Node 0 sends through its device now, and the reply from node 1 (still direct) comes in
    // through it.
    let after = c.device_packets(0);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "node 0's device carried both ways: {before:?} -> {after:?}"
    );

    let mut ev0 = c.events(0);
    let n0 = &mut c.nodes[0];
    let dp = &mut n0.dp;
    in_netns(&n0.path, || Ok(dp.teardown_tunnel()?)).expect("teardown");
    in_netns(&n0.path, || Ok(dp.teardown_tunnel()?)).expect("teardown again");
    assert_eq!(n0.dp.tunnel().expect("tunnel"), None);
    assert!(
        !udp_ok(&fe, v4(&be), PORT, false),
        "no carrier: dropped, not leaked"
    );
    let ev = ev0.wait_for("no tunnel", |e| is_drop_at(e, fe.endpoint_id));
    assert_eq!(ev.drop_reason, sigil_datapath::DROP_NO_TUNNEL);

    let err = n0
        .dp
        .route_via_tunnel(IpAddr::V4(pod_cidr(1)), 16)
        .expect_err("no tunnel");
    assert!(err.to_string().contains("setup_tunnel"), "{err}");
}

#[test]
fn a_pin_of_the_old_ipcache_layout_is_refused() {
    if !can_run() {
        return;
    }
    let pin = support::pin_dir("tun-oldpin");
    let _pins = Pins(vec![pin.clone()]);
    // The IPCache as the previous build pinned it: value {identity, flags}, 8 bytes.
    let src = std::env::temp_dir().join(format!("sigil-oldpin-{}.c", std::process::id()));
    let obj = src.with_extension("o");
    std::fs::write(
        &src,
        r#"
struct key { unsigned int prefixlen; unsigned char family, pad[3], addr[16]; };
struct value { unsigned int identity, flags; };
struct {
    int (*type)[11]; struct key *key; struct value *value;
    int (*max_entries)[16]; int (*map_flags)[1]; int (*pinning)[1];
} sigil_ipcache __attribute__((section(".maps"), used));
char _license[] __attribute__((section("license"), used)) = "GPL";
"#,
    )
    .expect("write C");
    let clang = std::env::var("SIGIL_CLANG").unwrap_or_else(|_| "clang".into());
    let out = std::process::Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("clang");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&obj).expect("object");
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&obj);
    std::fs::create_dir_all(&pin).expect("pin dir");
    let old = aya::EbpfLoader::new()
        .default_map_pin_directory(&pin)
        .load(&bytes)
        .expect("pin the old layout");
    drop(old);

    let err = Datapath::load(&pin).err().expect("refused");
    assert!(
        matches!(err, DatapathError::IncompatiblePin { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("sigil_ipcache")
            && msg.contains("value size 8")
            && msg.contains("value size 12"),
        "{msg}"
    );
    assert!(sigil_datapath::Maps::open_pinned(&pin).is_err());
}

/// An auth entry names the peer's node: a pair authenticated for this node (0) or for another
/// node does not let the same identities through from or to the node that hosts the peer.
#[test]
fn auth_entries_are_keyed_by_the_peers_node() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-auth");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    let with_auth = |(k, v): (PolicyKey, PolicyEntry)| {
        (
            k,
            PolicyEntry {
                auth_required: true,
                ..v
            },
        )
    };
    c.policy(1, &be, &[with_auth(allow(FRONTEND, PROTO_TCP))]);
    c.policy(
        0,
        &fe,
        &[with_auth(rule(
            BACKEND,
            Direction::Egress,
            (PROTO_TCP, PORT, 16),
            false,
            7,
        ))],
    );
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let key = |local, remote, node| AuthKey {
        local_identity: local,
        remote_identity: remote,
        remote_node: node,
    };
    let grant = |c: &mut Cluster, node: usize, k: AuthKey| {
        c.nodes[node]
            .dp
            .maps_mut()
            .auth
            .grant(k, Duration::from_secs(60))
            .expect("grant");
    };
    let mut ev0 = c.events(0);
    let mut ev1 = c.events(1);

    // Attack: the pairs authenticated, but as local peers (node 0) or with a third node.
    let elsewhere = Ipv4Addr::new(192, 0, 2, 99);
    for node in [0, AuthKey::node(elsewhere)] {
        grant(&mut c, 0, key(FRONTEND, BACKEND, node));
        grant(&mut c, 1, key(BACKEND, FRONTEND, node));
    }
    assert!(!tcp_ok(&fe, v4(&be), PORT, false), "wrong node: dropped");
    let ev = ev0.wait_for("the egress auth drop", |e| is_drop_at(e, fe.endpoint_id));
    assert_eq!(
        (ev.drop_reason, ev.auth_required),
        (DROP_AUTH_REQUIRED, true)
    );

    // The sender's side authenticated with node 1: the receiver still wants its own.
    grant(&mut c, 0, key(FRONTEND, BACKEND, AuthKey::node(n1)));
    ev1.drain();
    assert!(!tcp_ok(&fe, v4(&be), PORT, false), "receiver not yet");
    let ev = ev1.wait_for("the ingress auth drop", |e| is_drop_at(e, be.endpoint_id));
    assert_eq!(
        (ev.drop_reason, ev.src_identity, ev.via_tunnel),
        (DROP_AUTH_REQUIRED, FRONTEND, true)
    );

    // Control: both ends authenticated with the node that hosts the peer.
    grant(&mut c, 1, key(BACKEND, FRONTEND, AuthKey::node(n0)));
    assert!(tcp_ok(&fe, v4(&be), PORT, true), "authenticated pair");

    // An established connection needs the entry on every packet of its opening direction:
    // revoking the sender's entry cuts it at its next packet.
    let mut conn = support::tcp_connect(&fe, v4(&be), PORT, PASS_WAIT).expect("connect");
    assert!(support::echo(&mut conn, b"one", PASS_WAIT), "established");
    c.nodes[0]
        .dp
        .maps_mut()
        .auth
        .revoke(key(FRONTEND, BACKEND, AuthKey::node(n1)))
        .expect("revoke");
    ev0.drain();
    assert!(
        !support::echo(&mut conn, b"two", BLOCK_WAIT),
        "cut after the revocation"
    );
    let ev = ev0.wait_for("the established connection's drop", |e| {
        is_drop_at(e, fe.endpoint_id)
    });
    assert_eq!(ev.drop_reason, DROP_AUTH_REQUIRED);
    grant(&mut c, 0, key(FRONTEND, BACKEND, AuthKey::node(n1)));
    assert_eq!(
        key(0, 0, AuthKey::node(n0)).node_ip(),
        Some(n0),
        "node round trip"
    );

    // Revoked at the receiver: new connections drop again.
    c.nodes[1]
        .dp
        .maps_mut()
        .auth
        .revoke(key(BACKEND, FRONTEND, AuthKey::node(n0)))
        .expect("revoke");
    ev1.drain();
    assert!(!tcp_ok(&fe, v4(&be), PORT, false), "revoked");
    let ev = ev1.wait_for("the drop after revocation", |e| {
        is_drop_at(e, be.endpoint_id)
    });
    assert_eq!(ev.drop_reason, DROP_AUTH_REQUIRED);
}

#[test]
fn a_route_to_the_node_by_another_device_is_the_vxlan_devices_to_follow() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-route");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, false);
    let _srv = EchoServer::start(&be, &[PORT]);
    let ip = |args: &[&str]| {
        let out = sigil_netlink::command_in_netns(&c.nodes[0].path, "ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    let before = c.device_packets(0);
    assert!(udp_ok(&fe, v4(&be), PORT, true), "direct");
    assert_eq!(c.device_packets(0).1, before.1, "the programs sent it");

    // A more specific route to node 1 through another device (a veth going nowhere): the
    // programs do not send by the uplink anyway; the VXLAN device follows the route.
    ip(&[
        "link", "add", "alt0", "type", "veth", "peer", "name", "alt1",
    ]);
    ip(&["link", "set", "alt0", "up"]);
    ip(&["link", "set", "alt1", "up"]);
    let n1 = c.nodes[1].ip.to_string();
    ip(&["route", "add", &format!("{n1}/32"), "dev", "alt0"]);
    let before = c.device_packets(0);
    assert!(
        !udp_ok(&fe, v4(&be), PORT, false),
        "the route leads nowhere, for both paths"
    );
    assert!(
        c.device_packets(0).1 > before.1,
        "the VXLAN device sent it, by the route"
    );

    ip(&["route", "del", &format!("{n1}/32"), "dev", "alt0"]);
    ip(&["link", "del", "alt0"]);
    let before = c.device_packets(0);
    assert!(udp_ok(&fe, v4(&be), PORT, true), "direct again");
    assert_eq!(c.device_packets(0).1, before.1, "the programs sent it");
}

/// Sends `payload` from node `netns` (bound to `src`) to `node`'s VXLAN port with the given
/// outer TOS, and a zero UDP checksum (as the carrier sends) if `zero_csum`.
fn send_vxlan(
    netns: &Path,
    src: Ipv4Addr,
    node: Ipv4Addr,
    payload: &[u8],
    tos: u8,
    zero_csum: bool,
) {
    let data = payload.to_vec();
    in_netns(netns, move || {
        let sock = UdpSocket::bind((src, 0))?;
        setsockopt(&sock, sockopt::Ipv4Tos, &nix::libc::c_int::from(tos))?;
        if zero_csum {
            let one: nix::libc::c_int = 1;
            // SO_NO_CHECK (no UDP checksum on send) has no safe wrapper in nix.
            // SAFETY: a valid socket, and a c_int option value of its size.
            #[allow(unsafe_code)]
            let rc = unsafe {
                nix::libc::setsockopt(
                    sock.as_raw_fd(),
                    nix::libc::SOL_SOCKET,
                    nix::libc::SO_NO_CHECK,
                    (&one as *const nix::libc::c_int).cast(),
                    std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        sock.send_to(&data, (node, DEFAULT_PORT))?;
        Ok(())
    })
    .expect("send vxlan");
}

#[test]
fn the_underlay_program_takes_only_plainly_well_formed_packets() {
    if !can_run() {
        return;
    }
    let mut c = Cluster::new("tun-shape");
    let fe = c.pod(0, 2, FRONTEND, false);
    let be = c.pod(1, 2, BACKEND, true);
    let _srv = EchoServer::start(&be, &[PORT]);
    c.policy(1, &be, &[allow(FRONTEND, PROTO_UDP)]);
    let (n0, n1) = (c.nodes[0].ip, c.nodes[1].ip);
    let node0 = c.nodes[0].path.clone();
    let (fe_ip, be_ip) = (fe.ipv4.expect("v4"), be.ipv4.expect("v4"));
    let genuine = vxlan_payload(FRONTEND, fe_ip, be_ip, PORT, b"ok");
    let mut ev1 = c.events(1);
    // Each case: what is sent, and whether node 1's VXLAN device (rather than the underlay
    // program) took it; all of them are genuine packets from node 0, and are delivered.
    for (i, (what, tos, zero_csum, by_device)) in [
        ("as the carrier sends it", 0, true, false),
        ("with a UDP checksum", 0, false, true),
        ("marked CE (congestion) on the way", 3, true, true),
        ("ECT(0), not CE", 2, true, false),
    ]
    .into_iter()
    .enumerate()
    {
        // A flow of its own each time (inner UDP source port), so each is a new connection;
        // the inner packet ECN-capable (ECT(0)), so that a CE mark on the way is applied to it
        // (on a Not-ECT inner packet the kernel drops it, RFC 6040).
        let mut packet = genuine.clone();
        packet[42..44].copy_from_slice(&(41000 + i as u16).to_be_bytes());
        packet[23] = 2;
        set_ipv4_checksum(&mut packet[22..42]);
        ev1.drain();
        let before = c.device_packets(1).0;
        send_vxlan(&node0, n0, n1, &packet, tos, zero_csum);
        let ev = ev1.wait_for(what, |e| is_allowed_into(e, be.endpoint_id));
        assert_eq!((ev.src_identity, ev.via_tunnel), (FRONTEND, true), "{what}");
        let took = c.device_packets(1).0 > before;
        assert_eq!(took, by_device, "{what}: taken by the VXLAN device");
    }
    // Shaped as the carrier sends it but refused by the checks: the program leaves it to the
    // device, whose program drops it with the reason.
    ev1.drain();
    let before = c.device_packets(1).0;
    send_vxlan(
        &node0,
        n0,
        n1,
        &vxlan_payload(5, fe_ip, be_ip, PORT, b"x"),
        0,
        true,
    );
    let ev = ev1.wait_for("the reserved VNI", |e| {
        e.verdict == Verdict::Dropped && e.drop_reason == DROP_INVALID_IDENTITY
    });
    assert_eq!(ev.endpoint_id, c.nodes[1].vxlan, "dropped at the device");
    assert!(c.device_packets(1).0 > before, "the device took it");
}
