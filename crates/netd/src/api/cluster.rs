//! `sigil.netd.v1.Cluster`: the cluster view (nodes, identities, address resolution) read
//! from the published snapshot and the cluster task's node list.

use std::net::IpAddr;

use sigil_identity::NumericIdentity;
use sigil_proto::netd::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use crate::snapshot::Snapshot;

fn scope(snap: &Snapshot, id: u32) -> &'static str {
    let n = NumericIdentity::new(id);
    if n.is_reserved() {
        "reserved"
    } else if n.is_cidr() {
        "cidr"
    } else if snap.endpoints.values().any(|(r, _)| r.identity == id) {
        "local"
    } else if snap.cluster_ids.contains(&id) {
        "cluster"
    } else {
        "local"
    }
}

fn identity_pb(snap: &Snapshot, id: u32, labels: &[String]) -> pb::Identity {
    pb::Identity {
        id,
        labels: labels.to_vec(),
        scope: scope(snap, id).to_owned(),
    }
}

/// What the datapath makes of `ip` on this node: a local endpoint, a remote endpoint or node
/// (the cluster's IPCache entries), the longest CIDR identity containing it, else world.
pub fn resolve(snap: &Snapshot, ip: IpAddr) -> (u32, &'static str, String) {
    if let Some(name) = snap.addresses.get(&ip)
        && let Some((rec, _)) = snap.endpoints.get(name)
    {
        return (rec.identity, "local-endpoint", name.clone());
    }
    if let Some(id) = snap.remote_ips.get(&ip) {
        let source = if *id == NumericIdentity::REMOTE_NODE.get() {
            "node"
        } else {
            "remote-endpoint"
        };
        return (*id, source, String::new());
    }
    if let Some((_, id)) = snap
        .cidr_identities
        .iter()
        .filter(|(p, _)| crate::daemon::prefix_has(p, ip))
        .max_by_key(|(p, _)| p.prefix_len())
    {
        return (*id, "cidr", String::new());
    }
    (NumericIdentity::WORLD.get(), "world", String::new())
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Api {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.cluster_nodes()?;
        let me = &self.config.node_name;
        let nodes = nodes
            .iter()
            .map(|n| pb::Node {
                name: n.name.clone(),
                ip: n.ip.to_string(),
                pod_cidr_v4: n.pod_cidr_v4.map(|c| c.to_string()).unwrap_or_default(),
                pod_cidr_v6: n.pod_cidr_v6.map(|c| c.to_string()).unwrap_or_default(),
                spiffe_id: n
                    .spiffe_id
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                local: &n.name == me,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_identities(
        &self,
        _: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        self.cluster_nodes()?;
        let snap = self.handle.snapshot();
        let mut ids: Vec<(&u32, &Vec<String>)> = snap.identities.iter().collect();
        ids.sort_by_key(|(id, _)| **id);
        let identities = ids
            .into_iter()
            .map(|(id, l)| identity_pb(&snap, *id, l))
            .collect();
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn get_identity(
        &self,
        req: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        self.cluster_nodes()?;
        let id = req.into_inner().id;
        let snap = self.handle.snapshot();
        let labels = snap
            .identities
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("identity {id} not found on this node")))?;
        Ok(Response::new(identity_pb(&snap, id, labels)))
    }

    async fn resolve_ip(
        &self,
        req: Request<pb::ResolveIpRequest>,
    ) -> Result<Response<pb::ResolveIpResponse>, Status> {
        self.cluster_nodes()?;
        let text = req.into_inner().ip;
        let ip: IpAddr = text.parse().map_err(|_| {
            Status::invalid_argument(format!("ip: invalid value {text:?}: not an IP address"))
        })?;
        let snap = self.handle.snapshot();
        let (identity, source, endpoint) = resolve(&snap, ip);
        let labels = snap.identities.get(&identity).cloned().unwrap_or_default();
        Ok(Response::new(pb::ResolveIpResponse {
            ip: ip.to_string(),
            identity,
            labels,
            source: source.to_owned(),
            endpoint,
        }))
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Api {
    async fn list_auth(
        &self,
        _: Request<pb::ListAuthRequest>,
    ) -> Result<Response<pb::ListAuthResponse>, Status> {
        let nodes = self.cluster_nodes()?;
        let entries = self
            .auth
            .as_ref()
            .map(|a| a.load_full())
            .unwrap_or_default();
        let snap = self.handle.snapshot();
        let spiffe_id = |id: u32| {
            snap.identities
                .get(&id)
                .and_then(|l| {
                    l.iter()
                        .find_map(|l| l.strip_prefix("spiffe:spiffe.io/spiffe-id="))
                })
                .unwrap_or_default()
                .to_owned()
        };
        let entries = entries
            .iter()
            .map(|e| pb::AuthEntry {
                local_identity: e.local,
                remote_identity: e.remote,
                remote_node: e
                    .node
                    .and_then(|ip| nodes.iter().find(|n| n.ip == IpAddr::V4(ip)))
                    .map(|n| n.name.clone())
                    .unwrap_or_default(),
                remote_node_ip: e.node.map(|ip| ip.to_string()).unwrap_or_default(),
                expires_unix: e.expires_unix,
                local_spiffe_id: spiffe_id(e.local),
                remote_spiffe_id: spiffe_id(e.remote),
            })
            .collect();
        Ok(Response::new(pb::ListAuthResponse { entries }))
    }
}
