//! `sigil server run|healthcheck`.

use std::path::Path;
use std::process::ExitCode;

use sigil_proto::admin::v1::GetBundleRequest;
use sigil_proto::admin::v1::bundles_client::BundlesClient;

use crate::client::{self, AdminSocket};

/// `sigil server ...`
#[derive(Debug, clap::Subcommand)]
pub enum ServerCommand {
    /// Run sigil-server until SIGTERM or SIGINT.
    Run(Box<sigil_server::RunArgs>),
    /// Check that the server answers on its admin socket.
    Healthcheck(HealthcheckArgs),
}

/// Flags of `sigil server healthcheck`.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    admin: AdminSocket,
    /// Only check that the admin socket accepts connections, without calling the API.
    #[arg(long)]
    shallow: bool,
}

/// Runs a `server` subcommand.
pub async fn run(cmd: ServerCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        // The server sets up its own logging from its configuration.
        ServerCommand::Run(args) => sigil_server::run(*args).await.map(|()| ExitCode::SUCCESS),
        ServerCommand::Healthcheck(a) => match check(&a.admin.path, a.shallow).await {
            Ok(()) => {
                println!("Server is healthy.");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("Server is unhealthy: {e:#}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// Connects to the admin socket and, unless `shallow`, asks the gRPC health service whether the
/// server serves and for the trust bundle.
pub async fn check(socket: &Path, shallow: bool) -> anyhow::Result<()> {
    let channel = client::connect(socket).await?;
    if !shallow {
        client::serving(channel.clone(), "").await?;
        client::reply(
            BundlesClient::new(channel)
                .get_bundle(GetBundleRequest {})
                .await,
        )?;
    }
    Ok(())
}
