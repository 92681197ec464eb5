//! Helpers shared by the CA integration tests: a manual clock, configs, CSRs, chain checks.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_ca::{CaConfig, Clock, KeyType, X509Svid};
use sigil_spiffe::bundle::Bundle;
use sigil_spiffe::{SpiffeId, TrustDomain};

/// A clock the test moves by hand.
#[derive(Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub fn new(t: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(t)))
    }
    pub fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap() = t;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// Test start time (November 2023), whole seconds.
pub const T0_SECS: u64 = 1_700_000_000;
pub const HOUR: u64 = 3600;
pub const MIN: u64 = 60;

/// T0 plus `secs` seconds.
pub fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0_SECS + secs)
}

pub fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

pub fn id(path: &str) -> SpiffeId {
    td().id_with_path(path).unwrap()
}

/// CA TTL 6 h, X.509-SVID 1 h, JWT-SVID 5 min, keys under `dir/keys`.
pub fn config(dir: &Path) -> CaConfig {
    CaConfig {
        trust_domain: td(),
        key_type: KeyType::EcP256,
        ca_ttl: Duration::from_secs(6 * HOUR),
        default_x509_svid_ttl: Duration::from_secs(HOUR),
        default_jwt_svid_ttl: Duration::from_secs(5 * MIN),
        key_dir: dir.join("keys"),
        upstream: None,
    }
}

/// A CSR (DER) with the given URI SANs, and its key.
pub fn csr_with_uris(uris: &[&str]) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let csr = params.serialize_request(&key).unwrap();
    (csr.der().to_vec(), key)
}

/// A CSR for `id`.
pub fn csr_for(id: &SpiffeId) -> Vec<u8> {
    csr_with_uris(&[id.as_str()]).0
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
}

/// Verifies an SVID chain with rustls-webpki against the given roots at time `t`.
pub fn verify_with_roots(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    t: SystemTime,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        unix(t),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )?;
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        unix(t),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
}

/// Verifies an SVID against the bundle's X.509 authorities at time `t`.
pub fn verify(svid: &X509Svid, bundle: &Bundle, t: SystemTime) -> Result<(), webpki::Error> {
    verify_with_roots(&svid.cert_chain, &bundle.x509_authorities, t)
}

/// Which single bundle root the SVID chains to.
pub fn chains_to(svid: &X509Svid, bundle: &Bundle, t: SystemTime) -> Vec<usize> {
    bundle
        .x509_authorities
        .iter()
        .enumerate()
        .filter(|(_, root)| verify_with_roots(&svid.cert_chain, &[(*root).clone()], t).is_ok())
        .map(|(i, _)| i)
        .collect()
}

/// Serial (lowercase hex) of a DER certificate.
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    hex::encode(cert.raw_serial())
}

/// Names of the files in a directory, sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
