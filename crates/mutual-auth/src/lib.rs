//! The node-to-node mutual authentication handshake of sigil-netd (issue 12).
//!
//! A policy rule with `authentication: {mode: required}` makes the datapath drop traffic of an
//! identity pair until netd has authenticated the pair. Authenticating a pair (local identity
//! `L` on this node, remote identity `R` on node `N`) is one TLS 1.3 handshake between this node
//! and `N` on TCP [`DEFAULT_PORT`] (Cilium's 4250) in which:
//!
//! - the client presents the X.509-SVID of `L`, the server that of `R` — each node can only
//!   present SVIDs of identities it hosts, because it only ever holds those (issue 10's per-node
//!   entries);
//! - **both** ends pin the peer's SPIFFE ID: the client requires exactly `R`'s SPIFFE ID, and the
//!   server requires exactly `L`'s (Cilium's server side accepts any identity of the trust
//!   domain). The client names the pair in the TLS server name ([`server_name`]) so the server can
//!   choose its certificate and its pin before the handshake goes on;
//! - both ends check the cluster's node registry: the server refuses a client whose node (its TCP
//!   source address) does not host `L`, the client refuses to ask a node that does not host `R`;
//! - the server confirms with one byte after its checks, then says in a second whether its node
//!   recorded the pair ([`AuthContext::record`]; [`Authenticated::peer_recorded`] at the client);
//!   a client that reads anything else, or nothing, fails closed;
//! - the server answers only cluster nodes ([`AuthContext::is_node`], checked at accept, before
//!   anything is read); for them, a registry that has not yet heard of the client's identity or
//!   endpoint (a pair that appeared a moment ago, its entries still on their way through etcd)
//!   is waited for, up to [`REGISTRY_WAIT`], before the server refuses;
//! - the authentication ends at the earlier of the two certificates' notAfter.
//!
//! What the datapath does with the result (the auth map) is netd's business; this crate only
//! answers "is this pair authenticated between these two nodes, and until when".
#![forbid(unsafe_code)]

mod client;
mod server;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sigil_identity::NumericIdentity;
use sigil_spiffe::SpiffeId;
use sigil_tls::SharedBundles;

pub use client::authenticate;
pub use server::{MAX_CONCURRENT_HANDSHAKES, serve};

/// Cilium's mutual-authentication port.
pub const DEFAULT_PORT: u16 = 4250;
/// The ALPN protocol both ends offer.
pub const ALPN: &[u8] = b"sigil-mutual-auth/1";
/// A handshake (connect, TLS, confirmation) that takes longer fails.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for its registry to place the client's identity on the client's
/// node before it refuses (the entry of a just-created endpoint may still be on its way).
pub const REGISTRY_WAIT: Duration = Duration::from_secs(2);
/// How long the server waits for its node to record a pair before it confirms anyway.
pub const RECORD_WAIT: Duration = Duration::from_secs(1);
/// The byte the server sends after all of its checks passed.
const CONFIRM: u8 = 0x5a;
const NAME_SUFFIX: &str = "mutual-auth.sigil";

/// The two identities of a pair, as seen from one end.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    /// The identity on this node.
    pub local: NumericIdentity,
    /// The identity on the peer node.
    pub remote: NumericIdentity,
}

/// A completed authentication, as seen from one end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// The pair, from this end's point of view.
    pub pair: Pair,
    /// The peer node's address (the TCP peer).
    pub peer_node: IpAddr,
    /// The SPIFFE ID the peer proved.
    pub peer_id: SpiffeId,
    /// Unix seconds at which the authentication ends: the earlier notAfter of the two SVIDs.
    pub expires_unix: i64,
    /// At the client: whether the server's node recorded the pair (its own policy requires it
    /// and it wrote its entry before confirming). At the server: whether this node did.
    pub peer_recorded: bool,
}

/// What the handshake needs from the node it runs on.
pub trait AuthContext: Send + Sync + 'static {
    /// The SVID this node holds for `identity` (chain and key), or `None` when it does not host
    /// the identity. Keys stay in memory.
    fn local_svid(&self, identity: NumericIdentity) -> Option<Arc<rustls::sign::CertifiedKey>>;
    /// The SPIFFE ID an identity's SVID must carry (from its `spiffe.io/spiffe-id` label), or
    /// `None` when it has none (such an identity cannot be authenticated: fail closed).
    fn spiffe_id_of(&self, identity: NumericIdentity) -> Option<SpiffeId>;
    /// Whether the cluster's node registry says the node at underlay address `node` hosts
    /// endpoints of `identity`.
    fn node_hosts(&self, node: IpAddr, identity: NumericIdentity) -> bool;
    /// The trust bundles peers' SVIDs must chain to.
    fn bundles(&self) -> SharedBundles;
    /// Whether `node` is a cluster node: the server answers nothing else (checked at accept,
    /// before the registry waits). Default: every address.
    fn is_node(&self, _node: IpAddr) -> bool {
        true
    }
    /// Called by the server once every check passed, before it confirms: the node records the
    /// pair (its datapath entry) and answers on the returned channel whether it did (`false`:
    /// its policy does not require the pair). `None` (the default): nothing recorded.
    fn record(
        &self,
        _authenticated: &Authenticated,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        None
    }
}

/// Why an authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// This node holds no SVID for the identity it was to present.
    #[error("this node holds no SVID for identity {0} (it does not host it)")]
    NotHostedLocally(NumericIdentity),
    /// The identity has no SPIFFE ID to pin.
    #[error("identity {0} has no SPIFFE ID, so it cannot be authenticated")]
    NoSpiffeId(NumericIdentity),
    /// The peer is not a cluster node.
    #[error("{0} is not a cluster node")]
    NotANode(IpAddr),
    /// The registry does not place the identity on the node.
    #[error("node {node} does not host identity {identity}")]
    NodeDoesNotHost {
        /// The node's underlay address.
        node: IpAddr,
        /// The identity it was to hold.
        identity: NumericIdentity,
    },
    /// TCP connection failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (including the peer's certificate not passing the pin).
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// The error rustls reported through the stream.
        source: std::io::Error,
    },
    /// The server did not confirm: it refused after the TLS handshake.
    #[error("{addr} refused to authenticate the pair")]
    Refused {
        /// The peer.
        addr: SocketAddr,
    },
    /// The whole exchange took too long.
    #[error("authentication with {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// A server name that does not name a pair.
    #[error("server name {name:?} does not name an identity pair (want s<ID>.c<ID>.{NAME_SUFFIX})")]
    BadServerName {
        /// The name as received.
        name: String,
    },
    /// The peer's or our own certificate could not be read.
    #[error("certificate of {id}: {reason}")]
    Certificate {
        /// Whose certificate.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The TLS server name a client sends for a pair: the server's identity and the client's, so
/// the server knows which SVID to present and which SPIFFE ID to pin before it goes on.
pub fn server_name(server: NumericIdentity, client: NumericIdentity) -> String {
    format!("s{}.c{}.{NAME_SUFFIX}", server.get(), client.get())
}

/// Parses [`server_name`]'s output: (server identity, client identity).
pub fn parse_server_name(name: &str) -> Result<(NumericIdentity, NumericIdentity), AuthError> {
    let bad = || AuthError::BadServerName {
        name: name.chars().take(128).collect(),
    };
    let rest = name
        .strip_suffix(NAME_SUFFIX)
        .and_then(|r| r.strip_suffix('.'))
        .ok_or_else(bad)?;
    let (s, c) = rest.split_once('.').ok_or_else(bad)?;
    let num = |label: &str, prefix: char| -> Result<NumericIdentity, AuthError> {
        let digits = label.strip_prefix(prefix).ok_or_else(bad)?;
        if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let v: u32 = digits.parse().map_err(|_| bad())?;
        // Reserved identities (host, world, …) are never authenticated; 0 is "any".
        let id = NumericIdentity::new(v);
        if id.is_reserved() || id == NumericIdentity::UNKNOWN {
            return Err(bad());
        }
        Ok(id)
    };
    Ok((num(s, 's')?, num(c, 'c')?))
}

fn leaf_not_after(
    chain: &[rustls_pki_types::CertificateDer<'_>],
    whose: &str,
) -> Result<i64, AuthError> {
    let leaf = chain.first().ok_or_else(|| AuthError::Certificate {
        id: whose.to_owned(),
        reason: "no certificate".to_owned(),
    })?;
    sigil_spiffe::x509::leaf_not_after(leaf).map_err(|e| AuthError::Certificate {
        id: whose.to_owned(),
        reason: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_round_trip_and_hostile_names_are_refused() {
        let (s, c) = (NumericIdentity::new(70_000), NumericIdentity::new(256));
        let name = server_name(s, c);
        assert_eq!(name, "s70000.c256.mutual-auth.sigil");
        assert_eq!(parse_server_name(&name).expect("parses"), (s, c));
        for bad in [
            "",
            "mutual-auth.sigil",
            "s1.c2.example.com",
            "s70000.mutual-auth.sigil",
            "x70000.c256.mutual-auth.sigil",
            "s70000.c256.extra.mutual-auth.sigil",
            "s.c256.mutual-auth.sigil",
            "s99999999999.c256.mutual-auth.sigil",
            "s+1.c256.mutual-auth.sigil",
            // Reserved identities are never authenticated.
            "s2.c256.mutual-auth.sigil",
            "s256.c0.mutual-auth.sigil",
        ] {
            let err = parse_server_name(bad).expect_err(bad);
            assert!(
                matches!(err, AuthError::BadServerName { .. }),
                "{bad}: {err}"
            );
        }
    }
}
