//! `sigil token generate`.

use sigil_proto::admin::v1::CreateJoinTokenRequest;
use sigil_proto::admin::v1::join_tokens_client::JoinTokensClient;

use crate::client::{self, AdminSocket};
use crate::output::{self, Format, OutputArg};

/// `sigil token ...`
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token for an agent.
    Generate(GenerateArgs),
}

/// Flags of `sigil token generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Also create a node entry with this SPIFFE ID whose parent is the token's agent.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Token lifetime in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(i32).range(1..))]
    ttl: i32,
}

#[derive(serde::Serialize)]
struct TokenJson {
    token: String,
    expires_at: i64,
    expires_at_rfc3339: Option<String>,
}

/// Runs a `token` subcommand.
pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Generate(a) = cmd;
    let mut tokens = JoinTokensClient::new(a.admin.connect().await?);
    let resp = client::reply(
        tokens
            .create_join_token(CreateJoinTokenRequest {
                ttl: a.ttl,
                spiffe_id: a.spiffe_id.unwrap_or_default(),
            })
            .await,
    )?;
    match a.output.output {
        Format::Text => println!("Token: {}", resp.token),
        Format::Json => output::print_json(&TokenJson {
            expires_at_rfc3339: output::rfc3339(resp.expires_at),
            token: resp.token,
            expires_at: resp.expires_at,
        })?,
    }
    Ok(())
}
