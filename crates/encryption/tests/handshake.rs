//! Two nodes key a carrier session over real TCP and TLS 1.3 with their node SVIDs; the keys
//! agree in both directions; a node presenting another node's identity, or an SVID outside the
//! trust bundle, gets no session.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_encryption::handshake::{
    Established, HandshakeError, NodeCredentials, initiate, respond,
};
use sigil_encryption::session::{DropReason, Header};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_test_util::TestCa;
use tokio::net::TcpListener;

const TD: &str = "cluster.test";
const NODE_A: &str = "spiffe://cluster.test/sigil/agent/node-a";
const NODE_B: &str = "spiffe://cluster.test/sigil/agent/node-b";

fn creds(ca: &TestCa, trusted: &TestCa, id: &str) -> NodeCredentials {
    let (cert, key) = ca.svid(id, Duration::from_secs(7200)).unwrap();
    let key = PrivateKeyDer::Pkcs8(key.into());
    let svid = Arc::new(sigil_tls::certified_key(vec![CertificateDer::from(cert)], &key).unwrap());
    let mut b = Bundle::new(TrustDomain::parse(TD).unwrap());
    b.x509_authorities.push(CertificateDer::from(trusted.der()));
    let mut set = BundleSet::new();
    set.insert(b);
    NodeCredentials {
        svid,
        bundles: Arc::new(ArcSwap::from_pointee(set)),
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Node B answers one handshake on loopback, expecting `expect` for the client's address.
async fn responder(
    b: NodeCredentials,
    expect: &'static str,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<Established, HandshakeError>>,
) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        respond(
            &b,
            tcp,
            |ip: IpAddr| ip.is_loopback().then(|| id(expect)),
            0xb0b,
        )
        .await
    });
    (addr, task)
}

fn carry(from: &Established, to: &Established, payload: &[u8]) -> Result<Vec<u8>, DropReason> {
    let mut p = Vec::new();
    from.sender.seal(payload, &mut p).unwrap();
    let h = Header::parse(&p)?;
    assert_eq!(
        h.receiver, to.local_index,
        "addressed to the peer's session"
    );
    to.receiver.open(h, &mut p).map(<[u8]>::to_vec)
}

#[tokio::test]
async fn two_nodes_key_a_session_that_works_both_ways() {
    let ca = TestCa::spiffe(TD).unwrap();
    let (addr, b) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    let a = initiate(&creds(&ca, &ca, NODE_A), addr, &id(NODE_B), 0xa)
        .await
        .unwrap();
    let b = b.await.unwrap().unwrap();
    assert_eq!(a.peer_id, id(NODE_B));
    assert_eq!(b.peer_id, id(NODE_A));
    assert_eq!(
        carry(&a, &b, b"vxlan frame a->b").unwrap(),
        b"vxlan frame a->b"
    );
    assert_eq!(
        carry(&b, &a, b"vxlan frame b->a").unwrap(),
        b"vxlan frame b->a"
    );
    // A second, independent session between the same nodes has other keys.
    let (addr, b2) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    let a2 = initiate(&creds(&ca, &ca, NODE_A), addr, &id(NODE_B), 0xa)
        .await
        .unwrap();
    let _b2 = b2.await.unwrap().unwrap();
    let mut p = Vec::new();
    // (Counter 0 was already used on the first session: send at a fresh counter.)
    a2.sender.seal(b"burn counter 0", &mut p).unwrap();
    a2.sender.seal(b"other session", &mut p).unwrap();
    let h = Header::parse(&p).unwrap();
    assert_eq!(b.receiver.open(h, &mut p), Err(DropReason::Unauthenticated));
}

#[tokio::test]
async fn a_node_with_another_nodes_identity_or_an_untrusted_svid_gets_no_session() {
    let ca = TestCa::spiffe(TD).unwrap();
    // The client proves node C while B expects node A at that address.
    let (addr, b) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    let c = creds(&ca, &ca, "spiffe://cluster.test/sigil/agent/node-c");
    assert!(initiate(&c, addr, &id(NODE_B), 1).await.is_err());
    assert!(b.await.unwrap().is_err());
    // The server proves B but the client expects D: refused by the client.
    let (addr, b) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    let err = initiate(
        &creds(&ca, &ca, NODE_A),
        addr,
        &id("spiffe://cluster.test/sigil/agent/node-d"),
        1,
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, HandshakeError::Tls { .. }), "{err}");
    assert!(b.await.unwrap().is_err());
    // Node A's ID signed by a CA outside the bundle.
    let rogue = TestCa::spiffe(TD).unwrap();
    let (addr, b) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    assert!(
        initiate(&creds(&rogue, &ca, NODE_A), addr, &id(NODE_B), 1)
            .await
            .is_err()
    );
    assert!(b.await.unwrap().is_err());
    // An address the registry does not know: refused before TLS.
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let bc = creds(&ca, &ca, NODE_B);
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        respond(&bc, tcp, |_| None, 2).await
    });
    assert!(
        initiate(&creds(&ca, &ca, NODE_A), addr, &id(NODE_B), 1)
            .await
            .is_err()
    );
    assert!(matches!(
        server.await.unwrap(),
        Err(HandshakeError::UnknownPeer(_))
    ));
    // Control: the legitimate pair.
    let (addr, b) = responder(creds(&ca, &ca, NODE_B), NODE_A).await;
    initiate(&creds(&ca, &ca, NODE_A), addr, &id(NODE_B), 1)
        .await
        .unwrap();
    b.await.unwrap().unwrap();
}
