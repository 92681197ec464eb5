//! `sigil node list`, `sigil identity list|get`: sigil-netd's cluster view (cluster mode), and
//! the address resolution `sigil policy trace --src-ip/--dst-ip` uses.

use std::collections::BTreeSet;
use std::net::IpAddr;

use sigil_policy::{Document, Peer};
use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::cluster_client::ClusterClient;
use sigil_proto::netd::v1::policies_client::PoliciesClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// `sigil node ...`
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// List the cluster's nodes as this node's sigil-netd sees them.
    List(ListArgs),
}

/// `sigil identity ...`
#[derive(Debug, clap::Subcommand)]
pub enum IdentityCommand {
    /// List the identities this node's sigil-netd knows (reserved, local, cluster, CIDR).
    List(ListArgs),
    /// Show one identity.
    Get(GetArgs),
}

/// Flags of the list commands.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    socket: NetdSocket,
}

/// Flags of `sigil identity get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The numeric identity.
    id: u32,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    socket: NetdSocket,
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    serde_json::json!({
        "name": n.name,
        "ip": n.ip,
        "pod_cidr_v4": n.pod_cidr_v4,
        "pod_cidr_v6": n.pod_cidr_v6,
        "spiffe_id": n.spiffe_id,
        "local": n.local,
    })
}

fn identity_json(i: &pb::Identity) -> serde_json::Value {
    serde_json::json!({ "id": i.id, "labels": i.labels, "scope": i.scope })
}

/// Runs `sigil node ...`.
pub async fn run_node(cmd: NodeCommand) -> anyhow::Result<()> {
    let NodeCommand::List(a) = cmd;
    let mut c = ClusterClient::new(a.socket.connect().await?);
    let r = client::reply(c.list_nodes(pb::ListNodesRequest {}).await)?;
    match a.output.output {
        Format::Json => output::print_json(&r.nodes.iter().map(node_json).collect::<Vec<_>>())?,
        Format::Text => {
            println!(
                "{:<24} {:<16} {:<20} {:<24} SPIFFE ID",
                "NAME", "IP", "POD CIDR", "POD CIDR V6"
            );
            for n in &r.nodes {
                let name = if n.local {
                    format!("{} (this node)", n.name)
                } else {
                    n.name.clone()
                };
                println!(
                    "{name:<24} {:<16} {:<20} {:<24} {}",
                    n.ip, n.pod_cidr_v4, n.pod_cidr_v6, n.spiffe_id
                );
            }
        }
    }
    Ok(())
}

/// Runs `sigil identity ...`.
pub async fn run_identity(cmd: IdentityCommand) -> anyhow::Result<()> {
    match cmd {
        IdentityCommand::List(a) => {
            let mut c = ClusterClient::new(a.socket.connect().await?);
            let r = client::reply(c.list_identities(pb::ListIdentitiesRequest {}).await)?;
            match a.output.output {
                Format::Json => {
                    output::print_json(&r.identities.iter().map(identity_json).collect::<Vec<_>>())?
                }
                Format::Text => {
                    println!("{:<10} {:<9} LABELS", "ID", "SCOPE");
                    for i in &r.identities {
                        println!("{:<10} {:<9} {}", i.id, i.scope, i.labels.join(","));
                    }
                }
            }
        }
        IdentityCommand::Get(a) => {
            let mut c = ClusterClient::new(a.socket.connect().await?);
            let i = client::reply(c.get_identity(pb::GetIdentityRequest { id: a.id }).await)?;
            match a.output.output {
                Format::Json => output::print_json(&identity_json(&i))?,
                Format::Text => {
                    println!("Identity: {}\nScope:    {}", i.id, i.scope);
                    for l in &i.labels {
                        println!("Label:    {l}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// The trace peer of what netd's datapath makes of `ip`: an endpoint by its identity's labels,
/// a node as `remote-node`, anything else as an address (CIDR identity or world).
pub async fn peer_of_ip(socket: &NetdSocket, ip: IpAddr) -> anyhow::Result<Peer> {
    let mut c = ClusterClient::new(socket.connect().await?);
    let r = client::reply(
        c.resolve_ip(pb::ResolveIpRequest { ip: ip.to_string() })
            .await,
    )?;
    let peer = match r.source.as_str() {
        "local-endpoint" | "remote-endpoint"
            if r.labels.iter().all(|l| !l.starts_with("reserved:")) =>
        {
            Peer::endpoint(&r.labels.join(","))
        }
        "local-endpoint" | "remote-endpoint" => {
            // An endpoint at a reserved identity (init while it waits): its entity.
            let name = r
                .labels
                .iter()
                .find_map(|l| l.strip_prefix("reserved:"))
                .unwrap_or("init");
            Peer::entity(name)
        }
        "node" => Peer::entity("remote-node"),
        _ => Peer::cidr(&ip.to_string()),
    };
    peer.map_err(|e| anyhow::anyhow!("{ip}: {e}"))
}

/// The policies sigil-netd holds, parsed from the YAML it keeps with each.
pub async fn netd_policies(socket: &NetdSocket) -> anyhow::Result<Vec<Document>> {
    let mut c = PoliciesClient::new(socket.connect().await?);
    let list = client::reply(c.list_policies(pb::ListPoliciesRequest {}).await)?;
    let mut docs = Vec::new();
    let mut seen = BTreeSet::new();
    let wanted: BTreeSet<String> = list
        .policies
        .iter()
        .map(|p| full_name(&p.kind, &p.namespace, &p.name))
        .collect();
    for p in &list.policies {
        let name = full_name(&p.kind, &p.namespace, &p.name);
        if seen.contains(&name) {
            continue;
        }
        let got = client::reply(
            c.get_policy(pb::GetPolicyRequest { name: name.clone() })
                .await,
        )?;
        for doc in sigil_policy::parse_documents(&got.yaml, &got.origin)? {
            let id = doc.id.to_string();
            if wanted.contains(&id) && seen.insert(id) {
                docs.push(doc);
            }
        }
    }
    Ok(docs)
}

fn full_name(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}
