//! An external CA read from disk, whose key signs sigil's CA certificates as intermediates.

use std::path::{Path, PathBuf};

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::UpstreamAuthority;
use crate::error::CaError;
use crate::keyfile;
use crate::profile::{self, CertInfo};

/// A loaded and checked upstream authority.
pub(crate) struct Upstream {
    /// Where the chain came from, for error messages.
    pub cert_path: PathBuf,
    /// The upstream CA certificate first, then its intermediates, the root last.
    pub chain: Vec<CertificateDer<'static>>,
    /// The upstream CA certificate's subject and key, which sign sigil's CA certificates.
    pub issuer: Issuer<'static, KeyPair>,
    /// The upstream CA certificate's fields.
    pub info: CertInfo,
    /// Latest time (Unix seconds) at which the whole upstream chain is still valid.
    pub not_after: u64,
    /// Earliest time (Unix seconds) at which the upstream CA certificate is valid.
    pub not_before: u64,
}

fn err(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Upstream {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Upstream {
    /// Reads the upstream chain and key, checking that they match, chain in order, and can sign CAs.
    pub(crate) fn load(config: &UpstreamAuthority, now: u64) -> Result<Upstream, CaError> {
        let path = &config.cert_chain_pem;
        let pem = std::fs::read(path).map_err(|source| CaError::Io {
            action: "reading upstream certificate chain",
            path: path.clone(),
            cause: source,
        })?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(path, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(err(path, "holds no CERTIFICATE block"));
        }
        let mut infos = Vec::with_capacity(chain.len());
        for (i, der) in chain.iter().enumerate() {
            infos.push(profile::cert_info(
                der,
                &format!("upstream certificate #{}", i + 1),
            )?);
        }
        for (i, pair) in infos.windows(2).enumerate() {
            if pair[0].issuer_raw != pair[1].subject_raw {
                return Err(err(
                    path,
                    format!(
                        "certificate #{} was not issued by certificate #{}: the chain must be leaf-first",
                        i + 1,
                        i + 2
                    ),
                ));
            }
        }
        let info = infos[0].clone();
        if !info.is_ca {
            return Err(err(
                path,
                "the first certificate is not a CA (basicConstraints cA is not true)",
            ));
        }
        if info.key_cert_sign == Some(false) {
            return Err(err(
                path,
                "the first certificate's key usage lacks keyCertSign",
            ));
        }
        check_subject_encodable(&chain[0], path)?;
        let not_after = infos
            .iter()
            .map(|i| i.not_after)
            .min()
            .unwrap_or(info.not_after);
        if now >= not_after {
            return Err(err(
                path,
                format!("the chain expired at unix time {not_after} (now {now})"),
            ));
        }
        if now < info.not_before {
            return Err(err(
                path,
                format!(
                    "the upstream CA is not valid before unix time {}",
                    info.not_before
                ),
            ));
        }

        let key = keyfile::read_key_path(&config.key_pem)?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(CaError::KeyMismatch {
                path: config.key_pem.clone(),
                what: format!("the public key of upstream certificate {}", path.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| err(path, format!("cannot sign with the first certificate: {e}")))?;
        Ok(Upstream {
            cert_path: path.clone(),
            chain: chain.into_iter().map(|c| c.into_owned()).collect(),
            issuer,
            not_before: info.not_before,
            info,
            not_after,
        })
    }

    /// True when `cert` names this upstream as issuer and carries a valid signature by its key.
    pub(crate) fn issued(&self, cert: &CertificateDer<'_>) -> bool {
        let (Ok(child), Ok(parent)) = (
            profile::parse_cert(cert, "CA certificate"),
            profile::parse_cert(&self.chain[0], "upstream certificate"),
        ) else {
            return false;
        };
        child.issuer().as_raw() == parent.subject().as_raw()
            && child.verify_signature(Some(parent.public_key())).is_ok()
    }
}

/// The signer re-encodes the upstream subject as the issuer name; refuse subjects that would not
/// come out byte-identical (multi-valued RDNs, repeated attribute types, unusual string types).
fn check_subject_encodable(cert: &CertificateDer<'_>, path: &Path) -> Result<(), CaError> {
    let parsed = profile::parse_cert(cert, "upstream certificate #1")?;
    let mut seen = Vec::new();
    for rdn in parsed.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(err(
                path,
                "the upstream subject has an empty or multi-valued RDN, which is not supported",
            ));
        };
        let oid = attr.attr_type().to_id_string();
        if seen.contains(&oid) {
            return Err(err(
                path,
                format!("the upstream subject repeats attribute {oid}, which is not supported"),
            ));
        }
        seen.push(oid);
    }
    Ok(())
}
