//! X.509-SVID rules: for each rule a chain that breaks exactly that rule, plus valid chains.

#![allow(clippy::unwrap_used)]

#[path = "support/certs.rs"]
mod certs;

use certs::{Ca, add_uri, both_ekus, ca_params, leaf_params, non_critical_key_usage, now};
use rcgen::{ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, date_time_ymd};
use rustls_pki_types::CertificateDer;
use sigil_spiffe::{
    Bundle, BundleSet, SpiffeId, SpiffeIdError, TrustDomain, X509SvidError, check_ca_profile,
    check_leaf_profile, spiffe_id_of_leaf, verify_x509_svid,
};

const LEAF_ID: &str = "spiffe://example.org/workload";

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn bundles_for(cas: &[(&str, &Ca)]) -> BundleSet {
    let mut set = BundleSet::new();
    for (name, ca) in cas {
        let mut b = Bundle::new(td(name));
        b.x509_authorities.push(ca.cert.clone());
        set.insert(b);
    }
    set
}

/// Verifies a leaf made from `params` by a fresh example.org root trusted for example.org.
fn verify_leaf(params: rcgen::CertificateParams) -> Result<SpiffeId, X509SvidError> {
    let ca = Ca::root("example.org");
    let leaf = ca.sign(&params);
    verify_x509_svid(&[leaf], &bundles_for(&[("example.org", &ca)]), now())
}

#[test]
fn valid_leaf_without_eku() {
    assert_eq!(verify_leaf(leaf_params(LEAF_ID)).unwrap(), id(LEAF_ID));
}

#[test]
fn valid_leaf_with_both_ekus() {
    let mut p = leaf_params(LEAF_ID);
    both_ekus(&mut p);
    assert_eq!(verify_leaf(p).unwrap(), id(LEAF_ID));
}

#[test]
fn valid_leaf_with_explicit_ca_false() {
    let mut p = leaf_params(LEAF_ID);
    p.is_ca = IsCa::ExplicitNoCa;
    assert_eq!(verify_leaf(p).unwrap(), id(LEAF_ID));
}

#[test]
fn valid_chain_with_intermediate() {
    let root = Ca::root("example.org");
    let mid = root.intermediate(ca_params(Some("spiffe://example.org")));
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    let chain = [leaf.clone(), mid.cert.clone()];
    assert_eq!(
        verify_x509_svid(&chain, &bundles, now()).unwrap(),
        id(LEAF_ID)
    );
    // Without the intermediate the leaf cannot reach the root.
    assert!(matches!(
        verify_x509_svid(&[leaf], &bundles, now()),
        Err(X509SvidError::ChainInvalid {
            reason: webpki::Error::UnknownIssuer,
            ..
        })
    ));
}

#[test]
fn intermediate_without_uri_san_is_allowed() {
    let root = Ca::root("example.org");
    let mid = root.intermediate(ca_params(None));
    assert_eq!(check_ca_profile(&mid.cert).unwrap(), None);
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.clone()], &bundles, now()).unwrap(),
        id(LEAF_ID)
    );
}

#[test]
fn empty_chain() {
    assert_eq!(
        verify_x509_svid(&[], &BundleSet::new(), now()),
        Err(X509SvidError::EmptyChain)
    );
}

#[test]
fn garbage_is_malformed() {
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02, 0x03]);
    assert!(matches!(
        check_leaf_profile(&junk),
        Err(X509SvidError::Malformed { .. })
    ));
}

#[test]
fn two_uri_sans() {
    let mut p = leaf_params(LEAF_ID);
    add_uri(&mut p, "spiffe://example.org/other");
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafUriSanCount { count: 2, .. })
    ));
}

#[test]
fn no_uri_san() {
    let mut p = leaf_params(LEAF_ID);
    p.subject_alt_names = vec![rcgen::SanType::DnsName("example.org".try_into().unwrap())];
    let ca = Ca::root("example.org");
    let leaf = ca.sign(&p);
    assert!(matches!(
        spiffe_id_of_leaf(&leaf),
        Err(X509SvidError::LeafUriSanCount { count: 0, .. })
    ));
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafUriSanCount { count: 0, .. })
    ));
}

#[test]
fn non_spiffe_uri() {
    let p = leaf_params("https://example.org/workload");
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::NotSpiffeId {
            uri: "https://example.org/workload".into(),
            cause: SpiffeIdError::WrongScheme {
                value: "https://example.org/workload".into()
            }
        })
    );
}

#[test]
fn root_path_leaf_id() {
    let p = leaf_params("spiffe://example.org");
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafIdWithoutPath {
            id: id("spiffe://example.org")
        })
    );
}

#[test]
fn leaf_is_ca() {
    let mut p = leaf_params(LEAF_ID);
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafIsCa { id: id(LEAF_ID) })
    );
}

#[test]
fn key_usage_missing() {
    let mut p = leaf_params(LEAF_ID);
    p.key_usages.clear();
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafKeyUsageMissing { id: id(LEAF_ID) })
    );
}

#[test]
fn key_usage_not_critical() {
    let mut p = leaf_params(LEAF_ID);
    non_critical_key_usage(&mut p);
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafKeyUsageNotCritical { id: id(LEAF_ID) })
    );
}

#[test]
fn missing_digital_signature() {
    let mut p = leaf_params(LEAF_ID);
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafMissingDigitalSignature { id: i, .. }) if i == id(LEAF_ID)
    ));
}

#[test]
fn key_cert_sign_on_leaf() {
    let mut p = leaf_params(LEAF_ID);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafKeyCertSign { id: i, .. }) if i == id(LEAF_ID)
    ));
}

#[test]
fn crl_sign_on_leaf() {
    let mut p = leaf_params(LEAF_ID);
    p.key_usages.push(KeyUsagePurpose::CrlSign);
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafCrlSign { id: i, .. }) if i == id(LEAF_ID)
    ));
}

#[test]
fn eku_with_only_server_auth() {
    let mut p = leaf_params(LEAF_ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafEkuMissing {
            id: id(LEAF_ID),
            missing: "clientAuth"
        })
    );
}

#[test]
fn eku_with_only_client_auth() {
    let mut p = leaf_params(LEAF_ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafEkuMissing {
            id: id(LEAF_ID),
            missing: "serverAuth"
        })
    );
}

#[test]
fn ca_with_path_in_its_id() {
    let root = Ca::root("example.org");
    let mid = root.intermediate(ca_params(Some("spiffe://example.org/ca")));
    assert_eq!(
        check_ca_profile(&mid.cert),
        Err(X509SvidError::CaIdHasPath {
            id: id("spiffe://example.org/ca")
        })
    );
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.clone()], &bundles, now()),
        Err(X509SvidError::CaIdHasPath {
            id: id("spiffe://example.org/ca")
        })
    );
}

#[test]
fn intermediate_not_ca() {
    let root = Ca::root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.is_ca = IsCa::ExplicitNoCa;
    let mid = root.intermediate(p);
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert!(matches!(
        verify_x509_svid(&[leaf, mid.cert.clone()], &bundles, now()),
        Err(X509SvidError::CaNotCa { .. })
    ));
}

#[test]
fn intermediate_without_key_cert_sign() {
    let root = Ca::root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.key_usages = vec![KeyUsagePurpose::CrlSign];
    let mid = root.intermediate(p);
    assert!(matches!(
        check_ca_profile(&mid.cert),
        Err(X509SvidError::CaMissingKeyCertSign { usage, .. }) if usage == "CRL Sign"
    ));
}

#[test]
fn wrong_trust_domain_bundle() {
    let ca = Ca::root("example.org");
    let leaf = ca.sign(&leaf_params(LEAF_ID));
    // The CA is trusted, but only for another trust domain.
    let bundles = bundles_for(&[("other.org", &ca)]);
    assert_eq!(
        verify_x509_svid(&[leaf], &bundles, now()),
        Err(X509SvidError::NoBundle {
            id: id(LEAF_ID),
            trust_domain: td("example.org")
        })
    );
}

#[test]
fn expired_leaf() {
    let mut p = leaf_params(LEAF_ID);
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2021, 1, 1);
    assert_eq!(
        verify_leaf(p),
        Err(X509SvidError::LeafNotValidNow {
            id: id(LEAF_ID),
            now: 1_750_000_000,
            not_before: 1_577_836_800,
            not_after: 1_609_459_200,
        })
    );
}

#[test]
fn expired_intermediate_fails_chain() {
    let root = Ca::root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.not_after = date_time_ymd(2021, 1, 1);
    let mid = root.intermediate(p);
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert!(matches!(
        verify_x509_svid(&[leaf, mid.cert.clone()], &bundles, now()),
        Err(X509SvidError::ChainInvalid {
            reason: webpki::Error::CertExpired { .. },
            ..
        })
    ));
}

#[test]
fn chain_to_unknown_ca() {
    let signer = Ca::root("example.org");
    let trusted = Ca::root("example.org");
    let leaf = signer.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &trusted)]);
    assert_eq!(
        verify_x509_svid(&[leaf], &bundles, now()),
        Err(X509SvidError::ChainInvalid {
            id: id(LEAF_ID),
            trust_domain: td("example.org"),
            reason: webpki::Error::UnknownIssuer
        })
    );
}

#[test]
fn chain_to_impostor_ca_with_the_trusted_name() {
    let params = ca_params(Some("spiffe://example.org"));
    let trusted = Ca::root_with(params.clone());
    let impostor = Ca::root_with(params);
    let leaf = impostor.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &trusted)]);
    assert!(matches!(
        verify_x509_svid(&[leaf], &bundles, now()),
        Err(X509SvidError::ChainInvalid {
            reason: webpki::Error::InvalidSignatureForPublicKey,
            ..
        })
    ));
}

#[test]
fn intermediate_limited_to_server_auth_still_verifies() {
    let root = Ca::root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mid = root.intermediate(p);
    let leaf = mid.sign(&leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.clone()], &bundles, now()).unwrap(),
        id(LEAF_ID)
    );
}

#[test]
fn profile_checks_return_ids() {
    let ca = Ca::root("example.org");
    assert_eq!(
        check_ca_profile(&ca.cert).unwrap(),
        Some(id("spiffe://example.org"))
    );
    let leaf = ca.sign(&leaf_params(LEAF_ID));
    assert_eq!(check_leaf_profile(&leaf).unwrap(), id(LEAF_ID));
    assert_eq!(spiffe_id_of_leaf(&leaf).unwrap(), id(LEAF_ID));
    // A leaf is not a CA.
    assert!(matches!(
        check_ca_profile(&leaf),
        Err(X509SvidError::CaNotCa { .. })
    ));
}
