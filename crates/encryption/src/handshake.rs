//! The node-pair handshake that keys a session: TLS 1.3 over TCP, each node presenting its node
//! SVID (its agent's X.509-SVID) and pinning the peer node's SPIFFE ID from the cluster's node
//! registry; then each sends its 4-byte session index, and both derive the session keys with the
//! TLS exporter (label [`EXPORTER_LABEL`], context = initiator index ‖ responder index).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sigil_spiffe::SpiffeId;
use sigil_tls::{PeerPolicy, SharedBundles, SpiffeClientVerifier, SpiffeServerVerifier};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::session::{KEY_MATERIAL_LEN, Receiver, Role, Sender, session};

/// The carrier's handshake port (beside the mutual-auth port 4250).
pub const DEFAULT_PORT: u16 = 4251;
/// The ALPN protocol both ends require.
pub const ALPN: &[u8] = b"sigil-carrier/1";
/// The exporter label (RFC 5705: unregistered labels begin with "EXPERIMENTAL").
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL sigil carrier v1";
/// A handshake that takes longer fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What a node presents: its node SVID, and the bundles peers' SVIDs must chain to.
#[derive(Clone)]
pub struct NodeCredentials {
    /// The node SVID (chain and key, in memory only).
    pub svid: Arc<rustls::sign::CertifiedKey>,
    /// Trust bundles.
    pub bundles: SharedBundles,
}

/// A keyed session with a peer node.
pub struct Established {
    /// Seals packets to the peer.
    pub sender: Sender,
    /// Opens packets from the peer.
    pub receiver: Receiver,
    /// This node's index for the session (peers address packets to it).
    pub local_index: u32,
    /// The peer node's proven SPIFFE ID.
    pub peer_id: SpiffeId,
    /// Unix seconds at which the session must be replaced: the earlier notAfter of the two SVIDs.
    pub expires_unix: i64,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// No node SPIFFE ID is registered for the peer's address.
    #[error("no cluster node is registered at {0}")]
    UnknownPeer(IpAddr),
    /// TLS failed (including the peer's SVID failing the pin).
    #[error("TLS with {addr}: {source}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The peer did not negotiate the carrier protocol.
    #[error("{0} did not negotiate {ALPN:?}")]
    Alpn(SocketAddr),
    /// Timed out.
    #[error("handshake with {0} timed out")]
    Timeout(SocketAddr),
    /// A certificate could not be read, or the configuration was refused.
    #[error("{0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn not_after(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Result<i64, HandshakeError> {
    let leaf = chain
        .first()
        .ok_or_else(|| HandshakeError::Config("no certificate".to_owned()))?;
    sigil_spiffe::x509::leaf_not_after(leaf).map_err(|e| HandshakeError::Config(e.to_string()))
}

/// What [`keys`] needs of either end's TLS stream.
trait Tls: AsyncRead + AsyncWrite + Unpin {
    fn alpn_and_chain(
        &self,
    ) -> (
        Option<Vec<u8>>,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    );
    fn export(&self, context: &[u8]) -> Result<[u8; KEY_MATERIAL_LEN], rustls::Error>;
}

macro_rules! tls_end {
    ($t:ty) => {
        impl Tls for $t {
            fn alpn_and_chain(
                &self,
            ) -> (
                Option<Vec<u8>>,
                Vec<rustls::pki_types::CertificateDer<'static>>,
            ) {
                let c = self.get_ref().1;
                (
                    c.alpn_protocol().map(<[u8]>::to_vec),
                    c.peer_certificates().unwrap_or_default().to_vec(),
                )
            }
            fn export(&self, context: &[u8]) -> Result<[u8; KEY_MATERIAL_LEN], rustls::Error> {
                self.get_ref().1.export_keying_material(
                    [0u8; KEY_MATERIAL_LEN],
                    EXPORTER_LABEL,
                    Some(context),
                )
            }
        }
    };
}
tls_end!(tokio_rustls::client::TlsStream<TcpStream>);
tls_end!(tokio_rustls::server::TlsStream<TcpStream>);

/// After TLS: checks ALPN, swaps session indices, exports the key material.
async fn keys(
    tls: &mut impl Tls,
    addr: SocketAddr,
    role: Role,
    local_index: u32,
) -> Result<(u32, [u8; KEY_MATERIAL_LEN], i64), HandshakeError> {
    let (alpn, peer_chain) = tls.alpn_and_chain();
    if alpn.as_deref() != Some(ALPN) {
        return Err(HandshakeError::Alpn(addr));
    }
    let io = |source| HandshakeError::Tls { addr, source };
    tls.write_all(&local_index.to_be_bytes())
        .await
        .map_err(io)?;
    tls.flush().await.map_err(io)?;
    let mut b = [0u8; 4];
    tls.read_exact(&mut b).await.map_err(io)?;
    let peer_index = u32::from_be_bytes(b);
    let (i, r) = match role {
        Role::Initiator => (local_index, peer_index),
        Role::Responder => (peer_index, local_index),
    };
    let mut context = [0u8; 8];
    context[..4].copy_from_slice(&i.to_be_bytes());
    context[4..].copy_from_slice(&r.to_be_bytes());
    let material = tls
        .export(&context)
        .map_err(|e| HandshakeError::Config(e.to_string()))?;
    Ok((peer_index, material, not_after(&peer_chain)?))
}

fn established(
    creds: &NodeCredentials,
    mut material: [u8; KEY_MATERIAL_LEN],
    role: Role,
    local_index: u32,
    peer_index: u32,
    peer_id: SpiffeId,
    peer_not_after: i64,
) -> Result<Established, HandshakeError> {
    let own = not_after(&creds.svid.cert)?;
    let (sender, receiver) = session(&mut material, role, peer_index);
    Ok(Established {
        sender,
        receiver,
        local_index,
        peer_id,
        expires_unix: own.min(peer_not_after),
    })
}

/// Connects to `peer` (its carrier handshake port) and keys a session, requiring the peer to
/// prove `expected` (its node SPIFFE ID from the registry).
pub async fn initiate(
    creds: &NodeCredentials,
    peer: SocketAddr,
    expected: &SpiffeId,
    local_index: u32,
) -> Result<Established, HandshakeError> {
    let run = async {
        let verifier =
            SpiffeServerVerifier::new(creds.bundles.clone(), PeerPolicy::Exact(expected.clone()));
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HandshakeError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                creds.svid.clone(),
            )));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        let tcp = TcpStream::connect(peer)
            .await
            .map_err(|source| HandshakeError::Tls { addr: peer, source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("carrier.sigil")
            .map_err(|e| HandshakeError::Config(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|source| HandshakeError::Tls { addr: peer, source })?;
        let mut tls = tls;
        let (peer_index, material, peer_not_after) =
            keys(&mut tls, peer, Role::Initiator, local_index).await?;
        established(
            creds,
            material,
            Role::Initiator,
            local_index,
            peer_index,
            expected.clone(),
            peer_not_after,
        )
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or(Err(HandshakeError::Timeout(peer)))
}

/// Answers one initiator on an accepted connection: the peer must prove the node SPIFFE ID that
/// `expected_for` gives for its address (the registry), else the handshake fails.
pub async fn respond(
    creds: &NodeCredentials,
    tcp: TcpStream,
    expected_for: impl Fn(IpAddr) -> Option<SpiffeId>,
    local_index: u32,
) -> Result<Established, HandshakeError> {
    let peer = tcp
        .peer_addr()
        .map_err(|e| HandshakeError::Config(format!("peer address: {e}")))?;
    let expected = expected_for(peer.ip()).ok_or(HandshakeError::UnknownPeer(peer.ip()))?;
    let run = async {
        let verifier = SpiffeClientVerifier::new(
            creds.bundles.clone(),
            PeerPolicy::Exact(expected.clone()),
            true,
        );
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HandshakeError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                creds.svid.clone(),
            )));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.send_tls13_tickets = 0;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
            .accept(tcp)
            .await
            .map_err(|source| HandshakeError::Tls { addr: peer, source })?;
        let mut tls = tls;
        let (peer_index, material, peer_not_after) =
            keys(&mut tls, peer, Role::Responder, local_index).await?;
        established(
            creds,
            material,
            Role::Responder,
            local_index,
            peer_index,
            expected.clone(),
            peer_not_after,
        )
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or(Err(HandshakeError::Timeout(peer)))
}
