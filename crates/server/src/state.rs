//! The server's shared state: datastore, CA, entry catalog, trust bundles and its own SVID.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_ca::{Ca, CaConfig, Clock, JournalStore};
use sigil_datastore::{DataStore, EntryFilter, SqliteStore, StoredBundle};
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::{SpiffeId, TrustDomain};
use sigil_tls::{RotatingCert, SharedBundles};

use crate::catalog::{Catalog, Change};
use crate::config::ServerConfig;
use crate::error::StateError;

/// Datastore meta key holding the trust domain the data belongs to.
pub const META_TRUST_DOMAIN: &str = "trust_domain";
/// Datastore meta key holding the trust domain a migration moved away from.
pub const META_MIGRATED_FROM: &str = "migrated_from";

/// Saves the CA journal of one trust domain in the datastore.
pub struct DatastoreJournal {
    ds: Arc<dyn DataStore>,
    td: TrustDomain,
}

impl JournalStore for DatastoreJournal {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        self.ds.load_ca_journal(&self.td).map_err(|e| e.to_string())
    }

    fn save(&self, data: &[u8]) -> Result<(), String> {
        self.ds
            .save_ca_journal(&self.td, data)
            .map_err(|e| e.to_string())
    }
}

/// Everything the APIs share.
pub struct State {
    /// Validated configuration.
    pub config: ServerConfig,
    /// The datastore.
    pub ds: Arc<dyn DataStore>,
    /// The active trust domain's CA.
    pub ca: ArcSwap<Ca>,
    /// CA of the trust domain a migration moved away from, kept so its SVIDs keep validating.
    pub previous_ca: ArcSwap<Option<Arc<Ca>>>,
    /// Registration entries in memory.
    pub catalog: Catalog,
    /// Own and federated bundles, read by TLS verifiers.
    pub bundles: SharedBundles,
    /// The time source (injectable for tests).
    pub clock: Arc<dyn Clock>,
    /// The server's own TLS certificate (its X.509-SVID), replaced on renewal.
    pub server_cert: Arc<RotatingCert>,
    /// When the server's SVID should be renewed.
    pub server_svid_renew_at: std::sync::Mutex<SystemTime>,
    /// Roots trusted for x509pop node attestation.
    pub x509pop_roots: Option<Vec<CertificateDer<'static>>>,
    /// Counters of SVIDs and attestations.
    pub metrics: crate::metrics::ServerMetrics,
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn key_dir(data_dir: &Path, td: &TrustDomain) -> PathBuf {
    data_dir.join("keys").join(td.as_str())
}

/// Opens the CA of `td` with the configured parameters.
pub fn open_ca(
    config: &ServerConfig,
    ds: &Arc<dyn DataStore>,
    td: &TrustDomain,
    clock: &Arc<dyn Clock>,
) -> Result<Ca, StateError> {
    let journal = Arc::new(DatastoreJournal {
        ds: ds.clone(),
        td: td.clone(),
    });
    let ca = Ca::open(
        CaConfig {
            trust_domain: td.clone(),
            key_type: config.ca_key_type,
            ca_ttl: config.ca_ttl,
            default_x509_svid_ttl: config.x509_svid_ttl,
            default_jwt_svid_ttl: config.jwt_svid_ttl,
            key_dir: key_dir(&config.data_dir, td),
            upstream: config.upstream.clone(),
        },
        clock.clone(),
        journal,
    )
    .map_err(|source| StateError::OpenCa {
        trust_domain: td.clone(),
        source,
    })?;
    Ok(ca)
}

fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StateError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|source| StateError::ReadX509popBundle {
            path: path.to_path_buf(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| StateError::X509popBundlePem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(StateError::EmptyX509popBundle {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl State {
    /// Opens the data directory, the datastore and the CA, and mints the server's SVID.
    pub fn open(config: ServerConfig, clock: Arc<dyn Clock>) -> Result<Arc<State>, StateError> {
        sigil_daemon::own_dir(&config.data_dir, 0o700).map_err(StateError::DataDir)?;
        let db = config.data_dir.join("datastore.sqlite3");
        let ds: Arc<dyn DataStore> =
            Arc::new(
                SqliteStore::open(&db).map_err(|source| StateError::OpenDatastore {
                    path: db.clone(),
                    source,
                })?,
            );
        let td = effective_trust_domain(&config, ds.as_ref())?;
        let ca = open_ca(&config, &ds, &td, &clock)?;
        ca.rotate().map_err(StateError::StartRotation)?;
        let previous_ca = match ds.get_meta(META_MIGRATED_FROM)?.filter(|s| !s.is_empty()) {
            Some(old) => {
                let old_td =
                    TrustDomain::parse(&old).map_err(|source| StateError::StoredTrustDomain {
                        key: META_MIGRATED_FROM,
                        value: old.clone(),
                        source,
                    })?;
                Some(Arc::new(open_ca(&config, &ds, &old_td, &clock)?))
            }
            None => None,
        };
        let (entries, _) = ds.list_entries(&EntryFilter::default(), 0, None)?;
        let server_id = server_id(&td);
        let x509pop_roots = match &config.x509pop_ca_bundle {
            Some(p) => Some(load_pem_certs(p)?),
            None => None,
        };
        let (svid, key) = ca
            .mint_x509_svid_with_key(&server_id, &["localhost".to_string()], None)
            .map_err(StateError::MintServerSvid)?;
        let renew_at = sigil_spiffe::half_life(clock.now(), svid.expires_at);
        let certified = sigil_tls::certified_key(svid.cert_chain, &PrivateKeyDer::Pkcs8(key))?;
        let state = Arc::new(State {
            config,
            ds,
            ca: ArcSwap::from_pointee(ca),
            previous_ca: ArcSwap::from_pointee(previous_ca),
            catalog: Catalog::new(entries, server_id),
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::new())),
            clock,
            server_cert: Arc::new(RotatingCert::new(certified)),
            server_svid_renew_at: std::sync::Mutex::new(renew_at),
            x509pop_roots,
            metrics: Default::default(),
        });
        state.refresh_bundles()?;
        Ok(state)
    }

    /// The active trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        self.ca.load().trust_domain().clone()
    }

    /// The server's own SPIFFE ID (parent of node entries).
    pub fn server_id(&self) -> SpiffeId {
        server_id(&self.trust_domain())
    }

    /// Now, in Unix seconds, from the injected clock.
    pub fn now(&self) -> i64 {
        unix(self.clock.now())
    }

    /// The trust domain's own bundle (including the pre-migration domain's authorities when migrating).
    pub fn own_bundle(&self) -> Bundle {
        self.ca.load().bundle()
    }

    /// Federated bundles from the datastore.
    pub fn federated_bundles(&self) -> Result<Vec<Bundle>, StateError> {
        let own = self.trust_domain();
        let mut out = Vec::new();
        for sb in self.ds.list_bundles()? {
            if sb.trust_domain == own {
                continue;
            }
            let b = Bundle::from_json(sb.trust_domain.clone(), sb.json.as_bytes()).map_err(
                |source| StateError::StoredBundle {
                    trust_domain: sb.trust_domain.clone(),
                    source,
                },
            )?;
            out.push(b);
        }
        Ok(out)
    }

    /// Rebuilds the bundle set used by TLS, persists the own bundle, and tells agents.
    pub fn refresh_bundles(&self) -> Result<(), StateError> {
        let own = self.own_bundle();
        let mut set = BundleSet::new();
        for b in self.federated_bundles()? {
            set.insert(b);
        }
        self.ds.set_bundle(&StoredBundle {
            trust_domain: own.trust_domain.clone(),
            json: own.to_json(),
            sequence: own.sequence,
        })?;
        set.insert(own);
        self.bundles.store(Arc::new(set));
        self.catalog.publish(Change::BundlesChanged);
        Ok(())
    }

    /// Ends the transition after a migration: the old domain's CA is no longer kept.
    pub fn forget_previous_domain(&self, td: &TrustDomain) -> Result<(), StateError> {
        let is_prev = self
            .previous_ca
            .load()
            .as_ref()
            .as_ref()
            .is_some_and(|p| p.trust_domain() == td);
        if is_prev {
            self.previous_ca.store(Arc::new(None));
            self.ds.set_meta(META_MIGRATED_FROM, "")?;
        }
        Ok(())
    }

    /// One rotation tick: CA rotation and renewal of the server's own SVID.
    pub fn tick(&self) -> Result<(), StateError> {
        let outcome = self.ca.load().rotate()?;
        if let Some(prev) = self.previous_ca.load().as_ref()
            && prev.rotate()?.bundle_changed()
        {
            // The pre-migration domain is published as a federated bundle; keep it current.
            let b = prev.bundle();
            self.ds.set_bundle(&StoredBundle {
                trust_domain: b.trust_domain.clone(),
                json: b.to_json(),
                sequence: b.sequence,
            })?;
            self.refresh_bundles()?;
        }
        if outcome.bundle_changed() {
            tracing::info!(
                prepared = outcome.prepared,
                activated = outcome.activated,
                pruned = outcome.pruned,
                "CA rotation changed the trust bundle"
            );
            self.refresh_bundles()?;
        }
        let now = self.clock.now();
        let due = {
            let at = self
                .server_svid_renew_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            now >= *at || outcome.activated
        };
        if due {
            self.renew_server_svid()?;
        }
        Ok(())
    }

    /// Mints a fresh server SVID and serves it from now on.
    pub fn renew_server_svid(&self) -> Result<(), StateError> {
        let (svid, key) = self.ca.load().mint_x509_svid_with_key(
            &self.server_id(),
            &["localhost".to_string()],
            None,
        )?;
        let renew_at = sigil_spiffe::half_life(self.clock.now(), svid.expires_at);
        let certified = sigil_tls::certified_key(svid.cert_chain, &PrivateKeyDer::Pkcs8(key))?;
        self.server_cert.store(certified);
        *self
            .server_svid_renew_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = renew_at;
        tracing::info!(spiffe_id = %self.server_id(), "server X.509-SVID renewed");
        Ok(())
    }
}

/// `spiffe://<td>/sigil/server`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // The path is a constant valid path, so the fallback is unreachable.
    td.id_with_path("/sigil/server").unwrap_or_else(|_| td.id())
}

fn effective_trust_domain(
    config: &ServerConfig,
    ds: &dyn DataStore,
) -> Result<TrustDomain, StateError> {
    let configured = config.trust_domain.clone();
    match ds.get_meta(META_TRUST_DOMAIN)? {
        None => {
            ds.set_meta(META_TRUST_DOMAIN, configured.as_str())?;
            Ok(configured)
        }
        Some(stored) if stored == configured.as_str() => Ok(configured),
        Some(stored) => {
            let from = ds.get_meta(META_MIGRATED_FROM)?;
            if from.as_deref() == Some(configured.as_str()) {
                tracing::warn!(
                    configured = %configured,
                    active = %stored,
                    "the data directory was migrated to another trust domain; serving that one (update trust_domain in the configuration)"
                );
                TrustDomain::parse(&stored).map_err(|source| StateError::StoredTrustDomain {
                    key: META_TRUST_DOMAIN,
                    value: stored.clone(),
                    source,
                })
            } else {
                Err(StateError::TrustDomainMismatch {
                    configured: configured.as_str().to_string(),
                    data_dir: config.data_dir.clone(),
                    stored,
                })
            }
        }
    }
}
