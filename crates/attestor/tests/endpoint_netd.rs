//! The endpoint attestor's netd client against a real gRPC server on a Unix socket: it answers from a
//! root-owned socket (control), and refuses a socket another user owns (attack: a local user posing as
//! netd to hand out an endpoint's selectors), falling back to no k8s selectors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::pin::Pin;

use futures::Stream;
use sigil_attestor::{
    EndpointAttestor, EndpointLookup, LookupError, NetdLookup, NetnsId, PeerIdentity,
    WorkloadAttestor,
};
use sigil_proto::netd::v1 as pb;
use sigil_proto::netd::v1::endpoints_server::{Endpoints, EndpointsServer};
use tonic::{Request, Response, Status};

/// Serves `frontend`'s selectors for this process's network namespace, NotFound for any other.
struct FakeNetd;

fn own_netns() -> NetnsId {
    NetnsId::of_path(Path::new("/proc/self/ns/net")).unwrap()
}

#[tonic::async_trait]
impl Endpoints for FakeNetd {
    async fn get_endpoint_by_netns(
        &self,
        req: Request<pb::GetEndpointByNetnsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let r = req.into_inner();
        let me = own_netns();
        if (r.netns_dev, r.netns_ino) != (me.dev, me.ino) {
            return Err(Status::not_found("no endpoint with that netns"));
        }
        Ok(Response::new(pb::Endpoint {
            name: "frontend".into(),
            selectors: vec!["k8s:ns:default".into(), "k8s:pod-name:frontend".into()],
            ..Default::default()
        }))
    }
    async fn create_endpoint(
        &self,
        _: Request<pb::CreateEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_endpoints(
        &self,
        _: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_endpoint(
        &self,
        _: Request<pb::GetEndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_endpoint(
        &self,
        _: Request<pb::DeleteEndpointRequest>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_labels(
        &self,
        _: Request<pb::SetLabelsRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

type Incoming = Pin<Box<dyn Stream<Item = std::io::Result<tokio::net::UnixStream>> + Send>>;

fn serve(path: &Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let incoming: Incoming = Box::pin(futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    }));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EndpointsServer::new(FakeNetd))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    })
}

/// Attests this process as if it were inside an endpoint (the host namespace set elsewhere).
async fn attest_me(socket: &Path) -> Vec<String> {
    let lookup = NetdLookup::new(socket, tokio::runtime::Handle::current());
    let attestor = EndpointAttestor::new(lookup)
        .unwrap()
        .with_host_netns(NetnsId { dev: 0, ino: 1 });
    tokio::task::spawn_blocking(move || {
        let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
        attestor
            .attest(&me)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_netd_and_refuses_a_socket_of_another_user() {
    if !sigil_test_util::can_run_as_root("the netd socket ownership test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("netd.sock");
    let server = serve(&socket);

    // Control: root's socket is asked, and its answer becomes the caller's k8s selectors.
    assert_eq!(
        attest_me(&socket).await,
        ["k8s:ns:default", "k8s:pod-name:frontend"]
    );

    // Attack: the same server behind a socket owned by uid 1000 (a local user's fake netd) is refused
    // before any call, so the caller gets no k8s selectors.
    nix::unistd::chown(
        &socket,
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    assert!(attest_me(&socket).await.is_empty());
    let lookup = NetdLookup::new(&socket, tokio::runtime::Handle::current());
    let err = tokio::task::spawn_blocking(move || lookup.by_netns(own_netns()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, LookupError::Unreachable { reason, .. } if reason.contains("owned by uid 1000")),
        "{err}"
    );
    server.abort();
}
