//! The agent API against a real server process: attestation over TLS, mTLS afterwards, CSR signing
//! authorization, the entry stream, eviction and banning.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_e2e::admin_channel;
use sigil_e2e::test_agent::{TestAgent, key_and_csr};
use sigil_proto::admin::v1 as apb;
use sigil_proto::agent::v1 as pb;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::{SpiffeId, TrustDomain};
use sigil_test_util::{ServerProcess, TestCa};

const TD: &str = "identity.example.com";

struct Fixture {
    server: ServerProcess,
    admin: tonic::transport::Channel,
    td: TrustDomain,
    bootstrap: Vec<CertificateDer<'static>>,
}

async fn fixture(extra: &[&str]) -> anyhow::Result<Fixture> {
    let server = ServerProcess::start(extra)?;
    let admin = admin_channel(&server.admin_socket).await?;
    let bundle = apb::bundles_client::BundlesClient::new(admin.clone())
        .get_bundle(apb::GetBundleRequest {})
        .await?
        .into_inner()
        .bundle
        .expect("bundle");
    let td = TrustDomain::parse(&bundle.trust_domain)?;
    let bootstrap = bundle
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok(Fixture {
        server,
        admin,
        td,
        bootstrap,
    })
}

impl Fixture {
    async fn token(&self) -> anyhow::Result<String> {
        Ok(
            apb::join_tokens_client::JoinTokensClient::new(self.admin.clone())
                .create_join_token(apb::CreateJoinTokenRequest {
                    ttl: 600,
                    spiffe_id: String::new(),
                })
                .await?
                .into_inner()
                .token,
        )
    }

    fn agent(&self) -> TestAgent {
        TestAgent::new(&self.server.addr(), &self.td, self.bootstrap.clone())
    }

    async fn entry(&self, spiffe: &str, parent: &str, uid: u32) -> anyhow::Result<apb::Entry> {
        Ok(apb::entries_client::EntriesClient::new(self.admin.clone())
            .create_entry(apb::CreateEntryRequest {
                entry: Some(apb::Entry {
                    spiffe_id: spiffe.into(),
                    parent_id: parent.into(),
                    selectors: vec![apb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    dns_names: vec!["web.example.org".into()],
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .entry
            .expect("entry"))
    }

    fn bundle_set(&self) -> BundleSet {
        let mut b = Bundle::new(self.td.clone());
        b.x509_authorities = self.bootstrap.clone();
        let mut set = BundleSet::new();
        set.insert(b);
        set
    }
}

/// Renews the test agent's SVID and returns the new one without installing it.
async fn renew(
    agent: &TestAgent,
) -> anyhow::Result<(
    Vec<CertificateDer<'static>>,
    rustls_pki_types::PrivatePkcs8KeyDer<'static>,
)> {
    let kc = key_and_csr(None)?;
    let renewed = agent
        .client()
        .await?
        .renew_agent(pb::RenewAgentRequest { csr: kc.csr })
        .await?
        .into_inner()
        .result
        .expect("result");
    Ok((chain_of(&renewed.svid_chain), kc.key))
}

fn chain_of(v: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    v.iter().map(|c| CertificateDer::from(c.clone())).collect()
}

#[tokio::test]
async fn join_token_attestation_then_mtls_signing() -> anyhow::Result<()> {
    let f = fixture(&[]).await?;
    let token = f.token().await?;
    let mut agent = f.agent();
    let result = agent.attest_join_token(&token).await?;
    assert_eq!(
        result.spiffe_id,
        format!("spiffe://{TD}/sigil/agent/join_token/{token}")
    );

    // The agent SVID validates with rustls-webpki and meets the X509-SVID rules.
    let chain = chain_of(&result.svid_chain);
    let id = sigil_spiffe::x509::verify_x509_svid(&chain, &f.bundle_set(), UnixTime::now())?;
    assert_eq!(id.to_string(), result.spiffe_id);
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    let anchors: Vec<_> = f
        .bootstrap
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).expect("anchor"))
        .collect();
    ee.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )?;

    // The token works once.
    let mut again = f.agent();
    let err = again
        .attest_join_token(&token)
        .await
        .expect_err("reused token");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("already used"), "{}", err.message());
    let err = again
        .attest_join_token("no-such-token")
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("unknown"), "{}", err.message());

    // A CSR for an authorized entry yields a valid SVID; for someone else's entry it is refused.
    let mine = f
        .entry(&format!("spiffe://{TD}/web"), &result.spiffe_id, 1000)
        .await?;
    let theirs = f
        .entry(
            &format!("spiffe://{TD}/db"),
            &format!("spiffe://{TD}/sigil/agent/join_token/someone-else"),
            2000,
        )
        .await?;
    let mut client = agent.client().await?;
    let kc1 = key_and_csr(None)?;
    let kc2 = key_and_csr(None)?;
    let resp = client
        .batch_new_x509svid(pb::BatchNewX509svidRequest {
            params: vec![
                pb::X509svidParams {
                    entry_id: mine.id.clone(),
                    csr: kc1.csr,
                },
                pb::X509svidParams {
                    entry_id: theirs.id.clone(),
                    csr: kc2.csr,
                },
            ],
        })
        .await?
        .into_inner();
    assert_eq!(resp.results.len(), 2);
    let ok = &resp.results[0];
    assert_eq!(ok.status_code, 0, "{}", ok.status_message);
    assert_eq!(ok.spiffe_id, format!("spiffe://{TD}/web"));
    let svid_chain = chain_of(&ok.cert_chain);
    let got = sigil_spiffe::x509::verify_x509_svid(&svid_chain, &f.bundle_set(), UnixTime::now())?;
    assert_eq!(got.to_string(), ok.spiffe_id);
    sigil_spiffe::x509::check_leaf_profile(&svid_chain[0])?;
    let denied = &resp.results[1];
    assert_eq!(denied.status_code, tonic::Code::PermissionDenied as i32);
    assert!(denied.status_message.contains("not authorized"));

    // JWT-SVIDs for the authorized entry only.
    let jwt = client
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: mine.id.clone(),
            audience: vec!["aud".into()],
        })
        .await?
        .into_inner();
    assert_eq!(jwt.spiffe_id, format!("spiffe://{TD}/web"));
    let err = client
        .new_jwtsvid(pb::NewJwtsvidRequest {
            entry_id: theirs.id.clone(),
            audience: vec!["aud".into()],
        })
        .await
        .expect_err("unauthorized jwt");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Without a client certificate, only attestation is possible.
    let mut anon = pb::node_client::NodeClient::new(agent.channel(false).await?);
    let err = anon
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    Ok(())
}

#[tokio::test]
async fn entry_stream_snapshot_then_live_changes() -> anyhow::Result<()> {
    let f = fixture(&[]).await?;
    let token = f.token().await?;
    let mut agent = f.agent();
    let result = agent.attest_join_token(&token).await?;
    let before = f
        .entry(&format!("spiffe://{TD}/before"), &result.spiffe_id, 1)
        .await?;
    let mut client = agent.client().await?;
    let mut stream = client
        .sync_entries(pb::SyncEntriesRequest {})
        .await?
        .into_inner();
    let first = stream.message().await?.expect("snapshot");
    assert!(first.snapshot && first.snapshot_complete);
    assert_eq!(first.entries.len(), 1);
    assert_eq!(first.entries[0].id, before.id);

    let after = f
        .entry(&format!("spiffe://{TD}/after"), &result.spiffe_id, 2)
        .await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = stream.message().await?.expect("message");
            if !m.entries.is_empty() {
                return Ok::<_, tonic::Status>(m);
            }
        }
    })
    .await??;
    assert_eq!(msg.entries[0].id, after.id);

    apb::entries_client::EntriesClient::new(f.admin.clone())
        .delete_entry(apb::DeleteEntryRequest {
            id: before.id.clone(),
        })
        .await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = stream.message().await?.expect("message");
            if !m.removed_entry_ids.is_empty() {
                return Ok::<_, tonic::Status>(m);
            }
        }
    })
    .await??;
    assert_eq!(msg.removed_entry_ids, vec![before.id.clone()]);

    // An entry for another agent never reaches this stream; eviction ends it.
    f.entry(
        &format!("spiffe://{TD}/other"),
        &format!("spiffe://{TD}/sigil/agent/join_token/other"),
        3,
    )
    .await?;
    apb::agents_client::AgentsClient::new(f.admin.clone())
        .evict_agent(apb::EvictAgentRequest {
            spiffe_id: result.spiffe_id.clone(),
        })
        .await?;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => assert!(
                    m.entries.is_empty(),
                    "entry for another agent leaked: {:?}",
                    m.entries
                ),
                other => return other,
            }
        }
    })
    .await?;
    let err = end.expect_err("stream must end with an error");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Evicted: the SVID no longer works.
    let err = agent
        .client()
        .await?
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await
        .expect_err("evicted");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    Ok(())
}

#[tokio::test]
async fn banned_agent_is_refused() -> anyhow::Result<()> {
    let f = fixture(&[]).await?;
    let token = f.token().await?;
    let mut agent = f.agent();
    let result = agent.attest_join_token(&token).await?;
    apb::agents_client::AgentsClient::new(f.admin.clone())
        .ban_agent(apb::BanAgentRequest {
            spiffe_id: result.spiffe_id.clone(),
        })
        .await?;
    let err = agent
        .client()
        .await?
        .renew_agent(pb::RenewAgentRequest {
            csr: key_and_csr(None)?.csr,
        })
        .await
        .expect_err("banned");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("banned"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn renewal_replaces_the_agent_svid_once_it_is_used() -> anyhow::Result<()> {
    let f = fixture(&[]).await?;
    let token = f.token().await?;
    let mut agent = f.agent();
    agent.attest_join_token(&token).await?;
    // An agent that dies after the server issued its new SVID but before storing it keeps working with the
    // SVID it has, and can renew again; the unused SVID of that first renewal is then worthless.
    let lost = renew(&agent).await?;
    agent
        .client()
        .await?
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await?;
    let next = renew(&agent).await?;
    let old = agent.svid.replace(lost);
    let err = agent
        .client()
        .await?
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await
        .expect_err("svid of a superseded renewal");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Using the new SVID makes it the only one.
    agent.svid = Some(next);
    agent
        .client()
        .await?
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await?;
    // The superseded SVID is no longer accepted.
    agent.svid = old;
    let err = agent
        .client()
        .await?
        .fetch_bundles(pb::FetchBundlesRequest {})
        .await
        .expect_err("old svid");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    Ok(())
}

#[tokio::test]
async fn x509pop_attestation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("node CA")?;
    let ca_path = dir.path().join("node-ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let (node_cert, node_key) = ca.leaf("node-1")?;

    let f = fixture(&["--x509pop-ca-bundle", ca_path.to_str().expect("utf8")]).await?;
    let mut agent = f.agent();
    let result = agent
        .attest_x509pop(vec![node_cert.der().to_vec()], &node_key)
        .await?;
    let fp = fingerprint(node_cert.der());
    assert_eq!(
        result.spiffe_id,
        format!("spiffe://{TD}/sigil/agent/x509pop/{fp}")
    );
    let agents = apb::agents_client::AgentsClient::new(f.admin.clone())
        .get_agent(apb::GetAgentRequest {
            spiffe_id: result.spiffe_id.clone(),
        })
        .await?
        .into_inner()
        .agent
        .expect("agent");
    assert!(
        agents
            .selectors
            .iter()
            .any(|s| s.r#type == "x509pop" && s.value == "subject:cn:node-1")
    );

    // A certificate from another CA, or a wrong key, is refused.
    let (stranger, stranger_key) = TestCa::new("stranger CA")?.leaf("node-1")?;
    let err = f
        .agent()
        .attest_x509pop(vec![stranger.der().to_vec()], &stranger_key)
        .await
        .expect_err("untrusted");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = f
        .agent()
        .attest_x509pop(vec![node_cert.der().to_vec()], &stranger_key)
        .await
        .expect_err("wrong key");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let _ = SpiffeId::parse(&result.spiffe_id)?;
    Ok(())
}

/// SHA-1 of a DER certificate, hex: the x509pop agent ID and `ca:fingerprint` selector form.
fn fingerprint(der: &[u8]) -> String {
    use sha1::Digest;
    hex::encode(sha1::Sha1::digest(der))
}

/// A node certificate under `ca`, DER, and its key.
fn node(ca: &TestCa, cn: &str) -> anyhow::Result<(Vec<u8>, rcgen::KeyPair)> {
    let (cert, key) = ca.leaf(cn)?;
    Ok((cert.der().to_vec(), key))
}

impl Fixture {
    /// The x509pop selectors the server recorded for `agent_id`.
    async fn x509pop_selectors(&self, agent_id: &str) -> anyhow::Result<Vec<String>> {
        let agent = apb::agents_client::AgentsClient::new(self.admin.clone())
            .get_agent(apb::GetAgentRequest {
                spiffe_id: agent_id.into(),
            })
            .await?
            .into_inner()
            .agent
            .expect("agent");
        let mut out: Vec<String> = agent
            .selectors
            .iter()
            .filter(|s| s.r#type == "x509pop" && s.value.starts_with("ca:fingerprint:"))
            .map(|s| s.value.clone())
            .collect();
        out.sort();
        Ok(out)
    }

    /// A node alias selected by `x509pop:ca:fingerprint:<fp>` and a workload entry under it.
    async fn ca_workload(&self, name: &str, fp: &str) -> anyhow::Result<String> {
        let mut entries = apb::entries_client::EntriesClient::new(self.admin.clone());
        let node = format!("spiffe://{TD}/node/{name}");
        let workload = format!("spiffe://{TD}/workload/{name}");
        for (spiffe, parent, ty, value) in [
            (
                node.clone(),
                format!("spiffe://{TD}/sigil/server"),
                "x509pop",
                format!("ca:fingerprint:{fp}"),
            ),
            (
                workload.clone(),
                node.clone(),
                "unix",
                "uid:1000".to_string(),
            ),
        ] {
            entries
                .create_entry(apb::CreateEntryRequest {
                    entry: Some(apb::Entry {
                        spiffe_id: spiffe,
                        parent_id: parent,
                        selectors: vec![apb::Selector {
                            r#type: ty.into(),
                            value,
                        }],
                        ..Default::default()
                    }),
                })
                .await?;
        }
        Ok(workload)
    }
}

/// The SPIFFE IDs of the entries in an agent's first entry snapshot.
async fn snapshot_ids(agent: &TestAgent) -> anyhow::Result<Vec<String>> {
    let mut stream = agent
        .client()
        .await?
        .sync_entries(pb::SyncEntriesRequest {})
        .await?
        .into_inner();
    let mut ids = vec![];
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .expect("snapshot");
        ids.extend(msg.entries.iter().map(|e| e.spiffe_id.clone()));
        if msg.snapshot_complete {
            break;
        }
    }
    ids.sort();
    Ok(ids)
}

/// Attack: CAs A and B are both x509pop roots; a node holding a leaf from B presents the chain file
/// `leafB + caA`. Its node selectors come from the verified path only: it is attested with B's fingerprint,
/// never A's, and receives none of A's workloads. Controls: leafA + caA is attested as A and gets A's
/// workloads; a leaf issued by an intermediate of A gets the intermediate's and A's fingerprints.
#[tokio::test]
async fn x509pop_selectors_come_from_the_verified_path() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_a = TestCa::new("node CA A")?;
    let ca_b = TestCa::new("node CA B")?;
    let inter_a = ca_a.intermediate("node CA A intermediate")?;
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, format!("{}{}", ca_a.cert.pem(), ca_b.cert.pem()))?;
    let f = fixture(&["--x509pop-ca-bundle", roots.to_str().expect("utf8")]).await?;
    let (fp_a, fp_b) = (fingerprint(&ca_a.der()), fingerprint(&ca_b.der()));
    let work_a = f.ca_workload("a", &fp_a).await?;
    let work_b = f.ca_workload("b", &fp_b).await?;

    // The attack: leaf from B, with A appended as if it were B's issuer.
    let (leaf_b, key_b) = node(&ca_b, "node-b")?;
    let mut agent = f.agent();
    let r = agent
        .attest_x509pop(vec![leaf_b.clone(), ca_a.der()], &key_b)
        .await?;
    assert_eq!(
        f.x509pop_selectors(&r.spiffe_id).await?,
        [format!("ca:fingerprint:{fp_b}")],
        "only B, the CA that issued the leaf"
    );
    assert_eq!(snapshot_ids(&agent).await?, std::slice::from_ref(&work_b));
    assert!(!snapshot_ids(&agent).await?.contains(&work_a));

    // Control: leaf from A with A's certificate.
    let (leaf_a, key_a) = node(&ca_a, "node-a")?;
    let mut agent = f.agent();
    let r = agent
        .attest_x509pop(vec![leaf_a, ca_a.der()], &key_a)
        .await?;
    assert_eq!(
        f.x509pop_selectors(&r.spiffe_id).await?,
        [format!("ca:fingerprint:{fp_a}")]
    );
    assert_eq!(snapshot_ids(&agent).await?, std::slice::from_ref(&work_a));

    // Control: a leaf via an intermediate of A; the chain file also carries B, which is not on the path.
    let (leaf_i, key_i) = node(&inter_a, "node-i")?;
    let mut agent = f.agent();
    let r = agent
        .attest_x509pop(vec![leaf_i, inter_a.der(), ca_b.der()], &key_i)
        .await?;
    let mut want = vec![
        format!("ca:fingerprint:{fp_a}"),
        format!("ca:fingerprint:{}", fingerprint(&inter_a.der())),
    ];
    want.sort();
    assert_eq!(f.x509pop_selectors(&r.spiffe_id).await?, want);
    assert_eq!(snapshot_ids(&agent).await?, [work_a]);
    Ok(())
}
