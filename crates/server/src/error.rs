//! The server's domain errors: what state, migration and validation fail with, free of gRPC;
//! `grpc.rs` maps them to statuses.

use std::path::PathBuf;

use sigil_ca::CaError;
use sigil_daemon::DirError;
use sigil_datastore::DataStoreError;
use sigil_spiffe::bundle::BundleError;
use sigil_spiffe::{SpiffeIdError, TrustDomain};
use sigil_tls::TlsError;

/// A failure of the server's state: opening it, rotating, refreshing bundles.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The data directory cannot be created or is not private.
    #[error("data_dir")]
    DataDir(#[source] DirError),
    /// The datastore file cannot be opened.
    #[error("cannot open the datastore {}", path.display())]
    OpenDatastore {
        /// The datastore file.
        path: PathBuf,
        /// Why.
        #[source]
        source: DataStoreError,
    },
    /// A datastore read or write failed.
    #[error(transparent)]
    DataStore(#[from] DataStoreError),
    /// A trust domain stored in the datastore's meta table does not parse.
    #[error("datastore meta {key}: invalid {value:?}")]
    StoredTrustDomain {
        /// The meta key.
        key: &'static str,
        /// The stored value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: SpiffeIdError,
    },
    /// The configured trust domain is not the one the data directory belongs to.
    #[error(
        "trust_domain: configured {configured:?} but the data directory {} belongs to {stored:?}; use `sigil trust-domain migrate --to` to move a trust domain",
        data_dir.display()
    )]
    TrustDomainMismatch {
        /// The configured trust domain.
        configured: String,
        /// The data directory.
        data_dir: PathBuf,
        /// The trust domain stored in it.
        stored: String,
    },
    /// A trust domain's CA cannot be opened.
    #[error("cannot open the CA of trust domain {trust_domain}")]
    OpenCa {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// Why.
        #[source]
        source: CaError,
    },
    /// The rotation tick at start-up failed.
    #[error("CA rotation at start")]
    StartRotation(#[source] CaError),
    /// The server's own X.509-SVID cannot be minted at start-up.
    #[error("cannot mint the server's X.509-SVID")]
    MintServerSvid(#[source] CaError),
    /// A CA operation failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The x509pop CA bundle cannot be read.
    #[error("x509pop_ca_bundle: cannot read {}", path.display())]
    ReadX509popBundle {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The x509pop CA bundle is not valid PEM.
    #[error("x509pop_ca_bundle: invalid PEM in {}", path.display())]
    X509popBundlePem {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The x509pop CA bundle holds no certificate.
    #[error("x509pop_ca_bundle: {} holds no certificate", path.display())]
    EmptyX509popBundle {
        /// The bundle file.
        path: PathBuf,
    },
    /// A federated bundle in the datastore does not parse.
    #[error("stored bundle of {trust_domain} is invalid")]
    StoredBundle {
        /// Its trust domain.
        trust_domain: TrustDomain,
        /// Why.
        #[source]
        source: BundleError,
    },
    /// The server's certificate cannot be made a TLS key.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A failed trust-domain migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The target is the current trust domain.
    #[error("to: {to} is already the server's trust domain")]
    AlreadyCurrent {
        /// The requested trust domain.
        to: TrustDomain,
    },
    /// The new domain's CA failed its first rotation.
    #[error(transparent)]
    Rotation(CaError),
    /// A datastore write of the migration failed.
    #[error(transparent)]
    DataStore(#[from] DataStoreError),
    /// Opening the new CA, refreshing bundles or renewing the server's SVID failed.
    #[error(transparent)]
    State(#[from] StateError),
}
