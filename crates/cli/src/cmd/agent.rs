//! `sigil agent run|healthcheck|api` (the node agent and its Workload API) and `sigil agent
//! list|show|evict|ban` (agents as the server sees them).

pub mod api;

use std::process::ExitCode;
use std::time::Duration;

use sigil_proto::admin::v1::agents_client::AgentsClient;
use sigil_proto::admin::v1::{
    BanAgentRequest, EvictAgentRequest, GetAgentRequest, ListAgentsRequest,
};

use crate::client::{self, AdminSocket};
use crate::output::{self, AgentJson, Format, OutputArg};
use crate::workload::{self, WorkloadSocket};

/// `sigil agent ...`
#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Run sigil-agent (node attestation, SVIDs, Workload API, Delegated Identity API).
    Run(Box<sigil_agent::AgentRunArgs>),
    /// Check that the agent answers on its Workload API socket.
    Healthcheck(HealthcheckArgs),
    /// Call the Workload API as this process (fetch SVIDs and bundles, validate a JWT-SVID).
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// List attested agents.
    List(ListArgs),
    /// Show one attested agent.
    Show(AgentArgs),
    /// Evict an agent: its SVID stops working and it must attest again.
    Evict(AgentArgs),
    /// Ban an agent: its SVID stops working and it cannot attest again with the same identity.
    Ban(AgentArgs),
}

/// Flags of `sigil agent healthcheck`.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    socket: WorkloadSocket,
    /// Only check that the socket accepts connections, without calling the API.
    #[arg(long)]
    shallow: bool,
    /// How long to wait for the agent's answer (it may first wait for its initial entry sync).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Flags of `sigil agent list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Only agents attested with this method (e.g. join_token, x509pop).
    #[arg(long)]
    attestation_type: Option<String>,
    /// Only banned (true) or only not banned (false) agents.
    #[arg(long)]
    banned: Option<bool>,
}

/// Flags of the commands that act on one agent.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// The agent's SPIFFE ID.
    #[arg(long)]
    spiffe_id: String,
}

/// Runs an `agent` subcommand.
pub async fn run(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::Run(args) => sigil_agent::run(*args).await?,
        AgentCommand::Healthcheck(a) => {
            let socket = a.socket.resolve()?;
            return match workload::health(&socket, a.shallow, a.timeout).await {
                Ok(()) => {
                    println!("Agent is healthy.");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("Agent is unhealthy: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            };
        }
        AgentCommand::Api(c) => api::run(c).await?,
        AgentCommand::List(a) => {
            let mut agents = AgentsClient::new(a.admin.connect().await?);
            let resp = client::reply(
                agents
                    .list_agents(ListAgentsRequest {
                        by_attestation_type: a.attestation_type.unwrap_or_default(),
                        by_banned: a.banned,
                    })
                    .await,
            )?;
            match a.output.output {
                Format::Json => {
                    let list: Vec<AgentJson> = resp.agents.iter().map(AgentJson::from).collect();
                    output::print_json(&serde_json::json!({ "agents": list }))?;
                }
                Format::Text => {
                    match resp.agents.len() {
                        0 => println!("No attested agents found"),
                        1 => println!("Found 1 attested agent:\n"),
                        n => println!("Found {n} attested agents:\n"),
                    }
                    for agent in &resp.agents {
                        print!("{}", output::agent_text(agent));
                    }
                }
            }
        }
        AgentCommand::Show(a) => {
            let mut agents = AgentsClient::new(a.admin.connect().await?);
            let resp = client::reply(
                agents
                    .get_agent(GetAgentRequest {
                        spiffe_id: a.spiffe_id.clone(),
                    })
                    .await,
            )?;
            let agent = resp.agent.ok_or_else(|| {
                anyhow::anyhow!("the server returned no agent for {}", a.spiffe_id)
            })?;
            match a.output.output {
                Format::Json => output::print_json(&AgentJson::from(&agent))?,
                Format::Text => print!("{}", output::agent_text(&agent)),
            }
        }
        AgentCommand::Evict(a) => {
            let mut agents = AgentsClient::new(a.admin.connect().await?);
            client::reply(
                agents
                    .evict_agent(EvictAgentRequest {
                        spiffe_id: a.spiffe_id.clone(),
                    })
                    .await,
            )?;
            done(a.output.output, "evicted", &a.spiffe_id)?;
        }
        AgentCommand::Ban(a) => {
            let mut agents = AgentsClient::new(a.admin.connect().await?);
            client::reply(
                agents
                    .ban_agent(BanAgentRequest {
                        spiffe_id: a.spiffe_id.clone(),
                    })
                    .await,
            )?;
            done(a.output.output, "banned", &a.spiffe_id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(format: Format, what: &str, id: &str) -> anyhow::Result<()> {
    match format {
        Format::Text => {
            println!("Agent {what}: {id}");
            Ok(())
        }
        Format::Json => output::print_json(&serde_json::json!({ "spiffe_id": id, what: true })),
    }
}
