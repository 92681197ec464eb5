//! The multi-node topology fixture on the real kernel: nodes reach each other over the
//! underlay (ICMP and TCP), endpoints reach their node, processes run inside a node, and
//! nothing is left behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sigil_netlink::{Netlink, RtNetlink};
use sigil_test_util::netns::{in_netns, ping};
use sigil_test_util::{TestNetns, Topology, can_run_as_root};

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn three_nodes_reach_each_other_and_their_endpoints() -> anyhow::Result<()> {
    if !can_run_as_root("the topology test") {
        return Ok(());
    }
    let mut topo = Topology::new(3)?;
    let tag = topo.tag.clone();
    for a in &topo.nodes {
        for b in &topo.nodes {
            if a.index != b.index {
                assert!(
                    ping(&a.netns_path, b.underlay_ip, WAIT)?,
                    "node {} cannot ping node {} at {}",
                    a.index,
                    b.index,
                    b.underlay_ip
                );
            }
        }
    }
    let e0 = topo.add_endpoint(0, Ipv4Addr::new(10, 200, 0, 10))?;
    let e2 = topo.add_endpoint(2, Ipv4Addr::new(10, 200, 2, 10))?;
    let n0 = topo.node(0)?.clone();
    let n2 = topo.node(2)?.clone();
    assert!(
        ping(&e0.netns_path, n0.underlay_ip, WAIT)?,
        "endpoint 0 cannot ping its node"
    );
    assert!(
        ping(&e2.netns_path, n2.underlay_ip, WAIT)?,
        "endpoint 2 cannot ping its node"
    );
    assert!(
        ping(&n0.netns_path, e0.ip, WAIT)?,
        "node 0 cannot ping its endpoint"
    );
    // Control: no route between pod ranges across nodes has been set up, so the endpoint of
    // node 0 must not reach the one of node 2 (the fixture adds no hidden connectivity).
    assert!(
        !ping(&e0.netns_path, e2.ip, Duration::from_millis(600))?,
        "endpoint 0 reached endpoint 2 without any route for it"
    );
    // A process started in a node sees the node's interfaces, not the host's.
    let out = n0.command("cat").arg("/proc/net/dev").output()?;
    assert!(out.status.success(), "cat in node 0 failed: {out:?}");
    let devs = String::from_utf8_lossy(&out.stdout);
    assert!(devs.contains("eth0:") && devs.contains("e0:"), "{devs}");
    assert!(
        !devs.contains("br0:"),
        "node 0 sees the underlay bridge: {devs}"
    );

    // TCP across the underlay: a listener opened inside node 2, a client inside node 0.
    let n1 = topo.node(1)?.clone();
    let listener = in_netns(&n2.netns_path, || {
        Ok(TcpListener::bind((n2.underlay_ip, 0))?)
    })?;
    let port = listener.local_addr()?.port();
    let mut client = in_netns(&n0.netns_path, || {
        Ok(TcpStream::connect_timeout(
            &(n2.underlay_ip, port).into(),
            WAIT,
        )?)
    })?;
    let (mut server, peer) = listener.accept()?;
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(n0.underlay_ip),
        "source is node 0's underlay"
    );
    client.write_all(b"hello")?;
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hello");
    // Control: the listener lives in node 2 only; node 1 has no such socket.
    let refused = in_netns(&n1.netns_path, || {
        Ok(TcpStream::connect_timeout(&(n1.underlay_ip, port).into(), WAIT).is_err())
    })?;
    assert!(refused, "node 1 accepted a connection on node 2's port");

    // A daemon started in a node runs in that node's namespace and is killed on drop.
    let mut guard = n1.spawn(n1.command("sleep").arg("30"))?;
    let pid = guard.child().map(|c| c.id()).unwrap_or_default();
    let ns_of = |p: &str| std::fs::metadata(p).map(|m| m.ino());
    assert_eq!(
        ns_of(&format!("/proc/{pid}/ns/net"))?,
        ns_of(&n1.netns_path.display().to_string())?,
        "the process is not in node 1's namespace"
    );
    drop(guard);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon outlived its guard"
    );

    drop(topo);
    let left: Vec<String> = RtNetlink::new()
        .list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn a_panicking_test_still_removes_its_topology() -> anyhow::Result<()> {
    if !can_run_as_root("the topology clean-up test") {
        return Ok(());
    }
    let tag = std::thread::scope(|s| {
        s.spawn(|| -> String {
            let topo = Topology::new(1).expect("topology");
            let tag = topo.tag.clone();
            std::panic::panic_any(tag)
        })
        .join()
        .expect_err("the thread panics")
        .downcast::<String>()
        .map(|b| *b)
        .unwrap_or_default()
    });
    assert!(tag.starts_with("sgt"), "unexpected panic payload {tag:?}");
    let left: Vec<String> = RtNetlink::new()
        .list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .collect();
    assert!(
        left.is_empty(),
        "namespaces left behind after a panic: {left:?}"
    );
    Ok(())
}

#[test]
fn namespaces_of_killed_test_runs_are_swept() -> anyhow::Result<()> {
    if !can_run_as_root("the topology sweep test") {
        return Ok(());
    }
    let nl = RtNetlink::new();
    // A pid above the kernel's maximum (4194304) never belongs to a live process.
    let stale = "sgt4999999x0-n0";
    let _ = nl.add_netns(stale);
    let live = format!("sgt{}x999-n0", std::process::id());
    nl.add_netns(&live)?;
    let topo = Topology::new(1)?;
    let after = nl.list_netns()?;
    let live_kept = after.contains(&live);
    nl.delete_netns(&live)?;
    drop(topo);
    assert!(
        !after.iter().any(|n| n == stale),
        "stale namespace not swept"
    );
    assert!(live_kept, "a namespace of a live process was swept");
    Ok(())
}

#[test]
fn a_test_netns_is_isolated_and_removed_on_drop() -> anyhow::Result<()> {
    if !can_run_as_root("the netns fixture test") {
        return Ok(());
    }
    let ns = TestNetns::new("fx")?;
    let path = ns.path.clone();
    assert!(ping(&ns.path, Ipv4Addr::LOCALHOST, WAIT)?, "lo is not up");
    // Nothing but lo inside: the host's addresses are unreachable.
    let devs = ns.run(|| Ok(std::fs::read_to_string("/proc/thread-self/net/dev")?))?;
    assert_eq!(devs.lines().count(), 3, "{devs}");
    let out = ns.command("cat").arg("/proc/net/dev").output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), devs);
    drop(ns);
    assert!(!path.exists(), "{} left behind", path.display());
    Ok(())
}

#[test]
fn node_counts_out_of_range_are_refused() {
    for n in [0, 251] {
        let err = Topology::new(n)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&n.to_string()), "n={n}: {err}");
    }
}
