//! The server end: answers peers' authentication requests on the mutual-auth port.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::Acceptor;
use sigil_tls::{PeerPolicy, SpiffeClientVerifier};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::LazyConfigAcceptor;

use crate::{
    ALPN, AuthContext, AuthError, Authenticated, CONFIRM, HANDSHAKE_TIMEOUT, Pair, RECORD_WAIT,
    REGISTRY_WAIT, leaf_not_after, parse_server_name, provider,
};

/// How often the registry is looked at again while [`REGISTRY_WAIT`] runs.
const REGISTRY_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// Whether the registry places `identity` on `node`, waiting up to [`REGISTRY_WAIT`] for it.
async fn hosts_soon(
    ctx: &dyn AuthContext,
    node: std::net::IpAddr,
    identity: sigil_identity::NumericIdentity,
) -> bool {
    let deadline = tokio::time::Instant::now() + REGISTRY_WAIT;
    loop {
        if ctx.node_hosts(node, identity) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(REGISTRY_POLL).await;
    }
}

/// Handshakes served at once; connections beyond are closed at accept (a peer opening
/// connections without finishing them cannot starve the others for longer than
/// [`HANDSHAKE_TIMEOUT`]).
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Serves authentication requests on `listener` until it fails; every pair this node
/// authenticated as the server is sent to `done` (the netd side records it too).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<dyn AuthContext>,
    done: mpsc::UnboundedSender<Authenticated>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "mutual auth: too many handshakes in progress; connection closed");
            continue;
        };
        let (ctx, done) = (ctx.clone(), done.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer(&*ctx, tcp, peer)).await {
                Ok(Ok(a)) => {
                    tracing::debug!(%peer, local = %a.pair.local, remote = %a.pair.remote, "mutual auth: pair authenticated (server)");
                    let _ = done.send(a);
                }
                Ok(Err(e)) => tracing::warn!(%peer, "mutual auth refused: {e}"),
                Err(_) => {
                    tracing::warn!(%peer, "mutual auth: handshake timed out after {HANDSHAKE_TIMEOUT:?}")
                }
            }
        });
    }
}

async fn answer(
    ctx: &dyn AuthContext,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Authenticated, AuthError> {
    let _ = tcp.set_nodelay(true);
    let start = LazyConfigAcceptor::new(Acceptor::default(), tcp)
        .await
        .map_err(|source| AuthError::Handshake { addr: peer, source })?;
    let name = start
        .client_hello()
        .server_name()
        .unwrap_or_default()
        .to_owned();
    let (local, remote) = parse_server_name(&name)?;
    let pair = Pair { local, remote };
    let svid = ctx
        .local_svid(local)
        .ok_or(AuthError::NotHostedLocally(local))?;
    let client_id = ctx
        .spiffe_id_of(remote)
        .ok_or(AuthError::NoSpiffeId(remote))?;
    // The client's node must host the identity it claims: an SVID alone is not enough (a stolen
    // or leftover SVID used from another node gets nothing). An entry still on its way through
    // the kvstore is waited for, briefly.
    if !hosts_soon(ctx, peer.ip(), remote).await {
        return Err(AuthError::NodeDoesNotHost {
            node: peer.ip(),
            identity: remote,
        });
    }
    let own_not_after = leaf_not_after(&svid.cert, "this node's SVID")?;
    let verifier =
        SpiffeClientVerifier::new(ctx.bundles(), PeerPolicy::Exact(client_id.clone()), true);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AuthError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(svid)));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.send_tls13_tickets = 0;
    let mut tls = start
        .into_stream(Arc::new(cfg))
        .await
        .map_err(|source| AuthError::Handshake { addr: peer, source })?;
    let (_, conn) = tls.get_ref();
    let peer_chain = conn.peer_certificates().unwrap_or_default();
    let peer_not_after = leaf_not_after(peer_chain, client_id.as_str())?;
    // The registry may have changed during the handshake: check again before confirming.
    if !ctx.node_hosts(peer.ip(), remote) || ctx.local_svid(local).is_none() {
        return Err(AuthError::NodeDoesNotHost {
            node: peer.ip(),
            identity: remote,
        });
    }
    let authenticated = Authenticated {
        pair,
        peer_node: peer.ip(),
        peer_id: client_id,
        expires_unix: own_not_after.min(peer_not_after),
    };
    // Recorded here before the client hears of it: its success means both ends hold the pair.
    if let Some(recorded) = ctx.record(&authenticated)
        && tokio::time::timeout(RECORD_WAIT, recorded).await.is_err()
    {
        tracing::warn!(%peer, "mutual auth: the node did not record the pair in {RECORD_WAIT:?}; confirming anyway");
    }
    tls.write_all(&[CONFIRM])
        .await
        .map_err(|source| AuthError::Handshake { addr: peer, source })?;
    let _ = tls.shutdown().await;
    Ok(authenticated)
}
