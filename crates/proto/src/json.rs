//! proto3's JSON mapping for the Hubble messages, as Hubble writes it (`hubble observe -o jsonpb`,
//! the flow exporter): field names as in the `.proto` files (`node_name`, `IP`, `Type`), enums by
//! name, 64-bit integers as strings, timestamps as RFC 3339, default values left out. Done through
//! the descriptor set, so every message of the files above maps the same way.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

/// Why a message could not be mapped to or from JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The message type is not in the descriptor set (a sigil bug).
    #[error("message type {0} is not in the descriptor set")]
    UnknownType(String),
    /// The descriptor set does not decode (a sigil bug).
    #[error("the descriptor set does not decode: {cause}")]
    Descriptors {
        /// What prost-reflect said.
        cause: String,
    },
    /// The JSON text is not a valid message of that type.
    #[error("not a valid {type_name} in proto3 JSON: {cause}")]
    Invalid {
        /// Full protobuf name of the expected message.
        type_name: String,
        /// What was wrong, with its position.
        cause: String,
    },
}

fn pool() -> Result<&'static DescriptorPool, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|cause| JsonError::Descriptors {
        cause: cause.clone(),
    })
}

fn descriptor(type_name: &str) -> Result<prost_reflect::MessageDescriptor, JsonError> {
    pool()?
        .get_message_by_name(type_name)
        .ok_or_else(|| JsonError::UnknownType(type_name.to_owned()))
}

/// `msg` (of protobuf type `type_name`, e.g. `observer.GetFlowsResponse`) as one line of JSON.
pub fn to_json<M: prost::Message>(type_name: &str, msg: &M) -> Result<String, JsonError> {
    let desc = descriptor(type_name)?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| {
        JsonError::Invalid {
            type_name: type_name.to_owned(),
            cause: e.to_string(),
        }
    })?;
    let mut out = Vec::with_capacity(1024);
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(
            &mut ser,
            &SerializeOptions::new().use_proto_field_name(true),
        )
        .map_err(|e| JsonError::Invalid {
            type_name: type_name.to_owned(),
            cause: e.to_string(),
        })?;
    // serde_json writes UTF-8 only.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Parses `text` as a `type_name` message in proto3 JSON (proto or JSON field names); unknown
/// fields are refused.
pub fn from_json<M: prost::Message + Default>(type_name: &str, text: &str) -> Result<M, JsonError> {
    let invalid = |cause: String| JsonError::Invalid {
        type_name: type_name.to_owned(),
        cause,
    };
    let desc = descriptor(type_name)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let dynamic = DynamicMessage::deserialize_with_options(
        desc,
        &mut de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| invalid(e.to_string()))?;
    de.end().map_err(|e| invalid(e.to_string()))?;
    dynamic
        .transcode_to::<M>()
        .map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow as fpb;
    use crate::observer as opb;

    #[test]
    fn a_flow_response_maps_with_proto_names_and_enum_names() {
        let resp = opb::GetFlowsResponse {
            node_name: "node-a".into(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            response_types: Some(opb::get_flows_response::ResponseTypes::Flow(fpb::Flow {
                verdict: fpb::Verdict::Dropped as i32,
                ip: Some(fpb::Ip {
                    source: "10.0.0.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let text = to_json("observer.GetFlowsResponse", &resp).expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(v["node_name"], "node-a");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000000005Z");
        assert_eq!(v["flow"]["verdict"], "DROPPED");
        assert_eq!(v["flow"]["IP"]["source"], "10.0.0.1");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn a_filter_parses_from_json_and_bad_input_is_refused() {
        let f: fpb::FlowFilter = from_json(
            "flow.FlowFilter",
            r#"{"source_pod":["default/"],"verdict":["DROPPED"],"destinationPort":["80"]}"#,
        )
        .expect("filter");
        assert_eq!(f.source_pod, vec!["default/"]);
        assert_eq!(f.verdict, vec![fpb::Verdict::Dropped as i32]);
        assert_eq!(f.destination_port, vec!["80"]);
        for bad in [
            r#"{"no_such_field":[1]}"#,
            r#"{"verdict":["NOPE"]}"#,
            r#"{"source_pod":"x"}"#,
            "{",
            r#"{} {}"#,
        ] {
            let e = from_json::<fpb::FlowFilter>("flow.FlowFilter", bad).expect_err(bad);
            assert!(e.to_string().contains("flow.FlowFilter"), "{e}");
        }
    }
}
