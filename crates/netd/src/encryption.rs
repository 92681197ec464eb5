//! `--encryption spiffe`: the VXLAN carrier between nodes sealed by `sigil-encryption`.
//!
//! The kernel's VXLAN device keeps building the packets (VNI = source identity, remote = the
//! hosting node's underlay address); a policy-routing rule sends every locally generated
//! packet to UDP 8472 into the TUN device [`TUN_DEVICE`], where the carrier seals it for the
//! destination node's session and sends it to that node's UDP 8473. The receiver opens it,
//! checks it (replay, source, VXLAN shape, "does the sender host this VNI?") and writes it
//! into its own TUN device, from where the kernel delivers it to the VXLAN device. nftables
//! drops UDP 8472 arriving on any other device, so plaintext VXLAN injected on the underlay
//! never reaches the datapath. The rule, the routes and the nftables table stay when netd
//! stops: with the TUN device gone the VXLAN packets hit the blackhole route, so a stopped
//! carrier fails closed.
//!
//! Sessions: one per peer node in the registry, keyed by a TLS 1.3 handshake on TCP 4251 in
//! which each node presents the node SVID its agent serves netd on the Workload API and pins
//! the peer's `carrier_id` from the registry. The node with the lower underlay address keys a
//! new pair and rekeys before the session's expiry; either node rekeys when its own SVID
//! rotates.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use sigil_encryption::carrier::{Carrier, DEFAULT_UDP_PORT, IdentityCheck, PeerStats};
use sigil_encryption::handshake::{self, NodeCredentials};
use sigil_encryption::tun::Tun;
use sigil_kvstore::NodeInfo;
use sigil_spiffe::SpiffeId;
use tokio::sync::{Notify, watch};

use crate::cluster::NodesView;
use crate::registrar::client::{OwnSvid, fetch_own_svid};

/// The carrier's TUN device.
pub const TUN_DEVICE: &str = "sigil_crypt";
/// Its MTU: above the largest VXLAN packet the endpoints' MTU makes (so the kernel never
/// fragments one into it; fragments are refused by the receiver).
pub const TUN_MTU: u32 = 9000;
/// Routing table (and rule priority) of the VXLAN packets.
pub const ROUTE_TABLE: u32 = 8472;
/// nftables table of the plaintext-VXLAN drop.
pub const NFT_TABLE: &str = "sigil_crypt";
/// How often the peer set is reconciled with the registry (also woken by changes).
const RECONCILE: Duration = Duration::from_millis(500);
/// Rekey this long before a session's expiry.
const REKEY_BEFORE: i64 = 60;
/// A failed handshake with a peer is retried after this long.
const RETRY: Duration = Duration::from_secs(1);

/// Which identities each node hosts, from the cluster IPCache (published by the cluster task).
#[derive(Default)]
pub struct Hosted(ArcSwap<HashSet<(IpAddr, u32)>>);

impl Hosted {
    /// Replaces the set: (node underlay address, identity) pairs.
    pub fn publish(&self, set: HashSet<(IpAddr, u32)>) {
        self.0.store(Arc::new(set));
    }
}

impl IdentityCheck for Hosted {
    fn peer_hosts(&self, node: IpAddr, identity: u32) -> bool {
        identity == sigil_identity::NumericIdentity::REMOTE_NODE.get()
            || self.0.load().contains(&(node, identity))
    }
}

/// One peer's status as `sigil encryption status` shows it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Its node name (empty when it left the registry).
    pub node: String,
    /// Its underlay address.
    pub ip: Ipv4Addr,
    /// Its proven node SPIFFE ID.
    pub spiffe_id: String,
    /// Unix seconds the current session was keyed.
    pub keyed_unix: i64,
    /// Unix seconds the session expires.
    pub expires_unix: i64,
    /// Counters.
    pub stats: PeerStats,
}

/// The running carrier, for the API.
pub struct Status {
    carrier: Arc<Carrier>,
    nodes: NodesView,
    ids: std::sync::Mutex<HashMap<Ipv4Addr, (SpiffeId, i64)>>,
    /// This node's node SPIFFE ID.
    pub local_id: SpiffeId,
}

impl Status {
    /// Every peer with a session, and the carrier's drops that belong to no peer
    /// (unknown session, no peer for a destination).
    pub fn peers(&self) -> (Vec<PeerStatus>, u64, u64) {
        let nodes = self.nodes.load();
        let ids = self.ids.lock().map(|m| m.clone()).unwrap_or_default();
        let peers = self
            .carrier
            .stats()
            .into_iter()
            .map(|(overlay, _, keyed, stats)| {
                let node = nodes
                    .iter()
                    .find(|n| n.ip == IpAddr::V4(overlay))
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                let (id, expires) = ids
                    .get(&overlay)
                    .map(|(i, e)| (i.to_string(), *e))
                    .unwrap_or_default();
                PeerStatus {
                    node,
                    ip: overlay,
                    spiffe_id: id,
                    keyed_unix: keyed,
                    expires_unix: expires,
                    stats,
                }
            })
            .collect();
        let c = &self.carrier.counters;
        (
            peers,
            c.unknown_session.load(Ordering::Relaxed),
            c.no_peer.load(Ordering::Relaxed),
        )
    }
}

/// The node SVID, current and refreshed.
struct Creds {
    creds: ArcSwap<NodeCredentials>,
    /// Bumped on every rotation: sessions keyed with an older generation are rekeyed.
    generation: AtomicU32,
}

fn node_credentials(svid: &OwnSvid) -> anyhow::Result<NodeCredentials> {
    Ok(NodeCredentials {
        svid: Arc::new(svid.certified_key()?),
        bundles: Arc::new(ArcSwap::from_pointee(svid.bundle_set())),
    })
}

/// Fetches this node's node SVID (before joining: its ID goes into the node registry).
pub async fn fetch_node_svid(socket: &Path) -> anyhow::Result<OwnSvid> {
    fetch_own_svid(socket)
        .await
        .context("encryption spiffe: fetching the node SVID")
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn run_cmd(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if let Some(input) = stdin
        && let Some(mut w) = child.stdin.take()
    {
        w.write_all(input.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft_ruleset() -> String {
    // Created empty first so that the delete always finds it: the whole file is one
    // transaction, so the table is replaced atomically (never a moment without the drop).
    format!(
        "table inet {NFT_TABLE} {{}}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -200; policy accept;\n\
         \t\tiifname != \"{TUN_DEVICE}\" udp dport {port} counter drop\n\
         \t}}\n\
         }}\n",
        port = sigil_datapath::tunnel::DEFAULT_PORT
    )
}

/// Routes this node's VXLAN packets into the TUN device (a blackhole behind it, so they never
/// leave in the clear) and drops plaintext VXLAN arriving elsewhere. Idempotent.
fn install_network() -> anyhow::Result<()> {
    let table = ROUTE_TABLE.to_string();
    let port = sigil_datapath::tunnel::DEFAULT_PORT.to_string();
    // sysctl: the decrypted packets arrive on the TUN device from the peer's underlay address,
    // which routes via the uplink.
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{TUN_DEVICE}/rp_filter"),
        "0",
    )
    .context("rp_filter of the TUN device")?;
    run_cmd(
        "ip",
        &["link", "set", TUN_DEVICE, "mtu", &TUN_MTU.to_string(), "up"],
        None,
    )?;
    run_cmd(
        "ip",
        &[
            "route", "replace", "default", "dev", TUN_DEVICE, "table", &table, "metric", "0",
        ],
        None,
    )?;
    run_cmd(
        "ip",
        &[
            "route",
            "replace",
            "blackhole",
            "default",
            "table",
            &table,
            "metric",
            "4294967295",
        ],
        None,
    )?;
    remove_rule();
    run_cmd(
        "ip",
        &[
            "rule", "add", "priority", &table, "iif", "lo", "ipproto", "udp", "dport", &port,
            "lookup", &table,
        ],
        None,
    )?;
    run_cmd("nft", &["-f", "-"], Some(&nft_ruleset()))
        .context("installing the plaintext-VXLAN drop (nftables)")?;
    Ok(())
}

fn remove_rule() {
    let prio = ROUTE_TABLE.to_string();
    for _ in 0..8 {
        if run_cmd("ip", &["rule", "del", "priority", &prio], None).is_err() {
            break;
        }
    }
}

/// Removes what [`install_network`] set up (a node started with `--encryption disabled`).
/// Absent parts are ignored.
pub fn remove_network() {
    remove_rule();
    let _ = run_cmd(
        "ip",
        &["route", "flush", "table", &ROUTE_TABLE.to_string()],
        None,
    );
    let _ = run_cmd(
        "nft",
        &["-f", "-"],
        Some(&format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        )),
    );
}

/// Plaintext VXLAN packets the nftables rule dropped (`None` if it cannot be read).
pub fn plaintext_dropped() -> Option<u64> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", NFT_TABLE])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["nftables"].as_array()?.iter().find_map(|e| {
        e["rule"]["expr"]
            .as_array()?
            .iter()
            .find_map(|x| x["counter"]["packets"].as_u64())
    })
}

/// What [`start`] returns: the status for the API and the tasks to stop.
pub struct Running {
    /// For the API.
    pub status: Arc<Status>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the carrier's tasks (the TUN device goes with the last reference).
    pub async fn stop(self) {
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Sets up the carrier on `node_ip` with the node SVID `svid` (fetched again from
/// `workload_socket` as it rotates) and runs it until `stop`.
pub async fn start(
    node_ip: Ipv4Addr,
    svid: OwnSvid,
    workload_socket: PathBuf,
    nodes: NodesView,
    hosted: Arc<Hosted>,
    changed: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    let tun = Tun::create(TUN_DEVICE).context("creating the carrier's TUN device")?;
    tokio::task::spawn_blocking(install_network)
        .await
        .context("network setup task")??;
    let udp = tokio::net::UdpSocket::bind((node_ip, DEFAULT_UDP_PORT))
        .await
        .with_context(|| format!("binding the carrier's UDP {node_ip}:{DEFAULT_UDP_PORT}"))?;
    let listener = tokio::net::TcpListener::bind((node_ip, handshake::DEFAULT_PORT))
        .await
        .with_context(|| {
            format!(
                "binding the carrier handshake's TCP {node_ip}:{}",
                handshake::DEFAULT_PORT
            )
        })?;
    let carrier = Carrier::new(tun, udp, hosted);
    let local_id = svid.id.clone();
    let creds = Arc::new(Creds {
        creds: ArcSwap::from_pointee(node_credentials(&svid)?),
        generation: AtomicU32::new(0),
    });
    let status = Arc::new(Status {
        carrier: Arc::clone(&carrier),
        nodes: Arc::clone(&nodes),
        ids: std::sync::Mutex::new(HashMap::new()),
        local_id: local_id.clone(),
    });
    let mgr = Arc::new(Manager {
        carrier: Arc::clone(&carrier),
        creds,
        local_id,
        node_ip,
        nodes,
        status: Arc::clone(&status),
        next_index: AtomicU32::new(random_u32()),
        keyed: std::sync::Mutex::new(HashMap::new()),
    });
    let mut tasks = Vec::new();
    let c = Arc::clone(&carrier);
    tasks.push(tokio::spawn(async move {
        if let Err(e) = c.run().await {
            tracing::error!(error = %e, "the encrypted carrier stopped; inter-node traffic is dropped");
        }
    }));
    tasks.push(tokio::spawn(Arc::clone(&mgr).accept(listener)));
    tasks.push(tokio::spawn(Arc::clone(&mgr).rotate(
        svid,
        workload_socket,
        Arc::clone(&changed),
    )));
    tasks.push(tokio::spawn(mgr.reconcile(changed, stop)));
    tracing::info!(device = TUN_DEVICE, udp = DEFAULT_UDP_PORT, handshake = handshake::DEFAULT_PORT, node_id = %status.local_id, "encrypted carrier up (encryption spiffe)");
    Ok(Running { status, tasks })
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A failure leaves 0: indices only need to be distinct among this node's sessions.
    let _ = aws_lc_rs::rand::fill(&mut b);
    u32::from_ne_bytes(b)
}

/// A keyed peer: with whom, under which of our SVID generations, until when.
#[derive(Clone)]
struct Keyed {
    id: SpiffeId,
    generation: u32,
    keyed_unix: i64,
    expires_unix: i64,
}

impl Keyed {
    /// When to rekey: [`REKEY_BEFORE`] before expiry, or a third of the session's life for
    /// short-lived SVIDs (so a 30 s SVID is not rekeyed on every pass).
    fn rekey_at(&self) -> i64 {
        let margin = ((self.expires_unix - self.keyed_unix) / 3).clamp(1, REKEY_BEFORE);
        self.expires_unix - margin
    }
}

struct Manager {
    carrier: Arc<Carrier>,
    creds: Arc<Creds>,
    local_id: SpiffeId,
    node_ip: Ipv4Addr,
    nodes: NodesView,
    status: Arc<Status>,
    next_index: AtomicU32,
    keyed: std::sync::Mutex<HashMap<Ipv4Addr, Keyed>>,
}

impl Manager {
    fn index(&self) -> u32 {
        self.next_index.fetch_add(1, Ordering::Relaxed)
    }

    /// Peers in the registry with a carrier ID other than ours: underlay address → ID.
    fn peers(&self) -> HashMap<Ipv4Addr, SpiffeId> {
        let nodes = self.nodes.load();
        peer_ids(&nodes, self.node_ip, &self.local_id)
    }

    fn install(&self, ip: Ipv4Addr, s: handshake::Established, generation: u32) {
        let k = Keyed {
            id: s.peer_id.clone(),
            generation,
            keyed_unix: now_unix(),
            expires_unix: s.expires_unix,
        };
        if let Ok(mut m) = self.status.ids.lock() {
            m.insert(ip, (s.peer_id.clone(), s.expires_unix));
        }
        self.carrier
            .set_peer(SocketAddr::from((ip, DEFAULT_UDP_PORT)), ip, s, now_unix());
        if let Ok(mut m) = self.keyed.lock() {
            m.insert(ip, k);
        }
    }

    fn forget(&self, ip: Ipv4Addr) {
        self.carrier.remove_peer(ip);
        if let Ok(mut m) = self.keyed.lock() {
            m.remove(&ip);
        }
        if let Ok(mut m) = self.status.ids.lock() {
            m.remove(&ip);
        }
    }

    async fn accept(self: Arc<Self>, listener: tokio::net::TcpListener) {
        // Bounded: a flood of connections cannot start unbounded handshakes.
        let permits = Arc::new(tokio::sync::Semaphore::new(64));
        loop {
            let Ok((tcp, from)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let _permit = permit;
                let peers = me.peers();
                let generation = me.creds.generation.load(Ordering::Acquire);
                let creds = me.creds.creds.load_full();
                let r = handshake::respond(
                    &creds,
                    tcp,
                    |ip| match ip {
                        IpAddr::V4(v4) => peers.get(&v4).cloned(),
                        IpAddr::V6(_) => None,
                    },
                    me.index(),
                )
                .await;
                match (r, from.ip()) {
                    (Ok(s), IpAddr::V4(ip)) => {
                        tracing::info!(peer = %ip, peer_id = %s.peer_id, "carrier session keyed (responder)");
                        me.install(ip, s, generation);
                    }
                    (Ok(_), _) => {}
                    (Err(e), _) => {
                        tracing::warn!(peer = %from, error = %e, "carrier handshake refused")
                    }
                }
            });
        }
    }

    /// Fetches the node SVID again half-way through its life; a new one rekeys every peer.
    async fn rotate(self: Arc<Self>, mut svid: OwnSvid, socket: PathBuf, changed: Arc<Notify>) {
        loop {
            let wait = svid
                .refresh_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            match fetch_own_svid(&socket).await {
                Ok(next) if next.id != self.local_id => {
                    tracing::error!(was = %self.local_id, now = %next.id, "the node SVID changed its SPIFFE ID; keeping the registered one until restart");
                    svid.refresh_at = SystemTime::now() + RETRY * 10;
                }
                Ok(next) => {
                    if next.leaf() != svid.leaf() {
                        match node_credentials(&next) {
                            Ok(c) => {
                                self.creds.creds.store(Arc::new(c));
                                self.creds.generation.fetch_add(1, Ordering::AcqRel);
                                tracing::info!(id = %next.id, "node SVID rotated; rekeying every peer");
                                changed.notify_one();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "the rotated node SVID is unusable")
                            }
                        }
                    }
                    svid = next;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refreshing the node SVID failed; retrying");
                    svid.refresh_at = SystemTime::now() + RETRY * 5;
                }
            }
        }
    }

    async fn reconcile(self: Arc<Self>, changed: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let mut failed: HashMap<Ipv4Addr, Instant> = HashMap::new();
        let mut inflight: HashMap<Ipv4Addr, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
                () = changed.notified() => {}
                () = tokio::time::sleep(RECONCILE) => {}
            }
            inflight.retain(|_, h| !h.is_finished());
            let peers = self.peers();
            let keyed = self.keyed.lock().map(|m| m.clone()).unwrap_or_default();
            let generation = self.creds.generation.load(Ordering::Acquire);
            let now = now_unix();
            for (ip, k) in &keyed {
                // Gone from the registry, a different node at that address, or expired: its
                // packets are dropped from now on.
                let gone = peers.get(ip) != Some(&k.id);
                if gone || k.expires_unix <= now {
                    tracing::info!(peer = %ip, gone, "carrier session removed");
                    self.forget(*ip);
                }
            }
            for (ip, id) in peers {
                let k = keyed.get(&ip).filter(|k| k.id == id);
                let initiator = self.node_ip < ip;
                let need = match k {
                    None => initiator,
                    Some(k) => {
                        // The responder steps in only when the initiator is late.
                        let late = (k.rekey_at() + k.expires_unix) / 2;
                        k.generation != generation
                            || (initiator && k.rekey_at() <= now)
                            || late <= now
                    }
                };
                if !need
                    || inflight.contains_key(&ip)
                    || failed.get(&ip).is_some_and(|t| t.elapsed() < RETRY)
                {
                    continue;
                }
                failed.remove(&ip);
                let me = Arc::clone(&self);
                inflight.insert(
                    ip,
                    tokio::spawn(async move {
                        let creds = me.creds.creds.load_full();
                        let generation = me.creds.generation.load(Ordering::Acquire);
                        let hs = SocketAddr::from((ip, handshake::DEFAULT_PORT));
                        match handshake::initiate(&creds, hs, &id, me.index()).await {
                            Ok(s) => {
                                tracing::info!(peer = %ip, peer_id = %s.peer_id, "carrier session keyed (initiator)");
                                me.install(ip, s, generation);
                            }
                            Err(e) => {
                                tracing::warn!(peer = %ip, error = %e, "carrier handshake failed; retrying");
                            }
                        }
                    }),
                );
                failed.insert(ip, Instant::now());
            }
        }
        for (_, h) in inflight {
            h.abort();
        }
    }
}

/// Peers in `nodes` that may have a session: another IPv4 address than ours, a carrier ID,
/// and not ours (two nodes presenting one SVID could impersonate each other: refused).
fn peer_ids(nodes: &[NodeInfo], me: Ipv4Addr, local_id: &SpiffeId) -> HashMap<Ipv4Addr, SpiffeId> {
    let mut out = HashMap::new();
    for n in nodes {
        let IpAddr::V4(ip) = n.ip else { continue };
        if ip == me {
            continue;
        }
        match &n.carrier_id {
            Some(id) if id != local_id => {
                out.insert(ip, id.clone());
            }
            Some(_) => {
                tracing::warn!(node = %n.name, "node presents this node's own carrier SPIFFE ID; no session");
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, id: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ip: ip.parse().expect("ip"),
            pod_cidr_v4: None,
            pod_cidr_v6: None,
            spiffe_id: None,
            carrier_id: id.map(|s| SpiffeId::parse(s).expect("id")),
        }
    }

    #[test]
    fn peers_need_their_own_carrier_id() {
        let me = SpiffeId::parse("spiffe://t/sigil/netd/a").expect("id");
        let nodes = vec![
            node("a", "192.0.2.1", Some("spiffe://t/sigil/netd/a")),
            node("b", "192.0.2.2", Some("spiffe://t/sigil/netd/b")),
            node("c", "192.0.2.3", None),
            node("d", "192.0.2.4", Some("spiffe://t/sigil/netd/a")),
            node("e", "2001:db8::1", Some("spiffe://t/sigil/netd/e")),
        ];
        let got = peer_ids(&nodes, "192.0.2.1".parse().expect("ip"), &me);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got.get(&"192.0.2.2".parse().expect("ip"))
                .map(|i| i.as_str()),
            Some("spiffe://t/sigil/netd/b")
        );
    }

    #[test]
    fn only_hosted_identities_and_remote_node_pass() {
        let h = Hosted::default();
        let n: IpAddr = "192.0.2.2".parse().expect("ip");
        h.publish([(n, 70_000)].into_iter().collect());
        assert!(h.peer_hosts(n, 70_000));
        assert!(h.peer_hosts(n, 6));
        assert!(!h.peer_hosts(n, 70_001));
        assert!(!h.peer_hosts("192.0.2.3".parse().expect("ip"), 70_000));
    }

    #[test]
    fn the_ruleset_drops_vxlan_not_from_the_tun_device() {
        let r = nft_ruleset();
        assert!(
            r.contains("iifname != \"sigil_crypt\" udp dport 8472 counter drop"),
            "{r}"
        );
        assert!(
            r.starts_with("table inet sigil_crypt {}\ndelete table"),
            "{r}"
        );
    }
}
