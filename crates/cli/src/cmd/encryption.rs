//! `sigil encryption status`: the encrypted carrier of this node's sigil-netd
//! (`--encryption spiffe`): per peer node the key's age, packets and bytes each way, and the
//! drops by reason.

use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::encryption_client::EncryptionClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// `sigil encryption ...`
#[derive(Debug, clap::Subcommand)]
pub enum EncryptionCommand {
    /// Show the encrypted carrier's sessions and counters.
    Status(StatusArgs),
}

/// Flags of `sigil encryption status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    socket: NetdSocket,
}

fn peer_json(p: &pb::EncryptionPeer) -> serde_json::Value {
    serde_json::json!({
        "node": p.node,
        "ip": p.ip,
        "spiffe_id": p.spiffe_id,
        "key_age_seconds": p.key_age_seconds,
        "expires_unix": p.expires_unix,
        "tx_packets": p.tx_packets,
        "tx_bytes": p.tx_bytes,
        "rx_packets": p.rx_packets,
        "rx_bytes": p.rx_bytes,
        "dropped": {
            "replayed": p.replayed,
            "malformed": p.malformed,
            "unauthenticated": p.unauthenticated,
            "wrong_source": p.wrong_source,
            "identity_not_hosted": p.identity_not_hosted,
        },
    })
}

/// Runs `sigil encryption ...`.
pub async fn run(cmd: EncryptionCommand) -> anyhow::Result<()> {
    let EncryptionCommand::Status(a) = cmd;
    let mut c = EncryptionClient::new(a.socket.connect().await?);
    let r = client::reply(
        c.get_encryption_status(pb::GetEncryptionStatusRequest {})
            .await,
    )?;
    match a.output.output {
        Format::Json => output::print_json(&serde_json::json!({
            "mode": r.mode,
            "spiffe_id": r.spiffe_id,
            "peers": r.peers.iter().map(peer_json).collect::<Vec<_>>(),
            "dropped": {
                "unknown_session": r.unknown_session,
                "no_session": r.no_session,
                "plaintext": r.plaintext_dropped,
            },
        }))?,
        Format::Text => {
            println!("Encryption: {} (node SVID {})", r.mode, r.spiffe_id);
            println!(
                "{:<16} {:<16} {:>8} {:>10} {:>12} {:>10} {:>12} {:>8} {:>9} {:>8} {:>8} {:>10}",
                "NODE",
                "IP",
                "KEY AGE",
                "TX PKTS",
                "TX BYTES",
                "RX PKTS",
                "RX BYTES",
                "REPLAYED",
                "MALFORMED",
                "UNAUTH",
                "WRONGSRC",
                "NOTHOSTED"
            );
            for p in &r.peers {
                println!(
                    "{:<16} {:<16} {:>7}s {:>10} {:>12} {:>10} {:>12} {:>8} {:>9} {:>8} {:>8} {:>10}",
                    p.node,
                    p.ip,
                    p.key_age_seconds,
                    p.tx_packets,
                    p.tx_bytes,
                    p.rx_packets,
                    p.rx_bytes,
                    p.replayed,
                    p.malformed,
                    p.unauthenticated,
                    p.wrong_source,
                    p.identity_not_hosted
                );
            }
            println!(
                "Dropped outside sessions: {} naming no session, {} with no session to send on, {} plaintext VXLAN from the underlay",
                r.unknown_session, r.no_session, r.plaintext_dropped
            );
        }
    }
    Ok(())
}
