//! Cluster benchmarks (issue 11; root, etcd): real sigil-netds on the multi-node fixture.
//!
//! 1. Endpoint created on node A → its IPCache entry in node B's kernel map: p50/p99 over
//!    `SAMPLES` (default 50), beside the `sigil endpoint create` round trip on A alone.
//! 2. Cross-node TCP throughput (iperf3, `SECS` per sample, `ROUNDS` interleaved rounds) and
//!    request/response latency: endpoints on two nodes through VXLAN with an allow policy vs two
//!    plain namespaces on the same nodes routed over the underlay with no encapsulation and no
//!    datapath (at the underlay's MTU), and two more at sigil endpoints' MTU (the underlay's
//!    less VXLAN's 50 bytes), which separates what the smaller segments cost from what the
//!    datapath costs. `UNDERLAY_MTU` (default 1500) sets the underlay links' MTU (e.g. 9000,
//!    jumbo frames, as most cloud networks offer); netd derives its endpoints' MTU from it.
//! 3. Scale by simulation: writers publish `SIM_NODES` (default 1 000) nodes × `SIM_EPS`
//!    (default 100) endpoints into the cluster's etcd while 3 real nodes watch: etcd write rate,
//!    time until every real node's kernel IPCache holds the last entry written, netd RSS and CPU
//!    per 10 000 remote endpoints.
//!
//! `cargo bench -p sigil-e2e --bench cluster` (uses the `sigil` binary of the same profile, or
//! `SIGIL_BIN`); `ONLY=latency|throughput|scale` runs one part. The nodes run netd's
//! default carrier in cluster mode, `--tunnel vxlan` (source identity in the VNI).
//! `CONVERGE_SECS` (default 600) bounds the wait for the simulated entries; past it the part
//! reports how far each node got instead of failing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_identity::NumericIdentity;
use sigil_kvstore::{Cidr, ClusterAllocator, Config, KvStore, NodeInfo};
use sigil_labels::Labels;
use sigil_test_util::netns::in_netns;
use sigil_test_util::{TestCluster, wait_for};

#[path = "support/crossnode.rs"]
mod crossnode;
use crossnode::*;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn kernel_lookup(c: &TestCluster, node: usize, ip: IpAddr) -> Option<u32> {
    let maps = sigil_datapath::Maps::open_pinned(&c.nodes[node].netd.pin_dir).ok()?;
    maps.ipcache.lookup(ip).ok().flatten()
}

/// (VmRSS KiB, utime+stime ticks) of `pid`.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

fn netd_pid(c: &TestCluster, node: usize) -> u32 {
    c.nodes[node]
        .netd
        .child
        .as_ref()
        .map(|ch| ch.id())
        .unwrap_or(0)
}

// ---- 1. create on A → enforced on B ----

fn latency(c: &TestCluster) -> Res<()> {
    let samples = env_num("SAMPLES", 50);
    let (mut create, mut remote) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let name = format!("bl{}-{i}", std::process::id());
        let t0 = Instant::now();
        let out = c.nodes[0].netd.cli_ok(&[
            "endpoint",
            "create",
            &name,
            "--labels",
            &format!("app=lat{}", i % 5),
        ])?;
        let created = t0.elapsed();
        let v = json(&out);
        let ip: IpAddr = v["ipv4"].as_str().unwrap_or_default().parse()?;
        loop {
            if kernel_lookup(c, 1, ip).is_some_and(|id| id != NumericIdentity::INIT.get()) {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "{ip} never reached node 1"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        remote.push(t0.elapsed());
        create.push(created);
        c.nodes[0].netd.cli_ok(&["endpoint", "delete", &name])?;
    }
    create.sort();
    remote.sort();
    println!("| measurement ({samples} samples) | p50 | p99 |");
    println!("| --- | --- | --- |");
    println!(
        "| endpoint create on node A → identity in node B's kernel IPCache | {} | {} |",
        ms(pct(&remote, 0.5)),
        ms(pct(&remote, 0.99))
    );
    println!(
        "| baseline: the `sigil endpoint create` round trip on node A alone | {} | {} |",
        ms(pct(&create, 0.5)),
        ms(pct(&create, 0.99))
    );
    Ok(())
}

// ---- 2. throughput ----

fn throughput(c: &mut TestCluster, underlay_mtu: u32) -> Res<()> {
    let rounds = env_num("ROUNDS", 5);
    let secs = env_num("SECS", 3);
    let pid = std::process::id();
    // sigil: endpoints on nodes 0 and 1, an allow policy into the server.
    let mut ips = Vec::new();
    for (k, app) in [(0usize, "tp-client"), (1, "tp-server")] {
        let v = json(&c.nodes[k].netd.cli_ok(&[
            "endpoint",
            "create",
            &format!("tp{pid}-{k}"),
            "--labels",
            &format!("app={app}"),
        ])?);
        let ip: Ipv4Addr = v["ipv4"].as_str().unwrap_or_default().parse()?;
        ips.push((
            ip,
            std::path::PathBuf::from(v["netns"].as_str().unwrap_or_default()),
        ));
    }
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tp}\nspec:\n  endpointSelector: {matchLabels: {app: tp-server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: tp-client}}]\n";
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tp.yaml");
    std::fs::write(&file, policy)?;
    for n in &c.nodes {
        n.netd
            .cli_ok(&["policy", "import", file.to_str().unwrap_or_default()])?;
    }
    // Baseline: plain namespaces behind veths on the same two nodes, routed over the underlay.
    let a = c.topo.add_endpoint(0, Ipv4Addr::new(10, 254, 0, 1))?;
    let b = c.topo.add_endpoint(1, Ipv4Addr::new(10, 254, 1, 1))?;
    // The same again with the MTU sigil's endpoints get (the underlay's less VXLAN's 50
    // bytes): what the encapsulation's smaller segments cost by themselves, apart from the
    // datapath's work.
    let a_mtu = c.topo.add_endpoint(0, Ipv4Addr::new(10, 254, 0, 2))?;
    let b_mtu = c.topo.add_endpoint(1, Ipv4Addr::new(10, 254, 1, 2))?;
    let tunnel_mtu = underlay_mtu - sigil_datapath::tunnel::VXLAN_OVERHEAD;
    let n0 = c.topo.node(0)?.clone();
    let n1 = c.topo.node(1)?.clone();
    // Both ends of each veth (the endpoint's eth0, the node's side).
    for (ep, node, mtu) in [
        (&a, &n0, underlay_mtu),
        (&b, &n1, underlay_mtu),
        (&a_mtu, &n0, tunnel_mtu),
        (&b_mtu, &n1, tunnel_mtu),
    ] {
        for (ns, link) in [
            (&ep.netns, "eth0"),
            (&node.netns, ep.node_interface.as_str()),
        ] {
            let out = std::process::Command::new("ip")
                .args(["-n", ns, "link", "set", link, "mtu"])
                .arg(mtu.to_string())
                .output()?;
            anyhow::ensure!(out.status.success(), "mtu: {out:?}");
        }
    }
    for (node, peer, dst) in [
        (&n0, &n1, b.ip),
        (&n1, &n0, a.ip),
        (&n0, &n1, b_mtu.ip),
        (&n1, &n0, a_mtu.ip),
    ] {
        let out = node
            .command("ip")
            .args([
                "route",
                "replace",
                &format!("{dst}/32"),
                "via",
                &peer.underlay_ip.to_string(),
            ])
            .output()?;
        anyhow::ensure!(out.status.success(), "route: {out:?}");
    }
    let mut kids = Kids(Vec::new());
    iperf_server(&mut kids, &ips[1].1)?;
    iperf_server(&mut kids, &b.netns_path)?;
    iperf_server(&mut kids, &b_mtu.netns_path)?;
    echo_server(&ips[1].1, ips[1].0)?;
    echo_server(&b.netns_path, b.ip)?;
    echo_server(&b_mtu.netns_path, b_mtu.ip)?;
    let base_name = format!("plain routed, no datapath, MTU {underlay_mtu} (baseline)");
    let same_mtu = format!("plain routed, no datapath, MTU {tunnel_mtu} (sigil's endpoints')");
    let setups: [(&str, &Path, Ipv4Addr); 3] = [
        (&base_name, &a.netns_path, b.ip),
        (
            "sigil: endpoints + allow policy, VXLAN carrier (--tunnel vxlan)",
            &ips[0].1,
            ips[1].0,
        ),
        (&same_mtu, &a_mtu.netns_path, b_mtu.ip),
    ];
    // Wait until both paths carry traffic.
    for (what, ns, ip) in setups {
        wait_for(what, Duration::from_secs(20), || {
            Ok(rr(ns, SocketAddr::from((ip, 7000)), 1)
                .is_err()
                .then(|| "no echo".to_owned()))
        })?;
        wait_for(
            &format!("{what}: iperf3 server"),
            Duration::from_secs(20),
            || {
                let to = SocketAddr::from((ip, 5201));
                let up = in_netns(ns, move || {
                    Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
                })?;
                Ok((!up).then(|| "not listening".to_owned()))
            },
        )?;
    }
    let n = setups.len();
    let mut gbps = vec![Vec::new(); n];
    let mut lat = vec![Vec::new(); n];
    for r in 0..rounds {
        for k in 0..n {
            let k = (k + r) % n;
            let (_, ns, ip) = setups[k];
            gbps[k].push(iperf(ns, ip, secs)?);
            lat[k].extend(rr(ns, SocketAddr::from((ip, 7000)), 2000)?);
        }
    }
    println!(
        "| setup ({rounds} interleaved rounds × {secs} s) | Gbit/s median (min–max) | vs baseline | RR p50 / p99 |"
    );
    println!("| --- | --- | --- | --- |");
    let base = median(gbps[0].clone());
    for k in 0..n {
        let v = &gbps[k];
        let (lo, hi) = (
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        let m = median(v.clone());
        lat[k].sort();
        // Per-round ratios are shown by the medians; the spread says how far to trust them.
        println!(
            "| {} | {m:.2} ({lo:.2}–{hi:.2}) | {:.2} × | {:.0} / {:.0} µs |",
            setups[k].0,
            m / base,
            pct(&lat[k], 0.5).as_secs_f64() * 1e6,
            pct(&lat[k], 0.99).as_secs_f64() * 1e6
        );
    }
    // Each round's own ratio (the setups ran back to back in it): steadier than the ratio of
    // medians when the machine's speed drifts between rounds.
    let paired = |k: usize| median((0..rounds).map(|r| gbps[1][r] / gbps[k][r]).collect());
    println!(
        "\nsigil vs baseline, median of the {rounds} rounds' ratios: {:.2} ×; vs plain routing at \
         the same MTU: {:.2} ×",
        paired(0),
        paired(2)
    );
    for k in 0..2 {
        let _ = c.nodes[k]
            .netd
            .cli_ok(&["endpoint", "delete", &format!("tp{pid}-{k}")]);
    }
    Ok(())
}

// ---- 3. scale by simulation ----

/// How many simulated entries (172.16.0.0/12) node `k`'s kernel IPCache holds.
fn sim_entries(c: &TestCluster, k: usize) -> Res<usize> {
    let maps = sigil_datapath::Maps::open_pinned(&c.nodes[k].netd.pin_dir)?;
    Ok(maps
        .ipcache
        .entries()?
        .iter()
        .filter(|e| matches!(e.addr, IpAddr::V4(a) if a.octets()[0] == 172 && e.prefix_len == 32))
        .count())
}

/// One simulated node: its registry entry and `eps` endpoints, all under its own lease (as a
/// real netd publishes them). Returns the store (its lease must outlive the measurement).
async fn sim_node(
    endpoint: String,
    cluster: String,
    n: usize,
    eps: usize,
    ids: Arc<Vec<NumericIdentity>>,
) -> Res<KvStore> {
    let node_ip = Ipv4Addr::new(198, 18, (n / 250) as u8, (n % 250) as u8 + 1);
    let name = format!("sim{n}");
    let mut cfg = Config::new(vec![endpoint], &cluster, 1, &name, IpAddr::V4(node_ip));
    cfg.lease_ttl = Duration::from_secs(3600);
    cfg.request_timeout = Duration::from_secs(60);
    let s = KvStore::connect(cfg).await?;
    let net = Ipv4Addr::new(172, 16 + (n / 256) as u8, (n % 256) as u8, 0);
    s.publish_node(&NodeInfo {
        name,
        ip: IpAddr::V4(node_ip),
        pod_cidr_v4: Some(Cidr::new(IpAddr::V4(net), 24)?),
        pod_cidr_v6: None,
        spiffe_id: None,
        carrier_id: None,
    })
    .await?;
    let o = net.octets();
    for e in 0..eps {
        let ip = IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], (e % 254) as u8 + 1));
        s.publish_endpoint(ip, ids[(n + e) % ids.len()]).await?;
    }
    Ok(s)
}

fn scale(c: &TestCluster) -> Res<()> {
    let sim_nodes = env_num("SIM_NODES", 1000).clamp(1, 4096);
    let sim_eps = env_num("SIM_EPS", 100).clamp(1, 254);
    let limit = Duration::from_secs(env_num("CONVERGE_SECS", 600) as u64);
    let total = sim_nodes * sim_eps;
    // The simulated nodes' addresses (198.18.0.0/15) are made on-link on the real nodes, so
    // the direct routes netd installs towards them are valid (nothing is sent there).
    for k in 0..c.nodes.len() {
        let out = c
            .topo
            .node(k)?
            .command("ip")
            .args(["route", "replace", "198.18.0.0/15", "dev", "eth0"])
            .output()?;
        anyhow::ensure!(out.status.success(), "on-link route on node {k}: {out:?}");
    }
    let before: Vec<(u64, u64)> = (0..c.nodes.len()).map(|k| usage(netd_pid(c, k))).collect();
    let endpoint = c.etcd.endpoint();
    let cluster = c.name.clone();
    let underlay = c.topo.underlay_path();
    // The writers run in the underlay namespace (etcd listens on the bridge there); the
    // runtime is built on the thread that entered it, so its workers are in there too.
    in_netns(&underlay, || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stores, write_time) = rt.block_on(async {
            // 100 label sets, allocated once (as the first endpoint of each would be).
            let cfg = Config::new(
                vec![endpoint.clone()],
                &cluster,
                1,
                "sim-alloc",
                IpAddr::V4(Ipv4Addr::new(198, 19, 255, 254)),
            );
            let store = KvStore::connect(cfg).await?;
            let alloc = ClusterAllocator::new(&store);
            alloc.wait_synced().await;
            let mut ids = Vec::new();
            for k in 0..100 {
                let labels: Labels = format!("k8s:app=sim{k}").parse()?;
                ids.push(alloc.allocate(&labels).await?.0);
            }
            let ids = Arc::new(ids);
            let start = Instant::now();
            let sem = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..sim_nodes {
                let (endpoint, cluster, ids, sem) =
                    (endpoint.clone(), cluster.clone(), ids.clone(), sem.clone());
                tasks.spawn(async move {
                    let _p = sem.acquire_owned().await?;
                    sim_node(endpoint, cluster, n, sim_eps, ids).await
                });
            }
            let mut stores = vec![store];
            while let Some(r) = tasks.join_next().await {
                stores.push(r??);
            }
            anyhow::Ok((stores, start.elapsed()))
        })?;
        let writes = sim_nodes * (sim_eps + 1);
        println!(
            "Writers: {sim_nodes} nodes × {sim_eps} endpoints = {total} IPCache entries + {sim_nodes} node entries, 100 identities allocated before; {writes} etcd writes in {:.1} s: {:.0} writes/s (64 concurrent node sessions).\n",
            write_time.as_secs_f64(),
            writes as f64 / write_time.as_secs_f64(),
        );
        // Convergence: every real node's kernel IPCache holds every simulated entry.
        let written_at = Instant::now();
        let mut converged: Vec<Option<Duration>> = vec![None; c.nodes.len()];
        let mut held = vec![0usize; c.nodes.len()];
        while converged.iter().any(Option::is_none) && written_at.elapsed() < limit {
            for k in 0..c.nodes.len() {
                if converged[k].is_none() {
                    held[k] = sim_entries(c, k)?;
                    if held[k] >= total {
                        converged[k] = Some(write_time + written_at.elapsed());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let after: Vec<(u64, u64)> = (0..c.nodes.len()).map(|k| usage(netd_pid(c, k))).collect();
        let tick = 100.0; // USER_HZ
        println!(
            "| real node | all {total} entries in its kernel IPCache (from the first write) | netd RSS before → after | RSS per 10 000 remote endpoints | netd CPU s per 10 000 remote endpoints |"
        );
        println!("| --- | --- | --- | --- | --- |");
        for k in 0..c.nodes.len() {
            let per10k = held[k].max(1) as f64 / 10_000.0;
            let when = match converged[k] {
                Some(d) => format!("{:.1} s", d.as_secs_f64()),
                None => format!(
                    "not after {:.0} s: {} of {total}",
                    (write_time + limit).as_secs_f64(),
                    held[k]
                ),
            };
            println!(
                "| node{k} | {when} | {:.1} → {:.1} MiB | {:.2} MiB | {:.2} s |",
                before[k].0 as f64 / 1024.0,
                after[k].0 as f64 / 1024.0,
                (after[k].0.saturating_sub(before[k].0)) as f64 / 1024.0 / per10k,
                (after[k].1.saturating_sub(before[k].1)) as f64 / tick / per10k
            );
        }
        // The sessions close (their keys go) while the runtime still runs.
        rt.block_on(async {
            for s in &stores {
                let _ = s.close().await;
            }
        });
        drop(stores);
        rt.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    })
}

fn main() -> Res<()> {
    if !sigil_test_util::can_run_with_bpffs("the cluster benchmarks")
        || !sigil_test_util::can_run_etcd("the cluster benchmarks")
    {
        return Ok(());
    }
    let only = std::env::var("ONLY").unwrap_or_default();
    let underlay_mtu = env_num("UNDERLAY_MTU", 1500) as u32;
    let mut c = if underlay_mtu == 1500 {
        TestCluster::start(3, 231, &[])?
    } else {
        TestCluster::start_with_underlay_mtu(3, 231, &[], underlay_mtu)?
    };
    println!(
        "# sigil cluster benchmarks — {} ({} CPUs)\n",
        chrono_free_date(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if only.is_empty() || only == "latency" {
        println!("## Endpoint created on node A → enforced on node B\n");
        latency(&c)?;
        println!();
    }
    if only.is_empty() || only == "throughput" {
        println!("## Cross-node TCP: sigil endpoints + policy vs plain routing\n");
        throughput(&mut c, underlay_mtu)?;
        println!();
    }
    if only.is_empty() || only == "scale" {
        println!("## Scale by simulation\n");
        scale(&c)?;
    }
    Ok(())
}

fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
