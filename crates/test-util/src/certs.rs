//! Certificate fixtures: a P-256 CA (root or intermediate) that issues leaf certificates, for
//! x509pop node CAs, upstream CAs and trust bundles in tests.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
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

fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = named(cn)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(params)
}

impl TestCa {
    /// A self-signed root CA with common name `cn`.
    pub fn new(cn: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(cn)?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate CA with common name `cn`, signed by this one.
    pub fn intermediate(&self, cn: &str) -> anyhow::Result<TestCa> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(cn)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(TestCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf certificate with common name `cn` and the digital-signature key usage (as an
    /// x509pop node certificate), and its key.
    pub fn leaf(&self, cn: &str) -> anyhow::Result<(Certificate, KeyPair)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = named(cn)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        Ok((params.signed_by(&key, &self.issuer)?, key))
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
