//! Prometheus metrics on every daemon, scraped over real sockets after real activity: a real
//! server and agent (SVIDs fetched through the spiffe crate's client, counted on both sides), and
//! a real netd with endpoints, a policy and traffic (Hubble's flow metrics equal the flows the
//! Observer API returns). Each daemon's text passes `promtool check metrics`. Controls: other
//! paths are refused; no label carries key material, a join token, an audience or a path a client
//! made up.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_proto::observer as opb;
use sigil_proto::observer::observer_client::ObserverClient;
use sigil_test_util::metrics::{http_get, promtool_check, sample, scrape};
use sigil_test_util::netns::command_in_named_netns;
use sigil_test_util::netns::probe_tcp as probe;
use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess, free_port, sigil_bin};
use spiffe::WorkloadApiClient;
use tonic::transport::{Endpoint, Uri};

const TD: &str = "identity.example.com";

fn metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Label values must come from bounded sets: nothing a client chose, nothing secret.
fn assert_no_leak(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets.iter().chain(&[
        "PRIVATE KEY",
        "-----BEGIN",
        "sigil.netd.v1.Status",
        "spiffe://",
    ]) {
        assert!(!text.contains(s), "{what} metrics contain {s:?}:\n{text}");
    }
}

/// The refused paths and methods of a daemon's metrics endpoint.
fn assert_only_metrics_path(addr: SocketAddr) {
    for path in ["/", "/metrics/x", "/debug/pprof/", "/metrics?x=1/../"] {
        let (status, _) = http_get(addr, "GET", path);
        // A query string is not a path: /metrics?... is the metrics page.
        if path.starts_with("/metrics?") {
            assert_eq!(status, 200, "{path}");
        } else {
            assert_eq!(status, 404, "{path}");
        }
    }
    assert_eq!(http_get(addr, "DELETE", "/metrics").0, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_and_agent_count_the_svids_fetched_and_pass_promtool() -> anyhow::Result<()> {
    let (server_m, agent_m) = (metrics_addr(), metrics_addr());
    let server = ServerProcess::start(&["--metrics-address", &server_m.to_string()])?;
    let agent = AgentProcess::start(&server, &["--metrics-address", &agent_m.to_string()])?;
    let uid = nix::unistd::getuid().as_raw();
    let workload = format!("spiffe://{TD}/metrics-workload");
    let parent = format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    );
    let out = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        &workload,
        "--parent-id",
        &parent,
        "--selector",
        &format!("unix:uid:{uid}"),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoint = agent.endpoint();
    // The entry reaches the agent and an X.509-SVID is minted: wait for the first one.
    let start = Instant::now();
    let svid = loop {
        let client = WorkloadApiClient::connect_to(&endpoint).await?;
        match client.fetch_x509_svid().await {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(15), "no SVID: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(svid.spiffe_id().to_string(), workload);
    // Three JWT-SVIDs for three audiences (each minted by the server), fetched twice each (the
    // second from the agent's cache).
    let audiences = ["aud-metrics-one", "aud-metrics-two", "aud-metrics-three"];
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    for _ in 0..2 {
        for a in audiences {
            client.fetch_jwt_svid(&[a], None).await?;
        }
    }
    // Attack: a call to a service the agent does not serve (a path the client chose).
    let ch = sigil_e2e::admin_channel(&agent.socket).await?;
    let r = sigil_proto::netd::v1::status_client::StatusClient::new(ch)
        .get_status(sigil_proto::netd::v1::GetStatusRequest {})
        .await;
    assert_eq!(
        r.expect_err("unknown service").code(),
        tonic::Code::Unimplemented
    );

    let (agent_text, server_text) = tokio::task::spawn_blocking(move || {
        assert_only_metrics_path(agent_m);
        assert_only_metrics_path(server_m);
        (scrape(agent_m), scrape(server_m))
    })
    .await?;
    let jwt_calls = sample(
        &agent_text,
        "sigil_agent_grpc_requests_total",
        &[
            ("method", "/SpiffeWorkloadAPI/FetchJWTSVID"),
            ("code", "OK"),
        ],
    );
    assert_eq!(jwt_calls, 6.0, "{agent_text}");
    assert_eq!(
        sample(
            &agent_text,
            "sigil_agent_grpc_request_duration_seconds_count",
            &[("method", "/SpiffeWorkloadAPI/FetchJWTSVID")]
        ),
        6.0
    );
    assert_eq!(
        sample(
            &agent_text,
            "sigil_agent_svids_minted_total",
            &[("type", "jwt")]
        ),
        3.0,
        "{agent_text}"
    );
    assert!(
        sample(
            &agent_text,
            "sigil_agent_svids_minted_total",
            &[("type", "x509")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &agent_text,
            "sigil_agent_agent_svid_updates_total",
            &[("how", "attestation")]
        ),
        1.0
    );
    assert!(
        sample(
            &agent_text,
            "sigil_agent_workload_attestations_total",
            &[("result", "success")]
        ) >= 7.0,
        "{agent_text}"
    );
    assert_eq!(sample(&agent_text, "sigil_agent_cache_entries", &[]), 1.0);
    assert_eq!(sample(&agent_text, "sigil_agent_cache_svids", &[]), 1.0);
    assert_eq!(
        sample(
            &agent_text,
            "sigil_agent_grpc_requests_total",
            &[("method", "unknown"), ("code", "Unimplemented")]
        ),
        1.0
    );
    // The server signed what the agent minted: the JWTs, and X.509 for the agent and the workload.
    assert_eq!(
        sample(
            &server_text,
            "sigil_server_svids_signed_total",
            &[("type", "jwt")]
        ),
        3.0,
        "{server_text}"
    );
    assert_eq!(
        sample(
            &server_text,
            "sigil_server_svids_signed_total",
            &[("type", "x509")]
        ),
        1.0 + sample(
            &agent_text,
            "sigil_agent_svids_minted_total",
            &[("type", "x509")]
        ),
        "{server_text}"
    );
    assert_eq!(
        sample(
            &server_text,
            "sigil_server_node_attestations_total",
            &[("attestor", "join_token"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(sample(&server_text, "sigil_server_entries", &[]), 1.0);
    assert_eq!(sample(&server_text, "sigil_server_agents", &[]), 1.0);
    assert_eq!(
        sample(
            &server_text,
            "sigil_server_grpc_requests_total",
            &[
                ("method", "/sigil.agent.v1.Node/NewJWTSVID"),
                ("code", "OK")
            ]
        ),
        3.0,
        "{server_text}"
    );
    let token = agent.token().expect("token").to_string();
    let secrets: Vec<&str> = audiences.iter().copied().chain([token.as_str()]).collect();
    assert_no_leak("agent", &agent_text, &secrets);
    assert_no_leak("server", &server_text, &secrets);
    promtool_check("sigil-agent", &agent_text);
    promtool_check("sigil-server", &server_text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_without_metrics_address_opens_no_listener_and_a_bad_address_is_named() {
    // Default off: nothing listens (the port stays free to bind).
    let server = ServerProcess::start(&[]).expect("server");
    assert!(
        !server.log_text().contains("metrics at"),
        "{}",
        server.log_text()
    );
    drop(server);
    let out = std::process::Command::new(sigil_bin())
        .args(["server", "run", "--metrics-address", "localhost:9962"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_address: invalid value \"localhost:9962\" from flag"),
        "{err}"
    );
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn create(netd: &NetdProcess, name: &str, app: &str) -> (String, String) {
    let out = netd
        .cli_ok(&[
            "endpoint",
            "create",
            name,
            "--labels",
            &format!("app={app}"),
            "--spiffe-id",
            &format!("spiffe://example.org/{app}"),
        ])
        .expect("endpoint create");
    let v: Value = serde_json::from_str(&out).expect("json");
    (
        v["netns_name"].as_str().unwrap_or_default().to_owned(),
        v["ipv4"].as_str().unwrap_or_default().to_owned(),
    )
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
"#;

async fn all_flows(socket: &Path) -> Vec<sigil_proto::flow::Flow> {
    let path = socket.to_path_buf();
    let ch = Endpoint::from_static("http://[::]:4244")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("dial the Hubble socket");
    let mut s = ObserverClient::new(ch)
        .get_flows(opb::GetFlowsRequest {
            number: 4095,
            ..Default::default()
        })
        .await
        .expect("GetFlows")
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await.expect("flow") {
        if let Some(opb::get_flows_response::ResponseTypes::Flow(f)) = r.response_types {
            out.push(f);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn netd_hubble_metrics_equal_the_flows_seen_and_pass_promtool() {
    if !sigil_test_util::can_run_with_bpffs("the netd metrics test") {
        return;
    }
    let maddr = metrics_addr();
    let netd = NetdProcess::start_with(
        None,
        "metrics",
        224,
        61,
        &["--metrics-address", &maddr.to_string()],
    )
    .expect("netd");
    let (fe_ns, _) = create(&netd, "metrics-fe", "frontend");
    let (be_ns, be_ip) = create(&netd, "metrics-be", "backend");
    let (it_ns, _) = create(&netd, "metrics-it", "intruder");
    let mut children = Children(Vec::new());
    children.0.push(
        command_in_named_netns(&be_ns, sigil_bin())
            .args(["netd", "echo-server", "--bind", "0.0.0.0:8080"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo server"),
    );
    let start = Instant::now();
    while !probe(&fe_ns, &be_ip, 8080) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "echo never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = netd.root.path().join("policy.yaml");
    std::fs::write(&file, POLICY).expect("write policy");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    for _ in 0..3 {
        assert!(probe(&fe_ns, &be_ip, 8080), "allowed");
        assert!(!probe(&it_ns, &be_ip, 8080), "default deny");
    }
    let hubble = netd.api_socket.with_file_name("hubble.sock");
    // Flows are counted as they are stored: scrape, read the ring, scrape again; when both scrapes
    // agree nothing moved in between, and the ring must hold exactly what was counted.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (text, flows) = loop {
        let a = tokio::task::spawn_blocking(move || scrape(maddr))
            .await
            .expect("scrape");
        let flows = all_flows(&hubble).await;
        let b = tokio::task::spawn_blocking(move || scrape(maddr))
            .await
            .expect("scrape");
        let total = |t: &str| sample(t, "hubble_flows_processed_total", &[]);
        if total(&a) == total(&b) && total(&a) == flows.len() as f64 {
            break (b, flows);
        }
        assert!(
            Instant::now() < deadline,
            "counters never matched the flows: {} vs {}",
            total(&b),
            flows.len()
        );
        tokio::task::yield_now().await;
    };
    let count = |pred: &dyn Fn(&sigil_proto::flow::Flow) -> bool| {
        flows.iter().filter(|f| pred(f)).count() as f64
    };
    let dropped = count(&|f| f.verdict == sigil_proto::flow::Verdict::Dropped as i32);
    let forwarded = count(&|f| f.verdict == sigil_proto::flow::Verdict::Forwarded as i32);
    assert!(dropped >= 3.0 && forwarded >= 3.0, "{dropped} {forwarded}");
    assert_eq!(
        sample(
            &text,
            "hubble_flows_processed_total",
            &[("verdict", "DROPPED"), ("type", "Drop")]
        ),
        dropped,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "hubble_flows_processed_total",
            &[("verdict", "FORWARDED")]
        ),
        forwarded
    );
    let tcp = |f: &sigil_proto::flow::Flow| {
        matches!(
            f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
            Some(sigil_proto::flow::layer4::Protocol::Tcp(_))
        )
    };
    assert_eq!(sample(&text, "hubble_drop_total", &[]), dropped, "{text}");
    assert_eq!(
        sample(
            &text,
            "hubble_drop_total",
            &[("reason", "POLICY_DENIED"), ("protocol", "TCP")]
        ),
        count(&|f| f.verdict == sigil_proto::flow::Verdict::Dropped as i32
            && f.drop_reason_desc == sigil_proto::flow::DropReason::PolicyDenied as i32
            && tcp(f)),
        "{text}"
    );
    let verdicts = count(&|f| f.event_type.as_ref().is_some_and(|e| e.r#type == 5));
    assert_eq!(
        sample(
            &text,
            "hubble_policy_verdicts_total",
            &[("action", "forwarded")]
        ),
        verdicts
    );
    // Connection openers to 8080 only: replies go to ephemeral ports and are not counted.
    let to_8080 = count(&|f| {
        f.verdict == sigil_proto::flow::Verdict::Forwarded as i32
            && f.is_reply == Some(false)
            && matches!(
                f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
                Some(sigil_proto::flow::layer4::Protocol::Tcp(t)) if t.destination_port == 8080
            )
    });
    assert!(to_8080 >= 3.0);
    assert_eq!(
        sample(
            &text,
            "hubble_port_distribution_total",
            &[("protocol", "TCP"), ("port", "8080")]
        ),
        to_8080
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("hubble_port_distribution_total")
                && l.contains("protocol=\"TCP\"")
                && !l.contains("port=\"8080\"")),
        "only the opened TCP port, no ephemeral ones: {text}"
    );
    assert!(
        sample(
            &text,
            "hubble_tcp_flags_total",
            &[("flag", "SYN"), ("family", "IPv4")]
        ) >= 3.0
    );
    assert_eq!(sample(&text, "sigil_netd_endpoints", &[]), 3.0);
    assert!(sample(&text, "sigil_netd_identities", &[]) >= 3.0);
    // Kernel map fill: the imported policy's entries are in the policy map, well under capacity.
    let pm = [("map_name", "sigil_policy")];
    let entries = sample(&text, "sigil_netd_bpf_map_entries", &pm);
    let capacity = sample(&text, "sigil_netd_bpf_map_capacity", &pm);
    assert!(entries >= 1.0, "policy map entries {entries}:\n{text}");
    assert!(capacity > entries, "policy map capacity {capacity}");
    let pressure = sample(&text, "sigil_netd_bpf_map_pressure", &pm);
    assert!(
        (pressure - entries / capacity).abs() < 1e-9,
        "pressure {pressure}"
    );
    assert_eq!(
        sample(
            &text,
            "sigil_netd_policy_import_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "sigil_netd_grpc_requests_total",
            &[
                ("method", "/sigil.netd.v1.Policies/ImportPolicies"),
                ("code", "OK")
            ]
        ),
        1.0
    );
    assert_no_leak("netd", &text, &["metrics-fe", "app=frontend"]);
    let control = tokio::task::spawn_blocking(move || assert_only_metrics_path(maddr));
    control.await.expect("control");
    promtool_check("sigil-netd", &text);
    drop(children);
}
