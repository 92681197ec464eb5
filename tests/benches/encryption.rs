//! Encrypted-carrier benchmark (issue 12; root, etcd, nft, /dev/net/tun): cross-node TCP
//! throughput (iperf3) and request/response latency in one run, rounds interleaved:
//!
//! 1. sigil, plain VXLAN: endpoints on two nodes of a cluster with `--encryption disabled`,
//!    an allow policy;
//! 2. sigil, `--encryption spiffe`: the same on a second cluster whose netds seal the carrier
//!    (a server and an agent per node serve the node SVIDs);
//! 3. userspace WireGuard (`boringtun-cli`, if installed): two plain namespaces on the
//!    encrypted cluster's nodes, routed through a boringtun tunnel between the nodes over the
//!    same kind of underlay.
//!
//! `cargo bench -p sigil-e2e --bench encryption` (uses `target/release/sigil`, or `SIGIL_BIN`;
//! `BORINGTUN` names the boringtun-cli binary, default `~/.cargo/bin/boringtun-cli`);
//! `ROUNDS` (default 5) × `SECS` (default 3) per setup.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_test_util::netns::in_netns;
use sigil_test_util::{AgentProcess, ServerProcess, TestCluster, wait_for};

#[path = "support/crossnode.rs"]
mod crossnode;
use crossnode::*;

const TD: &str = "identity.example.com";

/// Endpoints `app=bc` on node 0 and `app=bs` on node 1 of `c`, with an allow policy.
fn endpoints(c: &TestCluster) -> Res<Vec<(Ipv4Addr, PathBuf)>> {
    // Endpoint namespaces are global: the cluster's pod octet keeps the two clusters apart.
    let pid = std::process::id();
    let mut out = Vec::new();
    for (k, app) in [(0usize, "bc"), (1, "bs")] {
        let v = json(&c.nodes[k].netd.cli_ok(&[
            "endpoint",
            "create",
            &format!("bn{pid}-{}-{k}", c.a),
            "--labels",
            &format!("app={app}"),
        ])?);
        out.push((
            v["ipv4"].as_str().unwrap_or_default().parse()?,
            PathBuf::from(v["netns"].as_str().unwrap_or_default()),
        ));
    }
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bn}\nspec:\n  endpointSelector: {matchLabels: {app: bs}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: bc}}]\n";
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bn.yaml");
    std::fs::write(&file, policy)?;
    for n in &c.nodes {
        n.netd
            .cli_ok(&["policy", "import", file.to_str().unwrap_or_default()])?;
    }
    Ok(out)
}

/// An X25519 key pair as WireGuard's UAPI wants it (hex), made by openssl.
fn wg_keypair() -> Res<(String, String)> {
    let der = Command::new("openssl")
        .args(["genpkey", "-algorithm", "X25519", "-outform", "DER"])
        .output()?;
    anyhow::ensure!(der.status.success(), "openssl genpkey");
    let mut p = Command::new("openssl")
        .args(["pkey", "-inform", "DER", "-pubout", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    p.stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(&der.stdout)?;
    let public = p.wait_with_output()?;
    let hex = |b: &[u8]| -> String {
        b[b.len() - 32..]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    Ok((hex(&der.stdout), hex(&public.stdout)))
}

/// Configures boringtun's device `dev` over its UAPI socket.
fn wg_set(dev: &str, body: &str) -> Res<()> {
    let path = format!("/var/run/wireguard/{dev}.sock");
    let mut s = UnixStream::connect(&path)?;
    s.write_all(format!("set=1\n{body}\n").as_bytes())?;
    let mut reply = String::new();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 256];
    while !reply.ends_with("\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    anyhow::ensure!(reply.contains("errno=0"), "wg set {dev}: {reply:?}");
    Ok(())
}

fn ip(node: &sigil_test_util::Node, args: &[&str]) -> Res<()> {
    let out = node.command("ip").args(args).output()?;
    anyhow::ensure!(out.status.success(), "ip {args:?}: {out:?}");
    Ok(())
}

/// Two plain namespaces on `c`'s nodes routed through a boringtun tunnel between the nodes.
fn boringtun(c: &mut TestCluster, bin: &Path, kids: &mut Kids) -> Res<Vec<(Ipv4Addr, PathBuf)>> {
    let pid = std::process::id() % 1000;
    let devs = [format!("wgb{pid}a"), format!("wgb{pid}b")];
    let keys = [wg_keypair()?, wg_keypair()?];
    let eps = [
        c.topo.add_endpoint(0, Ipv4Addr::new(10, 252, 0, 1))?,
        c.topo.add_endpoint(1, Ipv4Addr::new(10, 252, 1, 1))?,
    ];
    for (k, dev) in devs.iter().enumerate() {
        let node = c.topo.node(k)?.clone();
        kids.0.push(
            node.command(bin.to_str().unwrap_or_default())
                .args(["--foreground", "--disable-drop-privileges", dev])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let sock = PathBuf::from(format!("/var/run/wireguard/{dev}.sock"));
        wait_for("boringtun socket", Duration::from_secs(10), || {
            Ok((!sock.exists()).then(|| "no socket".to_owned()))
        })?;
    }
    for k in 0..2 {
        let node = c.topo.node(k)?.clone();
        let peer = c.topo.node(1 - k)?.clone();
        wg_set(
            &devs[k],
            &format!(
                "private_key={}\nlisten_port={}\nreplace_peers=true\npublic_key={}\nendpoint={}:{}\nallowed_ip={}/32\n",
                keys[k].0,
                51820 + k,
                keys[1 - k].1,
                peer.underlay_ip,
                51820 + (1 - k),
                eps[1 - k].ip
            ),
        )?;
        ip(&node, &["link", "set", &devs[k], "mtu", "1420", "up"])?;
        ip(
            &node,
            &[
                "route",
                "replace",
                &format!("{}/32", eps[1 - k].ip),
                "dev",
                &devs[k],
            ],
        )?;
    }
    Ok(eps.iter().map(|e| (e.ip, e.netns_path.clone())).collect())
}

fn main() -> Res<()> {
    if !sigil_test_util::can_run_with_bpffs("the encryption benchmark")
        || !sigil_test_util::can_run_etcd("the encryption benchmark")
    {
        return Ok(());
    }
    let rounds = env_num("ROUNDS", 5);
    let secs = env_num("SECS", 3);
    let bt = std::env::var("BORINGTUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cargo/bin/boringtun-cli")
        });
    let server = ServerProcess::start(&[])?;
    let agents: Vec<AgentProcess> = (0..2)
        .map(|_| AgentProcess::start(&server, &[]))
        .collect::<Res<_>>()?;
    let mut sockets = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let parent = format!(
            "spiffe://{TD}/sigil/agent/join_token/{}",
            a.token().unwrap_or_default()
        );
        let id = format!("spiffe://{TD}/node/bench{i}/netd");
        let out = server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &parent,
            "--selector",
            "unix:uid:0",
        ])?;
        anyhow::ensure!(out.status.success(), "entry create: {out:?}");
        sockets.push(a.socket.display().to_string());
    }
    let plain = TestCluster::start(2, 232, &[])?;
    let mut enc =
        TestCluster::start_per_node(2, 233, "vxlan", &["--encryption", "spiffe"], &|i| {
            vec!["--agent-workload-socket".to_owned(), sockets[i].clone()]
        })?;
    let mut kids = Kids(Vec::new());
    // (what, client namespace, server namespace, server address)
    let mut setups: Vec<(String, PathBuf, PathBuf, Ipv4Addr)> = Vec::new();
    let p = endpoints(&plain)?;
    setups.push((
        "sigil, plain VXLAN (--encryption disabled)".into(),
        p[0].1.clone(),
        p[1].1.clone(),
        p[1].0,
    ));
    let e = endpoints(&enc)?;
    setups.push((
        "sigil, --encryption spiffe (user-space carrier)".into(),
        e[0].1.clone(),
        e[1].1.clone(),
        e[1].0,
    ));
    let mut note = String::new();
    if bt.exists() {
        let w = boringtun(&mut enc, &bt, &mut kids)?;
        setups.push((
            "userspace WireGuard (boringtun-cli), plain namespaces".into(),
            w[0].1.clone(),
            w[1].1.clone(),
            w[1].0,
        ));
    } else {
        note = format!(
            "boringtun-cli not found at {} (BORINGTUN): no WireGuard baseline",
            bt.display()
        );
    }
    for (_, _, server_ns, ip) in &setups {
        iperf_server(&mut kids, server_ns)?;
        echo_server(server_ns, *ip)?;
    }
    for (what, ns, _, ip) in &setups {
        wait_for(what, Duration::from_secs(30), || {
            Ok(rr(ns, SocketAddr::from((*ip, 7000)), 1)
                .is_err()
                .then(|| "no echo".to_owned()))
        })?;
        wait_for(&format!("{what}: iperf3"), Duration::from_secs(20), || {
            let to = SocketAddr::from((*ip, 5201));
            let up = in_netns(ns, move || {
                Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
            })?;
            Ok((!up).then(|| "not listening".to_owned()))
        })?;
    }
    let n = setups.len();
    let mut gbps = vec![Vec::new(); n];
    let mut lat = vec![Vec::new(); n];
    for r in 0..rounds {
        for k in 0..n {
            let k = (k + r) % n;
            let (_, ns, _, ip) = &setups[k];
            gbps[k].push(iperf(ns, *ip, secs)?);
            lat[k].extend(rr(ns, SocketAddr::from((*ip, 7000)), 2000)?);
        }
    }
    println!(
        "# sigil encrypted-carrier benchmark — {} ({} CPUs)\n",
        Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| setup ({rounds} interleaved rounds × {secs} s) | Gbit/s median (min–max) | vs plain VXLAN | vs boringtun | RR p50 / p99 |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let base = median(gbps[0].clone());
    let wg = (n == 3).then(|| median(gbps[2].clone()));
    for k in 0..n {
        let v = &gbps[k];
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        let m = median(v.clone());
        lat[k].sort();
        println!(
            "| {} | {m:.2} ({lo:.2}–{hi:.2}) | {:.2} × | {} | {:.0} / {:.0} µs |",
            setups[k].0,
            m / base,
            wg.map(|w| format!("{:.2} ×", m / w))
                .unwrap_or_else(|| "–".into()),
            pct(&lat[k], 0.5).as_secs_f64() * 1e6,
            pct(&lat[k], 0.99).as_secs_f64() * 1e6
        );
    }
    if !note.is_empty() {
        println!("\n{note}");
    }
    // Carrier counters after the run (drops should all be zero).
    println!(
        "\nnode0 `sigil encryption status --output json` after the run: {}",
        enc.nodes[0]
            .netd
            .cli_ok(&["encryption", "status", "--output", "json"])
            .unwrap_or_default()
            .replace('\n', "")
    );
    drop(kids);
    drop(enc);
    drop(plain);
    drop(agents);
    Ok(())
}
