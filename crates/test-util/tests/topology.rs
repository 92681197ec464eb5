//! The multi-node topology fixture on the real kernel: nodes reach each other over the
//! underlay, endpoints reach their node, commands run inside a node, and nothing is left behind.

use std::net::Ipv4Addr;
use std::time::Duration;

use sigil_netlink::{Netlink, RtNetlink};
use sigil_test_util::netns::ping;
use sigil_test_util::{Topology, can_run_as_root};

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
fn node_counts_out_of_range_are_refused() {
    for n in [0, 251] {
        let err = Topology::new(n)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(&n.to_string()), "n={n}: {err}");
    }
}
