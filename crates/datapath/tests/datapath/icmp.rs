//! Protocols without ports: ICMP echo is policy-checked with port 0 and its reply passes
//! through connection tracking like any other.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{DROP_POLICY_DENIED, Direction, PROTO_ICMP, PROTO_TCP, PolicyEntry, Verdict};

use crate::support::{BLOCK_WAIT, Fixture, PASS_WAIT, can_run, in_netns};

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

/// Sends one ICMP echo request from inside `from` and waits for the matching reply.
fn ping(from: &EndpointNet, to: Ipv4Addr, wait: Duration) -> bool {
    let id: u16 = 0x5347;
    let sock: UdpSocket = in_netns(from, || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .expect("raw socket");
        // std's UDP socket is a thin wrapper over sendto/recvfrom, which is all a raw socket needs.
        UdpSocket::from(fd)
    });
    let mut req = vec![8u8, 0, 0, 0];
    req.extend_from_slice(&id.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(b"sigil-ping");
    let sum = checksum(&req);
    req[2..4].copy_from_slice(&sum.to_be_bytes());
    sock.set_read_timeout(Some(wait)).expect("timeout");
    sock.send_to(&req, (IpAddr::V4(to), 0)).expect("send echo");
    let mut buf = [0u8; 1500];
    while let Ok((n, peer)) = sock.recv_from(&mut buf) {
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        let icmp = &buf[ihl.min(n)..n];
        if peer.ip() == IpAddr::V4(to)
            && icmp.len() >= 8
            && icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
        {
            return true;
        }
    }
    false
}

#[test]
fn icmp_is_checked_with_port_zero_and_replies_pass() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("icmp", 8);
    let fe = fx.endpoint("fe", 1001);
    let be = fx.endpoint("be", 1002);
    let be4 = be.ipv4.expect("v4");
    let mut events = fx.events();
    assert!(ping(&fe, be4, PASS_WAIT), "not enforced: echo passes");

    let tcp_only = PolicyEntry {
        remote_identity: 1001,
        direction: Direction::Ingress,
        protocol: PROTO_TCP,
        port: 0,
        port_prefix_len: 0,
        deny: false,
        l7_redirect: false,
        auth_required: false,
        rule_cookie: 50,
    };
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &[tcp_only])
        .expect("policy");
    fx.enforce(&be, 1002, true, true);
    events.drain();
    assert!(!ping(&fe, be4, BLOCK_WAIT), "ICMP is not TCP: dropped");
    let ev = events.wait_for("icmp drop", |e| e.verdict == Verdict::Dropped);
    assert_eq!(
        (ev.protocol, ev.sport, ev.dport, ev.drop_reason),
        (PROTO_ICMP, 0, 0, DROP_POLICY_DENIED)
    );

    let icmp = PolicyEntry {
        protocol: PROTO_ICMP,
        rule_cookie: 51,
        ..tcp_only
    };
    fx.dp
        .maps_mut()
        .policy
        .upsert_policy(be.endpoint_id, &[icmp])
        .expect("policy");
    // The backend's egress is enforced with no entries: the echo reply passes as a reply.
    assert!(
        ping(&fe, be4, PASS_WAIT),
        "ICMP allowed: echo and reply pass"
    );
    let ev = events.wait_for("icmp allow", |e| {
        e.verdict == Verdict::Allowed && e.protocol == PROTO_ICMP
    });
    assert_eq!(ev.rule_cookie, 51);
}
