//! The handshake over real TCP and real TLS 1.3 with real X.509-SVIDs: the legitimate pair
//! authenticates; each way of cheating Cilium's mutual auth allowed is refused.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_identity::NumericIdentity;
use sigil_mutual_auth::{AuthContext, AuthError, Pair, authenticate, serve, server_name};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_test_util::TestCa;
use sigil_tls::SharedBundles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const TD: &str = "cluster.test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const FRONTEND: NumericIdentity = NumericIdentity::new(70_000);
const BACKEND: NumericIdentity = NumericIdentity::new(70_001);
const OTHER: NumericIdentity = NumericIdentity::new(70_002);
const CLASSIC: NumericIdentity = NumericIdentity::new(70_003);

fn id_of(n: NumericIdentity) -> Option<SpiffeId> {
    let path = match n {
        FRONTEND => "frontend",
        BACKEND => "backend",
        OTHER => "other",
        _ => return None,
    };
    Some(SpiffeId::parse(&format!("spiffe://{TD}/{path}")).unwrap())
}

fn ca() -> TestCa {
    TestCa::spiffe(TD).unwrap()
}

/// An X.509-SVID for `id` signed by `ca`, valid for `valid_for` from an hour ago.
fn svid(ca: &TestCa, id: &SpiffeId, valid_for: Duration) -> Arc<CertifiedKey> {
    let (cert, key) = ca.svid(id.as_str(), valid_for).unwrap();
    let key = PrivateKeyDer::Pkcs8(key.into());
    Arc::new(sigil_tls::certified_key(vec![CertificateDer::from(cert)], &key).unwrap())
}

fn bundles(ca: &TestCa) -> SharedBundles {
    let mut b = Bundle::new(TrustDomain::parse(TD).unwrap());
    b.x509_authorities.push(CertificateDer::from(ca.der()));
    let mut set = BundleSet::new();
    set.insert(b);
    Arc::new(ArcSwap::from_pointee(set))
}

/// One node's view: the SVIDs it holds and the registry (node address → identities hosted).
struct Node {
    svids: HashMap<NumericIdentity, Arc<CertifiedKey>>,
    registry: Mutex<HashMap<IpAddr, HashSet<NumericIdentity>>>,
    bundles: SharedBundles,
    /// The cluster's nodes (`None`: every address is one).
    nodes: Option<HashSet<IpAddr>>,
    /// As the server: whether it records served pairs (`None`: no recorder).
    records: Option<bool>,
}

impl AuthContext for Node {
    fn local_svid(&self, identity: NumericIdentity) -> Option<Arc<CertifiedKey>> {
        self.svids.get(&identity).cloned()
    }
    fn spiffe_id_of(&self, identity: NumericIdentity) -> Option<SpiffeId> {
        id_of(identity)
    }
    fn node_hosts(&self, node: IpAddr, identity: NumericIdentity) -> bool {
        self.registry
            .lock()
            .unwrap()
            .get(&node)
            .is_some_and(|s| s.contains(&identity))
    }
    fn bundles(&self) -> SharedBundles {
        self.bundles.clone()
    }
    fn is_node(&self, node: IpAddr) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.contains(&node))
    }
    fn record(
        &self,
        _: &sigil_mutual_auth::Authenticated,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        let done = self.records?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Recorded a moment later, as a node's manager would.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(done);
        });
        Some(rx)
    }
}

struct World {
    ca: TestCa,
    bundles: SharedBundles,
}

impl World {
    fn new() -> Self {
        let ca = ca();
        let bundles = bundles(&ca);
        World { ca, bundles }
    }

    fn svid(&self, n: NumericIdentity) -> Arc<CertifiedKey> {
        svid(&self.ca, &id_of(n).unwrap(), Duration::from_secs(7200))
    }

    /// A node holding `svids`; the registry places every identity in `hosted` on loopback
    /// (both "nodes" of a test connect from 127.0.0.1).
    fn node(
        &self,
        svids: Vec<(NumericIdentity, Arc<CertifiedKey>)>,
        hosted: &[NumericIdentity],
    ) -> Node {
        Node {
            svids: svids.into_iter().collect(),
            registry: Mutex::new(HashMap::from([(
                LOOPBACK,
                hosted.iter().copied().collect(),
            )])),
            bundles: self.bundles.clone(),
            nodes: None,
            records: None,
        }
    }
}

async fn start(
    server: Node,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<sigil_mutual_auth::Authenticated>,
) {
    let l = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(l, Arc::new(server), tx));
    (addr, rx)
}

const PAIR: Pair = Pair {
    local: FRONTEND,
    remote: BACKEND,
};

#[tokio::test]
async fn the_hosted_pair_authenticates_at_both_ends_until_the_earlier_not_after() {
    let w = World::new();
    let short = svid(
        &w.ca,
        &id_of(BACKEND).unwrap(),
        Duration::from_secs(3600 + 600),
    );
    let server = w.node(vec![(BACKEND, short)], &[FRONTEND, BACKEND]);
    let (addr, mut done) = start(server).await;
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    let a = authenticate(&client, addr, PAIR).await.unwrap();
    assert_eq!(a.pair, PAIR);
    assert_eq!(a.peer_id, id_of(BACKEND).unwrap());
    assert_eq!(a.peer_node, LOOPBACK);
    // The server's SVID ends in ~10 minutes, the client's in ~an hour: the earlier counts.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (a.expires_unix - (now + 600)).abs() < 5,
        "{} vs {now}",
        a.expires_unix
    );
    let s = tokio::time::timeout(Duration::from_secs(5), done.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.pair,
        Pair {
            local: BACKEND,
            remote: FRONTEND
        }
    );
    assert_eq!(s.peer_id, id_of(FRONTEND).unwrap());
    assert_eq!(s.expires_unix, a.expires_unix);
}

#[tokio::test]
async fn a_client_presenting_another_identitys_valid_svid_is_refused() {
    // Cilium's server side accepts any SVID of the trust domain; ours pins the claimed one.
    let w = World::new();
    let (addr, mut done) = start(w.node(
        vec![(BACKEND, w.svid(BACKEND))],
        &[FRONTEND, OTHER, BACKEND],
    ))
    .await;
    // The client holds OTHER's valid SVID but claims to be FRONTEND.
    let cheat = w.node(vec![(FRONTEND, w.svid(OTHER))], &[FRONTEND, BACKEND]);
    let err = authenticate(&cheat, addr, PAIR).await.unwrap_err();
    assert!(
        matches!(err, AuthError::Refused { .. } | AuthError::Handshake { .. }),
        "{err}"
    );
    // Control: the same server authenticates the real FRONTEND, and only that pair.
    let honest = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    authenticate(&honest, addr, PAIR).await.unwrap();
    let s = done.recv().await.unwrap();
    assert_eq!(s.peer_id, id_of(FRONTEND).unwrap());
    assert!(done.try_recv().is_err(), "the cheating client was recorded");
}

#[tokio::test]
async fn a_server_presenting_the_wrong_identity_is_refused_by_the_client() {
    let w = World::new();
    // The "server" holds OTHER's SVID and answers for BACKEND.
    let (addr, _done) = start(w.node(vec![(BACKEND, w.svid(OTHER))], &[FRONTEND, BACKEND])).await;
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    let err = authenticate(&client, addr, PAIR).await.unwrap_err();
    assert!(matches!(err, AuthError::Handshake { .. }), "{err}");
}

#[tokio::test]
async fn a_node_that_does_not_host_the_identity_cannot_authenticate_it() {
    let w = World::new();
    // The server's registry does not place FRONTEND on the client's node: even with
    // FRONTEND's real SVID (stolen, or left over after the endpoint moved) the client is refused.
    let (addr, mut done) = start(w.node(vec![(BACKEND, w.svid(BACKEND))], &[BACKEND])).await;
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    let err = authenticate(&client, addr, PAIR).await.unwrap_err();
    // The server refuses before it presents anything.
    assert!(matches!(err, AuthError::Handshake { .. }), "{err}");
    assert!(done.try_recv().is_err());
    // The client, in turn, never asks a node the registry does not place BACKEND on.
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND]);
    let err = authenticate(&client, addr, PAIR).await.unwrap_err();
    assert!(
        matches!(err, AuthError::NodeDoesNotHost { identity, .. } if identity == BACKEND),
        "{err}"
    );
    // Nor can a node authenticate an identity whose SVID it does not hold, or one without a
    // SPIFFE ID.
    let err = authenticate(
        &client,
        addr,
        Pair {
            local: OTHER,
            remote: BACKEND,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, AuthError::NotHostedLocally(id) if id == OTHER),
        "{err}"
    );
    let err = authenticate(
        &client,
        addr,
        Pair {
            local: FRONTEND,
            remote: CLASSIC,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, AuthError::NoSpiffeId(id) if id == CLASSIC),
        "{err}"
    );
}

#[tokio::test]
async fn svids_from_an_untrusted_ca_or_expired_are_refused() {
    let w = World::new();
    let (addr, mut done) =
        start(w.node(vec![(BACKEND, w.svid(BACKEND))], &[FRONTEND, BACKEND])).await;
    // Same SPIFFE ID, signed by a CA outside the bundle.
    let rogue = ca();
    let forged = w.node(
        vec![(
            FRONTEND,
            svid(&rogue, &id_of(FRONTEND).unwrap(), Duration::from_secs(7200)),
        )],
        &[FRONTEND, BACKEND],
    );
    assert!(authenticate(&forged, addr, PAIR).await.is_err());
    // Expired half an hour ago.
    let expired = w.node(
        vec![(
            FRONTEND,
            svid(&w.ca, &id_of(FRONTEND).unwrap(), Duration::from_secs(1800)),
        )],
        &[FRONTEND, BACKEND],
    );
    assert!(authenticate(&expired, addr, PAIR).await.is_err());
    assert!(done.try_recv().is_err());
    // Control.
    let honest = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    authenticate(&honest, addr, PAIR).await.unwrap();
}

#[tokio::test]
async fn hostile_connections_do_not_stop_or_stall_the_server() {
    let w = World::new();
    let (addr, mut done) =
        start(w.node(vec![(BACKEND, w.svid(BACKEND))], &[FRONTEND, BACKEND])).await;
    // A connection that never speaks stays open throughout.
    let _silent = TcpStream::connect(addr).await.unwrap();
    // Garbage instead of a ClientHello: closed.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    junk.write_all(&[0u8; 4096]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut buf))
        .await
        .expect("the server closes a garbage connection");
    assert!(matches!(n, Ok(_) | Err(_)));
    // A real TLS client with a valid SVID naming no pair (another server name), or a pair with a
    // reserved identity (world): refused, nothing recorded.
    for name in [
        "www.example.com".to_owned(),
        server_name(BACKEND, NumericIdentity::WORLD),
    ] {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sigil_tls::SpiffeServerVerifier::new(
            w.bundles.clone(),
            sigil_tls::PeerPolicy::AnyInBundles,
        )))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            w.svid(FRONTEND),
        )));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name.clone().try_into().unwrap(), tcp)
            .await;
        assert!(r.is_err(), "{name} got a handshake");
    }
    let anyone = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    assert!(done.try_recv().is_err());
    // Control, while the silent connection is still open: a real pair authenticates.
    // (A stalled accept loop would make this time out.)
    authenticate(&anyone, addr, PAIR).await.unwrap();
    assert_eq!(done.recv().await.unwrap().peer_id, id_of(FRONTEND).unwrap());
}

#[tokio::test]
async fn only_cluster_nodes_are_answered_and_at_once() {
    let w = World::new();
    let mut stranger_server = w.node(vec![(BACKEND, w.svid(BACKEND))], &[FRONTEND, BACKEND]);
    // The server's cluster has one node, and it is not the client's address.
    stranger_server.nodes = Some(HashSet::from([IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]));
    let (addr, mut done) = start(stranger_server).await;
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    let t = std::time::Instant::now();
    let err = authenticate(&client, addr, PAIR).await.unwrap_err();
    assert!(
        matches!(err, AuthError::Refused { .. } | AuthError::Handshake { .. }),
        "{err}"
    );
    // Refused at accept: no registry wait is spent on a stranger.
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(done.try_recv().is_err(), "a stranger was recorded");
    // Control: the same client from a cluster node authenticates.
    let mut member_server = w.node(vec![(BACKEND, w.svid(BACKEND))], &[FRONTEND, BACKEND]);
    member_server.nodes = Some(HashSet::from([LOOPBACK]));
    let (addr, _done) = start(member_server).await;
    authenticate(&client, addr, PAIR).await.unwrap();
}

#[tokio::test]
async fn the_client_learns_whether_the_server_recorded_the_pair() {
    let w = World::new();
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    for (records, want) in [(Some(true), true), (Some(false), false), (None, false)] {
        let mut server = w.node(vec![(BACKEND, w.svid(BACKEND))], &[FRONTEND, BACKEND]);
        server.records = records;
        let (addr, mut done) = start(server).await;
        let a = authenticate(&client, addr, PAIR).await.unwrap();
        assert_eq!(a.peer_recorded, want, "server records {records:?}");
        let s = done.recv().await.unwrap();
        assert_eq!(s.peer_recorded, want, "server records {records:?}");
    }
}

#[tokio::test]
async fn a_registry_entry_on_its_way_is_waited_for_briefly() {
    let w = World::new();
    // The server has not yet heard that the client's node hosts FRONTEND.
    let server = Arc::new(w.node(vec![(BACKEND, w.svid(BACKEND))], &[BACKEND]));
    let l = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(l, server.clone(), tx));
    let client = w.node(vec![(FRONTEND, w.svid(FRONTEND))], &[FRONTEND, BACKEND]);
    // Never heard of: refused once the wait is over.
    let t = std::time::Instant::now();
    authenticate(&client, addr, PAIR).await.unwrap_err();
    assert!(
        t.elapsed() >= sigil_mutual_auth::REGISTRY_WAIT,
        "refused before the wait was over: {:?}",
        t.elapsed()
    );
    // Heard of 200 ms into the handshake: authenticated.
    let later = server.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later
            .registry
            .lock()
            .unwrap()
            .get_mut(&LOOPBACK)
            .unwrap()
            .insert(FRONTEND);
    });
    authenticate(&client, addr, PAIR).await.unwrap();
}
