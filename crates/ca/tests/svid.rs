//! X.509-SVID and JWT-SVID issuance: leaf profile, chain verification (self-signed and through an
//! upstream CA), TTL rules, CSR checks, JWT verification against the bundle, other key types.

#![allow(clippy::unwrap_used)]

#[path = "util/support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_RSA_SHA256,
};
use sigil_ca::{Ca, CaError, KeyType, MemoryJournal, UpstreamAuthority, csr_spiffe_id};
use support::*;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

fn open_with(cfg: sigil_ca::CaConfig, clock: &ManualClock) -> Result<Ca, CaError> {
    Ca::open(cfg, Arc::new(clock.clone()), Arc::new(MemoryJournal::new()))
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

#[test]
fn leaf_has_the_x509_svid_profile_and_chains_to_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(HOUR));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let wid = id("/ns/web/sa/frontend");
    let (csr, csr_key) = csr_with_uris(&[wid.as_str()]);
    let dns = vec!["web.example.org".to_string(), "web".to_string()];
    let svid = ca.sign_csr(&csr, &wid, &dns, None).unwrap();
    assert_eq!(svid.spiffe_id, wid);
    assert_eq!(
        svid.cert_chain.len(),
        1,
        "self-signed root is never in the chain"
    );
    assert_eq!(svid.expires_at, at(2 * HOUR));

    let leaf = parse(&svid.cert_chain[0]);
    assert_eq!(hex::encode(leaf.raw_serial()), svid.serial_hex);
    assert_eq!(leaf.raw_serial().len(), 16);
    assert_eq!(
        leaf.validity().not_after.timestamp() as u64,
        T0_SECS + 2 * HOUR
    );
    assert_eq!(
        leaf.validity().not_before.timestamp() as u64,
        T0_SECS + HOUR - 10
    );
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        csr_key.public_key_raw(),
        "only the CSR's key is taken"
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![wid.as_str()]);
    let dns_sans: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns_sans, vec!["web.example.org", "web"]);
    let cn = leaf.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "web.example.org");

    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().expect("key usage present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());
    let eku = leaf
        .extended_key_usage()
        .unwrap()
        .expect("EKU present")
        .value;
    assert!(eku.server_auth && eku.client_auth);

    let bundle = ca.bundle();
    verify(&svid, &bundle, at(HOUR)).unwrap();
    // The other engineer's SPIFFE validator agrees with the profile.
    assert_eq!(
        sigil_spiffe::check_leaf_profile(&svid.cert_chain[0]).unwrap(),
        wid
    );
}

#[test]
fn ca_certificate_has_the_ca_profile() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let bundle = ca.bundle();
    let root = parse(&bundle.x509_authorities[0]);
    assert_eq!(root.subject().as_raw(), root.issuer().as_raw());
    let san = root.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        vec![GeneralName::URI("spiffe://example.org")]
    );
    let bc = root.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    let ku = root.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(root.validity().not_before.timestamp() as u64, T0_SECS - 10);
    assert_eq!(
        root.validity().not_after.timestamp() as u64,
        T0_SECS + 6 * HOUR
    );
    let org = root.subject().iter_organization().next().unwrap();
    assert_eq!(org.as_str().unwrap(), "sigil");
    let status = ca.status();
    assert_eq!(hex::encode(root.raw_serial()), status.active.serial_hex);
    assert_eq!(status.active.not_after, at(6 * HOUR));
}

#[test]
fn ttl_is_capped_at_the_ca_expiry_and_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    clock.set(at(2 * HOUR));
    let wid = id("/w");
    let svid = ca
        .sign_csr(
            &csr_for(&wid),
            &wid,
            &[],
            Some(Duration::from_secs(24 * HOUR)),
        )
        .unwrap();
    assert_eq!(svid.expires_at, at(6 * HOUR));
    let leaf = parse(&svid.cert_chain[0]);
    assert_eq!(
        leaf.validity().not_after.timestamp() as u64,
        T0_SECS + 6 * HOUR
    );
    let jwt = ca
        .mint_jwt_svid(&wid, &["a".into()], Some(Duration::from_secs(24 * HOUR)))
        .unwrap();
    assert_eq!(jwt.expires_at, at(6 * HOUR));

    let err = ca
        .sign_csr(&csr_for(&wid), &wid, &[], Some(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(err, CaError::ZeroTtl { .. }), "{err}");
    let err = ca
        .mint_jwt_svid(&wid, &["a".into()], Some(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(err, CaError::ZeroTtl { .. }), "{err}");
}

#[test]
fn csr_with_a_bad_signature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let wid = id("/w");
    let mut csr = csr_for(&wid);
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let err = ca.sign_csr(&csr, &wid, &[], None).unwrap_err();
    assert!(matches!(err, CaError::CsrSignature { .. }), "{err}");
    let err = csr_spiffe_id(&csr).unwrap_err();
    assert!(matches!(err, CaError::CsrSignature { .. }), "{err}");

    let err = ca.sign_csr(b"not a csr", &wid, &[], None).unwrap_err();
    assert!(matches!(err, CaError::CsrParse { .. }), "{err}");
}

#[test]
fn requested_ids_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let td_id = td().id();
    let err = ca
        .sign_csr(&csr_for(&id("/w")), &td_id, &[], None)
        .unwrap_err();
    assert!(matches!(err, CaError::SpiffeIdWithoutPath { .. }), "{err}");
    let foreign = sigil_spiffe::SpiffeId::parse("spiffe://other.org/w").unwrap();
    let err = ca
        .sign_csr(&csr_for(&foreign), &foreign, &[], None)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignSpiffeId { .. }), "{err}");
    assert!(err.to_string().contains("spiffe://other.org/w"));
    let err = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &["bad name!".into()], None)
        .unwrap_err();
    assert!(matches!(err, CaError::InvalidDnsName { .. }), "{err}");
    let err = ca.mint_jwt_svid(&id("/w"), &[], None).unwrap_err();
    assert!(matches!(err, CaError::BadAudience { .. }), "{err}");
}

#[test]
fn csr_spiffe_id_reads_the_single_uri_san() {
    let (csr, _) = csr_with_uris(&["spiffe://example.org/ns/a"]);
    assert_eq!(csr_spiffe_id(&csr).unwrap(), id("/ns/a"));
    let (none, _) = csr_with_uris(&[]);
    assert!(matches!(
        csr_spiffe_id(&none),
        Err(CaError::CsrUriSanCount { count: 0 })
    ));
    let (two, _) = csr_with_uris(&["spiffe://example.org/a", "spiffe://example.org/b"]);
    assert!(matches!(
        csr_spiffe_id(&two),
        Err(CaError::CsrUriSanCount { count: 2 })
    ));
    let (bad, _) = csr_with_uris(&["https://example.org/a"]);
    assert!(matches!(
        csr_spiffe_id(&bad),
        Err(CaError::CsrSpiffeId { .. })
    ));
}

#[test]
fn jwt_svid_verifies_with_the_bundle_jwk() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(HOUR));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let wid = id("/ns/db");
    let aud = vec!["spiffe://example.org/gw".to_string(), "other".to_string()];
    let jwt = ca.mint_jwt_svid(&wid, &aud, None).unwrap();
    assert_eq!(jwt.expires_at, at(HOUR + 5 * MIN));

    let header = jsonwebtoken::decode_header(&jwt.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.unwrap();
    let bundle = ca.bundle();
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.key_id == kid)
        .expect("kid published");
    assert_eq!(authority.jwk.common.key_id.as_deref(), Some(kid.as_str()));
    let key = jsonwebtoken::DecodingKey::from_jwk(&authority.jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    // The test clock is in 2023; expiry is checked against it by hand below.
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    validation.set_audience(&["other"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&jwt.token, &key, &validation).unwrap();
    let claims = data.claims;
    assert_eq!(claims["sub"], wid.as_str());
    assert_eq!(claims["aud"], serde_json::json!(aud));
    assert_eq!(claims["iat"], T0_SECS + HOUR);
    assert_eq!(claims["exp"], T0_SECS + HOUR + 5 * MIN);

    validation.set_audience(&["someone-else"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&jwt.token, &key, &validation).is_err());
    let mut tampered = jwt.token.clone();
    tampered.pop();
    tampered.push(if jwt.token.ends_with('A') { 'B' } else { 'A' });
    validation.set_audience(&["other"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&tampered, &key, &validation).is_err());
}

#[test]
fn minted_svid_comes_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let ca = open_with(config(dir.path()), &clock).unwrap();
    let sid = id("/sigil/server");
    let (svid, key) = ca
        .mint_x509_svid_with_key(&sid, &["server.example.org".into()], None)
        .unwrap();
    let key = KeyPair::try_from(&key).unwrap();
    let leaf = parse(&svid.cert_chain[0]);
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    verify(&svid, &ca.bundle(), at(0)).unwrap();
}

#[test]
fn p384_and_rsa2048_cas_work() {
    for (key_type, oid) in [
        (KeyType::EcP384, "1.2.840.10045.2.1"),
        (KeyType::Rsa2048, "1.2.840.113549.1.1.1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(at(0));
        let mut cfg = config(dir.path());
        cfg.key_type = key_type;
        let ca = open_with(cfg, &clock).unwrap();
        let bundle = ca.bundle();
        let root = parse(&bundle.x509_authorities[0]);
        assert_eq!(
            root.public_key().algorithm.algorithm.to_id_string(),
            oid,
            "{key_type}"
        );
        if key_type == KeyType::Rsa2048 {
            assert_eq!(root.public_key().parsed().unwrap().key_size(), 2048);
        } else {
            assert_eq!(root.public_key().parsed().unwrap().key_size(), 384);
        }
        let svid = ca
            .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
            .unwrap();
        verify(&svid, &bundle, at(0)).unwrap();
        // JWT keys stay ES256 whatever the CA key type.
        let jwt = ca.mint_jwt_svid(&id("/w"), &["a".into()], None).unwrap();
        let header = jsonwebtoken::decode_header(&jwt.token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    }
    assert_eq!("rsa-2048".parse::<KeyType>().unwrap(), KeyType::Rsa2048);
    assert_eq!(KeyType::default().to_string(), "ec-p256");
    assert!("rsa-1024".parse::<KeyType>().is_err());
}

/// An external PKI: a root and an intermediate "upstream CA" whose PEM files the CA reads.
struct ExternalPki {
    root_der: rustls_pki_types::CertificateDer<'static>,
    upstream: UpstreamAuthority,
}

fn ca_params(cn: &str, not_after_secs: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Example Corp");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::from_unix_timestamp((T0_SECS - HOUR) as i64).unwrap();
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp((T0_SECS + not_after_secs) as i64).unwrap();
    params
}

/// Writes `chain.pem` (upstream CA then root, or the root alone) and `upstream.key`.
fn external_pki(dir: &Path, with_intermediate: bool, upstream_not_after: u64) -> ExternalPki {
    let root_key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let root_params = ca_params("Example Root", 100 * HOUR);
    let root = root_params.self_signed(&root_key).unwrap();
    let (chain_pem, key_pem) = if with_intermediate {
        let mid_key = KeyPair::generate().unwrap();
        let mut mid_params = ca_params("Example Issuing CA", upstream_not_after);
        mid_params.use_authority_key_identifier_extension = true;
        let root_issuer = Issuer::new(root_params, &root_key);
        let mid = mid_params.signed_by(&mid_key, &root_issuer).unwrap();
        (
            format!("{}{}", mid.pem(), root.pem()),
            mid_key.serialize_pem(),
        )
    } else {
        (root.pem(), root_key.serialize_pem())
    };
    let cert_chain_pem = dir.join("chain.pem");
    let key_pem_path = dir.join("upstream.key");
    std::fs::write(&cert_chain_pem, chain_pem).unwrap();
    std::fs::write(&key_pem_path, key_pem).unwrap();
    ExternalPki {
        root_der: root.der().clone(),
        upstream: UpstreamAuthority {
            cert_chain_pem,
            key_pem: key_pem_path,
        },
    }
}

#[test]
fn upstream_chain_leaf_to_sigil_intermediate_to_external_root() {
    let dir = tempfile::tempdir().unwrap();
    let pki = external_pki(dir.path(), true, 100 * HOUR);
    let clock = ManualClock::new(at(0));
    let mut cfg = config(dir.path());
    cfg.upstream = Some(pki.upstream.clone());
    let ca = open_with(cfg, &clock).unwrap();

    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities, vec![pki.root_der.clone()]);
    let svid = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
        .unwrap();
    assert_eq!(
        svid.cert_chain.len(),
        3,
        "leaf, sigil CA, upstream CA; no root"
    );
    assert!(!svid.cert_chain.contains(&pki.root_der));
    verify(&svid, &bundle, at(0)).unwrap();

    let leaf = parse(&svid.cert_chain[0]);
    let sigil = parse(&svid.cert_chain[1]);
    let upstream = parse(&svid.cert_chain[2]);
    assert_eq!(leaf.issuer().as_raw(), sigil.subject().as_raw());
    assert_eq!(sigil.issuer().as_raw(), upstream.subject().as_raw());
    assert!(sigil.is_ca());
    let aki = sigil
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
            _ => None,
        })
        .expect("AKI on the sigil intermediate");
    let ski = upstream
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki.0, ski.0);
    assert_eq!(sigil::sigil_td_uri(&sigil), "spiffe://example.org");

    // Rotation under an upstream keeps the bundle at the external root; JWT keys still rotate.
    clock.set(at(3 * HOUR));
    assert!(ca.rotate().unwrap().prepared);
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities, vec![pki.root_der.clone()]);
    assert_eq!(bundle.jwt_authorities.len(), 2);
}

mod sigil {
    use super::*;
    /// The single URI SAN of a certificate.
    pub fn sigil_td_uri(cert: &X509Certificate<'_>) -> String {
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        match san.general_names.as_slice() {
            [GeneralName::URI(u)] => u.to_string(),
            other => panic!("unexpected SANs {other:?}"),
        }
    }
}

#[test]
fn upstream_expiry_caps_the_sigil_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = external_pki(dir.path(), true, 2 * HOUR);
    let clock = ManualClock::new(at(0));
    let mut cfg = config(dir.path());
    cfg.upstream = Some(pki.upstream);
    let ca = open_with(cfg, &clock).unwrap();
    assert_eq!(ca.status().active.not_after, at(2 * HOUR));
    let svid = ca
        .sign_csr(
            &csr_for(&id("/w")),
            &id("/w"),
            &[],
            Some(Duration::from_secs(10 * HOUR)),
        )
        .unwrap();
    assert_eq!(svid.expires_at, at(2 * HOUR));
}

#[test]
fn root_only_upstream_with_an_rsa_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = external_pki(dir.path(), false, 0);
    let clock = ManualClock::new(at(0));
    let mut cfg = config(dir.path());
    cfg.upstream = Some(pki.upstream);
    let ca = open_with(cfg, &clock).unwrap();
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities, vec![pki.root_der.clone()]);
    let svid = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
        .unwrap();
    assert_eq!(svid.cert_chain.len(), 2, "leaf and sigil CA");
    verify(&svid, &bundle, at(0)).unwrap();
}

#[test]
fn bad_upstream_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = external_pki(dir.path(), true, 100 * HOUR);
    let clock = ManualClock::new(at(0));

    // A key that is not the upstream CA's.
    let wrong_key = dir.path().join("wrong.key");
    std::fs::write(&wrong_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let mut cfg = config(dir.path());
    cfg.upstream = Some(UpstreamAuthority {
        cert_chain_pem: pki.upstream.cert_chain_pem.clone(),
        key_pem: wrong_key.clone(),
    });
    let err = open_with(cfg, &clock).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("wrong.key"), "{err}");

    // The chain root-first instead of leaf-first.
    let pem = std::fs::read(&pki.upstream.cert_chain_pem).unwrap();
    let certs: Vec<_> = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
        .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
        .unwrap();
    let reversed = dir.path().join("reversed.pem");
    let to_pem = |c: &rustls_pki_types::CertificateDer<'_>| {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c);
        format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
    };
    std::fs::write(
        &reversed,
        format!("{}{}", to_pem(&certs[1]), to_pem(&certs[0])),
    )
    .unwrap();
    let mut cfg = config(dir.path());
    cfg.upstream = Some(UpstreamAuthority {
        cert_chain_pem: reversed,
        key_pem: pki.upstream.key_pem.clone(),
    });
    let err = open_with(cfg, &clock).unwrap_err();
    assert!(matches!(err, CaError::Upstream { .. }), "{err}");

    // An empty chain file.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut cfg = config(dir.path());
    cfg.upstream = Some(UpstreamAuthority {
        cert_chain_pem: empty,
        key_pem: pki.upstream.key_pem,
    });
    let err = open_with(cfg, &clock).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
}

#[test]
fn switching_to_an_upstream_keeps_the_old_root_while_its_svids_live() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(at(0));
    let journal = Arc::new(MemoryJournal::new());
    let ca = Ca::open(config(dir.path()), Arc::new(clock.clone()), journal.clone()).unwrap();
    let self_signed_root = ca.bundle().x509_authorities[0].clone();
    let before = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
        .unwrap();
    drop(ca);

    let pki = external_pki(dir.path(), true, 100 * HOUR);
    let mut cfg = config(dir.path());
    cfg.upstream = Some(pki.upstream);
    clock.set(at(10 * MIN));
    let ca = Ca::open(cfg, Arc::new(clock.clone()), journal).unwrap();
    let bundle = ca.bundle();
    assert_eq!(
        bundle.x509_authorities,
        vec![self_signed_root, pki.root_der.clone()]
    );
    assert_eq!(ca.status().old.len(), 1);
    verify(&before, &bundle, at(10 * MIN)).unwrap();
    let after = ca
        .sign_csr(&csr_for(&id("/w")), &id("/w"), &[], None)
        .unwrap();
    assert_eq!(chains_to(&after, &bundle, at(10 * MIN)), vec![1]);

    // Across a restart the journal's bound runs one default TTL past the last SVID (1 h + 1 h).
    clock.set(at(HOUR));
    assert_eq!(ca.rotate().unwrap().pruned, 0);
    clock.set(at(2 * HOUR));
    assert_eq!(ca.rotate().unwrap().pruned, 1);
    assert_eq!(ca.bundle().x509_authorities, vec![pki.root_der]);
}
