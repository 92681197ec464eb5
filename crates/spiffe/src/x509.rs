//! X.509-SVID validation per the SPIFFE X509-SVID spec: leaf and CA certificate profiles, and chain
//! verification against the bundle of the leaf's own trust domain.

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::bundle::{BundleSet, parse_cert};
use crate::id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why an X.509-SVID or its chain was rejected; each variant names the rule and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509SvidError {
    /// No certificate was presented.
    #[error("X.509-SVID chain is empty")]
    EmptyChain,
    /// A certificate is not DER X.509.
    #[error("certificate is not a DER X.509 certificate: {reason}")]
    Malformed { reason: String },
    /// An extension could not be read or appears twice.
    #[error("certificate {subject:?}: {extension} extension is malformed or repeated: {reason}")]
    BadExtension {
        subject: String,
        extension: &'static str,
        reason: String,
    },
    /// A leaf must carry exactly one URI SAN.
    #[error("leaf certificate {subject:?} must have exactly one URI SAN, found {count}")]
    LeafUriSanCount { subject: String, count: usize },
    /// A URI SAN is not a SPIFFE ID.
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {cause}")]
    NotSpiffeId { uri: String, cause: SpiffeIdError },
    /// A leaf's SPIFFE ID must have a path: a bare trust domain ID names the trust domain itself.
    #[error("leaf SPIFFE ID {id} has no path")]
    LeafIdWithoutPath { id: SpiffeId },
    /// A leaf must not be a CA.
    #[error("leaf {id}: basicConstraints cA must be false")]
    LeafIsCa { id: SpiffeId },
    /// A leaf must carry the key usage extension.
    #[error("leaf {id}: key usage extension is missing")]
    LeafKeyUsageMissing { id: SpiffeId },
    /// A leaf's key usage extension must be critical.
    #[error("leaf {id}: key usage extension must be critical")]
    LeafKeyUsageNotCritical { id: SpiffeId },
    /// A leaf's key usage must include digitalSignature.
    #[error("leaf {id}: key usage must include digitalSignature, found [{usage}]")]
    LeafMissingDigitalSignature { id: SpiffeId, usage: String },
    /// A leaf's key usage must not include keyCertSign.
    #[error("leaf {id}: key usage must not include keyCertSign, found [{usage}]")]
    LeafKeyCertSign { id: SpiffeId, usage: String },
    /// A leaf's key usage must not include cRLSign.
    #[error("leaf {id}: key usage must not include cRLSign, found [{usage}]")]
    LeafCrlSign { id: SpiffeId, usage: String },
    /// A leaf with an extended key usage extension must list both serverAuth and clientAuth.
    #[error("leaf {id}: extended key usage is present but lacks {missing}")]
    LeafEkuMissing { id: SpiffeId, missing: &'static str },
    /// A CA certificate in the chain must have basicConstraints cA=true.
    #[error("CA certificate {subject:?}: basicConstraints cA must be true")]
    CaNotCa { subject: String },
    /// A CA certificate in the chain must have keyCertSign key usage.
    #[error("CA certificate {subject:?}: key usage must include keyCertSign, found [{usage}]")]
    CaMissingKeyCertSign { subject: String, usage: String },
    /// A CA certificate may carry at most one URI SAN.
    #[error("CA certificate {subject:?} must have at most one URI SAN, found {count}")]
    CaUriSanCount { subject: String, count: usize },
    /// A CA's SPIFFE ID must be a trust domain ID (no path).
    #[error("CA certificate SPIFFE ID {id} must not have a path")]
    CaIdHasPath { id: SpiffeId },
    /// The leaf is outside its validity period (times are Unix seconds).
    #[error("leaf {id} is not valid at {now}: valid from {not_before} to {not_after}")]
    LeafNotValidNow {
        id: SpiffeId,
        now: u64,
        not_before: i64,
        not_after: i64,
    },
    /// No bundle is known for the leaf's trust domain.
    #[error("no bundle for trust domain {trust_domain} (of {id})")]
    NoBundle {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// An X.509 authority in the bundle cannot be used as a trust anchor.
    #[error(
        "bundle of {trust_domain}: X.509 authority {index} is not a usable trust anchor: {reason}"
    )]
    BadAuthority {
        trust_domain: TrustDomain,
        index: usize,
        reason: webpki::Error,
    },
    /// The chain does not verify to any X.509 authority of the leaf's trust domain.
    #[error("chain of {id} does not verify to an X.509 authority of {trust_domain}: {reason}")]
    ChainInvalid {
        id: SpiffeId,
        trust_domain: TrustDomain,
        reason: webpki::Error,
    },
}

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, X509SvidError> {
    parse_cert(cert).map_err(|reason| X509SvidError::Malformed { reason })
}

fn bad_ext(cert: &X509Certificate<'_>, extension: &'static str, e: impl ToString) -> X509SvidError {
    X509SvidError::BadExtension {
        subject: cert.subject().to_string(),
        extension,
        reason: e.to_string(),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, X509SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad_ext(cert, "subjectAltName", e))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn parse_uri(uri: &str) -> Result<SpiffeId, X509SvidError> {
    SpiffeId::parse(uri).map_err(|source| X509SvidError::NotSpiffeId {
        uri: uri.to_string(),
        cause: source,
    })
}

fn leaf_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    match uri_sans(cert)?.as_slice() {
        [uri] => parse_uri(uri),
        others => Err(X509SvidError::LeafUriSanCount {
            subject: cert.subject().to_string(),
            count: others.len(),
        }),
    }
}

/// The SPIFFE ID of a leaf: its one URI SAN, which must be a valid SPIFFE ID.
pub fn spiffe_id_of_leaf(cert: &CertificateDer<'_>) -> Result<SpiffeId, X509SvidError> {
    leaf_id(&parse(cert)?)
}

/// The leaf's notAfter, in seconds since the Unix epoch (an authentication that rests on the
/// certificate ends with it).
pub fn leaf_not_after(cert: &CertificateDer<'_>) -> Result<i64, X509SvidError> {
    Ok(parse(cert)?.validity().not_after.timestamp())
}

fn leaf_profile(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    let id = leaf_id(cert)?;
    if id.is_trust_domain_id() {
        return Err(X509SvidError::LeafIdWithoutPath { id });
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad_ext(cert, "basicConstraints", e))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(X509SvidError::LeafIsCa { id });
    }
    let Some(ku) = cert.key_usage().map_err(|e| bad_ext(cert, "keyUsage", e))? else {
        return Err(X509SvidError::LeafKeyUsageMissing { id });
    };
    if !ku.critical {
        return Err(X509SvidError::LeafKeyUsageNotCritical { id });
    }
    let usage = ku.value.to_string();
    if !ku.value.digital_signature() {
        return Err(X509SvidError::LeafMissingDigitalSignature { id, usage });
    }
    if ku.value.key_cert_sign() {
        return Err(X509SvidError::LeafKeyCertSign { id, usage });
    }
    if ku.value.crl_sign() {
        return Err(X509SvidError::LeafCrlSign { id, usage });
    }
    if let Some(eku) = cert
        .extended_key_usage()
        .map_err(|e| bad_ext(cert, "extendedKeyUsage", e))?
    {
        if !eku.value.server_auth {
            return Err(X509SvidError::LeafEkuMissing {
                id,
                missing: "serverAuth",
            });
        }
        if !eku.value.client_auth {
            return Err(X509SvidError::LeafEkuMissing {
                id,
                missing: "clientAuth",
            });
        }
    }
    Ok(id)
}

/// Checks every X.509-SVID leaf rule (not the chain) and returns the leaf's SPIFFE ID.
pub fn check_leaf_profile(cert: &CertificateDer<'_>) -> Result<SpiffeId, X509SvidError> {
    leaf_profile(&parse(cert)?)
}

/// Checks the rules for a signing (CA) certificate and returns its SPIFFE ID if it carries one.
pub fn check_ca_profile(cert: &CertificateDer<'_>) -> Result<Option<SpiffeId>, X509SvidError> {
    let cert = parse(cert)?;
    let subject = cert.subject().to_string();
    let bc = cert
        .basic_constraints()
        .map_err(|e| bad_ext(&cert, "basicConstraints", e))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(X509SvidError::CaNotCa { subject });
    }
    let ku = cert
        .key_usage()
        .map_err(|e| bad_ext(&cert, "keyUsage", e))?;
    if !ku.as_ref().is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(X509SvidError::CaMissingKeyCertSign {
            subject,
            usage: ku.map(|ku| ku.value.to_string()).unwrap_or_default(),
        });
    }
    match uri_sans(&cert)?.as_slice() {
        [] => Ok(None),
        [uri] => {
            let id = parse_uri(uri)?;
            if id.is_trust_domain_id() {
                Ok(Some(id))
            } else {
                Err(X509SvidError::CaIdHasPath { id })
            }
        }
        others => Err(X509SvidError::CaUriSanCount {
            subject,
            count: others.len(),
        }),
    }
}

/// Verifies an X.509-SVID chain (leaf first, then intermediates) against the bundle of the leaf's
/// trust domain at time `now`, returning the leaf's SPIFFE ID.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
) -> Result<SpiffeId, X509SvidError> {
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return Err(X509SvidError::EmptyChain);
    };
    let leaf = parse(leaf_der)?;
    let id = leaf_profile(&leaf)?;
    for ca in intermediates {
        check_ca_profile(ca)?;
    }
    // Checked here as well as by webpki so that an expired leaf is reported with its SPIFFE ID and dates.
    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let now_secs = now.as_secs();
    let now_i = i64::try_from(now_secs).unwrap_or(i64::MAX);
    if now_i < not_before || now_i > not_after {
        return Err(X509SvidError::LeafNotValidNow {
            id,
            now: now_secs,
            not_before,
            not_after,
        });
    }
    let trust_domain = id.trust_domain();
    let Some(bundle) = bundles.get(&trust_domain) else {
        return Err(X509SvidError::NoBundle { id, trust_domain });
    };
    let mut anchors = Vec::with_capacity(bundle.x509_authorities.len());
    for (index, der) in bundle.x509_authorities.iter().enumerate() {
        let anchor = webpki::anchor_from_trusted_cert(der).map_err(|reason| {
            X509SvidError::BadAuthority {
                trust_domain: trust_domain.clone(),
                index,
                reason,
            }
        })?;
        anchors.push(anchor);
    }
    let chain_invalid = |reason| X509SvidError::ChainInvalid {
        id: id.clone(),
        trust_domain: trust_domain.clone(),
        reason,
    };
    let ee = EndEntityCert::try_from(leaf_der).map_err(chain_invalid)?;
    let verify = |usage| {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
    };
    // webpki accepts a certificate without EKU for either usage (required-if-present); a leaf with EKU
    // has both by the profile check, so a second try only matters for an intermediate limited to serverAuth.
    match verify(KeyUsage::client_auth()) {
        Ok(()) => Ok(id),
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => {
            verify(KeyUsage::server_auth()).map_err(chain_invalid)?;
            Ok(id)
        }
        Err(e) => Err(chain_invalid(e)),
    }
}
