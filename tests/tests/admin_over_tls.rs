//! The admin entry API on the server's TLS listener (SPIRE's model): a workload whose SVID names an
//! entry marked `admin` manages entries over mTLS; a non-admin workload, an agent, an anonymous
//! client, an SVID from another CA and an admin whose flag was just cleared are refused. Real server
//! and agent processes; SVIDs fetched from the agent's Workload API.

#[path = "support/cli.rs"]
mod cli;

use std::time::{Duration, Instant};

use cli::TD;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use sigil_agent::node::{AgentIdentity, Connector};
use sigil_proto::admin::v1 as apb;
use sigil_proto::admin::v1::entries_client::EntriesClient;
use sigil_proto::workload as wpb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_spiffe::{SpiffeId, TrustDomain};
use sigil_test_util::{AgentProcess, ServerProcess};
use tonic::transport::Channel;

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

/// An SVID (chain and key) as a TLS client identity.
struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// The SVIDs the agent's Workload API gives this process, once there are `want` of them.
async fn workload_svids(agent: &AgentProcess, want: usize) -> anyhow::Result<Vec<Svid>> {
    let start = Instant::now();
    loop {
        let ch = sigil_e2e::admin_channel(&agent.socket).await?;
        let mut client = SpiffeWorkloadApiClient::new(ch);
        let mut req = tonic::Request::new(wpb::X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse()?);
        if let Ok(resp) = client.fetch_x509svid(req).await
            && let Some(msg) = resp.into_inner().message().await?
            && msg.svids.len() >= want
        {
            let mut out = Vec::new();
            for s in msg.svids {
                out.push(Svid {
                    id: SpiffeId::parse(&s.spiffe_id)?,
                    chain: split_der(&s.x509_svid)?,
                    key: PrivatePkcs8KeyDer::from(s.x509_svid_key),
                });
            }
            return Ok(out);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the agent never gave {want} SVIDs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn split_der(mut b: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (rest, _) =
            x509_parser::parse_x509_certificate(b).map_err(|e| anyhow::anyhow!("bad DER: {e}"))?;
        let used = b.len() - rest.len();
        out.push(CertificateDer::from(b[..used].to_vec()));
        b = rest;
    }
    Ok(out)
}

/// An `Entries` client over TLS to the server's agent-API listener, presenting `svid` (or nothing),
/// trusting the server's bundle (the real agent's connector).
async fn entries_over_tls(
    server: &ServerProcess,
    svid: Option<&Svid>,
) -> anyhow::Result<EntriesClient<Channel>> {
    let connector = Connector {
        addr: server.addr(),
        td: TrustDomain::parse(TD)?,
        bundles: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(cli::all_bundles(server)?)),
        insecure: false,
    };
    let identity = svid.map(|s| AgentIdentity {
        id: s.id.clone(),
        chain: s.chain.clone(),
        key: s.key.clone_key(),
        expires_at: std::time::SystemTime::now(),
        issued_at: std::time::SystemTime::now(),
    });
    Ok(EntriesClient::new(
        connector.channel(identity.as_ref()).await?,
    ))
}

fn new_entry(spiffe_id: &str, parent: &str) -> apb::Entry {
    apb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![apb::Selector {
            r#type: "unix".into(),
            value: "uid:4242".into(),
        }],
        ..Default::default()
    }
}

fn assert_denied(r: Result<impl std::fmt::Debug, tonic::Status>, caller: &str) {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains(caller),
        "message should name {caller:?}: {s:?}"
    );
}

#[tokio::test]
async fn only_admin_workloads_manage_entries_over_tls() -> anyhow::Result<()> {
    let server = ServerProcess::start(&[])?;
    let agent = AgentProcess::start(&server, &[])?;
    let parent = agent_id(&agent);
    let me = format!("unix:uid:{}", uid());
    let admin_id = format!("spiffe://{TD}/ops/admin");
    let plain_id = format!("spiffe://{TD}/ops/plain");
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &admin_id,
            "--parent-id",
            &parent,
            "--selector",
            &me,
            "--admin",
        ],
    )?;
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &plain_id,
            "--parent-id",
            &parent,
            "--selector",
            &me,
        ],
    )?;
    let svids = workload_svids(&agent, 2).await?;
    let admin = svids
        .iter()
        .find(|s| s.id.to_string() == admin_id)
        .expect("admin SVID");
    let plain = svids
        .iter()
        .find(|s| s.id.to_string() == plain_id)
        .expect("plain SVID");

    // Control: the admin workload creates, reads, lists and deletes an entry over TLS.
    let mut c = entries_over_tls(&server, Some(admin)).await?;
    let made_id = format!("spiffe://{TD}/made-over-tls");
    let made = c
        .create_entry(apb::CreateEntryRequest {
            entry: Some(new_entry(&made_id, &parent)),
        })
        .await?
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(
        cli::entries(&server, &["--spiffe-id", &made_id])?.len(),
        1,
        "the server holds it"
    );
    let got = c
        .get_entry(apb::GetEntryRequest {
            id: made.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(got.entry.map(|e| e.spiffe_id), Some(made_id.clone()));
    let batch = c
        .batch_create_entry(apb::BatchCreateEntryRequest {
            entries: vec![new_entry(&format!("spiffe://{TD}/batch-over-tls"), &parent)],
        })
        .await?
        .into_inner();
    assert_eq!(batch.entries.len(), 1);
    let listed = c
        .list_entries(apb::ListEntriesRequest {
            filter: Some(apb::EntryFilter {
                by_parent_id: parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.entries.len(), 4, "{listed:?}");
    c.delete_entry(apb::DeleteEntryRequest {
        id: made.id.clone(),
    })
    .await?;
    assert!(
        cli::entries(&server, &["--spiffe-id", &made_id])?.is_empty(),
        "deleted on the server"
    );

    // Attack: a workload whose entry is not admin.
    let mut c = entries_over_tls(&server, Some(plain)).await?;
    assert_denied(
        c.create_entry(apb::CreateEntryRequest {
            entry: Some(new_entry(&made_id, &parent)),
        })
        .await,
        &plain_id,
    );
    assert_denied(
        c.list_entries(apb::ListEntriesRequest::default()).await,
        &plain_id,
    );
    assert_denied(
        c.delete_entry(apb::DeleteEntryRequest {
            id: batch.entries[0].id.clone(),
        })
        .await,
        &plain_id,
    );

    // Attack: an attested agent's own SVID (node identities are never admins).
    let token = cli::ok(&server, &["token", "generate"])?;
    let token = token
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .expect("token")
        .trim()
        .to_owned();
    let bundle = cli::all_bundles(&server)?;
    let td = TrustDomain::parse(TD)?;
    let authorities = bundle
        .get(&td)
        .expect("own bundle")
        .x509_authorities
        .clone();
    let mut ta = sigil_e2e::test_agent::TestAgent::new(&server.addr(), &td, authorities);
    ta.attest_join_token(&token).await?;
    let agent_svid_id = format!("spiffe://{TD}/sigil/agent/join_token/{token}");
    let mut c = EntriesClient::new(ta.channel(true).await?);
    assert_denied(
        c.create_entry(apb::CreateEntryRequest {
            entry: Some(new_entry(&made_id, &agent_svid_id)),
        })
        .await,
        &agent_svid_id,
    );
    assert_denied(
        c.list_entries(apb::ListEntriesRequest::default()).await,
        &agent_svid_id,
    );

    // Attack: no client certificate.
    let mut c = entries_over_tls(&server, None).await?;
    assert_denied(
        c.list_entries(apb::ListEntriesRequest::default()).await,
        "anonymous",
    );

    // Attack: an SVID naming the admin ID, from a CA the server does not trust: no TLS session.
    let forged = forge(&admin_id)?;
    let refused = match entries_over_tls(&server, Some(&forged)).await {
        Err(_) => true,
        Ok(mut c) => c
            .list_entries(apb::ListEntriesRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a forged admin SVID must not reach the entry API");

    // Attack: the admin flag is cleared; the same, still valid SVID is refused at once.
    let admin_entry = cli::entries(&server, &["--spiffe-id", &admin_id])?;
    let admin_entry_id = cli::field(&admin_entry[0], "id")?.to_owned();
    cli::ok(
        &server,
        &[
            "entry",
            "update",
            "--entry-id",
            &admin_entry_id,
            "--admin=false",
        ],
    )?;
    let mut c = entries_over_tls(&server, Some(admin)).await?;
    assert_denied(
        c.list_entries(apb::ListEntriesRequest::default()).await,
        &admin_id,
    );
    assert_eq!(
        cli::entries(&server, &["--spiffe-id", &made_id])?.len(),
        0,
        "nothing was created by the refused calls"
    );
    Ok(())
}

/// A self-signed CA outside the server's bundle and a leaf it signs for `id`.
fn forge(id: &str) -> anyhow::Result<Svid> {
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.subject_alt_names = vec![SanType::URI(format!("spiffe://{TD}").try_into()?)];
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names = vec![SanType::URI(id.try_into()?)];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Svid {
        id: SpiffeId::parse(id)?,
        chain: vec![cert.der().clone(), ca_cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

/// The leaf's notAfter.
fn not_after(svid: &Svid) -> anyhow::Result<std::time::SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(&svid.chain[0])
        .map_err(|e| anyhow::anyhow!("bad DER: {e}"))?;
    let secs = u64::try_from(c.validity().not_after.timestamp())?;
    Ok(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

#[tokio::test]
async fn an_admin_connection_does_not_outlive_its_svid() -> anyhow::Result<()> {
    let server = ServerProcess::start(&["--x509-svid-ttl", "3s"])?;
    let agent = AgentProcess::start(&server, &[])?;
    let parent = agent_id(&agent);
    let me = format!("unix:uid:{}", uid());
    let admin_id = format!("spiffe://{TD}/ops/admin");
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &admin_id,
            "--parent-id",
            &parent,
            "--selector",
            &me,
            "--admin",
        ],
    )?;
    let svids = workload_svids(&agent, 1).await?;
    let admin = &svids[0];
    let mut c = entries_over_tls(&server, Some(admin)).await?;
    // Control: valid now, on this connection.
    c.list_entries(apb::ListEntriesRequest::default()).await?;
    // Attack: keep the connection open past the SVID's expiry and call again.
    let end = not_after(admin)?;
    while std::time::SystemTime::now() <= end + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = c
        .list_entries(apb::ListEntriesRequest::default())
        .await
        .expect_err("expired SVID");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("expired"), "{s:?}");
    Ok(())
}
