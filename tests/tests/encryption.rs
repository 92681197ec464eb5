//! `--encryption spiffe` end to end, as root: a sigil-server, one agent per node (each serving
//! its node's netd a per-node SVID on the Workload API), etcd, and two cluster-mode netds with
//! the encrypted carrier. TCP between endpoints on different nodes works and the policy (the
//! source identity in the VNI) is still enforced; the underlay carries no plaintext payload and
//! no VXLAN; replayed, bit-flipped and truncated carrier packets, a forged VNI (an identity
//! the sender does not host), carrier packets from a non-cluster address and plaintext VXLAN
//! injected on the underlay are dropped and counted in `sigil encryption status` — each
//! attack followed by a control showing legitimate traffic still passes.

#[path = "support/cli.rs"]
mod cli;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli::TD;
use serde_json::Value;
use sigil_test_util::netns::in_netns;
use sigil_test_util::{
    AgentProcess, ServerProcess, TestCluster, can_run_etcd, can_run_with_bpffs, wait_for,
};

const A: u8 = 214;
const PORT: u16 = 8080;
const SECRET: &[u8] = b"SIGIL-SECRET-PAYLOAD-7f3a9c";
const CARRIER_PORT: u16 = 8473;
const VXLAN_PORT: u16 = 8472;
const PASS: Duration = Duration::from_secs(10);
const BLOCK: Duration = Duration::from_millis(500);
const SESSION: Duration = Duration::from_secs(30);
/// The node SVIDs' lifetime: short, so the test sees them rotate and the sessions rekey.
const SVID_TTL: Duration = Duration::from_secs(30);

fn can_run() -> bool {
    can_run_with_bpffs("the encryption test")
        && can_run_etcd("the encryption test")
        && sigil_test_util::can_run_as_root_and("the encryption test", || {
            let missing = ["/dev/net/tun", "/usr/sbin/nft"]
                .into_iter()
                .find(|p| !Path::new(p).exists());
            missing.map(|p| format!("{p} is missing"))
        })
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

fn node_id(i: usize) -> String {
    format!("spiffe://{TD}/node/node{i}/netd")
}

fn entry_create(server: &ServerProcess, parent: &str, id: &str) {
    let out = server
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            parent,
            "--selector",
            "unix:uid:0",
            "--x509-svid-ttl",
            &SVID_TTL.as_secs().to_string(),
        ])
        .expect("cli");
    assert!(
        out.status.success(),
        "entry create {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sigil encryption status --output json` on node `i`.
fn status(c: &TestCluster, i: usize) -> Value {
    json(
        &c.nodes[i]
            .netd
            .cli_ok(&["encryption", "status", "--output", "json"])
            .expect("encryption status"),
    )
}

/// Node `i`'s counters of its session with the other node.
fn peer(c: &TestCluster, i: usize) -> Value {
    let s = status(c, i);
    s["peers"][0].clone()
}

fn counter(p: &Value, name: &str) -> u64 {
    p[name]
        .as_u64()
        .or_else(|| p["dropped"][name].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {p}"))
}

/// Waits until node `i`'s counter `name` of its peer reaches `want`.
fn wait_counter(c: &TestCluster, i: usize, name: &str, want: u64) -> Value {
    let mut last = Value::Null;
    let r = wait_for(&format!("node{i} {name} >= {want}"), PASS, || {
        last = peer(c, i);
        Ok((counter(&last, name) < want).then(|| last.to_string()))
    });
    r.expect("counter");
    last
}

struct Ep {
    ip: Ipv4Addr,
    netns: PathBuf,
    identity: u32,
}

fn create(c: &TestCluster, node: usize, name: &str, app: &str) -> Ep {
    let name = format!("e{}-{name}", std::process::id());
    let v = json(
        &c.nodes[node]
            .netd
            .cli_ok(&[
                "endpoint",
                "create",
                &name,
                "--labels",
                &format!("app={app}"),
            ])
            .expect("endpoint create"),
    );
    Ep {
        ip: v["ipv4"].as_str().expect("ipv4").parse().expect("ipv4"),
        netns: PathBuf::from(v["netns"].as_str().expect("netns")),
        identity: v["identity"].as_u64().expect("identity") as u32,
    }
}

/// Accepts connections and reads each to its end (a thread; it ends with the process).
fn serve(l: TcpListener) {
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

/// Connects from `from` to `to`:8080 within `wait` and sends [`SECRET`]; true when connected.
fn tcp_send(from: &Path, to: Ipv4Addr, wait: Duration) -> bool {
    let to = SocketAddr::new(IpAddr::V4(to), PORT);
    let start = Instant::now();
    in_netns(from, || {
        loop {
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(false);
            }
            match TcpStream::connect_timeout(&to, left.min(Duration::from_secs(1))) {
                Ok(mut s) => {
                    s.write_all(SECRET)?;
                    return Ok(true);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
    .expect("connect from netns")
}

/// An AF_PACKET socket on the underlay bridge: every frame while `f` runs.
fn capture(c: &TestCluster, f: impl FnOnce()) -> Vec<Vec<u8>> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
    };
    let fd = in_netns(&c.topo.underlay_path(), || {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        Ok(fd)
    })
    .expect("packet socket");
    f();
    let file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Ok(n) = (&file).read(&mut buf) {
            out.push(buf[..n].to_vec());
        }
    }
    out
}

/// UDP payloads to `port` in captured IPv4 frames, with the frame's source address.
fn udp_to(frames: &[Vec<u8>], port: u16) -> Vec<(Ipv4Addr, Vec<u8>)> {
    let mut out = Vec::new();
    for f in frames {
        if f.len() < 42 || f[12..14] != [8, 0] || f[23] != 17 {
            continue;
        }
        // Fragments after the first carry no UDP header.
        if u16::from_be_bytes([f[20], f[21]]) & 0x1fff != 0 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let Some(udp) = f.get(14 + ihl..) else {
            continue;
        };
        if udp.len() >= 8 && u16::from_be_bytes([udp[2], udp[3]]) == port {
            let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
            out.push((src, udp[8..].to_vec()));
        }
    }
    out.dedup();
    out
}

/// A VXLAN header with `vni` and an inner frame carrying [`SECRET`].
fn vxlan(vni: u32) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&vni.to_be_bytes()[1..]);
    p.push(0);
    p.extend_from_slice(&[0u8; 14]);
    p.extend_from_slice(SECRET);
    p
}

fn policy() -> String {
    "apiVersion: cilium.io/v2\n\
     kind: CiliumClusterwideNetworkPolicy\n\
     metadata: {name: web-ingress}\n\
     spec:\n\
     \x20 endpointSelector: {matchLabels: {app: web}}\n\
     \x20 ingress:\n\
     \x20 - fromEndpoints: [{matchLabels: {app: client}}]\n\
     \x20   toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n"
        .to_owned()
}

#[test]
fn the_encrypted_carrier_protects_and_checks_every_inter_node_packet() {
    if !can_run() {
        return;
    }
    // Identity plane: one server, an agent per node, a per-node SVID for each node's netd.
    let server = ServerProcess::start(&[]).expect("server");
    let agents: Vec<AgentProcess> = (0..2)
        .map(|_| AgentProcess::start(&server, &[]).expect("agent"))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        entry_create(&server, &agent_id(a), &node_id(i));
    }
    let sockets: Vec<String> = agents
        .iter()
        .map(|a| a.socket.display().to_string())
        .collect();
    let c = TestCluster::start_per_node(2, A, "vxlan", &["--encryption", "spiffe"], &|i| {
        vec!["--agent-workload-socket".to_owned(), sockets[i].clone()]
    })
    .expect("cluster");

    // Each node keyed a session with the other, pinned to its node SPIFFE ID.
    for i in 0..2 {
        // The first handshake may wait out one handshake timeout (5 s) when the peer's listener
        // was not up yet on a loaded machine; 30 s covers a few attempts.
        wait_for(&format!("node{i}'s session"), SESSION, || {
            let s = status(&c, i);
            let p = &s["peers"][0];
            Ok((p["spiffe_id"] != node_id(1 - i).as_str()).then(|| s.to_string()))
        })
        .expect("session");
        assert_eq!(status(&c, i)["spiffe_id"], node_id(i).as_str());
    }

    let web = create(&c, 1, "web", "web");
    let client = create(&c, 0, "client", "client");
    let other = create(&c, 0, "other", "other");
    serve(in_netns(&web.netns, || Ok(TcpListener::bind(("0.0.0.0", PORT))?)).expect("listen"));
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy()).expect("write policy");
    for n in &c.nodes {
        n.netd
            .cli_ok(&["policy", "import", &file.display().to_string()])
            .expect("import");
    }

    // TCP across nodes works through the carrier; the underlay shows only carrier packets.
    let mut ok = false;
    let frames = capture(&c, || ok = tcp_send(&client.netns, web.ip, PASS));
    assert!(ok, "client → web across nodes failed");
    let sealed = udp_to(&frames, CARRIER_PORT);
    assert!(!sealed.is_empty(), "no carrier packet on the underlay");
    assert!(
        udp_to(&frames, VXLAN_PORT).is_empty(),
        "plaintext VXLAN on the underlay"
    );
    assert!(
        !frames
            .iter()
            .any(|f| f.windows(SECRET.len()).any(|w| w == SECRET)),
        "the payload is readable on the underlay"
    );
    // Policy is still enforced by the identity in the (protected) VNI.
    assert!(
        !tcp_send(&other.netns, web.ip, BLOCK),
        "app=other reached web: the policy was not enforced across the carrier"
    );
    assert!(tcp_send(&client.netns, web.ip, PASS), "control after deny");

    // Full-sized packets fit the underlay: the VXLAN device's MTU leaves room for the sealed
    // datagram's headers and tag, so no carrier datagram is fragmented on the underlay.
    let frames = capture(&c, || {
        in_netns(&client.netns, || {
            let to = SocketAddr::new(IpAddr::V4(web.ip), PORT);
            let mut s = TcpStream::connect_timeout(&to, PASS)?;
            s.write_all(&vec![0x5a; 256 * 1024])?;
            Ok(())
        })
        .expect("bulk send");
    });
    let ipv4: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| f.len() >= 34 && f[12..14] == [8, 0])
        .collect();
    assert!(
        ipv4.iter().any(|f| f.len() > 1400),
        "no full-sized carrier packet on the underlay"
    );
    let fragments = ipv4
        .iter()
        .filter(|f| u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0)
        .count();
    assert_eq!(
        fragments, 0,
        "carrier datagrams were fragmented on the underlay (MTU without room for the seal)"
    );

    let node0_ip = c.topo.node(0).expect("node0").underlay_ip;
    let node1_ip = c.topo.node(1).expect("node1").underlay_ip;
    let carrier1 = SocketAddr::from((node1_ip, CARRIER_PORT));
    let from0: Vec<Vec<u8>> = sealed
        .iter()
        .filter(|(src, _)| *src == node0_ip)
        .map(|(_, p)| p.clone())
        .collect();
    let captured = from0.last().expect("a carrier packet from node0").clone();
    // The attacker's position: node0's own underlay address (the strongest spoof).
    let raw0 = in_netns(c.topo.node_path(0).expect("node0"), || {
        Ok(UdpSocket::bind((node0_ip, 0))?)
    })
    .expect("socket on node0");
    let before = peer(&c, 1);

    // Replay.
    raw0.send_to(&captured, carrier1).expect("send");
    wait_counter(&c, 1, "replayed", counter(&before, "replayed") + 1);
    assert!(
        tcp_send(&client.netns, web.ip, PASS),
        "control after replay"
    );
    // Bit flip (fresh counter, so it is the tag that refuses it).
    let mut flipped = captured.clone();
    flipped[8..16].copy_from_slice(&(u64::MAX / 2).to_be_bytes());
    let last = flipped.len() - 20;
    flipped[last] ^= 0x40;
    raw0.send_to(&flipped, carrier1).expect("send");
    wait_counter(
        &c,
        1,
        "unauthenticated",
        counter(&before, "unauthenticated") + 1,
    );
    // Truncated.
    let mut truncated = captured.clone();
    truncated[8..16].copy_from_slice(&(u64::MAX / 2 + 1).to_be_bytes());
    truncated.truncate(truncated.len() - 7);
    raw0.send_to(&truncated, carrier1).expect("send");
    wait_counter(
        &c,
        1,
        "unauthenticated",
        counter(&before, "unauthenticated") + 2,
    );
    // Garbage too short to be a carrier packet.
    raw0.send_to(&[1, 2, 3], carrier1).expect("send");
    wait_for("unknown_session", PASS, || {
        let s = status(&c, 1);
        Ok((s["dropped"]["unknown_session"].as_u64().unwrap_or(0) < 1).then(|| s.to_string()))
    })
    .expect("garbage counted");
    assert!(
        tcp_send(&client.netns, web.ip, PASS),
        "control after forgeries"
    );

    // A forged VNI: node0 sends (through its own carrier, so authentic) VXLAN claiming web's
    // identity, which only node1 hosts; then a control with client's identity, which node0
    // hosts.
    let vx0 = in_netns(c.topo.node_path(0).expect("node0"), || {
        Ok(UdpSocket::bind((node0_ip, 0))?)
    })
    .expect("socket on node0");
    let s = peer(&c, 1);
    vx0.send_to(&vxlan(web.identity), (node1_ip, VXLAN_PORT))
        .expect("send");
    wait_counter(
        &c,
        1,
        "identity_not_hosted",
        counter(&s, "identity_not_hosted") + 1,
    );
    let rx = counter(&peer(&c, 1), "rx_packets");
    vx0.send_to(&vxlan(client.identity), (node1_ip, VXLAN_PORT))
        .expect("send");
    wait_counter(&c, 1, "rx_packets", rx + 1);
    assert_eq!(
        counter(&peer(&c, 1), "identity_not_hosted"),
        counter(&s, "identity_not_hosted") + 1,
        "the hosted identity was refused"
    );

    // From a non-cluster address (the underlay bridge): a captured carrier packet and
    // plaintext VXLAN with client's identity. Both dropped and counted.
    let outsider = in_netns(&c.topo.underlay_path(), || {
        Ok(UdpSocket::bind("0.0.0.0:0")?)
    })
    .expect("socket on the underlay");
    let s = peer(&c, 1);
    let older = from0.first().expect("packet").clone();
    outsider.send_to(&older, carrier1).expect("send");
    wait_for("outsider's packet counted", PASS, || {
        let p = peer(&c, 1);
        let dropped = counter(&p, "replayed") + counter(&p, "wrong_source");
        Ok(
            (dropped <= counter(&s, "replayed") + counter(&s, "wrong_source"))
                .then(|| p.to_string()),
        )
    })
    .expect("outsider");
    let plain_before = status(&c, 1)["dropped"]["plaintext"].as_u64().unwrap_or(0);
    outsider
        .send_to(&vxlan(client.identity), (node1_ip, VXLAN_PORT))
        .expect("send");
    wait_for("plaintext VXLAN dropped", PASS, || {
        let s = status(&c, 1);
        Ok(
            (s["dropped"]["plaintext"].as_u64().unwrap_or(0) <= plain_before)
                .then(|| s.to_string()),
        )
    })
    .expect("plaintext counted");
    assert!(
        tcp_send(&client.netns, web.ip, PASS),
        "control after the outsider's packets"
    );
    // Node SVID rotation (agents rotate at half life, netd fetches again): both sessions are
    // rekeyed (a later expiry, the same pinned IDs) and traffic still flows.
    let expiry: Vec<i64> = (0..2)
        .map(|i| peer(&c, i)["expires_unix"].as_i64().expect("expiry"))
        .collect();
    let drops_before = peer(&c, 1);
    wait_for("sessions rekeyed after rotation", SVID_TTL + PASS, || {
        let now: Vec<Value> = (0..2).map(|i| peer(&c, i)).collect();
        let done = (0..2).all(|i| now[i]["expires_unix"].as_i64().unwrap_or(0) > expiry[i]);
        Ok((!done).then(|| format!("{now:?}")))
    })
    .expect("rekey");
    for i in 0..2 {
        assert_eq!(peer(&c, i)["spiffe_id"], node_id(1 - i).as_str());
    }
    assert!(tcp_send(&client.netns, web.ip, PASS), "traffic after rekey");
    let after = peer(&c, 1);
    for k in [
        "unauthenticated",
        "malformed",
        "wrong_source",
        "identity_not_hosted",
    ] {
        assert_eq!(
            counter(&after, k),
            counter(&drops_before, k),
            "{k} dropped during the rekey: {after}"
        );
    }
    // Traffic in both directions was counted with bytes.
    for i in 0..2 {
        let p = peer(&c, i);
        for k in ["tx_packets", "rx_packets", "tx_bytes", "rx_bytes"] {
            assert!(counter(&p, k) > 0, "node{i} {k}: {p}");
        }
    }
    drop(c);
    drop(agents);
}
