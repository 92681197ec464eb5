//! The registrar of derived entries (`--spiffe-id-mode istio|opaque|verbose`): it follows the
//! snapshot and keeps, on sigil-server, exactly one entry per derived SPIFFE ID hosted on this node,
//! parented to this node's agent only, so a node's agent holds keys only for identities it hosts.
//!
//! An entry is created when the first endpoint deriving its ID appears, and deleted `grace` after the
//! last one leaves. netd's entries are those with this agent as parent and the hint [`HINT`]; on start
//! (and every [`RESYNC`]) netd lists them, adopts those still wanted, replaces those whose selectors
//! changed, and deletes the rest after the grace period, so restarts neither duplicate nor leak entries.

pub mod client;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sigil_proto::admin::v1 as pb;
use tokio::sync::watch;

use crate::config::RegistrarConfig;
use crate::snapshot::Snapshot;
use crate::spiffe_id::{Deriver, SpiffeIdMode, SpiffeIdModeError};
use crate::state::{EndpointRecord, identity_labels};

/// The hint marking the entries netd registers (with this node's agent as their parent).
pub const HINT: &str = "sigil-netd-derived";
/// How often the entries on the server are listed again even when nothing changed here (an entry
/// deleted by someone else is recreated).
pub const RESYNC: Duration = Duration::from_secs(30);
/// How often the snapshot is looked at (a pointer comparison).
const POLL: Duration = Duration::from_millis(100);
/// Retry bounds after a failed round.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The entries wanted: derived SPIFFE ID → selectors (`k8s:…`, sorted), and the endpoints that could
/// not be given one (with why; they get no entry).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// SPIFFE ID → selectors.
    pub entries: BTreeMap<String, Vec<String>>,
    /// Per-endpoint refusals.
    pub errors: Vec<SpiffeIdModeError>,
}

/// The entries the endpoints in `snap` need. Opaque IDs use the identity of each endpoint's labels
/// without its SPIFFE label, looked up among the allocated identities. Two endpoints deriving the same
/// ID with different selectors (a verbose template whose placeholders run together) cannot share one
/// entry: the first by name keeps it, the other is refused.
pub fn wanted(snap: &Snapshot, deriver: &Deriver) -> Wanted {
    let mut out = Wanted::default();
    let by_labels = classic_index(snap, deriver);
    for (name, (rec, _)) in &snap.endpoints {
        match deriver.derive(rec, classic_identity(&by_labels, rec)) {
            Ok(None) => {}
            Ok(Some(d)) => {
                let id = d.spiffe_id.to_string();
                let sels: Vec<String> = d.selectors.iter().map(ToString::to_string).collect();
                match out.entries.get(&id) {
                    Some(have) if *have != sels => out.errors.push(SpiffeIdModeError::Endpoint {
                        endpoint: name.clone(),
                        field: "spiffe_id",
                        value: id,
                        reason: format!(
                            "another endpoint derives the same ID with selectors {}",
                            have.join(",")
                        ),
                    }),
                    Some(_) => {}
                    None => {
                        out.entries.insert(id, sels);
                    }
                }
            }
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// Labels (sorted `source:key=value`) → allocated identity, for opaque numbers (empty in the other
/// modes, which need none).
pub fn classic_index<'a>(snap: &'a Snapshot, deriver: &Deriver) -> HashMap<&'a [String], u32> {
    if matches!(deriver.mode, SpiffeIdMode::Opaque) {
        snap.identities
            .iter()
            .map(|(id, l)| (l.as_slice(), *id))
            .collect()
    } else {
        HashMap::new()
    }
}

/// The identity of `rec`'s labels without its SPIFFE label: the one netd holds for it (opaque
/// mode), else when allocated.
fn classic_identity(by_labels: &HashMap<&[String], u32>, rec: &EndpointRecord) -> Option<u32> {
    if rec.classic_identity.is_some() {
        return rec.classic_identity;
    }
    if by_labels.is_empty() {
        return None;
    }
    let labels = identity_labels(&rec.pod_labels, &rec.namespace, None).ok()?;
    let mut v: Vec<String> = labels.iter().map(ToString::to_string).collect();
    v.sort();
    by_labels.get(v.as_slice()).copied()
}

/// The derived SPIFFE ID of endpoint `name` in `snap` (none when it cannot derive one now).
pub fn derived_id(snap: &Snapshot, deriver: &Deriver, name: &str) -> Option<String> {
    let (rec, _) = snap.endpoints.get(name)?;
    let by_labels = classic_index(snap, deriver);
    let d = deriver
        .derive(rec, classic_identity(&by_labels, rec))
        .ok()??;
    Some(d.spiffe_id.to_string())
}

/// An entry netd owns on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// Entry id.
    pub id: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Selectors, `type:value`, sorted.
    pub selectors: Vec<String>,
}

/// What a round does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// SPIFFE ID → selectors to create.
    pub create: Vec<(String, Vec<String>)>,
    /// Entry ids to delete now.
    pub delete: Vec<String>,
    /// Entry ids unwanted but within their grace period, with when that ends.
    pub waiting: Vec<(String, Instant)>,
}

/// Compares the wanted entries with those owned on the server. `unwanted_since` remembers when each
/// owned entry was first seen unwanted (entries wanted again are forgotten); an unwanted entry is
/// deleted once `grace` has passed since then. An owned entry whose selectors differ from the wanted
/// ones, or a second entry for one ID, is deleted at once (the wanted one is created beside it).
pub fn plan(
    wanted: &BTreeMap<String, Vec<String>>,
    owned: &[Owned],
    unwanted_since: &mut HashMap<String, Instant>,
    now: Instant,
    grace: Duration,
) -> Plan {
    let mut p = Plan::default();
    let mut kept: HashMap<&str, &str> = HashMap::new();
    for o in owned {
        match wanted.get(&o.spiffe_id) {
            Some(sels) if *sels == o.selectors && !kept.contains_key(o.spiffe_id.as_str()) => {
                kept.insert(&o.spiffe_id, &o.id);
                unwanted_since.remove(&o.id);
            }
            Some(_) => {
                unwanted_since.remove(&o.id);
                p.delete.push(o.id.clone());
            }
            None => {
                let since = *unwanted_since.entry(o.id.clone()).or_insert(now);
                let due = since + grace;
                if now >= due {
                    p.delete.push(o.id.clone());
                } else {
                    p.waiting.push((o.id.clone(), due));
                }
            }
        }
    }
    unwanted_since.retain(|id, _| owned.iter().any(|o| &o.id == id));
    for (id, sels) in wanted {
        if !kept.contains_key(id.as_str()) {
            p.create.push((id.clone(), sels.clone()));
        }
    }
    p
}

fn selector_strings(e: &pb::Entry) -> Vec<String> {
    let mut v: Vec<String> = e
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    v.sort();
    v
}

fn to_pb_selector(s: &str) -> pb::Selector {
    let (t, v) = s.split_once(':').unwrap_or((s, ""));
    pb::Selector {
        r#type: t.to_owned(),
        value: v.to_owned(),
    }
}

/// The registrar task's state between rounds.
struct Registrar {
    cfg: RegistrarConfig,
    client: Option<(
        pb::entries_client::EntriesClient<tonic::transport::Channel>,
        std::time::SystemTime,
    )>,
    unwanted_since: HashMap<String, Instant>,
    reported: Vec<SpiffeIdModeError>,
    /// Whether the state after the first round on this connection was logged.
    announced: bool,
}

impl Registrar {
    async fn client(
        &mut self,
    ) -> anyhow::Result<pb::entries_client::EntriesClient<tonic::transport::Channel>> {
        if let Some((c, refresh_at)) = &self.client
            && std::time::SystemTime::now() < *refresh_at
        {
            return Ok(c.clone());
        }
        let svid = client::fetch_own_svid(&self.cfg.agent_workload_socket).await?;
        let c = client::connect_entries(
            &self.cfg.server_address,
            &self.cfg.deriver.trust_domain,
            &svid,
        )
        .await?;
        tracing::info!(netd = %svid.id, server = %self.cfg.server_address, "registrar connected to sigil-server");
        self.client = Some((c.clone(), svid.refresh_at));
        self.announced = false;
        Ok(c)
    }

    /// One round: list owned entries, create and delete per the plan. Returns when the next
    /// grace period ends, if one is running.
    async fn round(&mut self, snap: &Snapshot) -> anyhow::Result<Option<Instant>> {
        let w = wanted(snap, &self.cfg.deriver);
        if w.errors != self.reported {
            for e in &w.errors {
                tracing::error!(error = %e, "endpoint gets no derived entry");
            }
            self.reported = w.errors;
        }
        let mut c = self.client().await?;
        let parent = self.cfg.agent_spiffe_id.to_string();
        let listed = c
            .list_entries(pb::ListEntriesRequest {
                filter: Some(pb::EntryFilter {
                    by_parent_id: parent.clone(),
                    by_hint: HINT.to_owned(),
                    ..Default::default()
                }),
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .map_err(|s| rpc("listing netd's entries", &s))?
            .into_inner();
        let owned: Vec<Owned> = listed
            .entries
            .iter()
            .map(|e| Owned {
                id: e.id.clone(),
                spiffe_id: e.spiffe_id.clone(),
                selectors: selector_strings(e),
            })
            .collect();
        let p = plan(
            &w.entries,
            &owned,
            &mut self.unwanted_since,
            Instant::now(),
            self.cfg.grace,
        );
        for id in &p.delete {
            match c
                .delete_entry(pb::DeleteEntryRequest { id: id.clone() })
                .await
            {
                Ok(r) => {
                    let e = r.into_inner().entry.unwrap_or_default();
                    tracing::info!(entry = %id, spiffe_id = %e.spiffe_id, "derived entry deleted");
                }
                // Someone else deleted it first: that is the outcome wanted.
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(rpc(&format!("deleting entry {id}"), &s)),
            }
            self.unwanted_since.remove(id);
        }
        for (spiffe_id, sels) in &p.create {
            let entry = pb::Entry {
                spiffe_id: spiffe_id.clone(),
                parent_id: parent.clone(),
                selectors: sels.iter().map(|s| to_pb_selector(s)).collect(),
                hint: HINT.to_owned(),
                ..Default::default()
            };
            let made = c
                .create_entry(pb::CreateEntryRequest { entry: Some(entry) })
                .await
                .map_err(|s| rpc(&format!("creating the entry of {spiffe_id}"), &s))?
                .into_inner()
                .entry
                .unwrap_or_default();
            tracing::info!(entry = %made.id, spiffe_id = %spiffe_id, selectors = %sels.join(","), parent = %parent, "derived entry created");
        }
        if !self.announced || !p.create.is_empty() || !p.delete.is_empty() {
            tracing::info!(
                entries = w.entries.len(),
                created = p.create.len(),
                deleted = p.delete.len(),
                waiting = p.waiting.len(),
                "derived entries in sync"
            );
            self.announced = true;
        }
        Ok(p.waiting.iter().map(|(_, due)| *due).min())
    }
}

fn rpc(what: &str, s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: sigil-server said {}: {}", s.code(), s.message())
}

/// Runs the registrar until `stop` turns true: a round whenever the snapshot changes, a grace period
/// ends, [`RESYNC`] passes, or (after a failure) the backoff ends.
pub async fn run(
    cfg: RegistrarConfig,
    snapshot: Arc<ArcSwap<Snapshot>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut r = Registrar {
        cfg,
        client: None,
        unwanted_since: HashMap::new(),
        reported: Vec::new(),
        announced: false,
    };
    let mut seen: Option<Arc<Snapshot>> = None;
    let mut next: Option<Instant> = Some(Instant::now());
    let mut backoff = BACKOFF_MIN;
    loop {
        let snap = snapshot.load_full();
        let changed = seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &snap));
        if changed || next.is_some_and(|t| Instant::now() >= t) {
            seen = Some(snap.clone());
            match r.round(&snap).await {
                Ok(due) => {
                    backoff = BACKOFF_MIN;
                    let resync = Instant::now() + RESYNC;
                    next = Some(due.map_or(resync, |d| d.min(resync)));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "registrar round failed");
                    r.client = None;
                    next = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests;
