//! Endpoint plumbing logic against the recording `FakeNetlink`: no root needed. What it
//! creates, in which namespace, and that a failure at any step leaves nothing behind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sigil_datapath::netns::{
    EndpointSpec, IPV6_GATEWAY, blackhole_route_with, create_endpoint_with, delete_endpoint_with,
    host_interface_name, list_endpoints_with, remove_blackhole_route_with,
};
use sigil_netlink::{FakeNetlink, Netlink, Ns, Op, Prefix, Route};

fn spec(name: &str, v4: bool, v6: bool) -> EndpointSpec {
    EndpointSpec {
        name: name.to_owned(),
        mtu: None,
        ipv4: v4.then_some(Ipv4Addr::new(10, 1, 0, 5)),
        ipv6: v6.then(|| "fd00::5".parse::<Ipv6Addr>().expect("v6")),
    }
}

fn ns(n: &str) -> Option<String> {
    Some(n.to_owned())
}

#[test]
fn a_dual_stack_endpoint_gets_its_namespace_veth_addresses_and_routes() {
    let nl = FakeNetlink::new();
    let net = create_endpoint_with(&nl, &spec("web", true, true)).expect("create");
    let host = host_interface_name("web");
    assert_eq!(net.netns, "sigil-web");
    assert_eq!(net.host_interface, host);
    assert_eq!(net.interface, "eth0");
    assert_eq!(
        Some(net.endpoint_id),
        nl.link_index(Ns::Current, &host).expect("index")
    );

    let ops = nl.ops();
    assert_eq!(
        ops[0],
        Op::AddNetns {
            name: "sigil-web".into()
        }
    );
    assert_eq!(
        ops[1],
        Op::AddVeth {
            ns: None,
            name: host.clone(),
            peer: "eth0".into(),
            peer_ns: ns("sigil-web"),
        },
        "the peer is created inside the namespace, never as eth0 on the node"
    );
    let v4: IpAddr = "10.1.0.5".parse().expect("ip");
    let v6: IpAddr = "fd00::5".parse().expect("ip");
    for want in [
        Op::SetSysctl {
            ns: None,
            key: format!("net/ipv4/conf/{host}/proxy_arp"),
            value: "1".into(),
        },
        Op::SetSysctl {
            ns: None,
            key: format!("net/ipv4/neigh/{host}/proxy_delay"),
            value: "0".into(),
        },
        Op::SetSysctl {
            ns: None,
            key: "net/ipv4/ip_forward".into(),
            value: "1".into(),
        },
        Op::SetSysctl {
            ns: None,
            key: "net/ipv6/conf/all/forwarding".into(),
            value: "1".into(),
        },
        Op::AddAddress {
            ns: None,
            link: host.clone(),
            address: IpAddr::V6(IPV6_GATEWAY),
            prefix_len: 64,
            nodad: true,
        },
        Op::SetLinkUp {
            ns: ns("sigil-web"),
            link: "lo".into(),
            up: true,
        },
        Op::AddAddress {
            ns: ns("sigil-web"),
            link: "eth0".into(),
            address: v4,
            prefix_len: 32,
            nodad: false,
        },
        Op::AddAddress {
            ns: ns("sigil-web"),
            link: "eth0".into(),
            address: v6,
            prefix_len: 128,
            nodad: true,
        },
        Op::ReplaceRoute {
            ns: ns("sigil-web"),
            route: Route::dev(Prefix::default_v4(), "eth0"),
        },
        Op::ReplaceRoute {
            ns: ns("sigil-web"),
            route: Route::via(Prefix::default_v6(), IpAddr::V6(IPV6_GATEWAY), Some("eth0")),
        },
        Op::ReplaceRoute {
            ns: None,
            route: Route::dev(Prefix::host(v4), &host),
        },
        Op::ReplaceRoute {
            ns: None,
            route: Route::dev(Prefix::host(v6), &host),
        },
    ] {
        assert!(ops.contains(&want), "missing {want:?} in {ops:#?}");
    }
    assert_eq!(
        list_endpoints_with(&nl).expect("list"),
        vec!["web".to_owned()]
    );
}

#[test]
fn an_ipv4_only_endpoint_touches_no_ipv6_setting() {
    let nl = FakeNetlink::new();
    create_endpoint_with(&nl, &spec("v4only", true, false)).expect("create");
    let ops = nl.ops();
    assert!(
        !ops.iter()
            .any(|o| format!("{o:?}").contains("ipv6") || format!("{o:?}").contains("fe80")),
        "{ops:#?}"
    );
}

#[test]
fn a_failure_at_any_step_removes_what_was_created() {
    // Count the steps of a good run, then fail each one in turn.
    let steps = {
        let nl = FakeNetlink::new();
        create_endpoint_with(&nl, &spec("web", true, true)).expect("create");
        nl.ops().len()
    };
    for fail_at in 0..steps {
        let nl = FakeNetlink::new();
        let seen = std::sync::atomic::AtomicUsize::new(0);
        nl.fail_when(move |_| seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == fail_at);
        let err = create_endpoint_with(&nl, &spec("web", true, true)).expect_err("injected");
        assert!(
            err.to_string().contains("injected failure"),
            "step {fail_at}: {err}"
        );
        assert!(
            nl.links().is_empty(),
            "step {fail_at}: links left {:?}",
            nl.links()
        );
        assert!(
            !nl.netns_exists("sigil-web"),
            "step {fail_at}: namespace left"
        );
        assert!(
            nl.routes().iter().all(|(ns, _)| ns.is_some()),
            "step {fail_at}: node routes left {:?}",
            nl.routes()
        );
    }
}

#[test]
fn existing_namespaces_and_host_veths_are_refused_untouched() {
    let nl = FakeNetlink::new();
    nl.add_netns("sigil-web").expect("seed");
    let err = create_endpoint_with(&nl, &spec("web", true, false)).expect_err("exists");
    assert!(
        err.to_string().contains("sigil-web already exists"),
        "{err}"
    );
    assert!(
        nl.netns_exists("sigil-web"),
        "the existing namespace must stay"
    );

    let nl = FakeNetlink::new();
    nl.seed_link(Ns::Current, &host_interface_name("api"));
    let err = create_endpoint_with(&nl, &spec("api", true, false)).expect_err("exists");
    assert!(err.to_string().contains("host interface"), "{err}");
    assert_eq!(nl.ops(), vec![], "nothing may be created or deleted");
}

#[test]
fn an_mtu_is_set_on_the_endpoint_side_before_it_comes_up_and_the_node_side_keeps_its_own() {
    let nl = FakeNetlink::new();
    let plain = create_endpoint_with(&nl, &spec("plain", true, false)).expect("create");
    assert_eq!(
        nl.link_mtu(Ns::Named(&plain.netns), "eth0").expect("mtu"),
        Some(sigil_netlink::FAKE_DEFAULT_MTU),
        "without an MTU the kernel's stays"
    );
    let tunneled = create_endpoint_with(
        &nl,
        &EndpointSpec {
            mtu: Some(1450),
            ..spec("tunneled", true, true)
        },
    )
    .expect("create");
    assert_eq!(
        nl.link_mtu(Ns::Named(&tunneled.netns), "eth0")
            .expect("mtu"),
        Some(1450)
    );
    assert_eq!(
        nl.link_mtu(Ns::Current, &tunneled.host_interface)
            .expect("mtu"),
        Some(sigil_netlink::FAKE_DEFAULT_MTU)
    );
    let ops = nl.ops();
    let set = ops
        .iter()
        .position(|o| matches!(o, Op::SetMtu { mtu: 1450, link, .. } if link == "eth0"))
        .expect("the MTU is set");
    let up = ops
        .iter()
        .rposition(|o| matches!(o, Op::SetLinkUp { link, up: true, ns } if link == "eth0" && *ns == Some("sigil-tunneled".into())))
        .expect("eth0 comes up");
    assert!(set < up, "the MTU is set before the interface comes up");
}

#[test]
fn bad_specs_are_refused_before_any_operation() {
    let nl = FakeNetlink::new();
    let cases = [
        (
            EndpointSpec {
                name: "-x".into(),
                mtu: None,
                ipv4: None,
                ipv6: None,
            },
            "endpoint name",
        ),
        (
            EndpointSpec {
                name: "a".into(),
                mtu: None,
                ipv4: Some(Ipv4Addr::BROADCAST),
                ipv6: None,
            },
            "ipv4",
        ),
        (
            EndpointSpec {
                name: "a".into(),
                mtu: None,
                ipv4: None,
                ipv6: Some("ff02::1".parse().expect("v6")),
            },
            "ipv6",
        ),
        (
            EndpointSpec {
                name: "a".into(),
                mtu: Some(1279),
                ipv4: None,
                ipv6: None,
            },
            "invalid mtu \"1279\"",
        ),
        (
            EndpointSpec {
                name: "a".into(),
                mtu: Some(65536),
                ipv4: None,
                ipv6: None,
            },
            "65536",
        ),
    ];
    for (s, field) in cases {
        let err = create_endpoint_with(&nl, &s).expect_err(field);
        assert!(err.to_string().contains(field), "{err}");
    }
    assert_eq!(nl.ops(), vec![]);
}

#[test]
fn delete_removes_veth_and_namespace_and_tolerates_absence() {
    let nl = FakeNetlink::new();
    create_endpoint_with(&nl, &spec("web", true, false)).expect("create");
    delete_endpoint_with(&nl, "web").expect("delete");
    assert!(nl.links().is_empty() && !nl.netns_exists("sigil-web"));
    delete_endpoint_with(&nl, "web").expect("absent is fine");
}

#[test]
fn blackhole_routes_take_a_cidr_of_either_family() {
    let nl = FakeNetlink::new();
    blackhole_route_with(&nl, "10.9.0.0/24").expect("v4");
    blackhole_route_with(&nl, "fd00:9::/64").expect("v6");
    assert_eq!(nl.routes().len(), 2);
    remove_blackhole_route_with(&nl, "10.9.0.0/24").expect("remove");
    remove_blackhole_route_with(&nl, "10.9.0.0/24").expect("remove again is fine");
    assert_eq!(nl.routes().len(), 1);
    let err = blackhole_route_with(&nl, "10.9.0.0").expect_err("no length");
    assert!(
        err.to_string().contains("cidr") && err.to_string().contains("10.9.0.0"),
        "{err}"
    );
}
