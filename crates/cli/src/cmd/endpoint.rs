//! `sigil endpoint create|list|get|delete|labels|exec` against sigil-netd.

use std::ffi::OsString;

use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::endpoints_client::EndpointsClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// `sigil endpoint ...`
#[derive(Debug, clap::Subcommand)]
pub enum EndpointCommand {
    /// Create an endpoint: network namespace, veth, addresses, identity, datapath; prints JSON.
    Create(CreateArgs),
    /// List endpoints.
    List(ListArgs),
    /// Show one endpoint as JSON.
    Get(NameArgs),
    /// Delete an endpoint.
    Delete(NameArgs),
    /// Change an endpoint's labels (it moves to the identity of its new labels).
    Labels(LabelsArgs),
    /// Run a command inside an endpoint's network namespace (like `kubectl exec`), optionally as another
    /// user; exits with the command's status.
    Exec(ExecArgs),
}

/// Flags of `sigil endpoint exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Endpoint name.
    name: String,
    /// Run the command as this user id (supplementary groups are dropped; the group is --gid, else the
    /// user's primary group, else the same number as the uid).
    #[arg(long)]
    uid: Option<u32>,
    /// Run the command with this group id.
    #[arg(long)]
    gid: Option<u32>,
    #[command(flatten)]
    socket: NetdSocket,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Flags of `sigil endpoint create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Endpoint name.
    name: String,
    /// Labels, comma-separated `key=value` (`k8s:` source implied).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Kubernetes namespace of the endpoint.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Kubernetes service account of the endpoint (the `k8s:sa:` selector).
    #[arg(long, default_value = "default")]
    service_account: String,
    /// SPIFFE ID override for endpoints without an agent, added as the label
    /// `spiffe:spiffe.io/spiffe-id=<ID>`.
    #[arg(long, value_name = "URI")]
    spiffe_id: Option<String>,
    /// Return at once, the identity possibly still `pending`; by default the command returns
    /// once the endpoint holds its identity and, in a cluster, is published (at most 10 s).
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    socket: NetdSocket,
}

/// Flags of `sigil endpoint list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    socket: NetdSocket,
    #[command(flatten)]
    output: OutputArg,
}

/// An endpoint name.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// Endpoint name.
    name: String,
    #[command(flatten)]
    socket: NetdSocket,
}

/// Flags of `sigil endpoint labels`.
#[derive(Debug, clap::Args)]
pub struct LabelsArgs {
    /// Endpoint name.
    name: String,
    /// Labels to add or change, comma-separated `key=value`.
    #[arg(long, value_delimiter = ',')]
    set: Vec<String>,
    /// Label keys to remove, comma-separated.
    #[arg(long, value_delimiter = ',')]
    remove: Vec<String>,
    #[command(flatten)]
    socket: NetdSocket,
}

/// An endpoint as JSON.
pub fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    serde_json::json!({
        "name": e.name,
        "namespace": e.namespace,
        "labels": e.labels,
        "identity": e.identity,
        "netns": e.netns,
        "netns_name": e.netns_name,
        "interface": e.interface,
        "host_interface": e.host_interface,
        "endpoint_id": e.endpoint_id,
        "ipv4": e.ipv4,
        "ipv6": e.ipv6,
        "spiffe_id": e.spiffe_id,
        "spiffe_id_source": e.spiffe_id_source,
        "svid_expires_at": e.svid_expires_at,
        "svid_expires": e.svid_expires_at.and_then(|t| u64::try_from(t).ok()).map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            )
            .to_string()
        }),
        "service_account": e.service_account,
        "uid": e.uid,
        "node_name": e.node_name,
        "selectors": e.selectors,
    })
}

/// Runs an `endpoint` subcommand.
pub async fn run(cmd: EndpointCommand) -> anyhow::Result<()> {
    match cmd {
        EndpointCommand::Create(a) => {
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            let e = client::reply(
                c.create_endpoint(pb::CreateEndpointRequest {
                    name: a.name,
                    labels: a.labels.into_iter().filter(|l| !l.is_empty()).collect(),
                    namespace: a.namespace,
                    spiffe_id: a.spiffe_id.unwrap_or_default(),
                    service_account: a.service_account,
                    no_wait: a.no_wait,
                })
                .await,
            )?;
            output::print_json(&endpoint_json(&e))?;
        }
        EndpointCommand::List(a) => {
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            let list = client::reply(c.list_endpoints(pb::ListEndpointsRequest {}).await)?;
            match a.output.output {
                Format::Json => {
                    let v: Vec<_> = list.endpoints.iter().map(endpoint_json).collect();
                    output::print_json(&v)?;
                }
                Format::Text => {
                    println!(
                        "{:<20} {:>8} {:<16} {:<24} {:<40} {:<16} LABELS",
                        "NAME", "IDENTITY", "IPV4", "IPV6", "SPIFFE ID", "SOURCE"
                    );
                    for e in &list.endpoints {
                        println!(
                            "{:<20} {:>8} {:<16} {:<24} {:<40} {:<16} {}",
                            e.name,
                            e.identity,
                            e.ipv4,
                            e.ipv6,
                            e.spiffe_id.as_deref().unwrap_or("-"),
                            e.spiffe_id_source,
                            e.labels.join(",")
                        );
                    }
                }
            }
        }
        EndpointCommand::Get(a) => {
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            let e = client::reply(
                c.get_endpoint(pb::GetEndpointRequest { name: a.name })
                    .await,
            )?;
            output::print_json(&endpoint_json(&e))?;
        }
        EndpointCommand::Delete(a) => {
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            client::reply(
                c.delete_endpoint(pb::DeleteEndpointRequest {
                    name: a.name.clone(),
                })
                .await,
            )?;
            println!("Endpoint {} deleted.", a.name);
        }
        EndpointCommand::Labels(a) => {
            anyhow::ensure!(
                !a.set.is_empty() || !a.remove.is_empty(),
                "labels: give --set and/or --remove"
            );
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            let e = client::reply(
                c.set_labels(pb::SetLabelsRequest {
                    name: a.name,
                    set: a.set,
                    remove: a.remove,
                })
                .await,
            )?;
            output::print_json(&endpoint_json(&e))?;
        }
        EndpointCommand::Exec(a) => {
            let mut c = EndpointsClient::new(a.socket.connect().await?);
            let e = client::reply(
                c.get_endpoint(pb::GetEndpointRequest {
                    name: a.name.clone(),
                })
                .await,
            )?;
            // Returns only if the command could not be started.
            return Err(exec_in_endpoint(&e, a.uid, a.gid, &a.command));
        }
    }
    Ok(())
}

/// Enters `e`'s network namespace, drops to `uid`/`gid` if given and replaces this process with
/// `command`. The namespace is entered by this thread and the same thread execs, so the command starts
/// in it; the other runtime threads end with the exec.
fn exec_in_endpoint(
    e: &pb::Endpoint,
    uid: Option<u32>,
    gid: Option<u32>,
    command: &[OsString],
) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = command.split_first() else {
        return anyhow::anyhow!("CMD: missing (give it after `--`)");
    };
    let netns = match std::fs::File::open(&e.netns) {
        Ok(f) => f,
        Err(err) => {
            return anyhow::anyhow!(
                "endpoint {:?}: cannot open its network namespace {}: {err}",
                e.name,
                e.netns
            );
        }
    };
    if let Err(err) = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET) {
        return anyhow::anyhow!(
            "endpoint {:?}: cannot enter its network namespace {}: {err}",
            e.name,
            e.netns
        );
    }
    drop(netns);
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let gid = gid.or_else(|| uid.map(primary_gid));
    if let Some(gid) = gid {
        cmd.gid(gid);
    }
    // With a uid, std also drops the supplementary groups (when run as root) before `setuid`.
    if let Some(uid) = uid {
        cmd.uid(uid);
    }
    let err = cmd.exec();
    anyhow::anyhow!(
        "endpoint {:?}: cannot run {:?}: {err}",
        e.name,
        program.to_string_lossy()
    )
}

/// The primary group of `uid` from the user database, or the same number when it has no entry.
fn primary_gid(uid: u32) -> u32 {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.gid.as_raw(),
        _ => uid,
    }
}
