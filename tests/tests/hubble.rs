//! Hubble's Observer API on a real sigil-netd, as root with real endpoints and real traffic: a
//! Python grpcio client generated from sigil's own observer/flow/relay `.proto` files (a second
//! toolchain) and a tonic client read the flows the traffic produced — allowed, denied by an
//! explicit deny, denied by default deny — with the deciding policy and the SPIFFE ID labels,
//! through filters, `number`, `first`, `since`, `follow`, and `ServerStatus`; bad requests get
//! InvalidArgument. Attacks: another uid cannot connect to the 0600 socket; clients opening more
//! follow streams than allowed are refused while the others (and non-follow calls) keep working.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;
use sigil_proto::observer::observer_client::ObserverClient;
use sigil_test_util::netns::command_in_named_netns;
use sigil_test_util::netns::probe_tcp as probe;
use sigil_test_util::{Children, NetdProcess, sigil_bin};
use tonic::transport::{Channel, Endpoint, Uri};

fn can_run(python: bool) -> bool {
    let check = move || {
        if !python {
            return None;
        }
        match Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .output()
        {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "python3 cannot import grpc/grpc_tools (run scripts/ensure-deps.sh): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run python3: {e}")),
        }
    };
    sigil_test_util::can_run_as_root_and("the Hubble API test", check)
        && sigil_test_util::can_run_with_bpffs("the Hubble API test")
}

struct Ep {
    name: String,
    netns: String,
    ipv4: String,
    identity: u32,
    endpoint_id: u32,
}

fn create(netd: &NetdProcess, name: &str, app: &str, spiffe: &str) -> Ep {
    let labels = format!("app={app}");
    let out = netd
        .cli_ok(&[
            "endpoint",
            "create",
            name,
            "--labels",
            &labels,
            "--spiffe-id",
            spiffe,
        ])
        .expect("endpoint create");
    let v: Value = serde_json::from_str(&out).expect("json");
    Ep {
        name: name.to_owned(),
        netns: v["netns_name"].as_str().unwrap_or_default().to_owned(),
        ipv4: v["ipv4"].as_str().unwrap_or_default().to_owned(),
        identity: u32::try_from(v["identity"].as_u64().unwrap_or(0)).unwrap_or(0),
        endpoint_id: u32::try_from(v["endpoint_id"].as_u64().unwrap_or(0)).unwrap_or(0),
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
  - fromEndpoints: [{matchLabels: {spiffe.io/spiffe-id: "spiffe://example.org/frontend"}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: intruder}}]
"#;

/// A netd with a frontend, a backend (echo on 8080 and 9090) and an intruder, the policy above,
/// and the three kinds of flow made once: frontend→backend:8080 allowed, intruder→backend:8080
/// denied by the explicit deny, frontend→backend:9090 denied by default deny.
struct Setup {
    netd: NetdProcess,
    fe: Ep,
    be: Ep,
    it: Ep,
    _children: Children,
    /// Unix nanoseconds just before the traffic.
    t0: i64,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn setup(tag: &str, b: u8, extra: &[&str]) -> Setup {
    let netd = NetdProcess::start_with(None, tag, 224, b, extra).expect("netd");
    // Names unique to the test: endpoint namespaces are named after them.
    let fe = create(
        &netd,
        &format!("{tag}-fe"),
        "frontend",
        "spiffe://example.org/frontend",
    );
    let be = create(
        &netd,
        &format!("{tag}-be"),
        "backend",
        "spiffe://example.org/backend",
    );
    let it = create(
        &netd,
        &format!("{tag}-it"),
        "intruder",
        "spiffe://example.org/intruder",
    );
    let mut children = Children::default();
    for port in [8080, 9090] {
        let child = command_in_named_netns(&be.netns, sigil_bin())
            .args(["netd", "echo-server", "--bind", &format!("0.0.0.0:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo server");
        children.0.push(child);
    }
    let start = Instant::now();
    while !(probe(&fe.netns, &be.ipv4, 8080) && probe(&fe.netns, &be.ipv4, 9090)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "echo servers never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = netd.root.path().join("policy.yaml");
    std::fs::write(&file, POLICY).expect("write policy");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");
    let t0 = now_ns();
    assert!(probe(&fe.netns, &be.ipv4, 8080), "allowed connection");
    assert!(!probe(&it.netns, &be.ipv4, 8080), "explicit deny");
    assert!(!probe(&fe.netns, &be.ipv4, 9090), "default deny");
    Setup {
        netd,
        fe,
        be,
        it,
        _children: children,
        t0,
    }
}

fn hubble_socket(netd: &NetdProcess) -> PathBuf {
    netd.api_socket.with_file_name("hubble.sock")
}

/// Python stubs generated from our flow/relay/observer protos.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/proto/proto");
        let out = Command::new("python3")
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&protos)
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()))
            .args([
                "flow/flow.proto",
                "relay/relay.proto",
                "observer/observer.proto",
            ])
            .output()
            .context("running grpc_tools.protoc")?;
        if !out.status.success() {
            bail!(
                "grpc_tools.protoc failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Stubs { dir })
    }

    fn command(&self, target: &str, case: &str, args: &[&str]) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/hubble_client.py");
        let mut c = Command::new("python3");
        c.arg(script)
            .arg(self.dir.path())
            .arg(target)
            .arg(case)
            .args(args);
        c
    }

    fn call(&self, target: &str, case: &str, args: &[&str]) -> Value {
        let out = self
            .command(target, case, args)
            .output()
            .expect("python client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{case}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{case}: {e}: {stdout}"))
    }

    fn flows(&self, target: &str, req: Value) -> Vec<Value> {
        let v = self.call(target, "flows", &[&req.to_string(), "100000"]);
        assert_eq!(v["code"], "OK", "{req}: {v}");
        v["responses"].as_array().cloned().unwrap_or_default()
    }
}

fn flows_only(responses: &[Value]) -> Vec<&Value> {
    responses.iter().filter_map(|r| r.get("flow")).collect()
}

fn rfc3339(unix_ns: i64) -> String {
    // protobuf JSON accepts fractional seconds with a Z offset; build it from the epoch.
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .expect("date");
    format!(
        "{}.{nanos:09}Z",
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

#[test]
fn python_client_reads_real_flows_with_filters_number_since_follow_and_status() {
    if !can_run(true) {
        return;
    }
    let s = setup("hubpy", 1, &["--hubble-max-flows", "1000"]);
    let stubs = Stubs::generate().expect("stubs");
    let target = format!("unix:{}", hubble_socket(&s.netd).display());

    // Health of the Observer service, as Hubble's clients ask it.
    let h = stubs.call(&target, "health", &[]);
    assert_eq!(h["status"], "SERVING", "{h}");

    // Everything to the backend on 8080 or 9090: each kind of flow is there with who and why.
    let all = stubs.flows(
        &target,
        // Since the policy: the readiness probes before it were allowed by no rule.
        json!({"since": rfc3339(s.t0), "whitelist": [{"destination_pod": [format!("default/{}", s.be.name)]}]}),
    );
    let flows = flows_only(&all);
    let allowed = flows
        .iter()
        .find(|f| {
            // Each packet is seen twice: leaving fe (egress, not enforced) and entering be.
            f["verdict"] == "FORWARDED"
                && f["source"]["pod_name"] == s.fe.name.as_str()
                && f["event_type"]["type"] == 5
                && f["interface"]["index"] == s.be.endpoint_id
        })
        .unwrap_or_else(|| panic!("no allowed flow: {all:?}"));
    assert_eq!(allowed["traffic_direction"], "INGRESS");
    assert_eq!(allowed["is_reply"], false);
    assert_eq!(allowed["l4"]["TCP"]["destination_port"], 8080);
    assert_eq!(allowed["l4"]["TCP"]["flags"]["SYN"], true);
    assert_eq!(allowed["IP"]["source"], s.fe.ipv4.as_str());
    assert_eq!(allowed["source"]["ID"], s.fe.endpoint_id);
    assert_eq!(allowed["source"]["identity"], s.fe.identity);
    assert_eq!(allowed["source"]["namespace"], "default");
    assert_eq!(allowed["destination"]["identity"], s.be.identity);
    assert_eq!(allowed["node_name"], "e2e");
    let labels = allowed["source"]["labels"].to_string();
    assert!(
        labels.contains("spiffe:spiffe.io/spiffe-id=spiffe://example.org/frontend"),
        "{labels}"
    );
    let by = &allowed["ingress_allowed_by"][0];
    assert_eq!(
        (&by["kind"], &by["namespace"], &by["name"]),
        (
            &json!("CiliumNetworkPolicy"),
            &json!("default"),
            &json!("backend-in")
        ),
        "{allowed}"
    );
    assert!(by["labels"].to_string().contains("spec.ingress[0]"), "{by}");
    assert!(!allowed["uuid"].as_str().unwrap_or("").is_empty());

    let denied = flows
        .iter()
        .find(|f| f["source"]["pod_name"] == s.it.name.as_str() && f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no intruder flow: {all:?}"));
    assert_eq!(denied["verdict"], "DROPPED");
    assert_eq!(denied["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(denied["event_type"], json!({"type": 1, "sub_type": 181}));
    assert_eq!(denied["ingress_denied_by"][0]["name"], "backend-in");
    assert!(
        denied["ingress_denied_by"][0]["labels"]
            .to_string()
            .contains("spec.ingressDeny[0]")
    );
    assert_eq!(denied["source"]["identity"], s.it.identity);

    let default_deny = flows
        .iter()
        .find(|f| f["l4"]["TCP"]["destination_port"] == 9090 && f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no default-deny flow: {all:?}"));
    assert_eq!(default_deny["drop_reason_desc"], "POLICY_DENIED");
    assert!(
        default_deny.get("ingress_denied_by").is_none(),
        "{default_deny}"
    );

    // The reply of the allowed connection: a trace event, is_reply, the connection's direction.
    let replies = stubs.flows(
        &target,
        json!({"whitelist": [{"reply": [true], "source_pod": [format!("default/{}", s.be.name)]}]}),
    );
    let replies = flows_only(&replies);
    // Leaving be, the reply belongs to be's ingress connection; entering fe, to fe's egress one.
    let at = |id: u32| {
        replies
            .iter()
            .find(|f| f["interface"]["index"] == id)
            .unwrap_or_else(|| panic!("no reply flow at {id}: {replies:?}"))
    };
    assert_eq!(at(s.be.endpoint_id)["event_type"]["type"], 4);
    assert_eq!(at(s.be.endpoint_id)["traffic_direction"], "INGRESS");
    assert_eq!(at(s.fe.endpoint_id)["traffic_direction"], "EGRESS");
    assert_eq!(at(s.fe.endpoint_id)["is_reply"], true);

    // Filters: verdict and event type, label selectors with the SPIFFE ID, identity, blacklist.
    let drops = stubs.flows(
        &target,
        json!({"whitelist": [{"event_type": [{"type": 1}]}]}),
    );
    assert!(!drops.is_empty());
    assert!(flows_only(&drops).iter().all(|f| f["verdict"] == "DROPPED"));
    let by_spiffe = stubs.flows(
        &target,
        json!({"whitelist": [{"source_label": ["spiffe.io/spiffe-id=spiffe://example.org/intruder"]}]}),
    );
    assert!(!by_spiffe.is_empty());
    assert!(
        flows_only(&by_spiffe)
            .iter()
            // (IPv6 from `::` at the intruder's veth carries its identity but no endpoint address.)
            .all(|f| f["source"]["identity"] == s.it.identity),
        "{by_spiffe:?}"
    );
    let not_fe = stubs.flows(
        &target,
        json!({"whitelist": [{"destination_identity": [s.be.identity]}],
               "blacklist": [{"source_identity": [s.fe.identity]}]}),
    );
    assert!(!not_fe.is_empty());
    let not_fe = flows_only(&not_fe);
    assert!(
        not_fe
            .iter()
            .all(|f| f["source"]["identity"] != s.fe.identity),
        "{not_fe:?}"
    );
    assert!(
        not_fe
            .iter()
            .any(|f| f["source"]["identity"] == s.it.identity),
        "{not_fe:?}"
    );

    // number = 1: the last matching flow only; first = true: the first.
    let to_be =
        json!([{"destination_pod": [format!("default/{}", s.be.name)], "verdict": ["DROPPED"]}]);
    let last = stubs.flows(&target, json!({"number": 1, "whitelist": to_be}));
    let last = flows_only(&last);
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0]["l4"]["TCP"]["destination_port"], 9090,
        "the default-deny flow came last"
    );
    let first = stubs.flows(
        &target,
        json!({"number": 1, "first": true, "whitelist": to_be}),
    );
    assert_eq!(
        flows_only(&first)[0]["source"]["pod_name"],
        s.it.name.as_str()
    );

    // since: nothing from before the traffic is returned, and a window after it is empty.
    let since = stubs.flows(&target, json!({"since": rfc3339(s.t0)}));
    assert!(flows_only(&since).len() >= 4);
    let after = stubs.flows(&target, json!({"since": rfc3339(now_ns())}));
    assert!(flows_only(&after).is_empty(), "{after:?}");

    // follow: a follower sees new connections as they happen.
    let t1 = now_ns();
    let mut follower = stubs
        .command(
            &target,
            "flows",
            &[
                &json!({"follow": true, "since": rfc3339(t1),
                        "whitelist": [{"source_pod": [format!("default/{}", s.it.name)]}]})
                .to_string(),
                "2",
                "20",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("follower");
    let mut err = BufReader::new(follower.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("follower started");
    assert_eq!(line.trim(), "started");
    let start = Instant::now();
    while follower.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "follower never got 2 flows"
        );
        probe(&s.it.netns, &s.be.ipv4, 8080);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = follower.wait_with_output().expect("follower output");
    let v: Value = serde_json::from_slice(&out.stdout).expect("follower json");
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(
        flows_only(v["responses"].as_array().expect("responses")).len(),
        2
    );

    // ServerStatus counts what it holds.
    let st = stubs.call(&target, "status", &[]);
    assert_eq!(st["code"], "OK", "{st}");
    assert_eq!(st["max_flows"], "1000");
    let num: u64 = st["num_flows"].as_str().unwrap_or("0").parse().unwrap_or(0);
    let seen: u64 = st["seen_flows"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(num >= 6 && seen >= num, "{st}");
    assert!(st["uptime_ns"].as_str().unwrap_or("0") != "0", "{st}");

    // Bad requests: Hubble's InvalidArgument, naming the field.
    for (req, field) in [
        (json!({"first": true, "follow": true}), "first"),
        (
            json!({"whitelist": [{"source_ip": ["10.0.0.300"]}]}),
            "whitelist[0].source_ip[0]",
        ),
        (
            json!({"blacklist": [{"protocol": ["http"]}]}),
            "blacklist[0].protocol[0]",
        ),
    ] {
        let v = stubs.call(&target, "flows", &[&req.to_string(), "10"]);
        assert_eq!(v["code"], "INVALID_ARGUMENT", "{req}: {v}");
        assert!(
            v["details"].as_str().unwrap_or("").starts_with(field),
            "{v}"
        );
    }
}

async fn dial(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://[::]:4244")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("dial the Hubble socket")
}

fn follow_req(pod: &str) -> opb::GetFlowsRequest {
    opb::GetFlowsRequest {
        follow: true,
        whitelist: vec![fpb::FlowFilter {
            source_pod: vec![format!("default/{pod}")],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn flow_of(r: opb::GetFlowsResponse) -> Option<fpb::Flow> {
    match r.response_types? {
        opb::get_flows_response::ResponseTypes::Flow(f) => Some(f),
        _ => None,
    }
}

#[test]
fn tonic_client_follows_flows_and_follow_streams_past_the_limit_are_refused() {
    if !can_run(false) {
        return;
    }
    let port = sigil_test_util::free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = setup(
        "hubtonic",
        2,
        &[
            "--hubble-max-follow-streams",
            "3",
            "--hubble-listen-address",
            &addr,
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let socket = hubble_socket(&s.netd);
    rt.block_on(async {
        let mut c = ObserverClient::new(dial(&socket).await);
        // A follow stream is registered once the call returns: new flows arrive on it.
        let mut req = follow_req(&s.it.name);
        req.whitelist[0].verdict = vec![fpb::Verdict::Dropped as i32];
        let mut stream = c.get_flows(req).await.expect("follow").into_inner();
        let (netns, ip) = (s.it.netns.clone(), s.be.ipv4.clone());
        let traffic = tokio::task::spawn_blocking(move || probe(&netns, &ip, 8080));
        let got = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a flow within 10 s")
            .expect("stream")
            .and_then(flow_of)
            .expect("a flow");
        assert!(!traffic.await.expect("probe"), "the intruder stays denied");
        assert_eq!(got.verdict, fpb::Verdict::Dropped as i32);
        assert_eq!(got.drop_reason_desc, fpb::DropReason::PolicyDeny as i32);
        assert_eq!(got.source.as_ref().map(|e| e.identity), Some(s.it.identity));

        // Attack: more follow streams than allowed, from separate connections. Two more fit
        // (three in all), every further one is refused with ResourceExhausted.
        let mut held = vec![stream];
        for _ in 0..2 {
            let mut c = ObserverClient::new(dial(&socket).await);
            held.push(
                c.get_flows(follow_req(&s.fe.name))
                    .await
                    .expect("within the limit")
                    .into_inner(),
            );
        }
        for _ in 0..50 {
            let mut c = ObserverClient::new(dial(&socket).await);
            let e = c
                .get_flows(follow_req(&s.fe.name))
                .await
                .expect_err("over the limit");
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        }
        // Control: non-follow calls and the status still work meanwhile, over TCP too.
        let mut tcp = ObserverClient::new(
            Endpoint::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("TCP"),
        );
        let mut last = tcp
            .get_flows(opb::GetFlowsRequest {
                number: 2,
                ..Default::default()
            })
            .await
            .expect("non-follow")
            .into_inner();
        let mut n = 0;
        while let Some(r) = last.message().await.expect("read") {
            n += usize::from(flow_of(r).is_some());
        }
        assert_eq!(n, 2);
        let st = tcp
            .server_status(opb::ServerStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(st.max_flows, 4095);
        assert!(st.seen_flows >= 4, "{st:?}");
        // Closing a follower frees its place.
        drop(held.pop());
        let start = Instant::now();
        loop {
            let mut c = ObserverClient::new(dial(&socket).await);
            match c.get_flows(follow_req(&s.fe.name)).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "the place was never freed"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // Bad requests are InvalidArgument for tonic too.
        let e = c
            .get_flows(opb::GetFlowsRequest {
                first: true,
                follow: true,
                ..Default::default()
            })
            .await
            .expect_err("first with follow");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
}

#[test]
fn another_uid_cannot_connect_to_the_hubble_socket() {
    if !can_run(false) {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: needs setpriv (util-linux)");
        return;
    }
    // The socket in a directory everyone may traverse (0755), so only the socket's own mode stands
    // between another user and the flows.
    let dir = PathBuf::from(format!("/tmp/sigil-hubble-{}", std::process::id()));
    struct RmDir(PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(dir.clone());
    let socket = dir.join("hubble.sock");
    let netd = NetdProcess::start_with(
        None,
        "hubuid",
        224,
        3,
        &["--hubble-socket", &socket.display().to_string()],
    )
    .expect("netd");
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777,
        0o755
    );
    let health = |nobody: bool| {
        let mut c = if nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(sigil_bin());
            c
        } else {
            Command::new(sigil_bin())
        };
        c.args(["netd", "healthcheck", "--api-socket"])
            .arg(&socket)
            .output()
            .expect("healthcheck")
    };
    // Control: root (netd's user) reaches the Observer's health service.
    let ok = health(false);
    assert!(ok.status.success(), "{ok:?}");
    // Attack: nobody is refused by the kernel at connect.
    let denied = health(true);
    assert!(!denied.status.success(), "{denied:?}");
    let text = String::from_utf8_lossy(&denied.stderr);
    assert!(text.to_lowercase().contains("permission denied"), "{text}");
    drop(netd);
}
