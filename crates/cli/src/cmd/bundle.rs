//! `sigil bundle show|list|set|delete`.

use std::path::PathBuf;

use anyhow::Context;
use sigil_proto::admin::v1::bundles_client::BundlesClient;
use sigil_proto::admin::v1::{
    Bundle, DeleteFederatedBundleRequest, GetBundleRequest, ListFederatedBundlesRequest,
    SetFederatedBundleRequest,
};

use crate::client::{self, AdminSocket};
use crate::output::{self, BundleJson, Format, OutputArg};
use crate::parse;

/// `sigil bundle ...`
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Show this server's trust bundle.
    Show(ShowArgs),
    /// List the federated bundles.
    List(ShowArgs),
    /// Create or replace a federated trust domain's bundle.
    Set(SetArgs),
    /// Delete a federated trust domain's bundle.
    Delete(DeleteArgs),
}

/// How a bundle is written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BundleFormat {
    /// The X.509 authorities as PEM certificates.
    Pem,
    /// The SPIFFE bundle document (a JWK Set as JSON).
    Spiffe,
}

/// Flags of `sigil bundle show|list`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Bundle format of the text output.
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    format: BundleFormat,
}

/// Flags of `sigil bundle set`.
#[derive(Debug, clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    admin: AdminSocket,
    /// The federated trust domain name.
    #[arg(long)]
    id: String,
    /// File holding the bundle (`-` for standard input).
    #[arg(long, default_value = "-")]
    path: PathBuf,
    /// Format of the file.
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    format: BundleFormat,
}

/// Flags of `sigil bundle delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    admin: AdminSocket,
    /// The federated trust domain name.
    #[arg(long)]
    id: String,
}

fn bundle_text(b: &Bundle, format: BundleFormat) -> String {
    match format {
        BundleFormat::Pem => output::pem("CERTIFICATE", &b.x509_authorities),
        BundleFormat::Spiffe => {
            // Pretty-printed when it parses, as the server sent it otherwise.
            match serde_json::from_str::<serde_json::Value>(&b.spiffe_bundle_json)
                .and_then(|v| serde_json::to_string_pretty(&v))
            {
                Ok(s) => format!("{s}\n"),
                Err(_) => format!("{}\n", b.spiffe_bundle_json),
            }
        }
    }
}

/// Runs a `bundle` subcommand.
pub async fn run(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Show(a) => {
            let mut bundles = BundlesClient::new(a.admin.connect().await?);
            let resp = client::reply(bundles.get_bundle(GetBundleRequest {}).await)?;
            let b = resp
                .bundle
                .ok_or_else(|| anyhow::anyhow!("the server returned no bundle"))?;
            match a.output.output {
                Format::Json => output::print_json(&BundleJson::from(&b))?,
                Format::Text => print!("{}", bundle_text(&b, a.format)),
            }
        }
        BundleCommand::List(a) => {
            let mut bundles = BundlesClient::new(a.admin.connect().await?);
            let resp = client::reply(
                bundles
                    .list_federated_bundles(ListFederatedBundlesRequest {})
                    .await,
            )?;
            match a.output.output {
                Format::Json => {
                    let list: Vec<BundleJson> = resp.bundles.iter().map(BundleJson::from).collect();
                    output::print_json(&serde_json::json!({ "bundles": list }))?;
                }
                Format::Text => {
                    if resp.bundles.is_empty() {
                        println!("No federated bundles");
                    }
                    let bar = "*".repeat(40);
                    for b in &resp.bundles {
                        println!("{bar}\n* {}\n{bar}", b.trust_domain);
                        print!("{}", bundle_text(b, a.format));
                        println!();
                    }
                }
            }
        }
        BundleCommand::Set(a) => {
            let text = parse::read_input(&a.path).context("--path")?;
            let mut req = SetFederatedBundleRequest {
                trust_domain: a.id,
                ..Default::default()
            };
            match a.format {
                BundleFormat::Pem => req.x509_authorities_pem = text,
                BundleFormat::Spiffe => req.spiffe_bundle_json = text,
            }
            let mut bundles = BundlesClient::new(a.admin.connect().await?);
            let resp = client::reply(bundles.set_federated_bundle(req).await)?;
            let td = resp.bundle.map(|b| b.trust_domain).unwrap_or_default();
            println!("Bundle set: {td}");
        }
        BundleCommand::Delete(a) => {
            let mut bundles = BundlesClient::new(a.admin.connect().await?);
            client::reply(
                bundles
                    .delete_federated_bundle(DeleteFederatedBundleRequest {
                        trust_domain: a.id.clone(),
                    })
                    .await,
            )?;
            println!("Bundle deleted: {}", a.id);
        }
    }
    Ok(())
}
