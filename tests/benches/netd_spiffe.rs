//! Entry created on the server → the endpoint's new identity enforced in the kernel (root): real
//! server, agent and netd (spiffe mode); per sample an endpoint in classic-fallback, then
//! `sigil entry create` for its selectors, timed until the pinned IPCache holds the endpoint's
//! new identity (the last write of an identity move, after every policy map knows it). Baseline
//! in the same run: the same `sigil entry create` for an entry that selects nothing.
//!
//! `cargo bench -p sigil-e2e --bench netd_spiffe` (uses `target/<profile>/sigil`, or `SIGIL_BIN`);
//! `SAMPLES=N` (default 40).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use sigil_datapath::Maps;
use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess};

type Res<T> = anyhow::Result<T>;

const TD: &str = "identity.example.com";

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
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("netd_spiffe bench skipped: needs root");
        return Ok(());
    }
    let samples: usize = std::env::var("SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let server = ServerProcess::start(&[])?;
    let delegate = format!("spiffe://{TD}/netd");
    let agent = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let parent = format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().unwrap_or_default()
    );
    entry(&server, &parent, &delegate, &["unix:uid:0"])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    {
        let _in = rt.enter();
        let client = sigil_delegated_client::Client::new(&agent.admin_socket);
        let start = Instant::now();
        while rt.block_on(client.check()).is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "no delegate");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
            pct(v, 0.5).as_secs_f64() * 1e3,
            pct(v, 0.99).as_secs_f64() * 1e3,
            v.len()
        );
    }
    Ok(())
}
