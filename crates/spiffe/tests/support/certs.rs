//! Certificate fixtures for the tests: a CA that signs leaves and intermediates from editable params.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};

/// The time every test verifies at: 2025-06-15, inside the default validity of the fixtures.
pub fn now() -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(1_750_000_000))
}

/// A CA: its certificate and what it needs to sign.
pub struct Ca {
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// Params of a valid SPIFFE signing certificate; `id` is its URI SAN, if any.
pub fn ca_params(id: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    // Distinct names keep webpki from trying an unrelated CA as the issuer.
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    p.distinguished_name
        .push(DnType::CommonName, format!("test CA {n}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = id.map(uri).into_iter().collect();
    p
}

/// Params of a valid X.509-SVID leaf for `id`: digitalSignature (critical), no EKU, no basicConstraints.
pub fn leaf_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "test leaf");
    p.subject_alt_names = vec![uri(id)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

/// Adds a URI SAN to `p`.
pub fn add_uri(p: &mut CertificateParams, s: &str) {
    p.subject_alt_names.push(uri(s));
}

/// Replaces the key usage of `p` with a non-critical digitalSignature-only extension.
pub fn non_critical_key_usage(p: &mut CertificateParams) {
    p.key_usages.clear();
    // BIT STRING, 7 unused bits, bit 0 (digitalSignature) set.
    let mut ext =
        rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
    ext.set_criticality(false);
    p.custom_extensions.push(ext);
}

/// Sets the EKU of `p` to serverAuth and clientAuth.
pub fn both_ekus(p: &mut CertificateParams) {
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
}

impl Ca {
    /// A self-signed root with `params` and a fresh P-256 key.
    pub fn root_with(params: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().der().clone();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A valid root CA of trust domain `td`.
    pub fn root(td: &str) -> Ca {
        Ca::root_with(ca_params(Some(&format!("spiffe://{td}"))))
    }

    /// Signs `params` with a fresh P-256 key.
    pub fn sign(&self, params: &CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        params.signed_by(&key, &self.issuer).unwrap().der().clone()
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self, params: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().der().clone();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }
}
