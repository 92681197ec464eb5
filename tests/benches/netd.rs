//! sigil-netd benchmarks (root), side by side in one run: iperf3 throughput and TCP
//! request/response latency between two endpoints with no datapath, with sigil (10 and
//! 100 000 identities in the IPCache and policy map), and with nftables rules doing the same
//! job (1 000 and 10 000 rules); `policy import` latency; netd memory per endpoint.
//!
//! `cargo bench -p sigil-e2e --bench netd` (uses `target/release/sigil`, or `SIGIL_BIN`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigil_datapath::netns::{self, EndpointSpec};
use sigil_datapath::{Direction, Maps, PROTO_TCP, PolicyEntry, PolicyKey};
use sigil_test_util::{NetdProcess, sigil_bin};

type Res<T> = anyhow::Result<T>;

struct Pair {
    client_ns: String,
    server_ip: String,
}

struct Kids(Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn servers(kids: &mut Kids, netns: &str) -> Res<()> {
    kids.0.push(
        Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    kids.0.push(
        Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(sigil_bin())
            .args(["netd", "echo-server", "--bind", "0.0.0.0:7000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// iperf3 throughput in Gbit/s (3 s, one stream).
fn throughput(p: &Pair) -> Res<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p.client_ns,
            "iperf3",
            "-c",
            &p.server_ip,
            "-p",
            "5201",
        ])
        .args(["-t", "3", "-J"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(bps / 1e9)
}

/// TCP request/response: 64-byte ping-pongs on one connection; (p50, p99) in µs.
fn rr(p: &Pair) -> Res<(f64, f64)> {
    let path = format!("/run/netns/{}", p.client_ns);
    let target = format!("{}:7000", p.server_ip);
    let mut s = std::thread::spawn(move || -> Res<TcpStream> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpStream::connect(&target)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread"))??;
    s.set_nodelay(true)?;
    let buf = [7u8; 64];
    let mut back = [0u8; 64];
    let mut lat = Vec::new();
    for i in 0..5200 {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut back)?;
        if i >= 200 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

fn row(name: &str, p: &Pair, base: Option<f64>) -> Res<f64> {
    let gbps = throughput(p)?;
    let (p50, p99) = rr(p)?;
    let ratio = base.map_or(String::new(), |b| format!("{:.2} ×", gbps / b));
    println!("| {name} | {gbps:.2} Gbit/s | {ratio} | {p50:.0} µs / {p99:.0} µs |");
    Ok(gbps)
}

fn nft(script: &str) -> Res<()> {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    c.stdin
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("stdin"))?
        .write_all(script.as_bytes())?;
    anyhow::ensure!(c.wait()?.success(), "nft failed");
    Ok(())
}

/// nftables doing the job of the policy: `n` source-address rules on the forward hook, the
/// client's rule last (the worst case of a linear chain), then drop.
fn nft_rules(n: u32, client: &str, server: &str) -> Res<()> {
    let mut s = String::from(
        "table inet sigilbench {\n chain sigilfwd {\n  type filter hook forward priority 0; policy accept;\n  ct state established,related accept\n",
    );
    for i in 0..n.saturating_sub(1) {
        let a = Ipv4Addr::from(0x0b00_0000 + i);
        s.push_str(&format!(
            "  ip saddr {a} ip daddr {server} tcp dport {{ 5201, 7000 }} accept\n"
        ));
    }
    s.push_str(&format!(
        "  ip saddr {client} ip daddr {server} tcp dport {{ 5201, 7000 }} accept\n  ip daddr {server} drop\n }}\n}}\n"
    ));
    let _ = nft("delete table inet sigilbench\n");
    nft(&s)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("netd bench skipped: needs root");
        return Ok(());
    }
    println!("| setup | throughput | vs no datapath | RR p50 / p99 |\n| --- | --- | --- | --- |");
    // No datapath: two plain endpoints (same plumbing, nothing attached).
    let names = ["bnc", "bns"];
    netns::blackhole_route("10.233.0.0/24")?;
    let plain = (|| -> Res<()> {
        let c = netns::create_endpoint(&EndpointSpec {
            name: names[0].into(),
            ipv4: Some(Ipv4Addr::new(10, 233, 0, 2)),
            ipv6: None,
        })?;
        let s = netns::create_endpoint(&EndpointSpec {
            name: names[1].into(),
            ipv4: Some(Ipv4Addr::new(10, 233, 0, 3)),
            ipv6: None,
        })?;
        let mut kids = Kids(Vec::new());
        servers(&mut kids, &s.netns)?;
        let p = Pair {
            client_ns: c.netns.clone(),
            server_ip: "10.233.0.3".into(),
        };
        let base = row("no datapath", &p, None)?;
        BASE.with(|b| b.set(base));
        for n in [1_000, 10_000] {
            nft_rules(n, "10.233.0.2", "10.233.0.3")?;
            row(&format!("nftables, {n} rules"), &p, Some(base))?;
        }
        let _ = nft("delete table inet sigilbench\n");
        Ok(())
    })();
    for n in names {
        let _ = netns::delete_endpoint(n);
    }
    let _ = netns::remove_blackhole_route("10.233.0.0/24");
    plain?;
    let base = BASE.with(std::cell::Cell::get);

    let netd = NetdProcess::start("bench", 234, 0)?;
    let ep = |name: &str, app: &str| -> Res<serde_json::Value> {
        Ok(serde_json::from_str(&netd.cli_ok(&[
            "endpoint",
            "create",
            name,
            "--labels",
            &format!("app={app}"),
        ])?)?)
    };
    let c = ep("bc", "client")?;
    let s = ep("bs", "server")?;
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"5201\", protocol: TCP}, {port: \"7000\", protocol: TCP}]}]\n";
    let file = netd.root.path().join("p.yaml");
    std::fs::write(&file, policy)?;
    netd.cli_ok(&["policy", "import", &file.display().to_string()])?;
    for i in 0..8 {
        ep(&format!("bx{i}"), &format!("x{i}"))?;
    }
    let mut kids = Kids(Vec::new());
    servers(&mut kids, s["netns_name"].as_str().unwrap_or_default())?;
    let p = Pair {
        client_ns: c["netns_name"].as_str().unwrap_or_default().to_owned(),
        server_ip: s["ipv4"].as_str().unwrap_or_default().to_owned(),
    };
    row("sigil, 10 identities", &p, Some(base))?;
    {
        // 100 000 more identities: IPCache /32s outside the pod CIDR and allow entries in the
        // server's map, written straight into the pinned maps.
        let mut maps = Maps::open_pinned(&netd.pin_dir)?;
        let sid = u32::try_from(s["endpoint_id"].as_u64().unwrap_or(0))?;
        let mut entries = Vec::new();
        for i in 0..100_000u32 {
            let id = 1000 + i;
            maps.ipcache
                .upsert(IpAddr::V4(Ipv4Addr::from(0x0c00_0000 + i)), 32, id)?;
            entries.push((
                PolicyKey {
                    identity: id,
                    direction: Direction::Ingress,
                    protocol: PROTO_TCP,
                    port: 7000,
                    port_prefix_len: 16,
                },
                PolicyEntry {
                    deny: false,
                    l7_redirect: false,
                    auth_required: false,
                    rule_cookie: 0,
                },
            ));
        }
        maps.policy.upsert_policy(sid, &entries)?;
    }
    row("sigil, 100 000 identities", &p, Some(base))?;

    // policy import returning → enforced: the RPC writes the maps before it returns, so the
    // figure is the whole import round trip (CLI process excluded: gRPC from here).
    let mut lat = Vec::new();
    for i in 0..50 {
        let port = 10_000 + i;
        let doc = policy
            .replace("name: server", &format!("name: p{i}"))
            .replace("7000", &port.to_string());
        std::fs::write(&file, doc)?;
        let t = Instant::now();
        netd.cli_ok(&["policy", "import", &file.display().to_string()])?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "\npolicy import (CLI process + RPC + compile + map writes), 50 imports: p50 {:.1} ms, p99 {:.1} ms",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    let pid = netd.child.as_ref().map_or(0, std::process::Child::id);
    let before = rss_kib(pid);
    let n = 40;
    for i in 0..n {
        ep(&format!("bm{i}"), "mem")?;
    }
    let after = rss_kib(pid);
    println!(
        "netd RSS {before} KiB → {after} KiB after {n} endpoints: {:.1} KiB per endpoint",
        (after.saturating_sub(before)) as f64 / f64::from(n)
    );
    status_during_import(&netd, &file)
}

/// Opens a gRPC channel to netd's API socket.
async fn dial(socket: &std::path::Path) -> Res<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    Ok(tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?)
}

/// `n` `GetStatus` calls, each on its own connection as a CLI call makes one, 20 ms apart,
/// while `busy` says to go on (`None`: all `n`); latencies in ms.
async fn status_calls(
    socket: &std::path::Path,
    n: usize,
    busy: Option<&std::sync::atomic::AtomicBool>,
) -> Res<Vec<f64>> {
    use sigil_proto::netd::v1 as pb;
    let mut lat = Vec::new();
    while lat.len() < n && busy.is_none_or(|b| b.load(std::sync::atomic::Ordering::SeqCst)) {
        let t = Instant::now();
        let mut c = pb::status_client::StatusClient::new(dial(socket).await?);
        let r = c.get_status(pb::GetStatusRequest {}).await?;
        drop(r);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(lat)
}

fn p(lat: &mut [f64], q: usize) -> f64 {
    lat.sort_by(f64::total_cmp);
    lat.get((lat.len() * q / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// `netd status` latency while a 20 000-CIDR policy import compiles and is written (issue 9),
/// beside the same calls on an idle netd.
fn status_during_import(netd: &NetdProcess, file: &std::path::Path) -> Res<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut idle = rt.block_on(status_calls(&netd.api_socket, 50, None))?;
    let cidrs: String = (0..20_000u32)
        .map(|i| format!("    - cidr: 11.{}.{}.0/24\n", i / 256, i % 256))
        .collect();
    let doc = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: cidrs20k\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  egress:\n  - toCIDRSet:\n{cidrs}"
    );
    std::fs::write(file, doc)?;
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let importer = {
        let busy = std::sync::Arc::clone(&busy);
        let sigil = sigil_bin();
        let (file, socket) = (file.to_path_buf(), netd.api_socket.clone());
        std::thread::spawn(move || -> Res<f64> {
            let t = Instant::now();
            let out = Command::new(sigil)
                .args(["policy", "import"])
                .arg(&file)
                .arg("--api-socket")
                .arg(&socket)
                .output()?;
            busy.store(false, std::sync::atomic::Ordering::SeqCst);
            anyhow::ensure!(
                out.status.success(),
                "20 000-CIDR import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(t.elapsed().as_secs_f64())
        })
    };
    // Give the import a moment to reach the compiler.
    std::thread::sleep(Duration::from_millis(200));
    let mut during = rt.block_on(status_calls(&netd.api_socket, 50, Some(&busy)))?;
    let still_busy = busy.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "\nnetd status (gRPC, new connection per call), idle: p50 {:.1} ms, p99 {:.1} ms ({} calls)",
        p(&mut idle, 50),
        p(&mut idle, 99),
        idle.len()
    );
    println!(
        "netd status during a 20 000-CIDR import: p50 {:.1} ms, p99 {:.1} ms ({} calls{})",
        p(&mut during, 50),
        p(&mut during, 99),
        during.len(),
        if still_busy {
            ", all while the import ran"
        } else {
            ", the import ended first"
        }
    );
    let import_s = importer
        .join()
        .map_err(|_| anyhow::anyhow!("import thread panicked"))??;
    println!("20 000-CIDR import (CLI round trip): {import_s:.1} s");
    Ok(())
}

thread_local! {
    static BASE: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}
