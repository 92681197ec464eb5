//! The gRPC API on the Unix socket: endpoints, policies, monitor, status.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sigil_proto::netd::v1 as pb;
use tokio::sync::{Mutex, broadcast};
use tonic::{Request, Response, Status};

use crate::daemon::{CreateEndpoint, Daemon, PolicyInfo};
use crate::error::NetdError;
use crate::state::EndpointRecord;

/// The API's handle on the daemon; cheap to clone.
#[derive(Clone)]
pub struct Api {
    daemon: Arc<Mutex<Daemon>>,
    events: broadcast::Sender<pb::Event>,
}

impl Api {
    /// An API over `daemon`, streaming `events` to monitors.
    pub fn new(daemon: Arc<Mutex<Daemon>>, events: broadcast::Sender<pb::Event>) -> Self {
        Self { daemon, events }
    }

    /// Runs a blocking daemon operation (netlink, `ip`, map syscalls) under the lock.
    async fn with<T>(
        &self,
        f: impl FnOnce(&mut Daemon) -> Result<T, NetdError>,
    ) -> Result<T, Status> {
        let mut d = self.daemon.lock().await;
        tokio::task::block_in_place(|| f(&mut d)).map_err(Status::from)
    }
}

/// An endpoint record as the API shows it.
pub fn endpoint_pb(r: &EndpointRecord, labels: Vec<String>) -> pb::Endpoint {
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
        yaml: p.yaml,
    }
}

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
        self.with(|d| {
            let rec = d.create_endpoint(CreateEndpoint {
                name: r.name,
                labels: r.labels,
                namespace: r.namespace,
                spiffe_id: r.spiffe_id,
            })?;
            let labels = d.identity_labels(rec.identity);
            Ok(endpoint_pb(&rec, labels))
        })
        .await
        .map(Response::new)
    }

    async fn list_endpoints(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let d = self.daemon.lock().await;
        let endpoints = d
            .list_endpoints()
            .iter()
            .map(|r| endpoint_pb(r, d.identity_labels(r.identity)))
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn get_endpoint(
        &self,
        req: Request<pb::GetEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let name = req.into_inner().name;
        let d = self.daemon.lock().await;
        let r = d.get_endpoint(&name)?;
        Ok(Response::new(endpoint_pb(
            &r,
            d.identity_labels(r.identity),
        )))
    }

    async fn delete_endpoint(
        &self,
        req: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let name = req.into_inner().name;
        self.with(|d| d.delete_endpoint(&name)).await?;
        Ok(Response::new(pb::DeleteEndpointResponse {}))
    }

    async fn set_labels(
        &self,
        req: Request<pb::SetLabelsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let r = req.into_inner();
        self.with(|d| {
            let rec = d.set_labels(&r.name, &r.set, &r.remove)?;
            let labels = d.identity_labels(rec.identity);
            Ok(endpoint_pb(&rec, labels))
        })
        .await
        .map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::policies_server::Policies for Api {
    async fn import_policies(
        &self,
        req: Request<pb::ImportPoliciesRequest>,
    ) -> Result<Response<pb::ImportPoliciesResponse>, Status> {
        let files = req
            .into_inner()
            .files
            .into_iter()
            .map(|f| (f.origin, f.yaml))
            .collect();
        let (policies, n) = self.with(|d| d.import_policies(files)).await?;
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
        let (policy, n) = self.with(|d| d.delete_policy(&name)).await?;
        Ok(Response::new(pb::DeletePolicyResponse {
            policy,
            endpoints_updated: count(n),
        }))
    }

    async fn list_policies(
        &self,
        _: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let d = self.daemon.lock().await;
        let policies = d.list_policies().into_iter().map(policy_pb).collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let name = req.into_inner().name;
        let d = self.daemon.lock().await;
        Ok(Response::new(policy_pb(d.get_policy(&name)?)))
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
        let d = self.daemon.lock().await;
        let c = d.config();
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
            endpoints: count(d.list_endpoints().len()),
            identities: count(d.identity_count()),
            policies: count(d.engine().documents().count()),
            lost_events: d.lost_events(),
        }))
    }
}
