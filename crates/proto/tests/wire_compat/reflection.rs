//! gRPC server reflection fed with `FILE_DESCRIPTOR_SET`, queried over the wire as grpcurl would.

use prost::Message as _;
use prost_types::FileDescriptorProto;
use sigil_proto::FILE_DESCRIPTOR_SET;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::{channel, serve};

fn request(message: MessageRequest) -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    }
}

#[tokio::test]
async fn reflection_lists_and_describes_the_standard_services() {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .unwrap();
    let addr = serve(tonic::transport::Server::builder().add_service(reflection)).await;
    let mut client = ServerReflectionClient::new(channel(addr).await);

    let requests = vec![
        request(MessageRequest::ListServices(String::new())),
        request(MessageRequest::FileContainingSymbol(
            "SpiffeWorkloadAPI".into(),
        )),
        request(MessageRequest::FileContainingSymbol(
            "spire.api.agent.delegatedidentity.v1.DelegatedIdentity".into(),
        )),
    ];
    let mut replies = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let mut next = async || {
        replies
            .message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap()
    };
    let MessageResponse::ListServicesResponse(list) = next().await else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "SpiffeWorkloadAPI",
        "spire.api.agent.delegatedidentity.v1.DelegatedIdentity",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    for file in [
        "workload.proto",
        "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
    ] {
        let MessageResponse::FileDescriptorResponse(found) = next().await else {
            panic!("no file for {file}")
        };
        let first = FileDescriptorProto::decode(found.file_descriptor_proto[0].as_slice()).unwrap();
        assert_eq!(first.name(), file);
    }
}
