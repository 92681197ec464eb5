//! IPv6 extension headers and fragments: policy sees the upper-layer protocol and ports behind
//! them, chains it cannot walk and fragments it cannot place are dropped.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, connect, setsockopt, socket,
    sockopt,
};
use nix::sys::time::TimeVal;
use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    DROP_FRAG_NOT_FOUND, DROP_INVALID_EXTHDR, DROP_POLICY_DENY, Direction, PROTO_TCP, PROTO_UDP,
    PolicyEntry, PolicyKey, Verdict,
};

use crate::support::{
    BLOCK_WAIT, EchoServer, Events, Fixture, PASS_WAIT, can_run, echo, in_netns, rule, tcp_ok,
};

const CLIENT: u32 = 1201;
const SERVER: u32 = 1202;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

fn v4(ep: &EndpointNet) -> IpAddr {
    IpAddr::V4(ep.ipv4.expect("endpoint has IPv4"))
}

fn v6(ep: &EndpointNet) -> IpAddr {
    IpAddr::V6(ep.ipv6.expect("endpoint has IPv6"))
}

fn entry(
    protocol: u8,
    port: u16,
    port_prefix_len: u8,
    deny: bool,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    rule(
        CLIENT,
        Direction::Ingress,
        (protocol, port, port_prefix_len),
        deny,
        cookie,
    )
}

/// An 8-byte options header (hop-by-hop or destination options) holding one PadN option.
const PADN_OPTIONS: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// Opens a TCP connection from inside `from` whose packets carry an extension header set with
/// the `IPV6_DSTOPTS` or `IPV6_HOPOPTS` socket option, sends a message and expects the echo.
fn tcp_ok_with_option(
    from: &EndpointNet,
    to: IpAddr,
    port: u16,
    option: i32,
    expect_pass: bool,
) -> bool {
    let wait = if expect_pass { PASS_WAIT } else { BLOCK_WAIT };
    let stream = in_netns(from, move || -> Option<TcpStream> {
        let fd: OwnedFd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        let opt = PADN_OPTIONS;
        // SAFETY: setsockopt reads `opt.len()` bytes from a live buffer; the fd is open.
        let rc = unsafe {
            nix::libc::setsockopt(
                fd.as_raw_fd(),
                nix::libc::IPPROTO_IPV6,
                option,
                opt.as_ptr().cast(),
                opt.len() as nix::libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt {option}: {}",
            std::io::Error::last_os_error()
        );
        // A blocking connect gives up after the send timeout.
        let tv = TimeVal::new(wait.as_secs() as i64, i64::from(wait.subsec_micros()));
        setsockopt(&fd, sockopt::SendTimeout, &tv).expect("send timeout");
        let remote = SockaddrStorage::from(SocketAddr::new(to, port));
        connect(fd.as_raw_fd(), &remote).ok()?;
        Some(TcpStream::from(fd))
    });
    let Some(mut s) = stream else {
        return false;
    };
    echo(&mut s, b"ping", wait)
}

/// Sends a UDP datagram of `len` bytes (more than the MTU: the kernel fragments it) from
/// inside `from` and expects it echoed whole.
fn big_udp_ok(from: &EndpointNet, to: IpAddr, port: u16, len: usize, expect_pass: bool) -> bool {
    let wait = if expect_pass { PASS_WAIT } else { BLOCK_WAIT };
    let bind: IpAddr = if to.is_ipv4() { v4(from) } else { v6(from) };
    let sock = in_netns(from, move || {
        UdpSocket::bind((bind, 0)).expect("bind udp client")
    });
    let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    if sock.set_read_timeout(Some(wait)).is_err() || sock.send_to(&msg, (to, port)).is_err() {
        return false;
    }
    let mut buf = vec![0u8; len + 16];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n == len && buf[..n] == msg[..])
}

/// An IPv6 packet: fixed header (hop limit 64) then `payload`, whose first header is `nh`.
fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nh, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP SYN header from port 40000 to `dport` (checksum left 0: the datapath is the reader).
fn tcp_syn(dport: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40000u16.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// `count` destination options headers in front of a TCP SYN to `dport`.
fn dstopts_chain_syn(count: usize, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..count {
        let next = if i + 1 == count {
            PROTO_TCP
        } else {
            NEXTHDR_DEST
        };
        let mut h = PADN_OPTIONS;
        h[0] = next;
        p.extend_from_slice(&h);
    }
    p.extend_from_slice(&tcp_syn(dport));
    p
}

/// Sends a raw IPv4 packet (header included; the kernel fills in the checksum and total
/// length) from inside `from`.
fn send_raw_v4(from: &EndpointNet, dst: Ipv4Addr, packet: Vec<u8>) {
    in_netns(from, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Raw,
        )
        .expect("raw socket (IPPROTO_RAW includes the header)");
        let sock = UdpSocket::from(fd);
        sock.send_to(&packet, (IpAddr::V4(dst), 0))
            .expect("send raw packet");
    });
}

/// An IPv4 fragment at `offset8` (8-byte units, non-zero: no UDP header in it) of a UDP
/// datagram, with 16 bytes of payload.
fn ipv4_later_fragment(src: Ipv4Addr, dst: Ipv4Addr, id: u16, offset8: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 36];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&(offset8 & 0x1fff).to_be_bytes());
    p.extend_from_slice(&[64, PROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0u8; 16]);
    p
}

/// Sends a raw IPv6 packet (header included) from inside `from`: real traffic through its veth.
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

fn drop_at(
    events: &mut Events,
    what: &str,
    ep: &EndpointNet,
    pred: impl Fn(&sigil_datapath::Event) -> bool,
) -> sigil_datapath::Event {
    events.wait_for(what, |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == ep.endpoint_id && pred(e)
    })
}

#[test]
fn ipv6_extension_headers_do_not_bypass_a_port_deny() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("xh", 42);
    let client = fx.endpoint("cl", CLIENT);
    let server = fx.endpoint("sv", SERVER);
    let _srv = EchoServer::start(&server, &[8080, 8081]);
    // A broad L3 allow of the client, and a deny of TCP 8081.
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            server.endpoint_id,
            &[
                entry(0, 0, 0, false, 21),
                entry(PROTO_TCP, 8081, 16, true, 22),
            ],
        )
        .expect("policy");
    fx.enforce(&server, SERVER, true, false);
    let mut events = fx.events();
    let dst = v6(&server);

    // Controls: plain TCP to 8081 is denied with the deny's cookie, 8080 passes; below, 8080
    // passes with extension headers too (the walk finds TCP and its ports).
    assert!(tcp_ok(&client, dst, 8080, true), "plain 8080");
    events.drain();
    assert!(!tcp_ok(&client, dst, 8081, false), "plain 8081 is denied");
    let ev = drop_at(&mut events, "plain 8081", &server, |e| e.dport == 8081);
    assert_eq!((ev.drop_reason, ev.rule_cookie), (DROP_POLICY_DENY, 22));
    for (option, name) in [
        (nix::libc::IPV6_DSTOPTS, "destination options"),
        (nix::libc::IPV6_HOPOPTS, "hop-by-hop options"),
    ] {
        // The attack: the header in front of a connection to the denied port.
        events.drain();
        assert!(
            !tcp_ok_with_option(&client, dst, 8081, option, false),
            "a connection to the denied port completed behind {name}"
        );
        let ev = drop_at(&mut events, name, &server, |e| e.dport == 8081);
        assert_eq!(
            (ev.protocol, ev.drop_reason, ev.rule_cookie),
            (PROTO_TCP, DROP_POLICY_DENY, 22),
            "{name}"
        );

        // Control: the same header in front of the allowed port.
        events.drain();
        assert!(
            tcp_ok_with_option(&client, dst, 8080, option, true),
            "{name} to the allowed port"
        );
        let ev = events.wait_for("allowed 8080 with options", |e| {
            e.verdict == Verdict::Allowed && e.endpoint_id == server.endpoint_id
        });
        assert_eq!((ev.protocol, ev.dport), (PROTO_TCP, 8080), "{name}");
    }
}

#[test]
fn fragmented_datagrams_follow_the_policy_of_their_first_fragment() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("fg", 43);
    let client = fx.endpoint("cl", CLIENT);
    let server = fx.endpoint("sv", SERVER);
    let _srv = EchoServer::start(&server, &[5353, 5354]);
    let mut events = fx.events();

    // Only UDP 5353 is allowed: every fragment of a datagram to it must pass, not only the
    // first (the later ones carry no ports).
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(server.endpoint_id, &[entry(PROTO_UDP, 5353, 16, false, 31)])
        .expect("policy");
    fx.enforce(&server, SERVER, true, false);
    for dst in [v4(&server), v6(&server)] {
        assert!(
            big_udp_ok(&client, dst, 5353, 2000, true),
            "fragmented udp to {dst}:5353"
        );
    }

    // A broad L3 allow and a deny of UDP 5354: a fragmented datagram to 5354 is denied like
    // a whole one (IPv6's first fragment used to be looked up as protocol 44, port 0).
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            server.endpoint_id,
            &[
                entry(0, 0, 0, false, 32),
                entry(PROTO_UDP, 5354, 16, true, 33),
            ],
        )
        .expect("policy");
    for dst in [v4(&server), v6(&server)] {
        assert!(
            big_udp_ok(&client, dst, 5353, 2000, true),
            "control {dst}:5353"
        );
        events.drain();
        assert!(
            !big_udp_ok(&client, dst, 5354, 2000, false),
            "a fragmented datagram to the denied {dst}:5354 was delivered"
        );
        let ev = drop_at(&mut events, "first fragment", &server, |e| e.dport == 5354);
        assert_eq!(
            (ev.protocol, ev.drop_reason, ev.rule_cookie),
            (PROTO_UDP, DROP_POLICY_DENY, 33),
            "{dst}"
        );
        // The rest of the datagram has no first fragment to follow.
        let ev = drop_at(&mut events, "later fragment", &server, |e| {
            e.drop_reason == DROP_FRAG_NOT_FOUND
        });
        assert_eq!(ev.daddr, dst);
    }
}

#[test]
fn unparseable_chains_and_unplaceable_fragments_are_dropped() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("uc", 44);
    let client = fx.endpoint("cl", CLIENT);
    let server = fx.endpoint("sv", SERVER);
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            server.endpoint_id,
            &[
                entry(0, 0, 0, false, 41),
                entry(PROTO_TCP, 8081, 16, true, 42),
            ],
        )
        .expect("policy");
    fx.enforce(&server, SERVER, true, false);
    let mut events = fx.events();
    let (src, dst) = match (v6(&client), v6(&server)) {
        (IpAddr::V6(s), IpAddr::V6(d)) => (s, d),
        _ => unreachable!("v6() gives IPv6"),
    };

    // Controls: a chain within the bound is walked to TCP and its port, both ways.
    events.drain();
    send_raw_v6(
        &client,
        dst,
        ipv6_packet(src, dst, NEXTHDR_DEST, &dstopts_chain_syn(6, 8080)),
    );
    let ev = events.wait_for("allowed crafted SYN", |e| {
        e.verdict == Verdict::Allowed && e.endpoint_id == server.endpoint_id && e.dport == 8080
    });
    assert_eq!(ev.protocol, PROTO_TCP);
    events.drain();
    send_raw_v6(
        &client,
        dst,
        ipv6_packet(src, dst, NEXTHDR_DEST, &dstopts_chain_syn(6, 8081)),
    );
    let ev = drop_at(&mut events, "denied crafted SYN", &server, |e| {
        e.dport == 8081
    });
    assert_eq!(
        (ev.protocol, ev.drop_reason, ev.rule_cookie),
        (PROTO_TCP, DROP_POLICY_DENY, 42)
    );

    // Longer than the bound (8): dropped where it enters the datapath, the sender's veth.
    events.drain();
    send_raw_v6(
        &client,
        dst,
        ipv6_packet(src, dst, NEXTHDR_DEST, &dstopts_chain_syn(9, 8081)),
    );
    let ev = drop_at(&mut events, "chain of 9", &client, |e| {
        e.daddr == IpAddr::V6(dst)
    });
    assert_eq!(ev.drop_reason, DROP_INVALID_EXTHDR);
    assert_eq!(ev.direction, Direction::Egress);

    // A header that claims more bytes than the packet has.
    events.drain();
    let mut truncated = dstopts_chain_syn(1, 8081);
    truncated[1] = 20; // 168 bytes of options in a 28-byte payload
    send_raw_v6(
        &client,
        dst,
        ipv6_packet(src, dst, NEXTHDR_DEST, &truncated),
    );
    let ev = drop_at(&mut events, "truncated chain", &client, |e| {
        e.daddr == IpAddr::V6(dst)
    });
    assert_eq!(ev.drop_reason, DROP_INVALID_EXTHDR);

    // A non-first fragment of a datagram whose first fragment was never seen: the server's
    // ingress is enforced, so it is dropped there (the client's egress is not enforced).
    events.drain();
    let mut frag = vec![PROTO_TCP, 0, 0, 8 | 1, 0x53, 0x47, 0x00, 0x01];
    frag.extend_from_slice(&[0u8; 24]);
    send_raw_v6(&client, dst, ipv6_packet(src, dst, NEXTHDR_FRAGMENT, &frag));
    let ev = drop_at(&mut events, "lone later fragment", &server, |e| {
        e.daddr == IpAddr::V6(dst)
    });
    assert_eq!(ev.drop_reason, DROP_FRAG_NOT_FOUND);
    assert_eq!((ev.protocol, ev.dport), (PROTO_TCP, 0));

    // The same for IPv4: a later fragment without its first one.
    let (src4, dst4) = match (v4(&client), v4(&server)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s, d),
        _ => unreachable!("v4() gives IPv4"),
    };
    events.drain();
    send_raw_v4(&client, dst4, ipv4_later_fragment(src4, dst4, 0x5347, 185));
    let ev = drop_at(&mut events, "lone IPv4 later fragment", &server, |e| {
        e.daddr == IpAddr::V4(dst4)
    });
    assert_eq!(
        (ev.drop_reason, ev.protocol, ev.dport),
        (DROP_FRAG_NOT_FOUND, PROTO_UDP, 0)
    );

    // Hop-by-hop in front of a denied SYN: the walk starts at any extension header.
    events.drain();
    let mut hop = PADN_OPTIONS.to_vec();
    hop[0] = PROTO_TCP;
    hop.extend_from_slice(&tcp_syn(8081));
    send_raw_v6(&client, dst, ipv6_packet(src, dst, NEXTHDR_HOP, &hop));
    let ev = drop_at(&mut events, "hop-by-hop SYN", &server, |e| e.dport == 8081);
    assert_eq!(ev.drop_reason, DROP_POLICY_DENY);
}
