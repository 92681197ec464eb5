//! Source-address spoofing: an endpoint that sends with another endpoint's address is stopped at
//! its own veth (132), before it can borrow that endpoint's identity or its connections.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    DROP_INVALID_SIP, DROP_POLICY_DENIED, Direction, EndpointConfig, PROTO_TCP, PROTO_UDP,
    PolicyEntry, Verdict,
};

use crate::support::{
    BLOCK_WAIT, EchoServer, Events, Fixture, PASS_WAIT, can_run, in_netns, tcp_ok, udp_ok,
};

const ATTACKER: u32 = 1101;
const TRUSTED: u32 = 1102;
const TARGET: u32 = 1103;

fn v4(ep: &EndpointNet) -> IpAddr {
    IpAddr::V4(ep.ipv4.expect("endpoint has IPv4"))
}

fn v6(ep: &EndpointNet) -> IpAddr {
    IpAddr::V6(ep.ipv6.expect("endpoint has IPv6"))
}

fn allow_any(remote: u32, port: u16, cookie: u32) -> PolicyEntry {
    PolicyEntry {
        remote_identity: remote,
        direction: Direction::Ingress,
        protocol: 0,
        port,
        port_prefix_len: 16,
        deny: false,
        l7_redirect: false,
        auth_required: false,
        rule_cookie: cookie,
    }
}

/// Gives the endpoint's interface another address inside its namespace (no duplicate address
/// detection, so it is usable at once): what a compromised workload with CAP_NET_ADMIN does.
fn borrow_address(ep: &EndpointNet, addr: IpAddr) {
    let cidr = match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    };
    let mut args = vec!["-n", &ep.netns, "addr", "add", &cidr, "dev", &ep.interface];
    if addr.is_ipv6() {
        args.push("nodad");
    }
    let out = Command::new("ip").args(&args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP socket inside `ep` bound to `addr:port`.
fn udp_bound(ep: &EndpointNet, addr: IpAddr, port: u16) -> UdpSocket {
    in_netns(ep, move || UdpSocket::bind((addr, port)).expect("bind udp"))
}

/// Whether `sock` receives a datagram with `payload` within `wait`.
fn receives(sock: &UdpSocket, payload: &[u8], wait: Duration) -> bool {
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if &buf[..n] == payload {
            return true;
        }
    }
    false
}

/// Sends a TCP SYN from inside `ep` with source `src` (non-blocking connect: the SYN leaves at
/// once, whatever happens to it).
fn send_syn_from(ep: &EndpointNet, src: IpAddr, dst: IpAddr, port: u16) {
    in_netns(ep, move || {
        let family = if src.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).expect("socket");
        let local = SockaddrStorage::from(SocketAddr::new(src, 0));
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &local).expect("bind to the borrowed address");
        let remote = SockaddrStorage::from(SocketAddr::new(dst, port));
        // EINPROGRESS: the SYN is on its way.
        let _ = connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &remote);
        // Keep the socket until the SYN has left.
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// Waits for the 132 drop of a packet that left `ep` with source `src` to `port`.
fn expect_spoof_drop(events: &mut Events, ep: &EndpointNet, src: IpAddr, protocol: u8, port: u16) {
    let what = format!(
        "132 drop at {} of {src} -> :{port} proto {protocol}",
        ep.name
    );
    let ev = events.wait_for(&what, |e| {
        e.verdict == Verdict::Dropped
            && e.endpoint_id == ep.endpoint_id
            && e.saddr == src
            && e.dport == port
            && e.protocol == protocol
    });
    assert_eq!(ev.drop_reason, DROP_INVALID_SIP, "{what}");
    assert_eq!(ev.direction, Direction::Egress, "{what}");
    assert_eq!(
        ev.src_identity, ATTACKER,
        "{what}: the sender's own identity"
    );
}

#[test]
fn spoofed_source_addresses_are_dropped_at_the_senders_veth() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("sp", 40);
    let attacker = fx.endpoint("a", ATTACKER);
    let trusted = fx.endpoint("b", TRUSTED);
    let target = fx.endpoint("c", TARGET);
    let _srv = EchoServer::start(&target, &[8080]);
    // The target allows the trusted endpoint (any protocol) on 8080 and 8090, nobody else.
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            target.endpoint_id,
            &[allow_any(TRUSTED, 8080, 11), allow_any(TRUSTED, 8090, 12)],
        )
        .expect("policy");
    fx.enforce(&target, TARGET, true, false);
    let mut events = fx.events();

    // Controls: the trusted endpoint's own traffic passes; the attacker with its own address is
    // handled by the target's policy (default deny, 133).
    for dst in [v4(&target), v6(&target)] {
        assert!(udp_ok(&trusted, dst, 8080, true), "trusted udp to {dst}");
        assert!(tcp_ok(&trusted, dst, 8080, true), "trusted tcp to {dst}");
        events.drain();
        assert!(
            !udp_ok(&attacker, dst, 8080, false),
            "attacker udp to {dst}"
        );
        let ev = events.wait_for("attacker's own-address drop", |e| {
            e.verdict == Verdict::Dropped && e.endpoint_id == target.endpoint_id && e.dport == 8080
        });
        assert_eq!(ev.drop_reason, DROP_POLICY_DENIED);
        assert_eq!(ev.src_identity, ATTACKER);
    }

    // The attack: the attacker sends with the trusted endpoint's IPv4 and IPv6 addresses.
    for (borrowed, dst) in [(v4(&trusted), v4(&target)), (v6(&trusted), v6(&target))] {
        borrow_address(&attacker, borrowed);
        let rx = udp_bound(&target, dst, 8090);
        let before = fx
            .dp
            .maps()
            .counters
            .get(attacker.endpoint_id, Verdict::Dropped)
            .expect("counter");
        events.drain();

        let tx = udp_bound(&attacker, borrowed, 0);
        tx.send_to(b"spoofed", (dst, 8090)).expect("send spoofed");
        assert!(
            !receives(&rx, b"spoofed", BLOCK_WAIT),
            "a datagram from {borrowed} sent by the attacker reached {dst}"
        );
        expect_spoof_drop(&mut events, &attacker, borrowed, PROTO_UDP, 8090);

        send_syn_from(&attacker, borrowed, dst, 8080);
        expect_spoof_drop(&mut events, &attacker, borrowed, PROTO_TCP, 8080);

        let after = fx
            .dp
            .maps()
            .counters
            .get(attacker.endpoint_id, Verdict::Dropped)
            .expect("counter");
        assert!(
            after.packets >= before.packets + 2,
            "drop counter of the attacker: {before:?} -> {after:?}"
        );

        // Control: the real owner of the address still gets through.
        let tx = udp_bound(&trusted, borrowed, 0);
        tx.send_to(b"legit", (dst, 8090)).expect("send legit");
        assert!(
            receives(&rx, b"legit", PASS_WAIT),
            "trusted {borrowed} -> {dst}"
        );
        assert!(
            tcp_ok(&trusted, dst, 8080, true),
            "trusted tcp after the attack"
        );
    }
}

#[test]
fn an_endpoint_sends_only_from_addresses_its_config_names() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("na", 45);
    let sender = fx.endpoint("s", ATTACKER);
    let receiver = fx.endpoint("r", TARGET);
    let _srv = EchoServer::start(&receiver, &[8080]);
    let mut events = fx.events();
    // Control: both families pass while the config names both addresses.
    assert!(udp_ok(&sender, v4(&receiver), 8080, true));
    assert!(udp_ok(&sender, v6(&receiver), 8080, true));

    // Without an IPv6 address in its config, the endpoint's own IPv6 source is not its.
    fx.dp
        .maps_mut()
        .endpoints
        .set(
            sender.endpoint_id,
            EndpointConfig {
                identity: ATTACKER,
                ingress_enforced: false,
                egress_enforced: false,
                ipv4: sender.ipv4,
                ipv6: None,
            },
        )
        .expect("config");
    events.drain();
    assert!(
        !udp_ok(&sender, v6(&receiver), 8080, false),
        "v6 without a v6 address"
    );
    expect_spoof_drop(&mut events, &sender, v6(&sender), PROTO_UDP, 8080);
    assert!(
        udp_ok(&sender, v4(&receiver), 8080, true),
        "v4 still passes"
    );

    // Without any config, nothing leaves it.
    fx.dp
        .maps_mut()
        .endpoints
        .remove(sender.endpoint_id)
        .expect("remove config");
    events.drain();
    assert!(!udp_ok(&sender, v4(&receiver), 8080, false), "no config");
    let ev = events.wait_for("drop without config", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == sender.endpoint_id && e.dport == 8080
    });
    assert_eq!(ev.drop_reason, DROP_INVALID_SIP);
}

#[test]
fn replies_cannot_be_forged_through_another_endpoints_connection() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("fr", 41);
    let attacker = fx.endpoint("a", ATTACKER);
    let trusted = fx.endpoint("b", TRUSTED);
    let target = fx.endpoint("c", TARGET);
    let _srv = EchoServer::start(&trusted, &[5353]);
    // The target accepts nothing inbound: only replies to its own connections get in.
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(target.endpoint_id, &[])
        .expect("policy");
    fx.enforce(&target, TARGET, true, false);
    let mut events = fx.events();

    for (target_addr, trusted_addr, attacker_addr) in [
        (v4(&target), v4(&trusted), v4(&attacker)),
        (v6(&target), v6(&trusted), v6(&attacker)),
    ] {
        // Control: the target's connection to the trusted endpoint, and its real reply.
        let client = udp_bound(&target, target_addr, 0);
        let client_port = client.local_addr().expect("local addr").port();
        client
            .send_to(b"hello", (trusted_addr, 5353))
            .expect("send to trusted");
        assert!(
            receives(&client, b"hello", PASS_WAIT),
            "the real reply from {trusted_addr}"
        );

        // Control: the attacker with its own address is not a reply; policy drops it.
        events.drain();
        let own = udp_bound(&attacker, attacker_addr, 5353);
        own.send_to(b"own", (target_addr, client_port))
            .expect("send own");
        assert!(!receives(&client, b"own", BLOCK_WAIT));
        let ev = events.wait_for("attacker's own-address packet", |e| {
            e.verdict == Verdict::Dropped
                && e.endpoint_id == target.endpoint_id
                && e.dport == client_port
        });
        assert_eq!(ev.drop_reason, DROP_POLICY_DENIED);

        // The attack: a "reply" from the trusted endpoint's address and port, matching the
        // target's conntrack entry of its connection to the trusted endpoint.
        borrow_address(&attacker, trusted_addr);
        events.drain();
        let forger = udp_bound(&attacker, trusted_addr, 5353);
        forger
            .send_to(b"forged", (target_addr, client_port))
            .expect("send forged");
        assert!(
            !receives(&client, b"forged", BLOCK_WAIT),
            "a forged reply from {trusted_addr}:5353 reached the target"
        );
        expect_spoof_drop(&mut events, &attacker, trusted_addr, PROTO_UDP, client_port);

        // The real connection still works.
        client
            .send_to(b"again", (trusted_addr, 5353))
            .expect("send again");
        assert!(receives(&client, b"again", PASS_WAIT), "real reply after");
    }
}
