//! The agent's background work: keeping its own SVID (attest, renew, re-attest), the entry stream from the
//! server, bundles, and minting/rotating workload SVIDs in batches of CSRs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use arc_swap::ArcSwapOption;
use rustls_pki_types::CertificateDer;
use sigil_proto::agent::v1 as pb;
use sigil_proto::agent::v1::node_client::NodeClient;
use sigil_spiffe::TrustDomain;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use tokio::sync::{Mutex, Notify};
use tonic::transport::Channel;

use crate::cache::{Cache, CachedSvid, entry_from_pb};
use crate::config::{AgentConfig, NodeAttestation};
use crate::node::{
    AgentIdentity, AttestRefused, Connector, Refusal, Store, identity_from_result, key_and_csr,
    refusal,
};

/// CSRs per BatchNewX509SVID call.
pub const MINT_BATCH: usize = 500;

/// The agent's connection to the server and its identity.
pub struct Manager {
    /// Configuration.
    pub config: AgentConfig,
    /// Caches shared with the APIs.
    pub cache: Arc<Cache>,
    /// Data directory.
    pub store: Store,
    /// Channel factory.
    pub connector: Connector,
    /// The agent's current SVID.
    pub identity: ArcSwapOption<AgentIdentity>,
    /// The current mTLS client, when connected.
    pub client: ArcSwapOption<NodeClient<Channel>>,
    /// Serializes (re-)attestation and renewal.
    attest_lock: Mutex<()>,
    /// Counts successful attestations, so that a task waiting to re-attest sees that another did.
    attestations: AtomicU64,
    /// Tells the sync loop to reconnect (after renewal).
    pub reconnect: Notify,
    /// Set when the agent must stop (banned, or evicted without a way to attest again).
    pub fatal: tokio::sync::watch::Sender<Option<String>>,
    /// SVID counters.
    pub metrics: crate::metrics::AgentMetrics,
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl Manager {
    /// Sets up the manager: loads a stored SVID or attests.
    pub async fn start(config: AgentConfig, cache: Arc<Cache>) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&config.data_dir)?;
        let bootstrap = crate::node::bootstrap_bundle(&config, &store)?;
        let insecure = bootstrap.is_none();
        if insecure {
            if !config.insecure_bootstrap {
                bail!(
                    "trust_bundle: missing; give --trust-bundle PATH (from `sigil bundle show`) or, insecurely, --insecure-bootstrap"
                );
            }
            tracing::warn!(
                "insecure bootstrap: the server is NOT authenticated at first contact (--insecure-bootstrap)"
            );
        }
        if let Some(certs) = &bootstrap {
            cache.set_bundles(crate::node::single_bundle(
                &config.trust_domain,
                certs.clone(),
            ));
        }
        let connector = Connector {
            addr: config.server_address.clone(),
            td: config.trust_domain.clone(),
            bundles: cache.bundles.clone(),
            insecure,
        };
        let m = Arc::new(Manager {
            config,
            cache,
            store,
            connector,
            identity: ArcSwapOption::empty(),
            client: ArcSwapOption::empty(),
            attest_lock: Mutex::new(()),
            attestations: AtomicU64::new(0),
            reconnect: Notify::new(),
            fatal: tokio::sync::watch::channel(None).0,
            metrics: Default::default(),
        });
        match m.store.load_identity()? {
            Some(id) if id.expires_at > now() => {
                tracing::info!(agent = %id.id, "using the stored agent SVID");
                m.identity.store(Some(Arc::new(id)));
            }
            Some(_) => {
                tracing::warn!("the stored agent SVID expired; attesting again");
                m.attest_fresh(true).await?;
            }
            None => m.attest_fresh(false).await?,
        }
        Ok(m)
    }

    /// Attests with the configured method and stores the result.
    async fn attest_fresh(&self, had_identity: bool) -> anyhow::Result<()> {
        let _g = self.attest_lock.lock().await;
        if had_identity && matches!(self.config.attestation, NodeAttestation::JoinToken(_)) {
            bail!(
                "the agent's identity is gone (evicted or expired) and its join token was already spent; generate a new token (`sigil token generate`) and start the agent with it and an empty data dir"
            );
        }
        let (id, bundle) = crate::node::attest(&self.connector, &self.config.attestation).await?;
        tracing::info!(agent = %id.id, expires = ?id.expires_at, "node attested");
        self.store.save_bundle(&bundle)?;
        self.store.save_identity(&id)?;
        let mut set = (**self.cache.bundles.load()).clone();
        let mut own = set
            .get(&self.config.trust_domain)
            .cloned()
            .unwrap_or_else(|| Bundle::new(self.config.trust_domain.clone()));
        own.x509_authorities = bundle;
        set.insert(own);
        self.cache.set_bundles(set);
        self.identity.store(Some(Arc::new(id)));
        self.attestations.fetch_add(1, Ordering::SeqCst);
        self.metrics.agent_svid("attestation");
        Ok(())
    }

    fn current(&self) -> anyhow::Result<Arc<AgentIdentity>> {
        self.identity.load_full().context("agent has no SVID")
    }

    /// Renews the agent SVID over mTLS.
    async fn renew(&self) -> anyhow::Result<()> {
        let _g = self.attest_lock.lock().await;
        let id = self.current()?;
        let mut client = self.connector.client(&id).await?;
        let (csr, key) = key_and_csr()?;
        let r = client
            .renew_agent(pb::RenewAgentRequest { csr })
            .await?
            .into_inner()
            .result
            .context("renewal without result")?;
        let new = identity_from_result(&r, key)?;
        self.store.save_identity(&new)?;
        tracing::info!(agent = %new.id, expires = ?new.expires_at, "agent SVID renewed");
        self.identity.store(Some(Arc::new(new)));
        self.metrics.agent_svid("renewal");
        self.reconnect.notify_one();
        Ok(())
    }

    /// Reacts to a refusal: banned stops the agent; evicted re-attests when it can.
    async fn handle_refusal(&self, r: Refusal) -> anyhow::Result<()> {
        match r {
            Refusal::Banned(m) => {
                let msg = format!("the server banned this agent: {m}");
                self.fatal.send_replace(Some(msg.clone()));
                bail!(msg)
            }
            Refusal::Evicted(m) => {
                tracing::warn!(reason = %m, "the server no longer knows this agent; attesting again");
                self.store.clear_identity();
                self.reattest().await
            }
        }
    }

    /// Attests again after an eviction, retrying with backoff (200 ms doubling to 5 s) through network
    /// errors and server restarts; gives up only when the server bans the agent or the method cannot
    /// be repeated (a spent join token).
    async fn reattest(&self) -> anyhow::Result<()> {
        let seen = self.attestations.load(Ordering::SeqCst);
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.attestations.load(Ordering::SeqCst) != seen {
                // Another task (sync or renewal) attested meanwhile.
                return Ok(());
            }
            let Err(e) = self.attest_fresh(true).await else {
                return Ok(());
            };
            let banned = e
                .downcast_ref::<AttestRefused>()
                .and_then(|r| refusal(&r.0))
                .is_some_and(|r| matches!(r, Refusal::Banned(_)));
            let repeatable = matches!(self.config.attestation, NodeAttestation::X509Pop { .. });
            if banned || !repeatable {
                let msg = format!("evicted and cannot attest again: {e:#}");
                self.fatal.send_replace(Some(msg.clone()));
                bail!(msg);
            }
            tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "attesting again after eviction failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn fetch_bundles(&self, client: &mut NodeClient<Channel>) -> Result<(), tonic::Status> {
        let resp = client
            .fetch_bundles(pb::FetchBundlesRequest {})
            .await?
            .into_inner();
        let mut set = BundleSet::new();
        for b in resp.bundles {
            let Ok(td) = TrustDomain::parse(&b.trust_domain) else {
                continue;
            };
            let parsed = Bundle::from_json(td.clone(), b.spiffe_bundle_json.as_bytes())
                .unwrap_or_else(|_| {
                    let mut x = Bundle::new(td.clone());
                    x.x509_authorities = b
                        .x509_authorities
                        .iter()
                        .map(|c| CertificateDer::from(c.clone()))
                        .collect();
                    x
                });
            if td == self.config.trust_domain {
                let _ = self.store.save_bundle(&parsed.x509_authorities);
            }
            set.insert(parsed);
        }
        if set.get(&self.config.trust_domain).is_some() {
            self.cache.set_bundles(set);
        }
        Ok(())
    }

    /// One connected session: bundles, then the entry stream until it ends.
    async fn session(&self) -> Result<(), tonic::Status> {
        let id = self
            .current()
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut client = self
            .connector
            .client(&id)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        self.fetch_bundles(&mut client).await?;
        let mut stream = client
            .sync_entries(pb::SyncEntriesRequest {})
            .await?
            .into_inner();
        self.client.store(Some(Arc::new(client.clone())));
        let mut snapshot = Vec::new();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = self.reconnect.notified() => return Ok(()),
            };
            let Some(msg) = msg else {
                return Err(tonic::Status::unavailable("entry stream ended"));
            };
            let entries: Vec<_> = msg.entries.iter().filter_map(entry_from_pb).collect();
            if msg.snapshot {
                snapshot.extend(entries);
                if msg.snapshot_complete {
                    let n = snapshot.len();
                    self.cache.replace_entries(std::mem::take(&mut snapshot));
                    tracing::info!(entries = n, "entry snapshot received");
                }
            } else if !entries.is_empty() || !msg.removed_entry_ids.is_empty() {
                self.cache.apply(entries, &msg.removed_entry_ids);
            }
            if msg.bundles_changed {
                self.fetch_bundles(&mut client).await?;
            }
        }
    }

    /// Keeps a session with the server, reconnecting with backoff; cached SVIDs keep flowing meanwhile.
    pub async fn run_sync(self: Arc<Self>) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let result = self.session().await;
            self.client.store(None);
            match result {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    continue;
                }
                Err(status) => {
                    if let Some(r) = refusal(&status) {
                        self.handle_refusal(r).await?;
                        backoff = Duration::from_millis(200);
                        continue;
                    }
                    tracing::warn!(error = %status.message(), code = ?status.code(), retry_in = ?backoff, "server session ended");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Renews the agent SVID at half life; retries while the server is unreachable.
    pub async fn run_renewal(self: Arc<Self>) -> anyhow::Result<()> {
        loop {
            let at = self.current()?.renew_at();
            let wait = at.duration_since(now()).unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            if let Err(e) = self.renew().await {
                if let Some(status) = e.downcast_ref::<tonic::Status>()
                    && let Some(r) = refusal(status)
                {
                    self.handle_refusal(r).await?;
                    continue;
                }
                tracing::warn!(error = %format!("{e:#}"), "agent SVID renewal failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Mints SVIDs the cache plans for, in batches, whenever woken or every second.
    pub async fn run_minter(self: Arc<Self>) -> anyhow::Result<()> {
        loop {
            let plan = self.cache.mint_plan(now());
            if !plan.is_empty()
                && let Some(client) = self.client.load_full()
            {
                let mut client = (*client).clone();
                for chunk in plan.chunks(MINT_BATCH) {
                    match self.mint(&mut client, chunk).await {
                        Ok(minted) => self.cache.store_svids(minted),
                        Err(s) => {
                            tracing::warn!(error = %s.message(), "SVID minting failed");
                            break;
                        }
                    }
                }
            }
            let next = self.next_wake();
            tokio::select! {
                _ = self.cache.mint_wanted.notified() => {},
                _ = tokio::time::sleep(next) => {},
            }
        }
    }

    /// Sleeps until the next SVID is due (at most 1 s, so new entries and reconnects are picked up).
    fn next_wake(&self) -> Duration {
        let max = Duration::from_secs(1);
        match self.cache.next_rotation() {
            Some(t) => t
                .duration_since(now())
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(5), max),
            None => max,
        }
    }

    async fn mint(
        &self,
        client: &mut NodeClient<Channel>,
        entries: &[Arc<sigil_registry::Entry>],
    ) -> Result<Vec<CachedSvid>, tonic::Status> {
        let mut keys = Vec::with_capacity(entries.len());
        let mut params = Vec::with_capacity(entries.len());
        for e in entries {
            let (csr, key) = key_and_csr().map_err(|e| tonic::Status::internal(e.to_string()))?;
            keys.push(key);
            params.push(pb::X509svidParams {
                entry_id: e.id.clone(),
                csr,
            });
        }
        let resp = client
            .batch_new_x509svid(pb::BatchNewX509svidRequest { params })
            .await?
            .into_inner();
        let mut out = Vec::new();
        for ((r, key), e) in resp.results.into_iter().zip(keys).zip(entries) {
            if r.status_code != 0 {
                tracing::debug!(entry = %e.id, error = %r.status_message, "SVID not minted");
                continue;
            }
            let chain: Vec<CertificateDer<'static>> =
                r.cert_chain.into_iter().map(CertificateDer::from).collect();
            let Some(leaf) = chain.first() else { continue };
            let Ok((not_before, expires_at)) = crate::node::validity_of(leaf) else {
                continue;
            };
            // Certificates are backdated; half-life counts from when the SVID arrived.
            let issued_at = now().max(not_before).min(expires_at);
            out.push(CachedSvid {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.clone(),
                chain,
                key,
                issued_at,
                expires_at,
                revision: e.revision,
            });
        }
        self.metrics.x509_minted(out.len() as u64);
        Ok(out)
    }

    /// Fetches (or reuses) a JWT-SVID for an entry.
    pub async fn jwt_svid(
        &self,
        entry: &sigil_registry::Entry,
        audience: &[String],
    ) -> Result<crate::cache::CachedJwt, tonic::Status> {
        if let Some(j) = self.cache.jwt(&entry.id, audience, now()) {
            return Ok(j);
        }
        let client = self.client.load_full().ok_or_else(|| {
            tonic::Status::unavailable(
                "sigil-server is unreachable; JWT-SVIDs cannot be minted now",
            )
        })?;
        let mut client = (*client).clone();
        let r = client
            .new_jwtsvid(pb::NewJwtsvidRequest {
                entry_id: entry.id.clone(),
                audience: audience.to_vec(),
            })
            .await?
            .into_inner();
        self.metrics.jwt_minted();
        let jwt = crate::cache::CachedJwt {
            token: r.token,
            spiffe_id: entry.spiffe_id.clone(),
            issued_at: now(),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(r.expires_at.max(0) as u64),
        };
        self.cache.store_jwt(&entry.id, audience, jwt.clone());
        Ok(jwt)
    }
}
