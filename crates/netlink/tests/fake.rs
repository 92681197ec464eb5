//! The recording fake behaves like the kernel where callers can tell: names clash, peers go
//! together, a namespace takes its links with it, and injected failures change nothing.

use sigil_netlink::{FakeNetlink, Netlink, NetlinkError, Ns, Op, Prefix, Route};

#[test]
fn veth_peers_and_namespaces_are_modelled() {
    let nl = FakeNetlink::new();
    nl.add_netns("a").expect("netns");
    assert_eq!(nl.link_index(Ns::Named("a"), "lo").expect("lo"), Some(1));
    nl.add_veth(Ns::Current, "h0", "eth0", Some("a"))
        .expect("veth");
    assert!(nl.link_index(Ns::Current, "h0").expect("h0").is_some());
    assert_eq!(nl.link_index(Ns::Current, "eth0").expect("eth0"), None);
    let dup = nl
        .add_veth(Ns::Current, "h0", "x", None)
        .expect_err("name taken");
    assert_eq!(dup.errno(), Some(17), "{dup}");

    assert!(nl.delete_link(Ns::Current, "h0").expect("delete"));
    assert_eq!(
        nl.link_index(Ns::Named("a"), "eth0").expect("peer"),
        None,
        "peer goes too"
    );
    assert!(!nl.delete_link(Ns::Current, "h0").expect("again"));

    nl.add_veth(Ns::Current, "h1", "eth0", Some("a"))
        .expect("veth");
    assert!(nl.delete_netns("a").expect("delete netns"));
    assert_eq!(
        nl.link_index(Ns::Current, "h1").expect("h1"),
        None,
        "peer of a link in a"
    );
    assert!(!nl.delete_netns("a").expect("again"));
    let err = nl.link_index(Ns::Named("a"), "lo").expect_err("gone");
    assert!(err.to_string().contains("netns a"), "{err}");
}

#[test]
fn operations_on_missing_links_name_the_link_and_namespace() {
    let nl = FakeNetlink::new();
    nl.add_netns("b").expect("netns");
    let err = nl
        .set_link_up(Ns::Named("b"), "eth9", true)
        .expect_err("missing");
    assert!(matches!(err, NetlinkError::NoSuchLink { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("eth9") && msg.contains("netns b"), "{msg}");
    let route = Route::dev(Prefix::default_v4(), "eth9");
    assert!(nl.replace_route(Ns::Named("b"), &route).is_err());
}

#[test]
fn injected_failures_are_recorded_and_change_nothing() {
    let nl = FakeNetlink::new();
    nl.fail_when(|op| matches!(op, Op::AddBridge { .. }));
    let err = nl.add_bridge(Ns::Current, "br0").expect_err("injected");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(nl.link_index(Ns::Current, "br0").expect("index"), None);
    assert_eq!(
        nl.ops(),
        vec![Op::AddBridge {
            ns: None,
            name: "br0".into()
        }]
    );
    nl.add_veth(Ns::Current, "v0", "v1", None)
        .expect("other ops still work");
}

#[test]
fn routes_replace_by_destination() {
    let nl = FakeNetlink::new();
    nl.seed_link(Ns::Current, "a0");
    nl.seed_link(Ns::Current, "b0");
    let dst: Prefix = "10.0.0.5/32".parse().expect("prefix");
    nl.replace_route(Ns::Current, &Route::dev(dst, "a0"))
        .expect("route");
    nl.replace_route(Ns::Current, &Route::dev(dst, "b0"))
        .expect("replace");
    assert_eq!(
        nl.routes(),
        vec![(None, "route 10.0.0.5/32 dev b0".to_owned())]
    );
    assert!(nl.delete_link(Ns::Current, "b0").expect("delete"));
    assert!(nl.routes().is_empty(), "a link's routes go with it");
}
