//! Workloads inside a sigil-netd endpoint get the endpoint's SVID from the standard Workload API: real
//! server, agent and netd processes; the client is the `spiffe` crate (`sigil-test-workload`), started with
//! `sigil endpoint exec` (or, for the attacks, outside any endpoint or in another one).
//!
//! Endpoint names carry this process's id (netns names are global); the entries select them with
//! `k8s:pod-name:<name>` exactly as SPIRE's k8s attestor spells it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess};

const TD: &str = "identity.example.com";
/// The unprivileged user the workloads run as.
const WORKLOAD_UID: u32 = 1000;
/// Another user, registered by `unix:uid`, whose SVID shows the client works where the attack fails.
const CONTROL_UID: u32 = 1001;

fn can_run() -> bool {
    sigil_test_util::can_run_as_root_and("the endpoint workload test", || {
        sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))
            .err()
            .map(|e| format!("no bpffs: {e}"))
    })
}

fn client_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sigil-test-workload")
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

fn entry(server: &ServerProcess, spiffe: &str, parent: &str, selectors: &[&str]) {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        spiffe,
        "--parent-id",
        parent,
    ];
    for s in selectors {
        args.extend(["--selector", s]);
    }
    let out = server.cli(&args).expect("cli");
    assert!(
        out.status.success(),
        "entry create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the client printed: the SPIFFE IDs it was given, or its error.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    Ids(Vec<String>),
    Error(String),
}

fn parse(out: &Output) -> Fetched {
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        let mut ids: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("svid "))
            .map(str::to_owned)
            .collect();
        ids.sort();
        Fetched::Ids(ids)
    } else {
        Fetched::Error(format!(
            "{}{} ({})",
            text,
            String::from_utf8_lossy(&out.stderr),
            out.status
        ))
    }
}

/// `sigil endpoint exec --api-socket <netd> FLAGS... -- CMD...` (the socket goes before `--`, which
/// `NetdProcess::cli` cannot do).
fn exec(netd: &NetdProcess, flags: &[&str], cmd: &[&str]) -> Output {
    Command::new(sigil_test_util::sigil_bin())
        .args(["endpoint", "exec", "--api-socket"])
        .arg(&netd.api_socket)
        .args(flags)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("sigil endpoint exec")
}

/// `exec` that must succeed; its standard output.
fn exec_ok(netd: &NetdProcess, flags: &[&str], cmd: &[&str]) -> String {
    let out = exec(netd, flags, cmd);
    assert!(
        out.status.success(),
        "endpoint exec {flags:?} -- {cmd:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sigil endpoint exec NAME --uid U --gid U -- sigil-test-workload <agent>`.
fn in_endpoint(netd: &NetdProcess, agent: &AgentProcess, name: &str, uid: u32) -> Fetched {
    let uid = uid.to_string();
    parse(&exec(
        netd,
        &[name, "--uid", &uid, "--gid", &uid],
        &[client_bin(), &agent.endpoint()],
    ))
}

/// The same client as `uid`, in the test's (the host's) network namespace.
fn on_host(agent: &AgentProcess, uid: u32) -> Fetched {
    let out = Command::new(client_bin())
        .arg(agent.endpoint())
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .expect("client");
    parse(&out)
}

/// The client as `uid` inside the namespace at `netns`, entered with nsenter (no netd needed).
fn nsenter(netns: &str, agent: &AgentProcess, uid: u32) -> Fetched {
    let uid = uid.to_string();
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--setuid", &uid, "--setgid", &uid, "--"])
        .arg(client_bin())
        .arg(agent.endpoint())
        .stdin(Stdio::null())
        .output()
        .expect("nsenter");
    parse(&out)
}

/// Polls `fetch` until it returns `want` (the entry must reach the agent first), or fails after 15 s.
fn until(what: &str, want: &Fetched, mut fetch: impl FnMut() -> Fetched) {
    let start = Instant::now();
    loop {
        let got = fetch();
        if &got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: want {want:?}, still {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lets the workload users reach the agent's public socket (the test's temporary root is 0700).
fn open_agent_dir(agent: &AgentProcess) {
    std::fs::set_permissions(agent.root.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod agent root");
}

fn endpoint_json(netd: &NetdProcess, name: &str) -> serde_json::Value {
    let text = netd
        .cli_ok(&["endpoint", "get", name])
        .expect("endpoint get");
    serde_json::from_str(&text).expect("endpoint json")
}

#[test]
fn workload_in_endpoint_gets_exactly_its_svid() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let (frontend, other) = (format!("frontend-{pid}"), format!("other-{pid}"));
    let mut netd = NetdProcess::start("epwl", 222, 1).expect("netd");
    let server = ServerProcess::start(&[]).expect("server");
    let socket = netd.api_socket.display().to_string();
    let mut agent = AgentProcess::start(&server, &["--netd-socket", &socket]).expect("agent");
    open_agent_dir(&agent);
    netd.cli_ok(&["endpoint", "create", &frontend, "--labels", "app=frontend"])
        .expect("create frontend");
    netd.cli_ok(&["endpoint", "create", &other, "--labels", "app=other"])
        .expect("create other");
    let fe = endpoint_json(&netd, &frontend);
    let selectors: Vec<&str> = fe["selectors"]
        .as_array()
        .expect("selectors")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        selectors.contains(&"k8s:ns:default")
            && selectors.contains(&format!("k8s:pod-name:{frontend}").as_str()),
        "{selectors:?}"
    );

    let parent = agent_id(&agent);
    let fe_id = format!("spiffe://{TD}/frontend");
    let other_id = format!("spiffe://{TD}/other");
    let control_id = format!("spiffe://{TD}/uid{CONTROL_UID}");
    entry(
        &server,
        &fe_id,
        &parent,
        &["k8s:ns:default", &format!("k8s:pod-name:{frontend}")],
    );
    entry(
        &server,
        &other_id,
        &parent,
        &["k8s:ns:default", "k8s:pod-label:app:other"],
    );
    entry(
        &server,
        &control_id,
        &parent,
        &[&format!("unix:uid:{CONTROL_UID}")],
    );

    // Legitimate use: any SPIFFE client in the frontend endpoint gets frontend's ID, and nothing else.
    until(
        "uid 1000 in frontend",
        &Fetched::Ids(vec![fe_id.clone()]),
        || in_endpoint(&netd, &agent, &frontend, WORKLOAD_UID),
    );
    // The other endpoint gets its own ID, not frontend's.
    until(
        "uid 1000 in other",
        &Fetched::Ids(vec![other_id.clone()]),
        || in_endpoint(&netd, &agent, &other, WORKLOAD_UID),
    );
    // Control: outside any endpoint the client works and gets what its uid is registered for.
    until(
        "uid 1001 on the host",
        &Fetched::Ids(vec![control_id.clone()]),
        || on_host(&agent, CONTROL_UID),
    );

    // Attack: the same client as the same uid, outside any endpoint, gets no frontend SVID (the agent has
    // frontend's entry: the first fetch above proved it).
    match on_host(&agent, WORKLOAD_UID) {
        Fetched::Error(e) => assert!(e.contains("no identity issued"), "{e}"),
        ids => panic!("uid 1000 outside any endpoint got {ids:?}"),
    }
    // Attack: the same user in a network namespace of its own (user + net namespace, no privilege
    // needed) is in no endpoint's namespace and gets nothing from it.
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(client_bin())
        .arg(agent.endpoint())
        .uid(WORKLOAD_UID)
        .gid(WORKLOAD_UID)
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    match parse(&out) {
        Fetched::Error(e) => assert!(e.contains("no identity issued"), "{e}"),
        ids => panic!("uid 1000 in its own netns got {ids:?}"),
    }
    // A registered uid inside frontend gets both its unix entry and frontend's: the selectors add up.
    assert_eq!(
        in_endpoint(&netd, &agent, &frontend, CONTROL_UID),
        Fetched::Ids(vec![fe_id.clone(), control_id.clone()])
    );

    // netd gone: fail closed to the unix selectors. The endpoint's namespace stays; a process in it gets
    // no k8s-selected SVID, while its unix entry still applies.
    let fe_netns = fe["netns"].as_str().expect("netns").to_owned();
    netd.kill9();
    assert_eq!(
        nsenter(&fe_netns, &agent, CONTROL_UID),
        Fetched::Ids(vec![control_id.clone()])
    );
    match nsenter(&fe_netns, &agent, WORKLOAD_UID) {
        Fetched::Error(e) => assert!(e.contains("no identity issued"), "{e}"),
        ids => panic!("with netd down, uid 1000 in frontend got {ids:?}"),
    }
    assert!(
        agent.log_text().contains("endpoint lookup failed"),
        "{}",
        agent.log_text()
    );
    // netd back: the endpoint's workloads get frontend's SVID again.
    netd.spawn().expect("netd restart");
    until(
        "uid 1000 in frontend after netd restart",
        &Fetched::Ids(vec![fe_id.clone()]),
        || in_endpoint(&netd, &agent, &frontend, WORKLOAD_UID),
    );

    // Endpoints are looked up on every connection, so their changes apply to the next one: relabelled,
    // `other` no longer matches `k8s:pod-label:app:other`.
    netd.cli_ok(&["endpoint", "labels", &other, "--set", "app=moved"])
        .expect("relabel");
    match in_endpoint(&netd, &agent, &other, WORKLOAD_UID) {
        Fetched::Error(e) => assert!(e.contains("no identity issued"), "{e}"),
        ids => panic!("relabelled other still got {ids:?}"),
    }
    // Attack: a process left behind in frontend's namespace after the endpoint is deleted (it keeps the
    // namespace alive) asks afterwards, and gets nothing.
    let mut lingering = Command::new(sigil_test_util::sigil_bin())
        .args(["endpoint", "exec", "--api-socket"])
        .arg(&netd.api_socket)
        .args([frontend.as_str(), "--uid", "1000", "--gid", "1000", "--"])
        .args(["sh", "-c", "echo ready; read _; exec \"$0\" \"$1\""])
        .arg(client_bin())
        .arg(agent.endpoint())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("lingering workload");
    let mut out = BufReader::new(lingering.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert_eq!(line, "ready\n");
    netd.cli_ok(&["endpoint", "delete", &frontend])
        .expect("delete frontend");
    let mut stdin = lingering.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("go");
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("client output");
    let status = lingering.wait().expect("wait");
    assert!(
        !status.success() && rest.contains("no identity issued"),
        "a process in deleted frontend's namespace got: {rest} ({status})"
    );
    agent.kill9();
}

#[test]
fn agent_without_netd_socket_gives_endpoints_no_k8s_selectors() {
    if !can_run() {
        return;
    }
    let frontend = format!("fe-off-{}", std::process::id());
    let netd = NetdProcess::start("epoff", 222, 2).expect("netd");
    let server = ServerProcess::start(&[]).expect("server");
    let agent = AgentProcess::start(&server, &["--netd-socket", "none"]).expect("agent");
    open_agent_dir(&agent);
    netd.cli_ok(&["endpoint", "create", &frontend])
        .expect("create frontend");
    let parent = agent_id(&agent);
    let fe_id = format!("spiffe://{TD}/frontend");
    let control_id = format!("spiffe://{TD}/uid{CONTROL_UID}");
    entry(
        &server,
        &fe_id,
        &parent,
        &["k8s:ns:default", &format!("k8s:pod-name:{frontend}")],
    );
    entry(
        &server,
        &control_id,
        &parent,
        &[&format!("unix:uid:{CONTROL_UID}")],
    );
    // Control: the registered uid in the endpoint gets its unix entry (so both entries reached the agent
    // before the next check) and nothing from the endpoint.
    until(
        "uid 1001 in frontend",
        &Fetched::Ids(vec![control_id.clone()]),
        || in_endpoint(&netd, &agent, &frontend, CONTROL_UID),
    );
    match in_endpoint(&netd, &agent, &frontend, WORKLOAD_UID) {
        Fetched::Error(e) => assert!(e.contains("no identity issued"), "{e}"),
        ids => panic!("with endpoint attestation off, uid 1000 in frontend got {ids:?}"),
    }
    assert!(
        agent
            .log_text()
            .contains("endpoint workload attestation off"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn endpoint_exec_runs_in_the_endpoint_as_the_given_user() {
    if !can_run() {
        return;
    }
    let name = format!("exec-{}", std::process::id());
    let netd = NetdProcess::start("epexec", 222, 3).expect("netd");
    netd.cli_ok(&["endpoint", "create", &name]).expect("create");
    let ep = endpoint_json(&netd, &name);
    let ipv4 = ep["ipv4"].as_str().expect("ipv4");

    // In the endpoint's namespace: its address is there.
    let addrs = exec_ok(&netd, &[&name], &["ip", "-4", "-o", "addr"]);
    assert!(addrs.contains(&format!("{ipv4}/")), "{addrs}");
    // And not the host's: the host does not hold the endpoint's address.
    let host = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&host.stdout).contains(&format!("{ipv4}/")));

    // As the given user and group, with no supplementary groups left from root.
    // (Numbers only: the user need not exist in the user database.)
    let ids = exec_ok(
        &netd,
        &[&name, "--uid", "1000", "--gid", "1000"],
        &["sh", "-c", "id -u; id -g; id -G"],
    );
    assert_eq!(ids, "1000\n1000\n1000\n");
    // --uid alone does not leave the command in root's group: the group is the user's (or the same
    // number).
    let ids = exec_ok(
        &netd,
        &[&name, "--uid", "1000"],
        &["sh", "-c", "id -u; id -g; id -G"],
    );
    assert_eq!(ids, "1000\n1000\n1000\n");

    // The command's exit status is the exec's.
    let out = exec(&netd, &[&name], &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    // Unknown endpoint: a clear error naming it, nothing run.
    let out = exec(&netd, &["no-such-endpoint"], &["true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no-such-endpoint") && err.contains("not found"),
        "{err}"
    );
    // A command that does not exist: the error names it and the endpoint.
    let out = exec(&netd, &[&name], &["/nonexistent/cmd"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/cmd") && err.contains(&name),
        "{err}"
    );
}
