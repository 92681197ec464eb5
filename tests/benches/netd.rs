//! sigil-netd benchmarks (root), printed as Markdown for docs/benchmarks.md.
//!
//! 1. `throughput`: iperf3 throughput and TCP request/response latency between two endpoints
//!    for every setup, measured in interleaved rounds in one run: no datapath (the baseline),
//!    sigil with 10 identities, sigil with 100 000 identities in the IPCache and the server's
//!    policy map, nftables with 10 000 rules doing the policy's job, and optionally a second
//!    sigil binary (`SIGIL_BASE_BIN`, e.g. a build of an older commit) with 10 identities.
//!    Every setup exists for the whole run (two sigil-netd processes, plain endpoint pairs for
//!    the baseline and nftables, whose table is loaded only around its own samples); each round
//!    measures every setup once, in an order rotated by one per round, and each setup's ratio is
//!    taken against the baseline of the same round. Reported: medians and min–max over the rounds.
//! 2. `import`: `policy import` round trip; 3. `memory`: netd RSS per endpoint;
//! 4. `status`: `netd status` latency during a 20 000-CIDR import.
//!
//! `cargo bench -p sigil-e2e --bench netd` (uses `target/release/sigil`, or `SIGIL_BIN`).
//! Environment: `SIGIL_BENCH=throughput|import|memory|status` (comma-separated; default all),
//! `ROUNDS` (default 5), `SECS` (iperf3 seconds per sample after a 1 s omitted warm-up, default 4),
//! `SIGIL_BASE_BIN` (optional second sigil binary, measured as one more setup).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_datapath::netns::{self, EndpointSpec};
use sigil_datapath::{Direction, Maps, PROTO_TCP, PolicyEntry, PolicyKey};
use sigil_test_util::{NetdProcess, sigil_bin};

type Res<T> = anyhow::Result<T>;

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"5201\", protocol: TCP}, {port: \"7000\", protocol: TCP}]}]\n";

fn env_num(name: &str, default: u32) -> Res<u32> {
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

/// One client/server pair of endpoints.
struct Pair {
    client_ns: String,
    server_ip: String,
}

/// Child processes, killed on drop.
struct Kids(Vec<std::process::Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether something listens on TCP `port` inside the named namespace.
fn listening(netns: &str, port: u16) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Hltn"])
        .arg(format!("sport = :{port}"))
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

/// Starts iperf3 (5201) and sigil's echo server (7000) in `netns` and waits until both listen.
fn servers(kids: &mut Kids, bin: &Path, netns: &str) -> Res<()> {
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
            .arg(bin)
            .args(["netd", "echo-server", "--bind", "0.0.0.0:7000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let start = Instant::now();
    while !(listening(netns, 5201) && listening(netns, 7000)) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "iperf3 or the echo server in {netns} did not listen within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// iperf3 throughput in Gbit/s: one stream, a 1 s warm-up left out, then `secs` seconds.
fn throughput(p: &Pair, secs: u32) -> Res<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &p.client_ns, "iperf3", "-c", &p.server_ip])
        .args(["-p", "5201", "-O", "1", "-J", "-t", &secs.to_string()])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(bps / 1e9)
}

/// TCP request/response: 64-byte ping-pongs on one connection; (p50, p99) in µs.
fn rr(pair: &Pair) -> Res<(f64, f64)> {
    let path = format!("/run/netns/{}", pair.client_ns);
    let target = format!("{}:7000", pair.server_ip);
    let mut s = std::thread::spawn(move || -> Res<TcpStream> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpStream::connect(&target)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
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
    Ok((p(&mut lat, 50), p(&mut lat, 99)))
}

fn nft(script: &str) -> Res<()> {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("nft: no stdin"))?
        .write_all(script.as_bytes())?;
    let out = c.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Runs `<bin> <args> --api-socket <socket>` and returns its standard output; fails naming the
/// command on a non-zero exit.
fn cli(bin: &Path, socket: &Path, args: &[&str]) -> Res<String> {
    let out: Output = Command::new(bin)
        .args(args)
        .arg("--api-socket")
        .arg(socket)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {args:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sigil netd run` from `bin` with pod CIDRs `10.<a>.0.0/24`, `fd00:<a>00::/64`; ready once its
/// socket answers `endpoint list` (an older binary may lack `netd healthcheck`). The returned
/// [`NetdProcess`] cleans up as the fixture's own does.
fn start_netd(bin: &Path, tag: &str, a: u8) -> Res<NetdProcess> {
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
        pod_cidr: format!("10.{a}.0.0/24"),
        pod_cidr_v6: format!("fd00:{a:x}00::/64"),
        log: root.path().join("netd.log"),
        netns: None,
        extra_args: Vec::new(),
        node_name: "bench".into(),
        root,
    };
    std::fs::create_dir_all(&n.policy_dir)?;
    let log = std::fs::File::create(&n.log)?;
    n.child = Some(
        Command::new(bin)
            .args(["netd", "run", "--node-name", "bench"])
            .arg("--api-socket")
            .arg(&n.api_socket)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .arg("--policy-dir")
            .arg(&n.policy_dir)
            .arg("--bpf-pin-dir")
            .arg(&n.pin_dir)
            .args(["--pod-cidr", &n.pod_cidr, "--pod-cidr-v6", &n.pod_cidr_v6])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?,
    );
    let start = Instant::now();
    loop {
        if n.api_socket.exists() && cli(bin, &n.api_socket, &["endpoint", "list"]).is_ok() {
            return Ok(n);
        }
        if let Some(st) = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            anyhow::bail!("netd ({tag}) exited with {st}: {}", n.log_text());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "netd ({tag}) not ready within 30 s: {}",
            n.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A netd from `bin` with the bench's endpoints (`<prefix>c` client, `<prefix>s` server and 8
/// more identities) and the server policy; iperf3 and echo servers started in the server.
fn sigil_setup(
    bin: &Path,
    tag: &str,
    a: u8,
    prefix: &str,
    kids: &mut Kids,
) -> Res<(NetdProcess, Pair, u32, Vec<String>)> {
    let netd = start_netd(bin, tag, a)?;
    let ep = |name: &str, app: &str| -> Res<serde_json::Value> {
        let out = cli(
            bin,
            &netd.api_socket,
            &[
                "endpoint",
                "create",
                name,
                "--labels",
                &format!("app={app}"),
            ],
        )?;
        Ok(serde_json::from_str(&out)?)
    };
    let c = ep(&format!("{prefix}c"), "client")?;
    let s = ep(&format!("{prefix}s"), "server")?;
    let file = netd.root.path().join("p.yaml");
    std::fs::write(&file, POLICY)?;
    cli(
        bin,
        &netd.api_socket,
        &["policy", "import", &file.display().to_string()],
    )?;
    for i in 0..8 {
        ep(&format!("{prefix}x{i}"), &format!("x{i}"))?;
    }
    servers(kids, bin, s["netns_name"].as_str().unwrap_or_default())?;
    let pair = Pair {
        client_ns: c["netns_name"].as_str().unwrap_or_default().to_owned(),
        server_ip: s["ipv4"].as_str().unwrap_or_default().to_owned(),
    };
    let sid = u32::try_from(s["endpoint_id"].as_u64().unwrap_or(0))?;
    let hosts = [&c, &s]
        .iter()
        .map(|e| e["host_interface"].as_str().unwrap_or_default().to_owned())
        .collect();
    Ok((netd, pair, sid, hosts))
}

/// 100 000 more identities: IPCache /32s outside the pod CIDR and allow entries in the server's
/// policy map, written straight into the pinned maps.
fn add_identities(netd: &NetdProcess, server_endpoint: u32) -> Res<()> {
    let mut maps = Maps::open_pinned(&netd.pin_dir)?;
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
    maps.policy.upsert_policy(server_endpoint, &entries)?;
    Ok(())
}

/// The plain endpoints (no datapath) and the nftables table; removed on drop.
struct Plain {
    names: Vec<String>,
}

const PLAIN_CIDR: &str = "10.233.0.0/24";
const NFT_RULES: u32 = 10_000;

impl Plain {
    fn pair(&mut self, client: &str, server: &str, c: u8, s: u8) -> Res<(Pair, String)> {
        for (name, host) in [(client, c), (server, s)] {
            self.names.push(name.to_owned());
            netns::create_endpoint(&EndpointSpec {
                name: name.into(),
                mtu: None,
                ipv4: Some(Ipv4Addr::new(10, 233, 0, host)),
                ipv6: None,
            })?;
        }
        Ok((
            Pair {
                client_ns: netns::netns_name(client),
                server_ip: format!("10.233.0.{s}"),
            },
            netns::netns_name(server),
        ))
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = nft("delete table inet sigilbench\n");
        for n in &self.names {
            let _ = netns::delete_endpoint(n);
        }
        let _ = netns::remove_blackhole_route(PLAIN_CIDR);
    }
}

struct Setup {
    name: String,
    pair: Pair,
    /// nftables rules loaded around this setup's samples (client, server addresses).
    nft: Option<(String, String)>,
    /// Host veths whose TC programs are sigil's (empty without a datapath).
    hosts: Vec<String>,
    /// (Gbit/s, RR p50 µs, RR p99 µs) per round.
    samples: Vec<(f64, f64, f64)>,
}

fn measure(s: &Setup, secs: u32) -> Res<(f64, f64, f64)> {
    if let Some((c, srv)) = &s.nft {
        nft_rules(NFT_RULES, c, srv)?;
    }
    let r = (|| -> Res<(f64, f64, f64)> {
        let gbps = throughput(&s.pair, secs)?;
        let (p50, p99) = rr(&s.pair)?;
        Ok((gbps, p50, p99))
    })();
    if s.nft.is_some() {
        nft("delete table inet sigilbench\n")?;
    }
    r
}

/// "median (min–max)" of `v` with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let (lo, hi) = (v[0], v[v.len() - 1]);
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    format!("{med:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

fn throughput_part() -> Res<()> {
    let rounds = env_num("ROUNDS", 5)?;
    let secs = env_num("SECS", 4)?;
    let bin = sigil_bin();
    let base_bin = std::env::var_os("SIGIL_BASE_BIN").map(PathBuf::from);
    let mut kids = Kids(Vec::new());
    netns::blackhole_route(PLAIN_CIDR)?;
    let mut plain = Plain { names: Vec::new() };
    let (base_pair, base_srv) = plain.pair("bnc", "bns", 2, 3)?;
    servers(&mut kids, &bin, &base_srv)?;
    let (nft_pair, nft_srv) = plain.pair("bfc", "bfs", 4, 5)?;
    servers(&mut kids, &bin, &nft_srv)?;
    let (_n10, pair10, _, hosts10) = sigil_setup(&bin, "b10", 234, "bc", &mut kids)?;
    let (n100k, pair100k, sid, hosts100k) = sigil_setup(&bin, "b100k", 235, "bk", &mut kids)?;
    add_identities(&n100k, sid)?;
    let mut setups = vec![
        Setup {
            name: "no datapath (baseline)".into(),
            pair: base_pair,
            nft: None,
            hosts: Vec::new(),
            samples: Vec::new(),
        },
        Setup {
            name: "sigil, 10 identities".into(),
            pair: pair10,
            nft: None,
            hosts: hosts10,
            samples: Vec::new(),
        },
        Setup {
            name: "sigil, 100 000 identities".into(),
            pair: pair100k,
            nft: None,
            hosts: hosts100k,
            samples: Vec::new(),
        },
        Setup {
            name: format!("nftables, {NFT_RULES} rules"),
            pair: nft_pair,
            nft: Some(("10.233.0.4".into(), "10.233.0.5".into())),
            hosts: Vec::new(),
            samples: Vec::new(),
        },
    ];
    let _base_netd = match &base_bin {
        Some(b) => {
            let (n, pair, _, hosts) = sigil_setup(b, "bbase", 236, "bb", &mut kids)?;
            setups.push(Setup {
                name: format!("sigil `SIGIL_BASE_BIN`, 10 identities ({})", b.display()),
                pair,
                nft: None,
                hosts,
                samples: Vec::new(),
            });
            Some(n)
        }
        None => None,
    };
    let k = setups.len();
    eprintln!("{rounds} rounds × {k} setups, iperf3 1 s warm-up + {secs} s per sample");
    for r in 0..rounds as usize {
        for j in 0..k {
            let i = (r + j) % k;
            let s = measure(&setups[i], secs)
                .with_context(|| format!("round {r}, {}", setups[i].name))?;
            eprintln!(
                "round {r}: {}: {:.2} Gbit/s, RR {:.0}/{:.0} µs",
                setups[i].name, s.0, s.1, s.2
            );
            setups[i].samples.push(s);
        }
    }
    let base: Vec<f64> = setups[0].samples.iter().map(|s| s.0).collect();
    println!(
        "\n{rounds} interleaved rounds, {secs} s per sample; median (min–max) over the rounds; ratio = setup / baseline of the same round\n"
    );
    println!(
        "| setup | throughput, Gbit/s | vs no datapath | RR p50, µs | RR p99, µs |\n| --- | --- | --- | --- | --- |"
    );
    for s in &setups {
        let gbps: Vec<f64> = s.samples.iter().map(|x| x.0).collect();
        let ratio: Vec<f64> = gbps.iter().zip(&base).map(|(g, b)| g / b).collect();
        let p50: Vec<f64> = s.samples.iter().map(|x| x.1).collect();
        let p99: Vec<f64> = s.samples.iter().map(|x| x.2).collect();
        println!(
            "| {} | {} | {} × | {} | {} |",
            s.name,
            spread(&gbps, 2),
            spread(&ratio, 2),
            spread(&p50, 0),
            spread(&p99, 0)
        );
    }
    if std::env::var_os("NO_PROFILE").is_none() {
        profile(&setups, secs)?;
    }
    Ok(())
}

/// Restores `kernel.bpf_stats_enabled` on drop.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Res<Self> {
        let old =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("write {BPF_STATS}"))?;
        Ok(BpfStats(old.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

fn bpftool(args: &[&str]) -> Res<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run bpftool")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The TC programs on `host`: (attach point, program id).
fn tc_progs(host: &str) -> Res<Vec<(String, u64)>> {
    let v = bpftool(&["net", "show", "dev", host])?;
    let mut out = Vec::new();
    for e in v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["tc"].as_array())
        .flatten()
    {
        if let Some(id) = e["id"].as_u64() {
            out.push((format!("{host} {}", e["kind"].as_str().unwrap_or("?")), id));
        }
    }
    Ok(out)
}

/// One more sample of each sigil setup with the kernel's BPF run-time statistics on (they add
/// two clock reads per program run, so they stay off during the rounds): runs and ns per run of
/// each program on the pair's host veths, and its size.
fn profile(setups: &[Setup], secs: u32) -> Res<()> {
    if Command::new("bpftool").arg("version").output().is_err() {
        println!(
            "
(no bpftool: per-program cost not measured)"
        );
        return Ok(());
    }
    let _stats = BpfStats::enable()?;
    println!(
        "
Per-program cost, one more sample per sigil setup with kernel.bpf_stats_enabled=1\n\n| setup | program on | name | runs | ns per run | xlated insns | jited bytes |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for s in setups.iter().filter(|s| !s.hosts.is_empty()) {
        // (program id, where it is attached); one pinned program serves every endpoint.
        let mut progs: Vec<(u64, Vec<String>)> = Vec::new();
        for h in &s.hosts {
            for (at, id) in tc_progs(h)? {
                match progs.iter_mut().find(|p| p.0 == id) {
                    Some(p) => p.1.push(at),
                    None => progs.push((id, vec![at])),
                }
            }
        }
        let snap = |id: u64| -> Res<serde_json::Value> {
            bpftool(&["prog", "show", "id", &id.to_string()])
        };
        let before = progs
            .iter()
            .map(|(id, _)| snap(*id))
            .collect::<Res<Vec<_>>>()?;
        measure(s, secs)?;
        for ((id, at), b) in progs.iter().zip(before) {
            let v = snap(*id)?;
            let delta = |k: &str| {
                v[k].as_u64()
                    .unwrap_or(0)
                    .saturating_sub(b[k].as_u64().unwrap_or(0))
            };
            let (runs, ns) = (delta("run_cnt"), delta("run_time_ns"));
            println!(
                "| {} | {} | {} | {runs} | {:.0} | {} | {} |",
                s.name,
                at.join(", "),
                v["name"].as_str().unwrap_or("?"),
                ns as f64 / runs.max(1) as f64,
                v["bytes_xlated"].as_u64().unwrap_or(0) / 8,
                v["bytes_jited"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}

fn main() -> Res<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("netd bench skipped: needs root");
        return Ok(());
    }
    if want("throughput") {
        throughput_part()?;
    }
    if !(want("import") || want("memory") || want("status")) {
        return Ok(());
    }
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
    ep("bc", "client")?;
    ep("bs", "server")?;
    let file = netd.root.path().join("p.yaml");
    std::fs::write(&file, POLICY)?;
    netd.cli_ok(&["policy", "import", &file.display().to_string()])?;
    for i in 0..8 {
        ep(&format!("bx{i}"), &format!("x{i}"))?;
    }

    if want("import") {
        // policy import returning → enforced: the RPC writes the maps before it returns, so the
        // figure is the whole import round trip, CLI process included.
        let mut lat = Vec::new();
        for i in 0..50 {
            let port = 10_000 + i;
            let doc = POLICY
                .replace("name: server", &format!("name: p{i}"))
                .replace("7000", &port.to_string());
            std::fs::write(&file, doc)?;
            let t = Instant::now();
            netd.cli_ok(&["policy", "import", &file.display().to_string()])?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "\npolicy import (CLI process + RPC + compile + map writes), 50 imports: p50 {:.1} ms, p99 {:.1} ms",
            p(&mut lat, 50),
            p(&mut lat, 99)
        );
    }

    if want("memory") {
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
    }
    if want("status") {
        status_during_import(&netd, &file)?;
    }
    Ok(())
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
