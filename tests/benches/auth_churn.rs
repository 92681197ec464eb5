//! Drops under endpoint churn with policy-required mutual authentication (issue 12, "no
//! first-packet drop"; root, etcd): a 3-node cluster with an agent per node and every netd in
//! spiffe identity mode. On node 1 two servers: `sa`, whose ingress from the `ca` client's
//! SPIFFE ID requires authentication, and `sp`, the control, whose ingress from the `cp`
//! client's SPIFFE ID does not. Both policies are imported on every node before any traffic.
//!
//! Each round creates a client endpoint on node 0 and, as soon as `sigil endpoint create`
//! returns, connects to its server (TCP, 3 s connect timeout, then a 4-byte echo) until an
//! echo comes back, then deletes the endpoint. Rounds alternate the two policies (ca→sa,
//! cp→sp, order swapped every round), so both see the same machine state. Reported per
//! policy: failed attempts, connects that needed a SYN retransmission (took ≥ 0.5 s), time from
//! the create call to the first echo (p50/p99/max), and the datapath's drops from `sigil
//! monitor --drops-only` on both nodes by reason (189 = authentication required), counted
//! before and after the churn.
//!
//! `SIGIL_BIN=$PWD/target/debug/sigil cargo bench -p sigil-e2e --bench auth_churn --profile dev`;
//! `ROUNDS` (default 50) rounds per policy after one warm-up round each.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_test_util::netns::in_netns;
use sigil_test_util::{TestCluster, sigil_bin, wait_for};

type Res<T> = anyhow::Result<T>;

/// Second octet of this bench's pod CIDRs (10.238.<node>.0/24).
const A: u8 = 238;
const PORT: u16 = 8080;
const TD: &str = "spiffe://identity.example.com";
/// The authentication-required reason.
const DROP_AUTH_REQUIRED: u64 = 189;
/// A connect that took this long had its SYN (or SYN-ACK) retransmitted (initial RTO 1 s).
const RETRANSMITTED: Duration = Duration::from_millis(500);

/// One policy variant: client app, server app, whether its rule requires authentication.
struct Variant {
    what: &'static str,
    client: &'static str,
    server: &'static str,
    auth: bool,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        what: "authentication required",
        client: "ca",
        server: "sa",
        auth: true,
    },
    Variant {
        what: "control: no authentication",
        client: "cp",
        server: "sp",
        auth: false,
    },
];

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn json(text: &str) -> Res<Value> {
    Ok(serde_json::from_str(text)?)
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Waits (polling the Delegated Identity API as root) until the agent serves netd.
fn delegate_ready(admin: &Path) -> Res<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in = rt.enter();
    let client = sigil_delegated_client::Client::new(admin);
    let start = Instant::now();
    loop {
        match rt.block_on(client.check()) {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                anyhow::bail!("agent never served the delegate: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

/// `sigil monitor --drops-only --output json` of a node, its lines collected.
struct Drops {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Drops {
    fn start(c: &TestCluster, node: usize) -> Res<Drops> {
        let mut child = Command::new(sigil_bin())
            .args(["monitor", "--drops-only", "--output", "json"])
            .arg("--api-socket")
            .arg(&c.nodes[node].netd.api_socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("monitor stdout"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l)
                    && let Ok(mut s) = sink.lock()
                {
                    s.push(v);
                }
            }
        });
        Ok(Drops { child, lines })
    }

    fn len(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Drops by reason of flows to or from `server`.
    fn by_reason(&self, server: Ipv4Addr) -> BTreeMap<u64, usize> {
        let ip = server.to_string();
        let mut out = BTreeMap::new();
        for v in self.lines.lock().map(|l| l.clone()).unwrap_or_default() {
            if v["src"]["addr"].as_str() == Some(&ip) || v["dst"]["addr"].as_str() == Some(&ip) {
                *out.entry(v["drop_reason"].as_u64().unwrap_or(0))
                    .or_insert(0) += 1;
            }
        }
        out
    }

    /// Waits until no line arrived for 300 ms (the ring buffer drained).
    fn settle(&self) -> Res<()> {
        let mut last = (self.len(), Instant::now());
        wait_for("the monitor drained", Duration::from_secs(10), || {
            let n = self.len();
            if n != last.0 {
                last = (n, Instant::now());
            }
            Ok((last.1.elapsed() < Duration::from_millis(300)).then(|| format!("{n} lines")))
        })
    }
}

impl Drop for Drops {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ingress policy of `v`'s server: from its client's SPIFFE ID on 8080.
fn policy(v: &Variant) -> String {
    let auth = if v.auth {
        "\n    authentication: {mode: required}"
    } else {
        ""
    };
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {s}-ingress, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: {s}}}}}\n  ingress:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"{TD}/{c}\"}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]{auth}\n",
        s = v.server,
        c = v.client,
    )
}

/// Creates `v`'s server on node 1, waits for its SVID, and echoes on 8080 inside it.
fn server(c: &TestCluster, v: &Variant) -> Res<Ipv4Addr> {
    let name = format!("ch{}-{}", std::process::id(), v.server);
    let netd = &c.nodes[1].netd;
    netd.cli_ok(&[
        "endpoint",
        "create",
        &name,
        "--labels",
        &format!("app={}", v.server),
    ])?;
    let mut ep = Value::Null;
    wait_for("the server registered", Duration::from_secs(30), || {
        ep = json(&netd.cli_ok(&["endpoint", "get", &name])?)?;
        Ok((ep["spiffe_id_source"] != "registered").then(|| ep.to_string()))
    })?;
    let ns = PathBuf::from(ep["netns"].as_str().unwrap_or_default());
    let l = in_netns(&ns, || Ok(TcpListener::bind(("0.0.0.0", PORT))?))?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(ep["ipv4"].as_str().unwrap_or_default().parse()?)
}

/// One round's outcome.
struct Round {
    failed: usize,
    retransmitted: usize,
    first_echo: Option<Duration>,
    create: Duration,
}

/// Creates a client of `v` on node 0, connects to `to` from the moment the create returns
/// until an echo comes back (or 30 s pass), deletes it.
fn round(c: &TestCluster, v: &Variant, to: Ipv4Addr, tag: &str) -> Res<Round> {
    let name = format!("ch{}-{tag}", std::process::id());
    let netd = &c.nodes[0].netd;
    let start = Instant::now();
    let ep = json(&netd.cli_ok(&[
        "endpoint",
        "create",
        &name,
        "--labels",
        &format!("app={}", v.client),
    ])?)?;
    let create = start.elapsed();
    let ns = PathBuf::from(ep["netns"].as_str().unwrap_or_default());
    let addr = SocketAddr::new(IpAddr::V4(to), PORT);
    let mut r = Round {
        failed: 0,
        retransmitted: 0,
        first_echo: None,
        create,
    };
    while start.elapsed() < Duration::from_secs(30) {
        let (res, took) = in_netns(&ns, || {
            let t = Instant::now();
            Ok((
                TcpStream::connect_timeout(&addr, Duration::from_secs(3)),
                t.elapsed(),
            ))
        })?;
        match res {
            Ok(mut s) => {
                if took >= RETRANSMITTED {
                    r.retransmitted += 1;
                }
                let msg = *b"ping";
                let mut buf = [0u8; 4];
                let ok = s.set_read_timeout(Some(Duration::from_secs(3))).is_ok()
                    && s.write_all(&msg).is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && buf == msg;
                if ok {
                    r.first_echo = Some(start.elapsed());
                    break;
                }
                r.failed += 1;
            }
            Err(_) => {
                r.failed += 1;
                // Refused or unreachable at once: do not spin.
                if took < Duration::from_millis(5) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    netd.cli_ok(&["endpoint", "delete", &name])?;
    Ok(r)
}

fn reasons(m: &BTreeMap<u64, usize>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter()
        .map(|(r, n)| format!("{r} ({}): {n}", sigil_datapath::drop_reason_name(*r as u32)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Res<()> {
    if !sigil_test_util::can_run_with_bpffs("the auth churn benchmark")
        || !sigil_test_util::can_run_etcd("the auth churn benchmark")
    {
        return Ok(());
    }
    let rounds = env_num("ROUNDS", 50);
    let c = TestCluster::start_with_agents(3, A, &[], delegate_ready)?;
    let id = c
        .identity
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("agents"))?;
    for v in &VARIANTS {
        let sel = |app: &str| format!("k8s:pod-label:app:{app}");
        id.entry(
            0,
            &format!("{TD}/{}", v.client),
            &["k8s:ns:default", &sel(v.client)],
        )?;
        id.entry(
            1,
            &format!("{TD}/{}", v.server),
            &["k8s:ns:default", &sel(v.server)],
        )?;
    }
    let dir = tempfile::tempdir()?;
    for v in &VARIANTS {
        let file = dir.path().join(format!("{}.yaml", v.server));
        std::fs::write(&file, policy(v))?;
        for n in &c.nodes {
            n.netd
                .cli_ok(&["policy", "import", &file.display().to_string()])?;
        }
    }
    let servers = VARIANTS
        .iter()
        .map(|v| server(&c, v))
        .collect::<Res<Vec<_>>>()?;
    let drops = [Drops::start(&c, 0)?, Drops::start(&c, 1)?];

    // One warm-up round each (the clients' identities are allocated cluster-wide once).
    for (k, v) in VARIANTS.iter().enumerate() {
        let w = round(&c, v, servers[k], &format!("w{k}"))?;
        anyhow::ensure!(w.first_echo.is_some(), "{}: no echo in warm-up", v.what);
    }
    for d in &drops {
        d.settle()?;
    }
    let before: Vec<[BTreeMap<u64, usize>; 2]> = (0..VARIANTS.len())
        .map(|k| {
            [
                drops[0].by_reason(servers[k]),
                drops[1].by_reason(servers[k]),
            ]
        })
        .collect();
    let mut results: Vec<Vec<Round>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    let wall = Instant::now();
    for r in 0..rounds {
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            results[k].push(round(&c, &VARIANTS[k], servers[k], &format!("{r}-{k}"))?);
        }
    }
    let wall = wall.elapsed();
    for d in &drops {
        d.settle()?;
    }

    println!(
        "# Drops under endpoint churn, policy-required authentication — {} ({} CPUs)\n",
        today(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{rounds} rounds per policy, interleaved, {:.1} s in all; client on node0, server on node1\n",
        wall.as_secs_f64()
    );
    println!(
        "| policy | rounds echoed | attempts failed | connects retransmitted (≥ 0.5 s) | create → first echo p50 | p99 | max | `endpoint create` p50 | reason-189 drops node1 (before → after) | node0 | all drops during churn (node0 + node1) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (k, v) in VARIANTS.iter().enumerate() {
        let res = &results[k];
        let echoed = res.iter().filter(|r| r.first_echo.is_some()).count();
        let failed: usize = res.iter().map(|r| r.failed).sum();
        let retrans: usize = res.iter().map(|r| r.retransmitted).sum();
        let mut first: Vec<Duration> = res.iter().filter_map(|r| r.first_echo).collect();
        first.sort();
        let mut create: Vec<Duration> = res.iter().map(|r| r.create).collect();
        create.sort();
        let after = [
            drops[0].by_reason(servers[k]),
            drops[1].by_reason(servers[k]),
        ];
        let n189 = |m: &BTreeMap<u64, usize>| m.get(&DROP_AUTH_REQUIRED).copied().unwrap_or(0);
        let mut during: BTreeMap<u64, usize> = BTreeMap::new();
        for node in 0..2 {
            for (r, n) in &after[node] {
                let was = before[k][node].get(r).copied().unwrap_or(0);
                if *n > was {
                    *during.entry(*r).or_insert(0) += n - was;
                }
            }
        }
        println!(
            "| {} | {echoed}/{} | {failed} | {retrans} | {} | {} | {} | {} | {} → {} | {} → {} | {} |",
            v.what,
            res.len(),
            ms(pct(&first, 0.5)),
            ms(pct(&first, 0.99)),
            ms(first.last().copied().unwrap_or_default()),
            ms(pct(&create, 0.5)),
            n189(&before[k][1]),
            n189(&after[1]),
            n189(&before[k][0]),
            n189(&after[0]),
            reasons(&during),
        );
    }
    Ok(())
}
