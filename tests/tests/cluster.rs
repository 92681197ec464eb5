//! A sigil cluster on this machine, as root: three nodes (network namespaces on a bridged
//! underlay), one etcd, one sigil-netd per node in cluster mode (`--kvstore etcd`, direct
//! routing: `--tunnel disabled`), endpoints on every node. One cluster is shared by the
//! phases of one test (start-up dominates the cost): identities, the connectivity matrix
//! against `sigil policy trace` before and after a policy change, hostile etcd values, claims
//! of another node's name or pod CIDR, GC, etcd killed and restarted, a netd killed and
//! restarted, a node removed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_test_util::netns::{command_in_named_netns, in_netns};
use sigil_test_util::{TestCluster, can_run_etcd, sigil_bin, wait_for};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the cluster test") && can_run_etcd("the cluster test")
}

/// Second octet of every pod CIDR of this file (10.213.<node>.0/24).
const A: u8 = 213;
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
/// How long an allowed flow may take to pass (remote entries may still be converging).
const PASS: Duration = Duration::from_secs(5);
/// How long a denied flow is given to pass before it counts as dropped.
const BLOCK: Duration = Duration::from_millis(400);
/// The nodes' lease TTL (`TestCluster`'s `--kvstore-lease-ttl`).
const TTL: Duration = Duration::from_secs(4);

/// An endpoint of the cluster and the sockets listening in it.
struct Ep {
    name: String,
    node: usize,
    ip: Ipv4Addr,
    netns: PathBuf,
    identity: u32,
    labels: Vec<String>,
    udp: Option<UdpSocket>,
}

/// Where a flow starts or ends.
enum Peer<'a> {
    Ep(&'a Ep),
    /// A node's own network namespace (source address: its underlay address).
    Node(usize),
    /// The underlay bridge's address, outside the cluster.
    World,
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn ep_json(c: &TestCluster, node: usize, name: &str) -> Value {
    let out = c.nodes[node]
        .netd
        .cli_ok(&["endpoint", "get", name])
        .expect("endpoint get");
    json(&out)
}

/// Creates an endpoint on `node` and listens on TCP 8080 and UDP 8081 inside it.
fn create(c: &TestCluster, node: usize, role: &str, labels: &str, extra: &[&str]) -> Ep {
    let name = format!("c{}-{node}-{role}", std::process::id());
    let mut args = vec!["endpoint", "create", &name, "--labels", labels];
    args.extend(extra);
    let v = json(&c.nodes[node].netd.cli_ok(&args).expect("endpoint create"));
    let ep = ep_from(node, &v);
    let netns = ep.netns.clone();
    let (tcp, udp) = in_netns(&netns, || {
        Ok((
            TcpListener::bind(("0.0.0.0", TCP_PORT))?,
            UdpSocket::bind(("0.0.0.0", UDP_PORT))?,
        ))
    })
    .expect("listen in the endpoint");
    serve_tcp(tcp);
    Ep {
        udp: Some(udp),
        ..ep
    }
}

fn ep_from(node: usize, v: &Value) -> Ep {
    Ep {
        name: v["name"].as_str().expect("name").to_owned(),
        node,
        ip: v["ipv4"].as_str().expect("ipv4").parse().expect("ipv4"),
        netns: PathBuf::from(v["netns"].as_str().expect("netns")),
        identity: v["identity"].as_u64().expect("identity") as u32,
        labels: v["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_owned())
            .collect(),
        udp: None,
    }
}

/// Accepts and drops connections for ever (a thread per listener; it ends with the process).
fn serve_tcp(l: TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
}

fn tcp_ok(from: &Path, to: Ipv4Addr, wait: Duration) -> bool {
    let to = SocketAddr::new(IpAddr::V4(to), TCP_PORT);
    let start = Instant::now();
    in_netns(from, || {
        loop {
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(false);
            }
            match TcpStream::connect_timeout(&to, left) {
                Ok(_) => return Ok(true),
                // Refused or unreachable before the policy converged: try again.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .expect("connect from netns")
}

fn udp_ok(from: &Path, to: &Ep, wait: Duration) -> bool {
    let sock = to.udp.as_ref().expect("listening endpoint");
    let payload = format!("probe-{}-{:?}", to.name, Instant::now());
    let dst = SocketAddr::new(IpAddr::V4(to.ip), UDP_PORT);
    let sender = in_netns(from, || Ok(UdpSocket::bind("0.0.0.0:0")?)).expect("udp sender");
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < wait {
        sender.send_to(payload.as_bytes(), dst).expect("send");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if &buf[..n] == payload.as_bytes() {
                return true;
            }
        }
    }
    false
}

/// `sigil policy trace` of one flow over the policy directory; true when allowed.
fn trace(policies: &Path, src: &[String], dst: &[String], dport: &str) -> bool {
    let mut args: Vec<String> = vec!["--policies".into(), policies.display().to_string()];
    args.extend(src.iter().cloned());
    args.extend(dst.iter().cloned());
    trace_args(args, dport)
}

/// `sigil policy trace --src-ip --dst-ip` against a running netd (its policies, its view of
/// the addresses); true when allowed.
fn trace_ip(
    netd: &sigil_test_util::NetdProcess,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: &str,
) -> bool {
    trace_args(
        vec![
            "--src-ip".into(),
            src.to_string(),
            "--dst-ip".into(),
            dst.to_string(),
            "--api-socket".into(),
            netd.api_socket.display().to_string(),
        ],
        dport,
    )
}

fn trace_args(flow: Vec<String>, dport: &str) -> bool {
    let mut args: Vec<String> = vec!["policy".into(), "trace".into()];
    args.extend(flow);
    args.extend([
        "--dport".into(),
        dport.into(),
        "--output".into(),
        "json".into(),
    ]);
    let out = Command::new(sigil_bin())
        .args(&args)
        .output()
        .expect("trace");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    v["verdict"] == "allowed"
}

fn peer_args(p: &Peer<'_>, side: &str, c: &TestCluster, dst_node: Option<usize>) -> Vec<String> {
    match p {
        Peer::Ep(e) => vec![format!("--{side}"), e.labels.join(",")],
        Peer::Node(n) if Some(*n) == dst_node => vec![format!("--{side}-entity"), "host".into()],
        Peer::Node(_) => vec![format!("--{side}-entity"), "remote-node".into()],
        Peer::World => vec![format!("--{side}-cidr"), world_ip(c).to_string()],
    }
}

fn world_ip(c: &TestCluster) -> Ipv4Addr {
    let IpAddr::V4(net) = c.topo.underlay.addr() else {
        panic!("IPv4 underlay");
    };
    let o = net.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 254)
}

fn peer_netns(p: &Peer<'_>, c: &TestCluster) -> PathBuf {
    match p {
        Peer::Ep(e) => e.netns.clone(),
        Peer::Node(n) => c.topo.nodes[*n].netns_path.clone(),
        Peer::World => c.topo.underlay_path(),
    }
}

fn peer_ip(p: &Peer<'_>, c: &TestCluster) -> Ipv4Addr {
    match p {
        Peer::Ep(e) => e.ip,
        Peer::Node(n) => c.topo.nodes[*n].underlay_ip,
        Peer::World => world_ip(c),
    }
}

fn peer_name(p: &Peer<'_>) -> String {
    match p {
        Peer::Ep(e) => e.name.clone(),
        Peer::Node(n) => format!("node{n}"),
        Peer::World => "world".into(),
    }
}

/// The matrix: every source to every web endpoint (TCP and UDP) and every endpoint to the
/// world listener (TCP); each cell's datapath result equals the trace's verdict.
fn check_matrix(c: &TestCluster, policies: &Path, srcs: &[Peer<'_>], dsts: &[&Ep], world: &Ep) {
    let mut mismatches = Vec::new();
    let mut cells = 0;
    for s in srcs {
        let from = peer_netns(s, c);
        for d in dsts {
            if let Peer::Ep(e) = s
                && e.name == d.name
            {
                continue;
            }
            // A node reaching an endpoint on itself is host traffic, not this test's subject.
            if let Peer::Node(n) = s
                && *n == d.node
            {
                continue;
            }
            let src = peer_args(s, "src", c, Some(d.node));
            let dst = vec!["--dst".to_owned(), d.labels.join(",")];
            for (proto, dport) in [
                ("tcp", TCP_PORT.to_string()),
                ("udp", format!("{UDP_PORT}/udp")),
            ] {
                let want = trace(policies, &src, &dst, &dport);
                // The same flow traced by address through the destination's netd.
                let by_ip = trace_ip(&c.nodes[d.node].netd, peer_ip(s, c), d.ip, &dport);
                if by_ip != want {
                    mismatches.push(format!(
                        "{} -> {} {proto}: trace by labels {want}, by address {by_ip}",
                        peer_name(s),
                        d.name
                    ));
                }
                let wait = if want { PASS } else { BLOCK };
                let got = if proto == "tcp" {
                    tcp_ok(&from, d.ip, wait)
                } else {
                    udp_ok(&from, d, wait)
                };
                cells += 1;
                if got != want {
                    mismatches.push(format!(
                        "{} -> {} {proto}: trace {want}, datapath {got}",
                        peer_name(s),
                        d.name
                    ));
                }
            }
        }
        if let Peer::Ep(_) = s {
            let src = peer_args(s, "src", c, None);
            let dst = vec!["--dst-cidr".to_owned(), world_ip(c).to_string()];
            let want = trace(policies, &src, &dst, &TCP_PORT.to_string());
            if let Peer::Ep(e) = s {
                let by_ip = trace_ip(&c.nodes[e.node].netd, e.ip, world.ip, &TCP_PORT.to_string());
                if by_ip != want {
                    mismatches.push(format!(
                        "{} -> world: trace by labels {want}, by address {by_ip}",
                        e.name
                    ));
                }
            }
            let got = tcp_ok(&from, world.ip, if want { PASS } else { BLOCK });
            cells += 1;
            if got != want {
                mismatches.push(format!(
                    "{} -> world tcp: trace {want}, datapath {got}",
                    peer_name(s)
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {cells} cells differ from the trace:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// The kernel IPCache of node `i`: host entries (address → identity).
fn kernel_ipcache(c: &TestCluster, i: usize) -> BTreeMap<IpAddr, u32> {
    let maps = sigil_datapath::Maps::open_pinned(&c.nodes[i].netd.pin_dir).expect("pinned maps");
    maps.ipcache
        .entries()
        .expect("ipcache entries")
        .into_iter()
        .filter(|e| e.prefix_len == if e.addr.is_ipv4() { 32 } else { 128 })
        .map(|e| (e.addr, e.identity))
        .collect()
}

/// Waits until node `i`'s kernel IPCache holds `ip` → `id` (`Some`) or no `ip` (`None`).
fn wait_ipcache(c: &TestCluster, i: usize, ip: Ipv4Addr, id: Option<u32>, within: Duration) {
    wait_for(&format!("node{i} IPCache {ip} = {id:?}"), within, || {
        let got = kernel_ipcache(c, i).get(&IpAddr::V4(ip)).copied();
        Ok((got != id).then(|| format!("{got:?}")))
    })
    .expect("IPCache");
}

fn write_policies(dir: &Path, yaml: &str) {
    std::fs::create_dir_all(dir).expect("policy dir");
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        std::fs::remove_file(e.path()).expect("remove old policy");
    }
    std::fs::File::create(dir.join("cluster.yaml"))
        .and_then(|mut f| f.write_all(yaml.as_bytes()))
        .expect("write policy");
}

/// Imports the policy directory on every running node (replacing what was there).
fn import_all(c: &TestCluster, dir: &Path, old: &[&str]) {
    for n in &c.nodes {
        for name in old {
            let _ = n.netd.cli(&["policy", "delete", name]);
        }
        n.netd
            .cli_ok(&[
                "policy",
                "import",
                &dir.join("cluster.yaml").display().to_string(),
            ])
            .expect("policy import");
    }
}

fn policies_v1() -> String {
    "apiVersion: cilium.io/v2\n\
     kind: CiliumClusterwideNetworkPolicy\n\
     metadata: {name: web-ingress}\n\
     spec:\n\
     \x20 endpointSelector: {matchLabels: {app: web}}\n\
     \x20 ingress:\n\
     \x20 - fromEndpoints: [{matchLabels: {app: client}}]\n\
     \x20   toPorts: [{ports: [{port: \"8080\", protocol: TCP}, {port: \"8081\", protocol: UDP}]}]\n\
     \x20 - fromEntities: [remote-node]\n\
     \x20   toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n\
     \x20 - fromEndpoints: [{matchLabels: {spiffe.io/spiffe-id: \"spiffe://example.org/admin\"}}]\n\
     ---\n\
     apiVersion: cilium.io/v2\n\
     kind: CiliumClusterwideNetworkPolicy\n\
     metadata: {name: deny-zone}\n\
     spec:\n\
     \x20 endpointSelector: {matchLabels: {app: web}}\n\
     \x20 ingressDeny:\n\
     \x20 - fromEndpoints: [{matchLabels: {zone: z1}}]\n\
     ---\n\
     apiVersion: cilium.io/v2\n\
     kind: CiliumClusterwideNetworkPolicy\n\
     metadata: {name: clients-in-cluster}\n\
     spec:\n\
     \x20 endpointSelector: {matchLabels: {app: client}}\n\
     \x20 egress:\n\
     \x20 - toEntities: [cluster]\n"
        .to_owned()
}

/// After the change: zone z2 denied instead of z1, remote nodes no longer allowed, the world
/// listener's address allowed in by CIDR, clients may reach the world too.
fn policies_v2(world: Ipv4Addr) -> String {
    format!(
        "apiVersion: cilium.io/v2\n\
         kind: CiliumClusterwideNetworkPolicy\n\
         metadata: {{name: web-ingress}}\n\
         spec:\n\
         \x20 endpointSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 ingress:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n\
         \x20 - fromCIDR: [{world}/32]\n\
         ---\n\
         apiVersion: cilium.io/v2\n\
         kind: CiliumClusterwideNetworkPolicy\n\
         metadata: {{name: deny-zone}}\n\
         spec:\n\
         \x20 endpointSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 ingressDeny:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{zone: z2}}}}]\n\
         ---\n\
         apiVersion: cilium.io/v2\n\
         kind: CiliumClusterwideNetworkPolicy\n\
         metadata: {{name: clients-in-cluster}}\n\
         spec:\n\
         \x20 endpointSelector: {{matchLabels: {{app: client}}}}\n\
         \x20 egress:\n\
         \x20 - toEntities: [cluster]\n\
         \x20 - toCIDR: [{world}/32]\n"
    )
}

const POLICY_NAMES: [&str; 3] = [
    "CiliumClusterwideNetworkPolicy/web-ingress",
    "CiliumClusterwideNetworkPolicy/deny-zone",
    "CiliumClusterwideNetworkPolicy/clients-in-cluster",
];

fn ip_in(netns: &str, args: &[&str]) {
    let out = command_in_named_netns(netns, "ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn etcd_keys(c: &TestCluster, sub: &str) -> Vec<String> {
    c.etcd
        .list_raw(&format!("{}{sub}", c.prefix()))
        .expect("etcd range")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn a_three_node_cluster_shares_identities_and_enforces_policy_across_nodes() {
    if !can_run() {
        return;
    }
    let mut c = TestCluster::start(3, A, &["--identity-gc-grace", "1s"]).expect("cluster");
    let world = world_ip(&c);

    // Every node registered, with its pod CIDR.
    let nodes = etcd_keys(&c, "nodes/");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let cidrs = etcd_keys(&c, "podcidrs/");
    for i in 0..3 {
        assert!(
            cidrs
                .iter()
                .any(|k| k.ends_with(&format!("10.{A}.{i}.0-24"))),
            "{cidrs:?}"
        );
    }

    // Endpoints: a web server and a client on every node, an admin tool with a SPIFFE ID.
    let mut webs = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        webs.push(create(&c, i, "web", "app=web", &[]));
        clients.push(create(&c, i, "cli", &format!("app=client,zone=z{i}"), &[]));
    }
    let admin = create(
        &c,
        2,
        "admin",
        "app=tool",
        &["--spiffe-id", "spiffe://example.org/admin"],
    );
    // The same labels get the same number on every node, from the cluster ID's range.
    assert!(
        webs.iter().all(|w| w.identity == webs[0].identity),
        "web identities differ"
    );
    assert_ne!(webs[0].identity, clients[0].identity);
    assert_eq!(
        webs[0].identity >> 16,
        1,
        "identity outside cluster ID 1's range"
    );
    // A listener outside the cluster, on the underlay bridge; the underlay routes pod CIDRs
    // to their nodes so it can answer.
    let (wl, _) = in_netns(&c.topo.underlay_path(), || {
        Ok((TcpListener::bind((world, TCP_PORT))?, ()))
    })
    .expect("world listener");
    serve_tcp(wl);
    for (i, n) in c.topo.nodes.iter().enumerate() {
        ip_in(
            &c.topo.underlay_netns,
            &[
                "route",
                "replace",
                &format!("10.{A}.{i}.0/24"),
                "via",
                &n.underlay_ip.to_string(),
            ],
        );
    }
    let world_ep = Ep {
        name: "world".into(),
        node: usize::MAX,
        ip: world,
        netns: c.topo.underlay_path(),
        identity: 2,
        labels: vec![],
        udp: None,
    };

    // Remote endpoints reach every node's kernel IPCache with their identities; node
    // addresses are remote-node (6).
    for i in 0..3 {
        for e in webs.iter().chain(&clients).chain([&admin]) {
            if e.node != i {
                wait_ipcache(&c, i, e.ip, Some(e.identity), Duration::from_secs(5));
                // Through the VXLAN carrier: the entry names the hosting node as tunnel endpoint.
                let maps = sigil_datapath::Maps::open_pinned(&c.nodes[i].netd.pin_dir)
                    .expect("pinned maps");
                let entry = maps.ipcache.lookup_entry(IpAddr::V4(e.ip)).expect("lookup");
                assert_eq!(
                    entry.and_then(|x| x.tunnel_endpoint),
                    Some(c.topo.nodes[e.node].underlay_ip),
                    "{} on node {i}",
                    e.ip
                );
            }
        }
        for (j, n) in c.topo.nodes.iter().enumerate() {
            if j != i {
                wait_ipcache(&c, i, n.underlay_ip, Some(6), Duration::from_secs(5));
                let maps = sigil_datapath::Maps::open_pinned(&c.nodes[i].netd.pin_dir)
                    .expect("pinned maps");
                let entry = maps
                    .ipcache
                    .lookup_entry(IpAddr::V4(n.underlay_ip))
                    .expect("lookup");
                assert!(
                    entry.is_some_and(|x| x.is_node),
                    "node {j} not a cluster node on node {i}"
                );
            }
        }
    }

    // The cluster view through the CLI: every node, the identities with their labels.
    let nodes = json(
        &c.nodes[1]
            .netd
            .cli_ok(&["node", "list", "--output", "json"])
            .expect("node list"),
    );
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert!(
        nodes
            .iter()
            .any(|n| n["name"] == "node1" && n["local"] == true),
        "{nodes:?}"
    );
    assert!(
        nodes.iter().any(|n| n["name"] == "node2"
            && n["pod_cidr_v4"] == format!("10.{A}.2.0/24").as_str()
            && n["ip"] == c.topo.nodes[2].underlay_ip.to_string().as_str()),
        "{nodes:?}"
    );
    let id = json(
        &c.nodes[0]
            .netd
            .cli_ok(&[
                "identity",
                "get",
                &admin.identity.to_string(),
                "--output",
                "json",
            ])
            .expect("identity get"),
    );
    assert_eq!(id["scope"], "cluster", "{id}");
    assert!(
        id["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .any(|l| l == "spiffe:spiffe.io/spiffe-id=spiffe://example.org/admin"),
        "{id}"
    );
    let ids = c.nodes[0]
        .netd
        .cli_ok(&["identity", "list"])
        .expect("identity list");
    assert!(
        ids.contains("remote-node") && ids.contains("k8s:app=web"),
        "{ids}"
    );
    let missing = c.nodes[0]
        .netd
        .cli(&["identity", "get", "99999"])
        .expect("run");
    assert!(!missing.status.success());

    // The matrix under policies v1, then v2; cell for cell equal to the trace.
    let pdir = c.nodes[0].netd.root.path().join("cluster-policies");
    write_policies(&pdir, &policies_v1());
    import_all(&c, &pdir, &[]);
    let mut srcs: Vec<Peer<'_>> = Vec::new();
    srcs.extend(clients.iter().map(Peer::Ep));
    srcs.push(Peer::Ep(&admin));
    srcs.push(Peer::Ep(&webs[0]));
    srcs.extend((0..3).map(Peer::Node));
    srcs.push(Peer::World);
    let dsts: Vec<&Ep> = webs.iter().collect();
    check_matrix(&c, &pdir, &srcs, &dsts, &world_ep);
    write_policies(&pdir, &policies_v2(world));
    import_all(&c, &pdir, &POLICY_NAMES);
    check_matrix(&c, &pdir, &srcs, &dsts, &world_ep);
    drop(srcs);

    // Concurrent allocation of one new label set on all nodes: one number.
    let conc: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let netd = &c.nodes[i].netd;
                s.spawn(move || {
                    let name = format!("c{}-{i}-conc", std::process::id());
                    json(
                        &netd
                            .cli_ok(&["endpoint", "create", &name, "--labels", "app=conc"])
                            .expect("create"),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ids: BTreeSet<u64> = conc
        .iter()
        .map(|v| v["identity"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ids.len(), 1, "one label set got {ids:?}");
    let conc_id = *ids.iter().next().expect("id");
    assert!(etcd_keys(&c, &format!("identities/id/{conc_id}")).len() == 1);

    // GC: once no node uses it, the number is collected after the grace (1 s); numbers in
    // use stay.
    for (i, v) in conc.iter().enumerate() {
        c.nodes[i]
            .netd
            .cli_ok(&["endpoint", "delete", v["name"].as_str().expect("name")])
            .expect("delete");
    }
    wait_for("GC of the unused identity", Duration::from_secs(10), || {
        let k = etcd_keys(&c, &format!("identities/id/{conc_id}"));
        Ok((!k.is_empty()).then(|| format!("{k:?}")))
    })
    .expect("gc");
    assert_eq!(
        etcd_keys(&c, &format!("identities/id/{}", webs[0].identity)).len(),
        1,
        "an identity in use was collected"
    );

    hostile_values(&c, &webs, &clients);
    claims_are_refused(&c);
    etcd_restart(&mut c, &webs, &clients);
    netd_restart(&mut c, &webs, &clients);
    node_removed(&mut c, &webs, &clients);
}

/// Entries another machine could write into etcd: each hostile one is rejected by every
/// node (never in a kernel IPCache), a valid control entry is installed, netd keeps serving.
fn hostile_values(c: &TestCluster, webs: &[Ep], clients: &[Ep]) {
    let p = format!("{}ipcache/", c.prefix());
    let n0 = c.topo.nodes[0].underlay_ip;
    let id = webs[0].identity;
    let entry = |node: &str, host: Ipv4Addr| {
        format!("{{\"identity\":{id},\"host_ip\":\"{host}\",\"node\":\"{node}\"}}").into_bytes()
    };
    let outside: Ipv4Addr = format!("10.{A}.1.201").parse().expect("ip");
    let unknown: Ipv4Addr = format!("10.{A}.0.202").parse().expect("ip");
    let garbage: Ipv4Addr = format!("10.{A}.0.203").parse().expect("ip");
    let huge: Ipv4Addr = format!("10.{A}.0.204").parse().expect("ip");
    let wrong_host: Ipv4Addr = format!("10.{A}.0.205").parse().expect("ip");
    let reserved: Ipv4Addr = format!("10.{A}.0.206").parse().expect("ip");
    let control: Ipv4Addr = format!("10.{A}.0.207").parse().expect("ip");
    let put = |ip: Ipv4Addr, v: &[u8]| c.etcd.put_raw(&format!("{p}{ip}"), v, None).expect("put");
    // Node 0 claims an address in node 1's pod CIDR.
    put(outside, &entry("node0", n0));
    // A node nobody registered.
    put(unknown, &entry("ghost", n0));
    put(garbage, b"{\"identity\": \"not a number\"");
    let mut big = entry("node0", n0);
    big.truncate(big.len() - 1);
    big.extend(format!(",\"pad\":\"{}\"}}", "x".repeat(512 * 1024)).into_bytes());
    put(huge, &big);
    // Node 0's name with node 1's underlay address as tunnel endpoint.
    put(wrong_host, &entry("node0", c.topo.nodes[1].underlay_ip));
    // The host identity for an endpoint address.
    put(
        reserved,
        format!("{{\"identity\":1,\"host_ip\":\"{n0}\",\"node\":\"node0\"}}").as_bytes(),
    );
    // A malformed node entry and an identity entry that is not a label set.
    c.etcd
        .put_raw(&format!("{}nodes/evil", c.prefix()), b"[1,2,3]", None)
        .expect("put");
    c.etcd
        .put_raw(
            &format!("{}identities/id/65000", c.prefix()),
            &[0xff, 0xfe, 0x00],
            None,
        )
        .expect("put");
    // Control: a valid entry of node 0, written the way node 0 writes it.
    put(control, &entry("node0", n0));
    for i in [1, 2] {
        wait_ipcache(c, i, control, Some(id), Duration::from_secs(5));
        let got = kernel_ipcache(c, i);
        for bad in [outside, unknown, garbage, huge, wrong_host, reserved] {
            assert!(
                !got.contains_key(&IpAddr::V4(bad)),
                "node{i} installed hostile entry {bad}: {:?}",
                got.get(&IpAddr::V4(bad))
            );
        }
        c.nodes[i]
            .netd
            .cli_ok(&["netd", "status"])
            .expect("netd still serves");
    }
    // An entry naming an address of node 0's own pod CIDR never lands in node 0's IPCache
    // (node 0 says what its endpoints are).
    assert_eq!(
        kernel_ipcache(c, 0).get(&IpAddr::V4(control)),
        None,
        "node0 took a remote entry for its own pod CIDR"
    );
    for ip in [
        outside, unknown, garbage, huge, wrong_host, reserved, control,
    ] {
        c.etcd.delete_raw(&format!("{p}{ip}")).expect("delete");
    }
    c.etcd
        .delete_raw(&format!("{}nodes/evil", c.prefix()))
        .expect("delete");
    c.etcd
        .delete_raw(&format!("{}identities/id/65000", c.prefix()))
        .expect("delete");
    for i in [1, 2] {
        wait_ipcache(c, i, control, None, Duration::from_secs(5));
    }
    // Legitimate traffic still flows.
    assert!(tcp_ok(&clients[0].netns, webs[2].ip, PASS));
}

/// A second netd claiming a live node's name, or its pod CIDR, is refused at start and
/// leaves nothing behind; the node keeps its entry.
fn claims_are_refused(c: &TestCluster) {
    let before = c
        .etcd
        .list_raw(&format!("{}nodes/node1", c.prefix()))
        .expect("get");
    let e = match c.spawn_netd(0, "node1", 50, &[]) {
        Ok(_) => panic!("a second node1 started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("node name \"node1\" is already held by node"),
        "{e}"
    );
    let e = match c.spawn_netd(0, "node9", 1, &[]) {
        Ok(_) => panic!("a node with node1's pod CIDR started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains(&format!(
            "pod CIDR \"10.{A}.1.0/24\" is already held by node \"node1\""
        )),
        "{e}"
    );
    assert_eq!(
        c.etcd
            .list_raw(&format!("{}nodes/node1", c.prefix()))
            .expect("get"),
        before,
        "node1's entry changed"
    );
    // The refused node9 revoked its session: no entry of it stays.
    assert!(
        etcd_keys(c, "nodes/node9").is_empty(),
        "node9 left an entry"
    );
}

/// etcd killed: enforcement goes on; a new endpoint waits at init (5), dropping everything;
/// etcd back: it takes its cluster identity and is reachable from other nodes.
fn etcd_restart(c: &mut TestCluster, webs: &[Ep], clients: &[Ep]) {
    c.etcd.kill();
    assert!(
        tcp_ok(&clients[0].netns, webs[1].ip, PASS),
        "allowed flow cut with etcd down"
    );
    assert!(
        !tcp_ok(&clients[2].netns, webs[1].ip, BLOCK),
        "denied flow passes with etcd down"
    );
    // A label set this node already holds needs no etcd round trip: same number at once
    // (`--no-wait`: its addresses cannot reach etcd, which create would wait for).
    let twin = create(c, 0, "twin", "app=client,zone=z0", &["--no-wait"]);
    assert_eq!(twin.identity, clients[0].identity);
    // A new label set waits at init (5), dropping everything, until etcd answers.
    let late = create(c, 0, "late", "app=client,zone=z0,late=yes", &["--no-wait"]);
    assert_eq!(
        late.identity, 5,
        "an endpoint created with etcd down is not at init"
    );
    assert!(
        !tcp_ok(&late.netns, webs[0].ip, BLOCK),
        "an init endpoint passes"
    );
    c.etcd.spawn().expect("etcd back");
    let mut got = 0;
    wait_for(
        "the late endpoint's cluster identity",
        Duration::from_secs(15),
        || {
            got = ep_json(c, 0, &late.name)["identity"].as_u64().unwrap_or(0) as u32;
            Ok((got >> 16 != 1).then(|| got.to_string()))
        },
    )
    .expect("converges");
    wait_ipcache(c, 1, late.ip, Some(got), Duration::from_secs(10));
    assert!(
        tcp_ok(&late.netns, webs[1].ip, PASS),
        "converged endpoint cannot reach web1"
    );
}

/// A node's netd killed: its endpoints stay enforced and known to the others (the lease is
/// resumed on restart); restarted, it adopts its state and the remote view.
fn netd_restart(c: &mut TestCluster, webs: &[Ep], clients: &[Ep]) {
    c.nodes[1].netd.kill9();
    assert!(
        tcp_ok(&clients[0].netns, webs[1].ip, PASS),
        "node1 down: allowed flow cut"
    );
    assert!(
        !tcp_ok(&clients[2].netns, webs[1].ip, BLOCK),
        "node1 down: denied flow passes"
    );
    assert!(
        tcp_ok(&clients[1].netns, webs[0].ip, PASS),
        "node1 down: its client cut"
    );
    c.nodes[1].netd.spawn().expect("netd restart");
    let log = c.nodes[1].netd.log_text();
    assert!(log.contains("resuming this node's etcd lease"), "{log}");
    for e in webs.iter().chain(clients) {
        if e.node != 1 {
            wait_ipcache(c, 1, e.ip, Some(e.identity), Duration::from_secs(5));
        }
    }
    assert!(tcp_ok(&clients[0].netns, webs[1].ip, PASS));
    assert!(!tcp_ok(&clients[2].netns, webs[1].ip, BLOCK));
    assert_eq!(
        kernel_ipcache(c, 0).get(&IpAddr::V4(webs[1].ip)),
        Some(&webs[1].identity)
    );
}

/// Node 2 removed (its netd gone for good): within its lease TTL its endpoints and address
/// leave every other IPCache; node 1's stay.
fn node_removed(c: &mut TestCluster, webs: &[Ep], clients: &[Ep]) {
    c.nodes[2].netd.kill9();
    let gone = Instant::now();
    for i in [0, 1] {
        for e in [&webs[2], &clients[2]] {
            wait_ipcache(c, i, e.ip, None, TTL + Duration::from_secs(3));
        }
        wait_ipcache(
            c,
            i,
            c.topo.nodes[2].underlay_ip,
            None,
            TTL + Duration::from_secs(3),
        );
    }
    assert!(gone.elapsed() < TTL + Duration::from_secs(3));
    assert_eq!(
        kernel_ipcache(c, 0).get(&IpAddr::V4(webs[1].ip)),
        Some(&webs[1].identity)
    );
    assert!(tcp_ok(&clients[0].netns, webs[1].ip, PASS));
}
