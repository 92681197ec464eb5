//! X.509-SVID rules: for each rule a chain that breaks exactly that rule, plus valid chains.

#![allow(clippy::unwrap_used)]

#[path = "support/certs.rs"]
mod certs;

use certs::{
    TestCa, add_uri, both_ekus, ca_params, leaf_params, non_critical_key_usage, now, root, sign,
};
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

fn bundles_for(cas: &[(&str, &TestCa)]) -> BundleSet {
    let mut set = BundleSet::new();
    for (name, ca) in cas {
        let mut b = Bundle::new(td(name));
        b.x509_authorities.push(ca.cert.der().clone());
        set.insert(b);
    }
    set
}

/// Verifies a leaf made from `params` by a fresh example.org root trusted for example.org.
fn verify_leaf(params: rcgen::CertificateParams) -> Result<SpiffeId, X509SvidError> {
    let ca = root("example.org");
    let leaf = sign(&ca, &params);
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
    let root = root("example.org");
    let mid = root
        .intermediate_with(ca_params(Some("spiffe://example.org")))
        .unwrap();
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    let chain = [leaf.clone(), mid.cert.der().clone()];
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
    let root = root("example.org");
    let mid = root.intermediate_with(ca_params(None)).unwrap();
    assert_eq!(check_ca_profile(mid.cert.der()).unwrap(), None);
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.der().clone()], &bundles, now()).unwrap(),
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
    let ca = root("example.org");
    let leaf = sign(&ca, &p);
    assert!(matches!(
        spiffe_id_of_leaf(&leaf),
        Err(X509SvidError::LeafUriSanCount { count: 0, .. })
    ));
    assert!(matches!(
        verify_leaf(p),
        Err(X509SvidError::LeafUriSanCount { count: 0, .. })
    ));
}

/// A leaf of `id` with one change.
fn leaf_with(
    id: &str,
    change: impl FnOnce(&mut rcgen::CertificateParams),
) -> rcgen::CertificateParams {
    let mut p = leaf_params(id);
    change(&mut p);
    p
}

/// Each leaf profile rule broken alone, and the error naming it.
#[test]
fn each_broken_leaf_rule_gives_its_error() {
    let https = "https://example.org/workload";
    let cases = [
        (
            "non-SPIFFE URI",
            leaf_params(https),
            X509SvidError::NotSpiffeId {
                uri: https.into(),
                cause: SpiffeIdError::WrongScheme {
                    value: https.into(),
                },
            },
        ),
        (
            "ID without a path",
            leaf_params("spiffe://example.org"),
            X509SvidError::LeafIdWithoutPath {
                id: id("spiffe://example.org"),
            },
        ),
        (
            "leaf is a CA",
            leaf_with(LEAF_ID, |p| {
                p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
            }),
            X509SvidError::LeafIsCa { id: id(LEAF_ID) },
        ),
        (
            "no key usage",
            leaf_with(LEAF_ID, |p| p.key_usages.clear()),
            X509SvidError::LeafKeyUsageMissing { id: id(LEAF_ID) },
        ),
        (
            "key usage not critical",
            leaf_with(LEAF_ID, non_critical_key_usage),
            X509SvidError::LeafKeyUsageNotCritical { id: id(LEAF_ID) },
        ),
        (
            "EKU serverAuth only",
            leaf_with(LEAF_ID, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
            }),
            X509SvidError::LeafEkuMissing {
                id: id(LEAF_ID),
                missing: "clientAuth",
            },
        ),
        (
            "EKU clientAuth only",
            leaf_with(LEAF_ID, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]
            }),
            X509SvidError::LeafEkuMissing {
                id: id(LEAF_ID),
                missing: "serverAuth",
            },
        ),
    ];
    for (what, params, want) in cases {
        assert_eq!(verify_leaf(params), Err(want), "{what}");
    }
}

/// Key usages a leaf must have (digitalSignature) or must not have (keyCertSign, cRLSign).
#[test]
fn each_wrong_leaf_key_usage_gives_its_error() {
    type Check = fn(&X509SvidError) -> bool;
    let cases: [(&str, rcgen::CertificateParams, Check); 3] = [
        (
            "no digitalSignature",
            leaf_with(LEAF_ID, |p| {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
            }),
            |e| matches!(e, X509SvidError::LeafMissingDigitalSignature { id: i, .. } if *i == id(LEAF_ID)),
        ),
        (
            "keyCertSign",
            leaf_with(LEAF_ID, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            |e| matches!(e, X509SvidError::LeafKeyCertSign { id: i, .. } if *i == id(LEAF_ID)),
        ),
        (
            "cRLSign",
            leaf_with(LEAF_ID, |p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
            |e| matches!(e, X509SvidError::LeafCrlSign { id: i, .. } if *i == id(LEAF_ID)),
        ),
    ];
    for (what, params, check) in cases {
        let got = verify_leaf(params);
        assert!(got.as_ref().is_err_and(check), "{what}: {got:?}");
    }
}

#[test]
fn ca_with_path_in_its_id() {
    let root = root("example.org");
    let mid = root
        .intermediate_with(ca_params(Some("spiffe://example.org/ca")))
        .unwrap();
    assert_eq!(
        check_ca_profile(mid.cert.der()),
        Err(X509SvidError::CaIdHasPath {
            id: id("spiffe://example.org/ca")
        })
    );
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.der().clone()], &bundles, now()),
        Err(X509SvidError::CaIdHasPath {
            id: id("spiffe://example.org/ca")
        })
    );
}

#[test]
fn intermediate_not_ca() {
    let root = root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.is_ca = IsCa::ExplicitNoCa;
    let mid = root.intermediate_with(p).unwrap();
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert!(matches!(
        verify_x509_svid(&[leaf, mid.cert.der().clone()], &bundles, now()),
        Err(X509SvidError::CaNotCa { .. })
    ));
}

#[test]
fn intermediate_without_key_cert_sign() {
    let root = root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.key_usages = vec![KeyUsagePurpose::CrlSign];
    let mid = root.intermediate_with(p).unwrap();
    assert!(matches!(
        check_ca_profile(mid.cert.der()),
        Err(X509SvidError::CaMissingKeyCertSign { usage, .. }) if usage == "CRL Sign"
    ));
}

#[test]
fn wrong_trust_domain_bundle() {
    let ca = root("example.org");
    let leaf = sign(&ca, &leaf_params(LEAF_ID));
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
    let root = root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.not_after = date_time_ymd(2021, 1, 1);
    let mid = root.intermediate_with(p).unwrap();
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert!(matches!(
        verify_x509_svid(&[leaf, mid.cert.der().clone()], &bundles, now()),
        Err(X509SvidError::ChainInvalid {
            reason: webpki::Error::CertExpired { .. },
            ..
        })
    ));
}

#[test]
fn chain_to_unknown_ca() {
    let signer = root("example.org");
    let trusted = root("example.org");
    let leaf = sign(&signer, &leaf_params(LEAF_ID));
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
    let trusted = TestCa::root_with(params.clone()).unwrap();
    let impostor = TestCa::root_with(params).unwrap();
    let leaf = sign(&impostor, &leaf_params(LEAF_ID));
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
    let root = root("example.org");
    let mut p = ca_params(Some("spiffe://example.org"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mid = root.intermediate_with(p).unwrap();
    let leaf = sign(&mid, &leaf_params(LEAF_ID));
    let bundles = bundles_for(&[("example.org", &root)]);
    assert_eq!(
        verify_x509_svid(&[leaf, mid.cert.der().clone()], &bundles, now()).unwrap(),
        id(LEAF_ID)
    );
}

#[test]
fn profile_checks_return_ids() {
    let ca = root("example.org");
    assert_eq!(
        check_ca_profile(ca.cert.der()).unwrap(),
        Some(id("spiffe://example.org"))
    );
    let leaf = sign(&ca, &leaf_params(LEAF_ID));
    assert_eq!(check_leaf_profile(&leaf).unwrap(), id(LEAF_ID));
    assert_eq!(spiffe_id_of_leaf(&leaf).unwrap(), id(LEAF_ID));
    // A leaf is not a CA.
    assert!(matches!(
        check_ca_profile(&leaf),
        Err(X509SvidError::CaNotCa { .. })
    ));
}
