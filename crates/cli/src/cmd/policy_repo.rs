//! `sigil policy import|delete|list|get`: the policy repository of a running sigil-netd.

use std::path::PathBuf;

use anyhow::Context;
use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::policies_client::PoliciesClient;

use crate::client;
use crate::cmd::netd::NetdSocket;
use crate::output::{self, Format, OutputArg};

/// Flags of `sigil policy import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Policy files, or directories whose `*.yaml` / `*.yml` files are imported; all in one
    /// import (one invalid document rejects it all).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    socket: NetdSocket,
}

/// A policy name: `name`, `namespace/name` or `Kind/namespace/name`.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// Policy name.
    name: String,
    #[command(flatten)]
    socket: NetdSocket,
}

/// Flags of `sigil policy get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Policy name.
    name: String,
    #[command(flatten)]
    socket: NetdSocket,
    #[command(flatten)]
    output: OutputArg,
}

/// Flags of `sigil policy list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    socket: NetdSocket,
    #[command(flatten)]
    output: OutputArg,
}

fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<pb::PolicyFile>> {
    let mut out = Vec::new();
    for p in paths {
        let files = if p.is_dir() {
            sigil_netd::daemon::yaml_files(p)
        } else {
            vec![p.clone()]
        };
        for f in files {
            let yaml = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            out.push(pb::PolicyFile {
                origin: f.display().to_string(),
                yaml,
            });
        }
    }
    anyhow::ensure!(!out.is_empty(), "no policy file found in {paths:?}");
    Ok(out)
}

fn policy_json(p: &pb::Policy) -> serde_json::Value {
    serde_json::json!({
        "kind": p.kind, "namespace": p.namespace, "name": p.name, "source": p.source,
        "origin": p.origin, "rules": p.rules,
    })
}

/// `sigil policy import`.
pub async fn import(a: ImportArgs) -> anyhow::Result<()> {
    let files = read_files(&a.paths)?;
    let mut c = PoliciesClient::new(a.socket.connect().await?);
    let r = client::reply(c.import_policies(pb::ImportPoliciesRequest { files }).await)?;
    for p in &r.policies {
        println!("Imported {p}");
    }
    println!("{} endpoint(s) updated.", r.endpoints_updated);
    Ok(())
}

/// `sigil policy delete`.
pub async fn delete(a: NameArgs) -> anyhow::Result<()> {
    let mut c = PoliciesClient::new(a.socket.connect().await?);
    let r = client::reply(
        c.delete_policy(pb::DeletePolicyRequest { name: a.name })
            .await,
    )?;
    println!(
        "Deleted {}; {} endpoint(s) updated.",
        r.policy, r.endpoints_updated
    );
    Ok(())
}

/// `sigil policy list`.
pub async fn list(a: ListArgs) -> anyhow::Result<()> {
    let mut c = PoliciesClient::new(a.socket.connect().await?);
    let r = client::reply(c.list_policies(pb::ListPoliciesRequest {}).await)?;
    match a.output.output {
        Format::Json => {
            output::print_json(&r.policies.iter().map(policy_json).collect::<Vec<_>>())?;
        }
        Format::Text => {
            println!(
                "{:<32} {:<14} {:<28} {:>5} {:<4} ORIGIN",
                "KIND", "NAMESPACE", "NAME", "RULES", "FROM"
            );
            for p in &r.policies {
                println!(
                    "{:<32} {:<14} {:<28} {:>5} {:<4} {}",
                    p.kind, p.namespace, p.name, p.rules, p.source, p.origin
                );
            }
        }
    }
    Ok(())
}

/// `sigil policy get`.
pub async fn get(a: GetArgs) -> anyhow::Result<()> {
    let mut c = PoliciesClient::new(a.socket.connect().await?);
    let p = client::reply(c.get_policy(pb::GetPolicyRequest { name: a.name }).await)?;
    match a.output.output {
        Format::Json => {
            let mut v = policy_json(&p);
            v["yaml"] = serde_json::Value::String(p.yaml.clone());
            output::print_json(&v)?;
        }
        Format::Text => {
            let ns = if p.namespace.is_empty() {
                String::new()
            } else {
                format!("{}/", p.namespace)
            };
            println!(
                "# {}/{ns}{} ({} rules, from {} {})",
                p.kind, p.name, p.rules, p.source, p.origin
            );
            print!("{}", p.yaml);
        }
    }
    Ok(())
}
