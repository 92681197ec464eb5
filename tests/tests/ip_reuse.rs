//! CFP-28986 end to end (issue 12), as root with etcd: an endpoint deleted on node A and its
//! IP reused on node C by a different identity cannot ride the pair node B authenticated for
//! it, even while B's IPCache still maps the IP to the old identity on A.
//!
//! Three nodes with agents in spiffe identity mode; B (node 1) holds an authenticated pair
//! (backend, frontend, node A). B's kvstore traffic is then held back for real (nftables in
//! B's namespace drops its TCP to and from etcd; B's lease TTL is long enough to outlive the
//! hold). Node A deletes the frontend and leaves (its lease lapses); node C's machine is
//! re-provisioned as a new node that is given A's freed pod CIDR, and its first endpoint, of
//! another identity, gets the frontend's old address. While B's kernel IPCache and auth map
//! still say "frontend on A", the new endpoint's TCP and UDP to the backend are dropped at B
//! (the VNI is the source identity, and the inner source's IPCache entry names A, not the
//! sender C: DROP_INVALID_SIP). Released, B converges and the verdict is the policy's.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_datapath::AuthKey;
use sigil_test_util::cluster::ClusterNode;
use sigil_test_util::netns::{command_in_named_netns, in_netns};
use sigil_test_util::{TestCluster, can_run_etcd, sigil_bin, wait_for};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the IP reuse test")
        && can_run_etcd("the IP reuse test")
        && sigil_test_util::skip_unless(
            "the IP reuse test",
            (!Path::new("/usr/sbin/nft").exists()).then(|| "no /usr/sbin/nft".to_owned()),
        )
}

/// Second octet of this file's pod CIDRs (10.237.<node>.0/24).
const A: u8 = 237;
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
const FE_ID: &str = "spiffe://identity.example.com/frontend";
const BE_ID: &str = "spiffe://identity.example.com/backend";
const OTHER_ID: &str = "spiffe://identity.example.com/other";
/// Node B's lease TTL: longer than the hold (the others keep the fixture's 4 s).
const B_TTL: &str = "120s";
/// The fixture's lease TTL, after which a stopped node's keys are gone.
const TTL: Duration = Duration::from_secs(4);
const DROP_INVALID_SIP: u64 = 132;
const DROP_AUTH_REQUIRED: u64 = 189;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits (polling the Delegated Identity API as root) until the agent serves netd.
fn delegate_ready(admin: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in = rt.enter();
    let client = sigil_delegated_client::Client::new(admin);
    let start = Instant::now();
    loop {
        match rt.block_on(client.check()) {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                anyhow::bail!("agent never served the delegate: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

/// An endpoint echoing TCP on 8080 and recording who reached it (TCP peers, UDP sources on
/// 8081).
struct Ep {
    name: String,
    ip: Ipv4Addr,
    netns: PathBuf,
    identity: u32,
    seen: Arc<Mutex<Vec<(&'static str, IpAddr)>>>,
}

impl Ep {
    /// How many TCP connections and UDP datagrams came from `ip` so far.
    fn seen_from(&self, ip: Ipv4Addr) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, a)| *a == IpAddr::V4(ip))
            .count()
    }
}

/// Creates an endpoint on `node` with `app` and waits until its SVID made it `registered` as
/// `id`.
fn create(c: &TestCluster, node: usize, app: &str, id: &str) -> Ep {
    let name = format!("r{}-{node}-{app}", std::process::id());
    let labels = format!("app={app}");
    let netd = &c.nodes[node].netd;
    netd.cli_ok(&["endpoint", "create", &name, "--labels", &labels])
        .expect("endpoint create");
    let mut v = Value::Null;
    wait_for("the endpoint registered", Duration::from_secs(30), || {
        v = json(&netd.cli_ok(&["endpoint", "get", &name])?);
        Ok((v["spiffe_id_source"] != "registered" || v["spiffe_id"] != id).then(|| v.to_string()))
    })
    .expect("registered");
    let netns = PathBuf::from(v["netns"].as_str().expect("netns"));
    let (tcp, udp) = in_netns(&netns, || {
        Ok((
            TcpListener::bind(("0.0.0.0", TCP_PORT))?,
            UdpSocket::bind(("0.0.0.0", UDP_PORT))?,
        ))
    })
    .expect("listen");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            if let Ok(peer) = s.peer_addr() {
                log.lock().expect("lock").push(("tcp", peer.ip()));
            }
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            log.lock().expect("lock").push(("udp", from.ip()));
        }
    });
    Ep {
        name,
        ip: v["ipv4"].as_str().expect("ipv4").parse().expect("ipv4"),
        netns,
        identity: v["identity"].as_u64().expect("identity") as u32,
        seen,
    }
}

fn connect(from: &Ep, to: &Ep, wait: Duration) -> Option<TcpStream> {
    let addr = SocketAddr::new(IpAddr::V4(to.ip), TCP_PORT);
    in_netns(&from.netns, || {
        Ok(TcpStream::connect_timeout(&addr, wait).ok())
    })
    .expect("connect in netns")
}

/// Sends `n` UDP datagrams from `from` to `to`'s 8081.
fn udp_send(from: &Ep, to: &Ep, n: usize) {
    let dst = SocketAddr::new(IpAddr::V4(to.ip), UDP_PORT);
    let s = in_netns(&from.netns, || Ok(UdpSocket::bind("0.0.0.0:0")?)).expect("udp socket");
    for i in 0..n {
        s.send_to(format!("probe {i}").as_bytes(), dst)
            .expect("send");
    }
}

/// Whether a 4-byte payload comes back on `s` within 2 s.
fn echo(s: &mut TcpStream, n: u32) -> bool {
    let msg = n.to_be_bytes();
    let mut buf = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
        && s.write_all(&msg).is_ok()
        && s.read_exact(&mut buf).is_ok()
        && buf == msg
}

/// `sigil auth list --output json` of a node: (local, remote, remote node name) sorted.
fn auth_list(c: &TestCluster, node: usize) -> Vec<(u32, u32, String)> {
    let out = c.nodes[node]
        .netd
        .cli_ok(&["auth", "list", "--output", "json"])
        .expect("auth list");
    let mut v: Vec<(u32, u32, String)> = json(&out)
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["local_identity"].as_u64().unwrap_or(0) as u32,
                e["remote_identity"].as_u64().unwrap_or(0) as u32,
                e["remote_node"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Node `i`'s kernel IPCache entry for `ip` (identity, tunnel endpoint), from its pinned maps.
fn kernel_entry(c: &TestCluster, i: usize, ip: Ipv4Addr) -> Option<(u32, Option<Ipv4Addr>)> {
    let maps = sigil_datapath::Maps::open_pinned(&c.nodes[i].netd.pin_dir).expect("pinned maps");
    maps.ipcache
        .entries()
        .expect("ipcache entries")
        .into_iter()
        .find(|e| e.addr == IpAddr::V4(ip) && e.prefix_len == 32)
        .map(|e| (e.identity, e.tunnel_endpoint))
}

/// Node `i`'s kernel auth map keys (local, remote, remote node).
fn kernel_auth(c: &TestCluster, i: usize) -> Vec<AuthKey> {
    let maps = sigil_datapath::Maps::open_pinned(&c.nodes[i].netd.pin_dir).expect("pinned maps");
    maps.auth
        .entries()
        .expect("auth entries")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// What etcd says of `ip` (the cluster's truth): its entry's (identity, node name).
fn etcd_entry(c: &TestCluster, ip: Ipv4Addr) -> Option<(u64, String)> {
    c.etcd
        .list_raw(&format!("{}ipcache/{ip}", c.prefix()))
        .expect("etcd range")
        .into_iter()
        .find(|(k, _)| k.ends_with(&format!("/{ip}")))
        .map(|(_, v)| {
            let v: Value = serde_json::from_slice(&v).expect("entry JSON");
            (
                v["identity"].as_u64().unwrap_or(0),
                v["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// `sigil policy trace --src-ip --dst-ip` against node `i`'s netd; true when allowed.
fn trace(c: &TestCluster, i: usize, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> bool {
    let out = Command::new(sigil_bin())
        .args(["policy", "trace", "--src-ip", &src.to_string()])
        .args(["--dst-ip", &dst.to_string(), "--dport", &dport.to_string()])
        .args(["--output", "json", "--api-socket"])
        .arg(&c.nodes[i].netd.api_socket)
        .output()
        .expect("trace");
    assert!(
        out.status.success(),
        "trace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))["verdict"] == "allowed"
}

/// `sigil monitor --drops-only --output json` of a node, its lines collected.
struct Drops {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drops {
    fn start(c: &TestCluster, node: usize) -> Drops {
        let mut child = Command::new(sigil_bin())
            .args(["monitor", "--drops-only", "--output", "json"])
            .arg("--api-socket")
            .arg(&c.nodes[node].netd.api_socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("monitor");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    sink.lock().expect("lock").push(v);
                }
            }
        });
        Drops { child, lines }
    }

    /// Drops of `src` (any reason when `reason` is `None`), as (reason, protocol).
    fn from(&self, src: Ipv4Addr) -> Vec<(u64, String)> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["src"]["addr"].as_str() == Some(&src.to_string()))
            .map(|v| {
                (
                    v["drop_reason"].as_u64().unwrap_or(0),
                    v["protocol"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn count(&self, reason: u64) -> usize {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["drop_reason"].as_u64() == Some(reason))
            .count()
    }

    fn any(&self) -> bool {
        !self.lines.lock().expect("lock").is_empty()
    }
}

impl Drop for Drops {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds a node's kvstore traffic back: an nftables table in its namespace dropping its TCP
/// to etcd and etcd's to it (both ways: etcd pushes watch events on an open stream). The
/// table goes on drop.
struct Hold {
    netns: String,
}

const HOLD_TABLE: &str = "sigil_e2e_kvstore_hold";

impl Hold {
    fn start(netns: &str, etcd: SocketAddr) -> Hold {
        let (ip, port) = (etcd.ip(), etcd.port());
        let rules = format!(
            "table inet {HOLD_TABLE} {{\n\
             \x20 chain out {{ type filter hook output priority 0; ip daddr {ip} tcp dport {port} drop; }}\n\
             \x20 chain in {{ type filter hook input priority 0; ip saddr {ip} tcp sport {port} drop; }}\n\
             }}\n"
        );
        let hold = Hold {
            netns: netns.to_owned(),
        };
        let mut nft = command_in_named_netns(netns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("nft rules");
        assert!(nft.wait().expect("nft").success(), "nft -f: {rules}");
        hold
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = command_in_named_netns(&self.netns, "nft")
            .args(["delete", "table", "inet", HOLD_TABLE])
            .status();
    }
}

fn import(c: &TestCluster, node: usize, name: &str, yaml: &str) {
    let file = c.nodes[node].netd.root.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("write policy");
    c.nodes[node]
        .netd
        .cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
}

/// The backend's ingress: from the frontend's SPIFFE ID on TCP 8080 and UDP 8081,
/// authentication required; nothing else (so the backend's ingress is enforced).
fn backend_auth() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: backend-auth, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"{FE_ID}\"}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"{TCP_PORT}\", protocol: TCP}}, {{port: \"{UDP_PORT}\", protocol: UDP}}]}}]\n\
         \x20   authentication: {{mode: required}}\n"
    )
}

fn import_all(c: &TestCluster, node: usize) {
    import(c, node, "backend-auth", &backend_auth());
}

/// Waits until etcd holds no key of node `name` (its lease lapsed).
fn wait_node_gone(c: &TestCluster, name: &str) {
    wait_for(
        &format!("{name}'s keys gone from etcd"),
        TTL + Duration::from_secs(10),
        || {
            let held: Vec<String> = c
                .etcd
                .list_raw(&c.prefix())?
                .into_iter()
                .filter(|(k, v)| k.ends_with(&format!("/{name}")) || v == name.as_bytes())
                .map(|(k, _)| k)
                .collect();
            Ok((!held.is_empty()).then(|| format!("{held:?}")))
        },
    )
    .expect("lease lapsed");
}

#[test]
fn a_reused_ip_cannot_ride_the_authenticated_pair_while_the_ipcache_is_stale() {
    if !can_run() {
        return;
    }
    let per_node = |i: usize| -> Vec<String> {
        if i == 1 {
            vec!["--kvstore-lease-ttl".to_owned(), B_TTL.to_owned()]
        } else {
            Vec::new()
        }
    };
    let mut c = TestCluster::start_with_agents_per_node(3, A, &[], &per_node, delegate_ready)
        .expect("cluster");
    let (a_ip, b_netns, c_ip) = (
        c.topo.nodes[0].underlay_ip,
        c.topo.nodes[1].netns.clone(),
        c.topo.nodes[2].underlay_ip,
    );
    {
        let id = c.identity.as_ref().expect("agents");
        id.entry(0, FE_ID, &["k8s:ns:default", "k8s:pod-label:app:frontend"])
            .expect("frontend entry");
        id.entry(1, BE_ID, &["k8s:ns:default", "k8s:pod-label:app:backend"])
            .expect("backend entry");
        // Node C's machine hosts the reusing identity, and (for the last control) the
        // frontend's too.
        id.entry(2, OTHER_ID, &["k8s:ns:default", "k8s:pod-label:app:other"])
            .expect("other entry");
        id.entry(2, FE_ID, &["k8s:ns:default", "k8s:pod-label:app:frontend"])
            .expect("frontend entry on C");
    }
    for node in 0..3 {
        import_all(&c, node);
    }
    let fe = create(&c, 0, "frontend", FE_ID);
    let be = create(&c, 1, "backend", BE_ID);
    let drops = Drops::start(&c, 1);

    // Control: B authenticated (backend, frontend, A) ahead of time; the frontend's TCP and
    // UDP reach the backend with no drop.
    let want = vec![(be.identity, fe.identity, "node0".to_owned())];
    wait_for("B authenticated the pair", Duration::from_secs(20), || {
        let l = auth_list(&c, 1);
        Ok((l != want).then(|| format!("{l:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", c.nodes[1].netd.log_text()));
    let mut conn = connect(&fe, &be, Duration::from_secs(3)).expect("frontend -> backend");
    for n in 0..5 {
        assert!(echo(&mut conn, n), "echo {n}");
    }
    drop(conn);
    udp_send(&fe, &be, 3);
    wait_for(
        "the frontend's UDP at the backend",
        Duration::from_secs(5),
        || {
            let n = be
                .seen
                .lock()
                .expect("lock")
                .iter()
                .filter(|(p, a)| *p == "udp" && *a == IpAddr::V4(fe.ip))
                .count();
            Ok((n == 0).then(|| "none".to_owned()))
        },
    )
    .expect("udp control");
    assert!(
        drops.from(fe.ip).is_empty(),
        "the frontend's traffic was dropped: {:?}",
        drops.from(fe.ip)
    );
    // The monitor streams (an unanswered flow from node C's machine's own address is dropped).
    assert!(
        !trace(&c, 1, c_ip, be.ip, TCP_PORT),
        "node C's host is not allowed"
    );
    wait_for("the monitor streams", Duration::from_secs(10), || {
        if !drops.any() {
            let to = SocketAddr::new(IpAddr::V4(be.ip), TCP_PORT);
            let _ = in_netns(&c.topo.nodes[2].netns_path, || {
                Ok(TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok())
            });
        }
        Ok((!drops.any()).then(|| "no drop seen".to_owned()))
    })
    .expect("monitor");

    // Hold B's kvstore watch back; B's etcd session stays (its lease outlives the hold).
    let etcd: SocketAddr = c
        .etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let hold = Hold::start(&b_netns, etcd);
    let held = Instant::now();

    // The frontend goes, then node A (its lease lapses); node C's machine leaves too and joins
    // again as a new node, node3, given A's freed pod CIDR (10.237.0.0/24).
    c.nodes[0]
        .netd
        .cli_ok(&["endpoint", "delete", &fe.name])
        .expect("endpoint delete");
    c.nodes[0].netd.kill9();
    drop(c.nodes.remove(2));
    wait_node_gone(&c, "node0");
    wait_node_gone(&c, "node2");
    let more = c.agent_args(2).expect("agent args");
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let netd = c.spawn_netd(2, "node3", 0, &more).expect("node3 joins");
    assert_eq!(netd.pod_cidr, format!("10.{A}.0.0/24"), "A's pod CIDR");
    c.nodes.push(ClusterNode {
        netd,
        name: "node3".to_owned(),
        index: 2,
    });
    import_all(&c, 2);
    let reuser = create(&c, 2, "other", OTHER_ID);
    assert_eq!(
        reuser.ip, fe.ip,
        "the new node's first endpoint gets the old address"
    );
    assert_ne!(reuser.identity, fe.identity, "another identity");
    assert_eq!(
        etcd_entry(&c, fe.ip),
        Some((u64::from(reuser.identity), "node3".to_owned())),
        "etcd knows the address is now the reuser's on node3"
    );

    // B's view is stale: its kernel IPCache maps the address to the frontend on A, its auth
    // map holds (backend, frontend, A).
    let stale_key = AuthKey {
        local_identity: be.identity,
        remote_identity: fe.identity,
        remote_node: AuthKey::node(a_ip),
    };
    let assert_stale = |when: &str| {
        assert_eq!(
            kernel_entry(&c, 1, fe.ip),
            Some((fe.identity, Some(a_ip))),
            "{when}: B's IPCache still says frontend on A"
        );
        assert!(
            kernel_auth(&c, 1).contains(&stale_key),
            "{when}: B's auth map holds (backend, frontend, A): {:?}",
            kernel_auth(&c, 1)
        );
    };
    assert_stale("before the attack");

    // The attack: TCP and UDP from the reused address to the backend.
    let seen_before = be.seen_from(fe.ip);
    let tcp = connect(&reuser, &be, Duration::from_secs(2));
    assert!(tcp.is_none(), "the reuser connected to the backend");
    udp_send(&reuser, &be, 3);
    wait_for(
        "B reports the reuser's TCP and UDP dropped as invalid source",
        Duration::from_secs(5),
        || {
            let d = drops.from(fe.ip);
            let has = |p: &str| d.iter().any(|(r, q)| *r == DROP_INVALID_SIP && q == p);
            Ok((!has("tcp") || !has("udp")).then(|| format!("{d:?}")))
        },
    )
    .expect("drops reported");
    assert_eq!(
        be.seen_from(fe.ip),
        seen_before,
        "the backend received nothing from the reused address"
    );
    assert!(
        drops
            .from(fe.ip)
            .iter()
            .all(|(r, _)| *r == DROP_INVALID_SIP),
        "only invalid-source drops: {:?}",
        drops.from(fe.ip)
    );
    assert_stale("after the attack");
    eprintln!(
        "attack ran with B's cache stale; {} drops of reason 132 from {} at B; hold {:?}",
        drops.from(fe.ip).len(),
        fe.ip,
        held.elapsed()
    );

    // Released: B converges (the address is the reuser's on C, the stale pair is revoked).
    drop(hold);
    let released = Instant::now();
    wait_for("B's IPCache converges", Duration::from_secs(30), || {
        let got = kernel_entry(&c, 1, fe.ip);
        Ok((got != Some((reuser.identity, Some(c_ip)))).then(|| format!("{got:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", c.nodes[1].netd.log_text()));
    wait_for("B revokes the stale pair", Duration::from_secs(10), || {
        let k = kernel_auth(&c, 1);
        Ok(k.contains(&stale_key).then(|| format!("{k:?}")))
    })
    .expect("revoked");
    eprintln!("B converged {:?} after the release", released.elapsed());

    // The verdict is now the policy's: the reuser's identity is not allowed, `sigil policy
    // trace` on B says so, and its traffic is still dropped (now by policy).
    assert!(
        !trace(&c, 1, reuser.ip, be.ip, TCP_PORT),
        "trace allows the reuser"
    );
    let before = drops.from(fe.ip).len();
    assert!(
        connect(&reuser, &be, Duration::from_secs(2)).is_none(),
        "the reuser connected after convergence"
    );
    wait_for("the policy drop reported", Duration::from_secs(5), || {
        let d = drops.from(fe.ip);
        Ok((d.len() == before).then(|| format!("{d:?}")))
    })
    .expect("policy drop");
    let after: Vec<(u64, String)> = drops.from(fe.ip).split_off(before);
    assert!(
        after.iter().all(|(r, _)| *r != DROP_INVALID_SIP),
        "no longer an invalid source once converged: {after:?}"
    );
    assert_eq!(
        be.seen_from(fe.ip),
        seen_before,
        "nothing reached the backend"
    );

    // Second control: a frontend on C (allowed identity) reaches the backend once B has
    // authenticated (backend, frontend, node3).
    let fe2 = create(&c, 2, "frontend", FE_ID);
    assert_eq!(fe2.identity, fe.identity);
    assert!(trace(&c, 1, fe2.ip, be.ip, TCP_PORT), "trace denies fe2");
    wait_for(
        "B authenticated (backend, frontend, node3)",
        Duration::from_secs(20),
        || {
            let l = auth_list(&c, 1);
            Ok(
                (!l.contains(&(be.identity, fe.identity, "node3".to_owned())))
                    .then(|| format!("{l:?}")),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", c.nodes[1].netd.log_text()));
    let mut conn = connect(&fe2, &be, Duration::from_secs(3)).expect("fe2 -> backend");
    assert!(echo(&mut conn, 7), "fe2 echo");
    assert!(be.seen_from(fe2.ip) > 0);
    assert_eq!(drops.count(DROP_AUTH_REQUIRED), 0, "no drop of reason 189");
}
