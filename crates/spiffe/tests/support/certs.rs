//! Certificate fixtures for the tests: SPIFFE CA and leaf params to edit (one rule broken per
//! negative test), signed by test-util's [`TestCa`].

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
pub use sigil_test_util::TestCa;

/// The time every test verifies at: 2025-06-15, inside the default validity of the fixtures.
pub fn now() -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(1_750_000_000))
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

/// A valid root CA of trust domain `td`.
pub fn root(td: &str) -> TestCa {
    TestCa::root_with(ca_params(Some(&format!("spiffe://{td}")))).unwrap()
}

/// `params` signed by `ca` for a fresh key, DER.
pub fn sign(ca: &TestCa, params: &CertificateParams) -> CertificateDer<'static> {
    ca.sign(params).unwrap().0.der().clone()
}
