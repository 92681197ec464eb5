//! `sigil auth list`: the identity pairs this node's sigil-netd has authenticated (mutual
//! authentication required by policy, cluster mode).

use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::auth_client::AuthClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// `sigil auth ...`
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// List the authenticated pairs (local identity, remote identity, remote node, expiry).
    List(ListArgs),
}

/// Flags of `sigil auth list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    socket: NetdSocket,
}

fn entry_json(e: &pb::AuthEntry) -> serde_json::Value {
    serde_json::json!({
        "local_identity": e.local_identity,
        "local_spiffe_id": e.local_spiffe_id,
        "remote_identity": e.remote_identity,
        "remote_spiffe_id": e.remote_spiffe_id,
        "remote_node": e.remote_node,
        "remote_node_ip": e.remote_node_ip,
        "expires_unix": e.expires_unix,
    })
}

/// Runs `sigil auth ...`.
pub async fn run(cmd: AuthCommand) -> anyhow::Result<()> {
    let AuthCommand::List(a) = cmd;
    let mut c = AuthClient::new(a.socket.connect().await?);
    let r = client::reply(c.list_auth(pb::ListAuthRequest {}).await)?;
    match a.output.output {
        Format::Json => output::print_json(&r.entries.iter().map(entry_json).collect::<Vec<_>>())?,
        Format::Text => {
            println!(
                "{:<10} {:<10} {:<20} {:<12} REMOTE SPIFFE ID",
                "LOCAL", "REMOTE", "REMOTE NODE", "EXPIRES"
            );
            for e in &r.entries {
                let node = if e.remote_node.is_empty() && e.remote_node_ip.is_empty() {
                    "- (this node)".to_owned()
                } else if e.remote_node.is_empty() {
                    e.remote_node_ip.clone()
                } else {
                    e.remote_node.clone()
                };
                println!(
                    "{:<10} {:<10} {node:<20} {:<12} {}",
                    e.local_identity, e.remote_identity, e.expires_unix, e.remote_spiffe_id
                );
            }
        }
    }
    Ok(())
}
