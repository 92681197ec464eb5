//! `sigil trust-domain migrate`: entries move to the new trust domain, new SVIDs are issued in it, SVIDs
//! of the old domain keep validating through its federated bundle, and a restart keeps the new domain.

#[path = "support/cli.rs"]
mod support;

use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_spiffe::BundleSet;
use sigil_test_util::ServerProcess;
use support::{
    TD, all_bundles, assert_mentions, entries, entry_count, fails, field, json, mint_x509, ok,
};

const NEW: &str = "new.example.com";

fn now() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs())
}

/// (SPIFFE ID, parent ID) of every entry, sorted.
fn id_pairs(server: &ServerProcess) -> anyhow::Result<Vec<(String, String)>> {
    let mut pairs = entries(server, &[])?
        .iter()
        .map(|e| {
            Ok((
                field(e, "spiffe_id")?.to_string(),
                field(e, "parent_id")?.to_string(),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    pairs.sort();
    Ok(pairs)
}

fn verify(chain: &[CertificateDer<'static>], set: &BundleSet) -> anyhow::Result<String> {
    Ok(sigil_spiffe::x509::verify_x509_svid(chain, set, UnixTime::now())?.to_string())
}

/// Both the own bundle (new domain) and the federated old one are there, and both SVIDs validate.
fn check_both_domains_validate(
    server: &ServerProcess,
    old_svid: &[CertificateDer<'static>],
    old_jwt: &str,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let own = json(server, &["bundle", "show"])?;
    assert_eq!(own["trust_domain"], NEW);
    let listed = json(server, &["bundle", "list"])?;
    let tds: Vec<&str> = listed["bundles"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|b| b["trust_domain"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(tds, [TD], "the old domain is federated: {listed}");
    let set = all_bundles(server)?;
    assert_eq!(set.len(), 2);

    let new_svid = mint_x509(server, &format!("spiffe://{NEW}/web"), dir)?;
    assert_eq!(verify(&new_svid, &set)?, format!("spiffe://{NEW}/web"));
    assert_eq!(verify(old_svid, &set)?, format!("spiffe://{TD}/web"));
    // Each SVID chains only to its own domain's authorities.
    let mut only_new = BundleSet::new();
    only_new.insert(support::bundle_from_json(&own)?);
    assert!(
        verify(old_svid, &only_new).is_err(),
        "old SVID must need the old bundle"
    );

    let claims = sigil_spiffe::jwt::validate_jwt_svid(old_jwt, &set, &["a".to_string()], now()?)?;
    assert_eq!(claims.spiffe_id.to_string(), format!("spiffe://{TD}/web"));
    let new_jwt = ok(
        server,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            &format!("spiffe://{NEW}/web"),
            "--audience",
            "a",
        ],
    )?;
    let claims =
        sigil_spiffe::jwt::validate_jwt_svid(new_jwt.trim(), &set, &["a".to_string()], now()?)?;
    assert_eq!(claims.spiffe_id.to_string(), format!("spiffe://{NEW}/web"));
    Ok(())
}

#[test]
fn migrate_moves_entries_and_keeps_old_svids_valid_across_restart() -> anyhow::Result<()> {
    let mut server = ServerProcess::start(&[])?;
    let tmp = tempfile::tempdir()?;
    let agent = |td: &str| format!("spiffe://{td}/sigil/agent/join_token/x");

    // Entries in the old domain, one of them parented by another entry.
    for (id, parent, sel) in [
        (format!("spiffe://{TD}/node"), agent(TD), "unix:uid:1"),
        (
            format!("spiffe://{TD}/web"),
            format!("spiffe://{TD}/node"),
            "unix:uid:2",
        ),
        (format!("spiffe://{TD}/db"), agent(TD), "unix:uid:3"),
    ] {
        ok(
            &server,
            &[
                "entry",
                "create",
                "--spiffe-id",
                &id,
                "--parent-id",
                &parent,
                "--selector",
                sel,
            ],
        )?;
    }
    let old_svid = mint_x509(
        &server,
        &format!("spiffe://{TD}/web"),
        &tmp.path().join("old"),
    )?;
    let old_jwt = ok(
        &server,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            &format!("spiffe://{TD}/web"),
            "--audience",
            "a",
        ],
    )?;
    let old_jwt = old_jwt.trim().to_string();
    let old_ca = json(&server, &["bundle", "show"])?;

    // Refusals first: a bad name, and the current domain.
    assert_mentions(
        &fails(&server, &["trust-domain", "migrate", "--to", "Not Valid"])?,
        &["to", "\"Not Valid\""],
    );
    assert_mentions(
        &fails(&server, &["trust-domain", "migrate", "--to", TD])?,
        &["to", TD, "already"],
    );

    let report = json(&server, &["trust-domain", "migrate", "--to", NEW])?;
    assert_eq!(report["from"], TD);
    assert_eq!(report["to"], NEW);
    assert_eq!(report["entries_migrated"], 3);

    // Entries: same paths, SPIFFE and parent IDs in the new domain.
    let want = vec![
        (format!("spiffe://{NEW}/db"), agent(NEW)),
        (format!("spiffe://{NEW}/node"), agent(NEW)),
        (
            format!("spiffe://{NEW}/web"),
            format!("spiffe://{NEW}/node"),
        ),
    ];
    assert_eq!(id_pairs(&server)?, want);
    assert_eq!(entry_count(&server)?, 3);
    let found = entries(&server, &["--spiffe-id", &format!("spiffe://{NEW}/web")])?;
    assert_eq!(found.len(), 1);
    assert!(entries(&server, &["--spiffe-id", &format!("spiffe://{TD}/web")])?.is_empty());

    // New entries belong to the new domain; the old one is now foreign.
    ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://{NEW}/cache"),
            "--parent-id",
            &agent(NEW),
            "--selector",
            "unix:uid:4",
        ],
    )?;
    assert_mentions(
        &fails(
            &server,
            &[
                "entry",
                "create",
                "--spiffe-id",
                &format!("spiffe://{TD}/cache"),
                "--parent-id",
                &agent(TD),
                "--selector",
                "unix:uid:5",
            ],
        )?,
        &[
            "spiffe_id",
            &format!("\"spiffe://{TD}/cache\""),
            "trust domain",
        ],
    );
    assert_mentions(
        &fails(
            &server,
            &["x509", "mint", "--spiffe-id", &format!("spiffe://{TD}/web")],
        )?,
        &[&format!("\"spiffe://{TD}/web\""), "trust domain"],
    );

    // The federated old bundle is the old CA as it was before the migration.
    let listed = json(&server, &["bundle", "list"])?;
    let old_fed = support::bundle_from_json(&listed["bundles"][0])?;
    assert_eq!(
        old_fed.x509_authorities,
        support::bundle_from_json(&old_ca)?.x509_authorities
    );
    check_both_domains_validate(&server, &old_svid, &old_jwt, &tmp.path().join("new"))?;

    // A restart with the same flags (the default trust domain is still identity.example.com) keeps
    // serving the new domain.
    assert!(server.terminate()?, "clean exit on SIGTERM");
    server.spawn()?;
    assert_eq!(json(&server, &["bundle", "show"])?["trust_domain"], NEW);
    let mut want = want;
    want.push((format!("spiffe://{NEW}/cache"), agent(NEW)));
    want.sort();
    assert_eq!(id_pairs(&server)?, want);
    check_both_domains_validate(&server, &old_svid, &old_jwt, &tmp.path().join("restarted"))?;

    // Same after a crash.
    server.kill9();
    server.spawn()?;
    assert_eq!(json(&server, &["bundle", "show"])?["trust_domain"], NEW);
    check_both_domains_validate(&server, &old_svid, &old_jwt, &tmp.path().join("crashed"))?;
    Ok(())
}
