//! The admin API (Unix socket): entries, agents, bundles, join tokens, SVID minting, migration.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sigil_datastore::{
    AgentFilter, AttestedAgent, EntryFilter, JoinToken, SelectorMatch, StoredBundle,
};
use sigil_proto::admin::v1 as pb;
use sigil_spiffe::bundle::Bundle;
use sigil_spiffe::{SpiffeId, TrustDomain};
use tonic::{Request, Response, Status};

use crate::catalog::Change;
use crate::grpc::{blocking, bundle_to_pb, ds_status, selectors_to_pb};
use crate::state::{State, unix};
use crate::validate::{self, FieldError, ParentLookup};

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// The admin API implementation.
#[derive(Clone)]
pub struct Admin {
    state: Arc<State>,
}

impl Admin {
    /// An admin API over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

struct BatchParents<'a> {
    state: &'a State,
    batch: HashSet<SpiffeId>,
}

impl ParentLookup for BatchParents<'_> {
    fn is_entry_id(&self, id: &SpiffeId) -> bool {
        self.batch.contains(id) || self.state.catalog.has_spiffe_id(id)
    }
}

fn parse_filter(state: &State, f: Option<pb::EntryFilter>) -> Result<EntryFilter, Status> {
    let Some(f) = f else {
        return Ok(EntryFilter::default());
    };
    let parse_id = |field: &str, v: &str| -> Result<Option<SpiffeId>, Status> {
        if v.is_empty() {
            return Ok(None);
        }
        SpiffeId::parse(v).map(Some).map_err(|e| {
            Status::invalid_argument(format!("filter.{field}: invalid SPIFFE ID {v:?}: {e}"))
        })
    };
    let _ = state;
    let selectors = if f.by_selectors.is_empty() {
        None
    } else {
        let mut sels = Vec::new();
        for (i, s) in f.by_selectors.iter().enumerate() {
            sels.push(validate::selector(&format!("filter.by_selectors[{i}]"), s)?);
        }
        let m = match pb::SelectorMatch::try_from(f.selector_match) {
            Ok(pb::SelectorMatch::Exact) => SelectorMatch::Exact,
            Ok(pb::SelectorMatch::Subset) => SelectorMatch::Subset,
            Ok(pb::SelectorMatch::Superset) => SelectorMatch::Superset,
            Ok(pb::SelectorMatch::Any) => SelectorMatch::Any,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "filter.selector_match: unknown value {}",
                    f.selector_match
                )));
            }
        };
        Some((sels, m))
    };
    Ok(EntryFilter {
        spiffe_id: parse_id("by_spiffe_id", &f.by_spiffe_id)?,
        parent_id: parse_id("by_parent_id", &f.by_parent_id)?,
        selectors,
        hint: (!f.by_hint.is_empty()).then_some(f.by_hint),
    })
}

fn agent_to_pb(a: &AttestedAgent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        x509_svid_serial: a.serial.clone(),
        x509_svid_expires_at: a.expires_at,
        banned: a.banned,
        selectors: selectors_to_pb(&a.selectors),
        can_reattest: a.can_reattest,
    }
}

fn parse_agent_id(v: &str) -> Result<SpiffeId, Status> {
    SpiffeId::parse(v)
        .map_err(|e| Status::invalid_argument(format!("spiffe_id: invalid SPIFFE ID {v:?}: {e}")))
}

impl Admin {
    fn validate_batch(&self, entries: &[pb::Entry]) -> Result<Vec<sigil_datastore::Entry>, Status> {
        let td = self.state.trust_domain();
        let server_id = self.state.server_id();
        let mut parents = BatchParents {
            state: &self.state,
            batch: HashSet::new(),
        };
        // Entries in a batch may name each other as parents, whatever their order.
        for e in entries {
            if let Ok(id) = SpiffeId::parse(&e.spiffe_id) {
                parents.batch.insert(id);
            }
        }
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let prefix = if entries.len() == 1 {
                "entry".to_string()
            } else {
                format!("entries[{i}]")
            };
            if !e.id.is_empty() {
                validate::entry_id("id", &e.id).map_err(|err| err.within(&prefix))?;
            }
            let mut v = validate::entry(e, &td, &server_id, &parents)
                .map_err(|err: FieldError| err.within(&prefix))?;
            v.revision = 0;
            v.created_at = 0;
            out.push(v);
        }
        Ok(out)
    }

    async fn create(&self, entries: Vec<pb::Entry>) -> Result<Vec<pb::Entry>, Status> {
        if entries.is_empty() {
            return Err(Status::invalid_argument("entries: the batch is empty"));
        }
        validate::batch_len("entries", entries.len())?;
        let valid = self.validate_batch(&entries)?;
        let state = self.state.clone();
        let created = blocking(move || state.ds.create_entries(valid).map_err(ds_status)).await?;
        let out = created.iter().map(validate::entry_to_pb).collect();
        for e in created {
            self.state.catalog.upsert(e);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl pb::entries_server::Entries for Admin {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry: missing"))?;
        let mut out = self.create(vec![e]).await?;
        Ok(Response::new(pb::CreateEntryResponse { entry: out.pop() }))
    }

    async fn batch_create_entry(
        &self,
        req: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchCreateEntryResponse>, Status> {
        let entries = self.create(req.into_inner().entries).await?;
        Ok(Response::new(pb::BatchCreateEntryResponse { entries }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let req = req.into_inner();
        let filter = parse_filter(&self.state, req.filter)?;
        if req.page_size < 0 {
            return Err(Status::invalid_argument(format!(
                "page_size: invalid value {}",
                req.page_size
            )));
        }
        let state = self.state.clone();
        let (entries, next) = blocking(move || {
            let token = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
            state
                .ds
                .list_entries(&filter, req.page_size as usize, token)
                .map_err(ds_status)
        })
        .await?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(validate::entry_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::GetEntryResponse>, Status> {
        let id = req.into_inner().id;
        let state = self.state.clone();
        let got =
            blocking(move || state.ds.get_entry(&id).map_err(ds_status).map(|e| (id, e))).await?;
        match got {
            (_, Some(e)) => Ok(Response::new(pb::GetEntryResponse {
                entry: Some(validate::entry_to_pb(&e)),
            })),
            (id, None) => Err(Status::not_found(format!("id: no entry {id:?}"))),
        }
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::UpdateEntryResponse>, Status> {
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry: missing"))?;
        if e.id.is_empty() {
            return Err(Status::invalid_argument("entry.id: missing"));
        }
        let mut valid = self.validate_batch(std::slice::from_ref(&e))?;
        let mut v = valid
            .pop()
            .ok_or_else(|| Status::internal("validation lost the entry"))?;
        let expected = (e.revision_number != 0).then_some(e.revision_number);
        let state = self.state.clone();
        let updated = blocking(move || {
            let current = state
                .ds
                .get_entry(&v.id)
                .map_err(ds_status)?
                .ok_or_else(|| Status::not_found(format!("entry.id: no entry {:?}", v.id)))?;
            v.created_at = current.created_at;
            state.ds.update_entry(v, expected).map_err(ds_status)
        })
        .await?;
        let out = validate::entry_to_pb(&updated);
        self.state.catalog.upsert(updated);
        Ok(Response::new(pb::UpdateEntryResponse { entry: Some(out) }))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let id = req.into_inner().id;
        let state = self.state.clone();
        let deleted = blocking(move || state.ds.delete_entry(&id).map_err(ds_status)).await?;
        self.state.catalog.remove(&deleted.id);
        Ok(Response::new(pb::DeleteEntryResponse {
            entry: Some(validate::entry_to_pb(&deleted)),
        }))
    }

    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        let filter = parse_filter(&self.state, req.into_inner().filter)?;
        let state = self.state.clone();
        let count = blocking(move || state.ds.count_entries(&filter).map_err(ds_status)).await?;
        Ok(Response::new(pb::CountEntriesResponse {
            count: count as i64,
        }))
    }
}

#[tonic::async_trait]
impl pb::agents_server::Agents for Admin {
    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = req.into_inner();
        let filter = AgentFilter {
            attestation_type: (!req.by_attestation_type.is_empty())
                .then_some(req.by_attestation_type),
            banned: req.by_banned,
        };
        let state = self.state.clone();
        let agents = blocking(move || state.ds.list_agents(&filter).map_err(ds_status)).await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_pb).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let id = parse_agent_id(&req.into_inner().spiffe_id)?;
        let state = self.state.clone();
        let got =
            blocking(move || state.ds.get_agent(&id).map_err(ds_status).map(|a| (id, a))).await?;
        match got {
            (_, Some(a)) => Ok(Response::new(pb::GetAgentResponse {
                agent: Some(agent_to_pb(&a)),
            })),
            (id, None) => Err(Status::not_found(format!("spiffe_id: no agent {id}"))),
        }
    }

    async fn evict_agent(
        &self,
        req: Request<pb::EvictAgentRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let id = parse_agent_id(&req.into_inner().spiffe_id)?;
        let state = self.state.clone();
        let id2 = id.clone();
        blocking(move || state.ds.delete_agent(&id2).map_err(ds_status)).await?;
        tracing::info!(agent = %id, "agent evicted");
        self.state.catalog.publish(Change::AgentRevoked(
            id,
            crate::catalog::Revocation::Evicted,
        ));
        Ok(Response::new(pb::EvictAgentResponse {}))
    }

    async fn ban_agent(
        &self,
        req: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::BanAgentResponse>, Status> {
        let id = parse_agent_id(&req.into_inner().spiffe_id)?;
        let state = self.state.clone();
        let id2 = id.clone();
        blocking(move || state.ds.set_agent_banned(&id2, true).map_err(ds_status)).await?;
        tracing::info!(agent = %id, "agent banned");
        self.state
            .catalog
            .publish(Change::AgentRevoked(id, crate::catalog::Revocation::Banned));
        Ok(Response::new(pb::BanAgentResponse {}))
    }
}

fn parse_td(field: &str, v: &str) -> Result<TrustDomain, Status> {
    TrustDomain::parse(v)
        .map_err(|e| Status::invalid_argument(format!("{field}: invalid trust domain {v:?}: {e}")))
}

#[tonic::async_trait]
impl pb::bundles_server::Bundles for Admin {
    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        Ok(Response::new(pb::GetBundleResponse {
            bundle: Some(bundle_to_pb(&self.state.own_bundle())),
        }))
    }

    async fn list_federated_bundles(
        &self,
        _req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        let state = self.state.clone();
        let bundles = blocking(move || state.federated_bundles().map_err(internal)).await?;
        Ok(Response::new(pb::ListFederatedBundlesResponse {
            bundles: bundles.iter().map(bundle_to_pb).collect(),
        }))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::SetFederatedBundleResponse>, Status> {
        let req = req.into_inner();
        let td = parse_td("trust_domain", &req.trust_domain)?;
        if td == self.state.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "trust_domain: {td} is this server's own trust domain, not a federated one"
            )));
        }
        let bundle = match (
            req.spiffe_bundle_json.is_empty(),
            req.x509_authorities_pem.is_empty(),
        ) {
            (false, true) => Bundle::from_json(td.clone(), req.spiffe_bundle_json.as_bytes())
                .map_err(|e| {
                    Status::invalid_argument(format!("spiffe_bundle_json: invalid bundle: {e}"))
                })?,
            (true, false) => {
                Bundle::from_x509_pem(td.clone(), &req.x509_authorities_pem).map_err(|e| {
                    Status::invalid_argument(format!("x509_authorities_pem: invalid PEM: {e}"))
                })?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "spiffe_bundle_json / x509_authorities_pem: give exactly one",
                ));
            }
        };
        if bundle.x509_authorities.is_empty() && bundle.jwt_authorities.is_empty() {
            return Err(Status::invalid_argument(format!(
                "bundle of {td}: holds no authority"
            )));
        }
        let state = self.state.clone();
        let b2 = bundle.clone();
        blocking(move || {
            state
                .ds
                .set_bundle(&StoredBundle {
                    trust_domain: b2.trust_domain.clone(),
                    json: b2.to_json(),
                    sequence: b2.sequence,
                })
                .map_err(ds_status)?;
            state.refresh_bundles().map_err(internal)
        })
        .await?;
        Ok(Response::new(pb::SetFederatedBundleResponse {
            bundle: Some(bundle_to_pb(&bundle)),
        }))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::DeleteFederatedBundleResponse>, Status> {
        let td = parse_td("trust_domain", &req.into_inner().trust_domain)?;
        if td == self.state.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "trust_domain: {td} is this server's own trust domain; it cannot be deleted"
            )));
        }
        let state = self.state.clone();
        blocking(move || {
            state.ds.delete_bundle(&td).map_err(ds_status)?;
            state.forget_previous_domain(&td).map_err(internal)?;
            state.refresh_bundles().map_err(internal)
        })
        .await?;
        Ok(Response::new(pb::DeleteFederatedBundleResponse {}))
    }
}

/// Default join token lifetime, as in SPIRE.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);

#[tonic::async_trait]
impl pb::join_tokens_server::JoinTokens for Admin {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let req = req.into_inner();
        let ttl = match req.ttl {
            0 => DEFAULT_TOKEN_TTL,
            n if n > 0 => Duration::from_secs(n as u64),
            n => {
                return Err(Status::invalid_argument(format!(
                    "ttl: invalid TTL {n}: must be greater than 0"
                )));
            }
        };
        let td = self.state.trust_domain();
        let node_id = if req.spiffe_id.is_empty() {
            None
        } else {
            let id = validate::spiffe_id_in("spiffe_id", &req.spiffe_id, &td)?;
            if id.is_trust_domain_id() || id.path().starts_with("/sigil/") {
                return Err(Status::invalid_argument(format!(
                    "spiffe_id: {id} needs a path outside the reserved /sigil/"
                )));
            }
            Some(id)
        };
        let token = uuid::Uuid::new_v4().to_string();
        let expires_at = self.state.now() + ttl.as_secs() as i64;
        let agent_id = td
            .id_with_path(&format!("/sigil/agent/join_token/{token}"))
            .map_err(internal)?;
        let state = self.state.clone();
        let jt = JoinToken {
            token: token.clone(),
            expires_at,
        };
        let created = blocking(move || {
            state.ds.create_join_token(&jt).map_err(ds_status)?;
            match node_id {
                Some(id) => {
                    // SPIRE's node alias for a token: selected by the agent's own ID.
                    let alias = sigil_datastore::Selector::new("spiffe_id", agent_id.as_str())
                        .map_err(|e| Status::internal(e.to_string()))?;
                    let e = sigil_datastore::Entry::new(id, agent_id, vec![alias]);
                    state.ds.create_entries(vec![e]).map_err(ds_status)
                }
                None => Ok(vec![]),
            }
        })
        .await?;
        for e in created {
            self.state.catalog.upsert(e);
        }
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            expires_at,
        }))
    }
}

fn ttl_opt(field: &str, v: i32) -> Result<Option<Duration>, Status> {
    match v {
        0 => Ok(None),
        n if n > 0 => Ok(Some(Duration::from_secs(n as u64))),
        n => Err(Status::invalid_argument(format!(
            "{field}: invalid TTL {n}: must be greater than 0"
        ))),
    }
}

#[tonic::async_trait]
impl pb::svids_server::Svids for Admin {
    async fn mint_x509svid(
        &self,
        req: Request<pb::MintX509svidRequest>,
    ) -> Result<Response<pb::MintX509svidResponse>, Status> {
        let req = req.into_inner();
        let ttl = ttl_opt("ttl", req.ttl)?;
        let id = sigil_ca::csr_spiffe_id(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let td = self.state.trust_domain();
        validate::spiffe_id_in("csr.uri_san", id.as_str(), &td)?;
        validate::not_reserved("csr.uri_san", &id)?;
        if id.is_trust_domain_id() {
            return Err(Status::invalid_argument(format!(
                "csr.uri_san: {id} has no path; an X.509-SVID's SPIFFE ID needs one"
            )));
        }
        let dns = csr_dns_names(&req.csr);
        for (i, d) in dns.iter().enumerate() {
            validate::dns_name(&format!("csr.dns_names[{i}]"), d)?;
        }
        let state = self.state.clone();
        let svid = blocking(move || {
            state
                .ca
                .load()
                .sign_csr(&req.csr, &id, &dns, ttl)
                .map_err(|e| Status::invalid_argument(format!("csr: {e}")))
        })
        .await?;
        let bundle = self.state.own_bundle();
        Ok(Response::new(pb::MintX509svidResponse {
            cert_chain: svid.cert_chain.iter().map(|c| c.to_vec()).collect(),
            expires_at: unix(svid.expires_at),
            bundle: bundle.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        }))
    }

    async fn mint_jwtsvid(
        &self,
        req: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<pb::MintJwtsvidResponse>, Status> {
        let req = req.into_inner();
        let td = self.state.trust_domain();
        let id = validate::spiffe_id_in("spiffe_id", &req.spiffe_id, &td)?;
        validate::not_reserved("spiffe_id", &id)?;
        if id.is_trust_domain_id() {
            return Err(Status::invalid_argument(format!(
                "spiffe_id: {id} has no path; a JWT-SVID's SPIFFE ID needs one"
            )));
        }
        if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument(
                "audience: at least one non-empty audience is required",
            ));
        }
        let ttl = ttl_opt("ttl", req.ttl)?;
        let jwt = self
            .state
            .ca
            .load()
            .mint_jwt_svid(&id, &req.audience, ttl)
            .map_err(internal)?;
        Ok(Response::new(pb::MintJwtsvidResponse {
            token: jwt.token,
            expires_at: unix(jwt.expires_at),
        }))
    }
}

fn csr_dns_names(csr: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, req)) = X509CertificationRequest::from_der(csr) else {
        return vec![];
    };
    let mut out = Vec::new();
    if let Some(exts) = req.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    if let GeneralName::DNSName(d) = n {
                        out.push(d.to_string());
                    }
                }
            }
        }
    }
    out
}

#[tonic::async_trait]
impl pb::trust_domain_server::TrustDomain for Admin {
    async fn migrate_trust_domain(
        &self,
        req: Request<pb::MigrateTrustDomainRequest>,
    ) -> Result<Response<pb::MigrateTrustDomainResponse>, Status> {
        let to = parse_td("to", &req.into_inner().to)?;
        let state = self.state.clone();
        let (from, count) = blocking(move || {
            crate::migrate::migrate(&state, &to)
                .map(|(f, c)| (f, c, to))
                .map_err(Status::from)
        })
        .await
        .map(|(f, c, to)| ((f, to), c))?;
        Ok(Response::new(pb::MigrateTrustDomainResponse {
            from: from.0.to_string(),
            to: from.1.to_string(),
            entries_migrated: count as i64,
        }))
    }
}

/// Current time helper for modules that only have `State`.
pub fn now(state: &State) -> i64 {
    unix(state.clock.now())
}
