//! sigil-agent end to end: real server and agent processes, with clients nobody here wrote — the `spiffe`
//! crate's WorkloadApiClient and the `spire-api` crate's DelegatedIdentityClient — plus raw gRPC for the
//! error cases those clients would refuse to send.

use std::time::{Duration, Instant};

use sigil_proto::workload as wpb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_test_util::{AgentProcess, ServerProcess};
use spiffe::WorkloadApiClient;

const TD: &str = "identity.example.com";

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn entry(server: &ServerProcess, spiffe: &str, parent: &str, selector: &str, extra: &[&str]) {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe,
        "--parent-id",
        parent,
        "--selector",
        selector,
    ];
    args.extend_from_slice(extra);
    let out = server.cli(&args).expect("cli");
    assert!(
        out.status.success(),
        "entry create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

async fn raw_client(
    agent: &AgentProcess,
) -> anyhow::Result<SpiffeWorkloadApiClient<tonic::transport::Channel>> {
    let ch = sigil_e2e::admin_channel(&agent.socket).await?;
    Ok(SpiffeWorkloadApiClient::new(ch))
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("header"));
    r
}

/// Waits until the spiffe client gets an X.509-SVID (the entry has to reach the agent first).
async fn wait_svid(endpoint: &str) -> anyhow::Result<spiffe::X509Svid> {
    let start = Instant::now();
    loop {
        let client = WorkloadApiClient::connect_to(endpoint).await?;
        match client.fetch_x509_svid().await {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test]
async fn spiffe_crate_client_fetches_and_validates() -> anyhow::Result<()> {
    let server = ServerProcess::start(&[])?;
    let agent = AgentProcess::start(&server, &[])?;
    let me = format!("unix:uid:{}", uid());
    let workload = format!("spiffe://{TD}/workload");
    entry(
        &server,
        &workload,
        &agent_id(&agent),
        &me,
        &["--hint", "main"],
    );

    let svid = wait_svid(&agent.endpoint()).await?;
    assert_eq!(svid.spiffe_id().to_string(), workload);
    assert!(!svid.cert_chain().is_empty());

    let client = WorkloadApiClient::connect_to(agent.endpoint()).await?;
    let bundles = client.fetch_x509_bundles().await?;
    let td = spiffe::TrustDomain::new(TD)?;
    let b = bundles.get(&td).expect("own bundle");
    assert!(!b.authorities().is_empty());
    let ctx = client.fetch_x509_context().await?;
    assert_eq!(ctx.svids().len(), 1);

    // JWT-SVIDs: fetched, validated by the agent, and checked locally with the JWT bundles.
    let jwt = client.fetch_jwt_svid(["db"], None).await?;
    assert_eq!(jwt.spiffe_id().to_string(), workload);

    let validated = client.validate_jwt_token("db", jwt.token()).await?;
    assert_eq!(validated.spiffe_id().to_string(), workload);
    let jwt_bundles = client.fetch_jwt_bundles().await?;
    spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["db"])?;

    // Wrong audience, alg none, HS256, unknown key: all rejected by ValidateJWTSVID.
    assert!(
        client
            .validate_jwt_token("other", jwt.token())
            .await
            .is_err()
    );
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let claims = b64(&format!(
        r#"{{"sub":"{workload}","aud":["db"],"exp":{}}}"#,
        sigil_e2e::unix_now() + 300
    ));
    let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), claims);
    let hs = format!("{}.{}.c2ln", b64(r#"{"alg":"HS256","typ":"JWT"}"#), claims);
    let kid = jwt
        .token()
        .split('.')
        .next()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let _ = kid;
    let unknown = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let enc = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("not-in-bundle".into());
        h.typ = Some("JWT".into());
        let c =
            serde_json::json!({"sub": workload, "aud": ["db"], "exp": sigil_e2e::unix_now() + 300});
        jsonwebtoken::encode(&h, &c, &enc)?
    };
    let mut raw = raw_client(&agent).await?;
    for (name, token) in [("alg none", none), ("HS256", hs), ("unknown key", unknown)] {
        let err = raw
            .validate_jwtsvid(with_header(wpb::ValidateJwtsvidRequest {
                audience: "db".into(),
                svid: token,
            }))
            .await
            .expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
    }

    // An expired JWT-SVID (1 s TTL, minted by the server) is rejected once past its expiry.
    let out = server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        &workload,
        "--audience",
        "db",
        "--ttl",
        "1s",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let short = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.split('.').count() == 3)
        .expect("token line")
        .to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = raw
        .validate_jwtsvid(with_header(wpb::ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: short,
        }))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("expire"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn header_and_registration_are_enforced() -> anyhow::Result<()> {
    let server = ServerProcess::start(&[])?;
    let agent = AgentProcess::start(&server, &[])?;
    // Only a uid that is not ours is registered.
    let other = format!("unix:uid:{}", uid() + 4242);
    entry(
        &server,
        &format!("spiffe://{TD}/someone"),
        &agent_id(&agent),
        &other,
        &[],
    );
    let mut raw = raw_client(&agent).await?;

    let err = raw
        .fetch_x509svid(tonic::Request::new(wpb::X509svidRequest {}))
        .await
        .expect_err("no header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw
        .fetch_jwtsvid(tonic::Request::new(wpb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("no header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let err = raw
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await
        .expect_err("unregistered");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // The caller is told nothing of how it was seen: no selectors, no executable path or hash.
    let exe = std::fs::read_link("/proc/self/exe")?.display().to_string();
    for leak in ["unix:", "uid", "sha256", exe.as_str()] {
        assert!(
            !err.message().contains(leak),
            "{leak:?} in {:?}",
            err.message()
        );
    }
    assert!(err.message().contains("no registration entry"), "{err:?}");
    let err = raw
        .fetch_jwtsvid(with_header(wpb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("unregistered");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    for leak in ["unix:", "uid", "sha256", exe.as_str()] {
        assert!(
            !err.message().contains(leak),
            "{leak:?} in {:?}",
            err.message()
        );
    }
    let err = raw
        .fetch_jwtsvid(with_header(wpb::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("no audience");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The public socket is open to everyone; the admin socket's directory is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o777);
    let dir = agent.admin_socket.parent().expect("dir");
    assert_eq!(std::fs::metadata(dir)?.permissions().mode() & 0o777, 0o700);
    Ok(())
}

#[tokio::test]
async fn delegated_identity_for_authorized_delegates_only() -> anyhow::Result<()> {
    use spire_api::DelegatedIdentityClient;
    use spire_api::agent::delegated_identity::DelegateAttestationRequest;
    use spire_api::selectors::{Selector, Unix, UnixId};

    let server = ServerProcess::start(&[])?;
    let delegate = format!("spiffe://{TD}/netd");
    let good = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let bad = AgentProcess::start(
        &server,
        &["--authorized-delegate", &format!("spiffe://{TD}/not-me")],
    )?;
    let me = format!("unix:uid:{}", uid());
    let target_uid = uid() + 777;
    for a in [&good, &bad] {
        entry(&server, &delegate, &agent_id(a), &me, &[]);
        entry(
            &server,
            &format!("spiffe://{TD}/endpoint"),
            &agent_id(a),
            &format!("unix:uid:{target_uid}"),
            &[],
        );
        entry(
            &server,
            &format!("spiffe://{TD}/admin-thing"),
            &agent_id(a),
            &format!("unix:uid:{target_uid}"),
            &["--admin"],
        );
    }
    wait_svid(&good.endpoint()).await?;
    wait_svid(&bad.endpoint()).await?;

    let target = || {
        DelegateAttestationRequest::for_selectors(vec![Selector::Unix(Unix::Uid(UnixId::new(
            target_uid,
        )))])
        .expect("selectors")
    };
    let client = DelegatedIdentityClient::connect_to(good.admin_endpoint()).await?;
    let svid = client.fetch_x509_svid(target()).await?;
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/endpoint")
    );
    let bundles = client.fetch_x509_bundles().await?;
    assert!(bundles.get(&spiffe::TrustDomain::new(TD)?).is_some());
    let jwts = client.fetch_jwt_svids(&["aud"], target()).await?;
    assert_eq!(jwts.len(), 1, "admin entries are never served");
    assert_eq!(
        jwts[0].spiffe_id().to_string(),
        format!("spiffe://{TD}/endpoint")
    );
    client.fetch_jwt_bundles().await?;

    // Selectors and pid together are refused (raw gRPC: the crate would not send it).
    use sigil_proto::spire::api::agent::delegatedidentity::v1 as dpb;
    let ch = sigil_e2e::admin_channel(&good.admin_socket).await?;
    let mut raw = dpb::delegated_identity_client::DelegatedIdentityClient::new(ch);
    let err = raw
        .subscribe_to_x509svi_ds(dpb::SubscribeToX509sviDsRequest {
            selectors: vec![sigil_proto::spire::api::types::Selector {
                r#type: "unix".into(),
                value: format!("uid:{target_uid}"),
            }],
            pid: std::process::id() as i32,
        })
        .await
        .expect_err("both");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // By PID: this very process.
    let by_pid = client
        .fetch_x509_svid(DelegateAttestationRequest::for_pid(std::process::id())?)
        .await?;
    assert_eq!(by_pid.spiffe_id().to_string(), delegate);

    // The unauthorized agent refuses the same caller.
    let client = DelegatedIdentityClient::connect_to(bad.admin_endpoint()).await?;
    let err = client
        .fetch_x509_svid(target())
        .await
        .expect_err("unauthorized");
    assert!(format!("{err:?}").contains("PermissionDenied"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn rotation_server_outage_and_agent_restart() -> anyhow::Result<()> {
    let mut server = ServerProcess::start(&["--x509-svid-ttl", "6s"])?;
    let mut agent = AgentProcess::start(&server, &[])?;
    let me = format!("unix:uid:{}", uid());
    entry(
        &server,
        &format!("spiffe://{TD}/rot"),
        &agent_id(&agent),
        &me,
        &[],
    );
    wait_svid(&agent.endpoint()).await?;

    // One stream, no reconnect: a new SVID arrives before the old one expires.
    let mut raw = raw_client(&agent).await?;
    let mut stream = raw
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = stream.message().await?.expect("first");
    let first_leaf = leaf_of(&first);
    let (first_serial, first_expiry) = serial_expiry(&first_leaf);
    let second = tokio::time::timeout(Duration::from_secs(8), stream.message())
        .await??
        .expect("rotated");
    let (second_serial, _) = serial_expiry(&leaf_of(&second));
    assert_ne!(first_serial, second_serial);
    assert!(
        sigil_e2e::unix_now() < first_expiry,
        "rotated SVID arrived only after the old one expired"
    );

    // Server down: cached SVIDs keep flowing to new clients.
    server.kill9();
    let svid = match wait_svid(&agent.endpoint()).await {
        Ok(s) => s,
        Err(e) => panic!("{e}\nagent log:\n{}", agent.log_text()),
    };
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://{TD}/rot"));
    // Server back: rotation resumes on the same stream, the agent untouched.
    server.spawn()?;
    let mut seen = second_serial;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await??
            .expect("msg");
        let (s, _) = serial_expiry(&leaf_of(&msg));
        if s != seen {
            seen = s;
            break;
        }
    }
    let _ = seen;

    // Agent restart: reconnects with its stored SVID; the spent join token is not used again.
    agent.kill9();
    agent.spawn()?;
    assert!(
        agent.log_text().contains("using the stored agent SVID"),
        "{}",
        agent.log_text()
    );
    let svid = match wait_svid(&agent.endpoint()).await {
        Ok(s) => s,
        Err(e) => panic!("{e}\nagent log:\n{}", agent.log_text()),
    };
    assert_eq!(svid.spiffe_id().to_string(), format!("spiffe://{TD}/rot"));
    let out = server.cli(&["agent", "list", "--output", "json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("join_token/").count(), 1, "{text}");
    Ok(())
}

fn leaf_of(resp: &wpb::X509svidResponse) -> Vec<u8> {
    use x509_parser::prelude::*;
    let der = &resp.svids[0].x509_svid;
    let (rest, _) = X509Certificate::from_der(der).expect("leaf");
    der[..der.len() - rest.len()].to_vec()
}

fn serial_expiry(der: &[u8]) -> (String, i64) {
    use x509_parser::prelude::*;
    let (_, c) = X509Certificate::from_der(der).expect("cert");
    (
        hex::encode(c.raw_serial()),
        c.validity().not_after.timestamp(),
    )
}

#[tokio::test]
async fn removed_entries_drop_their_svids_from_open_streams() -> anyhow::Result<()> {
    let server = ServerProcess::start(&[])?;
    let agent = AgentProcess::start(&server, &[])?;
    let me = format!("unix:uid:{}", uid());
    let parent = agent_id(&agent);
    entry(&server, &format!("spiffe://{TD}/keep"), &parent, &me, &[]);
    entry(&server, &format!("spiffe://{TD}/drop"), &parent, &me, &[]);
    wait_svid(&agent.endpoint()).await?;

    let mut raw = raw_client(&agent).await?;
    let mut stream = raw
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await?
        .into_inner();
    // The first message carries both identities once both SVIDs are minted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, stream.message())
            .await??
            .expect("msg");
        if m.svids.len() == 2 {
            break;
        }
    }
    let ids = |server: &ServerProcess, spiffe: &str| -> String {
        let out = server
            .cli(&["entry", "show", "--spiffe-id", spiffe, "--output", "json"])
            .expect("cli");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let list = v.get("entries").cloned().unwrap_or(v);
        list[0]["id"].as_str().expect("id").to_string()
    };
    let drop_id = ids(&server, &format!("spiffe://{TD}/drop"));
    let out = server.cli(&["entry", "delete", "--entry-id", &drop_id])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("update");
    let left: Vec<&str> = m.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(left, vec![format!("spiffe://{TD}/keep").as_str()]);

    // Removing the last entry ends the stream: the caller no longer has an identity.
    let keep_id = ids(&server, &format!("spiffe://{TD}/keep"));
    server.cli(&["entry", "delete", "--entry-id", &keep_id])?;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?;
    let err = end.expect_err("stream must end");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    Ok(())
}

/// An x509pop node CA and a node certificate under `dir`: (CA, node chain, node key, SHA-1 fingerprint).
fn x509pop_node(
    dir: &std::path::Path,
    cn: &str,
) -> anyhow::Result<(
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
)> {
    let ca = sigil_test_util::TestCa::new("node CA")?;
    let (node, node_key) = ca.leaf(cn)?;
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("node.pem"),
        dir.join("node-key.pem"),
    );
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, node.pem())?;
    std::fs::write(&key_path, node_key.serialize_pem())?;
    let fp = {
        use sha1::Digest;
        hex::encode(sha1::Sha1::digest(node.der()))
    };
    Ok((ca_path, cert_path, key_path, fp))
}

/// An evicted x509pop agent whose first attempts to attest again fail (the server restarted without
/// x509pop, then is down for a moment) keeps retrying and serves once the server accepts it again;
/// before, the first failed attempt stopped the agent.
#[tokio::test]
async fn evicted_agent_retries_attestation_through_server_restarts() -> anyhow::Result<()> {
    const RTD: &str = "retry.example.org";
    let dir = tempfile::tempdir()?;
    let (ca_path, cert_path, key_path, fp) = x509pop_node(dir.path(), "retry-node")?;
    let with_x509pop: Vec<String> = [
        "--trust-domain",
        RTD,
        "--x509pop-ca-bundle",
        ca_path.to_str().expect("utf8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server =
        ServerProcess::start(&with_x509pop.iter().map(String::as_str).collect::<Vec<_>>())?;
    let agent =
        AgentProcess::start_x509pop(&server, &cert_path, &key_path, &["--trust-domain", RTD])?;
    let agent_spiffe = format!("spiffe://{RTD}/sigil/agent/x509pop/{fp}");
    let me = format!("unix:uid:{}", uid());
    entry(
        &server,
        &format!("spiffe://{RTD}/before"),
        &agent_spiffe,
        &me,
        &[],
    );
    wait_svid(&agent.endpoint()).await?;

    // The server restarts without x509pop and evicts the agent: every attempt to attest again fails.
    server.kill9();
    server.extra = vec!["--trust-domain".into(), RTD.into()];
    server.spawn()?;
    let out = server.cli(&["agent", "evict", "--spiffe-id", &agent_spiffe])?;
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent
        .log_text()
        .matches("attesting again after eviction failed")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the evicted agent did not retry; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then the server is down for a moment, and comes back with x509pop.
    server.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        agent
            .log_text()
            .matches("attesting again after eviction failed")
            .count()
            >= 2
            && !agent.log_text().contains("cannot attest again"),
        "{}",
        agent.log_text()
    );
    server.extra = with_x509pop;
    server.spawn()?;
    let after = format!("spiffe://{RTD}/after");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .cli(&["agent", "show", "--spiffe-id", &agent_spiffe])?
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the evicted agent did not attest again; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    entry(&server, &after, &agent_spiffe, &me, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let client = WorkloadApiClient::connect_to(agent.endpoint()).await?;
        let ids: Vec<String> = match client.fetch_x509_context().await {
            Ok(ctx) => ctx
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect(),
            Err(_) => vec![],
        };
        if ids.contains(&after) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SVID for an entry created after the re-attestation ({ids:?}); log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Attack on the agent's reaction to refusals: the server's refusal messages contain the word "banned"
/// (here, in the trust domain name), yet an evicted x509pop agent attests again and keeps serving, because
/// it acts on the machine-readable reason only. Banning it stops it with the ban reason.
#[tokio::test]
async fn evicted_x509pop_agent_attests_again_banned_agent_stops() -> anyhow::Result<()> {
    const BTD: &str = "not-banned.example.org";
    let dir = tempfile::tempdir()?;
    let (ca_path, cert_path, key_path, fp) = x509pop_node(dir.path(), "banned-node")?;

    let server = ServerProcess::start(&[
        "--trust-domain",
        BTD,
        "--x509pop-ca-bundle",
        ca_path.to_str().expect("utf8"),
    ])?;
    let mut agent =
        AgentProcess::start_x509pop(&server, &cert_path, &key_path, &["--trust-domain", BTD])?;
    let agent_spiffe = format!("spiffe://{BTD}/sigil/agent/x509pop/{fp}");
    let me = format!("unix:uid:{}", uid());
    entry(
        &server,
        &format!("spiffe://{BTD}/before"),
        &agent_spiffe,
        &me,
        &[],
    );
    wait_svid(&agent.endpoint()).await?;

    let out = server.cli(&["agent", "evict", "--spiffe-id", &agent_spiffe])?;
    assert!(out.status.success(), "{out:?}");
    // It attests again (its record comes back) and keeps serving: an entry created now reaches it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(agent.log_text().contains("attesting again")
        && server
            .cli(&["agent", "show", "--spiffe-id", &agent_spiffe])?
            .status
            .success())
    {
        assert!(
            Instant::now() < deadline,
            "the evicted agent did not attest again; log:\n{}",
            agent.log_text()
        );
        if let Some(c) = agent.child.as_mut() {
            assert!(
                c.try_wait()?.is_none(),
                "the evicted agent exited; log:\n{}",
                agent.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = format!("spiffe://{BTD}/after");
    entry(&server, &after, &agent_spiffe, &me, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let client = WorkloadApiClient::connect_to(agent.endpoint()).await?;
        let ids: Vec<String> = match client.fetch_x509_context().await {
            Ok(ctx) => ctx
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect(),
            Err(_) => vec![],
        };
        if ids.contains(&after) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SVID for an entry created after eviction ({ids:?}); log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !agent.log_text().contains("the server banned this agent"),
        "{}",
        agent.log_text()
    );

    // Banned: the agent stops, saying why.
    let out = server.cli(&["agent", "ban", "--spiffe-id", &agent_spiffe])?;
    assert!(out.status.success(), "{out:?}");
    let status = agent.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let log = agent.log_text();
    assert!(log.contains("the server banned this agent"), "{log}");
    Ok(())
}

/// Whether root-only tests can run here (mount namespaces, pidfd_getfd).
fn root_or_skip(test: &str) -> bool {
    sigil_test_util::can_run_as_root(test)
}

/// A `sigil-test-peer connect` process: it connected to the Workload API socket as itself.
struct Peer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    fd: i32,
}

impl Peer {
    fn start(mut cmd: std::process::Command) -> anyhow::Result<Peer> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line)?;
        let fd = line
            .trim()
            .strip_prefix("connected ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("peer said {line:?}"))?;
        Ok(Peer { child, stdin, fd })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A copy of the peer's connection (pidfd_getfd), so the test speaks gRPC on it while the kernel still
    /// names the peer process as the socket's other end.
    #[allow(unsafe_code)]
    fn connection(&self) -> anyhow::Result<std::os::unix::net::UnixStream> {
        use nix::libc;
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes two integers and returns a new fd (owned below) or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid(), 0) };
        anyhow::ensure!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd takes integers and returns a new fd (owned below) or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), self.fd, 0) };
        anyhow::ensure!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        // SAFETY: as above; it is a connected Unix stream socket (the peer's).
        let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd as i32) };
        s.set_nonblocking(true)?;
        Ok(s)
    }

    /// The path `/proc/<pid>/exe` reads as.
    fn exe(&self) -> String {
        std::fs::read_link(format!("/proc/{}/exe", self.pid()))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Workload API client on an already connected stream.
async fn client_over(
    s: std::os::unix::net::UnixStream,
) -> anyhow::Result<SpiffeWorkloadApiClient<tonic::transport::Channel>> {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(
        tokio::net::UnixStream::from_std(s)?,
    )));
    let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let s = slot.lock().expect("lock").take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the peer's connection was used already"))
            }
        }))
        .await?;
    Ok(SpiffeWorkloadApiClient::new(ch))
}

/// The SPIFFE ID of the first X.509-SVID the agent gives on `client`, retrying while the entry syncs.
async fn svid_over(
    client: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
) -> Result<String, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .fetch_x509svid(with_header(wpb::X509svidRequest {}))
            .await
        {
            Ok(s) => {
                let msg = s.into_inner().message().await?.expect("first message");
                return Ok(msg.svids[0].spiffe_id.clone());
            }
            Err(e) if Instant::now() < deadline && e.code() == tonic::Code::PermissionDenied => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A server, an agent, a registered tool (a copy of `sigil-test-peer` at its own path) with an entry
/// selecting `unix:path:<tool>`, and another binary (the original `sigil-test-peer`).
struct ToolSetup {
    server: ServerProcess,
    agent: AgentProcess,
    _dir: tempfile::TempDir,
    tool: std::path::PathBuf,
    other: std::path::PathBuf,
    id: String,
}

fn tool_setup() -> anyhow::Result<ToolSetup> {
    use std::os::unix::fs::PermissionsExt;
    let server = ServerProcess::start(&[])?;
    let agent = AgentProcess::start(&server, &[])?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let other = std::path::PathBuf::from(env!("CARGO_BIN_EXE_sigil-test-peer"));
    let tool = dir.path().join("tool");
    std::fs::copy(&other, &tool)?;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755))?;
    let id = format!("spiffe://{TD}/tool");
    entry(
        &server,
        &id,
        &agent_id(&agent),
        &format!("unix:path:{}", tool.display()),
        &[],
    );
    Ok(ToolSetup {
        server,
        agent,
        _dir: dir,
        tool,
        other,
        id,
    })
}

/// Attack: in its own mount namespace a process bind-mounts another binary over the registered tool's path
/// and runs it from there, so `/proc/PID/exe` reads as the tool's path. The agent resolves that path in its
/// own mount namespace, finds another file, and emits no `unix:path`: PermissionDenied. Control: the real
/// tool at that path gets the SVID.
#[tokio::test]
async fn bind_mounted_binary_is_not_attested_by_the_path_it_hides_behind() -> anyhow::Result<()> {
    if !root_or_skip("bind_mounted_binary_is_not_attested_by_the_path_it_hides_behind") {
        return Ok(());
    }
    let t = tool_setup()?;
    let sock = t.agent.socket.display().to_string();
    let tool = t.tool.display().to_string();

    let real = Peer::start({
        let mut c = std::process::Command::new(&t.tool);
        c.args(["connect", &sock]);
        c
    })?;
    let mut client = client_over(real.connection()?).await?;
    assert_eq!(svid_over(&mut client).await?, t.id);

    let fake = Peer::start({
        let mut c = std::process::Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" "$1" && exec "$1" connect "$2""#)
            .arg(&t.other)
            .arg(&tool)
            .arg(&sock);
        c
    })?;
    // The setup is what the attack needs: the kernel names the tool's path, the file is another one.
    assert_eq!(fake.exe(), tool);
    use std::os::unix::fs::MetadataExt;
    let (shown, real_tool) = (
        std::fs::metadata(format!("/proc/{}/exe", fake.pid()))?,
        std::fs::metadata(&t.tool)?,
    );
    assert_ne!(
        (shown.dev(), shown.ino()),
        (real_tool.dev(), real_tool.ino())
    );
    let err = client_over(fake.connection()?)
        .await?
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await
        .expect_err("a bind-mounted binary must not pass as the tool");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    Ok(())
}

/// Attack: a process connects to the Workload API, then execs the registered tool while the connection
/// lives on (here the test holds a copy of it, as a forked child would): the call that follows is refused,
/// since the executable is not the one that connected. Control: the tool connecting as itself is served.
#[tokio::test]
async fn exec_after_connect_is_refused() -> anyhow::Result<()> {
    if !root_or_skip("exec_after_connect_is_refused") {
        return Ok(());
    }
    let t = tool_setup()?;
    let sock = t.agent.socket.display().to_string();

    let real = Peer::start({
        let mut c = std::process::Command::new(&t.tool);
        c.args(["connect", &sock]);
        c
    })?;
    let mut client = client_over(real.connection()?).await?;
    assert_eq!(svid_over(&mut client).await?, t.id);

    let mut attacker = Peer::start({
        let mut c = std::process::Command::new(&t.other);
        c.args(["connect", &sock]);
        c
    })?;
    let mut client = client_over(attacker.connection()?).await?;
    // Served as itself first (unregistered), so the agent has accepted the connection before the exec.
    let err = client
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await
        .expect_err("unregistered binary");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    use std::io::Write;
    writeln!(attacker.stdin, "exec {}", t.tool.display())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while attacker.exe() != t.tool.display().to_string() {
        assert!(Instant::now() < deadline, "the peer did not exec the tool");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = client
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await
        .expect_err("exec after connect must not be attested as the new binary");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("another executable"), "{err:?}");
    Ok(())
}

/// Attack: the registered tool opens a FetchX509SVID stream as itself (attested), then execs another
/// binary while the stream lives on (the test holds a copy of the connection, as a forked child would).
/// The next push (a new entry for the tool) must not reach it: the agent re-checks the executable before
/// each push and ends the stream with Unauthenticated. Control: the same flow without the exec keeps
/// receiving, and gets the new entry's SVID.
#[tokio::test]
async fn exec_after_attestation_ends_open_streams() -> anyhow::Result<()> {
    if !root_or_skip("exec_after_attestation_ends_open_streams") {
        return Ok(());
    }
    let t = tool_setup()?;
    let sock = t.agent.socket.display().to_string();
    let open = |p: &Peer| -> anyhow::Result<_> {
        let conn = p.connection()?;
        Ok(async move {
            let mut client = client_over(conn).await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match client
                    .fetch_x509svid(with_header(wpb::X509svidRequest {}))
                    .await
                {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        let first = s.message().await?.expect("first message");
                        return anyhow::Ok((s, first));
                    }
                    Err(e)
                        if Instant::now() < deadline
                            && e.code() == tonic::Code::PermissionDenied =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        })
    };
    let tool_peer = || -> anyhow::Result<Peer> {
        Peer::start({
            let mut c = std::process::Command::new(&t.tool);
            c.args(["connect", &sock]);
            c
        })
    };
    let control = tool_peer()?;
    let mut attacker = tool_peer()?;
    let (mut control_stream, first) = open(&control)?.await?;
    assert_eq!(first.svids.len(), 1);
    let (mut attacker_stream, first) = open(&attacker)?.await?;
    assert_eq!(first.svids[0].spiffe_id, t.id);

    use std::io::Write;
    writeln!(attacker.stdin, "exec {}", t.other.display())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while attacker.exe() != t.other.display().to_string() {
        assert!(Instant::now() < deadline, "the peer did not exec");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A push: a second identity for the tool.
    let second = format!("spiffe://{TD}/tool-second");
    entry(
        &t.server,
        &second,
        &agent_id(&t.agent),
        &format!("unix:path:{}", t.tool.display()),
        &[],
    );
    // Control: the tool that did not exec receives it.
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = control_stream.message().await?.expect("stream open");
            if m.svids.iter().any(|s| s.spiffe_id == second) {
                return anyhow::Ok(m);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the control stream did not receive the new SVID"))??;
    assert_eq!(got.svids.len(), 2);
    // Attack: the exec'd process gets no SVID, only the end of the stream.
    let end = tokio::time::timeout(Duration::from_secs(20), attacker_stream.message())
        .await
        .map_err(|_| anyhow::anyhow!("the exec'd peer's stream neither ended nor failed"))?;
    match end {
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
            assert!(e.message().contains("another executable"), "{e:?}");
        }
        Ok(m) => panic!("the exec'd peer must get no further SVID, got {m:?}"),
    }
    Ok(())
}

/// Graceful drain: on SIGTERM the agent stops accepting but keeps an open Workload API stream for the
/// drain timeout (it does not cut it at once), then ends it and exits 0. Control: before the signal
/// the stream serves normally.
#[tokio::test]
async fn sigterm_drains_open_streams_then_exits_zero() -> anyhow::Result<()> {
    let server = ServerProcess::start(&[])?;
    let mut agent = AgentProcess::start(&server, &["--drain-timeout", "3s"])?;
    let me = format!("unix:uid:{}", uid());
    entry(
        &server,
        &format!("spiffe://{TD}/drain"),
        &agent_id(&agent),
        &me,
        &[],
    );
    wait_svid(&agent.endpoint()).await?;
    let mut raw = raw_client(&agent).await?;
    let mut stream = raw
        .fetch_x509svid(with_header(wpb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .expect("first message");
    assert_eq!(first.svids.len(), 1);

    let pid = agent.child.as_ref().expect("running").id();
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    // During the drain the stream stays open: no end, no error, for a good part of the 3 s.
    let during = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(
        during.is_err(),
        "the open stream ended at once on SIGTERM: {during:?}"
    );
    // After the drain timeout the stream ends and the process exits 0.
    let status = agent.wait_exit(Duration::from_secs(15))?;
    assert!(
        status.success(),
        "agent exit: {status}; log:\n{}",
        agent.log_text()
    );
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(12),
        "exit after {waited:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await?;
    assert!(
        !matches!(end, Ok(Some(_))),
        "no further message after the drain: {end:?}"
    );
    let log = agent.log_text();
    assert!(log.contains("drain timeout reached"), "{log}");
    Ok(())
}
