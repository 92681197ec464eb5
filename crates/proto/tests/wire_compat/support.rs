//! Shared helpers: a loopback gRPC server and X.509 fixtures a SPIFFE client accepts.

use std::net::SocketAddr;

use rcgen::{CertificateParams, IsCa, KeyUsagePurpose, SanType};
use sigil_test_util::TestCa;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Router;

/// Serves `router` on an ephemeral loopback port until the test's runtime shuts down.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

/// A channel to a server started by [`serve`].
pub async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A CA for `example.org`, an X.509-SVID it signed, and an unrelated CA for a federated domain.
pub struct Pki {
    pub ca_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    pub leaf_key_der: Vec<u8>,
    pub federated_ca_der: Vec<u8>,
}

/// SPIFFE ID in the leaf of [`Pki`].
pub const WORKLOAD_ID: &str = "spiffe://example.org/workload";

fn signing_ca(cn: &str) -> TestCa {
    let mut params = sigil_test_util::certs::ca_params(cn).unwrap();
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    TestCa::root_with(params).unwrap()
}

impl Pki {
    pub fn new() -> Self {
        let ca = signing_ca("example.org CA");
        let federated = signing_ca("federated CA");

        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(WORKLOAD_ID.try_into().unwrap())];
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (leaf, leaf_key) = ca.sign(&leaf).unwrap();

        Self {
            ca_der: ca.der(),
            leaf_der: leaf.der().to_vec(),
            leaf_key_der: leaf_key.serialize_der(),
            federated_ca_der: federated.der(),
        }
    }
}
