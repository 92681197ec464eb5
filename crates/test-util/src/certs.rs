//! Certificate fixtures: a P-256 CA (root or intermediate) that issues leaf certificates, for
//! x509pop node CAs, upstream CAs and trust bundles in tests.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

/// A CA that can issue certificates: self-signed ([`TestCa::new`]) or signed by another
/// ([`TestCa::intermediate`]).
pub struct TestCa {
    /// The CA's own certificate.
    pub cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn named(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    Ok(params)
}

/// Params of a CA named `cn`: `CN=cn` and basicConstraints CA (for [`TestCa::root_with`] and
/// [`TestCa::intermediate_with`] after changes).
pub fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = named(cn)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(params)
}

impl TestCa {
    /// A self-signed root CA with common name `cn`.
    pub fn new(cn: &str) -> anyhow::Result<Self> {
        Self::root_with(ca_params(cn)?)
    }

    /// A self-signed root CA made from `params` (any profile, including broken ones that a
    /// negative test needs), with a fresh P-256 key.
    pub fn root_with(params: CertificateParams) -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate CA with common name `cn`, signed by this one.
    pub fn intermediate(&self, cn: &str) -> anyhow::Result<TestCa> {
        self.intermediate_with(ca_params(cn)?)
    }

    /// An intermediate CA made from `params`, signed by this one.
    pub fn intermediate_with(&self, params: CertificateParams) -> anyhow::Result<TestCa> {
        let (cert, key) = self.sign(&params)?;
        Ok(TestCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf certificate with common name `cn` and the digital-signature key usage (as an
    /// x509pop node certificate), and its key.
    pub fn leaf(&self, cn: &str) -> anyhow::Result<(Certificate, KeyPair)> {
        let mut params = named(cn)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(&params)
    }

    /// A certificate made from `params` for a fresh P-256 key, signed by this CA, and the key.
    pub fn sign(&self, params: &CertificateParams) -> anyhow::Result<(Certificate, KeyPair)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Ok((params.signed_by(&key, &self.issuer)?, key))
    }

    /// A root CA of SPIFFE trust domain `td` (URI SAN `spiffe://td`), as a trust domain's
    /// signing authority.
    pub fn spiffe(td: &str) -> anyhow::Result<Self> {
        let mut params = ca_params(&format!("{td} CA"))?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into()?)];
        Self::root_with(params)
    }

    /// An X.509-SVID for `spiffe_id` signed by this CA, valid from an hour ago for `valid_for`:
    /// (leaf DER, PKCS#8 key DER).
    pub fn svid(&self, spiffe_id: &str, valid_for: Duration) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let mut params = named("svid")?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let start = SystemTime::now() - Duration::from_secs(3600);
        params.not_before = start.into();
        params.not_after = (start + valid_for).into();
        let (cert, key) = self.sign(&params)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// The CA's private key, PKCS#8 PEM (for a CA that sigil itself loads, such as an
    /// upstream CA).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}
