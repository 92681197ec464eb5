//! The gRPC API on the Unix socket: endpoints, policies, monitor, status, cluster view.

mod cluster;
mod encryption;

pub use cluster::resolve;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sigil_datapath::Counters;
use sigil_proto::netd::v1 as pb;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::daemon::{CreateEndpoint, PolicyInfo, parse_import};
use crate::reconcile::Handle;
use crate::state::EndpointRecord;
use crate::txn::PolicyOp;

/// The API: changes go to the reconciler, reads come from its published snapshot. Cheap to
/// clone.
#[derive(Clone)]
pub struct Api {
    handle: Handle,
    config: Arc<Config>,
    counters: Arc<Counters>,
    events: broadcast::Sender<pb::Event>,
    nodes: Option<crate::cluster::NodesView>,
    published: Option<tokio::sync::watch::Receiver<crate::cluster::Published>>,
    export: Option<Arc<crate::hubble::export::ExportCounters>>,
    import_latency: Option<prometheus_client::metrics::histogram::Histogram>,
    auth: Option<crate::auth::AuthView>,
    auth_settled: Option<tokio::sync::watch::Receiver<BTreeSet<crate::auth::Want>>>,
    encryption: Option<Arc<crate::encryption::Status>>,
}

impl Api {
    /// An API over the reconciler `handle`, reading the lost-event counter from `counters`
    /// and streaming `events` to monitors.
    pub fn new(
        handle: Handle,
        config: Arc<Config>,
        counters: Counters,
        events: broadcast::Sender<pb::Event>,
    ) -> Self {
        Self {
            handle,
            config,
            counters: Arc::new(counters),
            events,
            nodes: None,
            published: None,
            export: None,
            import_latency: None,
            auth: None,
            auth_settled: None,
            encryption: None,
        }
    }

    /// The auth manager's granted entries (`sigil auth list`), and the pairs that have had
    /// their answer (a new endpoint's are waited for).
    pub fn with_auth(
        self,
        auth: crate::auth::AuthView,
        settled: Option<tokio::sync::watch::Receiver<BTreeSet<crate::auth::Want>>>,
    ) -> Self {
        Self {
            auth: Some(auth),
            auth_settled: settled,
            ..self
        }
    }

    /// With the flow exporter's counters, shown in the status.
    pub fn with_export(self, counters: Arc<crate::hubble::export::ExportCounters>) -> Self {
        Self {
            export: Some(counters),
            ..self
        }
    }

    /// With `--encryption spiffe`: the running carrier.
    pub fn with_encryption(self, status: Arc<crate::encryption::Status>) -> Self {
        Self {
            encryption: Some(status),
            ..self
        }
    }

    /// In cluster mode: the registered nodes and this node's endpoint addresses in etcd, as
    /// the cluster task publishes them.
    pub fn with_cluster(
        self,
        nodes: crate::cluster::NodesView,
        published: tokio::sync::watch::Receiver<crate::cluster::Published>,
    ) -> Self {
        Self {
            nodes: Some(nodes),
            published: Some(published),
            ..self
        }
    }

    /// Whether a new endpoint is ready for traffic: it holds its identity (not pending) and,
    /// in a cluster, its addresses are in etcd with it (so other nodes can learn it).
    fn ready(&self, rec: &EndpointRecord) -> bool {
        if rec.is_pending() {
            return false;
        }
        if !crate::cluster::publishable(rec.identity) {
            return true;
        }
        let published = self.published.as_ref().is_none_or(|p| {
            let p = p.borrow();
            p.get(&std::net::IpAddr::V4(rec.ipv4)) == Some(&rec.identity)
                && p.get(&std::net::IpAddr::V6(rec.ipv6)) == Some(&rec.identity)
        });
        published && self.auth_settled(rec.identity)
    }

    /// Whether every pair policy requires of `identity` (here, or by the peers of other
    /// nodes) has had its handshake's answer.
    fn auth_settled(&self, identity: u32) -> bool {
        let Some(settled) = &self.auth_settled else {
            return true;
        };
        let snap = self.handle.snapshot();
        if snap.auth_rules.is_empty() {
            return true;
        }
        let settled = settled.borrow();
        crate::auth::required(&snap)
            .into_iter()
            .chain(crate::auth::reverse(&snap))
            .filter(|w| w.0 == identity)
            .all(|w| settled.contains(&w))
    }

    /// Waits until the endpoint `rec` (this very one: same uid) is [`Api::ready`], is gone, or
    /// [`CREATE_WAIT`] passed; returns it as it then is.
    async fn settled(&self, rec: EndpointRecord) -> EndpointRecord {
        let deadline = tokio::time::Instant::now() + CREATE_WAIT;
        let mut changes = self.handle.changes();
        let mut published = self.published.clone();
        let mut settled = self.auth_settled.clone();
        let mut cur = rec;
        loop {
            let snap = self.handle.snapshot();
            match snap.endpoints.get(&cur.name) {
                Some((r, _)) if r.uid == cur.uid => cur = r.clone(),
                _ => return cur,
            }
            if self.ready(&cur) {
                return cur;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return cur },
                ok = changed(published.as_mut()) => if !ok { return cur },
                ok = changed(settled.as_mut()) => if !ok { return cur },
                () = tokio::time::sleep_until(deadline) => return cur,
            }
        }
    }

    /// Records the duration of each successful policy import in `h`.
    pub fn with_import_latency(self, h: prometheus_client::metrics::histogram::Histogram) -> Self {
        Self {
            import_latency: Some(h),
            ..self
        }
    }

    fn cluster_nodes(&self) -> Result<Arc<Vec<sigil_kvstore::NodeInfo>>, Status> {
        self.nodes.as_ref().map(|n| n.load_full()).ok_or_else(|| {
            Status::failed_precondition("this netd is a single node: start it with --kvstore etcd")
        })
    }

    fn endpoint(&self, rec: &EndpointRecord) -> pb::Endpoint {
        let snap = self.handle.snapshot();
        let labels = snap
            .identities
            .get(&rec.identity)
            .cloned()
            .unwrap_or_default();
        endpoint_pb(rec, labels, &self.config.node_name)
    }
}

/// An endpoint record as the API shows it.
pub fn endpoint_pb(r: &EndpointRecord, labels: Vec<String>, node_name: &str) -> pb::Endpoint {
    let selectors = r
        .selectors(node_name)
        .map(|v| v.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    pb::Endpoint {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        labels,
        identity: r.identity,
        netns: r.netns_path.display().to_string(),
        netns_name: r.netns_name.clone(),
        interface: r.interface.clone(),
        host_interface: r.host_interface.clone(),
        endpoint_id: r.endpoint_id,
        ipv4: r.ipv4.to_string(),
        ipv6: r.ipv6.to_string(),
        spiffe_id: r.spiffe_id.clone(),
        service_account: r.service_account.clone(),
        uid: r.uid.clone(),
        node_name: node_name.to_owned(),
        selectors,
        spiffe_id_source: r.spiffe_source.as_str().to_owned(),
        svid_expires_at: r.svid_expires_at,
    }
}

fn policy_pb(p: PolicyInfo) -> pb::Policy {
    pb::Policy {
        kind: p.id.kind.as_str().to_owned(),
        namespace: p.id.namespace.clone().unwrap_or_default(),
        name: p.id.name.clone(),
        source: p.source.as_str().to_owned(),
        origin: p.origin,
        rules: u32::try_from(p.rules).unwrap_or(u32::MAX),
        yaml: p.yaml.to_string(),
    }
}

/// Whether `rx` saw a change (false: its sender is gone); never returns without a receiver.
async fn changed<T>(rx: Option<&mut tokio::sync::watch::Receiver<T>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// How long `endpoint create` waits for the endpoint to be ready (its SVID, its cluster
/// identity, its addresses in etcd) before it returns it as it is (`spiffe_id_source` says
/// `pending` then).
pub const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl pb::endpoints_server::Endpoints for Api {
    async fn create_endpoint(
        &self,
        req: Request<pb::CreateEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let r = req.into_inner();
        self.precheck_spiffe_id(&r)?;
        let rec = self
            .handle
            .create_endpoint(CreateEndpoint {
                name: r.name,
                labels: r.labels,
                namespace: r.namespace,
                spiffe_id: r.spiffe_id,
                service_account: r.service_account,
            })
            .await?;
        // As a CNI ADD: the workload starts once its identity is in place (no first packet
        // dropped as `init`, or at a node that has not heard of it yet).
        let rec = if r.no_wait {
            rec
        } else {
            self.settled(rec).await
        };
        Ok(Response::new(self.endpoint(&rec)))
    }

    async fn list_endpoints(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let snap = self.handle.snapshot();
        let endpoints = snap
            .endpoints
            .values()
            .map(|(r, labels)| endpoint_pb(r, labels.clone(), &self.config.node_name))
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn get_endpoint(
        &self,
        req: Request<pb::GetEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let name = req.into_inner().name;
        let snap = self.handle.snapshot();
        let (r, labels) = snap.get_endpoint(&name)?;
        Ok(Response::new(endpoint_pb(
            r,
            labels.clone(),
            &self.config.node_name,
        )))
    }

    async fn get_endpoint_by_netns(
        &self,
        req: Request<pb::GetEndpointByNetnsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let r = req.into_inner();
        let snap = self.handle.snapshot();
        // A `stat` per endpoint on the first lookup after a change: off the async workers.
        let found = tokio::task::spawn_blocking(move || {
            snap.endpoint_by_netns(r.netns_dev, r.netns_ino)
                .map(|(rec, labels)| (rec.clone(), labels.clone()))
        })
        .await
        .map_err(|_| Status::unavailable("netd is stopping"))??;
        Ok(Response::new(endpoint_pb(
            &found.0,
            found.1,
            &self.config.node_name,
        )))
    }

    async fn delete_endpoint(
        &self,
        req: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let name = req.into_inner().name;
        self.handle.delete_endpoint(name).await?;
        Ok(Response::new(pb::DeleteEndpointResponse {}))
    }

    async fn set_labels(
        &self,
        req: Request<pb::SetLabelsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let r = req.into_inner();
        let rec = self.handle.set_labels(r.name, r.set, r.remove).await?;
        Ok(Response::new(self.endpoint(&rec)))
    }
}

#[tonic::async_trait]
impl pb::policies_server::Policies for Api {
    async fn import_policies(
        &self,
        req: Request<pb::ImportPoliciesRequest>,
    ) -> Result<Response<pb::ImportPoliciesResponse>, Status> {
        let started = std::time::Instant::now();
        let files: Vec<(String, String)> = req
            .into_inner()
            .files
            .into_iter()
            .map(|f| (f.origin, f.yaml))
            .collect();
        // Parsing a large import is CPU work too: off the async workers.
        let op = tokio::task::spawn_blocking(move || parse_import(files))
            .await
            .map_err(|_| Status::unavailable("netd is stopping"))??;
        let (policies, n) = self.handle.change_policy(op).await?;
        if let Some(h) = &self.import_latency {
            h.observe(started.elapsed().as_secs_f64());
        }
        Ok(Response::new(pb::ImportPoliciesResponse {
            policies,
            endpoints_updated: count(n),
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let name = req.into_inner().name;
        let id = self.handle.snapshot().resolve_policy(&name)?;
        let (mut ids, n) = self.handle.change_policy(PolicyOp::Delete(id)).await?;
        Ok(Response::new(pb::DeletePolicyResponse {
            policy: ids.pop().unwrap_or_default(),
            endpoints_updated: count(n),
        }))
    }

    async fn list_policies(
        &self,
        _: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let snap = self.handle.snapshot();
        let policies = snap.list_policies().into_iter().map(policy_pb).collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let name = req.into_inner().name;
        let snap = self.handle.snapshot();
        Ok(Response::new(policy_pb(snap.get_policy(&name)?)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::monitor_server::Monitor for Api {
    type EventsStream = EventStream;

    async fn events(
        &self,
        _: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let rx = self.events.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((Ok(ev), rx)),
                    // A slow monitor misses events rather than holding up the others.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "monitor client lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::status_server::Status for Api {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snap = self.handle.snapshot();
        let c = &self.config;
        Ok(Response::new(pb::StatusResponse {
            node_name: c.node_name.clone(),
            pod_cidr: c.pod_cidr.to_string(),
            pod_cidr_v6: c.pod_cidr_v6.to_string(),
            bpf_pin_dir: c.bpf_pin_dir.display().to_string(),
            policy_dir: c
                .policy_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            enforcement: format!("{:?}", c.enforcement).to_lowercase(),
            endpoints: count(snap.endpoints.len()),
            identities: count(snap.identity_count),
            policies: count(snap.policies.len()),
            lost_events: self.counters.lost_events().unwrap_or(0),
            hubble_export: self.export.as_ref().map(|x| {
                use std::sync::atomic::Ordering::Relaxed;
                pb::HubbleExportStatus {
                    path: c
                        .hubble
                        .export
                        .as_ref()
                        .map(|e| e.path.display().to_string())
                        .unwrap_or_default(),
                    exported: x.exported.load(Relaxed),
                    dropped: x.dropped.load(Relaxed),
                    write_errors: x.write_errors.load(Relaxed),
                    filtered_out: x.filtered_out.load(Relaxed),
                    rotations: x.rotations.load(Relaxed),
                }
            }),
        }))
    }
}

impl Api {
    /// In a derived SPIFFE ID mode, refuses an endpoint whose attributes cannot give its ID and
    /// entry selectors, before anything is created.
    fn precheck_spiffe_id(&self, r: &pb::CreateEndpointRequest) -> Result<(), Status> {
        let Some(reg) = &self.config.spiffe_ids.registrar else {
            return Ok(());
        };
        let or_default = |v: &'_ str| {
            if v.is_empty() {
                "default".to_owned()
            } else {
                v.to_owned()
            }
        };
        let (namespace, service_account) =
            (or_default(&r.namespace), or_default(&r.service_account));
        let attrs = crate::spiffe_id::EndpointAttrs {
            name: &r.name,
            namespace: &namespace,
            service_account: &service_account,
            pod_labels: &r.labels,
        };
        reg.deriver.precheck(attrs).map_err(|e| {
            Status::invalid_argument(match e {
                crate::spiffe_id::SpiffeIdModeError::Endpoint {
                    field,
                    value,
                    reason,
                    ..
                } => format!(
                    "{field}: invalid value {value:?}: {reason} (spiffe_id_mode {})",
                    reg.deriver.mode.name()
                ),
                other => other.to_string(),
            })
        })
    }
}
