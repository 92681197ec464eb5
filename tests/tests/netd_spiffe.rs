//! Issue 10 end to end, as root: real sigil server, agent and netd processes; netd asks the
//! agent's Delegated Identity API for each endpoint's SVID with the endpoint's k8s selectors, the
//! SVID's SPIFFE ID becomes the endpoint's label and identity, and a policy on SPIFFE IDs is
//! enforced on real TCP in real namespaces. Entry deletion cuts established connections, the
//! agent going away keeps identities, new endpoints fall back and are upgraded, a pending
//! endpoint cannot pass a SPIFFE-ID deny, and netd refuses to start as a non-delegate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_test_util::netns::probe_tcp as probe;
use sigil_test_util::{AgentProcess, Children, NetdProcess, ServerProcess, sigil_bin};

const TD: &str = "identity.example.com";

fn can_run() -> bool {
    sigil_test_util::can_run_as_root_and("the netd SPIFFE test", || {
        sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))
            .err()
            .map(|e| format!("no bpffs: {e}"))
    })
}

/// Server, agent (netd an authorized delegate, registered as `unix:uid:0`) and netd in spiffe
/// mode.
struct Stack {
    server: ServerProcess,
    agent: AgentProcess,
    netd: NetdProcess,
    tag: String,
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

fn entry_create(server: &ServerProcess, agent: &AgentProcess, id: &str, selectors: &[&str]) {
    let parent = agent_id(agent);
    let mut args = vec!["entry", "create", "--spiffe-id", id, "--parent-id", &parent];
    for s in selectors {
        args.extend(["--selector", s]);
    }
    let out = server.cli(&args).expect("cli");
    assert!(
        out.status.success(),
        "entry create {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn entry_delete(server: &ServerProcess, id: &str) {
    let out = server
        .cli(&["entry", "show", "--spiffe-id", id, "--output", "json"])
        .expect("cli");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let list = v.get("entries").cloned().unwrap_or(v);
    let entry_id = list[0]["id"].as_str().expect("entry id").to_string();
    let out = server
        .cli(&["entry", "delete", "--entry-id", &entry_id])
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls the agent's Delegated Identity API as root (the test process has netd's selectors)
/// until it serves delegates: the netd entry reached the agent.
fn wait_delegate(agent: &AgentProcess) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in_runtime = rt.enter();
    let client = sigil_delegated_client::Client::new(&agent.admin_socket);
    let start = Instant::now();
    loop {
        match rt.block_on(client.check()) {
            Ok(()) => return,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(20),
                "agent never served the delegate: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Stack {
    fn start(tag: &str, a: u8, b: u8, fallback_wait: &str) -> Self {
        let server = ServerProcess::start(&[]).expect("server");
        let delegate = format!("spiffe://{TD}/netd");
        let agent =
            AgentProcess::start(&server, &["--authorized-delegate", &delegate]).expect("agent");
        entry_create(&server, &agent, &delegate, &["unix:uid:0"]);
        wait_delegate(&agent);
        let socket = agent.admin_socket.display().to_string();
        let netd = NetdProcess::start_with(
            None,
            tag,
            a,
            b,
            &[
                "--agent-socket",
                &socket,
                "--identity-fallback-wait",
                fallback_wait,
            ],
        )
        .expect("netd");
        Stack {
            server,
            agent,
            netd,
            tag: format!("{}{tag}", std::process::id() % 100_000),
        }
    }

    /// A unique endpoint name for `base`.
    fn name(&self, base: &str) -> String {
        format!("{base}{}", self.tag)
    }

    fn create(&self, base: &str, app: &str) -> serde_json::Value {
        self.create_with(base, app, &[])
    }

    /// Created with `--no-wait`: returned while its identity is still pending.
    fn create_pending(&self, base: &str, app: &str) -> serde_json::Value {
        self.create_with(base, app, &["--no-wait"])
    }

    fn create_with(&self, base: &str, app: &str, extra: &[&str]) -> serde_json::Value {
        let name = self.name(base);
        let labels = format!("app={app}");
        let mut args = vec!["endpoint", "create", &name, "--labels", &labels];
        args.extend(extra);
        let out = self.netd.cli_ok(&args).expect("endpoint create");
        serde_json::from_str(&out).expect("json")
    }

    fn get(&self, base: &str) -> serde_json::Value {
        let out = self
            .netd
            .cli_ok(&["endpoint", "get", &self.name(base)])
            .expect("endpoint get");
        serde_json::from_str(&out).expect("json")
    }

    /// Polls `endpoint get` until `pred` holds; returns the endpoint and the time it took.
    fn wait(
        &self,
        base: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Duration) {
        let start = Instant::now();
        loop {
            let v = self.get(base);
            if pred(&v) {
                return (v, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "{base}: never {what}; last {v}\nnetd log:\n{}",
                self.netd.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_registered(&self, base: &str, id: &str) -> serde_json::Value {
        self.wait(base, "registered", Duration::from_secs(20), |v| {
            v["spiffe_id_source"] == "registered" && v["spiffe_id"] == id
        })
        .0
    }

    fn import(&self, name: &str, yaml: &str) {
        let file = self.netd.root.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).expect("write policy");
        self.netd
            .cli_ok(&["policy", "import", &file.display().to_string()])
            .expect("import");
    }
}

fn netns(v: &serde_json::Value) -> String {
    v["netns_name"].as_str().unwrap_or_default().to_owned()
}

fn ipv4(v: &serde_json::Value) -> String {
    v["ipv4"].as_str().unwrap_or_default().to_owned()
}

/// Polls `probe` until the echo server answers (servers start asynchronously).
fn wait_server(netns: &str, addr: &str, port: u16) {
    let start = Instant::now();
    while !probe(netns, addr, port) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{addr}:{port} never answered from {netns}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A TCP connection opened from inside a namespace (the socket stays in it).
fn connect_in(netns: &str, addr: &str, port: u16) -> TcpStream {
    let path = format!("/run/netns/{netns}");
    let target = format!("{addr}:{port}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpStream::connect_timeout(&target.parse().expect("addr"), Duration::from_secs(2))
            .expect("connect")
    })
    .join()
    .expect("thread")
}

/// Whether a fresh payload comes back within `wait` (late echoes of earlier payloads, sent
/// before a cut and delivered after a timeout, are skipped).
fn echo(s: &mut TcpStream, wait: Duration) -> bool {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_be_bytes();
    if s.write_all(&n).is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        match s.read_exact(&mut buf) {
            Ok(()) if buf == n => return true,
            Ok(()) => continue,
            Err(_) => return false,
        }
    }
}

/// The private key of the endpoint's SVID (fetched here as a delegate, with the endpoint's
/// selectors) is nowhere in netd's files (state, log): raw DER, base64 or hex.
fn assert_no_key_at_rest(st: &Stack, ep: &serde_json::Value) {
    let selectors: Vec<sigil_registry::Selector> = ep["selectors"]
        .as_array()
        .expect("selectors")
        .iter()
        .map(|s| sigil_registry::Selector::parse(s.as_str().unwrap_or_default()).expect("selector"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in_runtime = rt.enter();
    let client = sigil_delegated_client::Client::new(&st.agent.admin_socket);
    let mut watch = client.watch_x509_svids(selectors);
    let key = loop {
        match rt.block_on(watch.next()) {
            Some(sigil_delegated_client::Update::Current(list)) if !list.is_empty() => {
                assert_eq!(
                    list[0].spiffe_id.to_string(),
                    ep["spiffe_id"].as_str().unwrap_or("")
                );
                break list[0].key.pkcs8_der().to_vec();
            }
            Some(sigil_delegated_client::Update::Error(e)) => panic!("delegated API: {e}"),
            Some(_) => {}
            None => panic!("watch ended"),
        }
    };
    assert!(key.len() > 32, "a real key");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
    let hex = hex::encode(&key);
    let mut stack = vec![st.netd.root.path().to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let bytes = std::fs::read(&path).expect("read");
                files += 1;
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !bytes.windows(key.len()).any(|w| w == key.as_slice())
                        && !text.contains(&b64[..40])
                        && !text.contains(&hex[..64])
                        && !text.contains("PRIVATE KEY"),
                    "the SVID key is in {}",
                    path.display()
                );
            }
        }
    }
    assert!(files >= 2, "state file and log were scanned");
}

#[test]
fn policy_trace_takes_spiffe_ids_and_names_a_bad_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let pol = dir.path().join("p.yaml");
    std::fs::write(&pol, backend_policy()).expect("write");
    let trace = |extra: &[&str]| {
        Command::new(sigil_bin())
            .args(["policy", "trace", "--policies"])
            .arg(&pol)
            .args(["--dst", "app=backend,io.kubernetes.pod.namespace=default"])
            .args(["--dport", "8080", "--output", "json"])
            .args(extra)
            .output()
            .expect("trace")
    };
    let fe = format!("spiffe://{TD}/frontend");
    let verdict = |extra: &[&str]| {
        let out = trace(extra);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["verdict"].as_str().unwrap_or_default().to_owned()
    };
    // Added to --src labels: the namespaced policy matches.
    let ns = "io.kubernetes.pod.namespace=default";
    assert_eq!(verdict(&["--src", ns, "--src-spiffe-id", &fe]), "allowed");
    let other = format!("spiffe://{TD}/x");
    assert_eq!(verdict(&["--src", ns, "--src-spiffe-id", &other]), "denied");
    // Alone: an endpoint with only that label (outside the policy's namespace).
    assert_eq!(verdict(&["--src-spiffe-id", &fe]), "denied");
    let out = trace(&["--src-spiffe-id", "http://frontend"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--src-spiffe-id") && err.contains("http://frontend"),
        "{err}"
    );
    let out = trace(&["--src-entity", "world", "--src-spiffe-id", &fe]);
    assert!(!out.status.success(), "an entity has no SPIFFE ID");
    let out = trace(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--src-spiffe-id"),
        "{err}"
    );
}

/// Into the backend only from the frontend's SPIFFE ID, on 8080.
fn backend_policy() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: backend-spiffe, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n\
         \x20 - fromEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"spiffe://{TD}/frontend\"}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n"
    )
}

#[test]
fn spiffe_ids_from_the_agent_are_enforced_and_entry_changes_cut_connections() {
    if !can_run() {
        return;
    }
    let st = Stack::start("sp1", 220, 1, "1s");
    let (fe_id, be_id) = (
        format!("spiffe://{TD}/frontend"),
        format!("spiffe://{TD}/backend"),
    );
    entry_create(
        &st.server,
        &st.agent,
        &be_id,
        &["k8s:ns:default", "k8s:pod-label:app:backend"],
    );
    entry_create(
        &st.server,
        &st.agent,
        &fe_id,
        &["k8s:ns:default", "k8s:pod-label:app:frontend"],
    );
    let be = st.create_pending("be", "backend");
    // A new endpoint in spiffe mode starts pending, with the reserved init identity.
    assert_eq!(be["spiffe_id_source"], "pending", "{be}");
    assert_eq!(be["identity"], 5, "{be}");
    st.create("fe", "frontend");
    st.create_pending("ot", "other");
    let be = st.wait_registered("be", &be_id);
    let fe = st.wait_registered("fe", &fe_id);
    assert!(
        be["labels"]
            .to_string()
            .contains(&format!("spiffe:spiffe.io/spiffe-id={be_id}")),
        "{be}"
    );
    assert!(
        be["selectors"]
            .to_string()
            .contains("k8s:pod-label:app:backend"),
        "{be}"
    );
    assert!(be["svid_expires_at"].as_i64().unwrap_or(0) > sigil_e2e::unix_now());
    // No entry for "other": classic labels after the wait, said so.
    let (ot, _) = st.wait("ot", "classic-fallback", Duration::from_secs(10), |v| {
        v["spiffe_id_source"] == "classic-fallback"
    });
    assert!(ot["spiffe_id"].is_null(), "{ot}");
    assert_ne!(ot["identity"], 5, "{ot}");
    assert!(
        st.netd
            .log_text()
            .contains("endpoint falls back to its classic labels"),
        "the fallback is logged"
    );
    let list = st
        .netd
        .cli_ok(&["endpoint", "list", "--output", "text"])
        .expect("list");
    assert!(
        list.contains("SPIFFE ID") && list.contains(&fe_id),
        "{list}"
    );

    assert_no_key_at_rest(&st, &fe);

    st.import("backend", &backend_policy());
    let mut children = Children::default();
    children.echo(&netns(&be), 8080);
    let bip = ipv4(&be);
    // The frontend's SPIFFE ID is admitted; the other endpoint is refused (control and attack).
    wait_server(&netns(&fe), &bip, 8080);
    assert!(
        !probe(&netns(&ot), &bip, 8080),
        "an endpoint without the SPIFFE ID got in"
    );

    // `policy trace` by SPIFFE ID agrees.
    let pol = st.netd.root.path().join("backend.yaml");
    let pol = pol.display().to_string();
    let trace = |src: &str| {
        let out = Command::new(sigil_bin())
            .args(["policy", "trace", "--policies", &pol, "--src"])
            .arg("io.kubernetes.pod.namespace=default")
            .args(["--src-spiffe-id", src])
            .args(["--dst", "app=backend,io.kubernetes.pod.namespace=default"])
            .args(["--dport", "8080", "--output", "json"])
            .output()
            .expect("trace");
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["verdict"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(trace(&fe_id), "allowed");
    assert_eq!(trace(&format!("spiffe://{TD}/other")), "denied");

    // Deleting the frontend's entry cuts the established connection within a second.
    let mut conn = connect_in(&netns(&fe), &bip, 8080);
    assert!(echo(&mut conn, Duration::from_secs(2)), "before the delete");
    entry_delete(&st.server, &fe_id);
    let deleted = Instant::now();
    let cut = loop {
        let sent = Instant::now();
        if !echo(&mut conn, Duration::from_millis(100)) {
            break sent.duration_since(deleted);
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "the connection was never cut"
        );
    };
    assert!(
        !echo(&mut conn, Duration::from_secs(1)),
        "the connection still passes after {cut:?}: {}\nnetd log:\n{}",
        st.get("fe"),
        st.netd.log_text()
    );
    // The first echo that failed was sent `cut` after the delete and waited 100 ms.
    let cut = cut + Duration::from_millis(100);
    eprintln!("entry deleted -> established connection cut within {cut:?}");
    assert!(cut < Duration::from_secs(1), "cut after {cut:?}");
    let fe = st.get("fe");
    assert_eq!(fe["spiffe_id_source"], "classic-fallback", "{fe}");
    assert!(!probe(&netns(&fe), &bip, 8080), "new connections refused");

    // Creating it again restores it.
    entry_create(
        &st.server,
        &st.agent,
        &fe_id,
        &["k8s:ns:default", "k8s:pod-label:app:frontend"],
    );
    st.wait_registered("fe", &fe_id);
    assert!(probe(&netns(&fe), &bip, 8080), "restored after re-creation");
    for base in ["fe", "be", "ot"] {
        st.netd
            .cli_ok(&["endpoint", "delete", &st.name(base)])
            .expect("delete");
    }
}

#[test]
fn agent_loss_keeps_identities_and_new_endpoints_fall_back_then_upgrade() {
    if !can_run() {
        return;
    }
    let mut st = Stack::start("sp2", 220, 2, "1s");
    let (fe_id, be_id, late_id) = (
        format!("spiffe://{TD}/frontend"),
        format!("spiffe://{TD}/backend"),
        format!("spiffe://{TD}/late"),
    );
    for (id, app) in [
        (&fe_id, "frontend"),
        (&be_id, "backend"),
        (&late_id, "late"),
    ] {
        let app = format!("k8s:pod-label:app:{app}");
        entry_create(&st.server, &st.agent, id, &["k8s:ns:default", &app]);
    }
    st.create("be", "backend");
    st.create("fe", "frontend");
    let be = st.wait_registered("be", &be_id);
    let fe = st.wait_registered("fe", &fe_id);
    st.import("backend", &backend_policy());
    let mut children = Children::default();
    children.echo(&netns(&be), 8080);
    let bip = ipv4(&be);
    wait_server(&netns(&fe), &bip, 8080);
    let mut conn = connect_in(&netns(&fe), &bip, 8080);
    assert!(echo(&mut conn, Duration::from_secs(2)));

    // Agent killed: identities and enforcement stay.
    st.agent.kill9();
    assert!(echo(&mut conn, Duration::from_secs(2)), "established");
    assert!(probe(&netns(&fe), &bip, 8080), "new connection");
    let fe_now = st.get("fe");
    assert_eq!(fe_now["spiffe_id_source"], "registered", "{fe_now}");
    assert_eq!(fe_now["identity"], fe["identity"], "{fe_now}");

    // A new endpoint falls back to its classic labels after the wait.
    let late = st.create_pending("late", "late");
    assert_eq!(late["spiffe_id_source"], "pending", "{late}");
    let (late, waited) = st.wait("late", "classic-fallback", Duration::from_secs(10), |v| {
        v["spiffe_id_source"] == "classic-fallback"
    });
    assert!(
        waited >= Duration::from_millis(500),
        "fell back after {waited:?}"
    );
    assert_ne!(late["identity"], 5, "{late}");
    // Enforcement stays: the fallen-back endpoint is refused by the SPIFFE-ID policy, and
    // the frontend still gets in (control).
    assert!(
        !probe(&netns(&late), &bip, 8080),
        "fallback endpoint got in"
    );
    assert!(probe(&netns(&fe), &bip, 8080), "control");

    // netd restarted while the agent is gone: recorded identities stay, no drop to pending.
    st.netd.kill9();
    st.netd.spawn().expect("netd restart");
    let fe_now = st.get("fe");
    assert_eq!(fe_now["spiffe_id_source"], "registered", "{fe_now}");
    assert_eq!(fe_now["identity"], fe["identity"], "{fe_now}");
    assert!(
        echo(&mut conn, Duration::from_secs(2)),
        "after netd restart"
    );

    // Agent back: the fallen-back endpoint is upgraded.
    st.agent.spawn().expect("agent restart");
    let late = st.wait_registered("late", &late_id);
    assert_ne!(late["identity"], 5);
    assert!(
        echo(&mut conn, Duration::from_secs(2)),
        "after agent restart"
    );
    for base in ["fe", "be", "late"] {
        st.netd
            .cli_ok(&["endpoint", "delete", &st.name(base)])
            .expect("delete");
    }
}

/// The attack: a deny on a SPIFFE ID beside an allow from `all`. An endpoint whose SVID has not
/// come yet (pending) must not get through the allow while it cannot yet be denied by its ID;
/// nor may anything reach it. Control: a registered endpoint passes the allow.
#[test]
fn a_pending_endpoint_cannot_bypass_a_spiffe_id_deny() {
    if !can_run() {
        return;
    }
    // A long wait keeps the endpoint without an entry pending through the attack.
    let st = Stack::start("sp3", 220, 3, "60s");
    let (good_id, be_id, evil_id) = (
        format!("spiffe://{TD}/good"),
        format!("spiffe://{TD}/backend"),
        format!("spiffe://{TD}/evil"),
    );
    for (id, app) in [(&good_id, "good"), (&be_id, "backend")] {
        let app = format!("k8s:pod-label:app:{app}");
        entry_create(&st.server, &st.agent, id, &["k8s:ns:default", &app]);
    }
    st.create("be", "backend");
    st.create("good", "good");
    let be = st.wait_registered("be", &be_id);
    let good = st.wait_registered("good", &good_id);
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: deny-evil, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n\
         \x20 - fromEntities: [all]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n\
         \x20 ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{spiffe.io/spiffe-id: \"{evil_id}\"}}}}]\n"
    );
    st.import("deny-evil", &policy);
    let mut children = Children::default();
    children.echo(&netns(&be), 8080);
    let bip = ipv4(&be);
    wait_server(&netns(&good), &bip, 8080);

    let evil = st.create_pending("evil", "evil");
    assert_eq!(evil["spiffe_id_source"], "pending", "{evil}");
    children.echo(&netns(&evil), 8080);
    let eip = ipv4(&evil);
    // Attack: the pending endpoint tries the allow from `all`, and is tried from outside.
    for _ in 0..3 {
        assert!(
            !probe(&netns(&evil), &bip, 8080),
            "a pending endpoint got through"
        );
        assert!(
            !probe(&netns(&be), &eip, 8080),
            "a pending endpoint was reached"
        );
    }
    // Control: a registered endpoint passes the same allow.
    assert!(probe(&netns(&good), &bip, 8080), "control");
    assert_eq!(st.get("evil")["spiffe_id_source"], "pending");

    // Its entry comes: it becomes its SPIFFE ID, and the deny on it holds.
    entry_create(
        &st.server,
        &st.agent,
        &evil_id,
        &["k8s:ns:default", "k8s:pod-label:app:evil"],
    );
    st.wait_registered("evil", &evil_id);
    assert!(!probe(&netns(&evil), &bip, 8080), "the SPIFFE-ID deny");
    assert!(probe(&netns(&good), &bip, 8080), "control after");
    for base in ["evil", "good", "be"] {
        st.netd
            .cli_ok(&["endpoint", "delete", &st.name(base)])
            .expect("delete");
    }
}

#[test]
fn netd_that_is_not_an_authorized_delegate_does_not_start() {
    if !can_run() {
        return;
    }
    let server = ServerProcess::start(&[]).expect("server");
    let delegate = format!("spiffe://{TD}/netd");
    let mut agent = AgentProcess::start(
        &server,
        &[
            "--authorized-delegate",
            &format!("spiffe://{TD}/someone-else"),
        ],
    )
    .expect("agent");
    entry_create(&server, &agent, &delegate, &["unix:uid:0"]);
    let socket = agent.admin_socket.display().to_string();
    let flags = ["--agent-socket", socket.as_str()];
    let err = NetdProcess::start_with(None, "sp4", 220, 4, &flags)
        .err()
        .expect("netd must not start");
    let text = format!("{err:#}");
    assert!(
        text.contains("sigil-netd is not an authorized delegate of the agent at")
            && text.contains(&socket)
            && text.contains("authorized_delegates"),
        "{text}"
    );
    // Control: the agent with netd's ID among its delegates serves it, and netd starts.
    agent.kill9();
    agent
        .args
        .extend(["--authorized-delegate".into(), delegate]);
    agent.spawn().expect("agent restart");
    wait_delegate(&agent);
    let netd = NetdProcess::start_with(None, "sp4", 220, 4, &flags).expect("netd starts");
    assert!(
        netd.log_text()
            .contains("the agent serves netd as a delegate")
    );
}
