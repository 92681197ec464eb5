//! `sigil entry create|show|update|delete|count`.

use std::path::PathBuf;

use anyhow::Context;
use sigil_proto::admin::v1::bundles_client::BundlesClient;
use sigil_proto::admin::v1::entries_client::EntriesClient;
use sigil_proto::admin::v1::{
    BatchCreateEntryRequest, CountEntriesRequest, DeleteEntryRequest, Entry, EntryFilter,
    GetBundleRequest, GetEntryRequest, ListEntriesRequest, Selector, SelectorMatch,
    UpdateEntryRequest,
};
use tonic::transport::Channel;

use crate::client::{self, AdminSocket};
use crate::output::{self, Format, OutputArg};
use crate::parse;

/// Path of the server's own SPIFFE ID in its trust domain, the parent of node entries.
const SERVER_ID_PATH: &str = "/sigil/server";

/// `sigil entry ...`
#[derive(Debug, clap::Subcommand)]
pub enum EntryCommand {
    /// Create registration entries (from flags, or all of a --data file or none).
    Create(CreateArgs),
    /// Show one entry (--entry-id) or the entries matching the filters.
    Show(ShowArgs),
    /// Change an entry: only the fields given are changed.
    Update(UpdateArgs),
    /// Delete an entry.
    Delete(DeleteArgs),
    /// Count the entries matching the filters.
    Count(CountArgs),
}

/// The entry fields settable from flags, shared by `create` and `update`.
#[derive(Debug, Default, clap::Args)]
pub struct EntryFields {
    /// SPIFFE ID of the workload or node the entry describes.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// SPIFFE ID of the agent (or node entry) allowed to obtain this identity.
    #[arg(long, conflicts_with = "node")]
    parent_id: Option<String>,
    /// Make a node entry: the parent is the server itself (spiffe://<td>/sigil/server).
    #[arg(long)]
    node: bool,
    /// Selector as type:value (repeat for several; all must match).
    #[arg(long, value_name = "TYPE:VALUE", value_parser = parse::selector)]
    selector: Vec<Selector>,
    // Numbers are passed on as given, negative ones too, so that the server's refusal names the field
    // and the value (it owns the rules); clap would otherwise take `-5` for a flag.
    /// X.509-SVID lifetime in seconds (omit it for the server default).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    x509_svid_ttl: Option<i32>,
    /// JWT-SVID lifetime in seconds (omit it for the server default).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    jwt_svid_ttl: Option<i32>,
    /// DNS name to put in X.509-SVIDs (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    dns: Vec<String>,
    /// Trust domain whose bundle the workload also receives (repeatable).
    #[arg(long)]
    federates_with: Vec<String>,
    /// The workload may call the admin API (`--admin=false` to clear).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    admin: Option<bool>,
    /// The workload may mint SVIDs for downstream servers (`--downstream=false` to clear).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    downstream: Option<bool>,
    /// Hint shown to workloads that receive several identities.
    #[arg(long)]
    hint: Option<String>,
    /// Unix time after which the entry no longer applies (0 = never).
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true)]
    entry_expiry: Option<i64>,
}

impl EntryFields {
    /// Writes the given fields onto `e`; `server_id` is the parent for `--node`.
    fn apply(self, e: &mut Entry, server_id: Option<String>) {
        if let Some(v) = self.spiffe_id {
            e.spiffe_id = v;
        }
        if let Some(v) = self.parent_id.or(server_id) {
            e.parent_id = v;
        }
        if !self.selector.is_empty() {
            e.selectors = self.selector;
        }
        // An explicit 0 is sent as given: the server refuses it, naming the field (omit the flag for the default).
        if let Some(v) = self.x509_svid_ttl {
            e.x509_svid_ttl = Some(v);
        }
        if let Some(v) = self.jwt_svid_ttl {
            e.jwt_svid_ttl = Some(v);
        }
        if !self.dns.is_empty() {
            e.dns_names = self.dns;
        }
        if !self.federates_with.is_empty() {
            e.federates_with = self.federates_with;
        }
        if let Some(v) = self.admin {
            e.admin = v;
        }
        if let Some(v) = self.downstream {
            e.downstream = v;
        }
        if let Some(v) = self.hint {
            e.hint = v;
        }
        if let Some(v) = self.entry_expiry {
            e.expires_at = v;
        }
    }
}

/// Flags of `sigil entry create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    admin_socket: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    fields: EntryFields,
    /// JSON file of entries, `{"entries": [...]}` (`-` for standard input); created all or none.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "spiffe_id", "parent_id", "node", "selector", "x509_svid_ttl", "jwt_svid_ttl", "dns",
        "federates_with", "admin", "downstream", "hint", "entry_expiry",
    ])]
    data: Option<PathBuf>,
}

/// Filters shared by `show` and `count`.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long)]
    parent_id: Option<String>,
    /// Selector as type:value (repeatable), matched as --match says.
    #[arg(long, value_name = "TYPE:VALUE", value_parser = parse::selector)]
    selector: Vec<Selector>,
    /// How --selector values are matched against an entry's selectors.
    #[arg(long = "match", value_enum, default_value_t = Match::Superset)]
    matching: Match,
    /// Only entries with this hint.
    #[arg(long)]
    hint: Option<String>,
}

/// Selector matching of a filter (as in SPIRE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Match {
    /// The entry has exactly these selectors.
    Exact,
    /// The entry's selectors are a subset of these.
    Subset,
    /// The entry's selectors include all of these.
    Superset,
    /// The entry has at least one of these.
    Any,
}

impl FilterArgs {
    fn filter(self) -> EntryFilter {
        let m = match self.matching {
            Match::Exact => SelectorMatch::Exact,
            Match::Subset => SelectorMatch::Subset,
            Match::Superset => SelectorMatch::Superset,
            Match::Any => SelectorMatch::Any,
        };
        EntryFilter {
            by_spiffe_id: self.spiffe_id.unwrap_or_default(),
            by_parent_id: self.parent_id.unwrap_or_default(),
            by_selectors: self.selector,
            selector_match: m.into(),
            by_hint: self.hint.unwrap_or_default(),
        }
    }
}

/// Flags of `sigil entry show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// Show only this entry.
    #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selector", "hint"])]
    entry_id: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
}

/// Flags of `sigil entry update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    admin_socket: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// The entry to change.
    #[arg(long)]
    entry_id: String,
    #[command(flatten)]
    fields: EntryFields,
}

/// Flags of `sigil entry delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    /// The entry to delete.
    #[arg(long)]
    entry_id: String,
}

/// Flags of `sigil entry count`.
#[derive(Debug, clap::Args)]
pub struct CountArgs {
    #[command(flatten)]
    admin: AdminSocket,
    #[command(flatten)]
    output: OutputArg,
    #[command(flatten)]
    filter: FilterArgs,
}

/// The server's own SPIFFE ID, from the trust domain of its bundle.
async fn server_id(channel: Channel) -> anyhow::Result<String> {
    let resp = client::reply(
        BundlesClient::new(channel)
            .get_bundle(GetBundleRequest {})
            .await,
    )
    .context("asking the server for its trust domain (for --node)")?;
    let td = resp.bundle.map(|b| b.trust_domain).unwrap_or_default();
    let td = sigil_spiffe::TrustDomain::parse(&td)
        .with_context(|| format!("the server's trust domain {td:?} is not valid"))?;
    Ok(td.id_with_path(SERVER_ID_PATH)?.to_string())
}

/// Runs an `entry` subcommand.
pub async fn run(cmd: EntryCommand) -> anyhow::Result<()> {
    match cmd {
        EntryCommand::Create(a) => create(a).await,
        EntryCommand::Show(a) => {
            let mut entries = EntriesClient::new(a.admin.connect().await?);
            let list = match a.entry_id {
                Some(id) => {
                    let resp =
                        client::reply(entries.get_entry(GetEntryRequest { id: id.clone() }).await)?;
                    vec![
                        resp.entry.ok_or_else(|| {
                            anyhow::anyhow!("the server returned no entry for {id}")
                        })?,
                    ]
                }
                None => list_all(&mut entries, a.filter.filter()).await?,
            };
            output::print_entries(&list, a.output.output, true)
        }
        EntryCommand::Update(a) => {
            let channel = a.admin_socket.connect().await?;
            let mut entries = EntriesClient::new(channel.clone());
            let current = client::reply(
                entries
                    .get_entry(GetEntryRequest {
                        id: a.entry_id.clone(),
                    })
                    .await,
            )
            .with_context(|| format!("fetching entry {}", a.entry_id))?
            .entry
            .ok_or_else(|| anyhow::anyhow!("the server returned no entry for {}", a.entry_id))?;
            let server = match a.fields.node {
                true => Some(server_id(channel).await?),
                false => None,
            };
            let mut entry = current;
            a.fields.apply(&mut entry, server);
            // The fetched revision goes back unchanged, so a concurrent change makes the server refuse.
            let resp = client::reply(
                entries
                    .update_entry(UpdateEntryRequest { entry: Some(entry) })
                    .await,
            )?;
            let updated = resp.entry.ok_or_else(|| {
                anyhow::anyhow!("the server returned no entry for {}", a.entry_id)
            })?;
            output::print_entries(&[updated], a.output.output, false)
        }
        EntryCommand::Delete(a) => {
            let mut entries = EntriesClient::new(a.admin.connect().await?);
            client::reply(
                entries
                    .delete_entry(DeleteEntryRequest {
                        id: a.entry_id.clone(),
                    })
                    .await,
            )?;
            match a.output.output {
                Format::Text => {
                    println!("Deleted entry with ID: {}", a.entry_id);
                    Ok(())
                }
                Format::Json => output::print_json(&serde_json::json!({ "deleted": a.entry_id })),
            }
        }
        EntryCommand::Count(a) => {
            let mut entries = EntriesClient::new(a.admin.connect().await?);
            let resp = client::reply(
                entries
                    .count_entries(CountEntriesRequest {
                        filter: Some(a.filter.filter()),
                    })
                    .await,
            )?;
            match a.output.output {
                Format::Text => {
                    match resp.count {
                        1 => println!("1 registration entry"),
                        n => println!("{n} registration entries"),
                    }
                    Ok(())
                }
                Format::Json => output::print_json(&serde_json::json!({ "count": resp.count })),
            }
        }
    }
}

async fn create(a: CreateArgs) -> anyhow::Result<()> {
    // A bad --data file is reported before anything talks to the server.
    let from_file = match &a.data {
        Some(path) => {
            let text = parse::read_input(path).context("--data")?;
            Some(parse::entries_json(&text).with_context(|| format!("--data {}", path.display()))?)
        }
        None => {
            if a.fields.spiffe_id.is_none() {
                anyhow::bail!("--spiffe-id is required (or give the entries with --data FILE)");
            }
            if a.fields.parent_id.is_none() && !a.fields.node {
                anyhow::bail!("--parent-id or --node is required");
            }
            None
        }
    };
    let channel = a.admin_socket.connect().await?;
    let batch = match from_file {
        Some(entries) => entries,
        None => {
            let server = match a.fields.node {
                true => Some(server_id(channel.clone()).await?),
                false => None,
            };
            let mut entry = Entry::default();
            a.fields.apply(&mut entry, server);
            vec![entry]
        }
    };
    let resp = client::reply(
        EntriesClient::new(channel)
            .batch_create_entry(BatchCreateEntryRequest { entries: batch })
            .await,
    )?;
    output::print_entries(&resp.entries, a.output.output, false)
}

/// Follows page tokens until the server has sent every matching entry.
async fn list_all(
    entries: &mut EntriesClient<Channel>,
    filter: EntryFilter,
) -> anyhow::Result<Vec<Entry>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client::reply(
            entries
                .list_entries(ListEntriesRequest {
                    filter: Some(filter.clone()),
                    page_size: 0,
                    page_token: page_token.clone(),
                })
                .await,
        )?;
        all.extend(resp.entries);
        if resp.next_page_token.is_empty() || resp.next_page_token == page_token {
            return Ok(all);
        }
        page_token = resp.next_page_token;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sel(t: &str, v: &str) -> Selector {
        Selector {
            r#type: t.into(),
            value: v.into(),
        }
    }

    #[test]
    fn update_changes_only_the_fields_given() {
        let mut e = Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://td/w".into(),
            parent_id: "spiffe://td/a".into(),
            selectors: vec![sel("unix", "uid:1")],
            x509_svid_ttl: Some(60),
            dns_names: vec!["a.example".into()],
            admin: true,
            revision_number: 4,
            ..Entry::default()
        };
        let fields = EntryFields {
            selector: vec![sel("unix", "uid:2")],
            admin: Some(false),
            jwt_svid_ttl: Some(30),
            ..EntryFields::default()
        };
        fields.apply(&mut e, None);
        assert_eq!(e.selectors, [sel("unix", "uid:2")]);
        assert!(!e.admin);
        assert_eq!((e.x509_svid_ttl, e.jwt_svid_ttl), (Some(60), Some(30)));
        assert_eq!(e.dns_names, ["a.example"]);
        assert_eq!((e.id.as_str(), e.revision_number), ("e1", 4));
        assert_eq!(e.parent_id, "spiffe://td/a");
    }

    #[test]
    fn node_sets_the_server_as_parent() {
        let mut e = Entry::default();
        EntryFields {
            node: true,
            ..EntryFields::default()
        }
        .apply(&mut e, Some("spiffe://td/sigil/server".into()));
        assert_eq!(e.parent_id, "spiffe://td/sigil/server");
    }

    #[test]
    fn filter_maps_match_mode() {
        let f = FilterArgs {
            spiffe_id: Some("spiffe://td/w".into()),
            parent_id: None,
            selector: vec![sel("unix", "uid:1")],
            matching: Match::Any,
            hint: None,
        }
        .filter();
        assert_eq!(f.selector_match, i32::from(SelectorMatch::Any));
        assert_eq!(f.by_spiffe_id, "spiffe://td/w");
        assert_eq!(f.by_parent_id, "");
    }
}
