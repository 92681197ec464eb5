//! Hubble event pipeline benchmarks (root), printed as Markdown for docs/benchmarks.md.
//!
//! 1. `pipeline`: datapath events → flows. A client endpoint sends UDP datagrams at a fixed rate to
//!    a port of a server endpoint that the server's policy does not allow (default deny: one drop
//!    event per datagram, from the kernel's ring buffer to netd's flow ring). For each offered
//!    rate: datagrams sent, flows netd recorded (`ServerStatus.seen_flows` delta), events the
//!    kernel lost (netd's lost-event counter delta), whether `flows + lost = events` exactly, and
//!    netd's CPU time (utime + stime from /proc) per 100 000 flows. Then the same with the flow
//!    exporter on (JSON lines to a file, a queue of 65 536), with its exported/dropped counters.
//! 2. `getflows`: `GetFlows` with `number = 10000` and a filter over a full ring
//!    (`--hubble-max-flows 65536`), latency from the call to the last flow received, for a filter
//!    every flow matches and one that matches none (the whole ring is scanned).
//!
//! `cargo bench -p sigil-e2e --bench observe` (uses `target/release/sigil`, or `SIGIL_BIN`).
//! Environment: `SIGIL_BENCH=pipeline|getflows` (default both), `RATES` (comma-separated
//! datagrams/s, default `25000,50000,100000,150000,200000,0`; 0 = as fast as one sender can),
//! `SECS` (seconds per rate, default 3).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;
use sigil_proto::observer::observer_client::ObserverClient;
use sigil_test_util::netns::in_netns;
use sigil_test_util::{NetdProcess, sigil_bin};
use tonic::transport::{Channel, Endpoint, Uri};

type Res<T> = anyhow::Result<T>;

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n";

struct Ep {
    netns: String,
    ip: String,
}

fn create(netd: &NetdProcess, name: &str, labels: &str) -> Res<Ep> {
    let out = netd.cli_ok(&["endpoint", "create", name, "--labels", labels])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(Ep {
        netns: v["netns_name"].as_str().unwrap_or_default().to_owned(),
        ip: v["ipv4"].as_str().unwrap_or_default().to_owned(),
    })
}

async fn observer(path: PathBuf) -> Res<ObserverClient<Channel>> {
    let ch = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(ObserverClient::new(ch).max_decoding_message_size(64 << 20))
}

/// utime + stime of `pid`, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

struct Counts {
    seen: u64,
    lost: u64,
    exported: u64,
    dropped: u64,
    /// Everything the exporter accounted for (written, dropped, failed, filtered out).
    export_done: u64,
}

fn counts(netd: &NetdProcess, rt: &tokio::runtime::Runtime, hubble: &Path) -> Res<Counts> {
    let st: Value = serde_json::from_str(&netd.cli_ok(&["netd", "status", "--output", "json"])?)?;
    let seen = rt.block_on(async {
        let mut c = observer(hubble.to_path_buf()).await?;
        Ok::<_, anyhow::Error>(
            c.server_status(opb::ServerStatusRequest {})
                .await?
                .into_inner()
                .seen_flows,
        )
    })?;
    Ok(Counts {
        seen,
        lost: st["lost_events"].as_u64().unwrap_or(0),
        exported: st["hubble_export"]["exported"].as_u64().unwrap_or(0),
        dropped: st["hubble_export"]["dropped"].as_u64().unwrap_or(0),
        export_done: ["exported", "dropped", "write_errors", "filtered_out"]
            .iter()
            .map(|k| st["hubble_export"][k].as_u64().unwrap_or(0))
            .sum(),
    })
}

/// Sends datagrams from `from` to `to:9999` at `rate` per second (0: unpaced) for `secs`;
/// returns how many the kernel accepted.
fn blast(from: &Ep, to: &str, rate: u64, secs: u64) -> Res<u64> {
    let ns = PathBuf::from("/run/netns").join(&from.netns);
    let to = format!("{to}:9999");
    in_netns(&ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(&to)?;
        let payload = [0u8; 16];
        let start = Instant::now();
        let end = Duration::from_secs(secs);
        let mut sent = 0u64;
        loop {
            let el = start.elapsed();
            if el >= end {
                break;
            }
            if rate > 0 {
                let due = (el.as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
                if sent >= due {
                    std::hint::spin_loop();
                    continue;
                }
            }
            if s.send(&payload).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    })
}

/// Waits until netd's counters stop moving (the reader drained the kernel's ring) and, with
/// the exporter on, until it accounted for every flow (written, dropped or filtered out).
fn settle(
    netd: &NetdProcess,
    rt: &tokio::runtime::Runtime,
    hubble: &Path,
    export: bool,
) -> Res<Counts> {
    let mut last = counts(netd, rt, hubble)?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = counts(netd, rt, hubble)?;
        let still = now.seen == last.seen && now.lost == last.lost;
        if still && (!export || now.export_done >= now.seen) {
            return Ok(now);
        }
        last = now;
    }
}

fn setup(tag: &str, b: u8, extra: &[&str]) -> Res<(NetdProcess, Ep, Ep)> {
    let netd = NetdProcess::start_with(None, tag, 228, b, extra)?;
    let client = create(&netd, &format!("{tag}-c"), "app=client")?;
    let server = create(&netd, &format!("{tag}-s"), "app=server")?;
    let file = netd.root.path().join("p.yaml");
    std::fs::write(&file, POLICY)?;
    netd.cli_ok(&["policy", "import", &file.display().to_string()])?;
    Ok((netd, client, server))
}

fn pipeline(rates: &[u64], secs: u64, export: bool) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("flows.log").display().to_string();
    let extra: Vec<&str> = if export {
        vec![
            "--hubble-export-file-path",
            &path,
            "--hubble-export-file-max-size-mb",
            "100",
            "--hubble-export-file-max-backups",
            "1",
        ]
    } else {
        vec![]
    };
    let (netd, client, server) =
        setup(if export { "bpx" } else { "bp" }, u8::from(export), &extra)?;
    let pid = netd.child.as_ref().context("netd pid")?.id();
    let rt = tokio::runtime::Runtime::new()?;
    let hubble = netd.api_socket.with_file_name("hubble.sock");
    println!(
        "\n### Event pipeline{} ({secs} s per rate)\n",
        if export { ", flow export on" } else { "" }
    );
    println!(
        "| offered/s | sent | sent/s | flows | kernel lost | flows + lost − sent | netd CPU ms / 100 000 flows |{}",
        if export {
            " exported | export dropped |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if export { "---|---|" } else { "" }
    );
    for &rate in rates {
        let before = settle(&netd, &rt, &hubble, export)?;
        let cpu0 = cpu_ticks(pid)?;
        let t = Instant::now();
        let sent = blast(&client, &server.ip, rate, secs)?;
        let took = t.elapsed();
        let after = settle(&netd, &rt, &hubble, export)?;
        let cpu = cpu_ticks(pid)? - cpu0;
        let flows = after.seen - before.seen;
        let lost = after.lost - before.lost;
        let per100k = if flows > 0 {
            format!("{:.0}", cpu as f64 * 10.0 * 100_000.0 / flows as f64)
        } else {
            "-".into()
        };
        let offered = if rate == 0 {
            "max".to_owned()
        } else {
            rate.to_string()
        };
        print!(
            "| {offered} | {sent} | {:.0} | {flows} | {lost} | {} | {per100k} |",
            sent as f64 / took.as_secs_f64(),
            i128::from(flows + lost) - i128::from(sent),
        );
        if export {
            print!(
                " {} | {} |",
                after.exported - before.exported,
                after.dropped - before.dropped
            );
        }
        println!();
    }
    Ok(())
}

fn getflows() -> Res<()> {
    let (netd, client, server) = setup("bg", 2, &["--hubble-max-flows", "65536"])?;
    let rt = tokio::runtime::Runtime::new()?;
    let hubble = netd.api_socket.with_file_name("hubble.sock");
    // Fill the ring (and more) at a rate it keeps up with.
    let mut rounds = 0;
    loop {
        blast(&client, &server.ip, 10_000, 1)?;
        let c = settle(&netd, &rt, &hubble, false)?;
        if c.seen >= 70_000 {
            break;
        }
        rounds += 1;
        if rounds > 60 {
            bail!("ring not full after {rounds} s: {} flows seen", c.seen);
        }
    }
    let req = |filter: fpb::FlowFilter| opb::GetFlowsRequest {
        number: 10_000,
        whitelist: vec![filter],
        ..Default::default()
    };
    let all = fpb::FlowFilter {
        destination_port: vec!["9999".into()],
        source_ip: vec![client.ip.clone()],
        ..Default::default()
    };
    let none_but_one = fpb::FlowFilter {
        destination_port: vec!["9999".into()],
        verdict: vec![fpb::Verdict::Forwarded as i32],
        ..Default::default()
    };
    println!("\n### GetFlows number=10000 over a full ring (65 536 flows)\n");
    println!("| filter | flows returned | median ms | min ms | max ms |");
    println!("|---|---|---|---|---|");
    for (name, f) in [
        ("dst port 9999 and src IP (every flow matches)", all),
        (
            "dst port 9999 and verdict FORWARDED (none matches: whole ring scanned)",
            none_but_one,
        ),
    ] {
        let mut times = Vec::new();
        let mut n = 0;
        for _ in 0..10 {
            let (t, got) = rt.block_on(async {
                let mut c = observer(hubble.clone()).await?;
                let t = Instant::now();
                let mut s = c.get_flows(req(f.clone())).await?.into_inner();
                let mut got = 0u64;
                while let Some(r) = s.message().await? {
                    if matches!(
                        r.response_types,
                        Some(opb::get_flows_response::ResponseTypes::Flow(_))
                    ) {
                        got += 1;
                    }
                }
                Ok::<_, anyhow::Error>((t.elapsed(), got))
            })?;
            times.push(t.as_secs_f64() * 1000.0);
            n = got;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {n} | {:.1} | {:.1} | {:.1} |",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    if !sigil_test_util::can_run_with_bpffs("the observe benchmark") {
        return Ok(());
    }
    let which = std::env::var("SIGIL_BENCH").unwrap_or_else(|_| "pipeline,getflows".into());
    let rates: Vec<u64> = std::env::var("RATES")
        .unwrap_or_else(|_| "25000,50000,100000,150000,200000,0".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .with_context(|| format!("RATES: invalid value {r:?}"))
        })
        .collect::<Res<_>>()?;
    let secs: u64 = std::env::var("SECS")
        .ok()
        .map(|s| {
            s.parse()
                .with_context(|| format!("SECS: invalid value {s:?}"))
        })
        .transpose()?
        .unwrap_or(3);
    println!(
        "sigil binary: {}; {} CPUs",
        sigil_bin().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for w in which.split(',') {
        match w.trim() {
            "pipeline" => {
                pipeline(&rates, secs, false)?;
                pipeline(&rates, secs, true)?;
            }
            "getflows" => getflows()?,
            other => bail!("SIGIL_BENCH: invalid value {other:?}: pipeline or getflows"),
        }
    }
    Ok(())
}
