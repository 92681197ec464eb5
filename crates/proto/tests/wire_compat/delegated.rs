//! spire-api's generated Delegated Identity client against a server built on our generated code:
//! each call must reach the right method, and requests and responses must cross intact.

use std::sync::{Arc, Mutex};

use sigil_proto::spire::api::agent::delegatedidentity::v1 as ours;
use sigil_proto::spire::api::agent::delegatedidentity::v1::delegated_identity_server::{
    DelegatedIdentity, DelegatedIdentityServer,
};
use spire_api::pb::spire::api::agent::delegatedidentity::v1 as theirs;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::descriptor::render_service;
use crate::messages::{
    jwt_bundles_response, jwt_svids_request, jwt_svids_response, x509_bundles_response,
    x509_svids_request, x509_svids_response,
};
use crate::support::{channel, serve};

type Once<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

fn once<T>(message: T) -> Once<T> {
    tokio_stream::iter(vec![Ok(message)])
}

/// Answers every method with the fixed values of `messages` and records the requests.
#[derive(Default)]
struct Delegate {
    x509_requests: Mutex<Vec<ours::SubscribeToX509sviDsRequest>>,
    jwt_requests: Mutex<Vec<ours::FetchJwtsviDsRequest>>,
}

#[tonic::async_trait]
impl DelegatedIdentity for Delegate {
    type SubscribeToX509SVIDsStream = Once<ours::SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = Once<ours::SubscribeToX509BundlesResponse>;
    type SubscribeToJWTBundlesStream = Once<ours::SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<ours::SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        self.x509_requests
            .lock()
            .unwrap()
            .push(request.into_inner());
        Ok(Response::new(once(x509_svids_response().0)))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _: Request<ours::SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        Ok(Response::new(once(x509_bundles_response().0)))
    }

    async fn fetch_jwtsvi_ds(
        &self,
        request: Request<ours::FetchJwtsviDsRequest>,
    ) -> Result<Response<ours::FetchJwtsviDsResponse>, Status> {
        self.jwt_requests.lock().unwrap().push(request.into_inner());
        Ok(Response::new(jwt_svids_response().0))
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        _: Request<ours::SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        Ok(Response::new(once(jwt_bundles_response().0)))
    }
}

#[tokio::test]
async fn spire_api_client_calls_every_method_of_our_server() {
    let delegate = Arc::new(Delegate::default());
    let router = tonic::transport::Server::builder()
        .add_service(DelegatedIdentityServer::from_arc(delegate.clone()));
    let mut client = DelegatedIdentityClient::new(channel(serve(router).await).await);

    let mut stream = client
        .subscribe_to_x509svi_ds(x509_svids_request().1)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap(),
        x509_svids_response().1
    );
    assert_eq!(
        *delegate.x509_requests.lock().unwrap(),
        [x509_svids_request().0]
    );

    let mut stream = client
        .subscribe_to_x509_bundles(theirs::SubscribeToX509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap(),
        x509_bundles_response().1
    );

    let reply = client
        .fetch_jwtsvi_ds(jwt_svids_request().1)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply, jwt_svids_response().1);
    assert_eq!(
        *delegate.jwt_requests.lock().unwrap(),
        [jwt_svids_request().0]
    );

    let mut stream = client
        .subscribe_to_jwt_bundles(theirs::SubscribeToJwtBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap(),
        jwt_bundles_response().1
    );
}

#[test]
fn grpc_paths_match_the_spire_api_client() {
    // As written in spire-api's generated client (src/pb/spire.api.agent.delegatedidentity.v1.rs).
    let theirs = [
        "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs",
        "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509Bundles",
        "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs",
        "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToJWTBundles",
    ];
    let service = <DelegatedIdentityServer<Delegate> as NamedService>::NAME;
    let ours: Vec<String> = render_service(service)
        .iter()
        .map(|rpc| format!("/{service}/{}", rpc.split('(').next().unwrap()))
        .collect();
    assert_eq!(ours, theirs);
}
