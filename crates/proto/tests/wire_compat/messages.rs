//! Every Delegated Identity API message, populated on one side, encoded, and decoded by the other
//! side's generated type: ours to spire-api's and back.
//!
//! Values are picked so that a wrong scalar type shows: a negative `pid` is encoded differently as
//! int32 and sint32, and times past 2^32 do not fit a 32-bit field.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;

use prost::Message;
use prost::bytes::Bytes;
use sigil_proto::spire::api::agent::delegatedidentity::v1 as ours;
use sigil_proto::spire::api::types as ours_t;
use spire_api::pb::spire::api::agent::delegatedidentity::v1 as theirs;
use spire_api::pb::spire::api::types as theirs_t;

use crate::descriptor::field_numbers;

/// The field numbers present at the top level of an encoded message.
fn wire_fields(mut buf: &[u8]) -> BTreeSet<u32> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let (byte, rest) = buf.split_first().unwrap();
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
            shift += 7;
        }
    }
    let mut fields = BTreeSet::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        fields.insert(u32::try_from(key >> 3).unwrap());
        let skip = match key & 7 {
            0 => {
                varint(&mut buf);
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut buf)).unwrap(),
            5 => 4,
            other => panic!("unexpected wire type {other}"),
        };
        buf = &buf[skip..];
    }
    fields
}

/// Sends `o` (ours) and `t` (theirs), which hold the same content, each way across and checks that
/// it arrives equal, and that the content sets every field our schema declares.
pub fn check_both_ways<O, T>(full_name: &str, o: &O, t: &T)
where
    O: Message + Default + PartialEq + Debug,
    T: Message + Default + PartialEq + Debug,
{
    let declared = field_numbers(full_name);
    assert_eq!(
        wire_fields(&o.encode_to_vec()),
        declared,
        "{full_name}: ours leaves a field unset"
    );
    assert_eq!(
        wire_fields(&t.encode_to_vec()),
        declared,
        "{full_name}: theirs sets other fields"
    );
    assert_eq!(
        &T::decode(o.encode_to_vec().as_slice()).unwrap(),
        t,
        "{full_name}: ours -> theirs"
    );
    assert_eq!(
        &O::decode(t.encode_to_vec().as_slice()).unwrap(),
        o,
        "{full_name}: theirs -> ours"
    );
}

const P: &str = "spire.api.agent.delegatedidentity.v1";

fn b(s: &'static [u8]) -> Bytes {
    Bytes::from_static(s)
}

pub fn selectors() -> (Vec<ours_t::Selector>, Vec<theirs_t::Selector>) {
    let pairs = [("unix", "uid:1000"), ("k8s", "ns:default")];
    (
        pairs
            .iter()
            .map(|(t, v)| ours_t::Selector {
                r#type: (*t).into(),
                value: (*v).into(),
            })
            .collect(),
        pairs
            .iter()
            .map(|(t, v)| theirs_t::Selector {
                r#type: (*t).into(),
                value: (*v).into(),
            })
            .collect(),
    )
}

fn ids() -> (ours_t::Spiffeid, theirs_t::Spiffeid) {
    (
        ours_t::Spiffeid {
            trust_domain: "example.org".into(),
            path: "/workload".into(),
        },
        theirs_t::Spiffeid {
            trust_domain: "example.org".into(),
            path: "/workload".into(),
        },
    )
}

const EXPIRES_AT: i64 = (1 << 40) + 17;
const ISSUED_AT: i64 = (1 << 40) - 3600;

fn x509_svids() -> (ours_t::X509svid, theirs_t::X509svid) {
    let (oid, tid) = ids();
    (
        ours_t::X509svid {
            cert_chain: vec![b"leaf".to_vec(), b"intermediate".to_vec()],
            id: Some(oid),
            expires_at: EXPIRES_AT,
            hint: "internal".into(),
        },
        theirs_t::X509svid {
            cert_chain: vec![b(b"leaf"), b(b"intermediate")],
            id: Some(tid),
            expires_at: EXPIRES_AT,
            hint: "internal".into(),
        },
    )
}

fn jwt_svids() -> (ours_t::Jwtsvid, theirs_t::Jwtsvid) {
    let (oid, tid) = ids();
    (
        ours_t::Jwtsvid {
            token: "h.c.s".into(),
            id: Some(oid),
            expires_at: EXPIRES_AT,
            issued_at: ISSUED_AT,
            hint: "jwt".into(),
        },
        theirs_t::Jwtsvid {
            token: "h.c.s".into(),
            id: Some(tid),
            expires_at: EXPIRES_AT,
            issued_at: ISSUED_AT,
            hint: "jwt".into(),
        },
    )
}

fn with_keys() -> (ours::X509svidWithKey, theirs::X509svidWithKey) {
    let (o, t) = x509_svids();
    (
        ours::X509svidWithKey {
            x509_svid: Some(o),
            x509_svid_key: b"pkcs8".to_vec(),
        },
        theirs::X509svidWithKey {
            x509_svid: Some(t),
            x509_svid_key: b(b"pkcs8"),
        },
    )
}

fn bundle_maps() -> (HashMap<String, Vec<u8>>, HashMap<String, Bytes>) {
    let entries = [
        ("example.org", &b"ca-one"[..]),
        ("other.org", &b"ca-two"[..]),
    ];
    (
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect(),
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v)))
            .collect(),
    )
}

pub fn x509_svids_request() -> (
    ours::SubscribeToX509sviDsRequest,
    theirs::SubscribeToX509sviDsRequest,
) {
    let (os, ts) = selectors();
    (
        ours::SubscribeToX509sviDsRequest {
            selectors: os,
            pid: -7,
        },
        theirs::SubscribeToX509sviDsRequest {
            selectors: ts,
            pid: -7,
        },
    )
}

pub fn x509_svids_response() -> (
    ours::SubscribeToX509sviDsResponse,
    theirs::SubscribeToX509sviDsResponse,
) {
    let (o, t) = with_keys();
    let federates = vec!["other.org".to_owned(), "third.org".to_owned()];
    (
        ours::SubscribeToX509sviDsResponse {
            x509_svids: vec![o.clone(), o],
            federates_with: federates.clone(),
        },
        theirs::SubscribeToX509sviDsResponse {
            x509_svids: vec![t.clone(), t],
            federates_with: federates,
        },
    )
}

pub fn x509_bundles_response() -> (
    ours::SubscribeToX509BundlesResponse,
    theirs::SubscribeToX509BundlesResponse,
) {
    let (o, t) = bundle_maps();
    (
        ours::SubscribeToX509BundlesResponse { ca_certificates: o },
        theirs::SubscribeToX509BundlesResponse { ca_certificates: t },
    )
}

pub fn jwt_svids_request() -> (ours::FetchJwtsviDsRequest, theirs::FetchJwtsviDsRequest) {
    let (os, ts) = selectors();
    let audience = vec!["aud1".to_owned(), "aud2".to_owned()];
    (
        ours::FetchJwtsviDsRequest {
            audience: audience.clone(),
            selectors: os,
            pid: -7,
        },
        theirs::FetchJwtsviDsRequest {
            audience,
            selectors: ts,
            pid: -7,
        },
    )
}

pub fn jwt_svids_response() -> (ours::FetchJwtsviDsResponse, theirs::FetchJwtsviDsResponse) {
    let (o, t) = jwt_svids();
    (
        ours::FetchJwtsviDsResponse {
            svids: vec![o.clone(), o],
        },
        theirs::FetchJwtsviDsResponse {
            svids: vec![t.clone(), t],
        },
    )
}

pub fn jwt_bundles_response() -> (
    ours::SubscribeToJwtBundlesResponse,
    theirs::SubscribeToJwtBundlesResponse,
) {
    let (o, t) = bundle_maps();
    (
        ours::SubscribeToJwtBundlesResponse { bundles: o },
        theirs::SubscribeToJwtBundlesResponse { bundles: t },
    )
}

#[test]
fn spire_types_cross_both_ways() {
    let (o, t) = selectors();
    check_both_ways("spire.api.types.Selector", &o[0], &t[0]);
    let (o, t) = ids();
    check_both_ways("spire.api.types.SPIFFEID", &o, &t);
    let (o, t) = x509_svids();
    check_both_ways("spire.api.types.X509SVID", &o, &t);
    let (o, t) = jwt_svids();
    check_both_ways("spire.api.types.JWTSVID", &o, &t);
}

#[test]
fn delegated_identity_messages_cross_both_ways() {
    let (o, t) = with_keys();
    check_both_ways(&format!("{P}.X509SVIDWithKey"), &o, &t);
    let (o, t) = x509_svids_request();
    check_both_ways(&format!("{P}.SubscribeToX509SVIDsRequest"), &o, &t);
    let (o, t) = x509_svids_response();
    check_both_ways(&format!("{P}.SubscribeToX509SVIDsResponse"), &o, &t);
    check_both_ways(
        &format!("{P}.SubscribeToX509BundlesRequest"),
        &ours::SubscribeToX509BundlesRequest {},
        &theirs::SubscribeToX509BundlesRequest {},
    );
    let (o, t) = x509_bundles_response();
    check_both_ways(&format!("{P}.SubscribeToX509BundlesResponse"), &o, &t);
    let (o, t) = jwt_svids_request();
    check_both_ways(&format!("{P}.FetchJWTSVIDsRequest"), &o, &t);
    let (o, t) = jwt_svids_response();
    check_both_ways(&format!("{P}.FetchJWTSVIDsResponse"), &o, &t);
    check_both_ways(
        &format!("{P}.SubscribeToJWTBundlesRequest"),
        &ours::SubscribeToJwtBundlesRequest {},
        &theirs::SubscribeToJwtBundlesRequest {},
    );
    let (o, t) = jwt_bundles_response();
    check_both_ways(&format!("{P}.SubscribeToJWTBundlesResponse"), &o, &t);
}

#[test]
fn swapped_field_numbers_are_caught() {
    // What two fields with swapped numbers look like from the other side: the check must fail.
    let ours = ours_t::Selector {
        r#type: "unix".into(),
        value: "uid:0".into(),
    };
    let theirs = theirs_t::Selector {
        r#type: "uid:0".into(),
        value: "unix".into(),
    };
    let result =
        std::panic::catch_unwind(|| check_both_ways("spire.api.types.Selector", &ours, &theirs));
    assert!(result.is_err());
}
