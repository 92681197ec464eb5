//! IPv6 neighbour discovery: ND types (133-137, hop limit 255) pass without policy only when
//! they stay on the veth's link (link-local or link-scope multicast destinations, or, entering
//! an endpoint, the endpoint's own address); sent anywhere else they are ordinary ICMPv6 under
//! policy, since the host forwards them.

use std::net::{IpAddr, Ipv6Addr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    DROP_POLICY_DENIED, Direction, PROTO_ICMPV6, PROTO_UDP, PolicyEntry, PolicyKey, Verdict,
};

use crate::support::{BLOCK_WAIT, EchoServer, Fixture, PASS_WAIT, can_run, in_netns, rule, udp_ok};

const SENDER: u32 = 1301;
const PEER: u32 = 1302;

/// What the crafted neighbour solicitations carry after the target address.
const MARKER: &[u8; 16] = b"sigil-nd-exfil!!";

fn v6(ep: &EndpointNet) -> Ipv6Addr {
    ep.ipv6.expect("endpoint has IPv6")
}

fn entry(
    remote: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    let len = if port == 0 { 0 } else { 16 };
    rule(remote, direction, (protocol, port, len), false, cookie)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A whole IPv6 packet, hop limit 255: a neighbour solicitation (type 135) for `dst` with a
/// valid ICMPv6 checksum and [`MARKER`] as trailing payload.
fn neighbour_solicitation(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&dst.octets());
    icmp.extend_from_slice(MARKER);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_ICMPV6]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[PROTO_ICMPV6, 255]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&icmp);
    p
}

/// Sends a raw IPv6 packet (header included) from inside `from`.
fn send_raw_v6(from: &EndpointNet, dst: Ipv6Addr, packet: Vec<u8>) {
    in_netns(from, move || {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Raw,
        )
        .expect("raw socket (IPPROTO_RAW includes the header)");
        // std's UDP socket is a thin wrapper over sendto, which is all a raw socket needs.
        let sock = UdpSocket::from(fd);
        sock.send_to(&packet, (IpAddr::V6(dst), 0))
            .expect("send raw packet");
    });
}

/// A raw ICMPv6 socket inside `ep`: it sees every ICMPv6 message the endpoint receives,
/// including solicitations its ND code then ignores (hop limit below 255).
fn icmpv6_listener(ep: &EndpointNet) -> UdpSocket {
    in_netns(ep, || {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::IcmpV6,
        )
        .expect("raw ICMPv6 socket");
        UdpSocket::from(fd)
    })
}

/// Whether `sock` receives an ICMPv6 message carrying [`MARKER`] within `wait`.
fn receives_marker(sock: &UdpSocket, wait: Duration) -> bool {
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if buf[..n].windows(MARKER.len()).any(|w| w == MARKER) {
            return true;
        }
    }
    false
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Forgets every IPv6 neighbour on both ends of the endpoint's veth.
fn flush_neighbours(ep: &EndpointNet) {
    ip(&[
        "-n",
        &ep.netns,
        "-6",
        "neigh",
        "flush",
        "dev",
        &ep.interface,
    ]);
    ip(&["-6", "neigh", "flush", "dev", &ep.host_interface]);
}

/// Asserts that a neighbour entry for `addr` on `dev` (in `netns`, or the host's) was resolved.
fn assert_resolved(netns: Option<&str>, addr: &str, dev: &str) {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-6", "neigh", "show", addr, "dev", dev]);
    let shown = ip(&args);
    assert!(
        shown.contains("lladdr"),
        "neighbour {addr} on {dev} ({netns:?}) is not resolved: {shown:?}"
    );
}

#[test]
fn neighbour_discovery_to_off_link_addresses_is_under_egress_policy() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("nd", 47);
    let sender = fx.endpoint("s", SENDER);
    let peer = fx.endpoint("p", PEER);
    let _srv = EchoServer::start(&peer, &[8080]);
    // The sender may only send UDP to the peer's 8080; the peer only accepts that.
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            sender.endpoint_id,
            &[entry(PEER, Direction::Egress, PROTO_UDP, 8080, 21)],
        )
        .expect("sender policy");
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            peer.endpoint_id,
            &[entry(SENDER, Direction::Ingress, PROTO_UDP, 8080, 22)],
        )
        .expect("peer policy");
    fx.enforce(&sender, SENDER, false, true);
    fx.enforce(&peer, PEER, true, false);
    let mut events = fx.events();

    // Control: real neighbour discovery still works under both default denies. With every
    // neighbour forgotten, the exchange needs NS/NA to ff02:: and fe80:: on both veths, and the
    // host's NA to the peer's own address (it solicits fe80::1 from its global address).
    flush_neighbours(&sender);
    flush_neighbours(&peer);
    assert!(
        udp_ok(&sender, IpAddr::V6(v6(&peer)), 8080, true),
        "sender -> peer over IPv6 after flushing the neighbours"
    );
    assert_resolved(Some(&sender.netns), "fe80::1", &sender.interface);
    assert_resolved(Some(&peer.netns), "fe80::1", &peer.interface);
    assert_resolved(None, &v6(&sender).to_string(), &sender.host_interface);
    assert_resolved(None, &v6(&peer).to_string(), &peer.host_interface);

    // The attack: a neighbour solicitation with hop limit 255 from the sender's own address to
    // off-link addresses (another endpoint's, the world's). The peer's ingress is opened so
    // that only the sender's egress policy stands in the way.
    fx.enforce(&peer, PEER, false, false);
    let listener = icmpv6_listener(&peer);
    let world: Ipv6Addr = "2001:db8::5347".parse().expect("address");
    for dst in [v6(&peer), world] {
        events.drain();
        send_raw_v6(&sender, dst, neighbour_solicitation(v6(&sender), dst));
        if dst == v6(&peer) {
            assert!(
                !receives_marker(&listener, BLOCK_WAIT),
                "an ND-typed packet with hop limit 255 left the sender to {dst} past its policy"
            );
        }
        let what = format!("133 drop of the sender's NS to {dst}");
        let ev = events.wait_for(&what, |e| {
            e.verdict == Verdict::Dropped
                && e.endpoint_id == sender.endpoint_id
                && e.protocol == PROTO_ICMPV6
                && e.daddr == IpAddr::V6(dst)
        });
        assert_eq!(ev.drop_reason, DROP_POLICY_DENIED, "{what}");
        assert_eq!(ev.direction, Direction::Egress, "{what}");
        assert_eq!(ev.saddr, IpAddr::V6(v6(&sender)), "{what}");
    }

    // Control: the same packet is ordinary ICMPv6 now, so a policy that allows ICMPv6 to the
    // peer lets it through (the listener does see it; the drop above was the policy's).
    fx.dp
        .maps_mut()
        .policy
        .upsert_policy(
            sender.endpoint_id,
            &[entry(PEER, Direction::Egress, PROTO_ICMPV6, 0, 23)],
        )
        .expect("allow ICMPv6");
    send_raw_v6(
        &sender,
        v6(&peer),
        neighbour_solicitation(v6(&sender), v6(&peer)),
    );
    assert!(
        receives_marker(&listener, PASS_WAIT),
        "ICMPv6 allowed: the solicitation reaches the peer"
    );
    // And real traffic still flows.
    assert!(udp_ok(&sender, IpAddr::V6(v6(&peer)), 8080, true));
}
