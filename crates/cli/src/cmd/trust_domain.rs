//! `sigil trust-domain migrate`.

use sigil_proto::admin::v1::MigrateTrustDomainRequest;
use sigil_proto::admin::v1::trust_domain_client::TrustDomainClient;

use crate::client::{self, AdminSocket};
use crate::output::{self, Format, OutputArg};

/// `sigil trust-domain ...`
#[derive(Debug, clap::Subcommand)]
pub enum TrustDomainCommand {
    /// Move the server and its entries to a new trust domain (old and new stay federated meanwhile).
    Migrate(MigrateArgs),
}

/// Flags of `sigil trust-domain migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// The new trust domain name.
    #[arg(long)]
    to: String,
}

#[derive(serde::Serialize)]
struct MigrateJson {
    from: String,
    to: String,
    entries_migrated: i64,
}

/// Runs a `trust-domain` subcommand.
pub async fn run(cmd: TrustDomainCommand) -> anyhow::Result<()> {
    let TrustDomainCommand::Migrate(a) = cmd;
    let mut td = TrustDomainClient::new(a.admin.connect().await?);
    let resp = client::reply(
        td.migrate_trust_domain(MigrateTrustDomainRequest { to: a.to })
            .await,
    )?;
    match a.output.output {
        Format::Text => {
            println!("From             : {}", resp.from);
            println!("To               : {}", resp.to);
            println!("Entries migrated : {}", resp.entries_migrated);
        }
        Format::Json => output::print_json(&MigrateJson {
            from: resp.from,
            to: resp.to,
            entries_migrated: resp.entries_migrated,
        })?,
    }
    Ok(())
}
