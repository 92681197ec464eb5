//! The daemon's state machine: endpoints, identities, policies, and the order in which their
//! changes reach the kernel so that no update opens a window where traffic that the policy
//! denies passes. Only the reconciler ([`crate::reconcile`]) holds it.
//!
//! Orderings: an endpoint's own policy is in the map before its datapath is attached; other
//! endpoints' maps learn a new identity before the IPCache hands it out; an address leaves the
//! IPCache before the maps forget its identity. A change reaches the maps as the engine's key
//! changes, planned over every affected endpoint at once and written (1) new or changed
//! denies, (2) new or changed allows, (3) stale allows removed, (4) stale denies removed, with
//! enforcement flags tightened before and relaxed after; a failed write undoes the earlier
//! ones in reverse, through the same fail-closed states. Policy changes are transactions
//! ([`crate::txn`]): the engine and the state change only after the kernel took every write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sigil_datapath::netns::{self, EndpointSpec};
use sigil_datapath::{Datapath, EndpointConfig, PolicyPlan};
use sigil_identity::{Allocator, LocalAllocator, reserved_identities};
use sigil_labels::Labels;
use sigil_policy::{
    Direction, Document, IpPrefix, PolicyDeltas, PolicyEngine, PolicyEntry, PolicyError, PolicyId,
    PolicyKey, parse_documents,
};

use crate::config::Config;
use crate::convert::{enforcement, to_datapath};
use crate::error::NetdError;
use crate::state::{EndpointRecord, ImportedFile, State, cidr_labels, identity_labels, nid};
use crate::txn::{CidrList, Compiled, PolicyJob, PolicyOp};

/// How long a released identity number is held back before reuse.
const IDENTITY_GRACE: Duration = Duration::from_secs(60);

/// The daemon's state as readers see it, published after every change: the monitor names
/// things with it and the API's read-only calls (status, endpoint and policy list/get) answer
/// from it without waiting for the writer.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Endpoints by name, with their identity's labels.
    pub endpoints: BTreeMap<String, (EndpointRecord, Vec<String>)>,
    /// Installed policies, with the YAML of their files.
    pub policies: Vec<PolicyInfo>,
    /// Number of allocated identities (endpoints and CIDRs).
    pub identity_count: usize,
    /// Identity → labels.
    pub identities: HashMap<u32, Vec<String>>,
    /// Address → endpoint name.
    pub addresses: HashMap<IpAddr, String>,
    /// Datapath endpoint id → endpoint name.
    pub endpoint_ids: HashMap<u32, String>,
    /// Rule cookie → `Kind/namespace/name: rule path`.
    pub rules: HashMap<u32, String>,
}

impl Snapshot {
    /// Every installed policy (without YAML).
    pub fn list_policies(&self) -> Vec<PolicyInfo> {
        self.policies
            .iter()
            .map(|p| PolicyInfo {
                yaml: Arc::from(""),
                ..p.clone()
            })
            .collect()
    }

    /// One policy by `name`, `namespace/name` or `Kind/namespace/name`, with its file's YAML.
    pub fn get_policy(&self, name: &str) -> Result<PolicyInfo, NetdError> {
        let id = resolve_policy(self.policies.iter().map(|p| &p.id), name)?;
        self.policies
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| NetdError::NotFound {
                what: "policy",
                name: name.to_owned(),
            })
    }

    /// The id of a policy given by `name`, `namespace/name` or `Kind/namespace/name`.
    pub fn resolve_policy(&self, name: &str) -> Result<PolicyId, NetdError> {
        resolve_policy(self.policies.iter().map(|p| &p.id), name)
    }

    /// One endpoint and its identity's labels.
    pub fn get_endpoint(&self, name: &str) -> Result<&(EndpointRecord, Vec<String>), NetdError> {
        self.endpoints.get(name).ok_or_else(|| NetdError::NotFound {
            what: "endpoint",
            name: name.to_owned(),
        })
    }
}

/// The one policy among `ids` that `name` names.
fn resolve_policy<'a>(
    ids: impl Iterator<Item = &'a PolicyId>,
    name: &str,
) -> Result<PolicyId, NetdError> {
    let hits: Vec<PolicyId> = ids
        .filter(|id| {
            let full = id.to_string();
            let short = match &id.namespace {
                Some(ns) => format!("{ns}/{}", id.name),
                None => id.name.clone(),
            };
            full == name || short == name || id.name == name
        })
        .cloned()
        .collect();
    match hits.as_slice() {
        [] => Err(NetdError::NotFound {
            what: "policy",
            name: name.to_owned(),
        }),
        [one] => Ok(one.clone()),
        many => Err(NetdError::invalid(
            "name",
            name,
            format!(
                "matches {}; give Kind/namespace/name",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
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
}

/// What [`Daemon::try_commit_policy`] did.
pub enum Committed {
    /// Applied: the ids of the policies changed and the number of endpoints updated.
    Done(Vec<String>, usize),
    /// Not applied; compile this job again.
    Stale(Box<PolicyJob>),
}

/// Where an installed policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// Imported through the API.
    Api,
    /// The watched directory.
    Dir,
}

impl PolicySource {
    /// `api` or `dir`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Dir => "dir",
        }
    }
}

/// An installed policy, as listed.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    /// Its id.
    pub id: PolicyId,
    /// Where it came from.
    pub source: PolicySource,
    /// File name.
    pub origin: String,
    /// Number of rules.
    pub rules: usize,
    /// YAML text of its file (shared by the file's policies).
    pub yaml: Arc<str>,
}

/// The daemon.
pub struct Daemon {
    config: Config,
    datapath: Datapath,
    engine: PolicyEngine,
    alloc: Arc<LocalAllocator>,
    /// Bumped by every change of the engine; a policy job compiled at another generation is
    /// compiled again.
    generation: u64,
    state: State,
    sources: BTreeMap<PolicyId, PolicySource>,
    dir_files: BTreeMap<String, String>,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl Daemon {
    /// Loads the datapath (adopting pinned maps), restores the state file, and reconciles
    /// the kernel with it: every endpoint's map replaced, stale entries removed.
    pub fn start(config: Config) -> Result<Self, NetdError> {
        if config.bpf_pin_dir.starts_with("/sys/fs/bpf") {
            sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        }
        let datapath = Datapath::load_with(&config.bpf_pin_dir, config.policy_map_max_entries)?;
        for cidr in [config.pod_cidr.to_string(), config.pod_cidr_v6.to_string()] {
            netns::blackhole_route(&cidr)?;
        }
        let state = State::load(&config.state_dir)?;
        let alloc = Arc::new(LocalAllocator::new(0, IDENTITY_GRACE));
        let mut items = Vec::new();
        for rec in state.endpoints.values() {
            items.push((rec.identity, rec.labels()?));
        }
        for (prefix, id) in &state.cidr_identities {
            let p: IpPrefix = prefix
                .parse()
                .map_err(|e| NetdError::invalid("cidr_identities", prefix, e))?;
            items.push((*id, cidr_labels(&p)?));
        }
        crate::state::restore_identities(&alloc, items)?;
        let mut engine = PolicyEngine::new(config.enforcement);
        engine.add_identities(reserved_identities());
        engine.add_identities(alloc.list());
        let mut d = Self {
            config,
            datapath,
            engine,
            alloc,
            generation: 0,
            state,
            sources: BTreeMap::new(),
            dir_files: BTreeMap::new(),
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        };
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
        let maps = self.datapath.maps_mut();
        for e in maps.ipcache.entries()? {
            if !desired.contains_key(&(e.addr, e.prefix_len)) {
                maps.ipcache.remove(e.addr, e.prefix_len)?;
            }
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
        let (id, fresh) = self.alloc.allocate(&labels)?;
        let deltas = if fresh {
            self.engine.add_identity(id, labels)
        } else {
            PolicyDeltas::default()
        };
        let undo_identity = |d: &mut Self| {
            if d.alloc.release(id).unwrap_or(false) {
                d.engine.remove_identity(id);
            }
        };
        let net = match netns::create_endpoint(&EndpointSpec {
            name: req.name.clone(),
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
        }) {
            Ok(n) => n,
            Err(e) => {
                undo_identity(self);
                return Err(e.into());
            }
        };
        let rec = EndpointRecord {
            name: req.name.clone(),
            namespace,
            pod_labels: req.labels.clone(),
            spiffe_id,
            identity: id.get(),
            ipv4,
            ipv6,
            host_index: index,
            endpoint_id: net.endpoint_id,
            host_interface: net.host_interface.clone(),
            netns_name: net.netns.clone(),
            netns_path: net.netns_path.clone(),
            interface: net.interface.clone(),
        };
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
        tracing::info!(endpoint = %rec.name, identity = rec.identity, ipv4 = %ipv4, "endpoint created");
        Ok(rec)
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
        let deltas = if self.alloc.release(id)? {
            self.engine.remove_identity(id)
        } else {
            PolicyDeltas::default()
        };
        self.datapath
            .maps_mut()
            .remove_endpoint_state(rec.endpoint_id)?;
        self.apply_deltas(std::slice::from_ref(&deltas), None)?;
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
        let old = nid(rec.identity);
        if labels == rec.labels().unwrap_or_default()
            && self.alloc.lookup_by_labels(&labels) == Some(old)
        {
            self.state.endpoints.insert(name.to_owned(), rec.clone());
            self.save()?;
            return Ok(rec);
        }
        let (new, fresh) = self.alloc.allocate(&labels)?;
        let deltas = if fresh {
            self.engine.add_identity(new, labels)
        } else {
            PolicyDeltas::default()
        };
        rec.identity = new.get();
        self.install_endpoint(&rec)?;
        self.state.endpoints.insert(name.to_owned(), rec.clone());
        self.apply_deltas(std::slice::from_ref(&deltas), Some(rec.identity))?;
        let ipc = &mut self.datapath.maps_mut().ipcache;
        ipc.upsert(IpAddr::V4(rec.ipv4), 32, rec.identity)?;
        ipc.upsert(IpAddr::V6(rec.ipv6), 128, rec.identity)?;
        let gone = if self.alloc.release(old)? {
            self.engine.remove_identity(old)
        } else {
            PolicyDeltas::default()
        };
        self.apply_deltas(std::slice::from_ref(&gone), None)?;
        self.save()?;
        self.publish();
        tracing::info!(endpoint = %name, old = old.get(), new = new.get(), "endpoint relabelled");
        Ok(rec)
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

    /// Imports policy files (origin, YAML) through the API: all are parsed first; one
    /// invalid document rejects the import with nothing applied. Compiles in place; the API
    /// compiles off the writer with [`Daemon::prepare_policy`] and [`PolicyJob::compile`].
    pub fn import_policies(
        &mut self,
        files: Vec<(String, String)>,
    ) -> Result<(Vec<String>, usize), NetdError> {
        let op = parse_import(files)?;
        let c = self.prepare_policy(op).compile()?;
        self.commit_policy(c)
    }

    /// Deletes a policy by `name`, `namespace/name` or `Kind/namespace/name`.
    pub fn delete_policy(&mut self, name: &str) -> Result<(String, usize), NetdError> {
        let id = self.resolve_policy(name)?;
        let c = self.prepare_policy(PolicyOp::Delete(id)).compile()?;
        let (mut ids, n) = self.commit_policy(c)?;
        Ok((ids.pop().unwrap_or_default(), n))
    }

    /// A policy change ready to compile on a copy of the engine.
    pub fn prepare_policy(&self, op: PolicyOp) -> PolicyJob {
        PolicyJob {
            generation: self.generation,
            op,
            engine: self.engine.clone(),
            cidr_identities: self.state.cidr_identities.clone(),
            dir_ids: self
                .sources
                .iter()
                .filter(|(_, s)| **s == PolicySource::Dir)
                .map(|(id, _)| id.clone())
                .collect(),
            alloc: Arc::clone(&self.alloc),
        }
    }

    /// Applies a compiled change whole or not at all: the engine's key changes become one
    /// plan over every affected endpoint; if the policy map cannot take its new keys nothing
    /// is written and the error says how many are needed and free; a failed write rolls the
    /// kernel back. Only then do the engine, the state file and the snapshot change. Returns
    /// the ids of the policies changed and how many endpoints were updated.
    pub fn commit_policy(&mut self, c: Compiled) -> Result<(Vec<String>, usize), NetdError> {
        let mut c = c;
        loop {
            match self.try_commit_policy(c)? {
                Committed::Done(ids, n) => return Ok((ids, n)),
                Committed::Stale(job) => c = job.compile()?,
            }
        }
    }

    /// [`Daemon::commit_policy`] without compiling: a change compiled against an engine that
    /// has changed since (an endpoint came or went) comes back as a fresh job to compile again.
    pub fn try_commit_policy(&mut self, c: Compiled) -> Result<Committed, NetdError> {
        if c.generation != self.generation {
            let op = c.into_op();
            return Ok(Committed::Stale(Box::new(self.prepare_policy(op))));
        }
        match self.apply_compiled(&c) {
            Ok(n) => {
                let ids = self.finish_policy(c)?;
                Ok(Committed::Done(ids, n))
            }
            Err(e) => {
                c.abort();
                Err(e)
            }
        }
    }

    /// Test seam at the kernel writer: see [`sigil_datapath::PolicyMap::fail_writes_after`].
    #[doc(hidden)]
    pub fn fail_policy_writes_after(&mut self, n: Option<usize>) {
        self.datapath.maps_mut().policy.fail_writes_after(n);
    }

    /// The datapath (for tests that compare the kernel before and after).
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    /// Marks the engine as changed: policy jobs compiled before are compiled again.
    pub(crate) fn bump_generation(&mut self) {
        self.generation += 1;
    }

    /// The kernel part of [`Daemon::commit_policy`]; on error the kernel is as before.
    fn apply_compiled(&mut self, c: &Compiled) -> Result<usize, NetdError> {
        let (plan, flags, n) = self.plan_deltas(&c.engine, &c.deltas, None)?;
        self.write_kernel(plan, &flags, &c.removed, &c.added)?;
        Ok(n)
    }

    /// Applies engine deltas of an endpoint change (the engine already holds the change) to
    /// the other endpoints' maps, key by key; `skip` is an identity whose endpoint was just
    /// installed whole.
    fn apply_deltas(
        &mut self,
        deltas: &[PolicyDeltas],
        skip: Option<u32>,
    ) -> Result<usize, NetdError> {
        let (plan, flags, n) = self.plan_deltas(&self.engine, deltas, skip)?;
        self.write_kernel(plan, &flags, &[], &[])?;
        Ok(n)
    }

    /// The kernel writes of engine deltas (`engine` is the engine after them): one plan over
    /// every endpoint holding a changed identity, checked against the map's free entries, and
    /// each endpoint's enforcement flags. Returns them with the number of endpoints.
    fn plan_deltas(
        &self,
        engine: &PolicyEngine,
        deltas: &[PolicyDeltas],
        skip: Option<u32>,
    ) -> Result<(PolicyPlan, Vec<Flags>, usize), NetdError> {
        // Fold the deltas: per endpoint identity, each key's final value.
        let mut wanted: BTreeMap<u32, BTreeMap<PolicyKey, Option<PolicyEntry>>> = BTreeMap::new();
        for d in deltas {
            for e in &d.endpoints {
                let m = wanted.entry(e.endpoint.get()).or_default();
                for ch in e.changes.iter() {
                    m.insert(ch.key, ch.new);
                }
            }
        }
        if let Some(id) = skip {
            wanted.remove(&id);
        }
        let targets: Vec<&EndpointRecord> = self
            .state
            .endpoints
            .values()
            .filter(|r| wanted.contains_key(&r.identity))
            .collect();
        let mut changes = Vec::new();
        for rec in &targets {
            for (k, v) in wanted.get(&rec.identity).into_iter().flatten() {
                let entry = to_datapath(k, &v.unwrap_or_default());
                for key in entry.keys()? {
                    changes.push((rec.endpoint_id, key, v.map(|_| entry.value())));
                }
            }
        }
        let maps = self.datapath.maps();
        let plan = maps.policy.plan(changes);
        maps.policy.check(&plan)?;
        let mut flags = Vec::new();
        for rec in &targets {
            let Some(old) = maps.endpoints.get(rec.endpoint_id)? else {
                continue;
            };
            let (ingress, egress) = enforcement_of(engine, rec.identity);
            flags.push(Flags {
                endpoint_id: rec.endpoint_id,
                old,
                ingress,
                egress,
            });
        }
        Ok((plan, flags, targets.len()))
    }

    /// Writes a plan with its flags and IPCache changes; on error the kernel is as before.
    /// Enforcement is tightened before the policy writes and relaxed after them.
    fn write_kernel(
        &mut self,
        plan: PolicyPlan,
        flags: &[Flags],
        removed: &[(IpPrefix, u32)],
        added: &[(IpPrefix, u32)],
    ) -> Result<(), NetdError> {
        let mut undo = Undo::default();
        if let Err(e) = self.write_undoable(plan, flags, removed, added, &mut undo) {
            if let Err(r) = self.undo(undo) {
                tracing::error!(error = %r, "undoing a failed policy change");
            }
            return Err(e);
        }
        let eps = &mut self.datapath.maps_mut().endpoints;
        for f in flags {
            let cfg = EndpointConfig {
                ingress_enforced: f.ingress,
                egress_enforced: f.egress,
                ..f.old
            };
            // A relaxation that fails leaves the endpoint stricter: fail closed.
            if let Err(e) = eps.set(f.endpoint_id, cfg) {
                tracing::warn!(endpoint_id = f.endpoint_id, error = %e, "relaxing enforcement flags");
            }
        }
        Ok(())
    }

    fn write_undoable(
        &mut self,
        plan: PolicyPlan,
        flags: &[Flags],
        removed: &[(IpPrefix, u32)],
        added: &[(IpPrefix, u32)],
        undo: &mut Undo,
    ) -> Result<(), NetdError> {
        let maps = self.datapath.maps_mut();
        for f in flags {
            let cfg = EndpointConfig {
                ingress_enforced: f.ingress || f.old.ingress_enforced,
                egress_enforced: f.egress || f.old.egress_enforced,
                ..f.old
            };
            if cfg != f.old {
                maps.endpoints.set(f.endpoint_id, cfg)?;
                undo.flags.push((f.endpoint_id, f.old));
            }
        }
        for (p, id) in removed {
            maps.ipcache.remove(p.addr(), p.prefix_len())?;
            undo.ipcache_removed.push((*p, *id));
        }
        undo.applied = Some(maps.policy.apply_plan(plan)?);
        for (p, id) in added {
            maps.ipcache.upsert(p.addr(), p.prefix_len(), *id)?;
            undo.ipcache_added.push(*p);
        }
        Ok(())
    }

    fn undo(&mut self, undo: Undo) -> Result<(), NetdError> {
        let maps = self.datapath.maps_mut();
        for p in undo.ipcache_added.iter().rev() {
            maps.ipcache.remove(p.addr(), p.prefix_len())?;
        }
        if let Some(a) = undo.applied {
            maps.policy.rollback(a)?;
        }
        for (p, id) in undo.ipcache_removed.iter().rev() {
            maps.ipcache.upsert(p.addr(), p.prefix_len(), *id)?;
        }
        for (ep, old) in undo.flags.iter().rev() {
            maps.endpoints.set(*ep, *old)?;
        }
        Ok(())
    }

    /// After the kernel took a change: the engine, sources, files, state file, snapshot.
    fn finish_policy(&mut self, c: Compiled) -> Result<Vec<String>, NetdError> {
        for (_, id) in &c.removed {
            self.alloc.release(nid(*id))?;
        }
        self.engine = c.engine;
        self.state.cidr_identities = c.cidr_identities;
        let ids = match c.op {
            PolicyOp::Import { docs, files } => {
                let ids: Vec<String> = docs.iter().map(|d| d.id.to_string()).collect();
                for f in &mut self.state.imported {
                    f.policies.retain(|p| !ids.contains(p));
                }
                self.state.imported.retain(|f| !f.policies.is_empty());
                for (origin, yaml) in files {
                    let policies: Vec<String> = docs
                        .iter()
                        .filter(|d| d.origin == origin)
                        .map(|d| d.id.to_string())
                        .collect();
                    if !policies.is_empty() {
                        self.state.imported.push(ImportedFile {
                            origin,
                            yaml,
                            policies,
                        });
                    }
                }
                for d in &docs {
                    self.sources.insert(d.id.clone(), PolicySource::Api);
                }
                ids
            }
            PolicyOp::Delete(id) => {
                let text = id.to_string();
                for f in &mut self.state.imported {
                    f.policies.retain(|p| *p != text);
                }
                self.state.imported.retain(|f| !f.policies.is_empty());
                self.sources.remove(&id);
                vec![text]
            }
            PolicyOp::Dir { docs, files } => {
                let new_ids: BTreeSet<PolicyId> = docs.iter().map(|d| d.id.clone()).collect();
                self.sources
                    .retain(|id, s| *s != PolicySource::Dir || new_ids.contains(id));
                for id in &new_ids {
                    self.sources.insert(id.clone(), PolicySource::Dir);
                }
                self.dir_files = files.into_iter().collect();
                new_ids.iter().map(ToString::to_string).collect()
            }
        };
        self.save()?;
        self.publish();
        Ok(ids)
    }

    fn resolve_policy(&self, name: &str) -> Result<PolicyId, NetdError> {
        resolve_policy(self.engine.documents().map(|d| &d.id), name)
    }

    /// Re-imports the watched directory as a whole: its policies replace the ones it gave
    /// before (removed files' policies are deleted). An invalid file changes nothing.
    pub fn sync_policy_dir(&mut self) -> Result<usize, NetdError> {
        let Some(op) = self.policy_dir_op()? else {
            return Ok(0);
        };
        let c = self.prepare_policy(op).compile()?;
        Ok(self.commit_policy(c)?.1)
    }

    /// The watched directory read and parsed as a change (`None` without a directory).
    pub fn policy_dir_op(&self) -> Result<Option<PolicyOp>, NetdError> {
        Ok(self
            .read_policy_dir()?
            .map(|(docs, files)| PolicyOp::Dir { docs, files }))
    }

    fn read_policy_dir(&self) -> Result<Option<ParsedFiles>, NetdError> {
        self.config
            .policy_dir
            .as_deref()
            .map(read_policy_dir)
            .transpose()
    }

    fn sync_cidrs(&mut self) -> Result<(CidrList, CidrList), NetdError> {
        let mut ignored = BTreeSet::new();
        self.sync_cidrs_tracking(&mut ignored)
    }

    /// Allocates identities for CIDR prefixes policies name now; see [`crate::txn`].
    fn sync_cidrs_tracking(
        &mut self,
        affected: &mut BTreeSet<u32>,
    ) -> Result<(CidrList, CidrList), NetdError> {
        let mut deltas = Vec::new();
        let res = crate::txn::sync_cidrs(
            &mut self.engine,
            &self.alloc,
            &mut self.state.cidr_identities,
            &mut deltas,
        )?;
        for d in &deltas {
            affected.extend(identities_of(d));
        }
        Ok(res)
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

    /// Makes the kernel's map and config of one endpoint the engine's; the config carries the
    /// endpoint's addresses, the only sources the datapath lets its packets have.
    fn install_endpoint(&mut self, rec: &EndpointRecord) -> Result<(), NetdError> {
        let (endpoint_id, identity) = (rec.endpoint_id, rec.identity);
        let map = self.engine.policy_map(nid(identity)).unwrap_or_default();
        let entries: Vec<_> = map.iter().map(|(k, e)| to_datapath(k, e)).collect();
        let (ingress, egress) = enforcement(&map);
        let maps = self.datapath.maps_mut();
        let old = maps.endpoints.get(endpoint_id)?;
        let (old_in, old_eg) =
            old.map_or((true, true), |c| (c.ingress_enforced, c.egress_enforced));
        maps.endpoints.set(
            endpoint_id,
            EndpointConfig {
                identity,
                ingress_enforced: ingress || old_in,
                egress_enforced: egress || old_eg,
                ipv4: Some(rec.ipv4),
                ipv6: Some(rec.ipv6),
            },
        )?;
        maps.policy.replace_policy(endpoint_id, &entries)?;
        maps.endpoints.set(
            endpoint_id,
            EndpointConfig {
                identity,
                ingress_enforced: ingress,
                egress_enforced: egress,
                ipv4: Some(rec.ipv4),
                ipv6: Some(rec.ipv6),
            },
        )?;
        Ok(())
    }

    fn save(&self) -> Result<(), NetdError> {
        self.state.save(&self.config.state_dir)
    }

    fn publish(&mut self) {
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
        }
        for r in self.state.endpoints.values() {
            let labels = snap
                .identities
                .get(&r.identity)
                .cloned()
                .unwrap_or_default();
            snap.endpoints.insert(r.name.clone(), (r.clone(), labels));
        }
        snap.identity_count = self.alloc.len();
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

/// Sorted `source:key=value` strings.
pub fn label_strings(labels: &Labels) -> Vec<String> {
    let mut v: Vec<String> = labels.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

fn identities_of(d: &PolicyDeltas) -> BTreeSet<u32> {
    d.endpoints.iter().map(|e| e.endpoint.get()).collect()
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

fn parse_all(files: &[(String, String)]) -> Result<Vec<Document>, NetdError> {
    let mut docs: Vec<Document> = Vec::new();
    let mut errors = Vec::new();
    for (origin, yaml) in files {
        match parse_documents(yaml, origin) {
            Ok(d) => docs.extend(d),
            Err(PolicyError::Invalid { errors: e }) => errors.extend(e),
            Err(other) => return Err(other.into()),
        }
    }
    if !errors.is_empty() {
        return Err(PolicyError::Invalid { errors }.into());
    }
    let mut seen: BTreeMap<PolicyId, String> = BTreeMap::new();
    for d in &docs {
        if let Some(first) = seen.insert(d.id.clone(), d.origin.clone()) {
            return Err(PolicyError::Duplicate {
                id: d.id.to_string(),
                first,
                second: d.origin.clone(),
            }
            .into());
        }
    }
    Ok(docs)
}

/// The `*.yaml` / `*.yml` files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml")
        })
        .collect();
    out.sort();
    out
}

/// Parsed documents and the (origin, YAML) files they came from.
pub type ParsedFiles = (Vec<Document>, Vec<(String, String)>);

/// Reads and parses the `*.yaml` files of a policy directory (a missing directory has none).
pub fn read_policy_dir(dir: &Path) -> Result<ParsedFiles, NetdError> {
    let mut files = Vec::new();
    if dir.is_dir() {
        for p in yaml_files(dir) {
            let text = std::fs::read_to_string(&p).map_err(|e| NetdError::io(&p, e))?;
            files.push((p.display().to_string(), text));
        }
    }
    let docs = parse_all(&files)?;
    Ok((docs, files))
}

/// Parses an API import: every file first; no documents is an error naming the files.
pub fn parse_import(files: Vec<(String, String)>) -> Result<PolicyOp, NetdError> {
    let docs = parse_all(&files)?;
    if docs.is_empty() {
        return Err(NetdError::invalid(
            "files",
            files
                .iter()
                .map(|(o, _)| o.as_str())
                .collect::<Vec<_>>()
                .join(","),
            "no policy document found",
        ));
    }
    Ok(PolicyOp::Import { docs, files })
}

/// Whether each direction of an endpoint identity's map is in default deny (see
/// [`crate::convert::enforcement`]).
fn enforcement_of(engine: &PolicyEngine, identity: u32) -> (bool, bool) {
    let open = |direction| {
        let key = PolicyKey {
            identity: 0,
            direction,
            protocol: 0,
            port: 0,
            port_prefix_len: 0,
        };
        engine
            .map_entry(nid(identity), &key)
            .is_some_and(|e| !e.deny)
    };
    (!open(Direction::Ingress), !open(Direction::Egress))
}

/// An endpoint's enforcement flags before a change and after it.
struct Flags {
    endpoint_id: u32,
    old: EndpointConfig,
    ingress: bool,
    egress: bool,
}

/// What a failed policy change undoes, newest first.
#[derive(Default)]
struct Undo {
    flags: Vec<(u32, EndpointConfig)>,
    ipcache_removed: CidrList,
    applied: Option<sigil_datapath::Applied>,
    ipcache_added: Vec<IpPrefix>,
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

    #[test]
    fn duplicate_policies_across_files_are_refused() {
        let doc = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: a\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints:\n    - {}\n";
        let files = vec![
            ("one.yaml".to_owned(), doc.to_owned()),
            ("two.yaml".to_owned(), doc.to_owned()),
        ];
        let e = parse_all(&files).expect_err("duplicate");
        assert!(e.to_string().contains("defined twice"), "{e}");
        assert_eq!(parse_all(&files[..1]).expect("one").len(), 1);
    }
}
