//! Through a real tonic server fed by `accept_stream`: handlers find the caller's identity in the request
//! extensions as `PeerInfo`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sigil_attestor::{PeerInfo, accept_stream};
use tokio::net::{UnixListener, UnixStream};
use tonic::codegen::http::{Request, Response, Uri, uri::PathAndQuery};
use tonic::codegen::{Context, Future, Pin, Poll, Service};
use tonic::transport::{Endpoint, Server};

/// Answers every call with a status whose message says what `PeerInfo` the handler saw.
#[derive(Clone)]
struct WhoAmI;

impl tonic::server::NamedService for WhoAmI {
    const NAME: &'static str = "test.WhoAmI";
}

impl Service<Request<tonic::body::Body>> for WhoAmI {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let seen = match req.extensions().get::<PeerInfo>() {
            Some(PeerInfo(Ok(peer))) => format!("pid={} uid={}", peer.pid, peer.uid),
            Some(PeerInfo(Err(e))) => format!("error={e}"),
            None => "no PeerInfo".to_string(),
        };
        ready(Ok(tonic::Status::permission_denied(seen).into_http()))
    }
}

/// Connects the client channel to the Unix socket, whatever the URI says.
struct UnixConnector(PathBuf);

impl Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

#[tokio::test]
async fn handlers_see_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let incoming = accept_stream(UnixListener::bind(&path).unwrap());
    let server = tokio::spawn(
        Server::builder()
            .add_service(WhoAmI)
            .serve_with_incoming(incoming),
    );

    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(UnixConnector(path))
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(()),
            PathAndQuery::from_static("/test.WhoAmI/Get"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap_err();
    server.abort();

    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        format!(
            "pid={} uid={}",
            std::process::id(),
            nix::unistd::geteuid().as_raw()
        )
    );
}
