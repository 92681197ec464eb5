//! sigil-netd in identity mode `spiffe` (root): real server, agent and netd.
//!
//! 1. `latency`: entry created on the server → the endpoint's new identity enforced in the
//!    kernel. Per sample an endpoint in classic-fallback, then `sigil entry create` for its
//!    selectors, timed until the pinned IPCache holds the endpoint's new identity (the last
//!    write of an identity move, after every policy map knows it). Baseline in the same run:
//!    the same `sigil entry create` for an entry that selects nothing. `SAMPLES=N` (default 40).
//! 2. `scale`: `ENDPOINTS` endpoints (default 1000) on one node, each with its own SPIFFE ID
//!    (one registration entry per endpoint, created before the endpoints): endpoint creation
//!    (gRPC `CreateEndpoint`, one at a time), time until every endpoint is enforced with its
//!    SPIFFE identity (a poller watches the pinned IPCache; at the end every endpoint must be
//!    `registered` with its own SPIFFE ID and its IPCache entry its identity), and netd and
//!    agent RSS. Baseline in the same run: the same endpoints on a netd in identity mode
//!    `classic` (no agent).
//!
//! `cargo bench -p sigil-e2e --bench netd_spiffe` (uses `target/<profile>/sigil`, or `SIGIL_BIN`);
//! `SIGIL_BENCH=latency|scale` runs one part.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_datapath::Maps;
use sigil_proto::admin::v1 as apb;
use sigil_proto::netd::v1 as npb;
use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess};

type Res<T> = anyhow::Result<T>;

const TD: &str = "identity.example.com";

fn env_num(name: &str, default: usize) -> Res<usize> {
    match std::env::var(name) {
        Ok(v) => {
            v.parse().ok().filter(|n| *n > 0).with_context(|| {
                format!("{name}: invalid value {v:?}: expected a positive integer")
            })
        }
        Err(_) => Ok(default),
    }
}

fn want(part: &str) -> bool {
    std::env::var("SIGIL_BENCH").map_or(true, |v| v.split(',').any(|p| p.trim() == part))
}

fn entry(server: &ServerProcess, parent: &str, id: &str, selectors: &[&str]) -> Res<()> {
    let mut args = vec!["entry", "create", "--spiffe-id", id, "--parent-id", parent];
    for s in selectors {
        args.extend(["--selector", s]);
    }
    let out = server.cli(&args)?;
    anyhow::ensure!(
        out.status.success(),
        "entry create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_kib(child: Option<&std::process::Child>) -> u64 {
    let Some(pid) = child.map(std::process::Child::id) else {
        return 0;
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A server, an agent that authorizes `spiffe://<td>/netd` as a delegate, that delegate's entry
/// (uid 0), and the agent's parent ID; returns once the Delegated Identity API answers.
fn server_and_agent(rt: &tokio::runtime::Runtime) -> Res<(ServerProcess, AgentProcess, String)> {
    let server = ServerProcess::start(&["--log-level", "warn"])?;
    let delegate = format!("spiffe://{TD}/netd");
    let agent = AgentProcess::start(
        &server,
        &["--authorized-delegate", &delegate, "--log-level", "warn"],
    )?;
    let parent = format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().unwrap_or_default()
    );
    entry(&server, &parent, &delegate, &["unix:uid:0"])?;
    let _in = rt.enter();
    let client = sigil_delegated_client::Client::new(&agent.admin_socket);
    let start = Instant::now();
    while rt.block_on(client.check()).is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the agent never authorized netd as a delegate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, agent, parent))
}

fn latency(samples: usize) -> Res<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (server, agent, parent) = server_and_agent(&rt)?;
    let socket = agent.admin_socket.display().to_string();
    let netd = NetdProcess::start_with(
        None,
        "bspiffe",
        221,
        1,
        &[
            "--agent-socket",
            &socket,
            "--identity-fallback-wait",
            "100ms",
        ],
    )?;
    let maps = Maps::open_pinned(&netd.pin_dir)?;
    let mut base = Vec::new();
    let mut moved = Vec::new();
    for i in 0..samples {
        let name = format!("bs{}x{i}", std::process::id() % 100_000);
        let app = format!("s{i}");
        let out = netd.cli_ok(&[
            "endpoint",
            "create",
            &name,
            "--labels",
            &format!("app={app}"),
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let ip: IpAddr = v["ipv4"].as_str().unwrap_or_default().parse()?;
        // Wait for classic-fallback (no entry yet).
        let start = Instant::now();
        let classic = loop {
            let v: serde_json::Value =
                serde_json::from_str(&netd.cli_ok(&["endpoint", "get", &name])?)?;
            if v["spiffe_id_source"] == "classic-fallback" {
                break maps.ipcache.lookup(ip)?;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no fallback");
            std::thread::sleep(Duration::from_millis(5));
        };
        let t = Instant::now();
        entry(
            &server,
            &parent,
            &format!("spiffe://{TD}/nothing{i}"),
            &["k8s:pod-label:app:none-such"],
        )?;
        base.push(t.elapsed());
        let label = format!("k8s:pod-label:app:{app}");
        let t = Instant::now();
        entry(
            &server,
            &parent,
            &format!("spiffe://{TD}/{app}"),
            &["k8s:ns:default", &label],
        )?;
        loop {
            let now = maps.ipcache.lookup(ip)?;
            if now != classic && now.is_some() {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "never enforced");
            std::hint::spin_loop();
        }
        moved.push(t.elapsed());
        netd.cli_ok(&["endpoint", "delete", &name])?;
    }
    base.sort();
    moved.sort();
    println!("| measure | p50 | p99 | samples |\n| --- | --- | --- | --- |");
    for (what, v) in [
        ("entry create → new identity in the kernel IPCache", &moved),
        ("baseline: `sigil entry create` (CLI, no match)", &base),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {} |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            v.len()
        );
    }
    Ok(())
}

/// A netd with pod CIDRs `10.<a>.8.0/21` (2 046 addresses) and `fd00:<a>08::/64` and `extra`
/// flags; cleaned up (namespaces, veths, pins, routes) by [`NetdProcess`]'s drop.
fn big_netd(tag: &str, a: u8, extra: &[&str]) -> Res<NetdProcess> {
    let root = tempfile::tempdir()?;
    let mut n = NetdProcess {
        child: None,
        api_socket: root.path().join("run").join("netd.sock"),
        state_dir: root.path().join("state"),
        policy_dir: root.path().join("policies"),
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/sigil-e2e-{}-{tag}",
            std::process::id()
        )),
        pod_cidr: format!("10.{a}.8.0/21"),
        pod_cidr_v6: format!("fd00:{a:x}08::/64"),
        log: root.path().join("netd.log"),
        netns: None,
        extra_args: extra.iter().map(|s| (*s).to_owned()).collect(),
        node_name: "bench".into(),
        root,
    };
    std::fs::create_dir_all(&n.policy_dir)?;
    n.spawn()?;
    Ok(n)
}

/// What one scale run measured.
struct Scale {
    /// Per `CreateEndpoint` call.
    create: Vec<Duration>,
    /// First create called → last create returned.
    create_all: Duration,
    /// First create called → every endpoint enforced with its final identity.
    enforced_all: Duration,
    /// Last create returned → every endpoint enforced.
    after_last_create: Duration,
    /// Per endpoint: its create returned → its final identity in the IPCache.
    per_endpoint: Vec<Duration>,
    netd_rss: (u64, u64),
    agent_rss: Option<(u64, u64)>,
}

/// Creates `n` endpoints `<prefix><i>` (labels `app=<prefix><i>`) one at a time over gRPC
/// while a poller thread watches the pinned IPCache for each endpoint's address to hold a
/// non-reserved identity; then checks that every endpoint holds what `want_source` says
/// (`registered` with `spiffe://<td>/ep/<i>`, or `classic`) and that the identity the poller
/// saw first is the endpoint's final one (no detour through classic-fallback).
fn scale_run(
    rt: &tokio::runtime::Runtime,
    netd: &NetdProcess,
    agent: Option<&AgentProcess>,
    n: usize,
    prefix: &str,
    want_source: &str,
) -> Res<Scale> {
    let netd_before = rss_kib(netd.child.as_ref());
    let agent_before = agent.map(|a| rss_kib(a.child.as_ref()));
    let (tx, rx) = mpsc::channel::<(usize, IpAddr, Instant)>();
    let pin_dir = netd.pin_dir.clone();
    // Poller: (index, time its identity first showed, that identity).
    let poller = std::thread::spawn(move || -> Res<Vec<(usize, Instant, u32)>> {
        let maps = Maps::open_pinned(&pin_dir)?;
        let mut pending: Vec<(usize, IpAddr)> = Vec::new();
        let mut seen = Vec::new();
        let mut open = true;
        let mut last_progress = Instant::now();
        while open || !pending.is_empty() {
            loop {
                match rx.try_recv() {
                    Ok((i, ip, _)) => pending.push((i, ip)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let now = Instant::now();
            let before = pending.len();
            let mut err = None;
            pending.retain(|(i, ip)| match maps.ipcache.lookup(*ip) {
                // Reserved identities (1-255: world, init, ...) are not the endpoint's own.
                Ok(Some(id)) if id >= 256 => {
                    seen.push((*i, now, id));
                    false
                }
                Ok(_) => true,
                Err(e) => {
                    err = Some(e);
                    true
                }
            });
            if let Some(e) = err {
                return Err(e.into());
            }
            if pending.len() != before {
                last_progress = now;
            }
            anyhow::ensure!(
                pending.is_empty() || last_progress.elapsed() < Duration::from_secs(60),
                "{} endpoints without an identity for 60 s",
                pending.len()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(seen)
    });
    let mut client = npb::endpoints_client::EndpointsClient::new(
        rt.block_on(sigil_e2e::admin_channel(&netd.api_socket))?,
    );
    let mut create = Vec::with_capacity(n);
    let mut returned = Vec::with_capacity(n);
    let mut ips = Vec::with_capacity(n);
    let t0 = Instant::now();
    let made = (|| -> Res<()> {
        for i in 0..n {
            let name = format!("{prefix}{i}");
            let t = Instant::now();
            let ep = rt
                .block_on(client.create_endpoint(npb::CreateEndpointRequest {
                    name: name.clone(),
                    labels: vec![format!("app={name}")],
                    // The create call itself is measured; the SVID's arrival separately.
                    no_wait: true,
                    ..Default::default()
                }))
                .with_context(|| format!("create endpoint {name}"))?
                .into_inner();
            let done = Instant::now();
            create.push(done - t);
            returned.push(done);
            let ip: IpAddr = ep
                .ipv4
                .parse()
                .with_context(|| format!("endpoint {name}: ipv4 {:?}", ep.ipv4))?;
            ips.push(ip);
            tx.send((i, ip, done))
                .map_err(|_| anyhow::anyhow!("the IPCache poller stopped"))?;
        }
        Ok(())
    })();
    drop(tx);
    let create_all = t0.elapsed();
    let seen = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))??;
    made?;
    anyhow::ensure!(seen.len() == n, "{} of {n} endpoints enforced", seen.len());
    let last_create = *returned.last().context("no endpoints")?;
    let last_seen = seen.iter().map(|s| s.1).max().context("none seen")?;
    let netd_after = rss_kib(netd.child.as_ref());
    let agent_after = agent.map(|a| rss_kib(a.child.as_ref()));

    // Every endpoint as wanted, its IPCache entry its identity, and that identity the first the
    // poller saw.
    // The listing reads the snapshot netd publishes after its kernel writes: wait for it.
    let wait = Instant::now();
    let list = loop {
        let list = rt
            .block_on(client.list_endpoints(npb::ListEndpointsRequest {}))?
            .into_inner();
        let behind = list
            .endpoints
            .iter()
            .filter(|e| e.name.starts_with(prefix) && e.spiffe_id_source != want_source)
            .count();
        if behind == 0 || wait.elapsed() > Duration::from_secs(10) {
            break list;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let maps = Maps::open_pinned(&netd.pin_dir)?;
    let mut first = vec![0u32; n];
    let mut per_endpoint = vec![Duration::ZERO; n];
    for (i, at, id) in &seen {
        first[*i] = *id;
        per_endpoint[*i] = at.saturating_duration_since(returned[*i]);
    }
    let mut checked = 0;
    for ep in &list.endpoints {
        let Some(i) = ep
            .name
            .strip_prefix(prefix)
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|i| *i < n)
        else {
            continue;
        };
        anyhow::ensure!(
            ep.spiffe_id_source == want_source,
            "endpoint {}: spiffe_id_source {:?}, want {want_source:?}",
            ep.name,
            ep.spiffe_id_source
        );
        if want_source == "registered" {
            let id = format!("spiffe://{TD}/ep/{i}");
            anyhow::ensure!(
                ep.spiffe_id.as_deref() == Some(id.as_str()),
                "endpoint {}: SPIFFE ID {:?}, want {id}",
                ep.name,
                ep.spiffe_id
            );
        }
        let kernel = maps.ipcache.lookup(ips[i])?;
        anyhow::ensure!(
            kernel == Some(ep.identity) && first[i] == ep.identity,
            "endpoint {}: identity {}, IPCache {kernel:?}, first seen {}",
            ep.name,
            ep.identity,
            first[i]
        );
        checked += 1;
    }
    anyhow::ensure!(checked == n, "{checked} of {n} endpoints listed");
    Ok(Scale {
        create,
        create_all,
        enforced_all: last_seen - t0,
        after_last_create: last_seen.saturating_duration_since(last_create),
        per_endpoint,
        netd_rss: (netd_before, netd_after),
        agent_rss: agent_before.zip(agent_after),
    })
}

fn scale(n: usize) -> Res<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Baseline: identity mode classic, no agent.
    let classic = {
        let netd = big_netd("bscalec", 222, &["--log-level", "warn"])?;
        scale_run(&rt, &netd, None, n, "bcl", "classic")?
    };
    let (server, agent, parent) = server_and_agent(&rt)?;
    // One entry per endpoint, in batches of 1 000 over the admin API.
    let t = Instant::now();
    let mut entries = apb::entries_client::EntriesClient::new(
        rt.block_on(sigil_e2e::admin_channel(&server.admin_socket))?,
    );
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| apb::Entry {
                spiffe_id: format!("spiffe://{TD}/ep/{i}"),
                parent_id: parent.clone(),
                selectors: vec![
                    apb::Selector {
                        r#type: "k8s".into(),
                        value: "ns:default".into(),
                    },
                    apb::Selector {
                        r#type: "k8s".into(),
                        value: format!("pod-label:app:bsp{i}"),
                    },
                ],
                ..Default::default()
            })
            .collect();
        rt.block_on(entries.batch_create_entry(apb::BatchCreateEntryRequest { entries: batch }))?;
    }
    let entries_took = t.elapsed();
    let socket = agent.admin_socket.display().to_string();
    let netd = big_netd(
        "bscales",
        223,
        &["--agent-socket", &socket, "--log-level", "warn"],
    )?;
    let spiffe = scale_run(&rt, &netd, Some(&agent), n, "bsp", "registered")?;

    println!(
        "\n{n} endpoints on one node (entries for all {n} created first: {:.2} s in batches of 1 000)\n",
        entries_took.as_secs_f64()
    );
    println!(
        "| measurement | identity mode classic (baseline) | identity mode spiffe |\n| --- | --- | --- |"
    );
    let row = |what: &str, f: &dyn Fn(&Scale) -> String| {
        println!("| {what} | {} | {} |", f(&classic), f(&spiffe));
    };
    row(
        &format!("all {n} created (first call → last returned)"),
        &|s: &Scale| format!("{:.2} s", s.create_all.as_secs_f64()),
    );
    row("`CreateEndpoint` p50 / p99", &|s: &Scale| {
        let mut v = s.create.clone();
        v.sort();
        format!("{:.1} / {:.1} ms", ms(pct(&v, 0.5)), ms(pct(&v, 0.99)))
    });
    row(
        &format!(
            "all {n} enforced with their final identity (first call → last seen in the IPCache)"
        ),
        &|s: &Scale| format!("{:.2} s", s.enforced_all.as_secs_f64()),
    );
    row("last create returned → all enforced", &|s: &Scale| {
        format!("{:.1} ms", ms(s.after_last_create))
    });
    row(
        "per endpoint: create returned → identity in the IPCache, p50 / p99 / max",
        &|s: &Scale| {
            let mut v = s.per_endpoint.clone();
            v.sort();
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                ms(pct(&v, 0.5)),
                ms(pct(&v, 0.99)),
                ms(pct(&v, 1.0))
            )
        },
    );
    let per = |(a, b): (u64, u64)| {
        format!(
            "{:.1} → {:.1} MiB ({:.1} KiB per endpoint)",
            a as f64 / 1024.0,
            b as f64 / 1024.0,
            b.saturating_sub(a) as f64 / n as f64
        )
    };
    row("netd VmRSS before → after", &|s: &Scale| per(s.netd_rss));
    row("agent VmRSS before → after", &|s: &Scale| {
        s.agent_rss.map_or("no agent".into(), &per)
    });
    drop(netd);
    drop(agent);
    drop(server);
    Ok(())
}

fn main() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("netd_spiffe bench skipped: needs root");
        return Ok(());
    }
    if want("latency") {
        latency(env_num("SAMPLES", 40)?)?;
    }
    if want("scale") {
        scale(env_num("ENDPOINTS", 1000)?)?;
    }
    Ok(())
}
