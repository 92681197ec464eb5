//! `sigil policy trace|validate`: network policies read from files, checked and traced offline
//! (no daemon), with the semantics of `sigil-policy`.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use sigil_policy::{Document, EnforcementMode, Peer, PolicyError, TraceResult};

use crate::output::{self, Format, OutputArg};

/// The namespace label a namespaced policy's selectors require.
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// `sigil policy ...`
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Trace one flow through policy files: the source's egress, the destination's ingress,
    /// the rules that decided, and the final verdict.
    Trace(Box<TraceArgs>),
    /// Parse policy files and report each document, or the first problems found.
    Validate(ValidateArgs),
    /// Import policy files or directories into a running sigil-netd.
    Import(super::policy_repo::ImportArgs),
    /// Delete a policy from sigil-netd by name, namespace/name or Kind/namespace/name.
    Delete(super::policy_repo::NameArgs),
    /// List sigil-netd's policies.
    List(super::policy_repo::ListArgs),
    /// Show one of sigil-netd's policies with its YAML.
    Get(super::policy_repo::GetArgs),
}

/// The source of a traced flow: exactly one of these flags.
#[derive(Debug, clap::Args)]
#[group(id = "source", required = false, multiple = false)]
pub struct SourceArgs {
    /// Source endpoint labels, comma-separated `[source:]key=value` (`app=web,io.kubernetes.pod.namespace=prod`;
    /// a key without source is a `k8s:` label, `spiffe.io/spiffe-id=spiffe://...` the SPIFFE ID).
    #[arg(long, value_name = "LABELS", value_parser = endpoint)]
    src: Option<Peer>,
    /// Source entity: host, world, unmanaged, health, init, remote-node, kube-apiserver, ingress.
    #[arg(long, value_name = "NAME", value_parser = entity)]
    src_entity: Option<Peer>,
    /// Source IP address outside the cluster.
    #[arg(long, value_name = "IP", value_parser = cidr)]
    src_cidr: Option<Peer>,
    /// Source address, resolved by the running sigil-netd (`--api-socket`) to what its
    /// datapath sees: a local or remote endpoint, a node, a CIDR identity, or the world.
    #[arg(long, value_name = "IP")]
    src_ip: Option<std::net::IpAddr>,
}

/// The destination of a traced flow: exactly one of these flags.
#[derive(Debug, clap::Args)]
#[group(id = "destination", required = false, multiple = false)]
pub struct DestinationArgs {
    /// Destination endpoint labels, comma-separated `[source:]key=value`.
    #[arg(long, value_name = "LABELS", value_parser = endpoint)]
    dst: Option<Peer>,
    /// Destination entity: host, world, unmanaged, health, init, remote-node, kube-apiserver, ingress.
    #[arg(long, value_name = "NAME", value_parser = entity)]
    dst_entity: Option<Peer>,
    /// Destination IP address outside the cluster.
    #[arg(long, value_name = "IP", value_parser = cidr)]
    dst_cidr: Option<Peer>,
    /// Destination address, resolved by the running sigil-netd (see `--src-ip`).
    #[arg(long, value_name = "IP")]
    dst_ip: Option<std::net::IpAddr>,
}

/// SPIFFE IDs of the traced endpoints: the `spiffe:spiffe.io/spiffe-id` label, alone or added to
/// `--src` / `--dst`.
#[derive(Debug, clap::Args)]
pub struct SpiffeIdArgs {
    /// Source endpoint's SPIFFE ID (with `--src`, added to its labels).
    #[arg(long, value_name = "SPIFFE_ID", value_parser = spiffe_id, conflicts_with_all = ["src_entity", "src_cidr", "src_ip"])]
    src_spiffe_id: Option<String>,
    /// Destination endpoint's SPIFFE ID (with `--dst`, added to its labels).
    #[arg(long, value_name = "SPIFFE_ID", value_parser = spiffe_id, conflicts_with_all = ["dst_entity", "dst_cidr", "dst_ip"])]
    dst_spiffe_id: Option<String>,
}

/// Policy enforcement mode of the traced agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Default deny in a direction once a rule selecting the endpoint asks for it.
    Default,
    /// Every endpoint is default deny both ways.
    Always,
    /// Nothing is enforced.
    Never,
}

impl From<ModeArg> for EnforcementMode {
    fn from(m: ModeArg) -> EnforcementMode {
        match m {
            ModeArg::Default => EnforcementMode::Default,
            ModeArg::Always => EnforcementMode::Always,
            ModeArg::Never => EnforcementMode::Never,
        }
    }
}

/// Flags of `sigil policy trace`.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Policy file, or directory of `*.yaml` / `*.yml` files (an empty directory holds no
    /// policy). Repeat for more; all are loaded as one set. Without it, `--src-ip`/`--dst-ip`
    /// trace through the policies the running sigil-netd holds.
    #[arg(long, value_name = "PATH")]
    policies: Vec<PathBuf>,
    /// sigil-netd's API socket, asked for `--src-ip`/`--dst-ip` (and its policies).
    #[command(flatten)]
    socket: super::netd::NetdSocket,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    destination: DestinationArgs,
    #[command(flatten)]
    spiffe_ids: SpiffeIdArgs,
    /// Destination port and protocol (TCP, UDP or SCTP; TCP when omitted), e.g. `80`, `53/udp`.
    #[arg(long, value_name = "PORT[/PROTO]", value_parser = dport)]
    dport: (u16, u8),
    /// Policy enforcement mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Default)]
    enforcement_mode: ModeArg,
    #[command(flatten)]
    output: OutputArg,
}

/// Flags of `sigil policy validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Policy files or directories of `*.yaml` / `*.yml` files.
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputArg,
}

/// The reason of a peer or port error: clap already quotes the flag and the value.
fn reason(e: PolicyError) -> String {
    match e {
        PolicyError::Peer { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn endpoint(s: &str) -> Result<Peer, String> {
    Peer::endpoint(s).map_err(reason)
}

fn spiffe_id(s: &str) -> Result<String, String> {
    sigil_spiffe::SpiffeId::parse(s)
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

fn entity(s: &str) -> Result<Peer, String> {
    Peer::entity(s).map_err(reason)
}

fn cidr(s: &str) -> Result<Peer, String> {
    Peer::cidr(s).map_err(reason)
}

fn dport(s: &str) -> Result<(u16, u8), String> {
    sigil_policy::parse_dport(s).map_err(reason)
}

/// The one peer clap's group allows (at most one of the flags), with the SPIFFE ID's label
/// added to an endpoint's labels, or an endpoint of the SPIFFE ID alone.
fn one_peer(
    flags: [Option<Peer>; 3],
    spiffe_id: Option<String>,
    what: &str,
) -> anyhow::Result<Peer> {
    let peer = flags.into_iter().flatten().next();
    match (peer, spiffe_id) {
        (Some(Peer::Endpoint(mut labels)), Some(id)) => {
            labels.insert(sigil_labels::spiffe_label(&id));
            Ok(Peer::Endpoint(labels))
        }
        (Some(p), _) => Ok(p),
        (None, Some(id)) => {
            let mut labels = sigil_labels::Labels::new();
            labels.insert(sigil_labels::spiffe_label(&id));
            Ok(Peer::Endpoint(labels))
        }
        (None, None) => anyhow::bail!(
            "no {what} given: give one of --{0}, --{0}-spiffe-id, --{0}-entity or --{0}-cidr",
            if what == "source" { "src" } else { "dst" }
        ),
    }
}

/// Loads policies; the error is the library's message alone (its I/O variant already shows
/// its cause, which a context chain would print twice), one line per invalid field.
fn load(paths: &[PathBuf], flag: Option<&str>) -> anyhow::Result<Vec<Document>> {
    let flag = flag.map(|f| format!("{f}: ")).unwrap_or_default();
    sigil_policy::load_paths(paths).map_err(|e| match e.document_errors() {
        [] => anyhow::anyhow!("{flag}{e}"),
        [one] => anyhow::anyhow!("{flag}invalid policy: {one}"),
        many => {
            let lines: Vec<String> = many.iter().map(|d| format!("  {d}")).collect();
            anyhow::anyhow!(
                "{flag}{} problems in policies:\n{}",
                many.len(),
                lines.join("\n")
            )
        }
    })
}

/// Warns when an endpoint peer cannot be selected by the namespaced policies that were loaded,
/// the most common reason for a surprising trace.
fn namespace_hint(flag: &str, peer: &Peer, docs: &[Document]) {
    let Peer::Endpoint(labels) = peer else {
        return;
    };
    let namespaced = docs.iter().any(|d| d.id.namespace.is_some());
    if namespaced && labels.get(NAMESPACE_LABEL).is_none() {
        eprintln!(
            "note: {flag} has no {NAMESPACE_LABEL} label: namespaced policies neither select it \
             nor match it as a peer"
        );
    }
}

/// Runs the trace and returns its result (the caller prints it).
async fn trace(a: TraceArgs) -> anyhow::Result<(TraceResult, Format)> {
    let s = a.source;
    let d = a.destination;
    let by_ip = s.src_ip.is_some() || d.dst_ip.is_some();
    let docs = match (a.policies.is_empty(), by_ip) {
        (false, _) => load(&a.policies, Some("--policies"))?,
        (true, true) => super::cluster::netd_policies(&a.socket).await?,
        (true, false) => anyhow::bail!(
            "--policies: required unless --src-ip or --dst-ip trace against a running sigil-netd"
        ),
    };
    let ids = a.spiffe_ids;
    let src_ip = match s.src_ip {
        Some(ip) => Some(super::cluster::peer_of_ip(&a.socket, ip).await?),
        None => None,
    };
    let dst_ip = match d.dst_ip {
        Some(ip) => Some(super::cluster::peer_of_ip(&a.socket, ip).await?),
        None => None,
    };
    let src = one_peer(
        [s.src.or(src_ip), s.src_entity, s.src_cidr],
        ids.src_spiffe_id,
        "source",
    )?;
    let dst = one_peer(
        [d.dst.or(dst_ip), d.dst_entity, d.dst_cidr],
        ids.dst_spiffe_id,
        "destination",
    )?;
    namespace_hint("--src", &src, &docs);
    namespace_hint("--dst", &dst, &docs);
    let (port, proto) = a.dport;
    let result =
        sigil_policy::trace_with_mode(&docs, a.enforcement_mode.into(), &src, &dst, port, proto);
    Ok((result, a.output.output))
}

/// One validated document as JSON.
#[derive(Debug, Serialize)]
struct DocumentJson<'a> {
    kind: &'static str,
    namespace: Option<&'a str>,
    name: &'a str,
    rules: usize,
    origin: &'a str,
    index: usize,
}

fn document_line(d: &Document) -> String {
    let name = match &d.id.namespace {
        Some(ns) => format!("{ns}/{}", d.id.name),
        None => d.id.name.clone(),
    };
    let n = d.rules.len();
    let plural = if n == 1 { "" } else { "s" };
    format!(
        "{} {name}: {n} rule{plural} ({}, document {})",
        d.id.kind, d.origin, d.index
    )
}

fn validate(paths: &[PathBuf], format: Format) -> anyhow::Result<()> {
    let docs = load(paths, None)?;
    match format {
        Format::Json => {
            let list: Vec<DocumentJson<'_>> = docs
                .iter()
                .map(|d| DocumentJson {
                    kind: d.id.kind.as_str(),
                    namespace: d.id.namespace.as_deref(),
                    name: &d.id.name,
                    rules: d.rules.len(),
                    origin: &d.origin,
                    index: d.index,
                })
                .collect();
            output::print_json(&serde_json::json!({ "documents": list, "valid": list.len() }))?;
        }
        Format::Text => {
            for d in &docs {
                println!("{}", document_line(d));
            }
            let plural = if docs.len() == 1 { "" } else { "s" };
            println!("{} document{plural} valid", docs.len());
        }
    }
    Ok(())
}

/// Runs a `policy` subcommand. Both trace verdicts exit 0; bad input is an error.
pub async fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Trace(a) => {
            let (result, format) = trace(*a).await?;
            match format {
                Format::Json => output::print_json(&result)?,
                Format::Text => println!("{result}"),
            }
        }
        PolicyCommand::Validate(a) => validate(&a.paths, a.output.output)?,
        PolicyCommand::Import(a) => super::policy_repo::import(a).await?,
        PolicyCommand::Delete(a) => super::policy_repo::delete(a).await?,
        PolicyCommand::List(a) => super::policy_repo::list(a).await?,
        PolicyCommand::Get(a) => super::policy_repo::get(a).await?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const POLICY: &str = "\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]
";

    #[test]
    fn json_has_the_documented_fields() {
        let docs = sigil_policy::parse_str(POLICY).unwrap();
        let src = endpoint("app=web,io.kubernetes.pod.namespace=prod").unwrap();
        let dst = endpoint("app=db,io.kubernetes.pod.namespace=prod").unwrap();
        let r = sigil_policy::trace(&docs, &src, &dst, 80, 6);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["verdict"], "allowed");
        assert_eq!(v["l7_redirect"], true);
        assert_eq!(v["auth_required"], false);
        assert_eq!(v["ingress"]["verdict"], "allowed");
        assert_eq!(v["ingress"]["decided_by"][0]["policy"]["name"], "db");
        assert_eq!(v["ingress"]["decided_by"][0]["rule"], "spec.ingress[0]");
        assert_eq!(v["egress"]["verdict"], "allowed");
        assert!(v["egress"]["decided_by"].as_array().unwrap().is_empty());
    }

    #[test]
    fn flag_values_are_checked_with_the_reason() {
        assert!(endpoint("spiffe.io/spiffe-id=spiffe://td/ns/a=b:c").is_ok());
        assert!(endpoint("").unwrap_err().contains("at least one label"));
        assert!(entity("cluster").unwrap_err().contains("expected one of"));
        assert_eq!(cidr("10.0.0.0/8").unwrap_err(), "not an IP address");
        assert_eq!(dport("53/udp").unwrap(), (53, 17));
        assert_eq!(dport("443").unwrap(), (443, 6));
        assert!(dport("80/icmp").unwrap_err().contains("TCP, UDP or SCTP"));
        assert!(dport("65536").unwrap_err().contains("0..=65535"));
    }

    #[test]
    fn validate_lines_name_kind_namespace_and_rules() {
        let docs = sigil_policy::parse_documents(POLICY, "a.yaml").unwrap();
        assert_eq!(
            document_line(&docs[0]),
            "CiliumNetworkPolicy prod/db: 1 rule (a.yaml, document 1)"
        );
    }
}
