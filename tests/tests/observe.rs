//! `sigil observe` and the flow exporter on real sigil-netds, as root, with real endpoints and
//! real traffic: filters (IP, identity, port, verdict, type, `--not`) checked on the parsed
//! `jsonpb` output, the text formats, `--last`, `--follow` ended by SIGINT, bad flags named;
//! the export file (Hubble's exporter lines, 0600) rotated at a small size with a denylist, its
//! counters in `sigil netd status`; hostile export settings (bad filter JSON, a symlinked path)
//! stop netd with the setting named; across a two-node cluster `sigil observe --cluster` gives
//! both nodes' flows in time order and reports an unreachable node.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_test_util::netns::command_in_named_netns;
use sigil_test_util::netns::probe_tcp as probe;
use sigil_test_util::{Children, NetdProcess, TestCluster, can_run_etcd, sigil_bin, wait_for};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the observe test")
}

struct Ep {
    netns: String,
    ipv4: String,
    identity: u64,
}

fn create(netd: &NetdProcess, name: &str, labels: &str) -> Ep {
    let out = netd
        .cli_ok(&["endpoint", "create", name, "--labels", labels])
        .expect("endpoint create");
    let v: Value = serde_json::from_str(&out).expect("json");
    Ep {
        netns: v["netns_name"].as_str().unwrap_or_default().to_owned(),
        ipv4: v["ipv4"].as_str().unwrap_or_default().to_owned(),
        identity: v["identity"].as_u64().unwrap_or(0),
    }
}

fn echo(children: &mut Children, ep: &Ep, port: u16) {
    children.echo(&ep.netns, port);
}

fn wait_probe(netns: &str, addr: &str, port: u16) {
    let start = Instant::now();
    while !probe(netns, addr, port) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{addr}:{port} never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-in
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: intruder}}]
"#;

fn observe(netd: &NetdProcess, args: &[&str]) -> Output {
    let mut v = vec!["observe"];
    v.extend_from_slice(args);
    netd.cli(&v).expect("run sigil observe")
}

/// The flows of a successful `-o jsonpb` run.
fn flows(netd: &NetdProcess, args: &[&str]) -> Vec<Value> {
    let mut v = vec!["-o", "jsonpb"];
    v.extend_from_slice(args);
    let out = observe(netd, &v);
    assert!(
        out.status.success(),
        "sigil observe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_flows(&out.stdout)
}

fn parse_flows(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v.get("flow").is_some())
        .collect()
}

fn src_ip(f: &Value) -> &str {
    f["flow"]["IP"]["source"].as_str().unwrap_or_default()
}
fn dst_ip(f: &Value) -> &str {
    f["flow"]["IP"]["destination"].as_str().unwrap_or_default()
}
fn dport(f: &Value) -> u64 {
    f["flow"]["l4"]["TCP"]["destination_port"]
        .as_u64()
        .unwrap_or(0)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn observe_filters_formats_follow_and_export_on_real_traffic() {
    if !can_run() {
        return;
    }
    let export_dir = tempfile::tempdir().expect("tempdir");
    let export = export_dir.path().join("flows.log");
    let export_s = export.display().to_string();
    let netd = NetdProcess::start_with(
        None,
        "obs",
        226,
        1,
        &[
            "--hubble-export-file-path",
            &export_s,
            // About 2 KB: a few flows per file.
            "--hubble-export-file-max-size-mb",
            "0.002",
            "--hubble-export-file-max-backups",
            "2",
            "--hubble-export-denylist",
            r#"{"destination_port":["9090"]}"#,
        ],
    )
    .expect("netd");
    let fe = create(&netd, "obs-fe", "app=frontend");
    let be = create(&netd, "obs-be", "app=backend");
    let it = create(&netd, "obs-it", "app=intruder");
    let mut children = Children::default();
    echo(&mut children, &be, 8080);
    echo(&mut children, &be, 9090);
    wait_probe(&fe.netns, &be.ipv4, 8080);
    wait_probe(&fe.netns, &be.ipv4, 9090);
    let file = netd.root.path().join("policy.yaml");
    std::fs::write(&file, POLICY).expect("write policy");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    for _ in 0..3 {
        assert!(probe(&fe.netns, &be.ipv4, 8080), "allowed connection");
        assert!(!probe(&it.netns, &be.ipv4, 8080), "explicit deny");
        assert!(!probe(&fe.netns, &be.ipv4, 9090), "default deny");
    }

    // Everything, parsed: the three kinds of flow are there.
    let all = flows(&netd, &["--all"]);
    assert!(
        all.iter().any(|f| src_ip(f) == fe.ipv4
            && dst_ip(f) == be.ipv4
            && dport(f) == 8080
            && f["flow"]["verdict"] == "FORWARDED"),
        "no allowed flow in {all:?}"
    );
    assert!(
        all.iter()
            .any(|f| src_ip(f) == it.ipv4 && f["flow"]["verdict"] == "DROPPED")
    );
    assert!(
        all.iter()
            .any(|f| dport(f) == 9090 && f["flow"]["verdict"] == "DROPPED")
    );
    assert!(all.iter().all(|f| f["node_name"] == "e2e"));

    // Filters, as `hubble observe` builds them.
    let dropped = flows(
        &netd,
        &["--all", "--verdict", "DROPPED", "--to-ip", &be.ipv4],
    );
    assert!(dropped.len() >= 6, "{dropped:?}");
    assert!(
        dropped
            .iter()
            .all(|f| f["flow"]["verdict"] == "DROPPED" && dst_ip(f) == be.ipv4)
    );
    let not_intruder = flows(
        &netd,
        &["--all", "--to-ip", &be.ipv4, "--not", "--from-ip", &it.ipv4],
    );
    assert!(!not_intruder.is_empty());
    assert!(
        not_intruder
            .iter()
            .all(|f| src_ip(f) != it.ipv4 && dst_ip(f) == be.ipv4)
    );
    assert!(not_intruder.iter().any(|f| src_ip(f) == fe.ipv4));
    let fe_id = fe.identity.to_string();
    let default_deny = flows(
        &netd,
        &[
            "--all",
            "--from-identity",
            &fe_id,
            "--to-port",
            "9090",
            "--type",
            "drop",
        ],
    );
    assert!(!default_deny.is_empty());
    for f in &default_deny {
        assert_eq!(f["flow"]["source"]["identity"].as_u64(), Some(fe.identity));
        assert_eq!(dport(f), 9090);
        assert_eq!(f["flow"]["event_type"]["type"], 1);
        assert_eq!(f["flow"]["drop_reason_desc"], "POLICY_DENIED");
    }
    // --ip is source OR destination.
    let either = flows(&netd, &["--all", "--ip", &it.ipv4]);
    assert!(
        either
            .iter()
            .all(|f| src_ip(f) == it.ipv4 || dst_ip(f) == it.ipv4)
    );
    assert!(!either.is_empty());
    assert_eq!(flows(&netd, &["--last", "1"]).len(), 1);

    // Text formats.
    let out = observe(
        &netd,
        &["--all", "--verdict", "DROPPED", "--from-ip", &it.ipv4],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.contains(" -> ") || line.contains(" <- "), "{line}");
        assert!(
            line.contains("obs-it") && line.contains("DROPPED"),
            "{line}"
        );
        assert!(line.contains("(TCP Flags:"), "{line}");
    }
    let out = observe(&netd, &["--all", "-o", "dict", "--from-ip", &it.ipv4]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  TIMESTAMP: ") && text.contains("    VERDICT: DROPPED"),
        "{text}"
    );
    let out = observe(&netd, &["--all", "-o", "table", "--from-ip", &it.ipv4]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .next()
            .is_some_and(|h| h.starts_with("TIMESTAMP")
                && h.contains("SOURCE")
                && h.contains("VERDICT")),
        "{text}"
    );

    // Bad flags: named, nothing asked.
    for (args, want) in [
        (
            &["--to-port", "99999"][..],
            "--to-port: invalid value \"99999\"",
        ),
        (
            &["--verdict", "ALLOWED"][..],
            "--verdict: invalid value \"ALLOWED\"",
        ),
        (&["--from-ip", "10.0.0.300"][..], "--from-ip: invalid value"),
        (
            &["--server", "nowhere"][..],
            "--server: invalid value \"nowhere\"",
        ),
        (
            &["--ip", "10.0.0.1", "--from-ip", "10.0.0.2"][..],
            "filters --ip and --from-ip cannot be combined",
        ),
        (&["--since", "soon"][..], "--since: invalid value \"soon\""),
        (
            &["--from-ip", "10.0.0.1", "--not"][..],
            "--not: must be followed",
        ),
    ] {
        let out = observe(&netd, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }

    // --follow: new flows stream until SIGINT, then a clean exit.
    let hubble = netd.api_socket.with_file_name("hubble.sock");
    let mut follower = Command::new(sigil_bin())
        .args([
            "observe", "-f", "-o", "jsonpb", "--to-ip", &be.ipv4, "--server",
        ])
        .arg(format!("unix://{}", hubble.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("follower");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let pid = follower.id();
    children.0.push(follower);
    let start = Instant::now();
    let got = loop {
        assert!(probe(&fe.netns, &be.ipv4, 8080));
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no followed flow"
        );
    };
    let v: Value = serde_json::from_str(&got).expect("json line");
    assert_eq!(v["flow"]["IP"]["destination"], be.ipv4.as_str());
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    let follower = children.0.last_mut().expect("follower");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = follower.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "follower ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");

    // The export: Hubble's exporter lines, rotated, the denylist applied, counted.
    let mut lines = Vec::new();
    wait_for("exported flows", Duration::from_secs(10), || {
        let st: Value =
            serde_json::from_str(&netd.cli_ok(&["netd", "status", "--output", "json"])?)?;
        let x = &st["hubble_export"];
        let exported = x["exported"].as_u64().unwrap_or(0);
        if exported >= 6 && x["rotations"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(x["dropped"], 0, "{st}");
            assert_eq!(x["write_errors"], 0, "{st}");
            assert!(x["filtered_out"].as_u64().unwrap_or(0) >= 3, "{st}");
            Ok(None)
        } else {
            Ok(Some(format!("{x}")))
        }
    })
    .expect("export counters");
    let mut names = Vec::new();
    for e in std::fs::read_dir(export_dir.path()).expect("read dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = e.metadata().expect("metadata");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        assert!(meta.len() <= 2_097, "{name}: {} bytes", meta.len());
        for l in std::fs::read_to_string(e.path()).expect("read").lines() {
            lines.push(serde_json::from_str::<Value>(l).expect("JSON line"));
        }
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["flows.log", "flows.log.1", "flows.log.2"]);
    assert!(!lines.is_empty());
    for l in &lines {
        if l.get("flow").is_some() {
            assert_eq!(l["node_name"], "e2e");
            assert!(l["time"].is_string());
            assert_ne!(dport(l), 9090, "the denylist let through {l}");
        }
    }
    // Only the newest flows survive two rotations: the followed connections, with the policy
    // that allowed them.
    assert!(
        lines
            .iter()
            .any(|l| src_ip(l) == fe.ipv4
                && l["flow"]["ingress_allowed_by"][0]["name"] == "backend-in"),
        "an allowed flow with its policy: {lines:?}"
    );
}

#[test]
fn hostile_export_settings_stop_netd_naming_the_setting() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    std::fs::write(&target, "keep").expect("write");
    let link = dir.path().join("flows.log");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let link_s = link.display().to_string();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let in_shared = shared.join("flows.log").display().to_string();
    let ok = dir.path().join("ok.log").display().to_string();
    for (i, (extra, want)) in [
        (
            vec![
                "--hubble-export-file-path",
                &ok,
                "--hubble-export-allowlist",
                r#"{"verdict":["MAYBE"]}"#,
            ],
            "hubble_export_allowlist",
        ),
        (
            vec![
                "--hubble-export-file-path",
                &ok,
                "--hubble-export-denylist",
                "{not json",
            ],
            "hubble_export_denylist",
        ),
        (
            vec![
                "--hubble-export-file-path",
                &ok,
                "--hubble-export-allowlist",
                r#"{"source_ip":["10.0.0.0/99"]}"#,
            ],
            "allowlist[0].source_ip",
        ),
        (vec!["--hubble-export-file-path", &link_s], "symlink"),
        (
            vec!["--hubble-export-file-path", &in_shared],
            "writable by group or others",
        ),
        (
            vec!["--hubble-export-file-path", "relative.log"],
            "must be an absolute path",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut n = NetdProcess::prepare(None, &format!("obsbad{i}"), 226, 10 + i as u8, &extra)
            .expect("prepare");
        assert!(n.spawn().is_err(), "netd started with {extra:?}");
        let log = n.log_text();
        assert!(log.contains(want), "{extra:?}: {log}");
    }
    assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
    assert!(!shared.join("flows.log").exists());
}

#[test]
fn cluster_observe_merges_both_nodes_flows_in_time_order() {
    if !can_run() || !can_run_etcd("the cluster observe test") {
        return;
    }
    let mut c = TestCluster::start(
        2,
        227,
        &[
            "--hubble-listen-address",
            "0.0.0.0:4244",
            "--hubble-listen-allow-remote",
            "true",
        ],
    )
    .expect("cluster");
    let client = create(&c.nodes[0].netd, "cobs-client", "app=client");
    let server = create(&c.nodes[1].netd, "cobs-server", "app=server");
    let mut children = Children::default();
    echo(&mut children, &server, 8080);
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-out
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server-in
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;
    for n in &c.nodes {
        let file = n.netd.root.path().join("p.yaml");
        std::fs::write(&file, policy).expect("write");
        n.netd
            .cli_ok(&["policy", "import", &file.display().to_string()])
            .expect("import");
    }
    wait_probe(&client.netns, &server.ipv4, 8080);
    for _ in 0..3 {
        assert!(probe(&client.netns, &server.ipv4, 8080));
    }
    let node0 = c.topo.node(0).expect("node 0").netns.clone();
    let api0 = c.nodes[0].netd.api_socket.clone();
    let run = |args: &[&str]| -> Output {
        command_in_named_netns(&node0, sigil_bin())
            .arg("observe")
            .args(args)
            .arg("--api-socket")
            .arg(&api0)
            .output()
            .expect("sigil observe --cluster")
    };
    let mut merged = Vec::new();
    wait_for("flows of both nodes", Duration::from_secs(10), || {
        let out = run(&[
            "--cluster",
            "--all",
            "-o",
            "jsonpb",
            "--to-ip",
            &server.ipv4,
        ]);
        if !out.status.success() {
            return Ok(Some(stderr(&out)));
        }
        merged = parse_flows(&out.stdout);
        let nodes: std::collections::BTreeSet<&str> = merged
            .iter()
            .filter_map(|f| f["node_name"].as_str())
            .collect();
        if nodes.len() == 2 {
            Ok(None)
        } else {
            Ok(Some(format!("nodes {nodes:?}")))
        }
    })
    .expect("merged flows");
    let times: Vec<String> = merged
        .iter()
        .map(|f| f["time"].as_str().expect("time").to_owned())
        .collect();
    // RFC 3339 in UTC with the same precision sorts as text... unless trailing zeros are cut:
    // compare as instants.
    let instants: Vec<std::time::SystemTime> = times
        .iter()
        .map(|t| humantime::parse_rfc3339_weak(t).expect("rfc3339"))
        .collect();
    assert!(
        instants.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {times:?}"
    );
    assert!(merged.iter().all(|f| dst_ip(f) == server.ipv4));

    // Compact output names each flow's node.
    let out = run(&["--cluster", "--all", "--to-ip", &server.ipv4]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[node0]") && text.contains("[node1]"),
        "{text}"
    );

    // A node that does not answer is reported; the others' flows still come.
    let out = run(&[
        "--cluster",
        "--all",
        "-o",
        "jsonpb",
        "--cluster-port",
        "4299",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no node's Observer could be read"),
        "{}",
        stderr(&out)
    );
    let statuses: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("node_status").is_some())
        .collect();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| s["node_status"]["state_change"] == "NODE_UNAVAILABLE")
    );
    c.nodes[1].netd.kill9();
    let out = run(&["--cluster", "--all", "-o", "jsonpb"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["node_name"] == "node0" && l.get("flow").is_some())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["node_status"]["node_names"][0] == "node1"
                && l["node_status"]["state_change"] == "NODE_UNAVAILABLE")
    );
}
