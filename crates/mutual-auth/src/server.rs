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
const REGISTRY_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// `f`'s answer once it has one, looking again until [`REGISTRY_WAIT`] has passed (only for
/// peers that are cluster nodes: [`AuthContext::is_node`] is checked at accept).
async fn soon<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + REGISTRY_WAIT;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
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
    // Only cluster nodes are answered (and only they may make the server wait, below).
    if !ctx.is_node(peer.ip()) {
        return Err(AuthError::NotANode(peer.ip()));
    }
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
    // A brand-new identity's labels may still be on their way through etcd.
    let client_id = soon(|| ctx.spiffe_id_of(remote))
        .await
        .ok_or(AuthError::NoSpiffeId(remote))?;
    // The client's node must host the identity it claims: an SVID alone is not enough (a stolen
    // or leftover SVID used from another node gets nothing). An entry still on its way through
    // the kvstore is waited for, briefly.
    if soon(|| ctx.node_hosts(peer.ip(), remote).then_some(()))
        .await
        .is_none()
    {
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
    let mut authenticated = Authenticated {
        pair,
        peer_node: peer.ip(),
        peer_id: client_id,
        expires_unix: own_not_after.min(peer_not_after),
        peer_recorded: false,
    };
    // Recorded here before the client hears of it, and the client told whether it was.
    if let Some(recorded) = ctx.record(&authenticated) {
        match tokio::time::timeout(RECORD_WAIT, recorded).await {
            Ok(Ok(done)) => authenticated.peer_recorded = done,
            Ok(Err(_)) => {}
            Err(_) => {
                tracing::warn!(%peer, "mutual auth: the node did not record the pair in {RECORD_WAIT:?}")
            }
        }
    }
    tls.write_all(&[CONFIRM, u8::from(authenticated.peer_recorded)])
        .await
        .map_err(|source| AuthError::Handshake { addr: peer, source })?;
    let _ = tls.shutdown().await;
    Ok(authenticated)
}
