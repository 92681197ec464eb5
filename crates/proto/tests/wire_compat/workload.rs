//! The `spiffe` crate's Workload API client against a server built on our generated code: every
//! response field it reads must arrive intact, and every request field it sends must reach us.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse, insert_security_header, require_security_header,
};
use spiffe::transport::Endpoint;
use spiffe::{SpiffeId, TrustDomain, WorkloadApiClient};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status};

use crate::descriptor::render_service;
use crate::support::{Pki, WORKLOAD_ID, channel, serve};

type Once<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

fn once<T>(message: T) -> Once<T> {
    tokio_stream::iter(vec![Ok(message)])
}

/// A Workload API server that hands out fixed material and records what it was asked.
struct Agent {
    pki: Pki,
    token: String,
    jwt_requests: Mutex<Vec<JwtsvidRequest>>,
    validate_requests: Mutex<Vec<ValidateJwtsvidRequest>>,
}

const JWKS: &str = r#"{"keys":[{"kty":"EC","kid":"kid-1","crv":"P-256","x":"","y":""}]}"#;

impl Agent {
    fn new() -> Self {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"kid-1","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"{WORKLOAD_ID}","aud":["aud1","aud2"],"exp":4102444800}}"#
        ));
        Self {
            pki: Pki::new(),
            token: format!("{header}.{claims}.c2lnbmF0dXJl"),
            jwt_requests: Mutex::default(),
            validate_requests: Mutex::default(),
        }
    }

    fn bundles(&self) -> HashMap<String, Vec<u8>> {
        HashMap::from([
            ("example.org".to_owned(), self.pki.ca_der.clone()),
            ("other.org".to_owned(), self.pki.federated_ca_der.clone()),
        ])
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Agent {
    type FetchX509SVIDStream = Once<X509svidResponse>;
    type FetchX509BundlesStream = Once<X509BundlesResponse>;
    type FetchJWTBundlesStream = Once<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Ok(Response::new(once(X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: WORKLOAD_ID.into(),
                x509_svid: self.pki.leaf_der.clone(),
                x509_svid_key: self.pki.leaf_key_der.clone(),
                bundle: self.pki.ca_der.clone(),
                hint: "internal".into(),
            }],
            crl: vec![b"crl".to_vec()],
            federated_bundles: HashMap::from([(
                "other.org".to_owned(),
                self.pki.federated_ca_der.clone(),
            )]),
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Ok(Response::new(once(X509BundlesResponse {
            crl: vec![b"crl".to_vec()],
            bundles: self.bundles(),
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.jwt_requests.lock().unwrap().push(request.into_inner());
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: WORKLOAD_ID.into(),
                svid: self.token.clone(),
                hint: "jwt-hint".into(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Ok(Response::new(once(JwtBundlesResponse {
            bundles: HashMap::from([("example.org".to_owned(), JWKS.as_bytes().to_vec())]),
        })))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.validate_requests
            .lock()
            .unwrap()
            .push(request.into_inner());
        let value = |kind| Value { kind: Some(kind) };
        let audiences = ["aud1", "aud2"].map(|a| value(Kind::StringValue(a.into())));
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: WORKLOAD_ID.into(),
            claims: Some(Struct {
                fields: BTreeMap::from([
                    (
                        "sub".to_owned(),
                        value(Kind::StringValue(WORKLOAD_ID.into())),
                    ),
                    (
                        "aud".to_owned(),
                        value(Kind::ListValue(ListValue {
                            values: audiences.to_vec(),
                        })),
                    ),
                    ("exp".to_owned(), value(Kind::NumberValue(4102444800.0))),
                ]),
            }),
        }))
    }
}

/// Starts `agent` behind the security-header check, as a real agent serves it.
async fn start(agent: Arc<Agent>) -> std::net::SocketAddr {
    let service = InterceptedService::new(
        SpiffeWorkloadApiServer::from_arc(agent),
        require_security_header,
    );
    serve(tonic::transport::Server::builder().add_service(service)).await
}

async fn spiffe_client(addr: std::net::SocketAddr) -> WorkloadApiClient {
    let endpoint = Endpoint::parse(&format!("tcp://{addr}")).unwrap();
    WorkloadApiClient::new_with_channel(endpoint, channel(addr).await)
}

#[tokio::test]
async fn spiffe_client_reads_our_x509_responses() {
    let agent = Arc::new(Agent::new());
    let client = spiffe_client(start(agent.clone()).await).await;
    let (home, other) = (
        TrustDomain::new("example.org").unwrap(),
        TrustDomain::new("other.org").unwrap(),
    );

    let context = client.fetch_x509_context().await.unwrap();
    let svid = context.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WORKLOAD_ID);
    assert_eq!(svid.leaf().as_ref(), agent.pki.leaf_der.as_slice());
    assert_eq!(
        svid.private_key().as_ref(),
        agent.pki.leaf_key_der.as_slice()
    );
    assert_eq!(svid.hint(), Some("internal"));
    let bundles = context.bundle_set();
    assert_eq!(
        bundles.get(&home).unwrap().authorities()[0].as_ref(),
        agent.pki.ca_der.as_slice()
    );
    assert_eq!(
        bundles.get(&other).unwrap().authorities()[0].as_ref(),
        agent.pki.federated_ca_der.as_slice(),
        "federated_bundles"
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(bundles.len(), 2);
    assert_eq!(
        bundles.get(&home).unwrap().authorities()[0].as_ref(),
        agent.pki.ca_der.as_slice()
    );
    assert_eq!(
        bundles.get(&other).unwrap().authorities()[0].as_ref(),
        agent.pki.federated_ca_der.as_slice()
    );
}

#[tokio::test]
async fn spiffe_client_and_our_server_exchange_jwt_material() {
    let agent = Arc::new(Agent::new());
    let client = spiffe_client(start(agent.clone()).await).await;
    let id = SpiffeId::new(WORKLOAD_ID).unwrap();

    let svids = client
        .fetch_all_jwt_svids(["aud1", "aud2"], Some(&id))
        .await
        .unwrap();
    assert_eq!(svids.len(), 1);
    assert_eq!(svids[0].token(), agent.token);
    assert_eq!(svids[0].spiffe_id(), &id);
    assert_eq!(svids[0].hint(), Some("jwt-hint"));
    assert_eq!(
        *agent.jwt_requests.lock().unwrap(),
        [JwtsvidRequest {
            audience: vec!["aud1".into(), "aud2".into()],
            spiffe_id: WORKLOAD_ID.into()
        }]
    );

    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let home = bundles
        .get(&TrustDomain::new("example.org").unwrap())
        .unwrap();
    assert!(home.find_jwt_authority("kid-1").is_some());

    // The client accepts the answer only if `claims` (a google.protobuf.Struct) carries sub, aud
    // and exp of the right kinds, so success proves the Struct crossed intact.
    let validated = client
        .validate_jwt_token("aud1", &agent.token)
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), &id);
    assert_eq!(
        *agent.validate_requests.lock().unwrap(),
        [ValidateJwtsvidRequest {
            audience: "aud1".into(),
            svid: agent.token.clone()
        }]
    );
}

#[tokio::test]
async fn requests_without_the_security_header_are_refused() {
    let agent = Arc::new(Agent::new());
    let addr = start(agent.clone()).await;
    let request = || JwtsvidRequest {
        audience: vec!["aud1".into()],
        spiffe_id: String::new(),
    };

    let mut bare = SpiffeWorkloadApiClient::new(channel(addr).await);
    let refused = bare.fetch_jwtsvid(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("workload.spiffe.io"),
        "{refused:?}"
    );
    assert!(
        agent.jwt_requests.lock().unwrap().is_empty(),
        "refused before the handler ran"
    );

    let mut ours =
        SpiffeWorkloadApiClient::with_interceptor(channel(addr).await, insert_security_header);
    let reply = ours.fetch_jwtsvid(request()).await.unwrap().into_inner();
    assert_eq!(reply.svids[0].svid, agent.token);
}

#[test]
fn grpc_paths_match_the_spiffe_client() {
    // As written in the spiffe crate's generated client (src/workload_api/pb/workload.rs).
    let theirs = [
        "/SpiffeWorkloadAPI/FetchX509SVID",
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        "/SpiffeWorkloadAPI/FetchJWTBundles",
        "/SpiffeWorkloadAPI/ValidateJWTSVID",
    ];
    let service = <SpiffeWorkloadApiServer<Agent> as NamedService>::NAME;
    let ours: Vec<String> = render_service(service)
        .iter()
        .map(|rpc| format!("/{service}/{}", rpc.split('(').next().unwrap()))
        .collect();
    assert_eq!(ours, theirs);
}
