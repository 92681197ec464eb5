//! Issue 12 (policy-required mutual authentication) end to end, as root with etcd: three nodes
//! in namespaces on a bridged underlay, a sigil server, an agent per node and a cluster-mode
//! netd per node in spiffe identity mode. The frontend's SVID is only given to node 0, the
//! backend's only to node 1. A policy with `authentication: {mode: required}` imported before
//! any traffic makes the nodes authenticate exactly the required pairs ahead of time (no drop
//! of reason 189); removing it revokes the entries and cuts an established connection; and a
//! node that does not host the frontend cannot authenticate as the frontend even with the
//! frontend's valid SVID and key (the control: the same client from the frontend's node can).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use serde_json::Value;
use sigil_identity::NumericIdentity;
use sigil_mutual_auth::{AuthContext, Pair};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_test_util::cluster::TRUST_DOMAIN;
use sigil_test_util::netns::{in_netns, named_netns_path};
use sigil_test_util::{TestCluster, can_run_etcd, sigil_bin, wait_for};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the mutual auth test")
        && can_run_etcd("the mutual auth test")
}

/// Second octet of this file's pod CIDRs (10.231.<node>.0/24).
const A: u8 = 231;
const PORT: u16 = 8080;
const FE_ID: &str = "spiffe://identity.example.com/frontend";
const BE_ID: &str = "spiffe://identity.example.com/backend";
const OTHER_ID: &str = "spiffe://identity.example.com/other";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits (polling the Delegated Identity API as root, which has netd's selectors) until the
/// agent serves netd as a delegate.
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

struct Ep {
    name: String,
    ip: Ipv4Addr,
    netns: PathBuf,
    identity: u32,
}

/// Creates an endpoint on `node` with `app` and waits until its SVID made it `registered` as
/// `id`; it echoes TCP on 8080.
fn create(c: &TestCluster, node: usize, app: &str, id: &str) -> Ep {
    let name = format!("m{}-{node}-{app}", std::process::id());
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
    let ep = Ep {
        name,
        ip: v["ipv4"].as_str().expect("ipv4").parse().expect("ipv4"),
        netns: PathBuf::from(v["netns"].as_str().expect("netns")),
        identity: v["identity"].as_u64().expect("identity") as u32,
    };
    let l = in_netns(&ep.netns, || Ok(TcpListener::bind(("0.0.0.0", PORT))?)).expect("listen");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
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
    ep
}

fn connect(from: &Ep, to: &Ep) -> Option<(TcpStream, Duration)> {
    let addr = SocketAddr::new(IpAddr::V4(to.ip), PORT);
    in_netns(&from.netns, || {
        let start = Instant::now();
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .ok()
            .map(|s| (s, start.elapsed())))
    })
    .expect("connect in netns")
}

/// Whether a fresh 4-byte payload comes back within `wait`.
fn echo(s: &mut TcpStream, n: u32, wait: Duration) -> bool {
    let msg = n.to_be_bytes();
    if s.write_all(&msg).is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        match s.read_exact(&mut buf) {
            Ok(()) if buf == msg => return true,
            Ok(()) => continue,
            Err(_) => return false,
        }
    }
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
            assert!(
                e["expires_unix"].as_i64().unwrap_or(0) > sigil_e2e::unix_now(),
                "an unexpired entry: {e}"
            );
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

/// The expiry `sigil auth list` shows for a node's only entry.
fn auth_expiry(c: &TestCluster, node: usize) -> i64 {
    let out = c.nodes[node]
        .netd
        .cli_ok(&["auth", "list", "--output", "json"])
        .expect("auth list");
    json(&out)[0]["expires_unix"].as_i64().unwrap_or(0)
}

/// Echoes on `conn` every ~10 ms until `stop` is set; each attempt's time and outcome.
fn echo_loop(
    mut conn: TcpStream,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, bool)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut n = 1_000;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let ok = echo(&mut conn, n, Duration::from_millis(200));
            out.push((Instant::now(), ok));
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    })
}

/// `sigil monitor --drops-only --output json` of a node, its lines collected.
struct Drops {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drops {
    fn start(c: &TestCluster, node: usize) -> Drops {
        let mut child = Command::new(sigil_bin())
            .args([
                "monitor",
                "--drops-only",
                "--output",
                "json",
                "--api-socket",
            ])
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

    fn with_reason(&self, reason: u64) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["drop_reason"].as_u64() == Some(reason))
            .cloned()
            .collect()
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

fn import(c: &TestCluster, node: usize, name: &str, yaml: &str) {
    let file = c.nodes[node].netd.root.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("write policy");
    c.nodes[node]
        .netd
        .cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
}

/// Ingress of the backend from the frontend's SPIFFE ID on 8080, authentication required.
fn backend_auth() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: backend-auth, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"{FE_ID}\"}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]\n\
         \x20   authentication: {{mode: required}}\n"
    )
}

/// Keeps the backend's ingress enforced when the auth policy goes (only port 9090 allowed).
fn backend_base() -> String {
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: backend-base, namespace: default}\n\
     spec:\n  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n\
     \x20 - toPorts: [{ports: [{port: \"9090\", protocol: TCP}]}]\n"
        .to_owned()
}

/// Egress of the frontend to the backend's SPIFFE ID on 8080, authentication required.
fn frontend_auth() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: frontend-auth, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: frontend}}}}\n  egress:\n\
         \x20 - toEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"{BE_ID}\"}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]\n\
         \x20   authentication: {{mode: required}}\n"
    )
}

/// The attacker's (or the control's) handshake context: a stolen but valid SVID of the
/// frontend, and a registry that claims whatever it is asked.
struct Thief {
    svid: Arc<CertifiedKey>,
    bundles: sigil_tls::SharedBundles,
}

impl AuthContext for Thief {
    fn local_svid(&self, identity: NumericIdentity) -> Option<Arc<CertifiedKey>> {
        let _ = identity;
        Some(Arc::clone(&self.svid))
    }
    fn spiffe_id_of(&self, _: NumericIdentity) -> Option<SpiffeId> {
        SpiffeId::parse(BE_ID).ok()
    }
    fn node_hosts(&self, _: IpAddr, _: NumericIdentity) -> bool {
        true
    }
    fn bundles(&self) -> sigil_tls::SharedBundles {
        Arc::clone(&self.bundles)
    }
}

/// The frontend's SVID and the trust bundle, fetched from node 0's agent as its delegate with
/// the frontend endpoint's selectors (what an attacker who stole them would hold).
fn steal_frontend(c: &TestCluster, fe: &Ep) -> Thief {
    let ep = json(
        &c.nodes[0]
            .netd
            .cli_ok(&["endpoint", "get", &fe.name])
            .expect("get"),
    );
    let selectors: Vec<sigil_registry::Selector> = ep["selectors"]
        .as_array()
        .expect("selectors")
        .iter()
        .map(|s| sigil_registry::Selector::parse(s.as_str().unwrap_or_default()).expect("selector"))
        .collect();
    let admin = &c.identity.as_ref().expect("agents").agents[0].admin_socket;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in = rt.enter();
    let client = sigil_delegated_client::Client::new(admin);
    let mut svids = client.watch_x509_svids(selectors);
    let svid = loop {
        match rt.block_on(svids.next()) {
            Some(sigil_delegated_client::Update::Current(l)) if !l.is_empty() => {
                break l[0].clone();
            }
            Some(sigil_delegated_client::Update::Error(e)) => panic!("delegated API: {e}"),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    };
    assert_eq!(svid.spiffe_id.to_string(), FE_ID);
    let mut bundles = client.watch_x509_bundles();
    let set = loop {
        match rt.block_on(bundles.next()) {
            Some(sigil_delegated_client::Update::Current(b)) if !b.is_empty() => {
                let mut set = BundleSet::new();
                for der in b.values() {
                    let mut bundle = Bundle::new(TrustDomain::parse(TRUST_DOMAIN).expect("td"));
                    for cert in sigil_spiffe::der::split_certificates(der).expect("bundle") {
                        bundle
                            .x509_authorities
                            .push(rustls_pki_types::CertificateDer::from(cert));
                    }
                    set.insert(bundle);
                }
                break set;
            }
            Some(sigil_delegated_client::Update::Error(e)) => panic!("bundles: {e}"),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    };
    let chain = svid
        .cert_chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key.pkcs8_der().to_vec().into());
    Thief {
        svid: Arc::new(sigil_tls::certified_key(chain, &key).expect("key")),
        bundles: Arc::new(ArcSwap::from_pointee(set)),
    }
}

/// Runs the handshake (local = the frontend, remote = the backend) from node `from`'s
/// namespace against node 1's handshake server.
fn handshake_from(
    c: &TestCluster,
    from: usize,
    thief: &Thief,
    fe: &Ep,
    be: &Ep,
) -> Result<(), String> {
    let server = SocketAddr::new(
        IpAddr::V4(c.topo.node(1).expect("node 1").underlay_ip),
        sigil_mutual_auth::DEFAULT_PORT,
    );
    let path = named_netns_path(&c.topo.node(from).expect("node").netns);
    let pair = Pair {
        local: NumericIdentity::new(fe.identity),
        remote: NumericIdentity::new(be.identity),
    };
    in_netns(&path, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt
            .block_on(sigil_mutual_auth::authenticate(thief, server, pair))
            .map(|_| ())
            .map_err(|e| e.to_string()))
    })
    .expect("handshake in netns")
}

#[test]
fn policy_required_mutual_auth_across_nodes() {
    if !can_run() {
        return;
    }
    let c = TestCluster::start_with_agents(3, A, &[], delegate_ready).expect("cluster");
    let id = c.identity.as_ref().expect("agents");
    // The frontend's SVID lives 20 s, so the agent rotates it (at half-life) during the test.
    id.entry_with(
        0,
        FE_ID,
        &["k8s:ns:default", "k8s:pod-label:app:frontend"],
        &["--x509-svid-ttl", "20"],
    )
    .expect("frontend entry");
    id.entry(1, BE_ID, &["k8s:ns:default", "k8s:pod-label:app:backend"])
        .expect("backend entry");
    id.entry(2, OTHER_ID, &["k8s:ns:default", "k8s:pod-label:app:other"])
        .expect("other entry");

    // Policies before any endpoint and traffic, on every node.
    for node in 0..3 {
        import(&c, node, "backend-base", &backend_base());
        import(&c, node, "backend-auth", &backend_auth());
        import(&c, node, "frontend-auth", &frontend_auth());
    }
    let fe = create(&c, 0, "frontend", FE_ID);
    let be = create(&c, 1, "backend", BE_ID);
    let other = create(&c, 2, "other", OTHER_ID);
    let drops0 = Drops::start(&c, 0);
    let drops1 = Drops::start(&c, 1);

    // The required pairs are authenticated ahead of time, and nothing else: the frontend's
    // egress on node 0 with node 1, the backend's ingress on node 1 with node 0.
    let want0 = vec![(fe.identity, be.identity, "node1".to_owned())];
    let want1 = vec![(be.identity, fe.identity, "node0".to_owned())];
    let start = Instant::now();
    wait_for("pairs authenticated", Duration::from_secs(20), || {
        let (a, b) = (auth_list(&c, 0), auth_list(&c, 1));
        Ok((a != want0 || b != want1).then(|| format!("node0 {a:?}, node1 {b:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\nnode1 log:\n{}", c.nodes[1].netd.log_text()));
    eprintln!(
        "pairs authenticated {:?} after both endpoints registered",
        start.elapsed()
    );
    assert!(auth_list(&c, 2).is_empty(), "node 2 has no required pair");

    // Monitors live: a denied flow (other -> backend) shows up at node 1.
    assert!(connect(&other, &be).is_none(), "other is not allowed");
    wait_for("the monitor streams", Duration::from_secs(5), || {
        Ok((!drops1.any()).then(|| "no drop seen".to_owned()))
    })
    .expect("monitor");

    // Traffic flows at once, with no drop of reason 189 anywhere.
    let (mut conn, took) = connect(&fe, &be).expect("frontend -> backend");
    assert!(
        took < Duration::from_millis(500),
        "no SYN was dropped: {took:?}"
    );
    for n in 0..20 {
        assert!(echo(&mut conn, n, Duration::from_secs(2)), "echo {n}");
    }
    assert!(
        drops0.with_reason(189).is_empty() && drops1.with_reason(189).is_empty(),
        "drops of reason 189: {:?} {:?}",
        drops0.with_reason(189),
        drops1.with_reason(189)
    );

    // Attack: node 2 does not host the frontend; with the frontend's valid SVID and key it
    // still cannot authenticate as the frontend with node 1. Control: from node 0 it can.
    let thief = steal_frontend(&c, &fe);
    let refused = handshake_from(&c, 2, &thief, &fe, &be).expect_err("node 2 must be refused");
    eprintln!("node 2 as the frontend: {refused}");
    handshake_from(&c, 0, &thief, &fe, &be).expect("the frontend's own node authenticates");
    assert!(
        c.nodes[1]
            .netd
            .log_text()
            .contains("does not host identity"),
        "the refusal is logged with its reason"
    );

    // A pair that appears and sends at once: the frontend starts on node 2 too (its entry given
    // to node 2 now). `endpoint create` returns once node 2 has authenticated the new pair with
    // node 1 (whose policy requires it; node 1 records it before it confirms), so the first
    // SYN passes: no retransmission, no drop of reason 189. Then it goes again.
    id.entry(2, FE_ID, &["k8s:ns:default", "k8s:pod-label:app:frontend"])
        .expect("frontend entry on node 2");
    let fe2 = create(&c, 2, "frontend", FE_ID);
    let (mut conn2, took) = connect(&fe2, &be).expect("frontend on node 2 -> backend");
    assert!(
        took < Duration::from_millis(500),
        "the new pair's first SYN was dropped: {took:?}\nnode1 log:\n{}",
        c.nodes[1].netd.log_text()
    );
    assert!(
        echo(&mut conn2, 0, Duration::from_secs(2)),
        "echo from node 2"
    );
    assert!(
        drops1.with_reason(189).is_empty(),
        "the new pair dropped with 189: {:?}",
        drops1.with_reason(189)
    );
    assert!(
        auth_list(&c, 1).contains(&(be.identity, fe.identity, "node2".to_owned())),
        "node 1 holds the new pair"
    );
    drop(conn2);
    c.nodes[2]
        .netd
        .cli_ok(&["endpoint", "delete", &fe2.name])
        .expect("endpoint delete");
    wait_for("node 2's pair revoked", Duration::from_secs(5), || {
        let l = auth_list(&c, 1);
        Ok((l != want1).then(|| format!("{l:?}")))
    })
    .expect("revoked");

    // SVID rotation: the frontend's SVID rotates on node 0; both nodes authenticate the pair
    // again before the old authentication ends, while the connection keeps echoing and no
    // packet drops with 189.
    let (exp0, exp1) = (auth_expiry(&c, 0), auth_expiry(&c, 1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echoes = echo_loop(conn, Arc::clone(&stop));
    let rotation = Instant::now();
    wait_for(
        "re-authentication after rotation",
        Duration::from_secs(40),
        || {
            let (a, b) = (auth_expiry(&c, 0), auth_expiry(&c, 1));
            Ok((a <= exp0 || b <= exp1)
                .then(|| format!("node0 {exp0} -> {a}, node1 {exp1} -> {b}")))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nnode0 log:\n{}", c.nodes[0].netd.log_text()));
    eprintln!(
        "rotation: both ends re-authenticated {:?} into the wait",
        rotation.elapsed()
    );
    assert!(
        drops0.with_reason(189).is_empty() && drops1.with_reason(189).is_empty(),
        "no drop of reason 189 across the rotation: {:?} {:?}",
        drops0.with_reason(189),
        drops1.with_reason(189)
    );

    // Revocation: the backend's auth policy goes on node 1; its entry goes and the established
    // connection is cut (the backend stays enforced by backend-base). The echo loop's last
    // success says when the connection was cut.
    let asked = Instant::now();
    c.nodes[1]
        .netd
        .cli_ok(&["policy", "delete", "default/backend-auth"])
        .expect("policy delete");
    let deleted = Instant::now();
    let mut gone_after = Duration::ZERO;
    wait_for("the auth entry revoked", Duration::from_secs(2), || {
        let l = auth_list(&c, 1);
        gone_after = deleted.elapsed();
        Ok((!l.is_empty()).then(|| format!("{l:?}")))
    })
    .expect("revoked");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = echoes.join().expect("echo thread");
    let before: Vec<&(Instant, bool)> = attempts.iter().filter(|(t, _)| *t < asked).collect();
    assert!(
        before.iter().all(|(_, ok)| *ok),
        "no echo failed before the delete ({} of {} failed)",
        before.iter().filter(|(_, ok)| !ok).count(),
        before.len()
    );
    let last = attempts
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| *t)
        .next_back()
        .unwrap_or(asked);
    let cut_after = last.saturating_duration_since(deleted);
    eprintln!(
        "policy delete took {:?}; entry seen gone {gone_after:?} after it returned (one `sigil auth list` \
         included); last echo {:?} after the delete was asked, {cut_after:?} after it returned; {} echoes before",
        deleted - asked,
        last.saturating_duration_since(asked),
        before.len()
    );
    assert!(
        cut_after <= Duration::from_millis(100),
        "connection cut within 100 ms of the delete (last echo {cut_after:?} after)"
    );
    assert!(
        gone_after <= Duration::from_millis(300),
        "entry revoked at once ({gone_after:?}, CLI included)"
    );
    assert!(
        c.nodes[1].netd.log_text().contains("pair revoked"),
        "revocation is logged"
    );
    assert_eq!(auth_list(&c, 0), want0, "node 0 keeps its own pair");
}
