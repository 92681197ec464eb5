//! SPIFFE bundles (the trust domain and bundle spec): a JWK Set holding a trust domain's X.509 and JWT
//! authorities, plus the PEM form of its X.509 authorities and a map of bundles keyed by trust domain.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Map, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_NIST_EC_P521, OID_SIG_ED25519};
use x509_parser::public_key::PublicKey;

use crate::id::{SpiffeIdError, TrustDomain};

const X509_SVID_USE: &str = "x509-svid";
const JWT_SVID_USE: &str = "jwt-svid";

/// Why a bundle document, PEM bundle or bundle map was rejected; variants carry the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The document is not JSON.
    #[error("bundle is not valid JSON: {reason}")]
    Json { reason: String },
    /// The document (or a map entry) is JSON but not an object.
    #[error("bundle document must be a JSON object, found {found}")]
    NotAnObject { found: String },
    /// The required `keys` member is missing or is not an array.
    #[error("bundle \"keys\" must be an array, found {found}")]
    BadKeys { found: String },
    /// An entry of `keys` is not a JSON object.
    #[error("keys[{index}]: entry must be a JSON object, found {found}")]
    KeyNotAnObject { index: usize, found: String },
    /// A known `use` entry has no `kty` (or a non-string one).
    #[error("keys[{index}] ({key_use}): \"kty\" is missing or not a string")]
    MissingKty { index: usize, key_use: String },
    /// An `x509-svid` entry has no `x5c`.
    #[error("keys[{index}] (x509-svid): \"x5c\" is missing")]
    MissingX5c { index: usize },
    /// An `x509-svid` entry's `x5c` is not an array.
    #[error("keys[{index}] (x509-svid): \"x5c\" must be an array, found {found}")]
    X5cNotArray { index: usize, found: String },
    /// An `x509-svid` entry's `x5c` does not hold exactly one certificate.
    #[error("keys[{index}] (x509-svid): \"x5c\" must hold exactly one certificate, found {count}")]
    X5cCount { index: usize, count: usize },
    /// An `x5c` element is not a standard base64 string.
    #[error("keys[{index}] (x509-svid): x5c[0] is not standard base64: {reason}")]
    BadX5cBase64 { index: usize, reason: String },
    /// A certificate is not a DER X.509 certificate (`index` is the key or PEM block position).
    #[error("certificate {index} is not a DER X.509 certificate: {reason}")]
    BadCertificate { index: usize, reason: String },
    /// An `x509-svid` entry's JWK key parameters do not describe its certificate's key.
    #[error(
        "keys[{index}] (x509-svid): JWK {field} {value:?} does not match the certificate's key"
    )]
    KeyMismatch {
        index: usize,
        field: &'static str,
        value: String,
    },
    /// A `jwt-svid` entry has no (or an empty) `kid`.
    #[error("keys[{index}] (jwt-svid): \"kid\" is missing or empty")]
    MissingKid { index: usize },
    /// Two `jwt-svid` entries share a `kid`.
    #[error("keys[{index}] (jwt-svid): kid {kid:?} appears more than once")]
    DuplicateKid { index: usize, kid: String },
    /// A `jwt-svid` entry is not a usable public key of its `kty`.
    #[error("keys[{index}] (jwt-svid, kid {kid:?}): not a usable {kty} public key: {reason}")]
    BadJwk {
        index: usize,
        kid: String,
        kty: String,
        reason: String,
    },
    /// `spiffe_sequence` is not a non-negative integer.
    #[error("\"spiffe_sequence\" must be a non-negative integer, found {value}")]
    BadSequence { value: String },
    /// `spiffe_refresh_hint` is not a non-negative integer.
    #[error("\"spiffe_refresh_hint\" must be a non-negative integer (seconds), found {value}")]
    BadRefreshHint { value: String },
    /// The PEM text could not be read.
    #[error("PEM bundle: {reason}")]
    Pem { reason: String },
    /// The PEM text holds no `CERTIFICATE` block.
    #[error("PEM bundle holds no CERTIFICATE block")]
    NoPemCertificates,
    /// A bundle map key is not a trust domain name.
    #[error("bundle map key {key:?} is not a trust domain: {cause}")]
    BadTrustDomain { key: String, cause: SpiffeIdError },
    /// A bundle map names the same trust domain twice.
    #[error("bundle map names trust domain {trust_domain} more than once")]
    DuplicateTrustDomain { trust_domain: String },
    /// A bundle inside a bundle map was rejected.
    #[error("bundle map entry {trust_domain}: {cause}")]
    InMap {
        trust_domain: String,
        cause: Box<BundleError>,
    },
}

/// A JWT signing authority of a trust domain: a public key and its key ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The `kid` that JWT-SVIDs signed by this key carry in their header.
    pub key_id: String,
    /// The public key.
    pub jwk: Jwk,
}

/// The trust anchors of one trust domain: X.509 CA certificates and JWT signing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain these authorities belong to.
    pub trust_domain: TrustDomain,
    /// DER CA certificates that X.509-SVIDs of the trust domain chain to.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// Public keys that sign JWT-SVIDs of the trust domain.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: grows with each change of the bundle.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds: how often consumers should poll for a new bundle.
    pub refresh_hint: Option<u64>,
}

/// The bundles of several trust domains, one per trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A certificate's public key, as the JWK parameters that describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CertKey {
    Ec {
        crv: &'static str,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Okp {
        crv: &'static str,
        x: Vec<u8>,
    },
}

impl CertKey {
    fn kty(&self) -> &'static str {
        match self {
            CertKey::Ec { .. } => "EC",
            CertKey::Rsa { .. } => "RSA",
            CertKey::Okp { .. } => "OKP",
        }
    }
}

/// Parses DER as one X.509 certificate with nothing after it.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}

// JWK integers (RSA n and e) are unsigned big-endian without leading zeros (RFC 7518 6.3.1).
fn strip_leading_zeros(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

fn cert_key(cert: &X509Certificate<'_>) -> Result<CertKey, String> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm == OID_SIG_ED25519 {
        return Ok(CertKey::Okp {
            crv: "Ed25519",
            x: spki.subject_public_key.data.to_vec(),
        });
    }
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::RSA(rsa) => Ok(CertKey::Rsa {
            n: strip_leading_zeros(rsa.modulus),
            e: strip_leading_zeros(rsa.exponent),
        }),
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| "EC key without a named curve".to_string())?;
            let (crv, size) = if curve == OID_EC_P256 {
                ("P-256", 32)
            } else if curve == OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return Err(format!("unsupported EC curve {curve}"));
            };
            let data = point.data();
            if data.len() != 1 + 2 * size || data[0] != 4 {
                return Err(format!(
                    "EC point is not an uncompressed {crv} point ({} bytes)",
                    data.len()
                ));
            }
            Ok(CertKey::Ec {
                crv,
                x: data[1..=size].to_vec(),
                y: data[1 + size..].to_vec(),
            })
        }
        _ => Err(format!(
            "unsupported public key algorithm {}",
            spki.algorithm.algorithm
        )),
    }
}

/// Checks that the JWK members present in `obj` describe `key`; absent members are not required.
fn check_key_matches(
    index: usize,
    obj: &Map<String, Value>,
    key: &CertKey,
) -> Result<(), BundleError> {
    let mismatch = |field: &'static str, value: &Value| BundleError::KeyMismatch {
        index,
        field,
        value: match value {
            Value::String(s) => s.clone(),
            other => json_kind(other),
        },
    };
    let bytes_eq = |field: &'static str, want: &[u8], strip: bool| -> Result<(), BundleError> {
        let Some(v) = obj.get(field) else {
            return Ok(());
        };
        let decoded = v
            .as_str()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .ok_or_else(|| mismatch(field, v))?;
        let decoded = if strip {
            strip_leading_zeros(&decoded)
        } else {
            decoded
        };
        if decoded == want {
            Ok(())
        } else {
            Err(mismatch(field, v))
        }
    };
    let crv_eq = |want: &str| -> Result<(), BundleError> {
        match obj.get("crv") {
            Some(Value::String(s)) if s == want => Ok(()),
            Some(v) => Err(mismatch("crv", v)),
            None => Ok(()),
        }
    };
    match key {
        CertKey::Ec { crv, x, y } => {
            crv_eq(crv)?;
            bytes_eq("x", x, false)?;
            bytes_eq("y", y, false)
        }
        CertKey::Rsa { n, e } => {
            bytes_eq("n", n, true)?;
            bytes_eq("e", e, true)
        }
        CertKey::Okp { crv, x } => {
            crv_eq(crv)?;
            bytes_eq("x", x, false)
        }
    }
}

fn parse_x509_entry(
    index: usize,
    obj: &Map<String, Value>,
    kty: &str,
) -> Result<CertificateDer<'static>, BundleError> {
    let x5c = match obj.get("x5c") {
        None | Some(Value::Null) => return Err(BundleError::MissingX5c { index }),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(BundleError::X5cNotArray {
                index,
                found: json_kind(other),
            });
        }
    };
    if x5c.len() != 1 {
        return Err(BundleError::X5cCount {
            index,
            count: x5c.len(),
        });
    }
    let b64 = x5c[0].as_str().ok_or_else(|| BundleError::BadX5cBase64 {
        index,
        reason: format!("expected a string, found {}", json_kind(&x5c[0])),
    })?;
    let der = STANDARD
        .decode(b64)
        .map_err(|e| BundleError::BadX5cBase64 {
            index,
            reason: e.to_string(),
        })?;
    let cert = parse_cert(&der).map_err(|reason| BundleError::BadCertificate { index, reason })?;
    let key = cert_key(&cert).map_err(|reason| BundleError::BadCertificate { index, reason })?;
    if key.kty() != kty {
        return Err(BundleError::KeyMismatch {
            index,
            field: "kty",
            value: kty.to_string(),
        });
    }
    check_key_matches(index, obj, &key)?;
    Ok(CertificateDer::from(der))
}

fn parse_jwt_entry(
    index: usize,
    entry: &Value,
    obj: &Map<String, Value>,
    kty: &str,
) -> Result<JwtAuthority, BundleError> {
    let kid = match obj.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(BundleError::MissingKid { index }),
    };
    let bad = |reason: String| BundleError::BadJwk {
        index,
        kid: kid.clone(),
        kty: kty.to_string(),
        reason,
    };
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| bad(e.to_string()))?;
    // The JWK parameter enum is untagged, so a key missing a member silently lands in another variant.
    let coord_len = match (&jwk.algorithm, kty) {
        (AlgorithmParameters::EllipticCurve(p), "EC") => match p.curve {
            EllipticCurve::P256 => Some(32),
            EllipticCurve::P384 => Some(48),
            EllipticCurve::P521 => Some(66),
            _ => return Err(bad(format!("curve {:?} is not an EC curve", p.curve))),
        },
        (AlgorithmParameters::RSA(_), "RSA") => None,
        (AlgorithmParameters::OctetKeyPair(_), "OKP") => None,
        _ => return Err(bad("key members missing or of the wrong type".into())),
    };
    if let (Some(len), AlgorithmParameters::EllipticCurve(p)) = (coord_len, &jwk.algorithm) {
        for (name, coord) in [("x", &p.x), ("y", &p.y)] {
            match URL_SAFE_NO_PAD.decode(coord) {
                Ok(b) if b.len() == len => {}
                Ok(b) => {
                    return Err(bad(format!(
                        "{name} is {} bytes, the curve needs {len}",
                        b.len()
                    )));
                }
                Err(e) => return Err(bad(format!("{name} is not base64url: {e}"))),
            }
        }
    }
    jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| bad(e.to_string()))?;
    Ok(JwtAuthority { key_id: kid, jwk })
}

fn optional_u64(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| json_kind(v)),
    }
}

fn pem_encode(out: &mut String, der: &[u8]) {
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    let b64 = STANDARD.encode(der);
    // Base64 output is ASCII, so splitting it into 64-byte chunks keeps valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

impl Bundle {
    /// An empty bundle for `td`, sequence 0 and no refresh hint.
    pub fn new(td: TrustDomain) -> Self {
        Bundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    /// Parses a SPIFFE bundle document (a JWK Set); entries with an unknown `use` or `kty` are skipped.
    pub fn from_json(td: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let doc: Value = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            reason: e.to_string(),
        })?;
        Self::from_value(td, &doc)
    }

    fn from_value(td: TrustDomain, doc: &Value) -> Result<Self, BundleError> {
        let Value::Object(doc) = doc else {
            return Err(BundleError::NotAnObject {
                found: json_kind(doc),
            });
        };
        let keys = match doc.get("keys") {
            Some(Value::Array(keys)) => keys,
            Some(other) => {
                return Err(BundleError::BadKeys {
                    found: json_kind(other),
                });
            }
            None => {
                return Err(BundleError::BadKeys {
                    found: "nothing".into(),
                });
            }
        };
        let mut bundle = Bundle::new(td);
        bundle.sequence = optional_u64(doc, "spiffe_sequence")
            .map_err(|value| BundleError::BadSequence { value })?
            .unwrap_or(0);
        bundle.refresh_hint = optional_u64(doc, "spiffe_refresh_hint")
            .map_err(|value| BundleError::BadRefreshHint { value })?;
        let mut kids = BTreeSet::new();
        for (index, entry) in keys.iter().enumerate() {
            let Value::Object(obj) = entry else {
                return Err(BundleError::KeyNotAnObject {
                    index,
                    found: json_kind(entry),
                });
            };
            let key_use = match obj.get("use").and_then(Value::as_str) {
                Some(u @ (X509_SVID_USE | JWT_SVID_USE)) => u,
                // The spec tells consumers to ignore entries whose use they do not know.
                _ => continue,
            };
            let Some(kty) = obj.get("kty").and_then(Value::as_str) else {
                return Err(BundleError::MissingKty {
                    index,
                    key_use: key_use.to_string(),
                });
            };
            if !matches!(kty, "EC" | "RSA" | "OKP") {
                continue;
            }
            if key_use == X509_SVID_USE {
                bundle
                    .x509_authorities
                    .push(parse_x509_entry(index, obj, kty)?);
            } else {
                let authority = parse_jwt_entry(index, entry, obj, kty)?;
                if !kids.insert(authority.key_id.clone()) {
                    return Err(BundleError::DuplicateKid {
                        index,
                        kid: authority.key_id,
                    });
                }
                bundle.jwt_authorities.push(authority);
            }
        }
        Ok(bundle)
    }

    fn to_value(&self) -> Value {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let mut obj = Map::new();
            obj.insert("use".into(), X509_SVID_USE.into());
            // A certificate whose key cannot be described is written without key members (no kty),
            // which keeps the document well-formed; only certificates built outside from_json/PEM get here.
            if let Ok(key) = parse_cert(der).and_then(|c| cert_key(&c)) {
                obj.insert("kty".into(), key.kty().into());
                match &key {
                    CertKey::Ec { crv, x, y } => {
                        obj.insert("crv".into(), (*crv).into());
                        obj.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
                        obj.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
                    }
                    CertKey::Rsa { n, e } => {
                        obj.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
                        obj.insert("e".into(), URL_SAFE_NO_PAD.encode(e).into());
                    }
                    CertKey::Okp { crv, x } => {
                        obj.insert("crv".into(), (*crv).into());
                        obj.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
                    }
                }
            }
            obj.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(der.as_ref()).into()]),
            );
            keys.push(Value::Object(obj));
        }
        for authority in &self.jwt_authorities {
            let mut jwk = authority.jwk.clone();
            jwk.common.key_id = Some(authority.key_id.clone());
            jwk.common.public_key_use = Some(PublicKeyUse::Other(JWT_SVID_USE.into()));
            if let Ok(v @ Value::Object(_)) = serde_json::to_value(&jwk) {
                keys.push(v);
            }
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), self.sequence.into());
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.into());
        }
        Value::Object(doc)
    }

    /// The bundle as a SPIFFE bundle document (JWK Set JSON).
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn to_x509_pem(&self) -> String {
        let mut out = String::new();
        for der in &self.x509_authorities {
            pem_encode(&mut out, der);
        }
        out
    }

    /// A bundle holding the X.509 authorities in `pem` (other PEM block kinds are skipped).
    pub fn from_x509_pem(td: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let mut bundle = Bundle::new(td);
        for (index, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
            let cert = cert.map_err(|e| BundleError::Pem {
                reason: e.to_string(),
            })?;
            parse_cert(&cert).map_err(|reason| BundleError::BadCertificate { index, reason })?;
            bundle.x509_authorities.push(cert);
        }
        if bundle.x509_authorities.is_empty() {
            return Err(BundleError::NoPemCertificates);
        }
        Ok(bundle)
    }

    /// The JWT authority with key ID `kid`, if any.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.key_id == kid)
    }
}

/// Collects a JSON object's members in order, keeping duplicates that `serde_json::Value` would merge.
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping trust domain names to bundles")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `b`, replacing any bundle of the same trust domain.
    pub fn insert(&mut self, b: Bundle) {
        self.bundles.insert(b.trust_domain.clone(), b);
    }

    /// The bundle of `td`, if present.
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }

    /// Removes and returns the bundle of `td`.
    pub fn remove(&mut self, td: &TrustDomain) -> Option<Bundle> {
        self.bundles.remove(td)
    }

    /// The bundles, ordered by trust domain name.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    /// Number of trust domains held.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when no bundle is held.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Parses a JSON object mapping trust domain names to bundle documents; a repeated trust domain is an error.
    pub fn from_json_map(json: &[u8]) -> Result<Self, BundleError> {
        let members: Members = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            reason: e.to_string(),
        })?;
        let mut set = BundleSet::new();
        for (key, doc) in members.0 {
            let td = TrustDomain::parse(&key).map_err(|source| BundleError::BadTrustDomain {
                key: key.clone(),
                cause: source,
            })?;
            if set.bundles.contains_key(&td) {
                return Err(BundleError::DuplicateTrustDomain {
                    trust_domain: td.to_string(),
                });
            }
            let bundle = Bundle::from_value(td.clone(), &doc).map_err(|e| BundleError::InMap {
                trust_domain: td.to_string(),
                cause: Box::new(e),
            })?;
            set.insert(bundle);
        }
        Ok(set)
    }

    /// The set as a JSON object mapping trust domain names to bundle documents.
    pub fn to_json_map(&self) -> String {
        let map: Map<String, Value> = self
            .bundles
            .iter()
            .map(|(td, b)| (td.to_string(), b.to_value()))
            .collect();
        Value::Object(map).to_string()
    }
}

impl<'a> IntoIterator for &'a BundleSet {
    type Item = &'a Bundle;
    type IntoIter = std::collections::btree_map::Values<'a, TrustDomain, Bundle>;
    fn into_iter(self) -> Self::IntoIter {
        self.bundles.values()
    }
}
