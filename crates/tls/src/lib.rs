//! rustls configurations that authenticate peers by SPIFFE X.509-SVIDs against a live set of bundles.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::BundleSet;
use sigil_spiffe::x509::verify_x509_svid;

/// Shared, swappable trust bundles that verifiers read on every handshake.
pub type SharedBundles = Arc<ArcSwap<BundleSet>>;

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls rejected the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(rustls::Error),
}

/// Which peer SPIFFE IDs a verifier accepts.
#[derive(Clone)]
pub enum PeerPolicy {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID whose trust domain has a bundle (authorization happens later, per request).
    AnyInBundles,
    /// IDs for which the predicate returns true.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPolicy::Exact(id) => write!(f, "Exact({id})"),
            PeerPolicy::AnyInBundles => f.write_str("AnyInBundles"),
            PeerPolicy::Predicate(_) => f.write_str("Predicate"),
        }
    }
}

impl PeerPolicy {
    fn check(&self, id: &SpiffeId) -> Result<(), rustls::Error> {
        let ok = match self {
            PeerPolicy::Exact(want) => want == id,
            PeerPolicy::AnyInBundles => true,
            PeerPolicy::Predicate(f) => f(id),
        };
        if ok {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "peer SPIFFE ID {id} is not authorized ({self:?})"
            )))
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &SharedBundles,
    now: UnixTime,
    policy: &PeerPolicy,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let set = bundles.load();
    let id = verify_x509_svid(&chain, &set, now)
        .map_err(|e| rustls::Error::General(format!("peer X.509-SVID rejected: {e}")))?;
    policy.check(&id)?;
    Ok(id)
}

/// The handshake-signature methods both SVID verifiers share (TLS 1.3 only, with `self.algs`):
/// the server and client verifier traits declare them separately.
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Verifies a server's X.509-SVID against the bundles and the expected ID (the DNS name is ignored).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: SharedBundles,
    policy: PeerPolicy,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers whose SVID chains to `bundles` and satisfies `policy`.
    pub fn new(bundles: SharedBundles, policy: PeerPolicy) -> Self {
        Self {
            bundles,
            policy,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.bundles, now, &self.policy)?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!();
}

/// Accepts any server certificate, still checking TLS 1.3 handshake signatures: only for an
/// agent's explicitly requested insecure bootstrap (first contact without a trust bundle).
#[derive(Debug)]
pub struct InsecureBootstrapVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl InsecureBootstrapVerifier {
    /// The verifier.
    pub fn new() -> Self {
        Self { algs: algorithms() }
    }
}

impl Default for InsecureBootstrapVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!();
}

/// Verifies clients' X.509-SVIDs; optionally lets clients without a certificate through.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: SharedBundles,
    policy: PeerPolicy,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier for client SVIDs; with `mandatory` false, anonymous clients are admitted too.
    pub fn new(bundles: SharedBundles, policy: PeerPolicy, mandatory: bool) -> Self {
        Self {
            bundles,
            policy,
            mandatory,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(end_entity, intermediates, &self.bundles, now, &self.policy)?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!();
}

/// A TLS 1.3-only server configuration with ALPN h2, presenting `chain` and checking clients with `verifier`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A server configuration whose certificate can be replaced at run time (for SVID rotation).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS 1.3-only client configuration with ALPN h2; presents `client_cert` when given.
pub fn client_config(
    verifier: Arc<SpiffeServerVerifier>,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Builds a certified key (for a cert resolver) from a chain and a PKCS#8 key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let signing = provider().key_provider.load_private_key(key.clone_key())?;
    Ok(rustls::sign::CertifiedKey::new(chain, signing))
}

/// Serves one certificate that can be swapped when the SVID rotates.
#[derive(Debug)]
pub struct RotatingCert(ArcSwap<rustls::sign::CertifiedKey>);

impl RotatingCert {
    /// Starts with `key`.
    pub fn new(key: rustls::sign::CertifiedKey) -> Self {
        Self(ArcSwap::from_pointee(key))
    }

    /// Replaces the served certificate.
    pub fn store(&self, key: rustls::sign::CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl rustls::server::ResolvesServerCert for RotatingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The SPIFFE ID of a verified peer's leaf certificate, if it has one.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    certs
        .first()
        .and_then(|c| sigil_spiffe::x509::spiffe_id_of_leaf(c).ok())
}

// Not `#[from]`: the message already prints the wrapped error (see the errors convention).
impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Rustls(e)
    }
}
