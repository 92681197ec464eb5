//! The cluster part of `sigil demo` (root only): three nodes, each a network namespace on a
//! bridged underlay with its own sigil-agent (attested to the demo's server by a join token) and
//! its own sigil-netd (kvstore etcd, VXLAN carrier); one etcd for the cluster in the underlay
//! namespace. Endpoints `frontend` on node 0, `backend` on node 1 and `other` on node 2 get their
//! SPIFFE IDs from entries parented to their node's agent; the SPIFFE-ID policy is imported on
//! every node; connections cross the underlay in VXLAN whose VNI is the source's identity, which
//! the demo shows from a capture on the underlay. Everything is removed afterwards.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_netlink::{Netlink, Ns, RtNetlink, command_in_netns, netns_path};
use sigil_proto::admin::v1 as admin;
use sigil_proto::admin::v1::entries_client::EntriesClient;
use sigil_proto::admin::v1::join_tokens_client::JoinTokensClient;
use sigil_proto::netd::v1 as pb;

use crate::client;
use crate::cmd::demo_net::{
    BACKEND_ID, FRONTEND_ID, Identity, POLICY, create_entry, entry, probe, show, wait_endpoint,
};

const NODES: usize = 3;
/// The underlay: a private /24 inside the demo's own namespaces (nothing on the host changes).
const UNDERLAY: [u8; 3] = [192, 168, 251];
/// The bridge's address, where etcd listens for the nodes.
const ETCD_HOST: u8 = 254;
const ETCD_PORT: u16 = 2379;
const CLUSTER_POD_CIDR: &str = "10.198.0.0/16";
const VXLAN_PORT: u16 = 8472;
const READY: Duration = Duration::from_secs(30);

fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], k as u8 + 1)
}

fn etcd_ip() -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], ETCD_HOST)
}

/// One node's processes and paths.
struct Node {
    netns: String,
    agent: Option<Child>,
    netd: Option<Child>,
    agent_admin: PathBuf,
    netd_socket: PathBuf,
    pin_dir: PathBuf,
    log_dir: PathBuf,
}

/// Everything the cluster part made, removed on drop (also after an error).
struct Cluster {
    nl: RtNetlink,
    tag: String,
    underlay: String,
    etcd: Option<Child>,
    nodes: Vec<Node>,
    server: Option<Child>,
    /// (node, endpoint name) pairs to delete through their node's netd.
    endpoints: Vec<(usize, String)>,
    namespaces: Vec<String>,
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let exe = std::env::current_exe().unwrap_or_default();
        for (k, name) in &self.endpoints {
            if let Some(n) = self.nodes.get(*k) {
                let _ = Command::new(&exe)
                    .args(["endpoint", "delete", name, "--api-socket"])
                    .arg(&n.netd_socket)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for n in &mut self.nodes {
            stop(&mut n.netd);
            stop(&mut n.agent);
            if let Ok(rd) = std::fs::read_dir(&n.pin_dir) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(&n.pin_dir);
        }
        stop(&mut self.etcd);
        // Endpoint namespaces netd did not remove (their names carry the demo's tag), then the
        // nodes and the underlay; removing a namespace removes its links.
        if let Ok(names) = self.nl.list_netns() {
            for name in names.iter().filter(|n| n.contains(&self.tag)) {
                if !self.namespaces.contains(name) {
                    let _ = self.nl.delete_netns(name);
                }
            }
        }
        while let Some(ns) = self.namespaces.pop() {
            let _ = self.nl.delete_netns(&ns);
        }
    }
}

impl Cluster {
    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        self.nl.add_netns(name)?;
        self.namespaces.push(name.to_owned());
        self.nl.set_link_up(Ns::Named(name), "lo", true)?;
        Ok(())
    }

    /// The underlay namespace with its bridge, and a namespace per node with `eth0` on it.
    fn build(&mut self) -> anyhow::Result<()> {
        let underlay = self.underlay.clone();
        self.add_netns(&underlay)?;
        let u = Ns::Named(&underlay);
        self.nl.add_bridge(u, "br0")?;
        self.nl
            .add_address(u, "br0", std::net::IpAddr::V4(etcd_ip()), 24, false)?;
        self.nl.set_link_up(u, "br0", true)?;
        for k in 0..self.nodes.len() {
            let netns = self.nodes[k].netns.clone();
            self.add_netns(&netns)?;
            let port = format!("n{k}");
            self.nl.add_veth(u, &port, "eth0", Some(&netns))?;
            self.nl.set_master(u, &port, Some("br0"))?;
            self.nl.set_link_up(u, &port, true)?;
            let ns = Ns::Named(&netns);
            self.nl
                .add_address(ns, "eth0", std::net::IpAddr::V4(node_ip(k)), 24, false)?;
            self.nl.set_link_up(ns, "eth0", true)?;
            self.nl.set_sysctl(ns, "net/ipv4/ip_forward", "1")?;
        }
        Ok(())
    }
}

/// Runs `f` on a thread inside the network namespace `netns`.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = netns_path(netns);
    std::thread::spawn(move || {
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", path.display()))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {netns} panicked"))?
}

/// Waits until `addr` accepts TCP connections from inside `netns`.
fn wait_tcp(netns: &str, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let ok = in_netns(netns, move || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
        })?;
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < READY,
            "{what} not reachable after {READY:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VNI of the first VXLAN packet on the underlay from `src` (the inner source address),
/// read from a raw socket in the underlay namespace: (outer source, outer destination, VNI).
fn capture_vni(
    underlay: &str,
    src: Ipv4Addr,
    limit: Duration,
    send: impl FnOnce() + Send + 'static,
) -> anyhow::Result<Option<(Ipv4Addr, Ipv4Addr, u32)>> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, setsockopt, socket, sockopt,
    };
    let underlay = underlay.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(
        move || -> anyhow::Result<Option<(Ipv4Addr, Ipv4Addr, u32)>> {
            let fd = in_netns(&underlay, || {
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::EthAll,
                )
                .context("opening a packet socket on the underlay")?;
                setsockopt(
                    &fd,
                    sockopt::ReceiveTimeout,
                    &nix::sys::time::TimeVal::new(0, 200_000),
                )
                .context("setting the capture's timeout")?;
                Ok(fd)
            })?;
            let _ = tx.send(());
            let file = File::from(fd);
            let start = Instant::now();
            let mut buf = [0u8; 2048];
            while start.elapsed() < limit {
                let n = match std::io::Read::read(&mut &file, &mut buf) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                if let Some(hit) = vxlan_from(&buf[..n], src) {
                    return Ok(Some(hit));
                }
            }
            Ok(None)
        },
    );
    // Send only once the socket is open, so the packet cannot pass before the capture.
    let _ = rx.recv_timeout(Duration::from_secs(5));
    send();
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?
}

/// Parses Ethernet / IPv4 / UDP 8472 / VXLAN / Ethernet / IPv4 and returns the outer addresses
/// and the VNI when the inner source is `src`.
fn vxlan_from(frame: &[u8], src: Ipv4Addr) -> Option<(Ipv4Addr, Ipv4Addr, u32)> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 17 {
        return None;
    }
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]) != VXLAN_PORT {
        return None;
    }
    let vx = udp.get(8..)?;
    let vni = u32::from_be_bytes([0, *vx.get(4)?, *vx.get(5)?, *vx.get(6)?]);
    let inner = vx.get(8 + 14..)?;
    if vx.get(8 + 12..8 + 14)? != [0x08, 0x00] {
        return None;
    }
    let inner_src = Ipv4Addr::new(
        *inner.get(12)?,
        *inner.get(13)?,
        *inner.get(14)?,
        *inner.get(15)?,
    );
    if inner_src != src {
        return None;
    }
    let outer = |o: usize| {
        Some(Ipv4Addr::new(
            *ip.get(o)?,
            *ip.get(o + 1)?,
            *ip.get(o + 2)?,
            *ip.get(o + 3)?,
        ))
    };
    Some((outer(12)?, outer(16)?, vni))
}

/// Starts `sigil <args>` with output to `log`.
fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log handle")?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs the cluster part, or says why it is skipped.
pub async fn run(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    println!("\n== Cluster: {NODES} nodes, identities in etcd, the identity in the VXLAN VNI ==");
    if !nix::unistd::geteuid().is_root() {
        println!("Skipped: the cluster part needs root. Run `sudo sigil demo`.");
        return Ok(());
    }
    let Some(etcd_bin) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    }) else {
        println!("Skipped: no etcd on PATH (Debian's etcd-server; ./scripts/demo.sh installs it).");
        return Ok(());
    };
    let exe = std::env::current_exe().context("locating the sigil binary")?;
    let tag = format!("sgd{}", std::process::id());
    let root = dir.join("cluster");
    let mut c = Cluster {
        nl: RtNetlink::new(),
        underlay: format!("{tag}-u"),
        tag: tag.clone(),
        etcd: None,
        nodes: (0..NODES)
            .map(|k| {
                let d = root.join(format!("node-{k}"));
                Node {
                    netns: format!("{tag}-n{k}"),
                    agent: None,
                    netd: None,
                    agent_admin: d.join("agent").join("private").join("admin.sock"),
                    netd_socket: d.join("netd.sock"),
                    pin_dir: PathBuf::from(format!("/sys/fs/bpf/{tag}-n{k}")),
                    log_dir: d,
                }
            })
            .collect(),
        server: None,
        endpoints: Vec::new(),
        namespaces: Vec::new(),
    };
    for n in &c.nodes {
        std::fs::create_dir_all(&n.log_dir)
            .with_context(|| format!("creating {}", n.log_dir.display()))?;
    }
    c.build()?;
    println!(
        "Underlay {}.{}.{}.0/24 on a bridge in namespace {}; nodes {} at {}",
        UNDERLAY[0],
        UNDERLAY[1],
        UNDERLAY[2],
        c.underlay,
        c.nodes
            .iter()
            .map(|n| n.netns.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        (0..NODES)
            .map(|k| node_ip(k).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // etcd for the cluster, in the underlay namespace on the bridge's address.
    let etcd_url = format!("http://{}:{ETCD_PORT}", etcd_ip());
    c.etcd = Some(spawn(
        command_in_netns(&netns_path(&c.underlay), &etcd_bin)
            .args(["--name", "sigil-demo", "--data-dir"])
            .arg(root.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "sigil-demo=http://127.0.0.1:2380"]),
        &root.join("etcd.log"),
    )?);
    let underlay = c.underlay.clone();
    let etcd_addr = SocketAddr::from((etcd_ip(), ETCD_PORT));
    tokio::task::spawn_blocking(move || wait_tcp(&underlay, etcd_addr, "etcd"))
        .await?
        .with_context(|| log_tail(&root.join("etcd.log")))?;
    println!("etcd serving on {etcd_url}");

    // An agent per node (join token), and an entry making each node's netd its delegate.
    let admin_channel = client::connect(&id.admin_socket).await?;
    let mut entries = EntriesClient::new(admin_channel.clone());
    let mut tokens = JoinTokensClient::new(admin_channel);
    let mut agent_ids = Vec::new();
    for k in 0..NODES {
        let token = client::reply(
            tokens
                .create_join_token(admin::CreateJoinTokenRequest {
                    ttl: 600,
                    spiffe_id: String::new(),
                })
                .await,
        )
        .context("generating a join token")?
        .token;
        let agent_id = format!(
            "spiffe://{}/sigil/agent/join_token/{token}",
            super::demo::TRUST_DOMAIN
        );
        create_entry(
            &mut entries,
            entry(super::demo::NETD_ID, &agent_id, &["unix:uid:0"]),
        )
        .await?;
        let n = &mut c.nodes[k];
        let agent_dir = n.log_dir.join("agent");
        n.agent = Some(spawn(
            Command::new(&exe)
                .args(["agent", "run", "--server-address", &id.server_address])
                .args([
                    "--trust-domain",
                    super::demo::TRUST_DOMAIN,
                    "--trust-bundle",
                ])
                .arg(&id.bundle)
                .args(["--join-token", &token, "--data-dir"])
                .arg(agent_dir.join("data"))
                .arg("--socket-path")
                .arg(agent_dir.join("public").join("api.sock"))
                .arg("--admin-socket-path")
                .arg(&n.agent_admin)
                .args(["--authorized-delegate", super::demo::NETD_ID])
                .arg("--netd-socket")
                .arg(&n.netd_socket),
            &n.log_dir.join("agent.log"),
        )?);
        agent_ids.push(agent_id);
    }
    // Workload entries, each under the agent of the node its endpoint lives on.
    let fe_selectors = ["k8s:ns:default", "k8s:pod-label:app:frontend"];
    create_entry(
        &mut entries,
        entry(FRONTEND_ID, &agent_ids[0], &fe_selectors),
    )
    .await?;
    create_entry(
        &mut entries,
        entry(
            BACKEND_ID,
            &agent_ids[1],
            &["k8s:ns:default", "k8s:pod-label:app:backend"],
        ),
    )
    .await?;
    for (k, n) in c.nodes.iter().enumerate() {
        let delegate = sigil_delegated_client::Client::new(&n.agent_admin);
        let start = Instant::now();
        while let Err(e) = delegate.check().await {
            anyhow::ensure!(
                start.elapsed() < READY,
                "node-{k}'s agent never served netd as a delegate: {e}\n{}",
                log_tail(&n.log_dir.join("agent.log"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "An agent per node, attested by join token: {}",
        agent_ids.join(", ")
    );

    for k in 0..NODES {
        let n = &mut c.nodes[k];
        n.netd = Some(spawn(
            command_in_netns(&netns_path(&n.netns), &exe)
                .args(["netd", "run", "--node-name", &format!("node-{k}")])
                .args(["--node-ip", &node_ip(k).to_string()])
                .args(["--kvstore", "etcd", "--kvstore-endpoints", &etcd_url])
                .args(["--cluster-name", "demo", "--cluster-id", "1"])
                .args(["--cluster-pod-cidr", CLUSTER_POD_CIDR])
                .args([
                    "--pod-cidr-v6",
                    &format!("fd00:198:{k}::/64"),
                    "--api-socket",
                ])
                .arg(&n.netd_socket)
                .arg("--state-dir")
                .arg(n.log_dir.join("netd-state"))
                .arg("--bpf-pin-dir")
                .arg(&n.pin_dir)
                .arg("--agent-socket")
                .arg(&n.agent_admin)
                .args(["--identity-fallback-wait", "2s"]),
            &n.log_dir.join("netd.log"),
        )?);
    }
    let mut channels = Vec::new();
    for (k, n) in c.nodes.iter_mut().enumerate() {
        let start = Instant::now();
        let ch = loop {
            if let Ok(ch) = client::dial(&n.netd_socket).await {
                let mut s = pb::status_client::StatusClient::new(ch.clone());
                if s.get_status(pb::GetStatusRequest {}).await.is_ok() {
                    break ch;
                }
            }
            if let Some(p) = n.netd.as_mut()
                && let Ok(Some(st)) = p.try_wait()
            {
                anyhow::bail!(
                    "node-{k}'s sigil-netd exited with {st}: {}",
                    log_tail(&n.log_dir.join("netd.log"))
                );
            }
            anyhow::ensure!(
                start.elapsed() < READY,
                "node-{k}'s sigil-netd not ready after {READY:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        channels.push(ch);
    }
    println!("sigil-netd on every node (kvstore etcd, cluster demo, VXLAN on UDP {VXLAN_PORT})");
    show_nodes(&channels[0]).await?;

    let mut addr = Vec::new();
    for (k, (name, app)) in [
        ("frontend", "frontend"),
        ("backend", "backend"),
        ("other", "other"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut eps = pb::endpoints_client::EndpointsClient::new(channels[k].clone());
        c.endpoints.push((k, name.to_owned()));
        let e = client::reply(
            eps.create_endpoint(pb::CreateEndpointRequest {
                name: name.to_owned(),
                labels: vec![format!("app={app}")],
                namespace: "default".to_owned(),
                spiffe_id: String::new(),
                service_account: String::new(),
                no_wait: false,
            })
            .await,
        )
        .with_context(|| format!("creating endpoint {name} on node-{k}"))?;
        addr.push((e.ipv4.clone(), e.netns_name.clone()));
    }
    println!("Endpoints, their SPIFFE IDs from their node's agent:");
    let mut identities = Vec::new();
    for (k, (name, want)) in [
        ("frontend", Some(FRONTEND_ID)),
        ("backend", Some(BACKEND_ID)),
        ("other", None),
    ]
    .into_iter()
    .enumerate()
    {
        let mut eps = pb::endpoints_client::EndpointsClient::new(channels[k].clone());
        let e = wait_endpoint(
            &mut eps,
            name,
            "its SPIFFE identity",
            READY,
            |e| match want {
                Some(id) => {
                    e.spiffe_id.as_deref() == Some(id) && e.spiffe_id_source == "registered"
                }
                None => e.spiffe_id_source == "classic-fallback",
            },
        )
        .await?;
        println!("  node-{k}: {}", show(&e));
        identities.push(e.identity);
    }

    let (backend_ip, backend_ns) = addr[1].clone();
    let target = format!("{backend_ip}:8080");
    c.server = Some(
        command_in_netns(&netns_path(&backend_ns), &exe)
            .args(["netd", "echo-server", "--bind", &target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the TCP server in backend")?,
    );
    // Before any policy: frontend reaches backend across the underlay once node-0 has learned
    // backend's address from etcd.
    let front_ns = addr[0].1.clone();
    let start = Instant::now();
    while !probe(&exe, &front_ns, &target) {
        anyhow::ensure!(
            start.elapsed() < READY,
            "backend on node-1 never answered frontend on node-0"
        );
    }
    println!(
        "TCP echo server in backend (node-1) on {target}; reachable from node-0 after {} ms",
        start.elapsed().as_millis()
    );
    for (k, ch) in channels.iter().enumerate() {
        let mut pol = pb::policies_client::PoliciesClient::new(ch.clone());
        client::reply(
            pol.import_policies(pb::ImportPoliciesRequest {
                files: vec![pb::PolicyFile {
                    origin: "demo-policy.yaml".to_owned(),
                    yaml: POLICY.to_owned(),
                }],
            })
            .await,
        )
        .with_context(|| format!("importing the policy on node-{k}"))?;
    }
    println!(
        "Imported the SPIFFE-ID policy on every node (into backend only from frontend, TCP 8080)"
    );
    let front_ip: Ipv4Addr = addr[0].0.parse().context("frontend's address")?;
    let (e2, ns2, t2) = (exe.clone(), front_ns.clone(), target.clone());
    let underlay = c.underlay.clone();
    let captured = tokio::task::spawn_blocking(move || {
        capture_vni(&underlay, front_ip, Duration::from_secs(5), move || {
            let _ = probe(&e2, &ns2, &t2);
        })
    })
    .await??;
    let verdict = |ok: bool| if ok { "ALLOWED" } else { "DENIED" };
    for (k, name) in [(0usize, "frontend"), (2, "other")] {
        let (exe, ns, t) = (exe.clone(), addr[k].1.clone(), target.clone());
        let ok = tokio::task::spawn_blocking(move || probe(&exe, &ns, &t)).await?;
        println!(
            "  {name:<8} (node-{k}) -> backend (node-1) {target}: {}",
            verdict(ok)
        );
    }
    match captured {
        Some((from, to, vni)) => println!(
            "Captured on the underlay: VXLAN {from} -> {to} UDP {VXLAN_PORT}, VNI {vni} = frontend's identity {}{}",
            identities[0],
            if vni == identities[0] {
                ""
            } else {
                " (MISMATCH)"
            }
        ),
        None => println!("Captured on the underlay: no VXLAN packet from frontend within 5 s"),
    }
    for (k, name) in std::mem::take(&mut c.endpoints) {
        let mut eps = pb::endpoints_client::EndpointsClient::new(channels[k].clone());
        client::reply(
            eps.delete_endpoint(pb::DeleteEndpointRequest { name })
                .await,
        )?;
    }
    drop(c);
    println!(
        "Cluster removed: endpoints, netd and agents stopped, etcd stopped, namespaces and pins gone."
    );
    Ok(())
}

/// Prints the node registry as `node` sees it, once every node has registered.
async fn show_nodes(ch: &tonic::transport::Channel) -> anyhow::Result<()> {
    let mut c = pb::cluster_client::ClusterClient::new(ch.clone());
    let start = Instant::now();
    let nodes = loop {
        let r = client::reply(c.list_nodes(pb::ListNodesRequest {}).await)?;
        if r.nodes.len() >= NODES || start.elapsed() > READY {
            break r.nodes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("Node registry in etcd, as node-0 sees it:");
    for n in nodes {
        println!(
            "  {:<8} underlay {:<15} pod CIDR {}{}",
            n.name,
            n.ip,
            n.pod_cidr_v4,
            if n.local { "  (this node)" } else { "" }
        );
    }
    Ok(())
}
