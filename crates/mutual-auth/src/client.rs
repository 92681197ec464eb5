//! The client end: authenticates (local identity on this node, remote identity on a peer node).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use sigil_tls::{PeerPolicy, SpiffeServerVerifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{
    ALPN, AuthContext, AuthError, Authenticated, CONFIRM, HANDSHAKE_TIMEOUT, Pair, leaf_not_after,
    provider, server_name,
};

/// Authenticates `pair` with the node at `peer` (its mutual-auth listener): presents the SVID of
/// `pair.local`, requires the peer to present exactly `pair.remote`'s SPIFFE ID, and requires
/// the registry to place `pair.remote` on the peer node. Fails closed on anything else.
pub async fn authenticate(
    ctx: &dyn AuthContext,
    peer: SocketAddr,
    pair: Pair,
) -> Result<Authenticated, AuthError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, run(ctx, peer, pair)).await {
        Ok(r) => r,
        Err(_) => Err(AuthError::Timeout {
            addr: peer,
            after: HANDSHAKE_TIMEOUT,
        }),
    }
}

async fn run(
    ctx: &dyn AuthContext,
    peer: SocketAddr,
    pair: Pair,
) -> Result<Authenticated, AuthError> {
    let svid = ctx
        .local_svid(pair.local)
        .ok_or(AuthError::NotHostedLocally(pair.local))?;
    let expected = ctx
        .spiffe_id_of(pair.remote)
        .ok_or(AuthError::NoSpiffeId(pair.remote))?;
    if !ctx.node_hosts(peer.ip(), pair.remote) {
        return Err(AuthError::NodeDoesNotHost {
            node: peer.ip(),
            identity: pair.remote,
        });
    }
    let own_not_after = leaf_not_after(&svid.cert, "this node's SVID")?;
    let verifier = SpiffeServerVerifier::new(ctx.bundles(), PeerPolicy::Exact(expected.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AuthError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(svid)));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(server_name(pair.remote, pair.local))
        .map_err(|e| AuthError::Tls(e.to_string()))?;

    let tcp = TcpStream::connect(peer)
        .await
        .map_err(|source| AuthError::Connect { addr: peer, source })?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|source| AuthError::Handshake { addr: peer, source })?;
    // In TLS 1.3 the client is done before the server has checked its certificate: only the
    // server's confirmation says the server accepted this client as `pair.local`; the byte
    // after it says whether the server's node recorded the pair.
    let mut answer = [0u8; 2];
    let peer_recorded = match tls.read_exact(&mut answer).await {
        Ok(_) if answer[0] == CONFIRM && answer[1] <= 1 => answer[1] == 1,
        Ok(_) | Err(_) => return Err(AuthError::Refused { addr: peer }),
    };
    let (_, conn) = tls.get_ref();
    let peer_chain = conn.peer_certificates().unwrap_or_default();
    let peer_not_after = leaf_not_after(peer_chain, expected.as_str())?;
    let _ = tls.shutdown().await;
    Ok(Authenticated {
        pair,
        peer_node: peer.ip(),
        peer_id: expected,
        expires_unix: own_not_after.min(peer_not_after),
        peer_recorded,
    })
}
