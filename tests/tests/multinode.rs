//! sigil-netd on the multi-node topology fixture, as root: one netd per node namespace, each
//! plumbing its endpoints inside its own node (not on the test host), each enforcing policy on
//! its own endpoints only.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use sigil_test_util::netns::ping;
use sigil_test_util::{NetdProcess, Topology};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the multi-node test")
}

const PASS: Duration = Duration::from_secs(5);
const BLOCK: Duration = Duration::from_millis(800);

/// Interface names in `/proc/net/dev` as seen by a `cat` run through `cmd`.
fn interfaces(mut cmd: std::process::Command) -> String {
    let out = cmd.arg("/proc/net/dev").output().expect("cat");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_node_runs_its_own_netd_that_plumbs_and_enforces_inside_that_node() {
    if !can_run() {
        return;
    }
    let topo = Topology::new(2).expect("topology");
    // Declared after the topology: stopped (and their endpoints removed) before it goes.
    let netds: Vec<NetdProcess> = topo
        .nodes
        .iter()
        .map(|n| {
            NetdProcess::start_in(
                Some(&n.netns),
                &format!("mn{}", n.index),
                211,
                n.index as u8,
            )
            .expect("netd in node")
        })
        .collect();
    let pid = std::process::id();
    let mut eps = Vec::new();
    for (node, netd) in topo.nodes.iter().zip(&netds) {
        let name = format!("mn{pid}-{}", node.index);
        let out = netd
            .cli_ok(&["endpoint", "create", &name, "--labels", "app=client"])
            .expect("endpoint create");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let host = v["host_interface"].as_str().unwrap_or_default().to_owned();
        let netns = v["netns"].as_str().unwrap_or_default().to_owned();
        let ip: Ipv4Addr = v["ipv4"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .expect("ipv4");
        assert!(
            ip.octets()[..3] == [10, 211, node.index as u8],
            "endpoint {ip} outside node {}'s pod CIDR",
            node.index
        );
        // The host side of the veth is in the node, not on the machine running the test.
        assert!(
            interfaces(node.command("cat")).contains(&format!("{host}:")),
            "{host} not in node {}",
            node.index
        );
        assert!(
            !std::fs::read_to_string("/proc/self/net/dev")
                .expect("own interfaces")
                .contains(&format!("{host}:")),
            "{host} leaked into the test's namespace"
        );
        eps.push((name, netns, host));
    }

    // Control: with no policy, each endpoint reaches its node.
    for (node, (_, netns, _)) in topo.nodes.iter().zip(&eps) {
        assert!(
            ping(Path::new(netns), node.underlay_ip, PASS).expect("ping"),
            "endpoint of node {} cannot reach its node",
            node.index
        );
    }

    // Node 0's netd gets a policy that denies its endpoint's egress to the underlay; node 1's
    // netd never sees it.
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: no-underlay\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: client}}}}\n  egressDeny:\n  \
         - toCIDR: [{}]\n",
        topo.underlay
    );
    let file = netds[0].root.path().join("no-underlay.yaml");
    std::fs::write(&file, policy).expect("write policy");
    netds[0]
        .cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    assert!(
        !ping(Path::new(&eps[0].1), topo.nodes[0].underlay_ip, BLOCK).expect("ping"),
        "node 0's netd does not enforce its policy on its endpoint"
    );
    assert!(
        ping(Path::new(&eps[1].1), topo.nodes[1].underlay_ip, PASS).expect("ping"),
        "node 0's policy leaked into node 1's datapath"
    );

    // Deleting an endpoint removes its veth from the node.
    for ((node, netd), (name, _, host)) in topo.nodes.iter().zip(&netds).zip(&eps) {
        netd.cli_ok(&["endpoint", "delete", name])
            .expect("endpoint delete");
        assert!(
            !interfaces(node.command("cat")).contains(&format!("{host}:")),
            "{host} still in node {}",
            node.index
        );
    }
}
