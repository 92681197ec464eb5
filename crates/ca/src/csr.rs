//! PKCS#10 requests: verify the self-signature, then take only the public key (or read the requested SPIFFE ID).

use sigil_spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::error::CaError;

/// Smallest RSA modulus accepted in a CSR, in bits.
const MIN_RSA_BITS: usize = 2048;

/// Parses a DER CSR and checks its signature with the key it carries (proof of possession).
fn parse_verified(der: &[u8]) -> Result<X509CertificationRequest<'_>, CaError> {
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok((rest, _)) => {
            return Err(CaError::CsrParse {
                reason: format!("{} trailing bytes after the request", rest.len()),
            });
        }
        Err(e) => {
            return Err(CaError::CsrParse {
                reason: e.to_string(),
            });
        }
    };
    csr.verify_signature().map_err(|e| CaError::CsrSignature {
        reason: e.to_string(),
    })?;
    Ok(csr)
}

/// The public key of a verified CSR, in the form the certificate signer takes.
pub(crate) fn public_key(der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    let csr = parse_verified(der)?;
    let spki = &csr.certification_request_info.subject_pki;
    if let Ok(PublicKey::RSA(rsa)) = spki.parsed() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(CaError::CsrPublicKey {
                reason: format!("RSA key of {bits} bits is shorter than {MIN_RSA_BITS}"),
            });
        }
    }
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| CaError::CsrPublicKey {
        reason: format!(
            "unsupported key algorithm {}: {e}",
            spki.algorithm.algorithm
        ),
    })
}

/// The SPIFFE ID a CSR asks for: its single URI SAN (used by `x509 mint`).
pub fn csr_spiffe_id(csr_der: &[u8]) -> Result<SpiffeId, CaError> {
    let csr = parse_verified(csr_der)?;
    let uris: Vec<&str> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(CaError::CsrUriSanCount { count: uris.len() });
    };
    SpiffeId::parse(uri).map_err(|source| CaError::CsrSpiffeId {
        value: uri.to_string(),
        cause: source,
    })
}
