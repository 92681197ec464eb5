//! JWT-SVID rules: for each rule a token that breaks exactly that rule, plus valid tokens.

#![allow(clippy::unwrap_used)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self as aws_sig, EcdsaKeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use rcgen::{KeyPair, PublicKeyData};
use serde_json::{Value, json};
use sigil_spiffe::{
    Bundle, BundleSet, JwtAlgorithm, JwtAuthority, JwtSvidError, SpiffeId, SpiffeIdError,
    TrustDomain, parse_jwt_svid_insecure, validate_jwt_svid,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

const NOW: u64 = 1_750_000_000;
const SUB: &str = "spiffe://example.org/workload";

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A signing key, its public JWK and a closure-free way to sign.
enum Key {
    Es256(EncodingKey),
    Es512(EcdsaKeyPair),
    Ps256(RsaKeyPair),
}

struct Signer {
    key: Key,
    jwk: Jwk,
}

impl Signer {
    fn es256() -> Signer {
        let kp = KeyPair::generate().unwrap();
        let enc = EncodingKey::from_ec_der(kp.serialized_der());
        let jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
        Signer {
            key: Key::Es256(enc),
            jwk,
        }
    }

    fn es512() -> Signer {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let raw = kp.public_key_raw();
        let jwk = serde_json::from_value(json!({
            "kty": "EC", "crv": "P-521", "x": b64(&raw[1..67]), "y": b64(&raw[67..]),
        }))
        .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &aws_sig::ECDSA_P521_SHA512_FIXED_SIGNING,
            kp.serialized_der(),
        )
        .unwrap();
        Signer {
            key: Key::Es512(pair),
            jwk,
        }
    }

    fn ps256() -> Signer {
        let kp =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let spki_der = kp.subject_public_key_info();
        let (_, spki) = SubjectPublicKeyInfo::from_der(&spki_der).unwrap();
        let PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
            panic!("not an RSA key")
        };
        let strip = |b: &[u8]| {
            b.iter()
                .skip_while(|x| **x == 0)
                .copied()
                .collect::<Vec<u8>>()
        };
        let jwk = serde_json::from_value(json!({
            "kty": "RSA", "n": b64(&strip(rsa.modulus)), "e": b64(&strip(rsa.exponent)),
        }))
        .unwrap();
        Signer {
            key: Key::Ps256(RsaKeyPair::from_pkcs8(kp.serialized_der()).unwrap()),
            jwk,
        }
    }

    fn sign(&self, message: &[u8]) -> String {
        match &self.key {
            Key::Es256(enc) => jsonwebtoken::crypto::sign(message, enc, Algorithm::ES256).unwrap(),
            Key::Es512(pair) => b64(pair.sign(&SystemRandom::new(), message).unwrap().as_ref()),
            Key::Ps256(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &aws_sig::RSA_PSS_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut sig,
                )
                .unwrap();
                b64(&sig)
            }
        }
    }

    /// A compact JWS of `header` and `claims` signed by this key.
    fn token(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(message.as_bytes());
        format!("{message}.{sig}")
    }
}

fn header() -> Value {
    json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
}

fn claims() -> Value {
    json!({"sub": SUB, "aud": ["svc"], "exp": NOW + 300, "iat": NOW - 10, "extra": {"a": 1}})
}

/// Bundles trusting `signer` as kid `k1` of example.org.
fn bundles(signer: &Signer) -> BundleSet {
    let mut b = Bundle::new(TrustDomain::parse("example.org").unwrap());
    b.jwt_authorities.push(JwtAuthority {
        key_id: "k1".into(),
        jwk: signer.jwk.clone(),
    });
    let mut set = BundleSet::new();
    set.insert(b);
    set
}

fn aud(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Validates a token made of `header` and `claims` by a fresh ES256 key that the bundle trusts.
fn validate(header: Value, claims: Value) -> Result<sigil_spiffe::JwtSvidClaims, JwtSvidError> {
    let s = Signer::es256();
    validate_jwt_svid(
        &s.token(&header, &claims),
        &bundles(&s),
        &aud(&["svc"]),
        NOW,
    )
}

/// A token whose parts are the given raw JSON texts and signature, unsigned.
fn raw_token(header: &str, claims: &str, sig: &str) -> String {
    format!(
        "{}.{}.{sig}",
        b64(header.as_bytes()),
        b64(claims.as_bytes())
    )
}

#[test]
fn valid_es256_token() {
    let c = validate(header(), claims()).unwrap();
    assert_eq!(c.spiffe_id, id(SUB));
    assert_eq!(c.audience, aud(&["svc"]));
    assert_eq!(c.expires_at, NOW + 300);
    assert_eq!(c.issued_at, Some(NOW - 10));
    assert_eq!(c.claims["extra"], json!({"a": 1}));
}

#[test]
fn valid_variants() {
    // No typ, typ JOSE, a single-string aud, a fractional exp.
    validate(json!({"alg": "ES256", "kid": "k1"}), claims()).unwrap();
    validate(
        json!({"alg": "ES256", "kid": "k1", "typ": "JOSE"}),
        claims(),
    )
    .unwrap();
    let c = validate(header(), json!({"sub": SUB, "aud": "svc", "exp": NOW + 1})).unwrap();
    assert_eq!(c.audience, aud(&["svc"]));
    assert_eq!(c.issued_at, None);
    let c = validate(
        header(),
        json!({"sub": SUB, "aud": "svc", "exp": (NOW as f64) + 1.5}),
    )
    .unwrap();
    assert_eq!(c.expires_at, NOW + 1);
}

#[test]
fn valid_es512_and_ps256_tokens() {
    for (signer, alg) in [(Signer::es512(), "ES512"), (Signer::ps256(), "PS256")] {
        let t = signer.token(&json!({"alg": alg, "kid": "k1"}), &claims());
        let c = validate_jwt_svid(&t, &bundles(&signer), &aud(&["svc"]), NOW).unwrap();
        assert_eq!(c.spiffe_id, id(SUB), "{alg}");
        // A flipped signature byte must fail for these algorithms too.
        let (msg, sig) = t.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[5] ^= 1;
        let bad = format!("{msg}.{}", b64(&sig));
        assert!(
            matches!(
                validate_jwt_svid(&bad, &bundles(&signer), &aud(&["svc"]), NOW),
                Err(JwtSvidError::BadSignature { .. })
            ),
            "{alg}"
        );
    }
}

#[test]
fn any_expected_audience_is_enough() {
    let s = Signer::es256();
    let t = s.token(
        &header(),
        &json!({"sub": SUB, "aud": ["a", "b"], "exp": NOW + 5}),
    );
    validate_jwt_svid(&t, &bundles(&s), &aud(&["x", "b"]), NOW).unwrap();
}

#[test]
fn rejects_json_serialization() {
    let t = json!({"payload": "e30", "signatures": [{"protected": "e30", "signature": "AA"}]});
    assert_eq!(
        parse_jwt_svid_insecure(&t.to_string()),
        Err(JwtSvidError::JsonSerialization)
    );
}

#[test]
fn rejects_jwe() {
    assert_eq!(
        parse_jwt_svid_insecure("eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"),
        Err(JwtSvidError::Encrypted)
    );
}

#[test]
fn rejects_wrong_part_count() {
    assert_eq!(
        parse_jwt_svid_insecure("a.b"),
        Err(JwtSvidError::PartCount { count: 2 })
    );
    assert_eq!(
        parse_jwt_svid_insecure("a.b.c.d"),
        Err(JwtSvidError::PartCount { count: 4 })
    );
}

#[test]
fn rejects_bad_base64_and_json() {
    let s = Signer::es256();
    let good = s.token(&header(), &claims());
    let padded = format!("{}=", good.split('.').next().unwrap());
    let t = good.replacen(good.split('.').next().unwrap(), &padded, 1);
    assert!(matches!(
        parse_jwt_svid_insecure(&t),
        Err(JwtSvidError::BadBase64 { part: "header", .. })
    ));
    assert!(matches!(
        parse_jwt_svid_insecure(&raw_token("not json", &claims().to_string(), "AA")),
        Err(JwtSvidError::BadJson { part: "header", .. })
    ));
    assert!(matches!(
        parse_jwt_svid_insecure(&raw_token(&header().to_string(), "[1]", "AA")),
        Err(JwtSvidError::BadJson {
            part: "payload",
            ..
        })
    ));
    assert!(matches!(
        parse_jwt_svid_insecure(&raw_token(
            &header().to_string(),
            &claims().to_string(),
            "***"
        )),
        Err(JwtSvidError::BadBase64 {
            part: "signature",
            ..
        })
    ));
}

#[test]
fn rejects_alg_none() {
    let t = raw_token(r#"{"alg":"none","kid":"k1"}"#, &claims().to_string(), "");
    let unsupported = Err(JwtSvidError::UnsupportedAlg { alg: "none".into() });
    assert_eq!(parse_jwt_svid_insecure(&t).map(|_| ()), unsupported);
    let s = Signer::es256();
    assert_eq!(
        validate_jwt_svid(&t, &bundles(&s), &aud(&["svc"]), NOW).map(|_| ()),
        unsupported
    );
}

#[test]
fn rejects_hs256() {
    // An HMAC keyed with the public key is the classic confusion attack; the alg must be refused first.
    let t = raw_token(
        r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#,
        &claims().to_string(),
        &b64(&[7u8; 32]),
    );
    let s = Signer::es256();
    assert_eq!(
        validate_jwt_svid(&t, &bundles(&s), &aud(&["svc"]), NOW).map(|_| ()),
        Err(JwtSvidError::UnsupportedAlg {
            alg: "HS256".into()
        })
    );
}

#[test]
fn rejects_missing_alg() {
    assert_eq!(
        validate(json!({"kid": "k1"}), claims()),
        Err(JwtSvidError::MissingAlg)
    );
}

#[test]
fn rejects_extra_header_member() {
    assert_eq!(
        validate(
            json!({"alg": "ES256", "kid": "k1", "jku": "https://x"}),
            claims()
        ),
        Err(JwtSvidError::UnexpectedHeader { name: "jku".into() })
    );
}

#[test]
fn rejects_bad_typ() {
    assert_eq!(
        validate(
            json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
            claims()
        ),
        Err(JwtSvidError::BadTyp {
            typ: "at+jwt".into()
        })
    );
}

#[test]
fn rejects_non_string_header_value() {
    assert_eq!(
        validate(json!({"alg": "ES256", "kid": 7}), claims()),
        Err(JwtSvidError::BadHeaderValue {
            name: "kid",
            found: "7".into()
        })
    );
}

fn without(claim: &str) -> Value {
    let mut c = claims();
    c.as_object_mut().unwrap().remove(claim);
    c
}

#[test]
fn rejects_missing_required_claims() {
    for claim in ["sub", "aud", "exp"] {
        assert_eq!(
            validate(header(), without(claim)),
            Err(JwtSvidError::MissingClaim { claim }),
            "{claim}"
        );
    }
}

#[test]
fn rejects_sub_that_is_not_a_spiffe_id() {
    let mut c = claims();
    c["sub"] = json!("https://example.org/w");
    assert_eq!(
        validate(header(), c),
        Err(JwtSvidError::BadSubject {
            sub: "https://example.org/w".into(),
            cause: SpiffeIdError::WrongScheme {
                value: "https://example.org/w".into()
            }
        })
    );
}

#[test]
fn rejects_sub_without_path() {
    let mut c = claims();
    c["sub"] = json!("spiffe://example.org");
    assert_eq!(
        validate(header(), c),
        Err(JwtSvidError::SubjectWithoutPath {
            sub: id("spiffe://example.org")
        })
    );
}

#[test]
fn rejects_bad_aud() {
    for (bad, found) in [
        (json!([]), "[]"),
        (json!(5), "5"),
        (json!(["ok", 5]), r#"["ok",5]"#),
    ] {
        let mut c = claims();
        c["aud"] = bad;
        assert_eq!(
            validate(header(), c),
            Err(JwtSvidError::BadAudience {
                found: found.into()
            })
        );
    }
}

#[test]
fn rejects_bad_exp() {
    for (bad, found) in [(json!("soon"), "\"soon\""), (json!(-5), "-5")] {
        let mut c = claims();
        c["exp"] = bad;
        assert_eq!(
            validate(header(), c),
            Err(JwtSvidError::BadTime {
                claim: "exp",
                found: found.into()
            })
        );
    }
}

#[test]
fn missing_kid_passes_parse_but_fails_validation() {
    let s = Signer::es256();
    let t = s.token(&json!({"alg": "ES256"}), &claims());
    let (h, _) = parse_jwt_svid_insecure(&t).unwrap();
    assert_eq!(h.alg, JwtAlgorithm::ES256);
    assert_eq!(h.kid, None);
    assert_eq!(
        validate_jwt_svid(&t, &bundles(&s), &aud(&["svc"]), NOW),
        Err(JwtSvidError::MissingKid { sub: id(SUB) })
    );
}

#[test]
fn rejects_unknown_kid() {
    assert_eq!(
        validate(json!({"alg": "ES256", "kid": "k2"}), claims()),
        Err(JwtSvidError::UnknownKid {
            kid: "k2".into(),
            trust_domain: TrustDomain::parse("example.org").unwrap()
        })
    );
}

#[test]
fn rejects_subject_of_a_trust_domain_without_bundle() {
    let mut c = claims();
    c["sub"] = json!("spiffe://other.org/w");
    assert_eq!(
        validate(header(), c),
        Err(JwtSvidError::NoBundle {
            sub: id("spiffe://other.org/w"),
            trust_domain: TrustDomain::parse("other.org").unwrap()
        })
    );
}

#[test]
fn rejects_signature_by_another_key() {
    let trusted = Signer::es256();
    let other = Signer::es256();
    let t = other.token(&header(), &claims());
    assert_eq!(
        validate_jwt_svid(&t, &bundles(&trusted), &aud(&["svc"]), NOW),
        Err(JwtSvidError::BadSignature {
            sub: id(SUB),
            kid: "k1".into(),
            alg: JwtAlgorithm::ES256
        })
    );
}

#[test]
fn rejects_tampered_payload() {
    let s = Signer::es256();
    let t = s.token(&header(), &claims());
    let parts: Vec<&str> = t.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("spiffe://example.org/admin");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    assert!(matches!(
        validate_jwt_svid(&forged, &bundles(&s), &aud(&["svc"]), NOW),
        Err(JwtSvidError::BadSignature { .. })
    ));
}

#[test]
fn rejects_alg_that_does_not_fit_the_key() {
    assert_eq!(
        validate(json!({"alg": "ES384", "kid": "k1"}), claims()),
        Err(JwtSvidError::KeyAlgMismatch {
            kid: "k1".into(),
            alg: JwtAlgorithm::ES384,
            key: "EC P256".into()
        })
    );
    assert!(matches!(
        validate(json!({"alg": "RS256", "kid": "k1"}), claims()),
        Err(JwtSvidError::KeyAlgMismatch {
            alg: JwtAlgorithm::RS256,
            ..
        })
    ));
}

#[test]
fn rejects_expired() {
    for exp in [NOW, NOW - 1] {
        let mut c = claims();
        c["exp"] = json!(exp);
        assert_eq!(
            validate(header(), c),
            Err(JwtSvidError::Expired {
                sub: id(SUB),
                exp,
                now: NOW
            })
        );
    }
}

#[test]
fn rejects_not_yet_valid() {
    let mut c = claims();
    c["nbf"] = json!(NOW + 60);
    assert_eq!(
        validate(header(), c),
        Err(JwtSvidError::NotYetValid {
            sub: id(SUB),
            nbf: NOW + 60,
            now: NOW
        })
    );
}

#[test]
fn rejects_audience_mismatch() {
    let s = Signer::es256();
    let t = s.token(&header(), &claims());
    assert_eq!(
        validate_jwt_svid(&t, &bundles(&s), &aud(&["other"]), NOW),
        Err(JwtSvidError::AudienceMismatch {
            sub: id(SUB),
            expected: aud(&["other"]),
            found: aud(&["svc"])
        })
    );
    // An empty expectation never matches.
    assert!(matches!(
        validate_jwt_svid(&t, &bundles(&s), &[], NOW),
        Err(JwtSvidError::AudienceMismatch { .. })
    ));
}
