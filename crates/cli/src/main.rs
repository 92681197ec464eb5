//! `sigil`: runs sigil-server and sigil-agent, administers the server over its admin API (a gRPC Unix
//! socket), and calls the agent's Workload API as a workload would.
#![forbid(unsafe_code)]

mod client;
mod cmd;
mod output;
mod parse;
mod workload;

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

/// The `sigil` command line.
#[derive(Debug, Parser)]
#[command(
    name = "sigil",
    version,
    about = "SPIFFE workload identity: server, agent and administration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run sigil-server or check its health.
    #[command(subcommand)]
    Server(cmd::server::ServerCommand),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(cmd::entry::EntryCommand),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// Run sigil-agent, check it, call its Workload API; manage attested agents.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
    /// Show the trust bundle and manage federated bundles.
    #[command(subcommand)]
    Bundle(cmd::bundle::BundleCommand),
    /// Mint X.509-SVIDs.
    #[command(subcommand)]
    X509(cmd::svid::X509Command),
    /// Mint JWT-SVIDs.
    #[command(subcommand)]
    Jwt(cmd::svid::JwtCommand),
    /// Move the server to another trust domain.
    #[command(subcommand)]
    TrustDomain(cmd::trust_domain::TrustDomainCommand),
    /// Check network policy files and trace flows through them (no daemon needed).
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCommand),
    /// Run sigil-netd (endpoints, identities, eBPF policy enforcement) or show its status.
    #[command(subcommand)]
    Netd(cmd::netd::NetdCommand),
    /// Manage endpoints of sigil-netd.
    #[command(subcommand)]
    Endpoint(cmd::endpoint::EndpointCommand),
    /// The cluster's nodes, as sigil-netd sees them (cluster mode).
    #[command(subcommand)]
    Node(cmd::cluster::NodeCommand),
    /// Numeric identities sigil-netd knows (cluster mode).
    #[command(subcommand)]
    Identity(cmd::cluster::IdentityCommand),
    /// Identity pairs sigil-netd has authenticated (mutual authentication, cluster mode).
    #[command(subcommand)]
    Auth(cmd::auth::AuthCommand),
    /// The encrypted carrier between nodes (sigil-netd --encryption spiffe).
    #[command(subcommand)]
    Encryption(cmd::encryption::EncryptionCommand),
    /// Stream sigil-netd's verdict and drop events.
    Monitor(cmd::monitor::MonitorArgs),
    /// Show flows from sigil-netd's Hubble Observer API (`hubble observe`'s flags and formats),
    /// of one node or, with `--cluster`, of every node merged in time order.
    Observe(Box<cmd::observe::ObserveArgs>),
    /// Start a throwaway server and agent, fetch an X.509-SVID and a JWT-SVID through the Workload API.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, &matches)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let done = ExitCode::SUCCESS;
    match command {
        Command::Server(c) => return cmd::server::run(c).await,
        Command::Entry(c) => cmd::entry::run(c).await?,
        Command::Token(c) => cmd::token::run(c).await?,
        Command::Agent(c) => return cmd::agent::run(c).await,
        Command::Bundle(c) => cmd::bundle::run(c).await?,
        Command::X509(c) => cmd::svid::run_x509(c).await?,
        Command::Jwt(c) => cmd::svid::run_jwt(c).await?,
        Command::TrustDomain(c) => cmd::trust_domain::run(c).await?,
        Command::Demo(a) => cmd::demo::run(a).await?,
        Command::Netd(c) => return cmd::netd::run(c).await,
        Command::Endpoint(c) => cmd::endpoint::run(c).await?,
        Command::Monitor(a) => cmd::monitor::run(a).await?,
        Command::Observe(a) => {
            // The filter flags' order matters (`--not`): read it from the matches.
            let sub = matches
                .subcommand_matches("observe")
                .ok_or_else(|| anyhow::anyhow!("internal: no matches for `observe`"))?;
            cmd::observe::run(*a, sub).await?
        }
        Command::Node(c) => cmd::cluster::run_node(c).await?,
        Command::Identity(c) => cmd::cluster::run_identity(c).await?,
        Command::Auth(c) => cmd::auth::run(c).await?,
        Command::Encryption(c) => cmd::encryption::run(c).await?,
        Command::Policy(c) => return cmd::policy::run(c).await,
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_definition_is_consistent() {
        // Catches duplicate flag ids and conflicts naming flags that do not exist.
        Cli::command().debug_assert();
    }
}
