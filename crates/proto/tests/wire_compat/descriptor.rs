//! Our schema as compiled into `FILE_DESCRIPTOR_SET`, rendered back to proto-like text and checked
//! against the upstream facts. This is the only check of fields that spiffe's client never reads
//! (the `crl` lists), and of which methods stream.

use std::collections::BTreeSet;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use sigil_proto::FILE_DESCRIPTOR_SET;

pub fn file_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap()
}

fn qualified(file: &FileDescriptorProto, name: &str) -> String {
    match file.package() {
        "" => name.to_owned(),
        package => format!("{package}.{name}"),
    }
}

/// The message with this full protobuf name (no leading dot).
pub fn message(set: &FileDescriptorSet, full_name: &str) -> DescriptorProto {
    set.file
        .iter()
        .flat_map(|f| f.message_type.iter().map(move |m| (f, m)))
        .find(|(f, m)| qualified(f, m.name()) == full_name)
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("message {full_name} not in FILE_DESCRIPTOR_SET"))
}

/// The field numbers a message declares.
pub fn field_numbers(full_name: &str) -> BTreeSet<u32> {
    message(&file_set(), full_name)
        .field
        .iter()
        .map(|f| u32::try_from(f.number()).unwrap())
        .collect()
}

fn scalar(ty: Type) -> &'static str {
    match ty {
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Int32 => "int32",
        Type::Int64 => "int64",
        Type::Bool => "bool",
        other => panic!("no rendering for {other:?}"),
    }
}

/// One line per field, e.g. `repeated bytes crl = 2` or `map<string, bytes> bundles = 1`.
pub fn render_fields(full_name: &str) -> Vec<String> {
    let msg = message(&file_set(), full_name);
    msg.field
        .iter()
        .map(|f| {
            let ty = if f.r#type() == Type::Message {
                let entry_name = f.type_name().rsplit('.').next().unwrap();
                let entry = msg.nested_type.iter().find(|n| {
                    n.name() == entry_name && n.options.as_ref().is_some_and(|o| o.map_entry())
                });
                if let Some(entry) = entry {
                    let (k, v) = (&entry.field[0], &entry.field[1]);
                    return format!(
                        "map<{}, {}> {} = {}",
                        scalar(k.r#type()),
                        scalar(v.r#type()),
                        f.name(),
                        f.number()
                    );
                }
                f.type_name().trim_start_matches('.').to_owned()
            } else {
                scalar(f.r#type()).to_owned()
            };
            let label = if f.label() == Label::Repeated {
                "repeated "
            } else {
                ""
            };
            format!("{label}{ty} {} = {}", f.name(), f.number())
        })
        .collect()
}

/// One line per method, e.g. `FetchJWTSVID(JWTSVIDRequest) returns (JWTSVIDResponse)`.
pub fn render_service(full_name: &str) -> Vec<String> {
    let set = file_set();
    let service = set
        .file
        .iter()
        .flat_map(|f| f.service.iter().map(move |s| (f, s)))
        .find(|(f, s)| qualified(f, s.name()) == full_name)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("service {full_name} not in FILE_DESCRIPTOR_SET"));
    let stream = |on: bool| if on { "stream " } else { "" };
    service
        .method
        .iter()
        .map(|m| {
            format!(
                "{}({}{}) returns ({}{})",
                m.name(),
                stream(m.client_streaming()),
                m.input_type().trim_start_matches('.'),
                stream(m.server_streaming()),
                m.output_type().trim_start_matches('.'),
            )
        })
        .collect()
}

#[test]
fn descriptor_set_holds_every_file_and_its_imports() {
    let names: BTreeSet<String> = file_set()
        .file
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    for want in [
        "workload.proto",
        "google/protobuf/struct.proto",
        "spire/api/types/selector.proto",
        "spire/api/types/spiffeid.proto",
        "spire/api/types/x509svid.proto",
        "spire/api/types/jwtsvid.proto",
        "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto",
        "sigil/admin/v1/admin.proto",
        "sigil/agent/v1/agent.proto",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
}

#[test]
fn workload_api_service_matches_the_spiffe_specification() {
    assert_eq!(
        render_service("SpiffeWorkloadAPI"),
        [
            "FetchX509SVID(X509SVIDRequest) returns (stream X509SVIDResponse)",
            "FetchX509Bundles(X509BundlesRequest) returns (stream X509BundlesResponse)",
            "FetchJWTSVID(JWTSVIDRequest) returns (JWTSVIDResponse)",
            "FetchJWTBundles(JWTBundlesRequest) returns (stream JWTBundlesResponse)",
            "ValidateJWTSVID(ValidateJWTSVIDRequest) returns (ValidateJWTSVIDResponse)",
        ]
    );
}

#[test]
fn delegated_identity_service_matches_spire() {
    let p = "spire.api.agent.delegatedidentity.v1";
    assert_eq!(
        render_service(&format!("{p}.DelegatedIdentity")),
        [
            format!(
                "SubscribeToX509SVIDs({p}.SubscribeToX509SVIDsRequest) returns (stream {p}.SubscribeToX509SVIDsResponse)"
            ),
            format!(
                "SubscribeToX509Bundles({p}.SubscribeToX509BundlesRequest) returns (stream {p}.SubscribeToX509BundlesResponse)"
            ),
            format!("FetchJWTSVIDs({p}.FetchJWTSVIDsRequest) returns ({p}.FetchJWTSVIDsResponse)"),
            format!(
                "SubscribeToJWTBundles({p}.SubscribeToJWTBundlesRequest) returns (stream {p}.SubscribeToJWTBundlesResponse)"
            ),
        ]
    );
}

#[test]
fn workload_api_messages_match_the_spiffe_specification() {
    let expected: &[(&str, &[&str])] = &[
        ("X509SVIDRequest", &[]),
        (
            "X509SVIDResponse",
            &[
                "repeated X509SVID svids = 1",
                "repeated bytes crl = 2",
                "map<string, bytes> federated_bundles = 3",
            ],
        ),
        (
            "X509SVID",
            &[
                "string spiffe_id = 1",
                "bytes x509_svid = 2",
                "bytes x509_svid_key = 3",
                "bytes bundle = 4",
                "string hint = 5",
            ],
        ),
        ("X509BundlesRequest", &[]),
        (
            "X509BundlesResponse",
            &["repeated bytes crl = 1", "map<string, bytes> bundles = 2"],
        ),
        (
            "JWTSVIDRequest",
            &["repeated string audience = 1", "string spiffe_id = 2"],
        ),
        ("JWTSVIDResponse", &["repeated JWTSVID svids = 1"]),
        (
            "JWTSVID",
            &["string spiffe_id = 1", "string svid = 2", "string hint = 3"],
        ),
        ("JWTBundlesRequest", &[]),
        ("JWTBundlesResponse", &["map<string, bytes> bundles = 1"]),
        (
            "ValidateJWTSVIDRequest",
            &["string audience = 1", "string svid = 2"],
        ),
        (
            "ValidateJWTSVIDResponse",
            &["string spiffe_id = 1", "google.protobuf.Struct claims = 2"],
        ),
    ];
    for (name, fields) in expected {
        assert_eq!(render_fields(name), *fields, "message {name}");
    }
    let all_messages: BTreeSet<String> = file_set()
        .file
        .iter()
        .filter(|f| f.name() == "workload.proto")
        .flat_map(|f| f.message_type.iter().map(|m| m.name().to_owned()))
        .collect();
    let checked: BTreeSet<String> = expected.iter().map(|(n, _)| (*n).to_owned()).collect();
    assert_eq!(
        all_messages, checked,
        "every workload.proto message is checked"
    );
}
