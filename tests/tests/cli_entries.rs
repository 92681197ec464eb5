//! The `sigil` CLI against a real server: entry CRUD and batches, bad input refused with the field and
//! value and nothing written, join tokens, agents, bundles, minted SVIDs and the health check.

#[path = "support/cli.rs"]
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};

use rustls_pki_types::UnixTime;
use serde_json::{Value, json as j};
use sigil_spiffe::{Bundle, BundleSet, TrustDomain};
use sigil_test_util::{ServerProcess, sigil_bin};
use support::{
    TD, assert_mentions, data_entry, entries, entry_count, fails, field, json, ok, pem_certs,
    pem_file, write_data,
};

/// An agent that need not exist: parents under /sigil/agent/ are always accepted.
fn agent() -> String {
    format!("spiffe://{TD}/sigil/agent/join_token/x")
}

fn id(path: &str) -> String {
    format!("spiffe://{TD}{path}")
}

/// The one entry a create/update/show printed as JSON.
fn only(v: &Value) -> anyhow::Result<Value> {
    match v["entries"].as_array().map(Vec::as_slice) {
        Some([e]) => Ok(e.clone()),
        _ => anyhow::bail!("expected exactly one entry in {v}"),
    }
}

fn spiffe_ids(list: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut ids = list
        .iter()
        .map(|e| field(e, "spiffe_id").map(str::to_string))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ids.sort();
    Ok(ids)
}

#[test]
fn entry_crud_and_batches() -> anyhow::Result<()> {
    let s = ServerProcess::start(&[])?;
    let tmp = tempfile::tempdir()?;
    let agent = agent();

    // Create, text output: SPIRE's layout, with the server-assigned ID.
    let text = ok(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/web"),
            "--parent-id",
            &agent,
            "--selector",
            "unix:uid:1000",
            "--dns",
            "web.example.org",
        ],
    )?;
    assert!(
        text.contains(&format!("SPIFFE ID        : {}\n", id("/web"))),
        "{text}"
    );
    assert!(
        text.contains("Selector         : unix:uid:1000\n"),
        "{text}"
    );
    assert!(
        text.contains("DNS name         : web.example.org\n"),
        "{text}"
    );
    assert!(text.contains("Revision         : 0\n"), "{text}");
    let web_id = text
        .lines()
        .find_map(|l| l.strip_prefix("Entry ID         : "))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no Entry ID line in {text}"))?;

    // Create, JSON output: every field given comes back.
    let db = only(&json(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/db"),
            "--parent-id",
            &agent,
            "--selector",
            "unix:uid:2000",
            "--selector",
            "unix:gid:50",
            "--x509-svid-ttl",
            "300",
            "--jwt-svid-ttl",
            "60",
            "--hint",
            "database",
            "--admin",
        ],
    )?)?;
    assert_eq!(field(&db, "spiffe_id")?, id("/db"));
    assert_eq!(field(&db, "parent_id")?, agent);
    assert_eq!(db["x509_svid_ttl"], 300);
    assert_eq!(db["jwt_svid_ttl"], 60);
    assert_eq!(db["hint"], "database");
    assert_eq!(db["admin"], true);
    assert_eq!(db["revision_number"], 0);
    assert_eq!(
        db["selectors"],
        j!([{"type": "unix", "value": "gid:50"}, {"type": "unix", "value": "uid:2000"}])
    );
    let db_id = field(&db, "id")?.to_string();

    // An entry may name another entry as its parent.
    let child = only(&json(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/web/sidecar"),
            "--parent-id",
            &id("/web"),
            "--selector",
            "unix:user:envoy",
        ],
    )?)?;
    let child_id = field(&child, "id")?.to_string();

    // Show by entry ID, SPIFFE ID, parent ID and selector.
    let by_id = only(&json(&s, &["entry", "show", "--entry-id", &web_id])?)?;
    assert_eq!(field(&by_id, "spiffe_id")?, id("/web"));
    assert_eq!(by_id["dns_names"], j!(["web.example.org"]));
    let by_spiffe = entries(&s, &["--spiffe-id", &id("/db")])?;
    assert_eq!(spiffe_ids(&by_spiffe)?, [id("/db")]);
    let by_parent = entries(&s, &["--parent-id", &agent])?;
    assert_eq!(spiffe_ids(&by_parent)?, [id("/db"), id("/web")]);
    let by_child_parent = entries(&s, &["--parent-id", &id("/web")])?;
    assert_eq!(spiffe_ids(&by_child_parent)?, [id("/web/sidecar")]);
    let by_selector = entries(&s, &["--selector", "unix:uid:2000"])?;
    assert_eq!(spiffe_ids(&by_selector)?, [id("/db")]);
    let exact = entries(&s, &["--selector", "unix:uid:2000", "--match", "exact"])?;
    assert!(exact.is_empty(), "db has two selectors: {exact:?}");
    let text = ok(&s, &["entry", "show", "--selector", "unix:uid:1000"])?;
    assert!(text.starts_with("Found 1 entry\n"), "{text}");
    assert!(text.contains(&web_id), "{text}");

    // Update changes only the field given and bumps the revision.
    let updated = only(&json(
        &s,
        &[
            "entry",
            "update",
            "--entry-id",
            &db_id,
            "--x509-svid-ttl",
            "600",
        ],
    )?)?;
    assert_eq!(updated["x509_svid_ttl"], 600);
    assert_eq!(updated["revision_number"], 1);
    assert_eq!(updated["jwt_svid_ttl"], 60);
    assert_eq!(updated["hint"], "database");
    assert_eq!(updated["selectors"], db["selectors"]);
    assert_eq!(updated["created_at"], db["created_at"]);
    let shown = only(&json(&s, &["entry", "show", "--entry-id", &db_id])?)?;
    assert_eq!(shown, updated);

    // Count, text and JSON, with and without a filter.
    assert_eq!(ok(&s, &["entry", "count"])?, "3 registration entries\n");
    assert_eq!(entry_count(&s)?, 3);
    let filtered = json(&s, &["entry", "count", "--parent-id", &agent])?;
    assert_eq!(filtered["count"], 2);

    // Delete; the entry is gone and a second delete fails.
    let out = ok(&s, &["entry", "delete", "--entry-id", &child_id])?;
    assert_eq!(out, format!("Deleted entry with ID: {child_id}\n"));
    let gone = fails(&s, &["entry", "show", "--entry-id", &child_id])?;
    assert_mentions(&gone, &[&child_id, "NotFound"]);
    let again = fails(&s, &["entry", "delete", "--entry-id", &child_id])?;
    assert_mentions(&again, &[&child_id, "NotFound"]);
    assert_eq!(entry_count(&s)?, 2);

    // A batch from --data: the 2nd entry's parent is the 3rd, later in the same batch.
    let batch = [
        data_entry(&id("/batch/a"), &agent, "uid:3001"),
        data_entry(&id("/batch/b"), &id("/batch/c"), "uid:3002"),
        data_entry(&id("/batch/c"), &agent, "uid:3003"),
    ];
    let path = write_data(tmp.path(), "batch.json", &batch)?;
    let created = json(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    let created = created["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        spiffe_ids(&created)?,
        [id("/batch/a"), id("/batch/b"), id("/batch/c")]
    );
    assert_eq!(entry_count(&s)?, 5);

    // What `entry show --output json` prints is a valid --data file: delete and re-create from it.
    let dump = json(
        &s,
        &[
            "entry",
            "show",
            "--selector",
            "unix:uid:3002",
            "--match",
            "any",
        ],
    )?;
    let dumped = dump["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(spiffe_ids(&dumped)?, [id("/batch/b")]);
    let b_id = field(&dumped[0], "id")?.to_string();
    ok(&s, &["entry", "delete", "--entry-id", &b_id])?;
    let dump_path = tmp.path().join("dump.json");
    std::fs::write(&dump_path, dump.to_string())?;
    let back = only(&json(
        &s,
        &[
            "entry",
            "create",
            "--data",
            dump_path.to_str().unwrap_or_default(),
        ],
    )?)?;
    assert_eq!(field(&back, "spiffe_id")?, id("/batch/b"));
    assert_eq!(field(&back, "parent_id")?, id("/batch/c"));
    assert_ne!(field(&back, "id")?, b_id, "the server assigns a new ID");
    assert_eq!(entry_count(&s)?, 5);
    Ok(())
}

#[test]
fn bad_entry_input_names_field_and_value_and_writes_nothing() -> anyhow::Result<()> {
    let s = ServerProcess::start(&[])?;
    let tmp = tempfile::tempdir()?;
    let agent = agent();
    let good = only(&json(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/good"),
            "--parent-id",
            &agent,
            "--selector",
            "unix:uid:1",
        ],
    )?)?;
    let good_id = field(&good, "id")?.to_string();
    let before = entry_count(&s)?;
    assert_eq!(before, 1);

    // (spiffe-id, extra flags, what the message must name: the field and the value).
    let w = id("/w");
    let cases: Vec<(String, Vec<&str>, Vec<&str>)> = vec![
        (
            "http://x/y".into(),
            vec![],
            vec!["spiffe_id", "\"http://x/y\"", "scheme"],
        ),
        (
            "spiffe://IDENTITY.example.com/x".into(),
            vec![],
            vec![
                "spiffe_id",
                "\"spiffe://IDENTITY.example.com/x\"",
                "lowercase",
            ],
        ),
        (
            "spiffe://identity.example.com:80/x".into(),
            vec![],
            vec![
                "spiffe_id",
                "\"spiffe://identity.example.com:80/x\"",
                "port",
            ],
        ),
        (
            "spiffe://td:80/x".into(),
            vec![],
            vec!["spiffe_id", "\"spiffe://td:80/x\"", "port"],
        ),
        (
            format!("spiffe://{TD}//x"),
            vec![],
            vec!["spiffe_id", "//x\"", "empty segment"],
        ),
        (
            format!("spiffe://{TD}/./x"),
            vec![],
            vec!["spiffe_id", "/./x\"", "dot segment"],
        ),
        (
            format!("spiffe://{TD}/x/../y"),
            vec![],
            vec!["spiffe_id", "/x/../y\"", "dot segment"],
        ),
        (
            format!("spiffe://{TD}/x/"),
            vec![],
            vec!["spiffe_id", "/x/\"", "trailing slash"],
        ),
        (
            format!("spiffe://{TD}/x?a=b"),
            vec![],
            vec!["spiffe_id", "/x?a=b\"", "query"],
        ),
        (
            format!("spiffe://{TD}/x#frag"),
            vec![],
            vec!["spiffe_id", "/x#frag\"", "fragment"],
        ),
        (
            format!("spiffe://{TD}/x%20y"),
            vec![],
            vec!["spiffe_id", "/x%20y\"", "percent-encoding"],
        ),
        (
            format!("spiffe://{TD}"),
            vec![],
            vec!["spiffe_id", "\"spiffe://identity.example.com\"", "no path"],
        ),
        (
            "spiffe://other.org/x".into(),
            vec![],
            vec!["spiffe_id", "\"spiffe://other.org/x\"", "trust domain"],
        ),
        (
            format!("spiffe://{TD}/sigil/agent/fake"),
            vec![],
            vec!["spiffe_id", "/sigil/agent/fake\"", "reserved"],
        ),
        (
            w.clone(),
            vec!["--selector", "unix"],
            vec!["--selector", "\"unix\""],
        ),
        (
            w.clone(),
            vec!["--selector", "unix:colour:red"],
            vec!["selectors[0]", "\"unix:colour:red\""],
        ),
        (
            w.clone(),
            vec!["--selector", "unix:uid:abc"],
            vec!["selectors[0]", "\"unix:uid:abc\""],
        ),
        (
            w.clone(),
            vec![
                "--selector",
                "unix:uid:1",
                "--selector",
                "unix:path:relative",
            ],
            vec!["selectors[1]", "\"unix:path:relative\""],
        ),
        (
            w.clone(),
            vec!["--x509-svid-ttl", "0"],
            vec!["x509_svid_ttl", "invalid TTL 0"],
        ),
        (
            w.clone(),
            vec!["--jwt-svid-ttl", "0"],
            vec!["jwt_svid_ttl", "invalid TTL 0"],
        ),
        (
            w.clone(),
            vec!["--x509-svid-ttl", "-5"],
            vec!["x509_svid_ttl", "invalid TTL -5"],
        ),
        (
            w.clone(),
            vec!["--jwt-svid-ttl", "-1"],
            vec!["jwt_svid_ttl", "invalid TTL -1"],
        ),
        (
            w.clone(),
            vec!["--jwt-svid-ttl", "soon"],
            vec!["--jwt-svid-ttl", "soon"],
        ),
        (
            w.clone(),
            vec!["--dns", "bad_name!"],
            vec!["dns_names[0]", "\"bad_name!\""],
        ),
        (
            w.clone(),
            vec!["--dns", "ok.example", "--dns=-bad.example"],
            vec!["dns_names[1]", "\"-bad.example\""],
        ),
        (
            w.clone(),
            vec!["--federates-with", TD],
            vec!["federates_with[0]", TD, "own trust domain"],
        ),
        (
            w.clone(),
            vec!["--federates-with", "Not A Domain"],
            vec!["federates_with[0]", "\"Not A Domain\""],
        ),
    ];
    for (spiffe_id, extra, needles) in &cases {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &agent,
        ];
        if !extra.contains(&"--selector") {
            args.extend(["--selector", "unix:uid:7"]);
        }
        args.extend(extra.iter().copied());
        let r = fails(&s, &args)?;
        assert_mentions(&r, needles);
        assert_eq!(entry_count(&s)?, before, "{r}");
    }

    // An unknown parent; a parent that is the entry itself; no selector at all.
    let nobody = id("/nobody");
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &w,
            "--parent-id",
            &nobody,
            "--selector",
            "unix:uid:7",
        ],
    )?;
    assert_mentions(&r, &["parent_id", &format!("{nobody:?}"), "unknown parent"]);
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/good"),
            "--parent-id",
            &id("/good"),
            "--selector",
            "unix:uid:7",
        ],
    )?;
    assert_mentions(&r, &["parent_id", &format!("{:?}", id("/good"))]);
    let r = fails(
        &s,
        &["entry", "create", "--spiffe-id", &w, "--parent-id", &agent],
    )?;
    assert_mentions(&r, &["selectors", "at least one selector"]);
    // The same entry twice is a conflict, not a second copy.
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &id("/good"),
            "--parent-id",
            &agent,
            "--selector",
            "unix:uid:1",
        ],
    )?;
    assert_mentions(&r, &[&good_id, "AlreadyExists"]);
    assert_eq!(entry_count(&s)?, before);

    // A batch whose 3rd entry is bad creates none of them and names entries[2].
    let mut batch: Vec<Value> = (0..5)
        .map(|i| {
            data_entry(
                &id(&format!("/batch/{i}")),
                &agent,
                &format!("uid:{}", 100 + i),
            )
        })
        .collect();
    batch[2]["spiffe_id"] = j!(format!("spiffe://{TD}/batch//2"));
    let path = write_data(tmp.path(), "bad-spiffe.json", &batch)?;
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    assert_mentions(&r, &["entries[2].spiffe_id", "/batch//2\""]);
    assert_eq!(entry_count(&s)?, before, "{r}");

    batch[2]["spiffe_id"] = j!(id("/batch/2"));
    batch[2]["x509_svid_ttl"] = j!(0);
    let path = write_data(tmp.path(), "zero-ttl.json", &batch)?;
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    assert_mentions(&r, &["entries[2].x509_svid_ttl", "invalid TTL 0"]);
    assert_eq!(entry_count(&s)?, before, "{r}");

    batch[2]["x509_svid_ttl"] = j!("ten");
    let path = write_data(tmp.path(), "string-ttl.json", &batch)?;
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    assert_mentions(&r, &["entries[2].x509_svid_ttl", "ten"]);

    batch[2] = data_entry(&id("/batch/2"), &agent, "uid:-4");
    let path = write_data(tmp.path(), "bad-selector.json", &batch)?;
    let r = fails(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    assert_mentions(&r, &["entries[2].selectors[0]", "\"unix:uid:-4\""]);
    assert_eq!(entry_count(&s)?, before, "{r}");

    // A batch that repeats one entry is refused whole too.
    batch[2] = batch[0].clone();
    let path = write_data(tmp.path(), "duplicate.json", &batch)?;
    fails(
        &s,
        &[
            "entry",
            "create",
            "--data",
            path.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(entry_count(&s)?, before);

    // A refused update changes nothing either.
    let r = fails(
        &s,
        &[
            "entry",
            "update",
            "--entry-id",
            &good_id,
            "--spiffe-id",
            "spiffe://Bad/x",
        ],
    )?;
    assert_mentions(&r, &["spiffe_id", "\"spiffe://Bad/x\""]);
    let r = fails(
        &s,
        &[
            "entry",
            "update",
            "--entry-id",
            &good_id,
            "--selector",
            "unix:gid:x",
        ],
    )?;
    assert_mentions(&r, &["selectors[0]", "\"unix:gid:x\""]);
    let still = only(&json(&s, &["entry", "show", "--entry-id", &good_id])?)?;
    assert_eq!(still, good);
    let r = fails(
        &s,
        &[
            "entry",
            "update",
            "--entry-id",
            "no-such-entry",
            "--hint",
            "x",
        ],
    )?;
    assert_mentions(&r, &["no-such-entry", "NotFound"]);
    Ok(())
}

/// A CA certificate PEM of a trust domain that is not this server's.
fn foreign_ca_pem() -> anyhow::Result<String> {
    let mut params = sigil_test_util::certs::ca_params("other.org root")?;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        "spiffe://other.org",
    )?)];
    Ok(sigil_test_util::TestCa::root_with(params)?.pem())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn tokens_agents_bundles_svids_and_health() -> anyhow::Result<()> {
    let s = ServerProcess::start(&[])?;
    let tmp = tempfile::tempdir()?;
    let td = TrustDomain::parse(TD)?;

    // Join tokens: text and JSON; --spiffe-id also makes a node entry under the token's agent.
    let text = ok(&s, &["token", "generate"])?;
    let token = text
        .strip_prefix("Token: ")
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("unexpected token output {text:?}"))?;
    assert_eq!(token.len(), 36, "{token}");
    let before = unix_now();
    let t = json(&s, &["token", "generate", "--ttl", "120"])?;
    let exp = t["expires_at"].as_i64().unwrap_or_default();
    assert!((before + 120..=unix_now() + 120).contains(&exp), "{t}");
    assert!(t["expires_at_rfc3339"].is_string(), "{t}");
    let t = json(&s, &["token", "generate", "--spiffe-id", &id("/node-1")])?;
    let agent_id = format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        field(&t, "token")?
    );
    let node = entries(&s, &["--parent-id", &agent_id])?;
    assert_eq!(spiffe_ids(&node)?, [id("/node-1")]);
    assert_mentions(
        &fails(&s, &["token", "generate", "--ttl", "0"])?,
        &["--ttl", "0"],
    );
    assert_mentions(
        &fails(
            &s,
            &["token", "generate", "--spiffe-id", "spiffe://other.org/n"],
        )?,
        &["spiffe_id", "\"spiffe://other.org/n\""],
    );

    // Agents: nothing attested yet.
    assert_eq!(ok(&s, &["agent", "list"])?, "No attested agents found\n");
    assert_eq!(json(&s, &["agent", "list"])?, j!({ "agents": [] }));
    assert_mentions(
        &fails(&s, &["agent", "show", "--spiffe-id", &agent_id])?,
        &[&agent_id, "NotFound"],
    );
    assert_mentions(
        &fails(&s, &["agent", "evict", "--spiffe-id", "not-an-id"])?,
        &["spiffe_id", "\"not-an-id\""],
    );

    // The own bundle: PEM certificates, the same as JSON's, and a SPIFFE bundle holding both kinds.
    let pem = pem_certs(&ok(&s, &["bundle", "show"])?)?;
    for c in &pem {
        let (_, cert) = x509_parser::parse_x509_certificate(c)?;
        assert!(cert.is_ca(), "bundle holds a non-CA certificate");
    }
    let bj = json(&s, &["bundle", "show"])?;
    assert_eq!(bj["trust_domain"], TD);
    let from_json: Vec<_> = bj["x509_authorities"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| pem_certs(p.as_str().unwrap_or_default()))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    assert_eq!(from_json, pem);
    let spiffe_text = ok(&s, &["bundle", "show", "--format", "spiffe"])?;
    let doc: Value = serde_json::from_str(&spiffe_text)?;
    let mut uses: Vec<&str> = doc["keys"]
        .as_array()
        .map(|k| k.iter().filter_map(|k| k["use"].as_str()).collect())
        .unwrap_or_default();
    uses.sort();
    uses.dedup();
    assert_eq!(uses, ["jwt-svid", "x509-svid"], "{spiffe_text}");
    let own = Bundle::from_json(td.clone(), spiffe_text.as_bytes())?;
    assert_eq!(own.x509_authorities, pem);
    assert!(!own.jwt_authorities.is_empty());
    let mut bundles = BundleSet::new();
    bundles.insert(own);

    // Federated bundles: set from a PEM file, list, refuse bad ones, delete.
    assert_eq!(ok(&s, &["bundle", "list"])?, "No federated bundles\n");
    let foreign = foreign_ca_pem()?;
    let foreign_path = tmp.path().join("other.pem");
    std::fs::write(&foreign_path, &foreign)?;
    let fp = foreign_path.to_str().unwrap_or_default();
    assert_eq!(
        ok(&s, &["bundle", "set", "--id", "other.org", "--path", fp])?,
        "Bundle set: other.org\n"
    );
    let list = json(&s, &["bundle", "list"])?;
    let listed = list["bundles"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["trust_domain"], "other.org");
    let got = support::bundle_from_json(&listed[0])?;
    assert_eq!(got.x509_authorities, pem_certs(&foreign)?);
    let text = ok(&s, &["bundle", "list"])?;
    assert!(text.contains("* other.org\n"), "{text}");
    assert_eq!(pem_certs(&text)?, pem_certs(&foreign)?);
    assert_mentions(
        &fails(&s, &["bundle", "set", "--id", TD, "--path", fp])?,
        &["trust_domain", TD, "own trust domain"],
    );
    assert_mentions(
        &fails(&s, &["bundle", "set", "--id", "Bad Domain", "--path", fp])?,
        &["trust_domain", "\"Bad Domain\""],
    );
    let junk = tmp.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )?;
    assert_mentions(
        &fails(
            &s,
            &[
                "bundle",
                "set",
                "--id",
                "third.org",
                "--path",
                junk.to_str().unwrap_or_default(),
            ],
        )?,
        &["x509_authorities_pem"],
    );
    assert_eq!(
        ok(&s, &["bundle", "delete", "--id", "other.org"])?,
        "Bundle deleted: other.org\n"
    );
    assert_eq!(json(&s, &["bundle", "list"])?, j!({ "bundles": [] }));

    // x509 mint --write: the three files, a private key, and a chain that verifies.
    let out_dir = tmp.path().join("svid");
    let od = out_dir.to_str().unwrap_or_default();
    let text = ok(
        &s,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            &id("/w"),
            "--dns",
            "w.example.org",
            "--write",
            od,
        ],
    )?;
    assert!(text.contains("svid.pem"), "{text}");
    let mode = std::fs::metadata(out_dir.join("key.pem"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key.pem must be private");
    let key_pem = std::fs::read_to_string(out_dir.join("key.pem"))?;
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{key_pem}"
    );
    let chain = pem_file(&out_dir.join("svid.pem"))?;
    let written_bundle = pem_file(&out_dir.join("bundle.pem"))?;
    assert_eq!(written_bundle, pem);
    let mut from_file = Bundle::new(td.clone());
    from_file.x509_authorities = written_bundle;
    let mut file_set = BundleSet::new();
    file_set.insert(from_file);
    let got = sigil_spiffe::x509::verify_x509_svid(&chain, &file_set, UnixTime::now())?;
    assert_eq!(got.to_string(), id("/w"));
    sigil_spiffe::x509::check_leaf_profile(&chain[0])?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])?;
    let dns: Vec<String> = leaf
        .subject_alternative_name()?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(dns, ["w.example.org"]);
    // The key written is the one the certificate holds.
    let key = rcgen::KeyPair::from_pem(&key_pem)?;
    assert_eq!(
        key.public_key_raw(),
        leaf.public_key().subject_public_key.data.as_ref()
    );
    assert_mentions(
        &fails(&s, &["x509", "mint", "--spiffe-id", "spiffe://other.org/w"])?,
        &["\"spiffe://other.org/w\"", "trust domain"],
    );
    assert_mentions(
        &fails(
            &s,
            &["x509", "mint", "--spiffe-id", &id("/w"), "--ttl", "soon"],
        )?,
        &["--ttl", "soon"],
    );

    // jwt mint: the token validates against the SPIFFE bundle the CLI printed.
    let token = ok(
        &s,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            &id("/w"),
            "--audience",
            "svc-a",
            "--audience",
            "svc-b",
        ],
    )?;
    let token = token.trim();
    let now = unix_now();
    let claims =
        sigil_spiffe::jwt::validate_jwt_svid(token, &bundles, &["svc-b".to_string()], now as u64)?;
    assert_eq!(claims.spiffe_id.to_string(), id("/w"));
    assert_eq!(claims.audience, ["svc-a", "svc-b"]);
    assert!(
        sigil_spiffe::jwt::validate_jwt_svid(token, &bundles, &["svc-c".to_string()], now as u64)
            .is_err(),
        "a JWT-SVID must not validate for another audience"
    );
    let before = unix_now();
    let jj = json(
        &s,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            &id("/w"),
            "--audience",
            "a",
            "--ttl",
            "2m",
        ],
    )?;
    let exp = jj["expires_at"].as_i64().unwrap_or_default();
    assert!((before + 120..=unix_now() + 120).contains(&exp), "{jj}");
    sigil_spiffe::jwt::validate_jwt_svid(
        field(&jj, "token")?,
        &bundles,
        &["a".to_string()],
        now as u64,
    )?;
    assert_mentions(
        &fails(
            &s,
            &[
                "jwt",
                "mint",
                "--spiffe-id",
                &format!("spiffe://{TD}"),
                "--audience",
                "a",
            ],
        )?,
        &["spiffe_id", "no path"],
    );

    // The health check: healthy here, unhealthy (non-zero, naming the socket) where nothing listens.
    assert_eq!(ok(&s, &["server", "healthcheck"])?, "Server is healthy.\n");
    let missing = tmp.path().join("nowhere").join("api.sock");
    let out = Command::new(sigil_bin())
        .args(["server", "healthcheck", "--admin-socket"])
        .arg(&missing)
        .stdin(Stdio::null())
        .output()?;
    assert!(
        !out.status.success(),
        "healthcheck of a missing socket succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unhealthy"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    Ok(())
}

/// Attack: an admin-API caller mints an SVID for the server's own ID (or any reserved /sigil/ ID), which
/// agents would accept as the server. Every minting path refuses the reserved namespace, naming the field
/// and the value; minting an ordinary ID (the control) still works.
#[test]
fn reserved_ids_cannot_be_minted() -> anyhow::Result<()> {
    let s = ServerProcess::start(&[])?;
    let tmp = tempfile::tempdir()?;
    for path in [
        "/sigil/server",
        "/sigil/agent/x509pop/abc",
        "/sigil/anything",
        "/sigil",
    ] {
        let reserved = id(path);
        let dir = tmp.path().join(path.replace('/', "_"));
        let r = fails(
            &s,
            &[
                "x509",
                "mint",
                "--spiffe-id",
                &reserved,
                "--write",
                dir.to_str().unwrap_or_default(),
            ],
        )?;
        assert_mentions(&r, &["csr.uri_san", &format!("{reserved:?}"), "reserved"]);
        assert!(
            !dir.join("svid.pem").exists(),
            "nothing written for {reserved}"
        );
        let r = fails(
            &s,
            &["jwt", "mint", "--spiffe-id", &reserved, "--audience", "a"],
        )?;
        assert_mentions(&r, &["spiffe_id", &format!("{reserved:?}"), "reserved"]);
    }
    // Control: an ordinary ID is minted, and the lookalike path /sigilx/ is not reserved.
    for path in ["/sigilx/server", "/w/sigil/server"] {
        let dir = tmp.path().join(path.replace('/', "_"));
        let chain = support::mint_x509(&s, &id(path), &dir)?;
        let got = sigil_spiffe::x509::spiffe_id_of_leaf(&chain[0])?;
        assert_eq!(got.to_string(), id(path));
        let token = ok(
            &s,
            &["jwt", "mint", "--spiffe-id", &id(path), "--audience", "a"],
        )?;
        assert!(!token.trim().is_empty());
    }
    Ok(())
}
