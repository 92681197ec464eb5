//! The daemon's state machine: endpoints, identities, policies, and the order in which their
//! changes reach the kernel so that no update opens a window where traffic that the policy
//! denies passes. Only the reconciler ([`crate::reconcile`]) holds it.
//!
//! Orderings: an endpoint's own policy is in the map before its datapath is attached; other
//! endpoints' maps learn a new identity before the IPCache hands it out; an address leaves the
//! IPCache before the maps forget its identity. A change reaches the maps as the engine's key
//! changes, planned over every affected endpoint at once and written (1) new or changed
//! denies, (2) stale allows removed, (3) new or changed allows, (4) stale denies removed, with
//! enforcement flags tightened before and relaxed after; a failed write undoes the earlier
//! ones in reverse, through the same fail-closed states. Policy changes are transactions
//! ([`crate::txn`]): the engine and the state change only after the kernel took every write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sigil_datapath::Datapath;
use sigil_datapath::netns::{self, EndpointSpec};
use sigil_identity::{Allocator, IdentityError, NumericIdentity, reserved_identities};
use sigil_labels::Labels;
use sigil_policy::{IpPrefix, PolicyDeltas, PolicyEngine, PolicyId, parse_documents};

use crate::config::{Config, IdentityMode};
use crate::error::NetdError;
use crate::state::{EndpointRecord, SpiffeSource, State, cidr_labels, identity_labels, nid};
use crate::txn::CidrList;

mod kernel;
mod policies;

pub use crate::snapshot::{PolicyInfo, PolicySource, Snapshot};
pub use policies::{Committed, ParsedFiles, parse_import, read_policy_dir, yaml_files};

/// How long a released identity number is held back before reuse.
const IDENTITY_GRACE: Duration = Duration::from_secs(60);

/// What cluster mode gives [`Daemon::start_with`].
pub struct ClusterStart {
    /// The cluster allocator, bridged for the writer.
    pub ids: crate::identities::ClusterIds,
    /// Every cluster identity etcd holds now.
    pub identities: Vec<(NumericIdentity, Labels)>,
}

/// Input of [`Daemon::create_endpoint`].
#[derive(Debug, Clone, Default)]
pub struct CreateEndpoint {
    /// Name.
    pub name: String,
    /// Pod labels `[source:]key=value`.
    pub labels: Vec<String>,
    /// Kubernetes namespace (`default` when empty).
    pub namespace: String,
    /// SPIFFE ID (none when empty).
    pub spiffe_id: String,
    /// Service account (`default` when empty).
    pub service_account: String,
}

/// What the agent said about an endpoint's SVID (see [`Daemon::set_spiffe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeChange {
    /// The agent delivered an SVID with this SPIFFE ID and NotAfter (Unix seconds).
    Registered {
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// Its NotAfter.
        expires_at: i64,
        /// Whether it is the endpoint's derived ID (of an entry netd registered).
        derived: bool,
    },
    /// No SVID: classic labels until one comes.
    Fallback,
}

/// The daemon.
pub struct Daemon {
    config: Config,
    datapath: Datapath,
    engine: PolicyEngine,
    alloc: Arc<crate::identities::Identities>,
    /// Cluster mode: every cluster identity known from etcd (held here or not), so that the
    /// engine keeps an identity other nodes' endpoints carry after this node releases it.
    remote_ids: BTreeMap<u32, Labels>,
    /// Cluster mode: IPCache entries of other nodes' endpoints and of node addresses.
    remote_ips: BTreeMap<IpAddr, u32>,
    /// Cluster mode: the tunnel endpoint (hosting node) of remote entries that have one.
    remote_via: BTreeMap<IpAddr, Ipv4Addr>,
    /// Bumped by every change of the engine; a policy job compiled at another generation is
    /// compiled again.
    generation: u64,
    state: State,
    sources: BTreeMap<PolicyId, PolicySource>,
    dir_files: BTreeMap<String, String>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// Bumped after every publish, for watchers of the endpoint set (the SPIFFE identity
    /// subscriptions).
    changed: tokio::sync::watch::Sender<u64>,
    /// MTU of new endpoints' interfaces: the tunnel device's over the VXLAN carrier (room for
    /// the encapsulation), the kernel's default otherwise.
    endpoint_mtu: Option<u32>,
}

impl Daemon {
    /// Loads the datapath (adopting pinned maps), restores the state file, and reconciles
    /// the kernel with it: every endpoint's map replaced, stale entries removed.
    pub fn start(config: Config) -> Result<Self, NetdError> {
        Self::start_with(config, None)
    }

    /// [`Daemon::start`], in cluster mode with `cluster`: endpoint identities from etcd, and
    /// the cluster's identities known to the engine before any map is installed (so a restart
    /// removes no allow of a remote identity); IPCache entries outside this node's pod CIDRs
    /// are kept until the cluster view has synced ([`Daemon::prune_remote`]).
    pub fn start_with(config: Config, cluster: Option<ClusterStart>) -> Result<Self, NetdError> {
        if config.bpf_pin_dir.starts_with("/sys/fs/bpf") {
            sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        } else {
            sigil_datapath::ensure_bpffs(&config.bpf_pin_dir)?;
        }
        let mut datapath = Datapath::load_with(&config.bpf_pin_dir, config.policy_map_max_entries)?;
        // The VXLAN carrier first: remote entries with tunnel endpoints need its device.
        if let Some(c) = &config.cluster
            && c.tunnel == crate::config::Tunnel::Vxlan
        {
            let std::net::IpAddr::V4(local) = c.node_ip else {
                return Err(NetdError::invalid(
                    "node_ip",
                    c.node_ip,
                    "the VXLAN carrier needs an IPv4 underlay address",
                ));
            };
            use sigil_datapath::tunnel::{DEFAULT_UNDERLAY_MTU, TunnelConfig, VXLAN_OVERHEAD};
            let mut tunnel = TunnelConfig::new(local);
            // The device that holds the node's address carries the tunnel; its MTU less the
            // encapsulation is what endpoints get (as Cilium derives it), so a jumbo-frame
            // underlay gives endpoints jumbo frames.
            let underlay = sigil_datapath::tunnel::underlay_of(local)?;
            let underlay_mtu = match &underlay {
                Some((_, mtu)) => *mtu,
                None => {
                    tracing::warn!(
                        node_ip = %local,
                        assumed_mtu = DEFAULT_UNDERLAY_MTU,
                        "no interface holds the node's address: assuming the underlay's MTU, and the VXLAN device carries every packet"
                    );
                    DEFAULT_UNDERLAY_MTU
                }
            };
            let encrypted = matches!(c.encryption, crate::config::Encryption::Spiffe { .. });
            // What the carrier adds to an endpoint's packet: VXLAN, and with encryption the
            // sealed datagram around it.
            let overhead = VXLAN_OVERHEAD
                + if encrypted {
                    sigil_encryption::carrier::UNDERLAY_OVERHEAD
                } else {
                    0
                };
            // Endpoints need IPv6's minimum, 1280, after every header the carrier adds.
            if underlay_mtu < 1280 + overhead {
                let dev = underlay.as_ref().map_or("?", |(d, _)| d.as_str());
                return Err(NetdError::invalid(
                    "node_ip",
                    format!("{local} (on {dev}, MTU {underlay_mtu})"),
                    format!(
                        "the underlay device needs an MTU of at least {} for the VXLAN carrier{}",
                        1280 + overhead,
                        if encrypted { " with encryption" } else { "" }
                    ),
                ));
            }
            tunnel.mtu = underlay_mtu - overhead;
            if encrypted {
                // The sealed VXLAN packets reach the TUN device through the routing table, so
                // the VXLAN device sends them all; each must fit the TUN device whole.
                tunnel.mtu = tunnel.mtu.min(crate::encryption::TUN_MTU - VXLAN_OVERHEAD);
            } else if c.bpf_encap {
                // The programs encapsulate onto the underlay device themselves.
                tunnel.underlay = underlay.map(|(dev, _)| dev);
            }
            datapath.setup_tunnel(&tunnel)?;
        }
        let endpoint_mtu = datapath.tunnel_mtu()?;
        for cidr in [config.pod_cidr.to_string(), config.pod_cidr_v6.to_string()] {
            netns::blackhole_route(&cidr)?;
        }
        let state = State::load(&config.state_dir)?;
        let (alloc, remote_ids) = match cluster {
            Some(c) => (
                crate::identities::Identities::clustered(IDENTITY_GRACE, c.ids),
                c.identities
                    .into_iter()
                    .map(|(id, l)| (id.get(), l))
                    .collect(),
            ),
            None => (
                crate::identities::Identities::local(IDENTITY_GRACE),
                BTreeMap::new(),
            ),
        };
        let alloc = Arc::new(alloc);
        let mut items = Vec::new();
        for rec in state.endpoints.values() {
            // A pending endpoint holds the reserved init identity, not an allocated one.
            if !rec.is_pending() {
                items.push((rec.identity, rec.labels()?));
            }
            if let Some(held) = rec.classic_identity {
                items.push((
                    held,
                    identity_labels(&rec.pod_labels, &rec.namespace, None)?,
                ));
            }
        }
        for (prefix, id) in &state.cidr_identities {
            let p: IpPrefix = prefix
                .parse()
                .map_err(|e| NetdError::invalid("cidr_identities", prefix, e))?;
            items.push((*id, cidr_labels(&p)?));
        }
        alloc.restore(items)?;
        let mut engine = PolicyEngine::new(config.enforcement);
        engine.add_identities(reserved_identities());
        engine.add_identities(alloc.list());
        let held: BTreeSet<u32> = alloc.list().iter().map(|(id, _)| id.get()).collect();
        engine.add_identities(
            remote_ids
                .iter()
                .filter(|(id, _)| !held.contains(id))
                .map(|(id, l)| (NumericIdentity::new(*id), l.clone()))
                .collect::<Vec<_>>(),
        );
        let mut d = Self {
            config,
            datapath,
            engine,
            alloc,
            remote_ids,
            remote_ips: BTreeMap::new(),
            remote_via: BTreeMap::new(),
            generation: 0,
            state,
            sources: BTreeMap::new(),
            dir_files: BTreeMap::new(),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            changed: tokio::sync::watch::channel(0).0,
            endpoint_mtu,
        };
        d.convert_identity_mode()?;
        // Reconcile installs every map whole from the engine, so the deltas are not needed.
        let names: Vec<String> = d.state.endpoints.keys().cloned().collect();
        for name in names {
            d.hold_classic(&name, false)?;
        }
        let mut docs = Vec::new();
        for f in &d.state.imported {
            let keep: BTreeSet<&String> = f.policies.iter().collect();
            for doc in parse_documents(&f.yaml, &f.origin)? {
                if keep.contains(&doc.id.to_string()) {
                    d.sources.insert(doc.id.clone(), PolicySource::Api);
                    docs.push(doc);
                }
            }
        }
        d.engine.upsert_policies(docs);
        match d.read_policy_dir() {
            Ok(Some((docs, files))) => {
                for doc in &docs {
                    d.sources.insert(doc.id.clone(), PolicySource::Dir);
                }
                d.engine.upsert_policies(docs);
                d.dir_files = files.into_iter().collect();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "policy directory not loaded; it is retried when it changes");
            }
        }
        d.reconcile()?;
        Ok(d)
    }

    /// Endpoints recorded under the other identity mode take this one's sources: in classic
    /// mode every SPIFFE-derived identity goes back to its classic labels; in spiffe mode a
    /// classic endpoint becomes `classic-fallback` (same identity, asked from the agent).
    /// Runs before the kernel is reconciled, which installs every map whole.
    fn convert_identity_mode(&mut self) -> Result<(), NetdError> {
        let mode = self.config.identity_mode;
        let names: Vec<String> = self.state.endpoints.keys().cloned().collect();
        for name in names {
            let Some(mut rec) = self.state.endpoints.get(&name).cloned() else {
                continue;
            };
            match (mode, rec.spiffe_source) {
                (IdentityMode::Spiffe, SpiffeSource::Classic) => {
                    rec.spiffe_source = SpiffeSource::ClassicFallback;
                }
                (IdentityMode::Classic, src) if src.subscribed() => {
                    let labels = identity_labels(&rec.pod_labels, &rec.namespace, None)?;
                    let (id, fresh) = self.alloc.allocate(&labels)?;
                    if fresh {
                        self.engine_add(id, labels);
                    }
                    let old = nid(rec.identity);
                    if !old.is_reserved() && self.alloc.release(old)? {
                        self.engine_remove(old);
                    }
                    rec.identity = id.get();
                    rec.spiffe_id = None;
                    rec.svid_expires_at = None;
                    rec.spiffe_source = SpiffeSource::Classic;
                    tracing::info!(endpoint = %name, identity = id.get(), "identity mode classic: endpoint back to its classic labels");
                }
                _ => continue,
            }
            self.state.endpoints.insert(name, rec);
        }
        Ok(())
    }

    /// A receiver that sees a new value after every published change.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The snapshot the monitor reads.
    pub fn snapshot(&self) -> Arc<ArcSwap<Snapshot>> {
        Arc::clone(&self.snapshot)
    }

    /// The engine (for status and tests).
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// Events lost because the ring buffer was full.
    pub fn lost_events(&self) -> u64 {
        self.datapath.maps().counters.lost_events().unwrap_or(0)
    }

    fn reconcile(&mut self) -> Result<(), NetdError> {
        let (added, removed) = self.sync_cidrs()?;
        let names: Vec<String> = self.state.endpoints.keys().cloned().collect();
        for name in names {
            let Some(rec) = self.state.endpoints.get(&name).cloned() else {
                continue;
            };
            let rec = if netns::interface_exists(&rec.host_interface) && netns::netns_exists(&name)
            {
                rec
            } else {
                tracing::warn!(endpoint = %name, "endpoint network is gone; recreating it");
                netns::delete_endpoint(&name)?;
                let net = netns::create_endpoint(&EndpointSpec {
                    name: name.clone(),
                    mtu: self.endpoint_mtu,
                    ipv4: Some(rec.ipv4),
                    ipv6: Some(rec.ipv6),
                })?;
                let rec = EndpointRecord {
                    endpoint_id: net.endpoint_id,
                    host_interface: net.host_interface,
                    ..rec
                };
                self.state.endpoints.insert(name.clone(), rec.clone());
                rec
            };
            self.install_endpoint(&rec)?;
            self.datapath.attach(&rec.host_interface)?;
        }
        let wanted: BTreeSet<u32> = self
            .state
            .endpoints
            .values()
            .map(|r| r.endpoint_id)
            .collect();
        let maps = self.datapath.maps_mut();
        for ep in maps.policy.endpoints() {
            if !wanted.contains(&ep) {
                maps.policy.clear_endpoint(ep)?;
            }
        }
        for (ep, _) in maps.endpoints.list()? {
            if !wanted.contains(&ep) {
                maps.remove_endpoint_state(ep)?;
            }
        }
        let mut desired: BTreeMap<(IpAddr, u8), u32> = BTreeMap::new();
        for r in self.state.endpoints.values() {
            desired.insert((IpAddr::V4(r.ipv4), 32), r.identity);
            desired.insert((IpAddr::V6(r.ipv6), 128), r.identity);
        }
        for (prefix, id) in &self.state.cidr_identities {
            if let Ok(p) = prefix.parse::<IpPrefix>() {
                desired.insert((p.addr(), p.prefix_len()), *id);
            }
        }
        let own: Vec<IpPrefix> = [
            self.config.pod_cidr.prefix(),
            self.config.pod_cidr_v6.prefix(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let clustered = self.alloc.is_clustered();
        let maps = self.datapath.maps_mut();
        for e in maps.ipcache.entries()? {
            if desired.contains_key(&(e.addr, e.prefix_len)) {
                continue;
            }
            let host = e.prefix_len == if e.addr.is_ipv4() { 32 } else { 128 };
            if clustered && host && !own.iter().any(|p| prefix_has(p, e.addr)) {
                // Another node's endpoint or a node address: kept until the cluster view
                // has synced, so a restart leaves no gap for remote traffic.
                self.remote_ips.insert(e.addr, e.identity);
                continue;
            }
            maps.ipcache.remove(e.addr, e.prefix_len)?;
        }
        for ((addr, len), id) in &desired {
            maps.ipcache.upsert(*addr, *len, *id)?;
        }
        self.release_cidrs(added, removed)?;
        self.save()?;
        self.publish();
        Ok(())
    }

    // ---- endpoints ----

    /// Creates an endpoint: checks every input first, then identity, namespace and veth,
    /// its policy, the datapath, other endpoints' maps, and finally the IPCache.
    pub fn create_endpoint(&mut self, req: CreateEndpoint) -> Result<EndpointRecord, NetdError> {
        netns::validate_name(&req.name).map_err(|_| {
            NetdError::invalid(
                "name",
                &req.name,
                "must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.' or '-'",
            )
        })?;
        if self.state.endpoints.contains_key(&req.name) {
            return Err(NetdError::AlreadyExists {
                what: "endpoint",
                name: req.name,
            });
        }
        let namespace = if req.namespace.is_empty() {
            "default".to_owned()
        } else {
            req.namespace.clone()
        };
        validate_namespace(&namespace)?;
        let spiffe_id = if req.spiffe_id.is_empty() {
            None
        } else {
            validate_spiffe_id(&req.spiffe_id)?;
            Some(req.spiffe_id.clone())
        };
        let service_account = if req.service_account.is_empty() {
            "default".to_owned()
        } else {
            req.service_account.clone()
        };
        validate_service_account(&service_account)?;
        let spiffe_source = match (&spiffe_id, self.config.identity_mode) {
            (Some(_), _) => SpiffeSource::Override,
            (None, IdentityMode::Spiffe) => SpiffeSource::Pending,
            (None, IdentityMode::Classic) => SpiffeSource::Classic,
        };
        let labels = identity_labels(&req.labels, &namespace, spiffe_id.as_deref())?;
        if netns::netns_exists(&req.name) {
            return Err(NetdError::AlreadyExists {
                what: "network namespace of endpoint",
                name: req.name,
            });
        }
        let index = self.free_host_index()?;
        let (ipv4, ipv6) = match (
            self.config.pod_cidr.host(index),
            self.config.pod_cidr_v6.host(index),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(NetdError::AddressesExhausted {
                    cidr: self.config.pod_cidr.to_string(),
                });
            }
        };
        let mut rec = EndpointRecord {
            name: req.name.clone(),
            namespace,
            pod_labels: req.labels.clone(),
            spiffe_id,
            spiffe_source,
            svid_expires_at: None,
            classic_identity: None,
            service_account,
            uid: crate::state::new_uid(),
            identity: 0,
            cluster_pending: false,
            ipv4,
            ipv6,
            host_index: index,
            endpoint_id: 0,
            host_interface: String::new(),
            netns_name: String::new(),
            netns_path: Default::default(),
            interface: String::new(),
        };
        // Every selector must form before anything is created.
        rec.selectors(&self.config.node_name)?;
        // A pending endpoint takes the reserved init identity and a drop-all policy
        // (`install_endpoint`) until the agent answers: no rule on a SPIFFE ID selects it, and
        // nothing it sends or receives passes its own veth.
        let (id, fresh) = if rec.is_pending() {
            (sigil_identity::NumericIdentity::INIT, false)
        } else {
            match self.alloc.allocate(&labels) {
                Ok(v) => v,
                Err(e @ IdentityError::Unavailable { .. }) => {
                    // etcd cannot be asked: the endpoint waits at init, dropping everything,
                    // and takes its identity when etcd answers (`retry_pending`).
                    tracing::warn!(endpoint = %req.name, error = %e, "endpoint waits at init for its cluster identity");
                    rec.cluster_pending = true;
                    (sigil_identity::NumericIdentity::INIT, false)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let deltas = if fresh {
            self.engine_add(id, labels)
        } else {
            PolicyDeltas::default()
        };
        let undo_identity = |d: &mut Self| {
            if !id.is_reserved() && d.alloc.release(id).unwrap_or(false) {
                d.engine_remove(id);
            }
        };
        let net = match netns::create_endpoint(&EndpointSpec {
            name: req.name.clone(),
            mtu: self.endpoint_mtu,
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
        }) {
            Ok(n) => n,
            Err(e) => {
                undo_identity(self);
                return Err(e.into());
            }
        };
        rec.identity = id.get();
        rec.endpoint_id = net.endpoint_id;
        rec.host_interface = net.host_interface.clone();
        rec.netns_name = net.netns.clone();
        rec.netns_path = net.netns_path.clone();
        rec.interface = net.interface.clone();
        let rec = rec;
        let plumbed = self
            .install_endpoint(&rec)
            .and_then(|()| Ok(self.datapath.attach(&rec.host_interface)?));
        if let Err(e) = plumbed {
            let _ = self
                .datapath
                .maps_mut()
                .remove_endpoint_state(rec.endpoint_id);
            let _ = netns::delete_endpoint(&rec.name);
            undo_identity(self);
            return Err(e);
        }
        self.state.endpoints.insert(rec.name.clone(), rec.clone());
        self.apply_deltas(std::slice::from_ref(&deltas), Some(rec.identity))?;
        let ipc = &mut self.datapath.maps_mut().ipcache;
        ipc.upsert(IpAddr::V4(ipv4), 32, rec.identity)?;
        ipc.upsert(IpAddr::V6(ipv6), 128, rec.identity)?;
        self.save()?;
        self.publish();
        tracing::info!(endpoint = %rec.name, identity = rec.identity, ipv4 = %ipv4, spiffe_id_source = rec.spiffe_source.as_str(), "endpoint created");
        self.hold_classic(&rec.name, true)?;
        self.get_endpoint(&rec.name)
    }

    /// Every endpoint.
    pub fn list_endpoints(&self) -> Vec<EndpointRecord> {
        self.state.endpoints.values().cloned().collect()
    }

    /// One endpoint.
    pub fn get_endpoint(&self, name: &str) -> Result<EndpointRecord, NetdError> {
        self.state
            .endpoints
            .get(name)
            .cloned()
            .ok_or_else(|| NetdError::NotFound {
                what: "endpoint",
                name: name.to_owned(),
            })
    }

    /// Deletes an endpoint: IPCache first, then the maps, then the network.
    pub fn delete_endpoint(&mut self, name: &str) -> Result<(), NetdError> {
        let rec = self.get_endpoint(name)?;
        let ipc = &mut self.datapath.maps_mut().ipcache;
        ipc.remove(IpAddr::V4(rec.ipv4), 32)?;
        ipc.remove(IpAddr::V6(rec.ipv6), 128)?;
        self.state.endpoints.remove(name);
        let id = nid(rec.identity);
        let deltas = if !id.is_reserved() && self.alloc.release(id)? {
            self.engine_remove(id)
        } else {
            PolicyDeltas::default()
        };
        self.datapath
            .maps_mut()
            .remove_endpoint_state(rec.endpoint_id)?;
        self.apply_deltas(std::slice::from_ref(&deltas), None)?;
        if let Some(held) = rec.classic_identity {
            self.release_held(nid(held))?;
        }
        netns::delete_endpoint(name)?;
        self.save()?;
        self.publish();
        tracing::info!(endpoint = %name, "endpoint deleted");
        Ok(())
    }

    /// Changes an endpoint's labels: the new identity is allocated and known to every map
    /// before the IPCache moves the endpoint's addresses to it; the old one is released last.
    pub fn set_labels(
        &mut self,
        name: &str,
        set: &[String],
        remove: &[String],
    ) -> Result<EndpointRecord, NetdError> {
        let mut rec = self.get_endpoint(name)?;
        let mut pod: BTreeMap<String, String> = BTreeMap::new();
        for text in &rec.pod_labels {
            pod.insert(label_key(text), text.clone());
        }
        for text in set {
            let key = label_key(text);
            if key.is_empty() {
                return Err(NetdError::invalid("set", text, "want key=value"));
            }
            pod.insert(key, text.clone());
        }
        for key in remove {
            if pod.remove(key.as_str()).is_none() {
                return Err(NetdError::invalid(
                    "remove",
                    key,
                    format!("endpoint {name} has no label with this key"),
                ));
            }
        }
        let pod_labels: Vec<String> = pod.into_values().collect();
        let labels = identity_labels(&pod_labels, &rec.namespace, rec.spiffe_id.as_deref())?;
        rec.pod_labels = pod_labels;
        // Every selector must still form (the agent is asked with them).
        rec.selectors(&self.config.node_name)?;
        if rec.is_pending() {
            // Its identity stays init until the agent answers for the new selectors.
            self.state.endpoints.insert(name.to_owned(), rec.clone());
            self.save()?;
            self.publish();
        } else {
            self.move_identity(rec, labels)?;
        }
        self.hold_classic(name, true)?;
        self.get_endpoint(name)
    }

    /// In `--spiffe-id-mode opaque`, keeps a reference on the identity of endpoint `name`'s
    /// labels without its SPIFFE label (recorded as `classic_identity`), moving it when its
    /// labels change; in other modes drops any. With `apply`, a fresh or released identity's
    /// policy changes go to the kernel (at start the whole reconcile installs them).
    fn hold_classic(&mut self, name: &str, apply: bool) -> Result<(), NetdError> {
        let Some(mut rec) = self.state.endpoints.get(name).cloned() else {
            return Ok(());
        };
        let want = match self.config.spiffe_ids.mode {
            crate::spiffe_id::SpiffeIdMode::Opaque => {
                Some(identity_labels(&rec.pod_labels, &rec.namespace, None)?)
            }
            _ => None,
        };
        let have = rec.classic_identity.map(nid);
        let unchanged = match (&want, have) {
            (Some(l), Some(h)) => self.alloc.lookup(h).as_ref() == Some(l),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return Ok(());
        }
        rec.classic_identity = match want {
            Some(labels) => {
                let (id, fresh) = self.alloc.allocate(&labels)?;
                let deltas = if fresh {
                    self.engine_add(id, labels)
                } else {
                    PolicyDeltas::default()
                };
                if apply {
                    self.apply_deltas(std::slice::from_ref(&deltas), None)?;
                }
                Some(id.get())
            }
            None => None,
        };
        self.state.endpoints.insert(name.to_owned(), rec);
        if let Some(old) = have {
            if apply {
                self.release_held(old)?;
            } else if self.alloc.release(old)? {
                self.engine_remove(old);
            }
        }
        if apply {
            self.save()?;
            self.publish();
        }
        Ok(())
    }

    /// Drops a reference taken by [`Daemon::hold_classic`].
    fn release_held(&mut self, id: sigil_identity::NumericIdentity) -> Result<(), NetdError> {
        let gone = if self.alloc.release(id)? {
            self.engine_remove(id)
        } else {
            PolicyDeltas::default()
        };
        self.apply_deltas(std::slice::from_ref(&gone), None)?;
        Ok(())
    }

    /// Records what the agent said about endpoint `name` (the one with `uid`; a stale answer
    /// for a deleted and recreated endpoint is ignored) and moves the endpoint to the identity
    /// of its new labels in the same order as [`Daemon::set_labels`]: the new identity known to
    /// every map before the IPCache moves, the old one released last. Established connections
    /// follow: the datapath checks the opening direction of every connection on every packet
    /// against the current identities. Endpoints with an override or in classic mode are left
    /// alone.
    pub fn set_spiffe(
        &mut self,
        name: &str,
        uid: &str,
        change: SpiffeChange,
    ) -> Result<Option<EndpointRecord>, NetdError> {
        let Some(mut rec) = self.state.endpoints.get(name).cloned() else {
            return Ok(None);
        };
        if rec.uid != uid || !rec.spiffe_source.subscribed() {
            return Ok(None);
        }
        let (spiffe_id, source, expires) = match change {
            SpiffeChange::Registered {
                spiffe_id,
                expires_at,
                derived,
            } => {
                validate_spiffe_id(&spiffe_id)?;
                let source = if derived {
                    SpiffeSource::Derived
                } else {
                    SpiffeSource::Registered
                };
                (Some(spiffe_id), source, Some(expires_at))
            }
            SpiffeChange::Fallback => (None, SpiffeSource::ClassicFallback, None),
        };
        if rec.spiffe_id == spiffe_id && rec.spiffe_source == source {
            if rec.svid_expires_at != expires {
                rec.svid_expires_at = expires;
                self.state.endpoints.insert(name.to_owned(), rec.clone());
                self.save()?;
                self.publish();
            }
            return Ok(Some(rec));
        }
        let was = rec.spiffe_source;
        let labels = identity_labels(&rec.pod_labels, &rec.namespace, spiffe_id.as_deref())?;
        rec.spiffe_id = spiffe_id;
        rec.spiffe_source = source;
        rec.svid_expires_at = expires;
        let rec = self.move_identity(rec, labels)?;
        match source {
            SpiffeSource::ClassicFallback => tracing::warn!(
                endpoint = %name, was = was.as_str(), identity = rec.identity,
                "endpoint falls back to its classic labels: no SVID from the agent"
            ),
            _ => tracing::info!(
                endpoint = %name, was = was.as_str(), identity = rec.identity,
                spiffe_id = rec.spiffe_id.as_deref().unwrap_or(""),
                "endpoint identity from its SVID"
            ),
        }
        Ok(Some(rec))
    }

    /// Moves endpoint `rec` (its new fields set, its `identity` still the old one) to the
    /// identity of `labels`.
    fn move_identity(
        &mut self,
        mut rec: EndpointRecord,
        labels: Labels,
    ) -> Result<EndpointRecord, NetdError> {
        let name = rec.name.clone();
        let old = nid(rec.identity);
        if !old.is_reserved() && self.alloc.lookup_by_labels(&labels) == Some(old) {
            self.state.endpoints.insert(name, rec.clone());
            self.save()?;
            self.publish();
            return Ok(rec);
        }
        let (new, fresh) = self.alloc.allocate(&labels)?;
        let deltas = if fresh {
            self.engine_add(new, labels)
        } else {
            PolicyDeltas::default()
        };
        rec.identity = new.get();
        rec.cluster_pending = false;
        self.install_endpoint(&rec)?;
        self.state.endpoints.insert(name.to_owned(), rec.clone());
        self.apply_deltas(std::slice::from_ref(&deltas), Some(rec.identity))?;
        let ipc = &mut self.datapath.maps_mut().ipcache;
        ipc.upsert(IpAddr::V4(rec.ipv4), 32, rec.identity)?;
        ipc.upsert(IpAddr::V6(rec.ipv6), 128, rec.identity)?;
        let gone = if !old.is_reserved() && self.alloc.release(old)? {
            self.engine_remove(old)
        } else {
            PolicyDeltas::default()
        };
        self.apply_deltas(std::slice::from_ref(&gone), None)?;
        self.save()?;
        self.publish();
        tracing::info!(endpoint = %name, old = old.get(), new = new.get(), "endpoint identity changed");
        Ok(rec)
    }

    /// Adds a freshly allocated identity to the engine, unless the cluster view put it there.
    fn engine_add(&mut self, id: NumericIdentity, labels: Labels) -> PolicyDeltas {
        if self.remote_ids.contains_key(&id.get()) {
            return PolicyDeltas::default();
        }
        self.engine.add_identity(id, labels)
    }

    /// Removes an identity this node released from the engine, unless the cluster still has it.
    fn engine_remove(&mut self, id: NumericIdentity) -> PolicyDeltas {
        if self.remote_ids.contains_key(&id.get()) {
            return PolicyDeltas::default();
        }
        self.engine.remove_identity(id)
    }

    // ---- cluster ----

    /// A cluster identity appeared (`Some`: its labels) or was collected (`None`): the engine
    /// learns or forgets it, and every map follows.
    pub fn set_remote_identity(
        &mut self,
        id: NumericIdentity,
        labels: Option<Labels>,
    ) -> Result<(), NetdError> {
        let held = self.alloc.lookup(id);
        let deltas = match labels {
            Some(labels) => {
                if self.remote_ids.get(&id.get()) == Some(&labels) {
                    return Ok(());
                }
                let mut deltas = Vec::new();
                if held.is_none() {
                    if self.remote_ids.contains_key(&id.get()) {
                        deltas.push(self.engine.remove_identity(id));
                    }
                    deltas.push(self.engine.add_identity(id, labels.clone()));
                }
                self.remote_ids.insert(id.get(), labels);
                deltas
            }
            None => {
                if self.remote_ids.remove(&id.get()).is_none() || held.is_some() {
                    return Ok(());
                }
                vec![self.engine.remove_identity(id)]
            }
        };
        self.apply_deltas(&deltas, None)?;
        self.publish();
        Ok(())
    }

    /// Installs (`Some(identity)`) or removes another node's endpoint address or a node
    /// address in the kernel IPCache. Addresses of this node's pod CIDRs are refused: only
    /// this node says what its endpoints are.
    pub fn set_remote_ip(
        &mut self,
        ip: IpAddr,
        identity: Option<u32>,
        tunnel: Option<Ipv4Addr>,
    ) -> Result<(), NetdError> {
        self.write_remote_ip(ip, identity, tunnel)?;
        self.publish();
        Ok(())
    }

    /// [`Daemon::set_remote_ip`] for a batch, published once (a burst of remote entries must
    /// not copy the snapshot once per entry); returns how many failed (each logged).
    pub fn set_remote_ips(
        &mut self,
        batch: Vec<(IpAddr, Option<u32>, Option<Ipv4Addr>)>,
    ) -> Result<usize, NetdError> {
        let mut failed = 0;
        for (ip, identity, tunnel) in batch {
            if let Err(e) = self.write_remote_ip(ip, identity, tunnel) {
                tracing::warn!(ip = %ip, error = %e, "a remote IPCache change failed");
                failed += 1;
            }
        }
        self.publish();
        Ok(failed)
    }

    fn write_remote_ip(
        &mut self,
        ip: IpAddr,
        identity: Option<u32>,
        tunnel: Option<Ipv4Addr>,
    ) -> Result<(), NetdError> {
        let own = [
            self.config.pod_cidr.prefix(),
            self.config.pod_cidr_v6.prefix(),
        ];
        if own.iter().flatten().any(|p| prefix_has(p, ip)) {
            return Err(NetdError::invalid(
                "ip",
                ip,
                "lies in this node's pod CIDR; only this node publishes its endpoints",
            ));
        }
        let len = if ip.is_ipv4() { 32 } else { 128 };
        let ipc = &mut self.datapath.maps_mut().ipcache;
        match identity {
            Some(id) => {
                if self.remote_ips.get(&ip) == Some(&id) && tunnel.is_none() {
                    return Ok(());
                }
                match tunnel {
                    Some(via) => self.remote_via.insert(ip, via),
                    None => self.remote_via.remove(&ip),
                };
                match (tunnel, ip) {
                    // A node's underlay address: remote-node, and a cluster node for the
                    // carrier's sender check.
                    (Some(_), IpAddr::V4(node)) if id == NumericIdentity::REMOTE_NODE.get() => {
                        ipc.upsert_node(node)?
                    }
                    (Some(via), _) => ipc.upsert_tunneled(ip, len, id, via)?,
                    (None, _) => ipc.upsert(ip, len, id)?,
                }
                self.remote_ips.insert(ip, id);
            }
            None => {
                if self.remote_ips.remove(&ip).is_some() {
                    ipc.remove(ip, len)?;
                }
                self.remote_via.remove(&ip);
            }
        }
        Ok(())
    }

    /// After the cluster view synced: removes remote IPCache entries not in `keep` (left from
    /// before a restart, or of nodes gone meanwhile).
    pub fn prune_remote(&mut self, keep: &BTreeSet<IpAddr>) -> Result<usize, NetdError> {
        let stale: Vec<IpAddr> = self
            .remote_ips
            .keys()
            .filter(|ip| !keep.contains(ip))
            .copied()
            .collect();
        for ip in &stale {
            self.set_remote_ip(*ip, None, None)?;
        }
        Ok(stale.len())
    }

    /// Endpoints waiting at init for their cluster identity try again; returns how many are
    /// still waiting.
    pub fn retry_pending(&mut self) -> Result<usize, NetdError> {
        let waiting: Vec<EndpointRecord> = self
            .state
            .endpoints
            .values()
            .filter(|r| r.cluster_pending && r.spiffe_source != SpiffeSource::Pending)
            .cloned()
            .collect();
        let mut left = 0;
        for rec in waiting {
            let labels = rec.labels()?;
            let name = rec.name.clone();
            match self.move_identity(rec, labels) {
                Ok(r) => {
                    tracing::info!(endpoint = %name, identity = r.identity, "endpoint took its cluster identity");
                }
                Err(NetdError::Identity(IdentityError::Unavailable { .. })) => left += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(left)
    }

    fn free_host_index(&self) -> Result<u32, NetdError> {
        let used: BTreeSet<u32> = self
            .state
            .endpoints
            .values()
            .map(|r| r.host_index)
            .collect();
        // .0 is the network, .1 is left for a gateway.
        (2u32..)
            .take_while(|i| self.config.pod_cidr.host(*i).is_some())
            .find(|i| !used.contains(i))
            .ok_or_else(|| NetdError::AddressesExhausted {
                cidr: self.config.pod_cidr.to_string(),
            })
    }

    // ---- policies ----

    /// The datapath (for tests that compare the kernel before and after).
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Marks the engine as changed: policy jobs compiled before are compiled again.
    pub(crate) fn bump_generation(&mut self) {
        self.generation += 1;
    }

    /// Allocates identities for the CIDR prefixes policies name (on start, before every map is
    /// installed whole); see [`crate::txn::sync_cidrs`].
    fn sync_cidrs(&mut self) -> Result<(CidrList, CidrList), NetdError> {
        let mut deltas = Vec::new();
        crate::txn::sync_cidrs(
            &mut self.engine,
            &self.alloc,
            &mut self.state.cidr_identities,
            &mut deltas,
        )
    }

    /// IPCache entries of added prefixes (their identities are in the maps by now), and the
    /// allocator references of removed ones.
    fn release_cidrs(&mut self, added: CidrList, removed: CidrList) -> Result<(), NetdError> {
        let ipc = &mut self.datapath.maps_mut().ipcache;
        for (p, id) in &added {
            ipc.upsert(p.addr(), p.prefix_len(), *id)?;
        }
        for (p, id) in removed {
            ipc.remove(p.addr(), p.prefix_len())?;
            self.alloc.release(nid(id))?;
        }
        Ok(())
    }

    // ---- kernel ----

    fn save(&self) -> Result<(), NetdError> {
        self.state.save(&self.config.state_dir)
    }

    pub(super) fn publish(&mut self) {
        self.generation += 1;
        let mut snap = Snapshot::default();
        for (id, labels) in reserved_identities().into_iter().chain(self.alloc.list()) {
            snap.identities.insert(id.get(), label_strings(&labels));
        }
        for r in self.state.endpoints.values() {
            snap.addresses.insert(IpAddr::V4(r.ipv4), r.name.clone());
            snap.addresses.insert(IpAddr::V6(r.ipv6), r.name.clone());
            snap.endpoint_ids.insert(r.endpoint_id, r.name.clone());
        }
        for (cookie, policy, path) in self.engine.rule_cookies() {
            snap.rules.insert(cookie, format!("{policy}: {path}"));
            snap.rule_refs.insert(
                cookie,
                crate::snapshot::RuleRef {
                    policy: policy.clone(),
                    path: path.to_owned(),
                },
            );
        }
        snap.revision = self.generation;
        for r in self.state.endpoints.values() {
            let labels = snap
                .identities
                .get(&r.identity)
                .cloned()
                .unwrap_or_default();
            snap.endpoints.insert(r.name.clone(), (r.clone(), labels));
        }
        snap.identity_count = self.alloc.len();
        let policy = &self.datapath.maps().policy;
        snap.map_fill = vec![(
            sigil_datapath::MAP_POLICY,
            policy.len() as u64,
            u64::from(policy.max_entries()),
        )];
        for (id, labels) in &self.remote_ids {
            snap.identities
                .entry(*id)
                .or_insert_with(|| label_strings(labels));
        }
        snap.remote_ips = self.remote_ips.clone();
        snap.remote_via = self.remote_via.clone();
        snap.auth_rules = self.auth_rules();
        snap.cluster_ids = self.remote_ids.keys().copied().collect();
        snap.cidr_identities = self
            .state
            .cidr_identities
            .iter()
            .filter_map(|(p, id)| Some((p.parse().ok()?, *id)))
            .collect();
        let mut api_yaml: HashMap<&str, Arc<str>> = HashMap::new();
        for f in &self.state.imported {
            let text: Arc<str> = Arc::from(f.yaml.as_str());
            for p in &f.policies {
                api_yaml.insert(p.as_str(), Arc::clone(&text));
            }
        }
        let dir_yaml: HashMap<&str, Arc<str>> = self
            .dir_files
            .iter()
            .map(|(o, y)| (o.as_str(), Arc::from(y.as_str())))
            .collect();
        for d in self.engine.documents() {
            let source = self
                .sources
                .get(&d.id)
                .copied()
                .unwrap_or(PolicySource::Api);
            let id = d.id.to_string();
            let yaml = match source {
                PolicySource::Dir => dir_yaml.get(d.origin.as_str()),
                PolicySource::Api => api_yaml.get(id.as_str()),
            };
            snap.policies.push(PolicyInfo {
                id: d.id.clone(),
                source,
                origin: d.origin.clone(),
                rules: d.rules.len(),
                yaml: yaml.cloned().unwrap_or_else(|| Arc::from("")),
            });
        }
        self.snapshot.store(Arc::new(snap));
        self.changed.send_replace(self.generation);
    }

    /// (endpoint identity, peer identity) of the allow entries that require authentication:
    /// of this node's endpoints, and of the identities other nodes host (whose peers here must
    /// authenticate with them ahead of time, `auth::reverse`); empty at once when no policy
    /// asks for it (the common case costs nothing).
    fn auth_rules(&self) -> BTreeSet<(u32, u32)> {
        let mut out = BTreeSet::new();
        let any_auth = self.engine.documents().any(|d| {
            d.rules
                .iter()
                .any(|r| r.entries.iter().any(|e| e.auth_required))
        });
        if !any_auth {
            return out;
        }
        let mut locals: BTreeSet<u32> = self
            .state
            .endpoints
            .values()
            .filter(|r| !r.is_pending())
            .map(|r| r.identity)
            .collect();
        locals.extend(self.remote_ips.values().copied());
        for local in locals {
            for (k, v) in self.engine.policy_map(nid(local)).unwrap_or_default() {
                if v.auth_required && !v.deny {
                    out.insert((local, k.identity));
                }
            }
        }
        out
    }

    /// Labels of an identity, `source:key=value`, sorted.
    pub fn identity_labels(&self, id: u32) -> Vec<String> {
        self.alloc
            .lookup(nid(id))
            .map(|l| label_strings(&l))
            .unwrap_or_default()
    }

    /// Number of allocated identities (endpoints and CIDRs).
    pub fn identity_count(&self) -> usize {
        self.alloc.len()
    }
}

/// Whether address `ip` lies in prefix `p`.
pub(crate) fn prefix_has(p: &IpPrefix, ip: IpAddr) -> bool {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    IpPrefix::new(ip, len).is_some_and(|h| p.contains(&h))
}

/// Sorted `source:key=value` strings.
pub fn label_strings(labels: &Labels) -> Vec<String> {
    let mut v: Vec<String> = labels.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// The key of `[source:]key=value` (empty when there is none).
fn label_key(text: &str) -> String {
    let rest = match text.split_once(':') {
        Some((src, rest)) if !src.contains('=') && matches!(src, "k8s" | "spiffe" | "unspec") => {
            rest
        }
        _ => text,
    };
    rest.split('=').next().unwrap_or("").to_owned()
}

fn validate_namespace(ns: &str) -> Result<(), NetdError> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(NetdError::invalid(
            "namespace",
            ns,
            "must be a DNS label: 1-63 of [a-z0-9-], not starting or ending with '-'",
        ))
    }
}

/// A Kubernetes service account name: a DNS subdomain (1-253 of `[a-z0-9-.]`, starting and
/// ending alphanumeric).
fn validate_service_account(sa: &str) -> Result<(), NetdError> {
    let ok = !sa.is_empty()
        && sa.len() <= 253
        && sa
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && sa.starts_with(|c: char| c.is_ascii_alphanumeric())
        && sa.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(NetdError::invalid(
            "service_account",
            sa,
            "must be a DNS subdomain: 1-253 of [a-z0-9-.], starting and ending with a letter or digit",
        ))
    }
}

fn validate_spiffe_id(id: &str) -> Result<(), NetdError> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| NetdError::invalid("spiffe_id", id, "must start with spiffe://"))?;
    let td = rest.split('/').next().unwrap_or("");
    if td.is_empty()
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | ';' | '?' | '#'))
    {
        return Err(NetdError::invalid(
            "spiffe_id",
            id,
            "must be spiffe://<trust domain>/<path> without spaces, ',', ';', '?' or '#'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_ignore_sources() {
        assert_eq!(label_key("app=web"), "app");
        assert_eq!(label_key("k8s:app=web"), "app");
        assert_eq!(
            label_key("spiffe:spiffe.io/spiffe-id=spiffe://x/y"),
            "spiffe.io/spiffe-id"
        );
        assert_eq!(label_key("app"), "app");
    }

    #[test]
    fn inputs_are_checked_with_the_field_named() {
        let e = validate_namespace("Bad_NS").expect_err("ns");
        assert!(
            e.to_string()
                .starts_with("namespace: invalid value \"Bad_NS\""),
            "{e}"
        );
        let e = validate_spiffe_id("http://x").expect_err("scheme");
        assert!(e.to_string().contains("spiffe_id"), "{e}");
        validate_spiffe_id("spiffe://example.org/ns/default/sa/web").expect("valid id");
    }
}
