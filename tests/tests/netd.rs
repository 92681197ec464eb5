//! sigil-netd end to end, as root in real network namespaces: endpoints with TCP/UDP echo
//! servers, a connectivity matrix checked against `policy trace`, cutting an established
//! connection, kill -9 and restart, bad input leaving the kernel unchanged, and an import the
//! kernel policy map cannot hold refused whole.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sigil_datapath::{Direction, Maps, PROTO_TCP, PolicyEntry, PolicyKey};
use sigil_policy::{Document, Peer, TraceVerdict, parse_documents, trace};
use sigil_test_util::netns::probe_echo as probe;
use sigil_test_util::netns::{in_netns, named_netns_path};
use sigil_test_util::{Children, NetdProcess, sigil_bin};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the netd test")
}

/// A namespace outside the pods standing in for the world: a veth from the node, its own /24.
struct World {
    netns: String,
    host_if: String,
    addr: String,
}

impl World {
    fn new(tag: &str, subnet: u8) -> Self {
        let netns = format!("world{}{tag}", std::process::id());
        let host_if = format!("wh{}{tag}", std::process::id() % 100_000);
        let w = World {
            netns: netns.clone(),
            host_if: host_if.clone(),
            addr: format!("10.250.{subnet}.2"),
        };
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &netns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        run(&[
            "addr",
            "add",
            &format!("10.250.{subnet}.1/24"),
            "dev",
            &host_if,
        ]);
        run(&["link", "set", &host_if, "up"]);
        run(&["-n", &netns, "link", "set", "lo", "up"]);
        run(&["-n", &netns, "link", "set", "eth0", "up"]);
        run(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", w.addr),
            "dev",
            "eth0",
        ]);
        run(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.250.{subnet}.1"),
        ]);
        w
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

#[derive(Debug, Clone)]
struct Ep {
    name: String,
    netns: String,
    ipv4: String,
    identity: u32,
    endpoint_id: u32,
    /// Labels as `policy trace --src` takes them.
    trace_labels: String,
}

fn create(netd: &NetdProcess, name: &str, app: &str, spiffe: Option<&str>) -> Ep {
    let mut args = vec!["endpoint", "create", name, "--labels"];
    let labels = format!("app={app}");
    args.push(&labels);
    if let Some(s) = spiffe {
        args.extend(["--spiffe-id", s]);
    }
    let out = netd.cli_ok(&args).expect("endpoint create");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    for field in ["name", "netns", "interface", "ipv4", "ipv6", "identity"] {
        assert!(!v[field].is_null(), "create output lacks {field}: {out}");
    }
    assert!(
        Path::new(v["netns"].as_str().unwrap_or("")).exists(),
        "{out}"
    );
    let mut trace_labels = format!("app={app},io.kubernetes.pod.namespace=default");
    if let Some(s) = spiffe {
        trace_labels.push_str(&format!(",spiffe.io/spiffe-id={s}"));
    }
    Ep {
        name: name.to_owned(),
        netns: v["netns_name"].as_str().unwrap_or_default().to_owned(),
        ipv4: v["ipv4"].as_str().unwrap_or_default().to_owned(),
        identity: u32::try_from(v["identity"].as_u64().unwrap_or(0)).unwrap_or(0),
        endpoint_id: u32::try_from(v["endpoint_id"].as_u64().unwrap_or(0)).unwrap_or(0),
        trace_labels,
    }
}

/// Waits until the echo servers answer (they start asynchronously).
fn wait_servers(netns: &str, targets: &[(&str, u16)]) {
    for (addr, port) in targets {
        let start = Instant::now();
        while !probe(netns, addr, *port, false) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server {addr}:{port} never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn trace_allows(docs: &[Document], src: &Ep, dst: &Peer, port: u16, proto: u8) -> bool {
    let src = Peer::endpoint(&src.trace_labels).expect("src labels");
    trace(docs, &src, dst, port, proto).verdict == TraceVerdict::Allowed
}

const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-in
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {spiffe.io/spiffe-id: "spiffe://example.org/other"}}]
    toPorts: [{ports: [{port: "9000", endPort: 9010, protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-in
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "9000", protocol: ANY}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: other}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-out
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{}]
  - toCIDR: [WORLD_CIDR]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// A destination: address, trace peer, (port, udp) pairs.
type Target = (String, Peer, Vec<(u16, bool)>);

/// Every cell of the matrix: (source, destination address, destination peer, port, udp).
fn check_matrix(eps: &[Ep], world: &World, docs: &[Document], phase: &str) -> usize {
    let mut failures = Vec::new();
    let mut cells = 0;
    for src in eps {
        let mut dsts: Vec<Target> = eps
            .iter()
            .filter(|d| d.name != src.name)
            .map(|d| {
                (
                    d.ipv4.clone(),
                    Peer::endpoint(&d.trace_labels).expect("labels"),
                    vec![(8080, false), (9000, false), (9005, false), (9000, true)],
                )
            })
            .collect();
        dsts.push((
            world.addr.clone(),
            Peer::cidr(&world.addr).expect("cidr"),
            vec![(8080, false), (9000, false)],
        ));
        for (addr, peer, ports) in &dsts {
            for (port, udp) in ports {
                let proto = if *udp { 17 } else { PROTO_TCP };
                let want = trace_allows(docs, src, peer, *port, proto);
                let got = probe(&src.netns, addr, *port, *udp);
                cells += 1;
                if want != got {
                    failures.push(format!(
                        "{phase}: {} -> {addr}:{port}/{}: trace says {}, datapath {}",
                        src.name,
                        if *udp { "udp" } else { "tcp" },
                        if want { "allowed" } else { "denied" },
                        if got { "allowed" } else { "denied" },
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    cells
}

/// Runs `sigil monitor --output json` and hands its lines over a channel.
fn monitor(netd: &NetdProcess, children: &mut Children) -> mpsc::Receiver<serde_json::Value> {
    let mut child = Command::new(sigil_bin())
        .args(["monitor", "--output", "json", "--api-socket"])
        .arg(&netd.api_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("monitor");
    let out = child.stdout.take().expect("stdout");
    children.0.push(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

fn wait_event(
    rx: &mpsc::Receiver<serde_json::Value>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(_) => {}
            Err(e) => panic!("no monitor event {what}: {e}"),
        }
    }
}

/// A TCP connection opened from inside a namespace (the socket stays in it).
fn connect_in(netns: &str, addr: &str, port: u16) -> TcpStream {
    let target = format!("{addr}:{port}");
    in_ns(netns, move || {
        TcpStream::connect_timeout(&target.parse().expect("addr"), Duration::from_secs(2))
            .expect("connect")
    })
}

fn echo_once(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(600)));
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

#[test]
fn connectivity_matrix_matches_trace_and_policy_changes_cut_connections() {
    if !can_run() {
        return;
    }
    let netd = NetdProcess::start("matrix", 210, 1).expect("netd");
    let world = World::new("m", 1);
    let fe = create(&netd, "fe", "frontend", None);
    let be = create(&netd, "be", "backend", None);
    let ot = create(&netd, "ot", "other", Some("spiffe://example.org/other"));
    let eps = vec![fe.clone(), be.clone(), ot.clone()];
    let mut children = Children::default();
    for ep in &eps {
        for port in [8080, 9000, 9005] {
            children.echo(&ep.netns, port);
        }
    }
    for port in [8080, 9000] {
        children.echo(&world.netns, port);
    }
    wait_servers(
        &fe.netns,
        &[(&be.ipv4, 8080), (&ot.ipv4, 9005), (&world.addr, 9000)],
    );
    wait_servers(&be.netns, &[(&fe.ipv4, 9005)]);

    let none: Vec<Document> = Vec::new();
    let cells = check_matrix(&eps, &world, &none, "no policy");

    let yaml = POLICIES.replace("WORLD_CIDR", "10.250.1.0/24");
    let file = netd.root.path().join("policies.yaml");
    std::fs::write(&file, &yaml).expect("write policies");
    let docs = parse_documents(&yaml, "policies.yaml").expect("policies parse");
    let out = netd
        .cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    assert!(
        out.contains("backend-in") && out.contains("frontend-out"),
        "{out}"
    );
    check_matrix(&eps, &world, &docs, "with policies");
    eprintln!("matrix: {cells} cells per phase agree with policy trace");

    // An allowed, established connection; then a deny: its next packets drop and are reported.
    let mut events = Children::default();
    let rx = monitor(&netd, &mut events);
    let start = Instant::now();
    loop {
        probe(&ot.netns, &be.ipv4, 8080, false);
        if rx.recv_timeout(Duration::from_millis(300)).is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "monitor never reported an event"
        );
    }
    let mut conn = connect_in(&fe.netns, &be.ipv4, 8080);
    assert!(
        echo_once(&mut conn),
        "established connection must work before the change"
    );
    let cut = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: cut\nspec:\n  endpointSelector: {matchLabels: {app: backend}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n";
    let cut_file = netd.root.path().join("cut.yaml");
    std::fs::write(&cut_file, cut).expect("write cut");
    netd.cli_ok(&["policy", "import", &cut_file.display().to_string()])
        .expect("import cut");
    assert!(!echo_once(&mut conn), "the denied connection still passes");
    let ev = wait_event(&rx, "for the cut connection", |v| {
        v["verdict"] == "dropped"
            && v["src"]["endpoint"] == "fe"
            && v["dst"]["port"] == 8080
            && v["drop_reason"] == 181
    });
    assert_eq!(ev["src"]["identity"], fe.identity);
    assert!(
        ev["src"]["labels"].to_string().contains("k8s:app=frontend"),
        "{ev}"
    );
    // The event names the deny rule that matched.
    assert!(
        ev["rule"]
            .as_str()
            .is_some_and(|r| r.ends_with("/default/cut: spec.ingressDeny[0]")),
        "{ev}"
    );
    // Deleting the deny brings it back for new connections.
    netd.cli_ok(&["policy", "delete", "cut"])
        .expect("delete cut");
    assert!(probe(&fe.netns, &be.ipv4, 8080, false));
    for ep in &eps {
        netd.cli_ok(&["endpoint", "delete", &ep.name])
            .expect("delete");
        assert!(!Path::new(&format!("/run/netns/{}", ep.netns)).exists());
    }
}

#[test]
fn kill9_keeps_enforcement_and_restart_reconciles() {
    if !can_run() {
        return;
    }
    let mut netd = NetdProcess::start("restart", 210, 2).expect("netd");
    let a = create(&netd, "ra", "client", None);
    let b = create(&netd, "rb", "server", None);
    let mut children = Children::default();
    for port in [8080, 9000] {
        children.echo(&b.netns, port);
    }
    wait_servers(&a.netns, &[(&b.ipv4, 8080)]);
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server-in\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n";
    // Through the watched directory this time.
    std::fs::write(netd.policy_dir.join("server.yaml"), policy).expect("write");
    let start = Instant::now();
    while probe(&a.netns, &b.ipv4, 9000, false) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "watched policy never applied"
        );
    }
    assert!(probe(&a.netns, &b.ipv4, 8080, false));

    netd.kill9();
    assert!(
        probe(&a.netns, &b.ipv4, 8080, false),
        "allow must survive kill -9"
    );
    assert!(
        !probe(&a.netns, &b.ipv4, 9000, false),
        "deny must survive kill -9"
    );

    // A stale entry written while netd is down (allowing what the policy denies)...
    {
        let mut maps = Maps::open_pinned(&netd.pin_dir).expect("maps");
        maps.policy
            .upsert_policy(
                b.endpoint_id,
                &[(
                    PolicyKey {
                        identity: a.identity,
                        direction: Direction::Ingress,
                        protocol: PROTO_TCP,
                        port: 9000,
                        port_prefix_len: 16,
                    },
                    PolicyEntry {
                        deny: false,
                        l7_redirect: false,
                        auth_required: false,
                        rule_cookie: 77,
                    },
                )],
            )
            .expect("inject");
    }
    assert!(
        probe(&a.netns, &b.ipv4, 9000, false),
        "the injected entry should allow"
    );
    // ...is gone after the restart's reconciliation.
    netd.spawn().expect("restart");
    assert!(
        !probe(&a.netns, &b.ipv4, 9000, false),
        "stale allow survived the restart"
    );
    assert!(probe(&a.netns, &b.ipv4, 8080, false));
    let maps = Maps::open_pinned(&netd.pin_dir).expect("maps");
    let stale: Vec<_> = maps
        .policy
        .installed(b.endpoint_id)
        .into_iter()
        .filter(|(_, v)| v.rule_cookie == 77)
        .collect();
    assert!(stale.is_empty(), "stale entries: {stale:?}");
    let list = netd.cli_ok(&["endpoint", "get", "rb"]).expect("get");
    let v: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(
        v["identity"], b.identity,
        "identity must be kept across restarts"
    );
    // Removing the file while netd runs removes the policy.
    std::fs::remove_file(netd.policy_dir.join("server.yaml")).expect("rm");
    let start = Instant::now();
    while !probe(&a.netns, &b.ipv4, 9000, false) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "removed policy still enforced"
        );
    }
}

fn kernel_state(netd: &NetdProcess, eps: &[u32]) -> String {
    let maps = Maps::open_pinned(&netd.pin_dir).expect("maps");
    let mut ipc = maps.ipcache.entries().expect("ipcache");
    ipc.sort_by_key(|e| (e.addr, e.prefix_len));
    let mut cfg = maps.endpoints.list().expect("endpoints");
    cfg.sort_by_key(|(id, _)| *id);
    let pol: Vec<_> = eps.iter().map(|e| maps.policy.installed(*e)).collect();
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            let mut v: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "sigil-bone" || n == "sigil-btwo")
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    format!("{ipc:?}\n{cfg:?}\n{pol:?}\n{netns:?}")
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_nothing_changes() {
    if !can_run() {
        return;
    }
    let netd = NetdProcess::start("bad", 210, 3).expect("netd");
    let one = create(&netd, "bone", "web", None);
    let good = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n";
    let good_file = netd.root.path().join("good.yaml");
    std::fs::write(&good_file, good).expect("write");
    netd.cli_ok(&["policy", "import", &good_file.display().to_string()])
        .expect("import");
    let before = kernel_state(&netd, &[one.endpoint_id]);
    let policies_before = netd.cli_ok(&["policy", "list"]).expect("list");

    let fails = |args: &[&str], needles: &[&str]| {
        let out = netd.cli(args).expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        for n in needles {
            assert!(err.contains(n), "{args:?}: error {err:?} lacks {n:?}");
        }
    };
    fails(
        &["endpoint", "create", "bone", "--labels", "app=x"],
        &["already exists", "bone"],
    );
    fails(
        &["endpoint", "create", "btwo", "--labels", "bad key=1"],
        &["labels", "bad key=1"],
    );
    fails(
        &[
            "endpoint",
            "create",
            "btwo",
            "--labels",
            "app=x",
            "--namespace",
            "Bad_NS",
        ],
        &["namespace", "Bad_NS"],
    );
    fails(
        &[
            "endpoint",
            "create",
            "btwo",
            "--labels",
            "app=x",
            "--spiffe-id",
            "http://x",
        ],
        &["spiffe_id", "http://x"],
    );
    fails(&["endpoint", "create", "-x", "--labels", "app=x"], &[]);
    fails(
        &["endpoint", "labels", "bone", "--remove", "nosuch"],
        &["remove", "nosuch"],
    );
    // One invalid document in a multi-document import: nothing applies.
    let bad = format!(
        "{}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: broken\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - toPorts: [{{ports: [{{port: \"99999\", protocol: TCP}}]}}]\n",
        good.replace("name: web", "name: web2")
    );
    let bad_file = netd.root.path().join("bad.yaml");
    std::fs::write(&bad_file, bad).expect("write");
    fails(
        &["policy", "import", &bad_file.display().to_string()],
        &["bad.yaml", "99999"],
    );
    fails(&["policy", "delete", "nosuch"], &["nosuch", "not found"]);

    assert_eq!(
        before,
        kernel_state(&netd, &[one.endpoint_id]),
        "kernel state changed"
    );
    assert_eq!(
        policies_before,
        netd.cli_ok(&["policy", "list"]).expect("list")
    );
}

/// Runs `f` on a thread inside the named namespace (sockets it makes stay there).
fn in_ns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_netns(&named_netns_path(netns), || Ok(f())).expect("netns thread")
}

fn ipv6_of(netd: &NetdProcess, name: &str) -> String {
    let out = netd.cli_ok(&["endpoint", "get", name]).expect("get");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["ipv6"].as_str().expect("ipv6").to_owned()
}

fn ip_ok(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `sock` receives exactly `payload` within `wait` (other datagrams are skipped).
fn udp_receives(sock: &std::net::UdpSocket, payload: &[u8], wait: Duration) -> bool {
    sock.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 256];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if &buf[..n] == payload {
            return true;
        }
    }
    false
}

/// Sends `payload` from inside `netns`, from `src` (port 0 = any), to `dst`.
fn udp_send_from(
    netns: &str,
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    payload: &'static [u8],
) {
    in_ns(netns, move || {
        let s = std::net::UdpSocket::bind(src).expect("bind sender");
        s.send_to(payload, dst).expect("send");
    });
}

fn sa(addr: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.parse().expect("address"), port)
}

#[test]
fn endpoints_cannot_send_with_another_endpoints_address() {
    if !can_run() {
        return;
    }
    let netd = NetdProcess::start("spoof", 210, 4).expect("netd");
    let a = create(&netd, "sa", "attacker", None);
    let b = create(&netd, "sb", "trusted", None);
    let c = create(&netd, "sc", "target", None);
    let (a6, b6, c6) = (
        ipv6_of(&netd, "sa"),
        ipv6_of(&netd, "sb"),
        ipv6_of(&netd, "sc"),
    );
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: target-in\nspec:\n  endpointSelector: {matchLabels: {app: target}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: trusted}}]\n    toPorts: [{ports: [{port: \"8090\", protocol: UDP}]}]\n";
    let file = netd.root.path().join("target.yaml");
    std::fs::write(&file, policy).expect("write");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    let mut children = Children::default();
    children.echo_on(&b.netns, "[::]:9000");
    wait_servers(&c.netns, &[(&b.ipv4, 9000)]);
    let mut mon = Children::default();
    let rx = monitor(&netd, &mut mon);
    let rx_sock = in_ns(&c.netns, || {
        std::net::UdpSocket::bind("[::]:8090").expect("bind receiver")
    });
    let short = Duration::from_millis(700);
    let long = Duration::from_secs(5);

    for (a_addr, b_addr, c_addr) in [
        (a.ipv4.as_str(), b.ipv4.as_str(), c.ipv4.as_str()),
        (a6.as_str(), b6.as_str(), c6.as_str()),
    ] {
        // Controls: the trusted endpoint gets through; the attacker with its own address is
        // dropped by the target's policy.
        udp_send_from(&b.netns, sa(b_addr, 0), sa(c_addr, 8090), b"legit");
        assert!(
            udp_receives(&rx_sock, b"legit", long),
            "trusted -> {c_addr}"
        );
        udp_send_from(&a.netns, sa(a_addr, 0), sa(c_addr, 8090), b"own");
        assert!(
            !udp_receives(&rx_sock, b"own", short),
            "attacker's own -> {c_addr}"
        );
        wait_event(&rx, "the attacker's own-address drop", |v| {
            v["verdict"] == "dropped" && v["endpoint"] == "sc" && v["drop_reason"] == 133
        });

        // The attack: the trusted endpoint's address on the attacker's interface.
        let prefix = if b_addr.contains(':') { "128" } else { "32" };
        let cidr = format!("{b_addr}/{prefix}");
        ip_ok(&["-n", &a.netns, "addr", "add", &cidr, "dev", "eth0", "nodad"]);
        let dropped_before = Maps::open_pinned(&netd.pin_dir)
            .expect("maps")
            .counters
            .get(a.endpoint_id, sigil_datapath::Verdict::Dropped)
            .expect("counter");
        udp_send_from(&a.netns, sa(b_addr, 0), sa(c_addr, 8090), b"spoofed");
        assert!(
            !udp_receives(&rx_sock, b"spoofed", short),
            "the attacker's datagram from {b_addr} reached {c_addr}"
        );
        let ev = wait_event(&rx, "the spoofed datagram", |v| {
            v["verdict"] == "dropped" && v["endpoint"] == "sa" && v["drop_reason"] == 132
        });
        assert_eq!(ev["src"]["addr"], b_addr, "{ev}");
        assert_eq!(ev["src"]["identity"], a.identity, "{ev}");
        let dropped_after = Maps::open_pinned(&netd.pin_dir)
            .expect("maps")
            .counters
            .get(a.endpoint_id, sigil_datapath::Verdict::Dropped)
            .expect("counter");
        assert!(dropped_after.packets > dropped_before.packets);

        // The conntrack-reply forgery: the target talks to the trusted endpoint's echo server;
        // the attacker answers for it, from its address and port.
        let client = in_ns(&c.netns, {
            let c_addr = c_addr.to_owned();
            move || std::net::UdpSocket::bind(sa(&c_addr, 0)).expect("bind client")
        });
        let client_port = client.local_addr().expect("addr").port();
        client.send_to(b"hello", sa(b_addr, 9000)).expect("send");
        assert!(udp_receives(&client, b"hello", long), "the real reply");
        udp_send_from(
            &a.netns,
            sa(b_addr, 9000),
            sa(c_addr, client_port),
            b"forged",
        );
        assert!(
            !udp_receives(&client, b"forged", short),
            "a forged reply from {b_addr}:9000 reached the target"
        );
        wait_event(&rx, "the forged reply", |v| {
            v["verdict"] == "dropped"
                && v["endpoint"] == "sa"
                && v["drop_reason"] == 132
                && v["dst"]["port"] == client_port
        });
        // Control: the trusted endpoint's own traffic still passes.
        udp_send_from(&b.netns, sa(b_addr, 0), sa(c_addr, 8090), b"legit2");
        assert!(
            udp_receives(&rx_sock, b"legit2", long),
            "trusted after the attack"
        );
    }
}

/// Connects from inside `netns` over IPv6 with a destination options header on every packet
/// (`IPV6_DSTOPTS`, needs CAP_NET_RAW), sends "ping" and expects it back.
#[allow(unsafe_code)]
fn connect_with_dstopts(netns: &str, addr: &str, port: u16, wait: Duration) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn6, connect, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let target = match sa(addr, port) {
        std::net::SocketAddr::V6(v6) => v6,
        std::net::SocketAddr::V4(_) => panic!("IPv6 only"),
    };
    let stream = in_ns(netns, move || -> Option<TcpStream> {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        // One destination options header: PadN filling its 8 bytes.
        let opt: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: setsockopt reads `opt.len()` bytes from a live buffer; the fd is open.
        let rc = unsafe {
            nix::libc::setsockopt(
                fd.as_raw_fd(),
                nix::libc::IPPROTO_IPV6,
                nix::libc::IPV6_DSTOPTS,
                opt.as_ptr().cast(),
                opt.len() as nix::libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(wait.as_secs()).unwrap_or(5),
            i64::from(wait.subsec_micros()),
        );
        setsockopt(&fd, sockopt::SendTimeout, &tv).expect("send timeout");
        connect(fd.as_raw_fd(), &SockaddrIn6::from(target)).ok()?;
        Some(TcpStream::from(fd))
    });
    stream.is_some_and(|mut s| echo_once(&mut s))
}

#[test]
fn ipv6_extension_headers_do_not_bypass_an_ingress_deny() {
    if !can_run() {
        return;
    }
    let netd = NetdProcess::start("exthdr", 210, 5).expect("netd");
    let cl = create(&netd, "xc", "xclient", None);
    let sv = create(&netd, "xs", "xserver", None);
    let sv6 = ipv6_of(&netd, "xs");
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: xserver-in\nspec:\n  endpointSelector: {matchLabels: {app: xserver}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: xclient}}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: xclient}}]\n    toPorts: [{ports: [{port: \"8081\", protocol: TCP}]}]\n";
    let file = netd.root.path().join("xserver.yaml");
    std::fs::write(&file, policy).expect("write");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    let mut children = Children::default();
    children.echo_on(&sv.netns, "[::]:8080");
    children.echo_on(&sv.netns, "[::]:8081");
    wait_servers(&cl.netns, &[(&sv.ipv4, 8080)]);
    let mut mon = Children::default();
    let rx = monitor(&netd, &mut mon);
    let bracketed = format!("[{sv6}]");
    let short = Duration::from_millis(700);
    let deny_rule = |v: &serde_json::Value| {
        v["rule"]
            .as_str()
            .is_some_and(|r| r.ends_with("/default/xserver-in: spec.ingressDeny[0]"))
    };

    // Controls: plain IPv6 TCP to 8080 passes and to 8081 is denied by the rule.
    assert!(probe(&cl.netns, &bracketed, 8080, false), "plain 8080");
    assert!(!probe(&cl.netns, &bracketed, 8081, false), "plain 8081");
    let ev = wait_event(&rx, "the plain deny", |v| {
        v["verdict"] == "dropped" && v["dst"]["port"] == 8081
    });
    assert!(deny_rule(&ev), "{ev}");

    // The attack: a destination options header in front of TCP to the denied port.
    assert!(
        !connect_with_dstopts(&cl.netns, &sv6, 8081, short),
        "a TCP connection to the denied port completed behind a destination options header"
    );
    let ev = wait_event(&rx, "the deny behind the extension header", |v| {
        v["verdict"] == "dropped"
            && v["endpoint"] == "xs"
            && v["dst"]["port"] == 8081
            && v["protocol"] == "tcp"
    });
    assert_eq!(ev["drop_reason"], 181, "{ev}");
    assert!(deny_rule(&ev), "{ev}");

    // Control: the same header in front of the allowed port still connects.
    assert!(
        connect_with_dstopts(&cl.netns, &sv6, 8080, Duration::from_secs(5)),
        "destination options to the allowed port"
    );
}

/// `NetdProcess` started with extra `netd run` flags (here a small policy map).
fn start_netd_with(tag: &str, a: u8, b: u8, extra: &[&str]) -> NetdProcess {
    let root = tempfile::tempdir().expect("tmp");
    let mut n = NetdProcess {
        child: None,
        netns: None,
        api_socket: root.path().join("run").join("netd.sock"),
        state_dir: root.path().join("state"),
        policy_dir: root.path().join("policies"),
        pin_dir: std::path::PathBuf::from(format!(
            "/sys/fs/bpf/sigil-e2e-{}-{tag}",
            std::process::id()
        )),
        pod_cidr: format!("10.{a}.{b}.0/24"),
        pod_cidr_v6: format!("fd00:{a:x}{b:02x}::/64"),
        log: root.path().join("netd.log"),
        extra_args: Vec::new(),
        node_name: "e2e".into(),
        root,
    };
    std::fs::create_dir_all(&n.policy_dir).expect("policy dir");
    let log = std::fs::File::create(&n.log).expect("log");
    let child = Command::new(sigil_bin())
        .args(["netd", "run", "--node-name", "e2e"])
        .arg("--api-socket")
        .arg(&n.api_socket)
        .arg("--state-dir")
        .arg(&n.state_dir)
        .arg("--policy-dir")
        .arg(&n.policy_dir)
        .arg("--bpf-pin-dir")
        .arg(&n.pin_dir)
        .args(["--pod-cidr", &n.pod_cidr, "--pod-cidr-v6", &n.pod_cidr_v6])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn netd");
    n.child = Some(child);
    let start = Instant::now();
    while !(n.api_socket.exists()
        && n.cli(&["netd", "status"])
            .map(|o| o.status.success())
            .unwrap_or(false))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "netd not ready; log:\n{}",
            n.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    n
}

/// The attack of issue 9: fill the kernel policy map with an import so that it fails
/// half-way. The import is refused before any write, with the numbers; policies, engine and
/// kernel are unchanged, and the installed deny still drops real traffic while the allow
/// beside it (the control) still passes.
#[test]
fn an_import_the_policy_map_cannot_hold_is_refused_and_the_deny_stays_enforced() {
    if !can_run() {
        return;
    }
    let netd = start_netd_with("full", 210, 6, &["--policy-map-max-entries", "48"]);
    let web = create(&netd, "fullweb", "web", None);
    let api = create(&netd, "fullapi", "api", None);
    let mut children = Children::default();
    for port in [7000, 7001] {
        children.echo(&web.netns, port);
    }
    wait_servers(&api.netns, &[(&web.ipv4, 7000), (&web.ipv4, 7001)]);

    let base = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-in\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: \"7001\", protocol: TCP}]}]\n";
    let base_file = netd.root.path().join("base.yaml");
    std::fs::write(&base_file, base).expect("write");
    netd.cli_ok(&["policy", "import", &base_file.display().to_string()])
        .expect("base import");
    assert!(probe(&api.netns, &web.ipv4, 7000, false), "allow works");
    assert!(!probe(&api.netns, &web.ipv4, 7001, false), "deny works");
    let kernel_before = kernel_state(&netd, &[web.endpoint_id, api.endpoint_id]);
    let list_before = netd.cli_ok(&["policy", "list"]).expect("list");

    // 60 CIDRs for web's egress: more keys than the 48-entry map has left. The same file
    // also replaces web-in without its deny, which a half-applied import would have lifted.
    let cidrs: Vec<String> = (0..60)
        .map(|i| format!("      - cidr: 198.18.{i}.0/24"))
        .collect();
    let big = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-in\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: api}}}}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-out\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  egress:\n  - toCIDRSet:\n{}\n",
        cidrs.join("\n")
    );
    let big_file = netd.root.path().join("big.yaml");
    std::fs::write(&big_file, big).expect("write");
    let out = netd
        .cli(&["policy", "import", &big_file.display().to_string()])
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the import should be refused");
    assert!(
        err.contains("sigil_policy")
            && err.contains("new entries")
            && err.contains("of 48 are free"),
        "{err}"
    );

    assert_eq!(
        netd.cli_ok(&["policy", "list"]).expect("list"),
        list_before,
        "policies changed"
    );
    let web_in = netd
        .cli_ok(&["policy", "get", "web-in"])
        .expect("get web-in");
    assert!(web_in.contains("ingressDeny"), "{web_in}");
    assert_eq!(
        kernel_state(&netd, &[web.endpoint_id, api.endpoint_id]),
        kernel_before,
        "kernel changed"
    );
    assert!(
        !probe(&api.netns, &web.ipv4, 7001, false),
        "the deny is still enforced"
    );
    assert!(
        probe(&api.netns, &web.ipv4, 7000, false),
        "the allow still works"
    );

    // Control: an import the map can hold applies, and leaves the deny in place.
    let small = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-out\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet:\n    - cidr: 198.18.0.0/24\n    - cidr: 198.18.1.0/24\n";
    let small_file = netd.root.path().join("small.yaml");
    std::fs::write(&small_file, small).expect("write");
    netd.cli_ok(&["policy", "import", &small_file.display().to_string()])
        .expect("an import that fits");
    let list = netd.cli_ok(&["policy", "list"]).expect("list");
    assert!(list.contains("web-out"), "{list}");
    assert!(!probe(&api.netns, &web.ipv4, 7001, false), "deny kept");
    assert!(probe(&api.netns, &web.ipv4, 7000, false), "allow kept");
}

/// The real `sigil netd run` refuses a bad log level (flag) or log format (environment) before
/// touching the system, naming the key, the value and where it came from; a valid pair passes
/// this check (it then fails on the next key checked, a bad `drain_timeout`).
#[test]
fn netd_rejects_invalid_log_options_naming_key_source_and_value() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(sigil_bin())
            .args(["netd", "run"])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("sigil");
        assert!(!out.status.success(), "netd started with {args:?} {env:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&["--log-level", "loud"], &[]);
    assert!(
        err.contains("log_level: invalid value \"loud\" from flag"),
        "{err}"
    );
    let err = run(&[], &[("SIGIL_NETD_LOG_FORMAT", "xml")]);
    assert!(
        err.contains(
            "log_format: invalid value \"xml\" from environment variable SIGIL_NETD_LOG_FORMAT"
        ),
        "{err}"
    );
    // Control: valid options get past the check to the next key checked (a bad drain_timeout).
    let err = run(
        &["--log-level", "debug", "--drain-timeout", "soon"],
        &[("SIGIL_NETD_LOG_FORMAT", "json")],
    );
    assert!(
        err.contains("drain_timeout: invalid value \"soon\" from flag") && !err.contains("log_"),
        "{err}"
    );
}

/// `sigil netd healthcheck` asks the standard gRPC health service (`grpc.health.v1`) on netd's
/// API socket: SERVING while netd serves; once netd has stopped, the check fails (exit status
/// 1, "unhealthy") instead of reporting a daemon that is gone.
#[test]
fn healthcheck_reports_serving_only_while_netd_serves() {
    if !can_run() {
        return;
    }
    let mut netd = NetdProcess::start("health", 210, 7).expect("netd");
    let out = netd.cli(&["netd", "healthcheck"]).expect("cli");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("netd is healthy."),
        "{out:?}"
    );
    netd.kill9();
    let out = netd.cli(&["netd", "healthcheck"]).expect("cli");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("netd is unhealthy"),
        "{out:?}"
    );
}
