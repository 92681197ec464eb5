//! The agent's side of the agent API: TLS channels to the server, node attestation, the agent SVID and
//! its storage (key 0600) in the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_proto::agent::v1 as pb;
use sigil_proto::agent::v1::node_client::NodeClient;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::{SpiffeId, TrustDomain};
use sigil_tls::{InsecureBootstrapVerifier, PeerPolicy, SpiffeServerVerifier};
use tonic::transport::{Channel, Endpoint};

use crate::config::{AgentConfig, NodeAttestation};

/// Largest gRPC message the agent accepts (entry snapshots are chunked far below this).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The agent's own X.509-SVID and key.
#[derive(Debug)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 key (never leaves the node).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Expiry of the leaf.
    pub expires_at: SystemTime,
    /// Start of validity of the leaf.
    pub issued_at: SystemTime,
}

impl AgentIdentity {
    /// When to renew: half-way through the SVID's life.
    pub fn renew_at(&self) -> SystemTime {
        sigil_spiffe::half_life(self.issued_at, self.expires_at)
    }
}

/// Why the server refused the agent, as far as the agent must react differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The agent was banned: stop.
    Banned(String),
    /// The agent is unknown to the server (evicted): attest again if possible.
    Evicted(String),
}

/// The server refused node attestation; the status is kept so that a ban can be told from an error
/// worth retrying.
#[derive(Debug)]
pub struct AttestRefused(pub tonic::Status);

impl std::fmt::Display for AttestRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node attestation refused: {} ({:?})",
            self.0.message(),
            self.0.code()
        )
    }
}

impl std::error::Error for AttestRefused {}

/// Classifies a server error by the machine-readable reason it carries (a `google.rpc.ErrorInfo` status
/// detail, see [`sigil_proto::agent_refusal`]); the message text is never consulted.
pub fn refusal(status: &tonic::Status) -> Option<Refusal> {
    use sigil_proto::agent_refusal::{Reason, reason};
    match reason(status)? {
        Reason::Banned => Some(Refusal::Banned(status.message().to_string())),
        Reason::Evicted => Some(Refusal::Evicted(status.message().to_string())),
    }
}

/// Makes an EC P-256 key pair and a CSR for it.
pub fn key_and_csr() -> anyhow::Result<(Vec<u8>, PrivatePkcs8KeyDer<'static>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((
        csr.der().to_vec(),
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))
}

/// Validity window (not before, not after) of a certificate.
pub fn validity_of(cert: &CertificateDer<'_>) -> anyhow::Result<(SystemTime, SystemTime)> {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(cert).context("invalid certificate")?;
    let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
    Ok((
        t(c.validity().not_before.timestamp()),
        t(c.validity().not_after.timestamp()),
    ))
}

/// Builds an identity from an attestation or renewal result.
pub fn identity_from_result(
    r: &pb::AttestAgentResult,
    key: PrivatePkcs8KeyDer<'static>,
) -> anyhow::Result<AgentIdentity> {
    let chain: Vec<CertificateDer<'static>> = r
        .svid_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let leaf = chain.first().context("server sent an empty SVID chain")?;
    let (not_before, expires_at) = validity_of(leaf)?;
    // Certificates are backdated; half-life counts from when the SVID arrived.
    let issued_at = SystemTime::now().max(not_before).min(expires_at);
    Ok(AgentIdentity {
        id: SpiffeId::parse(&r.spiffe_id).context("server sent an invalid agent SPIFFE ID")?,
        chain,
        key,
        expires_at,
        issued_at,
    })
}

/// Opens gRPC channels to the server over TLS 1.3.
#[derive(Clone)]
pub struct Connector {
    /// Server address.
    pub addr: String,
    /// Trust domain.
    pub td: TrustDomain,
    /// Bundles used to authenticate the server.
    pub bundles: Arc<ArcSwap<BundleSet>>,
    /// Whether the server is trusted without verification (bootstrap only).
    pub insecure: bool,
}

impl Connector {
    /// A channel; with `identity`, the agent SVID is presented (mTLS).
    pub async fn channel(&self, identity: Option<&AgentIdentity>) -> anyhow::Result<Channel> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
        // Insecure bootstrap covers only first contact: once the server's bundle is known (after the first
        // attestation), a later re-attestation authenticates the server like any other call.
        let bundle_known = self
            .bundles
            .load()
            .get(&self.td)
            .is_some_and(|b| !b.x509_authorities.is_empty());
        let cfg = if self.insecure && identity.is_none() && !bundle_known {
            let b = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(InsecureBootstrapVerifier::new()));
            b.with_no_client_auth()
        } else {
            let verifier = Arc::new(SpiffeServerVerifier::new(
                self.bundles.clone(),
                PeerPolicy::Exact(self.td.id_with_path("/sigil/server")?),
            ));
            let b = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            match identity {
                Some(id) => b.with_client_auth_cert(
                    id.chain.clone(),
                    PrivateKeyDer::Pkcs8(id.key.clone_key()),
                )?,
                None => b.with_no_client_auth(),
            }
        };
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = sigil_daemon::dial::tls_channel(endpoint, &self.addr, cfg)
            .await
            .with_context(|| format!("cannot reach sigil-server at {}", self.addr))?;
        Ok(channel)
    }

    /// A Node client with the agent SVID.
    pub async fn client(&self, identity: &AgentIdentity) -> anyhow::Result<NodeClient<Channel>> {
        Ok(NodeClient::new(self.channel(Some(identity)).await?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }
}

/// Files in the data directory.
pub struct Store {
    dir: PathBuf,
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `path` with `.new` appended: where a file is staged before it replaces `path`.
fn staged(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// PEM of a certificate list.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem("CERTIFICATE", c)).collect()
}

/// PEM of a PKCS#8 key.
pub fn key_pem(key: &PrivatePkcs8KeyDer<'_>) -> String {
    pem("PRIVATE KEY", key.secret_pkcs8_der())
}

impl Store {
    /// Opens (creating, 0700) the data directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        sigil_daemon::own_dir(dir, 0o700).context("data_dir")?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn svid_path(&self) -> PathBuf {
        self.dir.join("agent-svid.pem")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("agent-key.pem")
    }

    fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Saves the agent SVID (0644) and key (0600); the key is written first.
    ///
    /// The key and the SVID must change together: both are written beside the current pair as
    /// `.new` files first (the SVID last: its arrival is the commit point), then renamed into
    /// place. A process killed in between leaves staged files that the next load rolls forward
    /// (both staged) or drops (the SVID not staged yet), so a key never meets another SVID.
    pub fn save_identity(&self, id: &AgentIdentity) -> anyhow::Result<()> {
        write_private(
            &staged(&self.key_path()),
            key_pem(&id.key).as_bytes(),
            0o600,
        )?;
        write_private(
            &staged(&self.svid_path()),
            certs_pem(&id.chain).as_bytes(),
            0o644,
        )?;
        self.commit_staged()
    }

    /// Completes or drops an interrupted [`Store::save_identity`] (see there).
    fn commit_staged(&self) -> anyhow::Result<()> {
        let (key, svid) = (self.key_path(), self.svid_path());
        let (key_new, svid_new) = (staged(&key), staged(&svid));
        if svid_new.exists() {
            if key_new.exists() {
                std::fs::rename(&key_new, &key)
                    .with_context(|| format!("cannot write {}", key.display()))?;
            }
            std::fs::rename(&svid_new, &svid)
                .with_context(|| format!("cannot write {}", svid.display()))?;
        } else if key_new.exists() {
            std::fs::remove_file(&key_new)
                .with_context(|| format!("cannot remove {}", key_new.display()))?;
        }
        Ok(())
    }

    /// Loads a stored agent SVID and key, if both exist.
    pub fn load_identity(&self) -> anyhow::Result<Option<AgentIdentity>> {
        self.commit_staged()?;
        if !self.svid_path().exists() || !self.key_path().exists() {
            return Ok(None);
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(self.svid_path())?
            .collect::<Result<_, _>>()
            .with_context(|| format!("invalid PEM in {}", self.svid_path().display()))?;
        let key = PrivatePkcs8KeyDer::from_pem_file(self.key_path())
            .with_context(|| format!("invalid key in {}", self.key_path().display()))?;
        let leaf = chain
            .first()
            .with_context(|| format!("{} holds no certificate", self.svid_path().display()))?;
        let (issued_at, expires_at) = validity_of(leaf)?;
        let id = sigil_spiffe::x509::spiffe_id_of_leaf(leaf)
            .with_context(|| format!("{} is not an X.509-SVID", self.svid_path().display()))?;
        Ok(Some(AgentIdentity {
            id,
            chain,
            key,
            expires_at,
            issued_at,
        }))
    }

    /// Removes the stored identity (after eviction).
    pub fn clear_identity(&self) {
        for p in [self.svid_path(), self.key_path()] {
            let _ = std::fs::remove_file(staged(&p));
            let _ = std::fs::remove_file(p);
        }
    }

    /// Saves the trust domain's X.509 authorities.
    pub fn save_bundle(&self, certs: &[CertificateDer<'_>]) -> anyhow::Result<()> {
        write_private(&self.bundle_path(), certs_pem(certs).as_bytes(), 0o644)
    }

    /// Loads the stored X.509 authorities.
    pub fn load_bundle(&self) -> anyhow::Result<Option<Vec<CertificateDer<'static>>>> {
        if !self.bundle_path().exists() {
            return Ok(None);
        }
        let certs = CertificateDer::pem_file_iter(self.bundle_path())?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("invalid PEM in {}", self.bundle_path().display()))?;
        Ok(Some(certs))
    }
}

/// Loads the bootstrap bundle for first contact.
pub fn bootstrap_bundle(
    config: &AgentConfig,
    store: &Store,
) -> anyhow::Result<Option<Vec<CertificateDer<'static>>>> {
    if let Some(stored) = store.load_bundle()? {
        return Ok(Some(stored));
    }
    match &config.trust_bundle {
        Some(p) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p)
                .with_context(|| format!("trust_bundle: cannot read {}", p.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("trust_bundle: invalid PEM in {}", p.display()))?;
            if certs.is_empty() {
                bail!("trust_bundle: {} holds no certificate", p.display());
            }
            Ok(Some(certs))
        }
        None => Ok(None),
    }
}

/// A bundle set holding only `td`'s X.509 authorities.
pub fn single_bundle(td: &TrustDomain, certs: Vec<CertificateDer<'static>>) -> BundleSet {
    let mut b = Bundle::new(td.clone());
    b.x509_authorities = certs;
    let mut set = BundleSet::new();
    set.insert(b);
    set
}

/// Performs node attestation with the configured method.
pub async fn attest(
    connector: &Connector,
    attestation: &NodeAttestation,
) -> anyhow::Result<(AgentIdentity, Vec<CertificateDer<'static>>)> {
    let (csr, key) = key_and_csr()?;
    let mut client = NodeClient::new(connector.channel(None).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let params = match attestation {
        NodeAttestation::JoinToken(t) => pb::AttestParams {
            kind: Some(pb::attest_params::Kind::JoinToken(pb::JoinTokenParams {
                token: t.clone(),
            })),
            csr,
        },
        NodeAttestation::X509Pop { cert, .. } => {
            let chain: Vec<Vec<u8>> = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("x509pop_cert: cannot read {}", cert.display()))?
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<_, _>>()
                .with_context(|| format!("x509pop_cert: invalid PEM in {}", cert.display()))?;
            pb::AttestParams {
                kind: Some(pb::attest_params::Kind::X509pop(pb::X509PopParams {
                    cert_chain: chain,
                })),
                csr,
            }
        }
        NodeAttestation::None => bail!(
            "no node attestation configured (--join-token or --x509pop-cert/--x509pop-key) and no stored agent SVID"
        ),
    };
    tx.send(pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(params)),
    })
    .await
    .map_err(|_| anyhow::anyhow!("attestation stream closed"))?;
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = client
        .attest_agent(outbound)
        .await
        .map_err(AttestRefused)?
        .into_inner();
    loop {
        let msg = inbound
            .message()
            .await
            .map_err(AttestRefused)?
            .context("attestation ended without a result")?;
        match msg.step {
            Some(pb::attest_agent_response::Step::Challenge(nonce)) => {
                let NodeAttestation::X509Pop { key: key_path, .. } = attestation else {
                    bail!("server sent a challenge to a join-token attestation");
                };
                let sig = sign_challenge(key_path, &nonce)?;
                tx.send(pb::AttestAgentRequest {
                    step: Some(pb::attest_agent_request::Step::ChallengeResponse(sig)),
                })
                .await
                .map_err(|_| anyhow::anyhow!("attestation stream closed"))?;
            }
            Some(pb::attest_agent_response::Step::Result(r)) => {
                let bundle = r
                    .bundle
                    .iter()
                    .map(|c| CertificateDer::from(c.clone()))
                    .collect();
                return Ok((identity_from_result(&r, key)?, bundle));
            }
            None => bail!("empty attestation message"),
        }
    }
}

fn sign_challenge(key_path: &Path, nonce: &[u8]) -> anyhow::Result<Vec<u8>> {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("x509pop_key: cannot read {}", key_path.display()))?;
    let der = key.secret_der();
    let rng = SystemRandom::new();
    if let Ok(kp) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der) {
        return Ok(kp
            .sign(&rng, nonce)
            .map_err(|e| anyhow::anyhow!("x509pop: sign: {e}"))?
            .as_ref()
            .to_vec());
    }
    if let Ok(kp) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, der) {
        return Ok(kp
            .sign(&rng, nonce)
            .map_err(|e| anyhow::anyhow!("x509pop: sign: {e}"))?
            .as_ref()
            .to_vec());
    }
    let kp = RsaKeyPair::from_pkcs8(der)
        .or_else(|_| RsaKeyPair::from_der(der))
        .map_err(|e| {
            anyhow::anyhow!(
                "x509pop_key: unsupported key in {}: {e}",
                key_path.display()
            )
        })?;
    let mut sig = vec![0; kp.public_modulus_len()];
    kp.sign(&signature::RSA_PKCS1_SHA256, &rng, nonce, &mut sig)
        .map_err(|e| anyhow::anyhow!("x509pop: sign: {e}"))?;
    Ok(sig)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod staged_tests {
    use super::*;

    fn read(p: &Path) -> Option<String> {
        std::fs::read_to_string(p).ok()
    }

    /// Every point at which a save can be cut: the next load sees the old pair or the new pair,
    /// never a key of one with the SVID of the other.
    #[test]
    fn an_interrupted_save_is_rolled_forward_or_dropped_never_mixed() {
        // (staged key, staged SVID) present when the process died → the pair a load must see.
        let cases = [
            ((true, false), ("old", "old")),  // died before the SVID was staged
            ((true, true), ("new", "new")),   // died after staging, before any rename
            ((false, true), ("new", "new")),  // died after the key's rename
            ((false, false), ("old", "old")), // nothing staged
        ];
        for ((key_staged, svid_staged), (want_key, want_svid)) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = Store {
                dir: dir.path().to_path_buf(),
            };
            let (key, svid) = (store.key_path(), store.svid_path());
            std::fs::write(&svid, "old").unwrap();
            if key_staged || !svid_staged {
                std::fs::write(&key, "old").unwrap();
            } else {
                std::fs::write(&key, "new").unwrap();
            }
            if key_staged {
                std::fs::write(staged(&key), "new").unwrap();
            }
            if svid_staged {
                std::fs::write(staged(&svid), "new").unwrap();
            }
            store.commit_staged().unwrap();
            let case = (key_staged, svid_staged);
            assert_eq!(read(&key).as_deref(), Some(want_key), "{case:?}");
            assert_eq!(read(&svid).as_deref(), Some(want_svid), "{case:?}");
            assert!(
                !staged(&key).exists() && !staged(&svid).exists(),
                "{case:?}"
            );
        }
    }
}
