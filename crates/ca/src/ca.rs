//! The CA itself: opens or creates its authorities, signs SVIDs with the active one, rotates on
//! the clock as SPIRE does, and publishes the bundle of every authority still in use.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use sigil_spiffe::bundle::Bundle;
use sigil_spiffe::{SpiffeId, TrustDomain};

use crate::authority::Authority;
use crate::config::{CaConfig, Clock};
use crate::csr;
use crate::error::CaError;
use crate::journal::{AuthorityState, JOURNAL_VERSION, JournalDoc, JournalStore};
use crate::keyfile;
use crate::profile::{self, BACKDATE_SECS};
use crate::upstream::Upstream;

/// An X.509-SVID: the leaf and the certificates a peer needs to chain it to the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    /// The ID in the leaf's URI SAN.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then sigil's CA and upstream intermediates when there is an upstream; never the root.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, lowercase hex.
    pub serial_hex: String,
    /// The leaf's notAfter.
    pub expires_at: SystemTime,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The compact JWS.
    pub token: String,
    /// The `exp` claim.
    pub expires_at: SystemTime,
}

/// What one rotation tick changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationOutcome {
    /// A new authority was created (and published in the bundle).
    pub prepared: bool,
    /// A different authority now signs.
    pub activated: bool,
    /// How many retired authorities left the bundle.
    pub pruned: usize,
}

impl RotationOutcome {
    /// True when the bundle's content changed, so it must be pushed to agents and federated peers.
    pub fn bundle_changed(&self) -> bool {
        self.prepared || self.pruned > 0
    }
}

/// Public facts about one authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityStatus {
    /// The CA certificate's serial number, lowercase hex.
    pub serial_hex: String,
    /// The CA certificate's notBefore.
    pub not_before: SystemTime,
    /// The CA certificate's notAfter.
    pub not_after: SystemTime,
    /// The `kid` of the authority's JWT key.
    pub jwt_key_id: String,
}

/// The authorities the CA holds, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaStatus {
    /// The authority that signs now.
    pub active: AuthorityStatus,
    /// The next authority, published but not yet signing.
    pub prepared: Option<AuthorityStatus>,
    /// Retired authorities kept in the bundle until their SVIDs expire, oldest first.
    pub old: Vec<AuthorityStatus>,
}

#[derive(Clone)]
struct State {
    active: Arc<Authority>,
    prepared: Option<Arc<Authority>>,
    old: Vec<Arc<Authority>>,
    sequence: u64,
}

impl State {
    /// Kept authorities, oldest first.
    fn all(&self) -> impl Iterator<Item = &Arc<Authority>> {
        self.old
            .iter()
            .chain(std::iter::once(&self.active))
            .chain(self.prepared.iter())
    }

    fn journal(&self, td: &TrustDomain) -> JournalDoc {
        let mut authorities: Vec<_> = self
            .old
            .iter()
            .map(|a| a.to_journal(AuthorityState::Old))
            .collect();
        authorities.push(self.active.to_journal(AuthorityState::Active));
        if let Some(p) = &self.prepared {
            authorities.push(p.to_journal(AuthorityState::Prepared));
        }
        JournalDoc {
            version: JOURNAL_VERSION,
            trust_domain: td.as_str().to_string(),
            bundle_sequence: self.sequence,
            authorities,
        }
    }
}

/// sigil's certificate authority; cheap to share behind an `Arc`, all methods take `&self`.
pub struct Ca {
    config: CaConfig,
    clock: Arc<dyn Clock>,
    journal: Arc<dyn JournalStore>,
    upstream: Option<Upstream>,
    state: RwLock<State>,
    /// Serializes rotation and journal writes so every save starts from the latest state.
    writer: Mutex<()>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.config.trust_domain)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn ttl_secs(ttl: Duration, what: &'static str) -> Result<u64, CaError> {
    if ttl.is_zero() {
        return Err(CaError::ZeroTtl { what, ttl });
    }
    // Certificates count whole seconds; round up so a sub-second TTL is not zero.
    Ok(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
}

impl Ca {
    /// Opens the CA: loads the authorities named in the journal (same certificates, same keys), or
    /// creates a first one, then runs one rotation tick so a long downtime is caught up at once.
    pub fn open(
        config: CaConfig,
        clock: Arc<dyn Clock>,
        journal: Arc<dyn JournalStore>,
    ) -> Result<Ca, CaError> {
        config.validate()?;
        keyfile::ensure_dir(&config.key_dir)?;
        let now = profile::unix_secs(clock.now())?;
        let upstream = config
            .upstream
            .as_ref()
            .map(|u| Upstream::load(u, now))
            .transpose()?;
        let saved = journal
            .load()
            .map_err(|reason| CaError::JournalLoad { reason })?;
        let (state, fresh) = match saved {
            Some(bytes) => (load_state(&bytes, &config)?, false),
            None => {
                let first = Authority::create(
                    &config.trust_domain,
                    config.key_type,
                    config.ca_ttl.as_secs(),
                    now,
                    &config.key_dir,
                    upstream.as_ref(),
                )?;
                let state = State {
                    active: Arc::new(first),
                    prepared: None,
                    old: Vec::new(),
                    sequence: 1,
                };
                (state, true)
            }
        };
        let ca = Ca {
            config,
            clock,
            journal,
            upstream,
            state: RwLock::new(state),
            writer: Mutex::new(()),
        };
        if fresh {
            let state = ca.snapshot();
            if let Err(e) = ca.save(&state) {
                remove_keys(&ca.config.key_dir, &state.active);
                return Err(e);
            }
        }
        ca.rotate()?;
        Ok(ca)
    }

    /// The trust domain the CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// Signs an X.509-SVID for `spiffe_id` over the public key of a CSR whose signature verifies.
    /// Nothing else is taken from the CSR. `ttl` defaults to the config's and is capped at the CA's notAfter.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<X509Svid, CaError> {
        self.check_workload_id(spiffe_id)?;
        let public_key = csr::public_key(csr_der)?;
        self.sign_leaf(spiffe_id, dns_names, ttl, &public_key)
    }

    /// Issues an X.509-SVID over a fresh EC P-256 key and returns the key too (for the server's own SVID).
    pub fn mint_x509_svid_with_key(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<(X509Svid, PrivatePkcs8KeyDer<'static>), CaError> {
        self.check_workload_id(spiffe_id)?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::KeyGeneration {
                what: "X.509-SVID EC P-256".to_string(),
                reason: e.to_string(),
            })?;
        let svid = self.sign_leaf(spiffe_id, dns_names, ttl, &key)?;
        Ok((svid, PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// Signs a JWT-SVID (ES256, `kid` of the active JWT key) with claims sub, aud, exp, iat.
    /// `ttl` defaults to the config's and is capped at the active authority's notAfter.
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<JwtSvid, CaError> {
        self.check_workload_id(spiffe_id)?;
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(CaError::BadAudience {
                audience: audience.to_vec(),
            });
        }
        let ttl = ttl_secs(ttl.unwrap_or(self.config.default_jwt_svid_ttl), "JWT-SVID")?;
        let now = profile::unix_secs(self.clock.now())?;

        #[derive(Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            aud: &'a [String],
            exp: u64,
            iat: u64,
        }
        self.with_active(now, |authority| {
            let exp = now.saturating_add(ttl).min(authority.not_after);
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(authority.jwt.kid.clone());
            let claims = Claims {
                sub: spiffe_id.as_str(),
                aud: audience,
                exp,
                iat: now,
            };
            let token =
                jsonwebtoken::encode(&header, &claims, &authority.jwt.encoding).map_err(|e| {
                    CaError::Jwt {
                        id: spiffe_id.clone(),
                        reason: e.to_string(),
                    }
                })?;
            let svid = JwtSvid {
                token,
                expires_at: profile::system_time(exp),
            };
            Ok((svid, exp))
        })
    }

    /// The trust bundle: every kept authority's root (the self-signed CA, or the upstream root)
    /// and JWT key; its sequence increases whenever that content changes.
    pub fn bundle(&self) -> Bundle {
        let state = self.snapshot();
        let mut bundle = Bundle::new(self.config.trust_domain.clone());
        for authority in state.all() {
            let root = authority.root();
            if !bundle.x509_authorities.contains(root) {
                bundle.x509_authorities.push(root.clone());
            }
            bundle.jwt_authorities.push(authority.jwt.authority());
        }
        bundle.sequence = state.sequence;
        bundle
    }

    /// One rotation tick (SPIRE's schedule), safe to call as often as wanted:
    /// at half the active authority's life a next one is prepared and published; at five sixths it
    /// becomes active; a retired one leaves the bundle once every SVID it signed has expired.
    /// An expired active authority, or one that does not chain to the configured upstream, is
    /// replaced at once. Changes are in the journal before this returns.
    pub fn rotate(&self) -> Result<RotationOutcome, CaError> {
        let _writer = self.lock_writer();
        let now = profile::unix_secs(self.clock.now())?;
        let mut next = self.snapshot();
        let mut outcome = RotationOutcome::default();
        let mut created: Vec<Arc<Authority>> = Vec::new();
        let discard_created = |created: &[Arc<Authority>]| {
            for authority in created {
                remove_keys(&self.config.key_dir, authority);
            }
        };
        // Key generation happens here, outside the state lock.
        if let Err(e) = self.schedule(&mut next, now, &mut outcome, &mut created) {
            discard_created(&created);
            return Err(e);
        }
        let pruned = {
            // Signers hold the read lock from choosing an authority until its SVID's expiry is
            // recorded, so under the write lock every expiry of an issued SVID is visible.
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let pruned = prune(&mut next, now);
            outcome.pruned = pruned.len();
            if outcome.prepared || outcome.activated || outcome.pruned > 0 {
                if outcome.bundle_changed() {
                    next.sequence += 1;
                }
                if let Err(e) = self.save(&next) {
                    drop(state);
                    discard_created(&created);
                    return Err(e);
                }
            }
            *state = next;
            pruned
        };
        for authority in &pruned {
            remove_keys(&self.config.key_dir, authority);
            tracing::info!(serial = %authority.serial_hex, jwt_key_id = %authority.jwt.kid, "pruned retired CA authority");
        }
        if outcome.activated {
            let active = self.snapshot().active;
            tracing::info!(serial = %active.serial_hex, not_after = active.not_after, "activated CA authority");
        }
        Ok(outcome)
    }

    /// The authorities by role.
    pub fn status(&self) -> CaStatus {
        let state = self.snapshot();
        CaStatus {
            active: state.active.status(),
            prepared: state.prepared.as_ref().map(|p| p.status()),
            old: state.old.iter().map(|o| o.status()).collect(),
        }
    }

    /// Applies the preparation and activation schedule to `next`.
    fn schedule(
        &self,
        next: &mut State,
        now: u64,
        outcome: &mut RotationOutcome,
        created: &mut Vec<Arc<Authority>>,
    ) -> Result<(), CaError> {
        if let Some(prepared) = next.prepared.take() {
            if self.usable(&prepared, now) {
                next.prepared = Some(prepared);
            } else {
                tracing::warn!(serial = %prepared.serial_hex, "discarding prepared CA authority: expired or not under the configured upstream");
                next.old.push(prepared);
            }
        }
        if !self.usable(&next.active, now) {
            tracing::warn!(serial = %next.active.serial_hex, "replacing active CA authority: expired or not under the configured upstream");
            let replacement = match next.prepared.take() {
                Some(prepared) => prepared,
                None => {
                    let fresh = Arc::new(self.create_authority(now)?);
                    created.push(fresh.clone());
                    outcome.prepared = true;
                    fresh
                }
            };
            let retired = std::mem::replace(&mut next.active, replacement);
            next.old.push(retired);
            outcome.activated = true;
        }

        let active = next.active.clone();
        let life = active.not_after.saturating_sub(active.not_before);
        if next.prepared.is_none() && now >= active.not_before + life / 2 {
            let fresh = Arc::new(self.create_authority(now)?);
            created.push(fresh.clone());
            next.prepared = Some(fresh);
            outcome.prepared = true;
        }
        if now >= active.not_before + life * 5 / 6
            && let Some(prepared) = next.prepared.take()
        {
            let retired = std::mem::replace(&mut next.active, prepared);
            next.old.push(retired);
            outcome.activated = true;
        }

        Ok(())
    }

    /// True when `authority` can sign now: unexpired and issued under the configured upstream
    /// (or self-signed when there is none).
    fn usable(&self, authority: &Authority, now: u64) -> bool {
        if now >= authority.not_after {
            return false;
        }
        match &self.upstream {
            None => authority.upstream_chain.is_empty(),
            Some(up) => !authority.upstream_chain.is_empty() && up.issued(&authority.cert),
        }
    }

    fn create_authority(&self, now: u64) -> Result<Authority, CaError> {
        Authority::create(
            &self.config.trust_domain,
            self.config.key_type,
            self.config.ca_ttl.as_secs(),
            now,
            &self.config.key_dir,
            self.upstream.as_ref(),
        )
    }

    fn check_workload_id(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain_name() != self.config.trust_domain.as_str() {
            return Err(CaError::ForeignSpiffeId {
                id: id.clone(),
                trust_domain: self.config.trust_domain.clone(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(CaError::SpiffeIdWithoutPath { id: id.clone() });
        }
        Ok(())
    }

    /// Runs `sign` with the active authority (refusing one that has expired) and records the
    /// expiry it returns. The read lock is held throughout, so rotation cannot prune the authority
    /// between its choice and the record.
    fn with_active<T>(
        &self,
        now: u64,
        sign: impl FnOnce(&Arc<Authority>) -> Result<(T, u64), CaError>,
    ) -> Result<T, CaError> {
        let (value, authority, expiry, persist) = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let active = &state.active;
            if now >= active.not_after {
                return Err(CaError::CaExpired {
                    serial_hex: active.serial_hex.clone(),
                    not_after: active.not_after,
                });
            }
            let (value, expiry) = sign(active)?;
            let persist = active.record_expiry(expiry);
            (value, active.clone(), expiry, persist)
        };
        if persist {
            self.persist_expiry(&authority, expiry)?;
        }
        Ok(value)
    }

    fn sign_leaf(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
        public_key: &impl PublicKeyData,
    ) -> Result<X509Svid, CaError> {
        let ttl = ttl_secs(
            ttl.unwrap_or(self.config.default_x509_svid_ttl),
            "X.509-SVID",
        )?;
        let now = profile::unix_secs(self.clock.now())?;
        self.with_active(now, |authority| {
            let not_before = now.saturating_sub(BACKDATE_SECS).max(authority.not_before);
            let not_after = now.saturating_add(ttl).min(authority.not_after);
            let serial = profile::random_serial();
            let params =
                profile::leaf_params(spiffe_id, dns_names, &serial, not_before, not_after)?;
            let leaf = params
                .signed_by(public_key, &authority.issuer)
                .map_err(|e| CaError::Issue {
                    what: format!("X.509-SVID for {spiffe_id}"),
                    reason: e.to_string(),
                })?;
            let mut cert_chain = vec![CertificateDer::from(leaf)];
            cert_chain.extend(authority.chain_above_leaf());
            let svid = X509Svid {
                spiffe_id: spiffe_id.clone(),
                cert_chain,
                serial_hex: hex::encode(serial),
                expires_at: profile::system_time(not_after),
            };
            Ok((svid, not_after))
        })
    }

    /// Writes a new SVID expiry bound to the journal. The bound runs one default TTL ahead of the
    /// SVID, so the journal is rewritten about once per TTL rather than once per SVID.
    fn persist_expiry(&self, authority: &Arc<Authority>, expiry: u64) -> Result<(), CaError> {
        let _writer = self.lock_writer();
        let previous = authority.persisted_expiry();
        if expiry <= previous {
            return Ok(());
        }
        let ahead = self
            .config
            .default_x509_svid_ttl
            .max(self.config.default_jwt_svid_ttl)
            .as_secs();
        authority.set_persisted_expiry(
            expiry
                .saturating_add(ahead)
                .min(authority.not_after)
                .max(expiry),
        );
        let state = self.snapshot();
        if let Err(e) = self.save(&state) {
            authority.set_persisted_expiry(previous);
            return Err(e);
        }
        Ok(())
    }

    fn save(&self, state: &State) -> Result<(), CaError> {
        let doc = state.journal(&self.config.trust_domain);
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| CaError::JournalSave {
            reason: e.to_string(),
        })?;
        self.journal
            .save(&bytes)
            .map_err(|reason| CaError::JournalSave { reason })
    }

    fn snapshot(&self) -> State {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops retired authorities whose SVIDs have all expired (or that signed none); returns them.
fn prune(state: &mut State, now: u64) -> Vec<Arc<Authority>> {
    let mut pruned = Vec::new();
    state.old.retain(|old| {
        let latest = old.latest_expiry();
        let keep = latest != 0 && now < latest;
        if !keep {
            pruned.push(old.clone());
        }
        keep
    });
    pruned
}

fn remove_keys(dir: &std::path::Path, authority: &Authority) {
    keyfile::remove_key(dir, &authority.key_file);
    keyfile::remove_key(dir, &authority.jwt.file);
}

/// Rebuilds the state from a saved journal, checking that it belongs to this trust domain.
fn load_state(bytes: &[u8], config: &CaConfig) -> Result<State, CaError> {
    let doc: JournalDoc = serde_json::from_slice(bytes).map_err(|e| CaError::JournalCorrupt {
        reason: e.to_string(),
    })?;
    if doc.version != JOURNAL_VERSION {
        return Err(CaError::JournalCorrupt {
            reason: format!(
                "version {} is not supported (expected {JOURNAL_VERSION})",
                doc.version
            ),
        });
    }
    if doc.trust_domain != config.trust_domain.as_str() {
        return Err(CaError::TrustDomainMismatch {
            journal: doc.trust_domain,
            configured: config.trust_domain.clone(),
        });
    }
    let mut active = None;
    let mut prepared = None;
    let mut old = Vec::new();
    for entry in &doc.authorities {
        let authority = Arc::new(Authority::from_journal(
            entry,
            &config.trust_domain,
            &config.key_dir,
        )?);
        let slot = match entry.state {
            AuthorityState::Old => {
                old.push(authority);
                continue;
            }
            AuthorityState::Active => &mut active,
            AuthorityState::Prepared => &mut prepared,
        };
        if slot.replace(authority).is_some() {
            return Err(CaError::JournalCorrupt {
                reason: format!("more than one {:?} authority", entry.state).to_lowercase(),
            });
        }
    }
    let active = active.ok_or_else(|| CaError::JournalCorrupt {
        reason: "no active authority".to_string(),
    })?;
    Ok(State {
        active,
        prepared,
        old,
        sequence: doc.bundle_sequence,
    })
}
