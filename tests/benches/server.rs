//! Whole-system benchmarks of sigil-server (issue 2), printed as a Markdown table for docs/benchmarks.md:
//! 1. X.509-SVID signing through the agent API (batched CSRs over mTLS) vs the same work in-process;
//! 2. entry propagation: entry created → arrived on a connected agent's stream, with 10 000 entries present;
//! 3. a fresh agent's full sync of 100 000 entries: time and peak server RSS.
//!
//! Run: `cargo build --release -p sigil-cli && cargo bench -p sigil-e2e --bench server`
//! (the server under test is the release `sigil` binary, a separate process).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use sigil_e2e::admin_channel;
use sigil_e2e::test_agent::{TestAgent, key_and_csr};
use sigil_proto::admin::v1 as apb;
use sigil_proto::agent::v1 as pb;
use sigil_spiffe::{SpiffeId, TrustDomain};
use sigil_test_util::ServerProcess;

const TD: &str = "identity.example.com";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn entries_for(parent: &str, prefix: &str, range: std::ops::Range<usize>) -> Vec<apb::Entry> {
    range
        .map(|i| apb::Entry {
            spiffe_id: format!("spiffe://{TD}/{prefix}/{i}"),
            parent_id: parent.to_string(),
            selectors: vec![apb::Selector {
                r#type: "unix".into(),
                value: format!("uid:{i}"),
            }],
            ..Default::default()
        })
        .collect()
}

async fn create_many(
    admin: &tonic::transport::Channel,
    parent: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<apb::Entry>> {
    let mut client = apb::entries_client::EntriesClient::new(admin.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + 1000).min(n);
        let resp = client
            .batch_create_entry(apb::BatchCreateEntryRequest {
                entries: entries_for(parent, prefix, start..end),
            })
            .await?
            .into_inner();
        out.extend(resp.entries);
        start = end;
    }
    Ok(out)
}

async fn attested_agent(
    server: &ServerProcess,
    admin: &tonic::transport::Channel,
) -> anyhow::Result<TestAgent> {
    let bundle = apb::bundles_client::BundlesClient::new(admin.clone())
        .get_bundle(apb::GetBundleRequest {})
        .await?
        .into_inner()
        .bundle
        .context("bundle")?;
    let td = TrustDomain::parse(&bundle.trust_domain)?;
    let roots = bundle
        .x509_authorities
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let token = apb::join_tokens_client::JoinTokensClient::new(admin.clone())
        .create_join_token(apb::CreateJoinTokenRequest {
            ttl: 600,
            spiffe_id: String::new(),
        })
        .await?
        .into_inner()
        .token;
    let mut agent = TestAgent::new(&server.addr(), &td, roots);
    agent.attest_join_token(&token).await?;
    Ok(agent)
}

async fn bench_signing(
    server: &ServerProcess,
    admin: &tonic::transport::Channel,
    rows: &mut Vec<[String; 3]>,
) -> anyhow::Result<()> {
    const N: usize = 4000;
    const BATCH: usize = 100;
    let agent = attested_agent(server, admin).await?;
    let parent = agent.id.clone().context("agent id")?.to_string();
    let entries = create_many(admin, &parent, "sign", BATCH).await?;
    let csrs: Vec<Vec<u8>> = (0..N)
        .map(|_| key_and_csr(None).map(|k| k.csr))
        .collect::<Result<_, _>>()?;

    // Raw: the same work in-process — CSR signature check plus certificate signing, EC P-256 CA.
    let dir = tempfile::tempdir()?;
    let ca = sigil_ca::Ca::open(
        sigil_ca::CaConfig {
            trust_domain: TrustDomain::parse(TD)?,
            key_type: sigil_ca::KeyType::EcP256,
            ca_ttl: Duration::from_secs(86400),
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_jwt_svid_ttl: Duration::from_secs(300),
            key_dir: dir.path().join("keys"),
            upstream: None,
        },
        Arc::new(sigil_ca::SystemClock),
        Arc::new(sigil_ca::MemoryJournal::default()),
    )?;
    let ids: Vec<SpiffeId> = entries
        .iter()
        .map(|e| SpiffeId::parse(&e.spiffe_id))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for (i, csr) in csrs.iter().enumerate() {
        ca.sign_csr(csr, &ids[i % ids.len()], &[], None)?;
    }
    let raw1 = N as f64 / t.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let t = Instant::now();
    std::thread::scope(|s| {
        for chunk in csrs.chunks(N.div_ceil(threads)) {
            let ca = &ca;
            let ids = &ids;
            s.spawn(move || {
                for (i, csr) in chunk.iter().enumerate() {
                    let _ = ca.sign_csr(csr, &ids[i % ids.len()], &[], None);
                }
            });
        }
    });
    let raw_n = N as f64 / t.elapsed().as_secs_f64();

    // Through the agent API over one mTLS connection, batches of 100 CSRs.
    let mut client = agent.client().await?;
    let t = Instant::now();
    let mut signed = 0;
    for (b, chunk) in csrs.chunks(BATCH).enumerate() {
        let params = chunk
            .iter()
            .enumerate()
            .map(|(i, csr)| pb::X509svidParams {
                entry_id: entries[(b * BATCH + i) % entries.len()].id.clone(),
                csr: csr.clone(),
            })
            .collect();
        let resp = client
            .batch_new_x509svid(pb::BatchNewX509svidRequest { params })
            .await?
            .into_inner();
        signed += resp.results.iter().filter(|r| r.status_code == 0).count();
    }
    let api = N as f64 / t.elapsed().as_secs_f64();
    if std::env::var_os("SIGIL_BENCH_DEBUG").is_some() {
        for l in server
            .log_text()
            .lines()
            .filter(|l| l.contains("batch signed"))
            .take(5)
        {
            eprintln!("{l}");
        }
    }
    anyhow::ensure!(signed == N, "only {signed} of {N} signed");
    rows.push([
        "X.509-SVID signing, raw in-process, 1 thread (baseline)".into(),
        format!("{raw1:.0} SVIDs/s"),
        String::new(),
    ]);
    rows.push([
        format!("X.509-SVID signing, raw in-process, {threads} threads"),
        format!("{raw_n:.0} SVIDs/s"),
        String::new(),
    ]);
    rows.push([
        "X.509-SVID signing via agent API (mTLS, batches of 100)".into(),
        format!("{api:.0} SVIDs/s"),
        format!(
            "{:.0} % of raw 1-thread, {:.0} % of raw {threads}-thread (target ≥ 50 %)",
            100.0 * api / raw1,
            100.0 * api / raw_n
        ),
    ]);
    Ok(())
}

async fn bench_propagation(
    server: &ServerProcess,
    admin: &tonic::transport::Channel,
    rows: &mut Vec<[String; 3]>,
) -> anyhow::Result<()> {
    const ROUNDS: usize = 300;
    let agent = attested_agent(server, admin).await?;
    let parent = agent.id.clone().context("agent id")?.to_string();
    create_many(admin, &parent, "present", 10_000).await?;
    let mut client = agent.client().await?;
    let mut stream = client
        .sync_entries(pb::SyncEntriesRequest {})
        .await?
        .into_inner();
    let mut got = 0;
    loop {
        let m = stream.message().await?.context("stream ended")?;
        got += m.entries.len();
        if m.snapshot_complete {
            break;
        }
    }
    anyhow::ensure!(got >= 10_000, "snapshot had {got} entries");
    let mut entries = apb::entries_client::EntriesClient::new(admin.clone());
    let mut from_call = Vec::with_capacity(ROUNDS);
    let mut from_return = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let start = Instant::now();
        let created = entries
            .create_entry(apb::CreateEntryRequest {
                entry: entries_for(&parent, "live", i..i + 1).pop(),
            })
            .await?
            .into_inner()
            .entry
            .context("entry")?;
        let returned = Instant::now();
        loop {
            let m = stream.message().await?.context("stream ended")?;
            if m.entries.iter().any(|e| e.id == created.id) {
                break;
            }
        }
        let arrived = Instant::now();
        from_call.push(arrived - start);
        from_return.push(arrived.saturating_duration_since(returned));
    }
    from_call.sort();
    from_return.sort();
    rows.push([
        "Entry propagation, create returned → on agent stream (10 000 present)".into(),
        format!(
            "p50 {} / p99 {}",
            ms(percentile(&from_return, 0.5)),
            ms(percentile(&from_return, 0.99))
        ),
        "target p99 < 100 ms".into(),
    ]);
    rows.push([
        "Entry propagation, create called → on agent stream (10 000 present)".into(),
        format!(
            "p50 {} / p99 {}",
            ms(percentile(&from_call, 0.5)),
            ms(percentile(&from_call, 0.99))
        ),
        "includes the admin RPC and the SQLite commit".into(),
    ]);
    Ok(())
}

async fn bench_full_sync(
    server: &ServerProcess,
    admin: &tonic::transport::Channel,
    rows: &mut Vec<[String; 3]>,
) -> anyhow::Result<()> {
    const N: usize = 100_000;
    let pid = server.child.as_ref().map(|c| c.id()).context("pid")?;
    let agent = attested_agent(server, admin).await?;
    let parent = agent.id.clone().context("agent id")?.to_string();
    let t = Instant::now();
    create_many(admin, &parent, "bulk", N).await?;
    let create_time = t.elapsed();
    let rss_before = rss_kib(pid, "VmRSS:");
    let mut client = agent.client().await?;
    let t = Instant::now();
    let mut stream = client
        .sync_entries(pb::SyncEntriesRequest {})
        .await?
        .into_inner();
    let mut got = 0;
    let mut messages = 0;
    loop {
        let m = stream.message().await?.context("stream ended")?;
        got += m.entries.len();
        messages += 1;
        if m.snapshot_complete {
            break;
        }
    }
    let sync_time = t.elapsed();
    anyhow::ensure!(got == N, "synced {got} of {N}");
    let peak = rss_kib(pid, "VmHWM:");
    rows.push([
        format!("Creating {N} entries (batches of 1 000, admin API)"),
        format!("{:.2} s", create_time.as_secs_f64()),
        format!("{:.0} entries/s", N as f64 / create_time.as_secs_f64()),
    ]);
    rows.push([
        format!("Fresh agent full sync of {N} entries"),
        format!("{:.2} s", sync_time.as_secs_f64()),
        format!("{messages} messages of ≤ 1 000 entries"),
    ]);
    rows.push([
        "Server RSS before the sync / peak (VmHWM) after".into(),
        format!(
            "{:.1} MiB / {:.1} MiB",
            rss_before as f64 / 1024.0,
            peak as f64 / 1024.0
        ),
        String::new(),
    ]);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; a filter argument is not supported, every benchmark runs.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut rows: Vec<[String; 3]> = Vec::new();
        // SIGIL_BENCH=signing,propagation,sync selects a subset (default: all).
        let only = std::env::var("SIGIL_BENCH").unwrap_or_default();
        let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
        if want("signing") {
            let server = ServerProcess::start(&["--log-level", "warn"])?;
            let admin = admin_channel(&server.admin_socket).await?;
            bench_signing(&server, &admin, &mut rows).await?;
        }
        if want("propagation") {
            let server = ServerProcess::start(&["--log-level", "warn"])?;
            let admin = admin_channel(&server.admin_socket).await?;
            bench_propagation(&server, &admin, &mut rows).await?;
        }
        if want("sync") {
            let server = ServerProcess::start(&["--log-level", "warn"])?;
            let admin = admin_channel(&server.admin_socket).await?;
            bench_full_sync(&server, &admin, &mut rows).await?;
        }
        println!("| benchmark | result | note |");
        println!("| --- | --- | --- |");
        for r in rows {
            println!("| {} | {} | {} |", r[0], r[1], r[2]);
        }
        Ok(())
    })
}
