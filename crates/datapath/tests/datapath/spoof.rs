//! Source-address spoofing: an endpoint that sends with another endpoint's address is stopped at
//! its own veth (132), before it can borrow that endpoint's identity or its connections; a host
//! process that sends with a local endpoint's address (IP_FREEBIND) is stopped at the veth of
//! the endpoint it sends to (132).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    DROP_INVALID_SIP, DROP_POLICY_DENIED, Direction, EndpointConfig, IDENTITY_HOST, PROTO_TCP,
    PROTO_UDP, PolicyEntry, PolicyKey, Verdict,
};

use crate::support::{
    BLOCK_WAIT, EchoServer, Events, Fixture, PASS_WAIT, can_run, in_netns, rule, tcp_ok, udp_ok,
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

fn allow_any(remote: u32, port: u16, cookie: u32) -> (PolicyKey, PolicyEntry) {
    rule(remote, Direction::Ingress, (0, port, 16), false, cookie)
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

/// Sends one UDP datagram from the host's network namespace. `mode` "freebind" binds `src`
/// with IP_FREEBIND / IPV6_FREEBIND first (any user may set it, and it lets the bind name an
/// address the host does not have), "transparent" with IP_TRANSPARENT (needs CAP_NET_ADMIN),
/// "own" binds nothing: the kernel picks the host's own source address.
const HOST_SENDER: &str = r#"
import socket, sys
mode, src, dst, port, payload = sys.argv[1:6]
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
if mode == "freebind" and family == socket.AF_INET:
    s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
elif mode == "freebind":
    s.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
elif mode == "transparent":
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
if mode != "own":
    s.bind((src, 0))
s.sendto(payload.encode(), (dst, int(port)))
"#;

/// Runs [`HOST_SENDER`] in the host's namespace, as nobody (no capabilities, no groups) when
/// `unprivileged`, else as root; the sender's stderr if it failed.
fn send_from_host(
    unprivileged: bool,
    mode: &str,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    payload: &str,
) -> Result<(), String> {
    let mut cmd = if unprivileged {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", python()]);
        c
    } else {
        Command::new(python())
    };
    let out = cmd
        .args(["-c", HOST_SENDER, mode, &src.to_string(), &dst.to_string()])
        .args([&port.to_string(), payload])
        .output()
        .expect("run the host sender");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A python3 that the unprivileged user can run (a per-user install such as pyenv's under
/// /root is not).
fn python() -> &'static str {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3")
}

/// The source address the host's own stack picks towards `dst`.
fn host_source_towards(dst: IpAddr) -> IpAddr {
    let any: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any).expect("bind in the host namespace");
    sock.connect((dst, 9)).expect("route from the host");
    sock.local_addr().expect("local addr").ip()
}

#[test]
fn host_users_cannot_send_with_a_local_endpoints_address() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("hb", 46);
    let trusted = fx.endpoint("b", TRUSTED);
    let target = fx.endpoint("c", TARGET);
    // The target allows the trusted endpoint on 8090 and the host on 8091, nobody else.
    let mut host_only = allow_any(IDENTITY_HOST, 8091, 14);
    host_only.0.protocol = PROTO_UDP;
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(
            target.endpoint_id,
            &[allow_any(TRUSTED, 8090, 13), host_only],
        )
        .expect("policy");
    fx.enforce(&target, TARGET, true, false);
    for dst in [v4(&target), v6(&target)] {
        let own = host_source_towards(dst);
        let len = if own.is_ipv4() { 32 } else { 128 };
        fx.dp
            .maps_mut()
            .ipcache
            .upsert(own, len, IDENTITY_HOST)
            .expect("host address in the ipcache");
    }
    let mut events = fx.events();

    for (borrowed, dst) in [(v4(&trusted), v4(&target)), (v6(&trusted), v6(&target))] {
        let rx = udp_bound(&target, dst, 8090);

        // The attack: an unprivileged host user binds the trusted endpoint's address with
        // FREEBIND and sends to the target, which only accepts the trusted endpoint. For IPv4
        // the kernel itself refuses to route a source the host does not have unless the socket
        // is IP_TRANSPARENT (CAP_NET_ADMIN), so there the datapath is shown the same packet
        // from a root process.
        events.drain();
        let unprivileged = send_from_host(true, "freebind", borrowed, dst, 8090, "impersonated");
        if borrowed.is_ipv4() {
            let err = unprivileged.expect_err("IPv4 FREEBIND send with a foreign source");
            assert!(err.contains("Network is unreachable"), "{err}");
            send_from_host(false, "transparent", borrowed, dst, 8090, "impersonated")
                .expect("root sender with IP_TRANSPARENT");
        } else {
            unprivileged.expect("unprivileged IPv6 FREEBIND sender");
        }
        assert!(
            !receives(&rx, b"impersonated", BLOCK_WAIT),
            "a host process's datagram from {borrowed} reached {dst} as the trusted endpoint"
        );
        let what = format!("132 drop at the target of {borrowed} -> {dst}:8090 from the host");
        let ev = events.wait_for(&what, |e| {
            e.verdict == Verdict::Dropped
                && e.endpoint_id == target.endpoint_id
                && e.saddr == borrowed
                && e.dport == 8090
        });
        assert_eq!(ev.drop_reason, DROP_INVALID_SIP, "{what}");
        assert_eq!(ev.direction, Direction::Ingress, "{what}");
        assert_eq!(ev.protocol, PROTO_UDP, "{what}");
        assert_eq!(ev.src_identity, TRUSTED, "{what}: the identity it claimed");

        // Control: the trusted endpoint itself, with the same address, gets through.
        let tx = udp_bound(&trusted, borrowed, 0);
        tx.send_to(b"legit", (dst, 8090)).expect("send legit");
        assert!(
            receives(&rx, b"legit", PASS_WAIT),
            "trusted {borrowed} -> {dst}"
        );

        // Control: the same unprivileged user with the host's own address is the host, which
        // the target allows on 8091.
        let host_rx = udp_bound(&target, dst, 8091);
        send_from_host(true, "own", dst, dst, 8091, "from the host")
            .expect("unprivileged sender with the host's address");
        assert!(
            receives(&host_rx, b"from the host", PASS_WAIT),
            "host -> {dst}:8091 with the host's own address"
        );
    }
}
