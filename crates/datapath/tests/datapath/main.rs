//! Datapath tests against real namespaces, veths and TC programs (root only; see support).

mod exthdr;
mod icmp;
mod nd;
mod policy_map;
mod spoof;
mod support;
mod txn;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    AuthKey, DROP_AUTH_REQUIRED, DROP_POLICY_DENIED, DROP_POLICY_DENY, Datapath, Direction,
    PROTO_TCP, PROTO_UDP, PolicyEntry, PolicyKey, Verdict, decide, intent_of, lpm_keys, normalize,
};
use support::{
    BLOCK_WAIT, EchoServer, Events, Fixture, PASS_WAIT, TestNet, can_run, echo, register, rule,
    tcp_connect, tcp_ok, udp_ok,
};

const FRONTEND: u32 = 1001;
const BACKEND: u32 = 1002;
const OTHER: u32 = 1003;

fn v4(ep: &EndpointNet) -> IpAddr {
    IpAddr::V4(ep.ipv4.expect("endpoint has IPv4"))
}

fn v6(ep: &EndpointNet) -> IpAddr {
    IpAddr::V6(ep.ipv6.expect("endpoint has IPv6"))
}

fn allow(
    remote: u32,
    protocol: u8,
    port: u16,
    port_prefix_len: u8,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    rule(
        remote,
        Direction::Ingress,
        (protocol, port, port_prefix_len),
        false,
        cookie,
    )
}

fn deny(
    remote: u32,
    protocol: u8,
    port: u16,
    port_prefix_len: u8,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    rule(
        remote,
        Direction::Ingress,
        (protocol, port, port_prefix_len),
        true,
        cookie,
    )
}

/// One flow of a connectivity matrix, checked against the pure model of the datapath.
struct Flow<'a> {
    from: &'a EndpointNet,
    from_identity: u32,
    to: &'a EndpointNet,
    protocol: u8,
    port: u16,
    ipv6: bool,
}

/// Sends the flow and checks: it passes exactly when `decide()` on the destination's policy
/// says so, and a drop is reported with the reason and cookie `decide()` gives.
fn check_flow(
    events: &mut Events,
    flow: &Flow<'_>,
    dst_policy: &[(PolicyKey, PolicyEntry)],
    dst_enforced: bool,
) -> bool {
    let map = normalize(&intent_of(dst_policy).expect("valid policy"));
    let want = decide(
        &map,
        flow.from_identity,
        Direction::Ingress,
        flow.protocol,
        flow.port,
        dst_enforced,
        false,
    );
    let expect_pass = want.drop_reason == 0;
    let dst = if flow.ipv6 { v6(flow.to) } else { v4(flow.to) };
    events.drain();
    let passed = match flow.protocol {
        PROTO_TCP => tcp_ok(flow.from, dst, flow.port, expect_pass),
        PROTO_UDP => udp_ok(flow.from, dst, flow.port, expect_pass),
        p => panic!("no client for protocol {p}"),
    };
    let label = format!(
        "{} -> {}:{} proto {} (expected drop reason {})",
        flow.from.name, dst, flow.port, flow.protocol, want.drop_reason
    );
    assert_eq!(passed, expect_pass, "{label}");
    if !expect_pass {
        let ev = events.wait_for(&label, |e| {
            e.verdict == Verdict::Dropped
                && e.endpoint_id == flow.to.endpoint_id
                && e.dport == flow.port
                && e.protocol == flow.protocol
        });
        assert_eq!(ev.drop_reason, want.drop_reason, "{label}");
        assert_eq!(ev.rule_cookie, want.rule_cookie, "{label}");
        assert_eq!(ev.direction, Direction::Ingress, "{label}");
        assert_eq!(
            (ev.src_identity, ev.daddr),
            (flow.from_identity, dst),
            "{label}"
        );
    }
    passed
}

#[test]
fn default_deny_drops_and_reports_policy_denied() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("dd", 1);
    let fe = fx.endpoint("fe", FRONTEND);
    let be = fx.endpoint("be", BACKEND);
    let _srv = EchoServer::start(&be, &[8080]);
    let mut events = fx.events();

    assert!(
        tcp_ok(&fe, v4(&be), 8080, true),
        "not enforced: traffic passes"
    );
    fx.enforce(&be, BACKEND, true, false);
    events.drain();
    assert!(!tcp_ok(&fe, v4(&be), 8080, false), "default deny must drop");
    let ev = events.wait_for("the drop", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == be.endpoint_id && e.dport == 8080
    });
    assert_eq!(ev.drop_reason, DROP_POLICY_DENIED);
    assert_eq!(ev.direction, Direction::Ingress);
    assert_eq!(ev.endpoint_id, be.endpoint_id);
    assert_eq!((ev.src_identity, ev.dst_identity), (FRONTEND, BACKEND));
    assert_eq!((ev.saddr, ev.daddr), (v4(&fe), v4(&be)));
    assert_eq!(ev.dport, 8080);
}

#[test]
fn connectivity_matrix_follows_policy_changes() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("mx", 2);
    let fe = fx.endpoint("fe", FRONTEND);
    let be = fx.endpoint("be", BACKEND);
    let other = fx.endpoint("ot", OTHER);
    let _srv_be = EchoServer::start(&be, &[8080, 8081, 8090, 9090]);
    let _srv_fe = EchoServer::start(&fe, &[8080]);
    let mut events = fx.events();

    let policies: Vec<(&str, Vec<(PolicyKey, PolicyEntry)>)> = vec![
        ("none", vec![]),
        (
            "frontend tcp/8080",
            vec![allow(FRONTEND, PROTO_TCP, 8080, 16, 1)],
        ),
        (
            "any tcp/9090, deny other",
            vec![allow(0, PROTO_TCP, 9090, 16, 2), deny(OTHER, 0, 0, 0, 3)],
        ),
        // Protocol ANY with a port range 8080-8087 (expanded to TCP, UDP, SCTP).
        (
            "frontend any/8080-8087",
            vec![allow(FRONTEND, 0, 8080, 13, 4)],
        ),
        (
            "deny beats a more specific allow of the same identity",
            vec![
                allow(FRONTEND, PROTO_TCP, 8080, 16, 5),
                deny(FRONTEND, PROTO_TCP, 8080, 12, 6),
            ],
        ),
        (
            "deny of any identity beats an allow",
            vec![allow(FRONTEND, 0, 0, 0, 7), deny(0, PROTO_TCP, 8081, 16, 8)],
        ),
    ];
    let mut passes = 0;
    for (name, policy) in &policies {
        eprintln!("policy: {name}");
        fx.dp
            .maps_mut()
            .policy
            .replace_policy(be.endpoint_id, policy)
            .expect("replace");
        fx.enforce(&be, BACKEND, true, false);
        let mut flows = Vec::new();
        for (from, id) in [(&fe, FRONTEND), (&other, OTHER)] {
            for (protocol, port) in [
                (PROTO_TCP, 8080),
                (PROTO_TCP, 8081),
                (PROTO_TCP, 8090),
                (PROTO_TCP, 9090),
                (PROTO_UDP, 8080),
            ] {
                flows.push(Flow {
                    from,
                    from_identity: id,
                    to: &be,
                    protocol,
                    port,
                    ipv6: false,
                });
            }
        }
        flows.push(Flow {
            from: &fe,
            from_identity: FRONTEND,
            to: &be,
            protocol: PROTO_TCP,
            port: 8080,
            ipv6: true,
        });
        flows.push(Flow {
            from: &fe,
            from_identity: FRONTEND,
            to: &be,
            protocol: PROTO_UDP,
            port: 8080,
            ipv6: true,
        });
        for flow in &flows {
            passes += usize::from(check_flow(&mut events, flow, policy, true));
        }
        // The frontend is not enforced: the backend reaches it whatever the backend's policy.
        let back = Flow {
            from: &be,
            from_identity: BACKEND,
            to: &fe,
            protocol: PROTO_TCP,
            port: 8080,
            ipv6: false,
        };
        assert!(check_flow(&mut events, &back, &[], false));
    }
    assert!(
        passes > 5,
        "the matrix must contain allowed flows, got {passes}"
    );

    let counters = &fx.dp.maps().counters;
    let dropped = counters
        .get(be.endpoint_id, Verdict::Dropped)
        .expect("counter");
    let allowed = counters
        .get(be.endpoint_id, Verdict::Allowed)
        .expect("counter");
    let replies = counters
        .get(be.endpoint_id, Verdict::AllowedReply)
        .expect("counter");
    assert!(
        dropped.packets > 10 && dropped.bytes > dropped.packets * 40,
        "{dropped:?}"
    );
    assert!(
        allowed.packets > 10 && allowed.bytes > allowed.packets * 40,
        "{allowed:?}"
    );
    assert!(replies.packets > 5, "{replies:?}");
}

#[test]
fn established_connection_is_cut_by_a_policy_change() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("cut", 3);
    let fe = fx.endpoint("fe", FRONTEND);
    let be = fx.endpoint("be", BACKEND);
    let _srv = EchoServer::start(&be, &[8080]);
    let mut events = fx.events();
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &[allow(FRONTEND, PROTO_TCP, 8080, 16, 10)])
        .expect("policy");
    // Both directions enforced with no egress entries: the backend's replies pass only as
    // replies of the tracked connection.
    fx.enforce(&be, BACKEND, true, true);

    let mut conn = tcp_connect(&fe, v4(&be), 8080, PASS_WAIT).expect("allowed connect");
    assert!(echo(&mut conn, b"one", PASS_WAIT));
    let opened = events.wait_for("the new connection", |e| {
        e.verdict == Verdict::Allowed && e.endpoint_id == be.endpoint_id && e.dport == 8080
    });
    assert_eq!(opened.rule_cookie, 10);
    events.wait_for("the first reply", |e| {
        e.verdict == Verdict::AllowedReply && e.endpoint_id == be.endpoint_id
    });
    let tracked = fx.dp.maps().conntrack.entries().expect("ct");
    assert!(
        tracked
            .iter()
            .any(|c| c.endpoint_id == be.endpoint_id && c.dport == 8080 && c.seen_reply),
        "{tracked:?}"
    );
    assert!(
        echo(&mut conn, b"two", PASS_WAIT),
        "established traffic keeps passing"
    );

    // A connection the backend opens itself is new egress traffic: dropped.
    events.drain();
    assert!(!tcp_ok(&be, v4(&fe), 8080, false));
    let ev = events.wait_for("backend egress drop", |e| {
        e.verdict == Verdict::Dropped && e.direction == Direction::Egress
    });
    assert_eq!(ev.drop_reason, DROP_POLICY_DENIED);

    events.drain();
    fx.dp
        .maps_mut()
        .policy
        .upsert_policy(be.endpoint_id, &[deny(FRONTEND, PROTO_TCP, 8080, 16, 11)])
        .expect("deny");
    assert!(
        !echo(&mut conn, b"three", BLOCK_WAIT),
        "the next packets must be dropped"
    );
    let ev = events.wait_for("the cut connection", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == be.endpoint_id && e.dport == 8080
    });
    assert_eq!((ev.drop_reason, ev.rule_cookie), (DROP_POLICY_DENY, 11));
    assert_eq!(ev.sport, conn.local_addr().expect("local addr").port());
}

#[test]
fn auth_required_drops_until_authenticated() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("auth", 5);
    let fe = fx.endpoint("fe", FRONTEND);
    let be = fx.endpoint("be", BACKEND);
    let _srv = EchoServer::start(&be, &[8080]);
    let mut events = fx.events();
    let (k, v) = allow(FRONTEND, PROTO_TCP, 8080, 16, 20);
    let entry = (
        k,
        PolicyEntry {
            auth_required: true,
            ..v
        },
    );
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &[entry])
        .expect("policy");
    fx.enforce(&be, BACKEND, true, false);

    events.drain();
    assert!(!tcp_ok(&fe, v4(&be), 8080, false));
    let ev = events.wait_for("auth drop", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == be.endpoint_id && e.dport == 8080
    });
    assert_eq!((ev.drop_reason, ev.rule_cookie), (DROP_AUTH_REQUIRED, 20));

    let key = AuthKey {
        local_identity: BACKEND,
        remote_identity: FRONTEND,
        remote_node: 0,
    };
    fx.dp
        .maps_mut()
        .auth
        .grant(key, Duration::from_secs(60))
        .expect("grant");
    assert!(tcp_ok(&fe, v4(&be), 8080, true), "authenticated: allowed");

    // An expired authentication counts as none.
    fx.dp.maps_mut().auth.grant_until(key, 1).expect("expire");
    events.drain();
    assert!(!tcp_ok(&fe, v4(&be), 8080, false));
    let ev = events.wait_for("expired auth drop", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == be.endpoint_id && e.dport == 8080
    });
    assert_eq!(ev.drop_reason, DROP_AUTH_REQUIRED);
}

#[test]
fn ipv6_and_udp_are_enforced() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("v6", 6);
    let fe = fx.endpoint("fe", FRONTEND);
    let be = fx.endpoint("be", BACKEND);
    let _srv = EchoServer::start(&be, &[5353]);
    let mut events = fx.events();
    assert!(udp_ok(&fe, v6(&be), 5353, true));
    assert!(tcp_ok(&fe, v6(&be), 5353, true));
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &[allow(FRONTEND, PROTO_TCP, 5353, 16, 30)])
        .expect("policy");
    fx.enforce(&be, BACKEND, true, false);
    events.drain();
    assert!(tcp_ok(&fe, v6(&be), 5353, true));
    assert!(!udp_ok(&fe, v6(&be), 5353, false));
    let ev = events.wait_for("udp v6 drop", |e| {
        e.verdict == Verdict::Dropped && e.endpoint_id == be.endpoint_id && e.dport == 5353
    });
    assert_eq!(
        (ev.protocol, ev.dport, ev.drop_reason),
        (PROTO_UDP, 5353, DROP_POLICY_DENIED)
    );
    assert_eq!((ev.saddr, ev.daddr), (v6(&fe), v6(&be)));
}

/// The loader child: loads into the pin dir, applies a setup, attaches, says READY and waits
/// to be killed. Run only by `enforcement_survives_loader_kill_and_pins_are_readopted`.
#[test]
#[ignore = "helper process for another test"]
fn loader_child() {
    let (Ok(pin), Ok(setup)) = (
        std::env::var("SIGIL_DP_CHILD_PIN"),
        std::env::var("SIGIL_DP_CHILD_SETUP"),
    ) else {
        return;
    };
    let mut dp = Datapath::load(std::path::Path::new(&pin)).expect("child load");
    for line in setup.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u32 { f[i].parse().expect("number") };
        match f.as_slice() {
            ["ipcache", addr, id] => {
                let addr: IpAddr = addr.parse().expect("addr");
                let len = if addr.is_ipv4() { 32 } else { 128 };
                dp.maps_mut()
                    .ipcache
                    .upsert(addr, len, id.parse().expect("id"))
                    .expect("ipcache");
            }
            ["endpoint", ..] => dp
                .maps_mut()
                .endpoints
                .set(
                    num(1),
                    sigil_datapath::EndpointConfig {
                        identity: num(2),
                        ingress_enforced: f[3] == "1",
                        egress_enforced: f[4] == "1",
                        ipv4: f.get(5).and_then(|a| a.parse().ok()),
                        ipv6: f.get(6).and_then(|a| a.parse().ok()),
                    },
                )
                .expect("endpoint"),
            ["policy", ..] => {
                // policy EP REMOTE DIRECTION PROTOCOL PORT DENY COOKIE
                let (k, v) = allow(num(2), num(4) as u8, num(5) as u16, 16, num(7));
                let e = (
                    PolicyKey {
                        direction: Direction::from_u8(num(3) as u8).expect("direction"),
                        ..k
                    },
                    PolicyEntry {
                        deny: f[6] == "1",
                        ..v
                    },
                );
                dp.maps_mut()
                    .policy
                    .upsert_policy(num(1), &[e])
                    .expect("policy");
            }
            ["attach", iface] => dp.attach(iface).expect("attach"),
            other => panic!("bad setup line {other:?}"),
        }
    }
    println!("SIGIL-CHILD-READY");
    // Block until killed (or the parent closes stdin).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn filters(iface: &str, hook: &str) -> usize {
    let out = Command::new("tc")
        .args(["filter", "show", "dev", iface, hook])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .matches("handle 0x5347 sigil_")
        .count()
}

#[test]
fn enforcement_survives_loader_kill_and_pins_are_readopted() {
    if !can_run() {
        return;
    }
    let mut net = TestNet::new("kill", 7);
    let pin = support::pin_dir("kill");
    net.cleanup.pin_dirs.push(pin.clone());
    let fe = net.endpoint("fe");
    let be = net.endpoint("be");
    let other = net.endpoint("ot");
    let _srv = EchoServer::start(&be, &[8080]);

    let mut setup = String::new();
    for (ep, id, ingress) in [(&fe, FRONTEND, 0), (&be, BACKEND, 1), (&other, OTHER, 0)] {
        setup += &format!("ipcache {} {id}\nipcache {} {id}\n", v4(ep), v6(ep));
        setup += &format!(
            "endpoint {} {id} {ingress} 0 {} {}\n",
            ep.endpoint_id,
            v4(ep),
            v6(ep)
        );
        setup += &format!("attach {}\n", ep.host_interface);
    }
    setup += &format!("policy {} {FRONTEND} 0 6 8080 0 40\n", be.endpoint_id);
    setup += &format!("policy {} {OTHER} 0 6 8080 1 41\n", be.endpoint_id);

    let mut child = Command::new(std::env::current_exe().expect("test exe"))
        .args([
            "--exact",
            "loader_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SIGIL_DP_CHILD_PIN", &pin)
        .env("SIGIL_DP_CHILD_SETUP", &setup)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn loader child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("SIGIL-CHILD-READY") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    if ready.is_err() {
        let _ = child.kill();
        panic!("loader child never became ready");
    }
    assert!(tcp_ok(&fe, v4(&be), 8080, true), "child's allow");
    assert!(!tcp_ok(&other, v4(&be), 8080, false), "child's deny");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let _ = child.wait();

    // Nobody holds the programs now but the filters and the pins.
    assert_eq!(filters(&be.host_interface, "ingress"), 1);
    assert_eq!(filters(&be.host_interface, "egress"), 1);
    let mut events = Events::open(&pin);
    events.drain();
    assert!(
        tcp_ok(&fe, v4(&be), 8080, true),
        "allow still allows after kill -9"
    );
    assert!(
        !tcp_ok(&other, v4(&be), 8080, false),
        "deny still denies after kill -9"
    );
    let ev = events.wait_for("deny after the loader died", |e| {
        e.verdict == Verdict::Dropped
    });
    assert_eq!((ev.drop_reason, ev.rule_cookie), (DROP_POLICY_DENY, 41));

    // Restart: adopt the pinned maps with their entries, re-attach in place, reconcile.
    let mut dp = Datapath::load(&pin).expect("reload");
    let installed: BTreeMap<PolicyKey, PolicyEntry> = dp
        .maps()
        .policy
        .installed(be.endpoint_id)
        .into_iter()
        .collect();
    let child_policy = [
        allow(FRONTEND, PROTO_TCP, 8080, 16, 40),
        deny(OTHER, PROTO_TCP, 8080, 16, 41),
    ];
    assert_eq!(
        installed,
        normalize(&intent_of(&child_policy).expect("intent"))
    );
    assert_eq!(
        dp.maps().ipcache.lookup(v4(&other)).expect("lookup"),
        Some(OTHER)
    );
    for ep in [&fe, &be, &other] {
        dp.attach(&ep.host_interface).expect("re-attach");
    }
    assert_eq!(
        filters(&be.host_interface, "ingress"),
        1,
        "re-attach replaces, not adds"
    );
    assert!(
        !tcp_ok(&other, v4(&be), 8080, false),
        "still denied after re-attach"
    );

    let reconciled = [allow(OTHER, PROTO_TCP, 8080, 16, 42)];
    dp.maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &reconciled)
        .expect("reconcile");
    assert!(
        tcp_ok(&other, v4(&be), 8080, true),
        "new policy allows other"
    );
    assert!(!tcp_ok(&fe, v4(&be), 8080, false), "stale allow is gone");
    let reopened = sigil_datapath::Maps::open_pinned(&pin).expect("open pinned");
    let keys: Vec<PolicyKey> = reopened
        .policy
        .installed(be.endpoint_id)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, lpm_keys(&reconciled[0].0).expect("keys"));

    for ep in [&fe, &be, &other] {
        Datapath::detach(&ep.host_interface).expect("detach");
        assert_eq!(
            filters(&ep.host_interface, "ingress") + filters(&ep.host_interface, "egress"),
            0
        );
    }
    register(&mut dp, &be, BACKEND, true, false);
    assert!(
        tcp_ok(&other, v4(&be), 8080, true),
        "detached: nothing enforces"
    );
}

#[test]
fn endpoint_plumbing_rejects_bad_input_and_cleans_up() {
    if !can_run() {
        return;
    }
    use sigil_datapath::netns::{self, EndpointSpec};
    let mut net = TestNet::new("bad", 9);
    let ep = net.endpoint("a");
    assert!(netns::list_endpoints().expect("list").contains(&ep.name));
    assert_eq!(
        ep.netns_path,
        std::path::PathBuf::from("/run/netns").join(&ep.netns)
    );

    let dup = netns::create_endpoint(&EndpointSpec {
        name: ep.name.clone(),
        mtu: None,
        ipv4: Some("10.231.9.200".parse().expect("addr")),
        ipv6: None,
    })
    .expect_err("duplicate name");
    assert!(
        dup.to_string().contains("already exists") && dup.to_string().contains(&ep.name),
        "{dup}"
    );
    assert_eq!(
        netns::ifindex(&ep.host_interface).expect("ifindex"),
        ep.endpoint_id,
        "original untouched"
    );

    let bad_name = netns::create_endpoint(&EndpointSpec {
        name: "bad/name".into(),
        mtu: None,
        ipv4: None,
        ipv6: None,
    })
    .expect_err("bad name");
    assert!(bad_name.to_string().contains("bad/name"), "{bad_name}");
    let multicast = format!("{}-m", ep.name);
    let err = netns::create_endpoint(&EndpointSpec {
        name: multicast.clone(),
        mtu: None,
        ipv4: Some("224.0.0.1".parse().expect("addr")),
        ipv6: None,
    })
    .expect_err("multicast address");
    assert!(
        err.to_string().contains("ipv4") && err.to_string().contains("224.0.0.1"),
        "{err}"
    );
    assert!(!netns::netns_exists(&multicast));

    netns::delete_endpoint(&ep.name).expect("delete");
    netns::delete_endpoint(&ep.name).expect("delete again is fine");
    assert!(!netns::netns_exists(&ep.name));
    assert!(!netns::interface_exists(&ep.host_interface));
}
