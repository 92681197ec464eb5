//! SPIFFE bundle format: round trips of the JSON, PEM and map forms, and one fixture per rejection.

#![allow(clippy::unwrap_used)]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey};
use rcgen::{CertificateParams, KeyPair, SignatureAlgorithm};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use sigil_spiffe::{Bundle, BundleError, BundleSet, JwtAuthority, TrustDomain};

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn self_signed(key: &KeyPair) -> CertificateDer<'static> {
    CertificateParams::new(vec!["ca.example.org".to_string()])
        .unwrap()
        .self_signed(key)
        .unwrap()
        .der()
        .clone()
}

fn cert_for(alg: &'static SignatureAlgorithm) -> (KeyPair, CertificateDer<'static>) {
    let key = KeyPair::generate_for(alg).unwrap();
    let cert = self_signed(&key);
    (key, cert)
}

fn rsa_cert() -> CertificateDer<'static> {
    let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    self_signed(&key)
}

fn es256_jwk() -> Jwk {
    let key = KeyPair::generate().unwrap();
    let enc = EncodingKey::from_ec_der(key.serialized_der());
    Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap()
}

fn x5c(cert: &CertificateDer<'_>) -> Value {
    json!([STANDARD.encode(cert.as_ref())])
}

fn parse(doc: Value) -> Result<Bundle, BundleError> {
    Bundle::from_json(td("example.org"), doc.to_string().as_bytes())
}

/// The x509-svid entry this crate writes for `cert`.
fn x509_entry(cert: &CertificateDer<'static>) -> Value {
    let mut b = Bundle::new(td("example.org"));
    b.x509_authorities.push(cert.clone());
    let doc: Value = serde_json::from_str(&b.to_json()).unwrap();
    doc["keys"][0].clone()
}

fn jwt_entry(kid: &str) -> Value {
    let mut v = serde_json::to_value(es256_jwk()).unwrap();
    v["use"] = json!("jwt-svid");
    v["kid"] = json!(kid);
    v
}

#[test]
fn json_round_trip() {
    let (_, p256) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, p384) = cert_for(&rcgen::PKCS_ECDSA_P384_SHA384);
    let (_, ed) = cert_for(&rcgen::PKCS_ED25519);
    let rsa = rsa_cert();
    let mut b = Bundle::new(td("example.org"));
    b.x509_authorities = vec![p256, p384, ed, rsa];
    b.jwt_authorities.push(JwtAuthority {
        key_id: "k1".into(),
        jwk: es256_jwk(),
    });
    b.sequence = 42;
    b.refresh_hint = Some(300);
    let text = b.to_json();
    let back = Bundle::from_json(td("example.org"), text.as_bytes()).unwrap();
    assert_eq!(back.trust_domain, b.trust_domain);
    assert_eq!(back.x509_authorities, b.x509_authorities);
    assert_eq!(back.sequence, 42);
    assert_eq!(back.refresh_hint, Some(300));
    assert_eq!(back.jwt_authorities.len(), 1);
    let a = &back.jwt_authorities[0];
    assert_eq!(a.key_id, "k1");
    assert_eq!(a.jwk.algorithm, b.jwt_authorities[0].jwk.algorithm);
    // Writing what was read gives the same document.
    assert_eq!(back.to_json(), text);
}

#[test]
fn empty_bundle_round_trip() {
    let b = Bundle::new(td("example.org"));
    let text = b.to_json();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc, json!({"keys": [], "spiffe_sequence": 0}));
    assert_eq!(
        Bundle::from_json(td("example.org"), text.as_bytes()).unwrap(),
        b
    );
}

#[test]
fn jwt_entry_output_carries_use_and_kid() {
    let mut b = Bundle::new(td("example.org"));
    let jwk = es256_jwk();
    assert!(jwk.common.key_id.is_none() && jwk.common.public_key_use.is_none());
    b.jwt_authorities.push(JwtAuthority {
        key_id: "abc".into(),
        jwk,
    });
    let doc: Value = serde_json::from_str(&b.to_json()).unwrap();
    let key = &doc["keys"][0];
    assert_eq!(key["use"], "jwt-svid");
    assert_eq!(key["kid"], "abc");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    let back = Bundle::from_json(td("example.org"), b.to_json().as_bytes()).unwrap();
    assert_eq!(
        back.jwt_authority("abc").unwrap().jwk.common.public_key_use,
        Some(PublicKeyUse::Other("jwt-svid".into()))
    );
}

#[test]
fn x509_entry_carries_the_certificate_key() {
    let (key, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let e = x509_entry(&cert);
    let raw = key.public_key_raw();
    assert_eq!(e["use"], "x509-svid");
    assert_eq!(e["kty"], "EC");
    assert_eq!(e["crv"], "P-256");
    assert_eq!(e["x"], URL_SAFE_NO_PAD.encode(&raw[1..33]));
    assert_eq!(e["y"], URL_SAFE_NO_PAD.encode(&raw[33..]));
    assert_eq!(e["x5c"], x5c(&cert));
    assert!(e.get("kid").is_none());

    let e = x509_entry(&rsa_cert());
    assert_eq!(e["kty"], "RSA");
    assert_eq!(e["e"], "AQAB");
    // A 2048-bit modulus with no leading zero byte.
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(e["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
}

#[test]
fn x509_entry_without_key_members_is_accepted() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let b = parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": x5c(&cert)}]})).unwrap();
    assert_eq!(b.x509_authorities, vec![cert]);
    assert_eq!(b.sequence, 0);
    assert_eq!(b.refresh_hint, None);
}

#[test]
fn unknown_use_and_kty_are_skipped() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let b = parse(json!({"keys": [
        {"use": "sig", "kty": "EC", "x5c": ["not even base64"]},
        {"kty": "EC", "crv": "P-256"},
        {"use": "x509-svid", "kty": "quantum", "x5c": []},
        {"use": "jwt-svid", "kty": "oct", "k": "c2VjcmV0"},
        {"use": "x509-svid", "kty": "EC", "x5c": x5c(&cert)},
    ]}))
    .unwrap();
    assert_eq!(b.x509_authorities.len(), 1);
    assert!(b.jwt_authorities.is_empty());
}

#[test]
fn rejects_non_json() {
    assert!(matches!(
        Bundle::from_json(td("example.org"), b"{keys"),
        Err(BundleError::Json { .. })
    ));
}

#[test]
fn rejects_non_object() {
    assert_eq!(
        parse(json!([1])),
        Err(BundleError::NotAnObject {
            found: "an array".into()
        })
    );
}

#[test]
fn rejects_missing_or_bad_keys() {
    assert_eq!(
        parse(json!({"spiffe_sequence": 1})),
        Err(BundleError::BadKeys {
            found: "nothing".into()
        })
    );
    assert_eq!(
        parse(json!({"keys": {}})),
        Err(BundleError::BadKeys {
            found: "an object".into()
        })
    );
}

#[test]
fn rejects_key_that_is_not_an_object() {
    assert_eq!(
        parse(json!({"keys": ["x"]})),
        Err(BundleError::KeyNotAnObject {
            index: 0,
            found: "\"x\"".into()
        })
    );
}

#[test]
fn rejects_known_use_without_kty() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        parse(json!({"keys": [{"use": "x509-svid", "x5c": x5c(&cert)}]})),
        Err(BundleError::MissingKty {
            index: 0,
            key_use: "x509-svid".into()
        })
    );
}

#[test]
fn rejects_x509_without_x5c() {
    assert_eq!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC"}]})),
        Err(BundleError::MissingX5c { index: 0 })
    );
}

#[test]
fn rejects_x509_with_two_or_zero_certs() {
    let (_, a) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, b) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let two = json!([STANDARD.encode(a.as_ref()), STANDARD.encode(b.as_ref())]);
    assert_eq!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": two}]})),
        Err(BundleError::X5cCount { index: 0, count: 2 })
    );
    assert_eq!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": []}]})),
        Err(BundleError::X5cCount { index: 0, count: 0 })
    );
}

#[test]
fn rejects_x5c_that_is_not_an_array() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let one = STANDARD.encode(cert.as_ref());
    assert!(matches!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": one}]})),
        Err(BundleError::X5cNotArray { index: 0, .. })
    ));
}

#[test]
fn rejects_x5c_that_is_not_base64() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    // URL-safe base64 is not what x5c holds.
    let url_safe = URL_SAFE_NO_PAD.encode(cert.as_ref());
    assert!(matches!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["***"]}]})),
        Err(BundleError::BadX5cBase64 { index: 0, .. })
    ));
    if url_safe.contains(['-', '_']) || url_safe.len() % 4 != 0 {
        assert!(matches!(
            parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [url_safe]}]})),
            Err(BundleError::BadX5cBase64 { index: 0, .. })
        ));
    }
}

#[test]
fn rejects_x5c_that_is_not_a_certificate() {
    let junk = STANDARD.encode(b"hello world");
    assert!(matches!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [junk]}]})),
        Err(BundleError::BadCertificate { index: 0, .. })
    ));
}

#[test]
fn rejects_kty_that_does_not_match_the_certificate() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        parse(json!({"keys": [{"use": "x509-svid", "kty": "RSA", "x5c": x5c(&cert)}]})),
        Err(BundleError::KeyMismatch {
            index: 0,
            field: "kty",
            value: "RSA".into()
        })
    );
}

#[test]
fn rejects_key_members_that_do_not_match_the_certificate() {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, other) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut e = x509_entry(&cert);
    e["x"] = x509_entry(&other)["x"].clone();
    let wrong_x = e["x"].as_str().unwrap().to_string();
    assert_eq!(
        parse(json!({"keys": [e.clone()]})),
        Err(BundleError::KeyMismatch {
            index: 0,
            field: "x",
            value: wrong_x
        })
    );
    e = x509_entry(&cert);
    e["crv"] = json!("P-384");
    assert_eq!(
        parse(json!({"keys": [e]})),
        Err(BundleError::KeyMismatch {
            index: 0,
            field: "crv",
            value: "P-384".into()
        })
    );
}

#[test]
fn rejects_jwt_without_kid() {
    let mut e = jwt_entry("k");
    e.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        parse(json!({"keys": [e]})),
        Err(BundleError::MissingKid { index: 0 })
    );
    assert_eq!(
        parse(json!({"keys": [jwt_entry("")]})),
        Err(BundleError::MissingKid { index: 0 })
    );
}

#[test]
fn rejects_duplicate_kid() {
    assert_eq!(
        parse(json!({"keys": [jwt_entry("k"), jwt_entry("k")]})),
        Err(BundleError::DuplicateKid {
            index: 1,
            kid: "k".into()
        })
    );
}

#[test]
fn rejects_unusable_jwt_key() {
    let mut e = jwt_entry("k");
    e.as_object_mut().unwrap().remove("y");
    assert!(matches!(
        parse(json!({"keys": [e]})),
        Err(BundleError::BadJwk { index: 0, kid, kty, .. }) if kid == "k" && kty == "EC"
    ));
    let mut e = jwt_entry("k");
    e["x"] = json!(URL_SAFE_NO_PAD.encode([1u8; 31]));
    assert!(matches!(
        parse(json!({"keys": [e]})),
        Err(BundleError::BadJwk { reason, .. }) if reason.contains("31 bytes")
    ));
    let rsa_missing_e = json!({"use": "jwt-svid", "kty": "RSA", "kid": "r", "n": "AQAB"});
    assert!(matches!(
        parse(json!({"keys": [rsa_missing_e]})),
        Err(BundleError::BadJwk { index: 0, .. })
    ));
}

#[test]
fn rsa_jwt_authority_is_read() {
    let rsa = x509_entry(&rsa_cert());
    let e = json!({"use": "jwt-svid", "kty": "RSA", "kid": "r", "n": rsa["n"], "e": rsa["e"]});
    let b = parse(json!({"keys": [e]})).unwrap();
    assert!(matches!(
        b.jwt_authority("r").unwrap().jwk.algorithm,
        AlgorithmParameters::RSA(_)
    ));
    assert!(b.jwt_authority("other").is_none());
}

#[test]
fn rejects_bad_sequence_and_refresh_hint() {
    assert_eq!(
        parse(json!({"keys": [], "spiffe_sequence": -1})),
        Err(BundleError::BadSequence { value: "-1".into() })
    );
    assert_eq!(
        parse(json!({"keys": [], "spiffe_sequence": "7"})),
        Err(BundleError::BadSequence {
            value: "\"7\"".into()
        })
    );
    assert_eq!(
        parse(json!({"keys": [], "spiffe_refresh_hint": 1.5})),
        Err(BundleError::BadRefreshHint {
            value: "1.5".into()
        })
    );
}

#[test]
fn pem_round_trip() {
    let (_, a) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, b) = cert_for(&rcgen::PKCS_ED25519);
    let mut bundle = Bundle::new(td("example.org"));
    bundle.x509_authorities = vec![a, b];
    let pem = bundle.to_x509_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(pem.lines().all(|l| l.len() <= 64));
    let back = Bundle::from_x509_pem(td("example.org"), &pem).unwrap();
    assert_eq!(back, bundle);
}

#[test]
fn pem_skips_other_blocks() {
    let (key, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let pem = format!(
        "{}{}",
        key.serialize_pem(),
        Bundle {
            x509_authorities: vec![cert.clone()],
            ..Bundle::new(td("example.org"))
        }
        .to_x509_pem()
    );
    let back = Bundle::from_x509_pem(td("example.org"), &pem).unwrap();
    assert_eq!(back.x509_authorities, vec![cert]);
}

#[test]
fn pem_rejections() {
    assert_eq!(
        Bundle::from_x509_pem(td("example.org"), ""),
        Err(BundleError::NoPemCertificates)
    );
    let key = KeyPair::generate().unwrap();
    assert_eq!(
        Bundle::from_x509_pem(td("example.org"), &key.serialize_pem()),
        Err(BundleError::NoPemCertificates)
    );
    let junk = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        STANDARD.encode(b"not a certificate")
    );
    assert!(matches!(
        Bundle::from_x509_pem(td("example.org"), &junk),
        Err(BundleError::BadCertificate { index: 0, .. })
    ));
    let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        Bundle::from_x509_pem(td("example.org"), bad_base64),
        Err(BundleError::Pem { .. })
    ));
}

fn bundle_with_seq(name: &str, seq: u64) -> Bundle {
    let (_, cert) = cert_for(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut b = Bundle::new(td(name));
    b.x509_authorities.push(cert);
    b.sequence = seq;
    b
}

#[test]
fn bundle_set_insert_replaces_and_iterates_in_order() {
    let mut set = BundleSet::new();
    assert!(set.is_empty());
    set.insert(bundle_with_seq("z.org", 1));
    set.insert(bundle_with_seq("a.org", 1));
    set.insert(bundle_with_seq("z.org", 2));
    assert_eq!(set.len(), 2);
    assert_eq!(set.get(&td("z.org")).unwrap().sequence, 2);
    assert!(set.get(&td("b.org")).is_none());
    let names: Vec<&str> = set.iter().map(|b| b.trust_domain.as_str()).collect();
    assert_eq!(names, ["a.org", "z.org"]);
    assert_eq!(set.remove(&td("a.org")).unwrap().trust_domain, td("a.org"));
    assert_eq!(set.len(), 1);
}

#[test]
fn bundle_set_json_map_round_trip() {
    let mut set = BundleSet::new();
    set.insert(bundle_with_seq("a.org", 3));
    set.insert(bundle_with_seq("b.org", 4));
    let text = set.to_json_map();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["a.org"]["spiffe_sequence"], 3);
    assert_eq!(BundleSet::from_json_map(text.as_bytes()).unwrap(), set);
    assert_eq!(BundleSet::from_json_map(b"{}").unwrap(), BundleSet::new());
}

#[test]
fn bundle_set_rejects_duplicate_trust_domain() {
    let one = Bundle::new(td("example.org")).to_json();
    let dup = format!(r#"{{"example.org": {one}, "example.org": {one}}}"#);
    assert_eq!(
        BundleSet::from_json_map(dup.as_bytes()),
        Err(BundleError::DuplicateTrustDomain {
            trust_domain: "example.org".into()
        })
    );
    // The same trust domain spelled as its SPIFFE ID is still the same trust domain.
    let dup = format!(r#"{{"example.org": {one}, "spiffe://example.org": {one}}}"#);
    assert_eq!(
        BundleSet::from_json_map(dup.as_bytes()),
        Err(BundleError::DuplicateTrustDomain {
            trust_domain: "example.org".into()
        })
    );
}

#[test]
fn bundle_set_rejections() {
    let one = Bundle::new(td("example.org")).to_json();
    assert!(matches!(
        BundleSet::from_json_map(format!(r#"{{"Bad.org": {one}}}"#).as_bytes()),
        Err(BundleError::BadTrustDomain { key, .. }) if key == "Bad.org"
    ));
    assert_eq!(
        BundleSet::from_json_map(br#"{"a.org": {"keys": 1}}"#),
        Err(BundleError::InMap {
            trust_domain: "a.org".into(),
            cause: Box::new(BundleError::BadKeys { found: "1".into() })
        })
    );
    assert!(matches!(
        BundleSet::from_json_map(b"[]"),
        Err(BundleError::Json { .. })
    ));
    assert!(matches!(
        BundleSet::from_json_map(b"{\"a.org\": "),
        Err(BundleError::Json { .. })
    ));
}
