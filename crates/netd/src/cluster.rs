//! Cluster mode (`--kvstore etcd`): this node's session in etcd and the task that keeps the
//! datapath in step with the cluster view.
//!
//! At start ([`join`]): the node's lease (resumed after a restart, so its claims stay its
//! own), its name claimed, its pod CIDR claimed or leased, its entry registered, and the
//! cluster's identities listed so the engine knows them before any map is installed. Then
//! ([`run`]): every cluster identity goes into the policy engine, this node's endpoints are
//! published, other nodes' endpoints are validated (a registered node, an address in that
//! node's pod CIDR) and installed in the IPCache, node addresses get `remote-node`, and other
//! nodes' pod CIDRs are routed to their underlay addresses. Everything in etcd is input from
//! other machines: invalid values are logged and ignored, never trusted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sigil_identity::NumericIdentity;
use sigil_kvstore::{
    Cidr, ClusterAllocator, IdentityEvent, IpCacheEntry, IpCacheEvent, KvStore, NodeEvent, NodeInfo,
};
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink};
use sigil_spiffe::SpiffeId;
use tokio::sync::{Notify, watch};

use crate::config::{ClusterConfig, Config, LEASED_POD_CIDR_LEN, PodCidr, Tunnel};
use crate::reconcile::{ClusterOp, Handle};

/// File in the state directory holding this node's lease ID (resumed after a restart).
const LEASE_FILE: &str = "cluster-lease";
/// How often endpoints waiting for their cluster identity try again.
const RETRY_PENDING: Duration = Duration::from_secs(1);

/// The registered nodes (this one included), published by [`run`] for the API.
pub type NodesView = Arc<arc_swap::ArcSwap<Vec<NodeInfo>>>;

/// This node's endpoint addresses as written to etcd (address → identity), published by
/// [`run`] after every change: `endpoint create` returns once its addresses are there.
pub type Published = BTreeMap<IpAddr, u32>;

/// What [`run`] publishes for the API.
pub struct Outputs {
    /// The registered nodes.
    pub nodes: NodesView,
    /// This node's endpoint addresses in etcd.
    pub published: watch::Sender<Published>,
}

/// What [`join`] established.
pub struct Joined {
    /// The session.
    pub store: KvStore,
    /// The cluster allocator.
    pub alloc: Arc<ClusterAllocator>,
    /// This node's registry entry.
    pub node: NodeInfo,
}

fn lease_file(state_dir: &Path) -> PathBuf {
    state_dir.join(LEASE_FILE)
}

fn to_cidr<A: Copy + Into<IpAddr>>(c: &PodCidr<A>) -> anyhow::Result<Cidr> {
    Ok(Cidr::new(c.network.into(), c.prefix_len)?)
}

/// Joins the cluster; may change `config.pod_cidr` (leased from `--cluster-pod-cidr`). Fails
/// when etcd is unreachable or a claim (node name, pod CIDR) is another live node's.
/// `carrier_id`: the SPIFFE ID of this node's carrier SVID (`--encryption spiffe`), published
/// in its registry entry for peers to pin.
pub async fn join(config: &mut Config, carrier_id: Option<SpiffeId>) -> anyhow::Result<Joined> {
    let cc = config
        .cluster
        .clone()
        .context("cluster mode without a cluster config")?;
    let resume = std::fs::read_to_string(lease_file(&config.state_dir))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let store = KvStore::connect(cc.kvstore(&config.node_name, resume))
        .await
        .context("connecting to etcd")?;
    match claim(config, &cc, &store, carrier_id).await {
        Ok(node) => {
            write_lease(&config.state_dir, store.lease_id())?;
            let alloc = Arc::new(ClusterAllocator::new(&store));
            tokio::time::timeout(Duration::from_secs(10), alloc.wait_synced())
                .await
                .context("listing the cluster's identities in etcd")?;
            tracing::info!(node = %node.name, ip = %node.ip, lease = store.lease_id(), identities = alloc.list().len(), "joined the cluster");
            Ok(Joined { store, alloc, node })
        }
        Err(e) => {
            // Nothing half-claimed stays: the session and whatever it wrote go.
            if let Err(c) = store.close().await {
                tracing::warn!(error = %c, "revoking the etcd lease failed; it lapses after its TTL");
            }
            Err(e)
        }
    }
}

/// Claims this node's name and pod CIDRs and registers its entry.
async fn claim(
    config: &mut Config,
    cc: &ClusterConfig,
    store: &KvStore,
    carrier_id: Option<SpiffeId>,
) -> anyhow::Result<NodeInfo> {
    let spiffe_id = config
        .spiffe_ids
        .registrar
        .as_ref()
        .map(|r| r.agent_spiffe_id.clone());
    let mut node = NodeInfo {
        name: config.node_name.clone(),
        ip: cc.node_ip,
        pod_cidr_v4: None,
        pod_cidr_v6: None,
        spiffe_id,
        carrier_id,
    };
    // The name first: a second node under this name must not take over its pod CIDR.
    store
        .register_node(&node)
        .await
        .context("registering this node")?;
    let v4 = match cc.cluster_pod_cidr {
        Some(range) => {
            let got = store
                .lease_pod_cidr(to_cidr(&range)?, LEASED_POD_CIDR_LEN)
                .await
                .context("leasing a pod CIDR")?;
            let IpAddr::V4(network) = got.addr() else {
                anyhow::bail!("leased pod CIDR {got} is not IPv4");
            };
            config.pod_cidr = PodCidr {
                network,
                prefix_len: got.len(),
            };
            tracing::info!(pod_cidr = %got, range = %range, "leased this node's pod CIDR");
            got
        }
        None => {
            let c = to_cidr(&config.pod_cidr)?;
            store
                .claim_pod_cidr(c)
                .await
                .context("claiming this node's pod CIDR")?;
            c
        }
    };
    let v6 = to_cidr(&config.pod_cidr_v6)?;
    store
        .claim_pod_cidr(v6)
        .await
        .context("claiming this node's IPv6 pod CIDR")?;
    node.pod_cidr_v4 = Some(v4);
    node.pod_cidr_v6 = Some(v6);
    store
        .register_node(&node)
        .await
        .context("registering this node")?;
    Ok(node)
}

fn write_lease(state_dir: &Path, id: i64) -> anyhow::Result<()> {
    let path = lease_file(state_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, id.to_string()).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, &path).with_context(|| path.display().to_string())
}

/// Why a remote IPCache entry is not installed (`None`: it is valid).
pub fn check_entry(
    e: &IpCacheEntry,
    nodes: &BTreeMap<String, NodeInfo>,
    node_ips: &HashSet<IpAddr>,
    me: &NodeInfo,
) -> Option<String> {
    let Some(node) = nodes.get(&e.node) else {
        return Some(format!("node {:?} is not registered", e.node));
    };
    if node.ip != e.host_ip {
        return Some(format!(
            "host_ip {} is not node {:?}'s address {}",
            e.host_ip, e.node, node.ip
        ));
    }
    let inside = |c: &Option<Cidr>| c.is_some_and(|c| c.contains(e.ip));
    if !inside(&node.pod_cidr_v4) && !inside(&node.pod_cidr_v6) {
        return Some(format!("{} is outside node {:?}'s pod CIDRs", e.ip, e.node));
    }
    if inside(&me.pod_cidr_v4) || inside(&me.pod_cidr_v6) {
        return Some(format!("{} lies in this node's pod CIDR", e.ip));
    }
    if node_ips.contains(&e.ip) {
        return Some(format!("{} is a node address", e.ip));
    }
    None
}

/// Whether `other`'s pod CIDR may be routed: it must not overlap this node's.
fn routable(other: &NodeInfo, me: &NodeInfo) -> Option<Cidr> {
    let c = other.pod_cidr_v4?;
    let mine = me.pod_cidr_v4?;
    (!c.contains(mine.addr()) && !mine.contains(c.addr())).then_some(c)
}

/// The cluster view as this node holds it.
struct View {
    me: NodeInfo,
    tunnel: Tunnel,
    nodes: BTreeMap<String, NodeInfo>,
    entries: BTreeMap<IpAddr, IpCacheEntry>,
    installed: BTreeMap<IpAddr, (u32, Option<Ipv4Addr>)>,
    routes: BTreeMap<Cidr, IpAddr>,
    rejected: HashSet<(IpAddr, String)>,
    published: BTreeMap<IpAddr, u32>,
    /// With `--encryption spiffe`: the carrier's view of which node hosts which identity.
    hosted: Option<Arc<crate::encryption::Hosted>>,
}

impl View {
    /// What the kernel IPCache should hold of the cluster: node addresses as remote-node,
    /// valid remote endpoints with their identities.
    fn desired(&mut self) -> BTreeMap<IpAddr, (u32, Option<Ipv4Addr>)> {
        let mut out = BTreeMap::new();
        let vxlan = self.tunnel == Tunnel::Vxlan;
        // With the carrier, entries name the node to tunnel to (nodes: themselves, as cluster
        // nodes the tunnel accepts VXLAN from).
        let via = |ip: IpAddr| match ip {
            IpAddr::V4(v4) if vxlan => Some(v4),
            _ => None,
        };
        for n in self.nodes.values() {
            if n.name != self.me.name && n.ip != self.me.ip {
                out.insert(n.ip, (NumericIdentity::REMOTE_NODE.get(), via(n.ip)));
            }
        }
        let mut seen = HashSet::new();
        let node_ips: HashSet<IpAddr> = self.nodes.values().map(|n| n.ip).collect();
        for e in self.entries.values() {
            match check_entry(e, &self.nodes, &node_ips, &self.me) {
                None => {
                    out.insert(e.ip, (e.identity.get(), via(e.host_ip)));
                }
                Some(why) => {
                    let key = (e.ip, e.node.clone());
                    if !self.rejected.contains(&key) {
                        tracing::warn!(ip = %e.ip, node = %e.node, reason = %why, "rejecting a remote IPCache entry");
                    }
                    seen.insert(key);
                }
            }
        }
        self.rejected = seen;
        out
    }

    async fn apply(&mut self, handle: &Handle) {
        let want = self.desired();
        let mut batch: Vec<(IpAddr, Option<u32>, Option<Ipv4Addr>)> = self
            .installed
            .keys()
            .filter(|ip| !want.contains_key(ip))
            .map(|ip| (*ip, None, None))
            .collect();
        for (ip, (id, via)) in &want {
            if self.installed.get(ip) != Some(&(*id, *via)) {
                batch.push((*ip, Some(*id), *via));
            }
        }
        if batch.is_empty() {
            self.sync_routes().await;
            return;
        }
        // One writer turn for the whole change; if any of it failed, the entries go one by
        // one so that exactly the failed ones are retried on the next change.
        let whole = handle.cluster(ClusterOp::Ips(batch.clone())).await;
        for (ip, id, via) in batch {
            let done = match &whole {
                Ok(0) => true,
                _ => match handle.cluster(ClusterOp::Ip(ip, id, via)).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(ip = %ip, error = %e, "a remote IPCache change failed");
                        false
                    }
                },
            };
            if done {
                match id {
                    Some(id) => {
                        self.installed.insert(ip, (id, via));
                    }
                    None => {
                        self.installed.remove(&ip);
                    }
                }
            }
        }
        self.sync_routes().await;
        if let Some(h) = &self.hosted {
            // The carrier accepts from a node exactly the identities installed for it.
            h.publish(
                self.installed
                    .values()
                    .filter_map(|(id, via)| via.map(|v| (IpAddr::V4(v), *id)))
                    .collect(),
            );
        }
    }

    async fn sync_routes(&mut self) {
        let mut want: BTreeMap<Cidr, IpAddr> = BTreeMap::new();
        for n in self.nodes.values() {
            if n.name == self.me.name {
                continue;
            }
            if let Some(c) = routable(n, &self.me) {
                want.insert(c, n.ip);
            }
        }
        let gone: Vec<Cidr> = self
            .routes
            .keys()
            .filter(|c| !want.contains_key(c))
            .copied()
            .collect();
        for c in gone {
            let Some(via) = self.routes.get(&c).copied() else {
                continue;
            };
            if let Err(e) = route(c, via, self.tunnel, false).await {
                tracing::warn!(cidr = %c, error = %e, "removing a pod CIDR route failed");
            }
            self.routes.remove(&c);
        }
        for (c, via) in want {
            if self.routes.get(&c) == Some(&via) {
                continue;
            }
            match route(c, via, self.tunnel, true).await {
                Ok(()) => {
                    self.routes.insert(c, via);
                }
                Err(e) => {
                    tracing::warn!(cidr = %c, via = %via, error = %e, "routing a pod CIDR failed")
                }
            }
        }
    }
}

/// Routes `cidr` (another node's pod CIDR) via the node's address `via` (direct routing) or
/// into the VXLAN device (the host's own packets then leave as the node, VNI 6; endpoints'
/// packets are redirected by their IPCache entries anyway); `add`, or removes that route.
async fn route(cidr: Cidr, via: IpAddr, tunnel: Tunnel, add: bool) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let nl = RtNetlink::new();
        let r = match tunnel {
            Tunnel::Vxlan => sigil_datapath::tunnel::tunnel_route(
                sigil_datapath::tunnel::DEFAULT_DEVICE,
                cidr.addr(),
                cidr.len(),
            )?,
            Tunnel::Disabled => Route::via(Prefix::new(cidr.addr(), cidr.len())?, via, None),
        };
        if add {
            nl.replace_route(Ns::Current, &r)?;
        } else {
            nl.delete_route(Ns::Current, &r)?;
        }
        anyhow::Ok(())
    })
    .await?
}

/// Whether an endpoint holding `identity` is published to etcd: a cluster identity (not
/// reserved, not node-local).
pub fn publishable(identity: u32) -> bool {
    !NumericIdentity::new(identity).is_reserved()
        && identity & NumericIdentity::LOCAL_CIDR_FLAG == 0
}

/// Publishes this node's endpoints (those with a cluster identity) and withdraws the gone.
async fn publish_local(view: &mut View, store: &KvStore, handle: &Handle) -> bool {
    let snap = handle.snapshot();
    let mut want = BTreeMap::new();
    for (rec, _) in snap.endpoints.values() {
        if rec.is_pending() || !publishable(rec.identity) {
            continue;
        }
        want.insert(IpAddr::V4(rec.ipv4), rec.identity);
        want.insert(IpAddr::V6(rec.ipv6), rec.identity);
    }
    let mut ok = true;
    let gone: Vec<IpAddr> = view
        .published
        .keys()
        .filter(|ip| !want.contains_key(ip))
        .copied()
        .collect();
    for ip in gone {
        match store.withdraw_endpoint(ip).await {
            Ok(()) => {
                view.published.remove(&ip);
            }
            Err(e) => {
                ok = false;
                tracing::warn!(ip = %ip, error = %e, "withdrawing an endpoint from etcd failed; retrying");
            }
        }
    }
    for (ip, id) in want {
        if view.published.get(&ip) == Some(&id) {
            continue;
        }
        match store.publish_endpoint(ip, NumericIdentity::new(id)).await {
            Ok(()) => {
                view.published.insert(ip, id);
            }
            Err(e) => {
                ok = false;
                tracing::warn!(ip = %ip, error = %e, "publishing an endpoint to etcd failed; retrying");
            }
        }
    }
    ok
}

/// Takes a node-registry event into the view; true when the view changed.
fn on_node(view: &mut View, ev: NodeEvent, synced: &mut bool) -> bool {
    match ev {
        NodeEvent::Upsert(n) => {
            if n.name == view.me.name {
                return false;
            }
            view.nodes.insert(n.name.clone(), n);
        }
        NodeEvent::Delete(name) => {
            if view.nodes.remove(&name).is_some() {
                tracing::info!(node = %name, "node left the cluster");
            }
        }
        NodeEvent::Synced => *synced = true,
    }
    true
}

/// Takes an IPCache event into the view; true when the view changed.
fn on_ipcache(view: &mut View, ev: IpCacheEvent, synced: &mut bool) -> bool {
    match ev {
        IpCacheEvent::Upsert(e) => {
            view.entries.insert(e.ip, e);
        }
        IpCacheEvent::Delete(ip) => {
            view.entries.remove(&ip);
        }
        IpCacheEvent::Synced => *synced = true,
    }
    true
}

/// Keeps the datapath in step with the cluster until `stop`; see the module documentation.
pub async fn run(
    joined: Joined,
    cc: ClusterConfig,
    state_dir: PathBuf,
    handle: Handle,
    outputs: Outputs,
    carrier: Option<(Arc<crate::encryption::Hosted>, Arc<Notify>)>,
    mut stop: watch::Receiver<bool>,
) {
    let Joined { store, alloc, node } = joined;
    let Outputs {
        nodes: nodes_view,
        published,
    } = outputs;
    let (hosted, nodes_changed) = carrier.unzip();
    nodes_view.store(Arc::new(vec![node.clone()]));
    let mut view = View {
        me: node,
        tunnel: cc.tunnel,
        nodes: BTreeMap::new(),
        entries: BTreeMap::new(),
        installed: BTreeMap::new(),
        routes: BTreeMap::new(),
        rejected: HashSet::new(),
        published: BTreeMap::new(),
        hosted,
    };
    let gc = {
        let alloc = Arc::clone(&alloc);
        let grace = cc.gc_grace;
        let interval = (grace / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
        tokio::spawn(async move { alloc.gc_loop(interval, grace).await })
    };
    let mut ids = alloc.subscribe();
    let mut nodes = store.watch_nodes();
    let mut ipcache = store.watch_ipcache();
    let mut changes = handle.changes();
    let mut lease = store.lease_changes();
    let mut tick = tokio::time::interval(RETRY_PENDING);
    let (mut nodes_synced, mut ipcache_synced, mut pruned) = (false, false, false);
    let mut dirty_publish = true;
    loop {
        let mut dirty_view = false;
        tokio::select! {
            // The watch's `Ref` is not Send: dropped inside the branch's future.
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            ev = ids.recv() => match ev {
                Some(IdentityEvent::Upsert(id, labels)) => {
                    if let Err(e) = handle.cluster(ClusterOp::Identity(id, Some(labels))).await {
                        tracing::warn!(identity = id.get(), error = %e, "adding a cluster identity failed");
                    }
                }
                Some(IdentityEvent::Delete(id)) => {
                    if let Err(e) = handle.cluster(ClusterOp::Identity(id, None)).await {
                        tracing::warn!(identity = id.get(), error = %e, "removing a cluster identity failed");
                    }
                }
                Some(IdentityEvent::Synced) => {}
                None => break,
            },
            ev = nodes.next() => match ev {
                Some(ev) => dirty_view |= on_node(&mut view, ev, &mut nodes_synced),
                None => break,
            },
            ev = ipcache.next() => match ev {
                Some(ev) => dirty_view |= on_ipcache(&mut view, ev, &mut ipcache_synced),
                None => break,
            },
            r = changes.changed() => {
                if r.is_err() {
                    break;
                }
                dirty_publish = true;
            }
            r = lease.changed() => {
                if r.is_err() {
                    break;
                }
                let id = *lease.borrow_and_update();
                if let Err(e) = write_lease(&state_dir, id) {
                    tracing::warn!(error = %e, "recording the etcd lease failed");
                }
            }
            _ = tick.tick() => {
                dirty_publish = true;
                let waiting = handle
                    .snapshot()
                    .endpoints
                    .values()
                    .any(|(r, _)| r.cluster_pending);
                if waiting
                    && let Err(e) = handle.cluster(ClusterOp::RetryPending).await
                {
                    tracing::warn!(error = %e, "retrying endpoints waiting for their identity failed");
                }
            }
        }
        if dirty_view {
            let mut all: Vec<NodeInfo> = vec![view.me.clone()];
            all.extend(view.nodes.values().cloned());
            nodes_view.store(Arc::new(all));
            if let Some(n) = &nodes_changed {
                n.notify_one();
            }
        }
        // Everything else already queued goes into the view before it is applied once: the
        // view is recomputed whole, so applying per event made a burst of N entries cost N².
        if dirty_view {
            while let Some(ev) = nodes.try_next() {
                on_node(&mut view, ev, &mut nodes_synced);
            }
            while let Some(ev) = ipcache.try_next() {
                on_ipcache(&mut view, ev, &mut ipcache_synced);
            }
        }
        if dirty_view && nodes_synced && ipcache_synced {
            view.apply(&handle).await;
            if !pruned {
                let keep: BTreeSet<IpAddr> = view.installed.keys().copied().collect();
                match handle.cluster(ClusterOp::Prune(keep)).await {
                    Ok(n) => {
                        pruned = true;
                        tracing::info!(
                            stale = n,
                            remote = view.installed.len(),
                            "cluster view synced"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "pruning stale remote entries failed"),
                }
            }
        }
        if dirty_publish {
            dirty_publish = !publish_local(&mut view, &store, &handle).await;
            published.send_if_modified(|p| {
                let changed = *p != view.published;
                if changed {
                    p.clone_from(&view.published);
                }
                changed
            });
        }
    }
    gc.abort();
    // Not closed: the lease lapses after its TTL unless the next start resumes it, so a
    // restart keeps this node's entries (no gap on other nodes).
    drop(store);
}
