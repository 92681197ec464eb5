//! netd's way to the server's admin entry API: its own X.509-SVID and trust bundle from this node's
//! agent's Workload API, then mTLS to sigil-server's TLS listener (which serves `Entries` to admin
//! workloads only).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_proto::admin::v1::entries_client::EntriesClient;
use sigil_proto::workload as wpb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use sigil_tls::{PeerPolicy, SpiffeServerVerifier};
use tonic::transport::{Channel, Endpoint};

/// How long a Workload API or server call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// netd's SVID as the agent gave it (the key only in memory).
pub struct OwnSvid {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
    /// When to fetch a fresh one: half-way through its remaining lifetime.
    pub refresh_at: SystemTime,
}

impl OwnSvid {
    /// The SVID as a TLS certificate and key (the key only in memory).
    pub fn certified_key(&self) -> anyhow::Result<rustls::sign::CertifiedKey> {
        sigil_tls::certified_key(
            self.chain.clone(),
            &PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
        .context("netd's SVID cannot be used as a TLS certificate")
    }

    /// The trust bundle the agent gave with the SVID, as the bundle of the SVID's trust domain.
    pub fn bundle_set(&self) -> BundleSet {
        let mut bundle = Bundle::new(self.id.trust_domain().clone());
        bundle.x509_authorities = self.bundle.clone();
        let mut set = BundleSet::new();
        set.insert(bundle);
        set
    }

    /// The leaf certificate (to tell a rotated SVID from the same one fetched again).
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }
}

/// Fetches netd's first X.509-SVID and its trust domain's bundle from the Workload API at `socket`
/// (checked as the CLI checks it: root's or ours, served by root or us).
pub async fn fetch_own_svid(socket: &Path) -> anyhow::Result<OwnSvid> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = sigil_daemon::connect_trusted(&path)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "agent_workload_socket: cannot reach the agent's Workload API at {}",
                socket.display()
            )
        })?;
    let mut client = SpiffeWorkloadApiClient::with_interceptor(
        channel,
        wpb::insert_security_header as fn(_) -> _,
    );
    let first = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut stream = client
            .fetch_x509svid(wpb::X509svidRequest {})
            .await?
            .into_inner();
        stream.message().await
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no SVID from the Workload API at {} in time",
            socket.display()
        )
    })?
    .map_err(|s| {
        anyhow::anyhow!(
            "the agent at {} gives netd no X.509-SVID ({}: {}): register an admin entry for netd",
            socket.display(),
            s.code(),
            s.message()
        )
    })?
    .ok_or_else(|| anyhow::anyhow!("the Workload API at {} closed its stream", socket.display()))?;
    let svid =
        first.svids.into_iter().next().ok_or_else(|| {
            anyhow::anyhow!("the Workload API at {} sent no SVID", socket.display())
        })?;
    let id = SpiffeId::parse(&svid.spiffe_id)
        .with_context(|| format!("the agent gave an invalid SPIFFE ID {:?}", svid.spiffe_id))?;
    let chain = split_der(&svid.x509_svid).context("the SVID's certificate chain")?;
    let bundle = split_der(&svid.bundle).context("the SVID's bundle")?;
    let not_after = chain
        .first()
        .and_then(|leaf| {
            use x509_parser::prelude::*;
            let (_, c) = X509Certificate::from_der(leaf).ok()?;
            u64::try_from(c.validity().not_after.timestamp()).ok()
        })
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
        .context("the SVID's leaf certificate cannot be parsed")?;
    let now = SystemTime::now();
    let left = not_after.duration_since(now).unwrap_or_default();
    Ok(OwnSvid {
        id,
        chain,
        key: PrivatePkcs8KeyDer::from(svid.x509_svid_key),
        bundle,
        refresh_at: now + left / 2,
    })
}

/// An `Entries` client over mTLS to `server_address`, presenting `svid`, accepting only the server's
/// SVID (`spiffe://<td>/sigil/server`) chaining to the bundle the agent gave.
pub async fn connect_entries(
    server_address: &str,
    td: &TrustDomain,
    svid: &OwnSvid,
) -> anyhow::Result<EntriesClient<Channel>> {
    let mut bundle = Bundle::new(td.clone());
    bundle.x509_authorities = svid.bundle.clone();
    let mut set = BundleSet::new();
    set.insert(bundle);
    let verifier = Arc::new(SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(set)),
        PeerPolicy::Exact(td.id_with_path("/sigil/server")?),
    ));
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_client_auth_cert(
        svid.chain.clone(),
        PrivateKeyDer::Pkcs8(svid.key.clone_key()),
    )
    .context("netd's SVID cannot be used as a TLS client certificate")?;
    let endpoint = Endpoint::from_shared(format!("http://{server_address}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = sigil_daemon::dial::tls_channel(endpoint, server_address, cfg)
        .await
        .with_context(|| {
            format!("server_address: cannot reach sigil-server at {server_address}")
        })?;
    Ok(EntriesClient::new(channel))
}

/// Splits concatenated DER certificates (the Workload API's form); at least one.
fn split_der(bytes: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let out: Vec<CertificateDer<'static>> = sigil_spiffe::der::split_certificates(bytes)?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    if out.is_empty() {
        bail!("no certificate");
    }
    Ok(out)
}
