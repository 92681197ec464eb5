//! JWT-SVID rules per the SPIFFE JWT-SVID spec: token structure, header and claims checks, and
//! signature validation against the JWT authorities of the subject's trust domain.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The JWS algorithms the JWT-SVID spec allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// ECDSA P-521 with SHA-512.
    ES512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
}

impl JwtAlgorithm {
    const ALL: [JwtAlgorithm; 9] = [
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
        JwtAlgorithm::ES512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
    ];

    /// The `alg` header value, e.g. `ES256`.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::ES512 => "ES512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
        }
    }

    /// Parses an `alg` header value; `None` for anything outside the allowed set (`none`, `HS256`...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The EC curve an ES* algorithm needs, `None` for RSA algorithms.
    fn curve(self) -> Option<EllipticCurve> {
        match self {
            JwtAlgorithm::ES256 => Some(EllipticCurve::P256),
            JwtAlgorithm::ES384 => Some(EllipticCurve::P384),
            JwtAlgorithm::ES512 => Some(EllipticCurve::P521),
            _ => None,
        }
    }

    /// The jsonwebtoken algorithm; ES512 has none there and is verified with aws-lc-rs directly.
    fn jsonwebtoken(self) -> Option<Algorithm> {
        Some(match self {
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::RS384 => Algorithm::RS384,
            JwtAlgorithm::RS512 => Algorithm::RS512,
            JwtAlgorithm::ES256 => Algorithm::ES256,
            JwtAlgorithm::ES384 => Algorithm::ES384,
            JwtAlgorithm::ES512 => return None,
            JwtAlgorithm::PS256 => Algorithm::PS256,
            JwtAlgorithm::PS384 => Algorithm::PS384,
            JwtAlgorithm::PS512 => Algorithm::PS512,
        })
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JOSE header of a JWT-SVID: the only members it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtHeader {
    /// Signature algorithm.
    pub alg: JwtAlgorithm,
    /// Key ID of the signing authority; required for validation.
    pub kid: Option<String>,
    /// Token type, `JWT` or `JOSE` when present.
    pub typ: Option<String>,
}

/// The claims of a JWT-SVID, with the required ones already checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSvidClaims {
    /// `sub`: the workload's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// `aud`: the intended audiences (never empty).
    pub audience: Vec<String>,
    /// `exp`: expiry, Unix seconds.
    pub expires_at: u64,
    /// `iat`: issue time, Unix seconds.
    pub issued_at: Option<u64>,
    /// Every claim of the token, including the ones above.
    pub claims: Map<String, Value>,
}

/// Why a JWT-SVID was rejected; each variant names the rule and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtSvidError {
    /// The token uses the JWS JSON serialization; only the compact form is allowed.
    #[error("JWT-SVID must use JWS compact serialization, not JSON serialization")]
    JsonSerialization,
    /// The token is a JWE (five parts); JWT-SVIDs are signed, not encrypted.
    #[error("JWT-SVID must be a JWS, found a JWE (5 parts)")]
    Encrypted,
    /// The token does not have three dot-separated parts.
    #[error("JWT-SVID must have 3 dot-separated parts, found {count}")]
    PartCount { count: usize },
    /// A part is not unpadded base64url.
    #[error("JWT-SVID {part} is not base64url: {reason}")]
    BadBase64 { part: &'static str, reason: String },
    /// The header or payload is not a JSON object.
    #[error("JWT-SVID {part} is not a JSON object: {reason}")]
    BadJson { part: &'static str, reason: String },
    /// The header has no `alg`.
    #[error("JWT-SVID header has no \"alg\"")]
    MissingAlg,
    /// The `alg` is not one of RS/ES/PS 256/384/512.
    #[error(
        "JWT-SVID alg {alg:?} is not allowed (RS256/384/512, ES256/384/512, PS256/384/512 only)"
    )]
    UnsupportedAlg { alg: String },
    /// The header holds a member other than `alg`, `kid` and `typ`.
    #[error("JWT-SVID header member {name:?} is not allowed (only alg, kid, typ)")]
    UnexpectedHeader { name: String },
    /// A header member is not a string.
    #[error("JWT-SVID header {name:?} must be a string, found {found}")]
    BadHeaderValue { name: &'static str, found: String },
    /// `typ` is present but is neither `JWT` nor `JOSE`.
    #[error("JWT-SVID typ {typ:?} is not allowed (JWT or JOSE only)")]
    BadTyp { typ: String },
    /// A required claim is missing.
    #[error("JWT-SVID has no {claim:?} claim")]
    MissingClaim { claim: &'static str },
    /// `sub` is not a SPIFFE ID.
    #[error("JWT-SVID sub {sub:?} is not a SPIFFE ID: {cause}")]
    BadSubject { sub: String, cause: SpiffeIdError },
    /// `sub` names a trust domain rather than a workload.
    #[error("JWT-SVID sub {sub} has no path")]
    SubjectWithoutPath { sub: SpiffeId },
    /// `aud` is neither a string nor a non-empty array of strings.
    #[error("JWT-SVID aud must be a string or a non-empty array of strings, found {found}")]
    BadAudience { found: String },
    /// A time claim is not a non-negative number.
    #[error("JWT-SVID {claim:?} must be a non-negative NumericDate, found {found}")]
    BadTime { claim: &'static str, found: String },
    /// Validation needs a `kid` to find the signing key.
    #[error("JWT-SVID of {sub} has no kid in its header")]
    MissingKid { sub: SpiffeId },
    /// No bundle is known for the subject's trust domain.
    #[error("no bundle for trust domain {trust_domain} (of JWT-SVID sub {sub})")]
    NoBundle {
        sub: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// The bundle has no JWT authority with the token's `kid`.
    #[error("bundle of {trust_domain} has no JWT authority with kid {kid:?}")]
    UnknownKid {
        kid: String,
        trust_domain: TrustDomain,
    },
    /// The authority's key cannot verify the token's `alg`.
    #[error("JWT authority {kid:?} ({key}) cannot verify alg {alg}")]
    KeyAlgMismatch {
        kid: String,
        alg: JwtAlgorithm,
        key: String,
    },
    /// The authority's key is unusable.
    #[error("JWT authority {kid:?} is not a usable key: {reason}")]
    BadKey { kid: String, reason: String },
    /// The signature does not verify with the authority's key.
    #[error("JWT-SVID of {sub} has an invalid {alg} signature for kid {kid:?}")]
    BadSignature {
        sub: SpiffeId,
        kid: String,
        alg: JwtAlgorithm,
    },
    /// The token has expired.
    #[error("JWT-SVID of {sub} expired at {exp} (now {now})")]
    Expired { sub: SpiffeId, exp: u64, now: u64 },
    /// The token's `nbf` is in the future.
    #[error("JWT-SVID of {sub} is not valid before {nbf} (now {now})")]
    NotYetValid { sub: SpiffeId, nbf: u64, now: u64 },
    /// None of the expected audiences is in the token's `aud`.
    #[error("JWT-SVID of {sub} has audience {found:?}, none of the expected {expected:?}")]
    AudienceMismatch {
        sub: SpiffeId,
        expected: Vec<String>,
        found: Vec<String>,
    },
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        other => other.to_string(),
    }
}

fn decode_part(part: &'static str, b64: &str) -> Result<Vec<u8>, JwtSvidError> {
    URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| JwtSvidError::BadBase64 {
            part,
            reason: e.to_string(),
        })
}

fn json_object(part: &'static str, b64: &str) -> Result<Map<String, Value>, JwtSvidError> {
    let bytes = decode_part(part, b64)?;
    serde_json::from_slice(&bytes).map_err(|e| JwtSvidError::BadJson {
        part,
        reason: e.to_string(),
    })
}

fn header_string(
    obj: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<String>, JwtSvidError> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(JwtSvidError::BadHeaderValue {
            name,
            found: json_kind(other),
        }),
    }
}

fn parse_header(obj: &Map<String, Value>) -> Result<JwtHeader, JwtSvidError> {
    if let Some(name) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtSvidError::UnexpectedHeader { name: name.clone() });
    }
    let alg = header_string(obj, "alg")?.ok_or(JwtSvidError::MissingAlg)?;
    let alg = JwtAlgorithm::parse(&alg).ok_or(JwtSvidError::UnsupportedAlg { alg })?;
    let typ = header_string(obj, "typ")?;
    if let Some(typ) = typ
        .as_ref()
        .filter(|t| !matches!(t.as_str(), "JWT" | "JOSE"))
    {
        return Err(JwtSvidError::BadTyp { typ: typ.clone() });
    }
    let kid = header_string(obj, "kid")?;
    Ok(JwtHeader { alg, kid, typ })
}

/// A NumericDate: JSON number of seconds; fractions are allowed by RFC 7519 and truncated.
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<u64>, JwtSvidError> {
    let Some(v) = claims.get(claim) else {
        return Ok(None);
    };
    let bad = || JwtSvidError::BadTime {
        claim,
        found: json_kind(v),
    };
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match v.as_f64() {
        // The range check makes the truncating cast exact enough: out-of-range values are rejected.
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(bad()),
    }
}

fn parse_claims(claims: Map<String, Value>) -> Result<JwtSvidClaims, JwtSvidError> {
    let sub = match claims.get("sub") {
        None => return Err(JwtSvidError::MissingClaim { claim: "sub" }),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(JwtSvidError::BadSubject {
                sub: json_kind(other),
                cause: SpiffeIdError::Empty,
            });
        }
    };
    let spiffe_id = SpiffeId::parse(sub).map_err(|source| JwtSvidError::BadSubject {
        sub: sub.clone(),
        cause: source,
    })?;
    if spiffe_id.is_trust_domain_id() {
        return Err(JwtSvidError::SubjectWithoutPath { sub: spiffe_id });
    }
    let audience = match claims.get("aud") {
        None => return Err(JwtSvidError::MissingClaim { claim: "aud" }),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| JwtSvidError::BadAudience {
                found: Value::Array(items.clone()).to_string(),
            })?,
        Some(other) => {
            return Err(JwtSvidError::BadAudience {
                found: other.to_string(),
            });
        }
    };
    let expires_at =
        numeric_date(&claims, "exp")?.ok_or(JwtSvidError::MissingClaim { claim: "exp" })?;
    let issued_at = numeric_date(&claims, "iat")?;
    numeric_date(&claims, "nbf")?;
    Ok(JwtSvidClaims {
        spiffe_id,
        audience,
        expires_at,
        issued_at,
        claims,
    })
}

/// The three compact parts, after rejecting the JSON serialization and JWE.
fn split_compact(token: &str) -> Result<[&str; 3], JwtSvidError> {
    if token.trim_start().starts_with('{') {
        return Err(JwtSvidError::JsonSerialization);
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.as_slice() {
        [h, p, s] => Ok([h, p, s]),
        five if five.len() == 5 => Err(JwtSvidError::Encrypted),
        other => Err(JwtSvidError::PartCount { count: other.len() }),
    }
}

/// Checks a JWT-SVID's structure, header and claims without verifying its signature.
pub fn parse_jwt_svid_insecure(token: &str) -> Result<(JwtHeader, JwtSvidClaims), JwtSvidError> {
    let [h, p, s] = split_compact(token)?;
    let header = parse_header(&json_object("header", h)?)?;
    let claims = parse_claims(json_object("payload", p)?)?;
    decode_part("signature", s)?;
    Ok((header, claims))
}

fn describe_key(jwk: &Jwk) -> String {
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => format!("EC {:?}", p.curve),
        AlgorithmParameters::RSA(_) => "RSA".into(),
        AlgorithmParameters::OctetKeyPair(p) => format!("OKP {:?}", p.curve),
        AlgorithmParameters::OctetKey(_) => "oct".into(),
        _ => "unknown key type".into(),
    }
}

/// Whether `jwk` is a key of the type and curve `alg` signs with, and its own `alg` (if any) agrees.
fn key_fits(jwk: &Jwk, alg: JwtAlgorithm) -> bool {
    if jwk
        .common
        .key_algorithm
        .is_some_and(|key_alg| key_alg.to_string() != alg.as_str())
    {
        return false;
    }
    match (&jwk.algorithm, alg.curve()) {
        (AlgorithmParameters::EllipticCurve(p), Some(curve)) => p.curve == curve,
        (AlgorithmParameters::RSA(_), None) => true,
        _ => false,
    }
}

/// Verifies `signature` over `message`; `Ok(false)` is a well-formed key that rejects the signature.
fn verify_signature(
    jwk: &Jwk,
    alg: JwtAlgorithm,
    message: &[u8],
    signature: &str,
) -> Result<bool, String> {
    match (alg.jsonwebtoken(), &jwk.algorithm) {
        (Some(jwt_alg), _) => {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
            jsonwebtoken::crypto::verify(signature, message, &key, jwt_alg)
                .map_err(|e| e.to_string())
        }
        (None, AlgorithmParameters::EllipticCurve(p)) => {
            let x = URL_SAFE_NO_PAD
                .decode(&p.x)
                .map_err(|e| format!("x: {e}"))?;
            let y = URL_SAFE_NO_PAD
                .decode(&p.y)
                .map_err(|e| format!("y: {e}"))?;
            let sig = URL_SAFE_NO_PAD
                .decode(signature)
                .map_err(|e| e.to_string())?;
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let key = aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED,
                point,
            );
            Ok(key.verify(message, &sig).is_ok())
        }
        (None, _) => Err(format!("{alg} needs an EC key")),
    }
}

/// Validates a JWT-SVID: structure, signature against the `kid` authority in the bundle of the `sub`'s
/// trust domain, expiry at `now_unix`, and that its `aud` holds at least one of `audience` (an empty
/// `audience` never matches).
pub fn validate_jwt_svid(
    token: &str,
    bundles: &BundleSet,
    audience: &[String],
    now_unix: u64,
) -> Result<JwtSvidClaims, JwtSvidError> {
    let (header, claims) = parse_jwt_svid_insecure(token)?;
    let sub = claims.spiffe_id.clone();
    let Some(kid) = header.kid else {
        return Err(JwtSvidError::MissingKid { sub });
    };
    let trust_domain = sub.trust_domain();
    let Some(bundle) = bundles.get(&trust_domain) else {
        return Err(JwtSvidError::NoBundle { sub, trust_domain });
    };
    let Some(authority) = bundle.jwt_authority(&kid) else {
        return Err(JwtSvidError::UnknownKid { kid, trust_domain });
    };
    if !key_fits(&authority.jwk, header.alg) {
        return Err(JwtSvidError::KeyAlgMismatch {
            kid,
            alg: header.alg,
            key: describe_key(&authority.jwk),
        });
    }
    // split_compact succeeded inside parse_jwt_svid_insecure, so the last '.' separates the signature.
    let (message, signature) = token.rsplit_once('.').unwrap_or((token, ""));
    match verify_signature(&authority.jwk, header.alg, message.as_bytes(), signature) {
        Ok(true) => {}
        Ok(false) => {
            return Err(JwtSvidError::BadSignature {
                sub,
                kid,
                alg: header.alg,
            });
        }
        Err(reason) => return Err(JwtSvidError::BadKey { kid, reason }),
    }
    if now_unix >= claims.expires_at {
        return Err(JwtSvidError::Expired {
            sub,
            exp: claims.expires_at,
            now: now_unix,
        });
    }
    if let Some(nbf) = numeric_date(&claims.claims, "nbf")?.filter(|nbf| now_unix < *nbf) {
        return Err(JwtSvidError::NotYetValid {
            sub,
            nbf,
            now: now_unix,
        });
    }
    if !claims.audience.iter().any(|a| audience.contains(a)) {
        return Err(JwtSvidError::AudienceMismatch {
            sub,
            expected: audience.to_vec(),
            found: claims.audience,
        });
    }
    Ok(claims)
}
