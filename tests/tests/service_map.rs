//! netd's live service map (`--ui-address`) with a real netd, real endpoints and real traffic,
//! rendered by a real headless browser (Debian's chromium): a frontend, a backend and an "evil"
//! endpoint whose label is markup, a policy allowing frontend → backend and denying evil; the
//! page shows the SPIFFE IDs, a red (`denied`) edge evil → backend with the deciding rule, a
//! green edge frontend → backend; `/api/graph` counts equal the flows the Hubble API holds and
//! what the traffic produced; the markup label is text, never run; other paths 404, other
//! methods 405, a foreign Host is refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;
use sigil_proto::observer::observer_client::ObserverClient;
use sigil_test_util::netns::command_in_named_netns;
use sigil_test_util::netns::probe_tcp as probe;
use sigil_test_util::{Children, NetdProcess, free_port, sigil_bin};
use tonic::transport::{Channel, Endpoint, Uri};

const CHROMIUM: &str = "chromium";

fn can_run() -> bool {
    let browser = || match Command::new(CHROMIUM).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "{CHROMIUM} --version failed (run scripts/ensure-deps.sh): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "cannot run {CHROMIUM} (run scripts/ensure-deps.sh): {e}"
        )),
    };
    sigil_test_util::can_run_as_root_and("the service map test", browser)
        && sigil_test_util::can_run_with_bpffs("the service map test")
}

struct Ep {
    netns: String,
    ipv4: String,
    identity: u64,
}

fn create(netd: &NetdProcess, name: &str, labels: &str, spiffe: &str) -> Ep {
    let out = netd
        .cli_ok(&[
            "endpoint",
            "create",
            name,
            "--labels",
            labels,
            "--spiffe-id",
            spiffe,
        ])
        .expect("endpoint create");
    let v: Value = serde_json::from_str(&out).expect("json");
    Ep {
        netns: v["netns_name"].as_str().unwrap_or_default().to_owned(),
        ipv4: v["ipv4"].as_str().unwrap_or_default().to_owned(),
        identity: v["identity"].as_u64().unwrap_or(0),
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
  - fromEndpoints: [{matchLabels: {role: evil}}]
"#;

/// The hostile label value: markup that would change the page's title if it ever ran.
const MARKUP: &str = "<script>document.title='pwned'</script>";

/// One HTTP/1.1 request on a new connection: (status code, head, body).
fn http(addr: SocketAddr, method: &str, path: &str, host: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the service map");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_owned(), body.to_owned())
}

fn graph(addr: SocketAddr) -> Value {
    let (code, head, body) = http(addr, "GET", "/api/graph", &addr.to_string());
    assert_eq!(code, 200, "{head}");
    serde_json::from_str(&body).expect("graph JSON")
}

/// (src, dst) → (allowed, denied, replies) of a graph.
type Counts = BTreeMap<(u64, u64), (u64, u64, u64)>;

fn edge_counts(g: &Value) -> Counts {
    g["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .map(|e| {
                    let n = |k: &str| e[k].as_u64().unwrap_or(0);
                    (
                        (n("src"), n("dst")),
                        (n("allowed"), n("denied"), n("replies")),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
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

/// The same counts computed from every flow the Hubble API holds: the ground truth.
fn hubble_counts(rt: &tokio::runtime::Runtime, socket: &Path) -> (u64, Counts) {
    rt.block_on(async {
        let mut c = ObserverClient::new(dial(socket).await);
        let mut s = c
            .get_flows(opb::GetFlowsRequest {
                number: 100_000,
                ..Default::default()
            })
            .await
            .expect("GetFlows")
            .into_inner();
        let (mut flows, mut counts) = (0, Counts::new());
        while let Some(r) = s.message().await.expect("read flows") {
            let Some(opb::get_flows_response::ResponseTypes::Flow(f)) = r.response_types else {
                continue;
            };
            let id = |e: &Option<fpb::Endpoint>| u64::from(e.as_ref().map_or(0, |e| e.identity));
            let (src, dst) = (id(&f.source), id(&f.destination));
            flows += 1;
            if f.is_reply == Some(true) {
                counts.entry((dst, src)).or_default().2 += 1;
            } else if f.verdict == fpb::Verdict::Dropped as i32 {
                counts.entry((src, dst)).or_default().1 += 1;
            } else {
                counts.entry((src, dst)).or_default().0 += 1;
            }
        }
        (flows, counts)
    })
}

/// The page as a headless chromium renders it after its scripts ran (`--dump-dom`).
fn render(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("timeout")
        .args(["120", CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed: {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[test]
fn a_headless_browser_shows_identities_and_a_red_edge_for_denied_flows() {
    if !can_run() {
        return;
    }
    let ui: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let ui_flag = ui.to_string();
    let netd = NetdProcess::start_with(
        None,
        "smap",
        229,
        1,
        &["--ui-address", &ui_flag, "--hubble-max-flows", "100000"],
    )
    .expect("netd");
    let fe = create(
        &netd,
        "smap-fe",
        "app=frontend",
        "spiffe://example.org/frontend",
    );
    let be = create(
        &netd,
        "smap-be",
        "app=backend",
        "spiffe://example.org/backend",
    );
    let evil = create(
        &netd,
        "smap-evil",
        &format!("app={MARKUP},role=evil"),
        "spiffe://example.org/evil",
    );
    let mut children = Children::default();
    children.0.push(
        command_in_named_netns(&be.netns, sigil_bin())
            .args(["netd", "echo-server", "--bind", "0.0.0.0:8080"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo server"),
    );
    let start = Instant::now();
    while !probe(&fe.netns, &be.ipv4, 8080) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "echo server never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let file = netd.root.path().join("policy.yaml");
    std::fs::write(&file, POLICY).expect("write policy");
    netd.cli_ok(&["policy", "import", &file.display().to_string()])
        .expect("import");

    // Traffic: 3 allowed connections, 2 denied ones. Each allowed connection is one flow leaving
    // the frontend and one entering the backend (new connections are reported once per
    // observation point); each denied one is one dropped SYN at the backend (the probe gives
    // up before a retransmission) and one allowed flow leaving evil (egress is not enforced).
    let before = edge_counts(&graph(ui));
    let fe_be = (fe.identity, be.identity);
    let evil_be = (evil.identity, be.identity);
    for _ in 0..3 {
        assert!(probe(&fe.netns, &be.ipv4, 8080), "allowed connection");
    }
    for _ in 0..2 {
        assert!(!probe(&evil.netns, &be.ipv4, 8080), "evil is denied");
    }
    let was = |k| before.get(&k).copied().unwrap_or_default();
    let want_fe_be = (was(fe_be).0 + 6, 0, was(fe_be).2 + 6);
    let want_evil_be = (was(evil_be).0 + 2, was(evil_be).1 + 2, was(evil_be).2);
    let start = Instant::now();
    loop {
        let now = edge_counts(&graph(ui));
        if now.get(&fe_be) == Some(&want_fe_be) && now.get(&evil_be) == Some(&want_evil_be) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "graph never reached frontend→backend {want_fe_be:?} and evil→backend {want_evil_be:?}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The graph equals what the Hubble API holds, edge by edge (IPv6 noise included); nothing
    // missed, nothing over the bound.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let hubble = netd.api_socket.with_file_name("hubble.sock");
    let start = Instant::now();
    let g = loop {
        let (flows, truth) = hubble_counts(&rt, &hubble);
        let g = graph(ui);
        if g["flows"].as_u64() == Some(flows) && edge_counts(&g) == truth {
            break g;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "graph {} flows {:?} != Hubble {flows} flows {truth:?}",
            g["flows"],
            edge_counts(&g)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        (&g["flows_dropped"], &g["flows_missed"]),
        (&Value::from(0), &Value::from(0))
    );
    assert_eq!(g["node_name"], "e2e");
    let edge = |k: (u64, u64)| {
        g["edges"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| e["src"].as_u64() == Some(k.0) && e["dst"].as_u64() == Some(k.1))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no edge {k:?}: {g}"))
    };
    let denied = edge(evil_be);
    assert_eq!(denied["drop_reasons"]["POLICY_DENY"], 2, "{denied}");
    let deny = denied["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["verdict"] == "denied"))
        .unwrap_or_else(|| panic!("no deny rule: {denied}"));
    assert_eq!(
        (
            &deny["kind"],
            &deny["namespace"],
            &deny["name"],
            &deny["rule"],
            &deny["direction"]
        ),
        (
            &Value::from("CiliumNetworkPolicy"),
            &Value::from("default"),
            &Value::from("backend-in"),
            &Value::from("spec.ingressDeny[0]"),
            &Value::from("ingress")
        ),
        "{denied}"
    );
    assert_eq!(deny["count"], 2);
    let allowed = edge(fe_be);
    assert!(
        allowed["policies"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["rule"] == "spec.ingress[0]" && p["verdict"] == "allowed")),
        "{allowed}"
    );
    assert!(
        allowed["ports"].to_string().contains("TCP/8080"),
        "{allowed}"
    );
    let ids = g["identities"].as_array().cloned().unwrap_or_default();
    let id = |n: u64| {
        ids.iter()
            .find(|i| i["id"].as_u64() == Some(n))
            .cloned()
            .unwrap_or_else(|| panic!("no identity {n}: {g}"))
    };
    assert_eq!(
        id(fe.identity)["spiffe_id"],
        "spiffe://example.org/frontend"
    );
    assert_eq!(id(be.identity)["spiffe_id"], "spiffe://example.org/backend");
    assert!(
        id(be.identity)["endpoints"]
            .to_string()
            .contains("default/smap-be")
    );
    // The markup is data in the JSON, as it was given.
    assert!(
        id(evil.identity)["labels"]
            .to_string()
            .contains(&format!("k8s:app={MARKUP}")),
        "{}",
        id(evil.identity)
    );

    // The page in a real browser: boxes with the SPIFFE IDs, a red edge evil → backend, a green
    // one frontend → backend, the markup label shown as text.
    let base = format!("http://{ui}/");
    let dom = render(&base);
    for spiffe in [
        "spiffe://example.org/frontend",
        "spiffe://example.org/backend",
        "spiffe://example.org/evil",
    ] {
        assert!(dom.contains(spiffe), "{spiffe} not on the page: {dom}");
    }
    for n in [fe.identity, be.identity, evil.identity] {
        assert!(
            dom.contains(&format!("<g class=\"identity\" data-identity=\"{n}\">")),
            "no box for identity {n}: {dom}"
        );
    }
    let red = format!(
        "class=\"edge denied\" data-src=\"{}\" data-dst=\"{}\"",
        evil.identity, be.identity
    );
    let green = format!(
        "class=\"edge allowed\" data-src=\"{}\" data-dst=\"{}\"",
        fe.identity, be.identity
    );
    assert!(
        dom.contains(&format!("<g {red}>")) && dom.contains(&format!("<li {red}")),
        "no red edge evil → backend: {dom}"
    );
    assert!(
        dom.contains(&format!("<g {green}>")) && dom.contains(&format!("<li {green}")),
        "no green edge frontend → backend: {dom}"
    );
    // XSS control: the label is escaped text; the script never ran (the title is the page's).
    assert!(
        dom.contains("k8s:app=&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "the markup label is not shown as text: {dom}"
    );
    assert!(
        !dom.contains(MARKUP),
        "the markup label became markup: {dom}"
    );
    assert!(dom.contains("<title>sigil service map</title>"), "{dom}");

    // Clicking an edge shows its verdicts and deciding rules (selected by the URL's fragment,
    // the same path a click takes).
    let dom = render(&format!("{base}#edge={}-{}", evil.identity, be.identity));
    let details = dom
        .split("<aside id=\"details\"")
        .nth(1)
        .and_then(|d| d.split("</aside>").next())
        .unwrap_or_else(|| panic!("no details panel: {dom}"));
    for want in [
        "spiffe://example.org/evil → spiffe://example.org/backend",
        "denied 2",
        "POLICY_DENY 2",
        "backend-in",
        "spec.ingressDeny[0]",
        "CiliumNetworkPolicy",
    ] {
        assert!(
            details.contains(want),
            "{want:?} not in the details: {details}"
        );
    }

    // Other paths 404, other methods 405, a foreign Host 403 — each with the CSP; HEAD works.
    let host = ui.to_string();
    for path in ["/nope", "/api/graph/x", "/index.html", "/.git/config"] {
        let (code, head, _) = http(ui, "GET", path, &host);
        assert_eq!(code, 404, "{path}: {head}");
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
    }
    for m in ["POST", "PUT", "DELETE"] {
        assert_eq!(http(ui, m, "/api/graph", &host).0, 405, "{m}");
    }
    let (code, _, body) = http(
        ui,
        "GET",
        "/api/graph",
        &format!("rebind.example:{}", ui.port()),
    );
    assert_eq!(code, 403);
    assert!(!body.contains("spiffe"), "{body}");
    let (code, head, body) = http(ui, "HEAD", "/", &host);
    assert_eq!((code, body.as_str()), (200, ""), "{head}");
    drop(children);
    drop(netd);
}
