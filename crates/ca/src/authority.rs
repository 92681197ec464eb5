//! One signing authority: a CA certificate with its key, plus the JWT key that rotates with it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::EncodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, KeyAlgorithm, PublicKeyUse,
};
use rand::RngCore;
use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};
use rustls_pki_types::CertificateDer;
use sigil_spiffe::TrustDomain;
use sigil_spiffe::bundle::JwtAuthority;

use crate::AuthorityStatus;
use crate::config::KeyType;
use crate::error::CaError;
use crate::journal::{AuthorityState, JournalAuthority};
use crate::keyfile;
use crate::profile::{self, BACKDATE_SECS};
use crate::upstream::Upstream;

/// The ES256 key that signs JWT-SVIDs for one authority.
pub(crate) struct JwtKey {
    pub kid: String,
    pub file: String,
    pub encoding: EncodingKey,
    pub jwk: Jwk,
    /// Uncompressed P-256 point (0x04 || x || y).
    pub public_point: Vec<u8>,
}

/// A CA certificate and its keys; immutable except for the SVID expiry bookkeeping.
pub(crate) struct Authority {
    pub cert: CertificateDer<'static>,
    /// Certificates above `cert` (upstream CA, intermediates, root); empty when `cert` is self-signed.
    pub upstream_chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    pub not_before: u64,
    pub not_after: u64,
    pub issuer: Issuer<'static, KeyPair>,
    pub key_file: String,
    pub jwt: JwtKey,
    /// Latest expiry (Unix seconds) of any SVID signed; 0 when none.
    latest_expiry: AtomicU64,
    /// The value last written to the journal: an upper bound of `latest_expiry`.
    persisted_expiry: AtomicU64,
}

fn generate(key_type: KeyType) -> Result<KeyPair, CaError> {
    let result = match key_type {
        KeyType::EcP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        KeyType::EcP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
        KeyType::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
    };
    result.map_err(|e| CaError::KeyGeneration {
        what: key_type.to_string(),
        reason: e.to_string(),
    })
}

/// A random key ID of 32 base64url characters.
fn random_kid() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

impl JwtKey {
    fn new(kid: String, file: String, key: &KeyPair, key_dir: &Path) -> Result<JwtKey, CaError> {
        let point = key.public_key_raw();
        let bad = |reason: &str| CaError::KeyFile {
            path: key_dir.join(&file),
            reason: format!("JWT key {kid}: {reason}"),
        };
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 || point.len() != 65 || point[0] != 4 {
            return Err(bad("not an EC P-256 key"));
        }
        let jwk = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::ES256),
                key_id: Some(kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: URL_SAFE_NO_PAD.encode(&point[1..33]),
                y: URL_SAFE_NO_PAD.encode(&point[33..65]),
            }),
        };
        Ok(JwtKey {
            encoding: EncodingKey::from_ec_der(key.serialized_der()),
            public_point: point.to_vec(),
            kid,
            file,
            jwk,
        })
    }

    /// The bundle entry publishing this key.
    pub(crate) fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            key_id: self.kid.clone(),
            jwk: self.jwk.clone(),
        }
    }
}

impl Authority {
    /// Generates keys and a CA certificate valid from `now` for `ttl_secs` (capped by the upstream),
    /// and writes both keys to `key_dir`.
    pub(crate) fn create(
        td: &TrustDomain,
        key_type: KeyType,
        ttl_secs: u64,
        now: u64,
        key_dir: &Path,
        upstream: Option<&Upstream>,
    ) -> Result<Authority, CaError> {
        let what = format!("CA certificate for {td}");
        let mut not_before = now.saturating_sub(BACKDATE_SECS);
        let mut not_after = now.saturating_add(ttl_secs);
        if let Some(up) = upstream {
            not_before = not_before.max(up.not_before);
            not_after = not_after.min(up.not_after);
            if not_after <= now {
                return Err(CaError::Upstream {
                    path: up.cert_path.clone(),
                    reason: format!("expired at unix time {} (now {now})", up.not_after),
                });
            }
        }
        let key = generate(key_type)?;
        let serial = profile::random_serial();
        let mut params = profile::ca_params(td, &serial, not_before, not_after)?;
        let issue_err = |e: rcgen::Error| CaError::Issue {
            what: what.clone(),
            reason: e.to_string(),
        };
        let (cert, upstream_chain) = match upstream {
            None => (params.self_signed(&key).map_err(issue_err)?, Vec::new()),
            Some(up) => {
                params.use_authority_key_identifier_extension = true;
                let cert = params.signed_by(&key, &up.issuer).map_err(issue_err)?;
                let info = profile::cert_info(cert.der(), &what)?;
                if info.issuer_raw != up.info.subject_raw {
                    return Err(CaError::Upstream {
                        path: up.cert_path.clone(),
                        reason:
                            "its subject name cannot be reproduced byte-for-byte as an issuer name"
                                .to_string(),
                    });
                }
                (cert, up.chain.clone())
            }
        };
        let cert: CertificateDer<'static> = cert.into();

        let jwt_key = generate(KeyType::EcP256)?;
        let key_file = keyfile::new_key_name("x509-ca");
        let jwt_file = keyfile::new_key_name("jwt");
        let jwt = JwtKey::new(random_kid(), jwt_file.clone(), &jwt_key, key_dir)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Issue {
            what: what.clone(),
            reason: format!("cannot use the new certificate as issuer: {e}"),
        })?;

        keyfile::write_key(key_dir, &key_file, issuer.key())?;
        if let Err(e) = keyfile::write_key(key_dir, &jwt_file, &jwt_key) {
            keyfile::remove_key(key_dir, &key_file);
            return Err(e);
        }
        tracing::info!(
            trust_domain = %td,
            serial = %hex::encode(serial),
            not_after,
            upstream = upstream.is_some(),
            jwt_key_id = %jwt.kid,
            "created CA authority"
        );
        Ok(Authority {
            cert,
            upstream_chain,
            serial_hex: hex::encode(serial),
            not_before,
            not_after,
            issuer,
            key_file,
            jwt,
            latest_expiry: AtomicU64::new(0),
            persisted_expiry: AtomicU64::new(0),
        })
    }

    /// Rebuilds an authority from its journal entry, reading and checking its key files.
    pub(crate) fn from_journal(
        entry: &JournalAuthority,
        td: &TrustDomain,
        key_dir: &Path,
    ) -> Result<Authority, CaError> {
        let corrupt = |reason: String| CaError::JournalCorrupt { reason };
        let decode = |b64: &str, what: &str| {
            STANDARD
                .decode(b64)
                .map_err(|e| corrupt(format!("{what} is not base64: {e}")))
        };
        let cert = CertificateDer::from(decode(&entry.cert_der, "cert_der")?);
        let info = profile::cert_info(&cert, "CA certificate from the journal")?;
        let ca = profile::parse_cert(&cert, "CA certificate from the journal")?;
        let td_id = td.id();
        let names_td = ca
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(|n| {
                    matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == td_id.as_str())
                })
            });
        if !names_td {
            return Err(corrupt(format!(
                "CA certificate {} does not name trust domain {td}",
                info.serial_hex
            )));
        }
        let upstream_chain = entry
            .upstream_chain_der
            .iter()
            .map(|b| decode(b, "upstream_chain_der").map(CertificateDer::from))
            .collect::<Result<Vec<_>, _>>()?;

        let key = keyfile::read_key(key_dir, &entry.key_file)?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(CaError::KeyMismatch {
                path: keyfile::key_path(key_dir, &entry.key_file)?,
                what: format!("CA certificate {}", info.serial_hex),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Issue {
            what: format!("CA certificate {}", info.serial_hex),
            reason: format!("cannot use it as issuer: {e}"),
        })?;

        let jwt_key = keyfile::read_key(key_dir, &entry.jwt_key_file)?;
        let jwt = JwtKey::new(
            entry.jwt_key_id.clone(),
            entry.jwt_key_file.clone(),
            &jwt_key,
            key_dir,
        )?;
        if STANDARD.encode(&jwt.public_point) != entry.jwt_public_key {
            return Err(CaError::KeyMismatch {
                path: keyfile::key_path(key_dir, &entry.jwt_key_file)?,
                what: format!("JWT key {}", entry.jwt_key_id),
            });
        }
        let expiry = entry.latest_svid_expiry.unwrap_or(0);
        Ok(Authority {
            cert,
            upstream_chain,
            serial_hex: info.serial_hex,
            not_before: info.not_before,
            not_after: info.not_after,
            issuer,
            key_file: entry.key_file.clone(),
            jwt,
            latest_expiry: AtomicU64::new(expiry),
            persisted_expiry: AtomicU64::new(expiry),
        })
    }

    /// The journal entry for this authority in `state`.
    pub(crate) fn to_journal(&self, state: AuthorityState) -> JournalAuthority {
        let expiry = self
            .latest_expiry()
            .max(self.persisted_expiry.load(Ordering::Acquire));
        JournalAuthority {
            state,
            cert_der: STANDARD.encode(&self.cert),
            upstream_chain_der: self
                .upstream_chain
                .iter()
                .map(|c| STANDARD.encode(c))
                .collect(),
            key_file: self.key_file.clone(),
            jwt_key_id: self.jwt.kid.clone(),
            jwt_key_file: self.jwt.file.clone(),
            jwt_public_key: STANDARD.encode(&self.jwt.public_point),
            latest_svid_expiry: (expiry != 0).then_some(expiry),
        }
    }

    /// The trust anchor this authority's SVIDs chain to.
    pub(crate) fn root(&self) -> &CertificateDer<'static> {
        self.upstream_chain.last().unwrap_or(&self.cert)
    }

    /// The certificates that follow an SVID leaf: this CA and upstream intermediates, never the root.
    pub(crate) fn chain_above_leaf(&self) -> Vec<CertificateDer<'static>> {
        match self.upstream_chain.split_last() {
            None => Vec::new(),
            Some((_root, intermediates)) => std::iter::once(&self.cert)
                .chain(intermediates)
                .cloned()
                .collect(),
        }
    }

    /// Latest expiry of an SVID this authority signed (Unix seconds), 0 when none.
    pub(crate) fn latest_expiry(&self) -> u64 {
        self.latest_expiry.load(Ordering::Acquire)
    }

    /// Records that an SVID expiring at `expiry` was signed; true when the journal must be updated
    /// because the persisted bound no longer covers it.
    pub(crate) fn record_expiry(&self, expiry: u64) -> bool {
        self.latest_expiry.fetch_max(expiry, Ordering::AcqRel);
        expiry > self.persisted_expiry.load(Ordering::Acquire)
    }

    /// The persisted upper bound of SVID expiries.
    pub(crate) fn persisted_expiry(&self) -> u64 {
        self.persisted_expiry.load(Ordering::Acquire)
    }

    /// Sets the persisted upper bound (before the journal write that records it).
    pub(crate) fn set_persisted_expiry(&self, value: u64) {
        self.persisted_expiry.store(value, Ordering::Release);
    }

    /// The public description of this authority.
    pub(crate) fn status(&self) -> AuthorityStatus {
        AuthorityStatus {
            serial_hex: self.serial_hex.clone(),
            not_before: profile::system_time(self.not_before),
            not_after: profile::system_time(self.not_after),
            jwt_key_id: self.jwt.kid.clone(),
        }
    }
}
