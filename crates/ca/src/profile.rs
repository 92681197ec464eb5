//! Certificate profiles (CA and X.509-SVID leaf), serial numbers, and the time conversions they need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use sigil_spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::CaError;

/// How far certificates are backdated so peers with a slightly slow clock accept them (SPIRE uses the same).
pub(crate) const BACKDATE_SECS: u64 = 10;

/// Unix seconds of a time, rounded down (certificates and JWTs carry whole seconds).
pub(crate) fn unix_secs(t: SystemTime) -> Result<u64, CaError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| CaError::ClockBeforeEpoch)
}

/// The time of a Unix second count.
pub(crate) fn system_time(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn offset_time(secs: u64, what: &str) -> Result<OffsetDateTime, CaError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| CaError::Issue {
            what: what.to_string(),
            reason: format!("time {secs} (unix seconds) is out of range"),
        })
}

/// A random positive 128-bit serial whose first byte is non-zero, so its DER form is exactly these bytes.
pub(crate) fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        serial[0] = 1;
    }
    serial
}

fn ia5(value: &str, what: &str) -> Result<Ia5String, CaError> {
    Ia5String::try_from(value).map_err(|e| CaError::Issue {
        what: what.to_string(),
        reason: format!("{value:?} is not an IA5 string: {e}"),
    })
}

fn printable(value: &str, what: &str) -> Result<PrintableString, CaError> {
    PrintableString::try_from(value).map_err(|e| CaError::Issue {
        what: what.to_string(),
        reason: format!("{value:?} is not a PrintableString: {e}"),
    })
}

fn base_subject(what: &str) -> Result<DistinguishedName, CaError> {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CountryName,
        DnValue::PrintableString(printable("US", what)?),
    );
    dn.push(DnType::OrganizationName, "sigil");
    Ok(dn)
}

/// Parameters of a CA certificate for `td`: URI SAN `spiffe://<td>`, CA critical, keyCertSign + cRLSign critical.
pub(crate) fn ca_params(
    td: &TrustDomain,
    serial: &[u8; 16],
    not_before: u64,
    not_after: u64,
) -> Result<CertificateParams, CaError> {
    let what = format!("CA certificate for {td}");
    let mut params = CertificateParams::default();
    let mut dn = base_subject(&what)?;
    // A per-CA serialNumber attribute keeps successive CAs' subjects distinct, which
    // helps verifiers that pick issuers by name.
    dn.push(
        DnType::CustomDnType(vec![2, 5, 4, 5]),
        DnValue::PrintableString(printable(&hex::encode(serial), &what)?),
    );
    dn.push(DnType::CommonName, "sigil CA");
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = offset_time(not_before, &what)?;
    params.not_after = offset_time(not_after, &what)?;
    params.subject_alt_names = vec![SanType::URI(ia5(td.id().as_str(), &what)?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Parameters of an X.509-SVID leaf: one URI SAN, DNS SANs, not a CA, digitalSignature critical, server+client auth.
pub(crate) fn leaf_params(
    id: &SpiffeId,
    dns_names: &[String],
    serial: &[u8; 16],
    not_before: u64,
    not_after: u64,
) -> Result<CertificateParams, CaError> {
    let what = format!("X.509-SVID for {id}");
    let mut params = CertificateParams::default();
    let mut dn = base_subject(&what)?;
    // SPIRE puts the first DNS name in the CN; X.520 caps a CN at 64 characters.
    if let Some(first) = dns_names.first().filter(|n| n.len() <= 64) {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = offset_time(not_before, &what)?;
    params.not_after = offset_time(not_after, &what)?;
    let mut sans = vec![SanType::URI(ia5(id.as_str(), &what)?)];
    for name in dns_names {
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(CaError::InvalidDnsName { name: name.clone() });
        }
        sans.push(SanType::DnsName(ia5(name, &what)?));
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// What the CA needs to know about a certificate it holds.
#[derive(Debug, Clone)]
pub(crate) struct CertInfo {
    pub serial_hex: String,
    pub not_before: u64,
    pub not_after: u64,
    pub subject_raw: Vec<u8>,
    pub issuer_raw: Vec<u8>,
    /// The subjectPublicKey BIT STRING content (EC point or PKCS#1 RSA key).
    pub public_key: Vec<u8>,
    pub is_ca: bool,
    /// None when the certificate has no key usage extension.
    pub key_cert_sign: Option<bool>,
}

/// Parses a certificate, naming `what` it is on failure.
pub(crate) fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, CaError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CaError::CertParse {
            what: what.to_string(),
            reason: "trailing bytes after the certificate".to_string(),
        }),
        Err(e) => Err(CaError::CertParse {
            what: what.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Reads the fields the CA uses from a DER certificate.
pub(crate) fn cert_info(der: &[u8], what: &str) -> Result<CertInfo, CaError> {
    let cert = parse_cert(der, what)?;
    let validity = cert.validity();
    let secs = |t: i64| {
        u64::try_from(t).map_err(|_| CaError::CertParse {
            what: what.to_string(),
            reason: format!("validity time {t} is before 1970"),
        })
    };
    let key_usage = cert.key_usage().map_err(|e| CaError::CertParse {
        what: what.to_string(),
        reason: format!("key usage: {e}"),
    })?;
    Ok(CertInfo {
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: secs(validity.not_before.timestamp())?,
        not_after: secs(validity.not_after.timestamp())?,
        subject_raw: cert.subject().as_raw().to_vec(),
        issuer_raw: cert.issuer().as_raw().to_vec(),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        is_ca: cert.is_ca(),
        key_cert_sign: key_usage.map(|ku| ku.value.key_cert_sign()),
    })
}
