//! `RtNetlink` against the real kernel, each test in namespaces of its own (named per process),
//! checked with iproute2 as an independent observer.

use std::net::IpAddr;
use std::process::Command;

use sigil_netlink::{
    Fdb, Mac, Netlink, NetlinkError, Ns, Prefix, Route, RtNetlink, Vxlan, command_in_netns,
    netns_path,
};

fn can_run(what: &str) -> bool {
    sigil_test_util::can_run_as_root(what)
}

/// Namespaces removed on drop.
struct Spaces(Vec<String>);

impl Spaces {
    fn new(tag: &str, n: usize) -> Self {
        let nl = RtNetlink::new();
        let names: Vec<String> = (0..n)
            .map(|i| format!("sgnl{}-{tag}{i}", std::process::id()))
            .collect();
        for name in &names {
            nl.add_netns(name).expect("add netns");
        }
        Spaces(names)
    }
}

impl Drop for Spaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = RtNetlink::new().delete_netns(n);
        }
    }
}

fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("address")
}

#[test]
fn named_namespaces_follow_the_iproute2_convention() {
    if !can_run("the netns test") {
        return;
    }
    let nl = RtNetlink::new();
    let name = format!("sgnl{}-life", std::process::id());
    let path = nl.add_netns(&name).expect("add");
    assert_eq!(path, netns_path(&name));
    assert!(nl.netns_exists(&name));
    assert!(nl.list_netns().expect("list").contains(&name));
    let dup = nl.add_netns(&name).expect_err("second add");
    assert!(matches!(dup, NetlinkError::NetnsExists { .. }), "{dup}");
    assert!(dup.to_string().contains(&name), "{dup}");

    // `ip netns exec` finds it, and a command run inside sees only the namespace's loopback.
    let out = Command::new("ip")
        .args(["netns", "exec", &name, "cat", "/proc/net/dev"])
        .output()
        .expect("ip netns exec");
    assert!(out.status.success(), "{out:?}");
    let ours = command_in_netns(&path, "cat")
        .arg("/proc/net/dev")
        .output()
        .expect("command in netns");
    assert!(ours.status.success(), "{ours:?}");
    let devs = String::from_utf8_lossy(&ours.stdout);
    assert!(devs.contains("lo:"), "{devs}");
    assert_eq!(devs.lines().count(), 3, "only lo expected: {devs}");

    assert!(nl.delete_netns(&name).expect("delete"));
    assert!(!nl.netns_exists(&name));
    assert!(
        !nl.delete_netns(&name).expect("delete again"),
        "absent is not an error"
    );
    let err = command_in_netns(&path, "true").status().expect_err("gone");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}

#[test]
fn bad_names_are_refused_before_the_kernel_sees_them() {
    let nl = RtNetlink::new();
    for bad in ["", "..", "a/b"] {
        let err = nl.add_netns(bad).expect_err(bad);
        assert!(err.to_string().contains("namespace name"), "{err}");
    }
    let err = nl
        .add_veth(Ns::Current, "x".repeat(16).as_str(), "y", None)
        .expect_err("long name");
    assert!(err.to_string().contains(&"x".repeat(16)), "{err}");
    let err = nl
        .set_sysctl(Ns::Current, "../../etc/passwd", "x")
        .expect_err("path escape");
    assert!(err.to_string().contains("sysctl key"), "{err}");
}

#[test]
fn veth_addresses_routes_and_teardown() {
    if !can_run("the veth test") {
        return;
    }
    let sp = Spaces::new("veth", 2);
    let (a, b) = (sp.0[0].as_str(), sp.0[1].as_str());
    let nl = RtNetlink::new();
    let (na, nb) = (Ns::Named(a), Ns::Named(b));
    nl.add_veth(na, "va", "eth0", Some(b)).expect("veth");
    assert!(nl.link_index(na, "va").expect("index").is_some());
    assert!(nl.link_index(nb, "eth0").expect("index").is_some());
    assert_eq!(
        nl.link_index(na, "eth0").expect("index"),
        None,
        "peer went to b"
    );
    for (ns, link) in [(na, "va"), (nb, "eth0"), (na, "lo"), (nb, "lo")] {
        nl.set_link_up(ns, link, true).expect("up");
    }
    nl.add_address(na, "va", addr("10.77.0.1"), 24, false)
        .expect("addr");
    nl.add_address(nb, "eth0", addr("10.77.0.2"), 24, false)
        .expect("addr");
    nl.add_address(nb, "eth0", addr("fd77::2"), 64, true)
        .expect("addr6");
    let shown = ip(b, &["addr", "show", "dev", "eth0"]);
    assert!(
        shown.contains("10.77.0.2/24") && shown.contains("fd77::2/64"),
        "{shown}"
    );
    assert!(
        ip(b, &["link", "show", "eth0"]).contains("UP"),
        "eth0 not up"
    );

    let host = Route::dev("10.88.0.5/32".parse().expect("prefix"), "eth0");
    let deflt = Route::via(Prefix::default_v4(), addr("10.77.0.1"), None);
    let hole = Route::blackhole("10.99.0.0/24".parse().expect("prefix"));
    let v6 = Route::via(Prefix::default_v6(), addr("fe80::1"), Some("eth0"));
    for r in [&host, &deflt, &hole, &v6] {
        nl.replace_route(nb, r).expect("route");
        nl.replace_route(nb, r).expect("replace is idempotent");
    }
    let routes = ip(b, &["route", "show"]);
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("10.88.0.5 dev eth0") && l.contains("scope link")),
        "{routes}"
    );
    assert!(routes.contains("default via 10.77.0.1"), "{routes}");
    assert!(routes.contains("blackhole 10.99.0.0/24"), "{routes}");
    assert!(ip(b, &["-6", "route", "show"]).contains("default via fe80::1 dev eth0"));
    for r in [&host, &deflt, &hole, &v6] {
        assert!(nl.delete_route(nb, r).expect("delete"), "{r}");
        assert!(!nl.delete_route(nb, r).expect("delete again"), "{r}");
    }
    let routes = ip(b, &["route", "show"]);
    assert!(
        !routes.contains("blackhole") && !routes.contains("default"),
        "{routes}"
    );

    let err = nl
        .add_address(na, "nosuch0", addr("10.1.1.1"), 32, false)
        .expect_err("missing link");
    let msg = err.to_string();
    assert!(msg.contains("nosuch0") && msg.contains(a), "{msg}");
    let err = nl
        .add_address(na, "va", addr("10.77.0.1"), 24, false)
        .expect_err("duplicate address");
    assert_eq!(err.errno(), Some(17), "{err}");
    assert!(err.to_string().contains("10.77.0.1/24"), "{err}");

    assert!(nl.delete_link(na, "va").expect("delete"));
    assert_eq!(
        nl.link_index(nb, "eth0").expect("index"),
        None,
        "peer goes too"
    );
    assert!(!nl.delete_link(na, "va").expect("delete again"));
}

#[test]
fn links_move_between_namespaces() {
    if !can_run("the move test") {
        return;
    }
    let sp = Spaces::new("move", 2);
    let nl = RtNetlink::new();
    let (na, nb) = (Ns::Named(&sp.0[0]), Ns::Named(&sp.0[1]));
    nl.add_veth(na, "m0", "m1", None).expect("veth");
    nl.move_link(na, "m1", &sp.0[1]).expect("move");
    assert_eq!(nl.link_index(na, "m1").expect("index"), None);
    assert!(nl.link_index(nb, "m1").expect("index").is_some());
}

#[test]
fn bridge_vxlan_fdb_neighbours_and_sysctls() {
    if !can_run("the vxlan test") {
        return;
    }
    let sp = Spaces::new("vx", 1);
    let name = sp.0[0].as_str();
    let ns = Ns::Named(name);
    let nl = RtNetlink::new();
    nl.add_bridge(ns, "br0").expect("bridge");
    nl.add_veth(ns, "p0", "p1", None).expect("veth");
    nl.set_master(ns, "p0", Some("br0")).expect("master");
    assert!(ip(name, &["link", "show", "p0"]).contains("master br0"));
    nl.set_master(ns, "p0", None).expect("no master");
    assert!(!ip(name, &["link", "show", "p0"]).contains("master"));

    nl.add_veth(ns, "u0", "u1", None).expect("veth");
    nl.add_address(ns, "u0", addr("192.168.77.1"), 24, false)
        .expect("addr");
    nl.add_vxlan(
        ns,
        &Vxlan {
            name: "vx0".into(),
            vni: None,
            port: 4789,
            local: Some(addr("192.168.77.1")),
            dev: Some("u0".into()),
            external: true,
            learning: false,
            arp: false,
        },
    )
    .expect("vxlan");
    let shown = ip(name, &["-d", "link", "show", "vx0"]);
    assert!(
        shown.contains("external") && shown.contains("dstport 4789"),
        "{shown}"
    );
    assert!(shown.contains("nolearning"), "{shown}");
    assert!(shown.contains("NOARP"), "{shown}");
    let no_vni = nl
        .add_vxlan(
            ns,
            &Vxlan {
                name: "vx1".into(),
                vni: None,
                port: 4789,
                local: None,
                dev: None,
                external: false,
                learning: false,
                arp: true,
            },
        )
        .expect_err("no VNI");
    assert!(no_vni.to_string().contains("vx1"), "{no_vni}");

    nl.add_vxlan(
        ns,
        &Vxlan {
            name: "vx2".into(),
            vni: Some(42),
            port: 4789,
            local: None,
            dev: None,
            external: false,
            learning: false,
            arp: true,
        },
    )
    .expect("vxlan with vni");
    let fdb = Fdb {
        link: "vx2".into(),
        mac: "02:00:00:00:00:2a".parse().expect("mac"),
        dst: addr("192.168.77.2"),
        vni: None,
    };
    nl.replace_fdb(ns, &fdb).expect("fdb");
    nl.replace_fdb(ns, &fdb).expect("fdb replace is idempotent");
    let out = Command::new("bridge")
        .args(["-n", name, "fdb", "show", "dev", "vx2"])
        .output()
        .expect("bridge fdb");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("02:00:00:00:00:2a dst 192.168.77.2"),
        "{shown}"
    );
    assert!(nl.delete_fdb(ns, &fdb).expect("delete fdb"));
    assert!(!nl.delete_fdb(ns, &fdb).expect("delete fdb again"));

    let mac: Mac = "02:00:00:00:00:07".parse().expect("mac");
    nl.set_link_up(ns, "u0", true).expect("up");
    nl.replace_neighbour(ns, "u0", addr("192.168.77.7"), mac)
        .expect("neighbour");
    let neigh = ip(name, &["neigh", "show", "dev", "u0"]);
    assert!(
        neigh.contains("192.168.77.7 lladdr 02:00:00:00:00:07 PERMANENT"),
        "{neigh}"
    );

    nl.set_sysctl(ns, "net/ipv4/ip_forward", "1")
        .expect("sysctl");
    let out = command_in_netns(&netns_path(name), "cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let err = nl
        .set_sysctl(ns, "net/ipv4/conf/nosuch0/proxy_arp", "1")
        .expect_err("missing interface");
    assert!(
        err.to_string().contains("nosuch0") && err.to_string().contains(name),
        "{err}"
    );
}
