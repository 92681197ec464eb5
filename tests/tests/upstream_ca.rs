//! The server under an external root CA (`--upstream-cert/--upstream-key`): sigil's CA is an
//! intermediate of that root, SVIDs chain to it, and the bundle is the root.

#[path = "support/cli.rs"]
mod support;

use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_spiffe::{Bundle, BundleSet, TrustDomain};
use sigil_test_util::ServerProcess;
use support::{TD, field, json, ok, pem_certs};

/// An external root CA: EC P-256, self-signed, written as cert.pem and PKCS#8 key.pem.
struct Root {
    der: CertificateDer<'static>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

fn external_root(dir: &std::path::Path) -> anyhow::Result<Root> {
    let mut params = sigil_test_util::certs::ca_params("Example Corp External Root")?;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Example Corp");
    let root = sigil_test_util::TestCa::root_with(params)?;
    let cert_path = dir.join("root.pem");
    let key_path = dir.join("root-key.pem");
    std::fs::write(&cert_path, root.pem())?;
    let key_pem = root.key_pem();
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 expected"
    );
    std::fs::write(&key_path, key_pem)?;
    Ok(Root {
        der: root.cert.der().clone(),
        cert_path,
        key_path,
    })
}

#[test]
fn svids_chain_through_sigil_intermediate_to_the_external_root() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = external_root(tmp.path())?;
    let server = ServerProcess::start(&[
        "--upstream-cert",
        root.cert_path.to_str().unwrap_or_default(),
        "--upstream-key",
        root.key_path.to_str().unwrap_or_default(),
    ])?;

    // The trust bundle is the external root and nothing else.
    let bundle_pem = pem_certs(&ok(&server, &["bundle", "show"])?)?;
    assert_eq!(bundle_pem, std::slice::from_ref(&root.der));
    let shown = support::bundle_from_json(&json(&server, &["bundle", "show"])?)?;
    assert_eq!(shown.x509_authorities, std::slice::from_ref(&root.der));
    assert!(
        !shown.jwt_authorities.is_empty(),
        "JWT keys stay sigil's own"
    );

    // svid.pem holds the leaf and sigil's intermediate; bundle.pem the root.
    let out = tmp.path().join("svid");
    let id = format!("spiffe://{TD}/w");
    let chain = support::mint_x509(&server, &id, &out)?;
    assert_eq!(chain.len(), 2, "leaf + sigil intermediate");
    assert_eq!(
        support::pem_file(&out.join("bundle.pem"))?,
        std::slice::from_ref(&root.der)
    );

    // rustls-webpki: anchors are the external root only, intermediates the rest of svid.pem.
    let anchors = [webpki::anchor_from_trusted_cert(&root.der)?];
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )?;
    }

    // The intermediate is issued by the root and is a SPIFFE CA certificate of the trust domain.
    let (_, root_cert) = x509_parser::parse_x509_certificate(&root.der)?;
    let (_, inter) = x509_parser::parse_x509_certificate(&chain[1])?;
    assert_eq!(inter.issuer().as_raw(), root_cert.subject().as_raw());
    assert!(inter.is_ca());
    inter
        .verify_signature(Some(root_cert.public_key()))
        .map_err(|e| anyhow::anyhow!("intermediate not signed by the root: {e}"))?;
    assert!(
        inter.validity().not_after <= root_cert.validity().not_after,
        "the intermediate outlives the root"
    );
    let ca_id = sigil_spiffe::x509::check_ca_profile(&chain[1])?;
    assert_eq!(ca_id.map(|i| i.to_string()), Some(format!("spiffe://{TD}")));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])?;
    assert_eq!(leaf.issuer().as_raw(), inter.subject().as_raw());

    // And the SPIFFE verifier agrees, with the root as the trust domain's only authority.
    let mut b = Bundle::new(TrustDomain::parse(TD)?);
    b.x509_authorities = vec![root.der.clone()];
    let mut set = BundleSet::new();
    set.insert(b);
    let got = sigil_spiffe::x509::verify_x509_svid(&chain, &set, UnixTime::now())?;
    assert_eq!(got.to_string(), id);
    // Without the intermediate the leaf does not chain to the root.
    assert!(
        sigil_spiffe::x509::verify_x509_svid(&chain[..1], &set, UnixTime::now()).is_err(),
        "a bare leaf must not verify against the external root"
    );

    // JWT-SVIDs still validate against the bundle's JWT keys.
    let token = ok(
        &server,
        &["jwt", "mint", "--spiffe-id", &id, "--audience", "a"],
    )?;
    let mut jwt_set = BundleSet::new();
    jwt_set.insert(shown);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    sigil_spiffe::jwt::validate_jwt_svid(token.trim(), &jwt_set, &["a".to_string()], now)?;
    let minted = json(&server, &["x509", "mint", "--spiffe-id", &id])?;
    assert_eq!(field(&minted, "spiffe_id")?, id);
    Ok(())
}

#[test]
fn a_key_that_does_not_match_the_upstream_certificate_stops_start_up() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let a = external_root(&mkdir(tmp.path().join("a"))?)?;
    let b = external_root(&mkdir(tmp.path().join("b"))?)?;
    let err = match ServerProcess::start(&[
        "--upstream-cert",
        a.cert_path.to_str().unwrap_or_default(),
        "--upstream-key",
        b.key_path.to_str().unwrap_or_default(),
    ]) {
        Ok(_) => anyhow::bail!("the server started with a mismatched upstream key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(a.cert_path.to_str().unwrap_or_default())
            || err.contains(b.key_path.to_str().unwrap_or_default()),
        "the start-up error should name the upstream file: {err}"
    );
    Ok(())
}

fn mkdir(path: std::path::PathBuf) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(&path)?;
    Ok(path)
}
