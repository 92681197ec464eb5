//! `--spiffe-id-mode` end to end: netd (istio mode) registers one entry per derived SPIFFE ID hosted on
//! its node, parented to its own agent only, through the server's admin entry API over mTLS with its
//! own admin SVID; a second agent on the same server never gets those entries or their keys; an
//! identity's last endpoint leaving deletes its entry after the grace period; a netd restart adopts
//! its entries. Bad modes and templates stop netd at start, naming the field and the value.

#[path = "support/cli.rs"]
mod cli;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli::TD;
use sigil_proto::spire::api::agent::delegatedidentity::v1 as dpb;
use sigil_proto::spire::api::types as tpb;
use sigil_test_util::{AgentProcess, NetdProcess, ServerProcess, sigil_bin};

const HINT: &str = "sigil-netd-derived";
const GRACE: Duration = Duration::from_secs(3);

fn can_run() -> bool {
    sigil_test_util::can_run_as_root_and("the derived-entries test", || {
        sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))
            .err()
            .map(|e| format!("no bpffs: {e}"))
    })
}

fn agent_id(agent: &AgentProcess) -> String {
    format!(
        "spiffe://{TD}/sigil/agent/join_token/{}",
        agent.token().expect("token")
    )
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// netd's entries on the server: (SPIFFE ID, parent, selectors, entry id), sorted.
fn derived(server: &ServerProcess) -> Vec<(String, String, Vec<String>, String)> {
    let mut out: Vec<_> = cli::entries(server, &["--hint", HINT])
        .expect("entry show")
        .iter()
        .map(|e| {
            let mut sels: Vec<String> = e["selectors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| match s.as_str() {
                            Some(t) => t.to_owned(),
                            None => format!(
                                "{}:{}",
                                s["type"].as_str().unwrap_or_default(),
                                s["value"].as_str().unwrap_or_default()
                            ),
                        })
                        .collect()
                })
                .unwrap_or_default();
            sels.sort();
            (
                e["spiffe_id"].as_str().unwrap_or_default().to_owned(),
                e["parent_id"].as_str().unwrap_or_default().to_owned(),
                sels,
                e["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The SPIFFE IDs an agent's Delegated Identity API gives for `selectors` (first message).
async fn delegated_ids(
    agent: &AgentProcess,
    selectors: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let ch = sigil_e2e::admin_channel(&agent.admin_socket).await?;
    let mut c = dpb::delegated_identity_client::DelegatedIdentityClient::new(ch);
    let mut stream = c
        .subscribe_to_x509svi_ds(dpb::SubscribeToX509sviDsRequest {
            selectors: selectors
                .iter()
                .map(|(t, v)| tpb::Selector {
                    r#type: (*t).into(),
                    value: (*v).into(),
                })
                .collect(),
            pid: 0,
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream closed"))?;
    Ok(first
        .x509_svids
        .iter()
        .filter_map(|s| s.x509_svid.as_ref()?.id.as_ref())
        .map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
        .collect())
}

async fn wait_delegated(
    agent: &AgentProcess,
    selectors: &[(&str, &str)],
    want: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let ids = delegated_ids(agent, selectors).await?;
        if ids.iter().any(|i| i == want) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(15),
            "{want} never delegated; got {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An endpoint name unique to this test process (namespaces and veths are named after it).
fn ep(base: &str) -> String {
    format!("d{}-{base}", std::process::id())
}

fn create(netd: &NetdProcess, name: &str, sa: &str, app: &str) {
    netd.cli_ok(&[
        "endpoint",
        "create",
        &ep(name),
        "--service-account",
        sa,
        "--labels",
        &format!("app={app}"),
    ])
    .expect("endpoint create");
}

#[tokio::test(flavor = "multi_thread")]
async fn istio_entries_live_on_the_hosting_node_only_and_leave_after_the_grace()
-> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    let delegate = format!("spiffe://{TD}/netd");
    let node_a = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let node_b = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let (a, b) = (agent_id(&node_a), agent_id(&node_b));
    let me = format!("unix:uid:{}", uid());
    // netd's own identity on each node; on node A it is an admin (it registers entries).
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &delegate,
            "--parent-id",
            &a,
            "--selector",
            &me,
            "--admin",
        ],
    )?;
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &delegate,
            "--parent-id",
            &b,
            "--selector",
            &me,
        ],
    )?;

    let grace = format!("{}s", GRACE.as_secs());
    let socket_a = node_a.socket.display().to_string();
    let admin_a = node_a.admin_socket.display().to_string();
    let flags = [
        // Identity mode spiffe: netd asks node A's agent for its endpoints' SVIDs too.
        "--agent-socket",
        &admin_a,
        "--identity-fallback-wait",
        "30s",
        "--spiffe-id-mode",
        "istio",
        "--trust-domain",
        TD,
        "--agent-spiffe-id",
        &a,
        "--server-address",
        &server.addr(),
        "--agent-workload-socket",
        &socket_a,
        "--derived-entry-grace",
        &grace,
    ];
    let mut netd = NetdProcess::start_with(None, "derived", 211, 7, &flags)?;
    create(&netd, "web-1", "web", "web");
    create(&netd, "web-2", "web", "web2");
    create(&netd, "db-1", "db", "db");

    let web = format!("spiffe://{TD}/ns/default/sa/web");
    let db = format!("spiffe://{TD}/ns/default/sa/db");
    let got = wait_until("netd's entries", Duration::from_secs(20), || {
        let d = derived(&server);
        (d.len() == 2).then_some(d)
    });
    // One entry per identity (web-1 and web-2 share one), parented to node A's agent only.
    assert_eq!(got[0].0, db);
    assert_eq!(got[0].2, ["k8s:ns:default", "k8s:sa:db"]);
    assert_eq!(got[1].0, web);
    assert_eq!(got[1].2, ["k8s:ns:default", "k8s:sa:web"]);
    assert!(got.iter().all(|e| e.1 == a), "{got:?}");
    for id in [&web, &db] {
        let all = cli::entries(&server, &["--spiffe-id", id])?;
        assert_eq!(all.len(), 1, "no other entry holds {id}: {all:?}");
    }
    assert!(
        cli::entries(&server, &["--parent-id", &b])?
            .iter()
            .all(|e| e["spiffe_id"] == delegate.as_str())
    );

    // Node A's agent holds web's key for an endpoint's selectors; node B's, asked the same, has nothing
    // (control on B: it does serve its own unix entry to the same caller).
    let web_sels = [("k8s", "ns:default"), ("k8s", "sa:web")];
    wait_delegated(&node_a, &web_sels, &web).await?;
    // The endpoints get their derived IDs from those entries (source `derived`) and carry them as
    // their SPIFFE label.
    for (name, want) in [("web-1", &web), ("web-2", &web), ("db-1", &db)] {
        let v = wait_until(
            &format!("{name}'s derived SPIFFE ID"),
            Duration::from_secs(20),
            || {
                let out = netd.cli_ok(&["endpoint", "get", &ep(name)]).ok()?;
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                (v["spiffe_id"] == want.as_str() && v["spiffe_id_source"] == "derived").then_some(v)
            },
        );
        let label = format!("spiffe:spiffe.io/spiffe-id={want}");
        assert!(
            v["labels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x == label.as_str())),
            "{v}"
        );
    }
    let uid_sel = format!("uid:{}", uid());
    wait_delegated(&node_b, &[("unix", &uid_sel)], &delegate).await?;
    assert_eq!(
        delegated_ids(&node_b, &web_sels).await?,
        Vec::<String>::new()
    );

    // A restart adopts the entries: same ids, no duplicates.
    let before = derived(&server);
    netd.kill9();
    netd.spawn()?;
    wait_until(
        "the restarted registrar's first round",
        Duration::from_secs(20),
        || (netd.log_text().matches("derived entries in sync").count() >= 2).then_some(()),
    );
    assert_eq!(derived(&server), before, "restart must adopt, not recreate");

    // db's only endpoint leaves: its entry stays through the grace, then goes; web keeps its entry
    // while web-2 remains.
    netd.cli_ok(&["endpoint", "delete", &ep("db-1")])?;
    netd.cli_ok(&["endpoint", "delete", &ep("web-1")])?;
    let left = Instant::now();
    assert!(
        derived(&server).iter().any(|e| e.0 == db),
        "deleted before the grace"
    );
    wait_until("db's entry to go", GRACE + Duration::from_secs(15), || {
        (!derived(&server).iter().any(|e| e.0 == db)).then_some(())
    });
    assert!(
        left.elapsed() >= GRACE,
        "deleted after {:?}, before the grace",
        left.elapsed()
    );
    let now = derived(&server);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].0, web);
    assert_eq!(
        delegated_ids(&node_a, &[("k8s", "ns:default"), ("k8s", "sa:db")]).await?,
        Vec::<String>::new()
    );
    Ok(())
}

#[tokio::test]
async fn an_endpoint_that_cannot_derive_its_id_is_refused_whole() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    // The server is not even needed for the refusal; the registrar just retries meanwhile.
    let flags = [
        "--spiffe-id-mode",
        "verbose",
        "--trust-domain",
        TD,
        "--agent-spiffe-id",
        "spiffe://identity.example.com/sigil/agent/x",
        "--server-address",
        "127.0.0.1:9",
        "--agent-workload-socket",
        "/nonexistent/api.sock",
    ];
    let netd = NetdProcess::start_with(None, "verbose", 211, 8, &flags)?;
    let out = netd.cli(&["endpoint", "create", &ep("noapp"), "--labels", "tier=fe"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("labels: invalid value \"tier=fe\"") && err.contains("no app label"),
        "{err}"
    );
    let list = netd.cli_ok(&["endpoint", "list"])?;
    assert!(!list.contains(&ep("noapp")), "nothing half-created: {list}");
    // Control: with the app label it is created.
    netd.cli_ok(&["endpoint", "create", &ep("withapp"), "--labels", "app=shop"])?;
    Ok(())
}

#[test]
fn bad_modes_and_templates_stop_netd_at_start() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--spiffe-id-mode", "spire"],
            "spiffe_id_mode: invalid value \"spire\"",
        ),
        (
            &[
                "--spiffe-id-mode",
                "verbose",
                "--spiffe-id-template",
                "/ns/{nmespace}",
            ],
            "spiffe_id_template: invalid value \"/ns/{nmespace}\": unknown placeholder {nmespace}",
        ),
        (
            &[
                "--spiffe-id-mode",
                "verbose",
                "--spiffe-id-template",
                "/ns/{namespace",
            ],
            "spiffe_id_template: invalid value \"/ns/{namespace\": unclosed '{'",
        ),
        (
            &[
                "--spiffe-id-mode",
                "verbose",
                "--spiffe-id-template",
                "/ns/{namespace}/",
            ],
            "spiffe_id_template: invalid value \"/ns/{namespace}/\": does not give a valid SPIFFE ID path",
        ),
        (
            &[
                "--spiffe-id-mode",
                "istio",
                "--spiffe-id-template",
                "/ns/{namespace}",
            ],
            "spiffe_id_template: invalid value \"/ns/{namespace}\": only used with spiffe_id_mode verbose",
        ),
        (
            &["--spiffe-id-mode", "opaque"],
            "trust_domain: required with spiffe_id_mode opaque",
        ),
    ];
    let dir = tempfile::tempdir().expect("tmp");
    for (flags, want) in cases {
        let out = Command::new(sigil_bin())
            .args(["netd", "run", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--api-socket")
            .arg(dir.path().join("run/netd.sock"))
            .arg("--bpf-pin-dir")
            .arg(dir.path().join("pins"))
            .args(*flags)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} must fail");
        assert!(err.contains(want), "{flags:?}: want {want:?} in {err}");
        assert!(
            !dir.path().join("state").exists(),
            "nothing is made before the config is valid"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_and_verbose_ids_and_stale_entries_of_a_former_mode_removed() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    let node = AgentProcess::start(&server, &[])?;
    let a = agent_id(&node);
    let me = format!("unix:uid:{}", uid());
    let netd_id = format!("spiffe://{TD}/netd");
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &netd_id,
            "--parent-id",
            &a,
            "--selector",
            &me,
            "--admin",
        ],
    )?;
    let socket = node.socket.display().to_string();
    let addr = server.addr();
    let common = |mode: &'static str| -> Vec<String> {
        [
            "--spiffe-id-mode",
            mode,
            "--trust-domain",
            TD,
            "--agent-spiffe-id",
            &a,
            "--server-address",
            &addr,
            "--agent-workload-socket",
            &socket,
            "--derived-entry-grace",
            "1s",
            "--cluster-name",
            "east",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Opaque: the ID names the endpoint's numeric identity; the selectors are its labels.
    let flags = common("opaque");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let netd = NetdProcess::start_with(None, "opaque", 211, 9, &flags)?;
    let out = netd.cli_ok(&[
        "endpoint",
        "create",
        &ep("shop-1"),
        "--labels",
        "app=shop,tier=fe",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let identity = v["identity"].as_u64().expect("identity");
    let want = format!("spiffe://{TD}/identity/{identity}");
    let got = wait_until("the opaque entry", Duration::from_secs(20), || {
        let d = derived(&server);
        (d.len() == 1).then_some(d)
    });
    assert_eq!(got[0].0, want);
    assert_eq!(got[0].1, a);
    assert_eq!(
        got[0].2,
        [
            "k8s:ns:default",
            "k8s:pod-label:app:shop",
            "k8s:pod-label:tier:fe"
        ]
    );
    drop(netd);

    // The same node switched to verbose: the new ID is registered and the opaque entry, no longer
    // wanted, goes after the grace.
    let mut flags = common("verbose");
    flags.extend([
        "--spiffe-id-template".to_owned(),
        "/cluster/{cluster}/ns/{namespace}/app/{app}".to_owned(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let netd = NetdProcess::start_with(None, "verbose2", 211, 10, &flags)?;
    netd.cli_ok(&["endpoint", "create", &ep("shop-2"), "--labels", "app=shop"])?;
    let verbose = format!("spiffe://{TD}/cluster/east/ns/default/app/shop");
    let got = wait_until("only the verbose entry", Duration::from_secs(20), || {
        let d = derived(&server);
        (d.len() == 1 && d[0].0 == verbose).then_some(d)
    });
    assert_eq!(got[0].1, a);
    assert_eq!(got[0].2, ["k8s:ns:default", "k8s:pod-label:app:shop"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_netd_without_an_admin_entry_registers_nothing_until_it_gets_one() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    let node = AgentProcess::start(&server, &[])?;
    let a = agent_id(&node);
    let me = format!("unix:uid:{}", uid());
    let netd_id = format!("spiffe://{TD}/netd");
    let made = cli::json(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &netd_id,
            "--parent-id",
            &a,
            "--selector",
            &me,
        ],
    )?;
    let entry_id = made["id"]
        .as_str()
        .or_else(|| made["entries"][0]["id"].as_str())
        .or_else(|| made["entry"]["id"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no entry id in {made}"));
    let socket = node.socket.display().to_string();
    let flags = [
        "--spiffe-id-mode",
        "istio",
        "--trust-domain",
        TD,
        "--agent-spiffe-id",
        &a,
        "--server-address",
        &server.addr(),
        "--agent-workload-socket",
        &socket,
    ];
    let netd = NetdProcess::start_with(None, "notadmin", 211, 11, &flags)?;
    netd.cli_ok(&[
        "endpoint",
        "create",
        &ep("na-web"),
        "--service-account",
        "web",
    ])?;
    // Refused by the server, named in netd's log; nothing registered.
    wait_until(
        "the server's refusal in netd's log",
        Duration::from_secs(20),
        || {
            netd.log_text()
                .contains(&format!(
                    "{netd_id} is not the SPIFFE ID of an entry marked admin"
                ))
                .then_some(())
        },
    );
    assert!(derived(&server).is_empty());
    // Control: once its entry is admin, the retry registers the endpoint's identity.
    cli::ok(
        &server,
        &["entry", "update", "--entry-id", &entry_id, "--admin"],
    )?;
    let got = wait_until("the entry after the retry", Duration::from_secs(30), || {
        let d = derived(&server);
        (d.len() == 1).then_some(d)
    });
    assert_eq!(got[0].0, format!("spiffe://{TD}/ns/default/sa/web"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_hosting_one_identity_get_one_entry_each() -> anyhow::Result<()> {
    if !can_run() {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    let node_a = AgentProcess::start(&server, &[])?;
    let node_b = AgentProcess::start(&server, &[])?;
    let me = format!("unix:uid:{}", uid());
    let netd_id = format!("spiffe://{TD}/netd");
    let mut netds = Vec::new();
    for (i, node) in [&node_a, &node_b].into_iter().enumerate() {
        let parent = agent_id(node);
        cli::ok(
            &server,
            &[
                "entry",
                "create",
                "--spiffe-id",
                &netd_id,
                "--parent-id",
                &parent,
                "--selector",
                &me,
                "--admin",
            ],
        )?;
        let socket = node.socket.display().to_string();
        let flags = [
            "--spiffe-id-mode",
            "istio",
            "--trust-domain",
            TD,
            "--agent-spiffe-id",
            &parent,
            "--server-address",
            &server.addr(),
            "--agent-workload-socket",
            &socket,
            "--derived-entry-grace",
            "1s",
        ];
        let tag = format!("two{i}");
        netds.push(NetdProcess::start_with(
            None,
            &tag,
            211,
            12 + i as u8,
            &flags,
        )?);
    }
    create(&netds[0], "two-a", "web", "web");
    create(&netds[1], "two-b", "web", "web");
    let web = format!("spiffe://{TD}/ns/default/sa/web");
    let (a, b) = (agent_id(&node_a), agent_id(&node_b));
    let got = wait_until("one entry per node", Duration::from_secs(20), || {
        let d = derived(&server);
        (d.len() == 2).then_some(d)
    });
    let mut parents: Vec<&str> = got.iter().map(|e| e.1.as_str()).collect();
    parents.sort();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort();
    assert_eq!(parents, want);
    assert!(
        got.iter()
            .all(|e| e.0 == web && e.2 == ["k8s:ns:default", "k8s:sa:web"]),
        "{got:?}"
    );

    // Node B's endpoint leaves: only node B's entry goes; node A's netd never touches it and B's
    // never touches A's.
    netds[1].cli_ok(&["endpoint", "delete", &ep("two-b")])?;
    let left = wait_until("node B's entry to go", Duration::from_secs(20), || {
        let d = derived(&server);
        (d.len() == 1).then_some(d)
    });
    assert_eq!(left[0].1, a);
    Ok(())
}

/// Opaque mode with netd asking the agent (identity mode spiffe): the endpoint's ID names the
/// identity of its labels without the SPIFFE label, which netd keeps allocated while the
/// endpoint carries the identity of its SPIFFE label; so the ID stays the same, its entry is not
/// deleted after the grace (the number it names does not go away), and a restart keeps both.
#[tokio::test(flavor = "multi_thread")]
async fn opaque_ids_stay_stable_while_the_endpoint_carries_its_spiffe_label() -> anyhow::Result<()>
{
    if !can_run() {
        return Ok(());
    }
    let server = ServerProcess::start(&[])?;
    let delegate = format!("spiffe://{TD}/netd");
    let node = AgentProcess::start(&server, &["--authorized-delegate", &delegate])?;
    let a = agent_id(&node);
    let me = format!("unix:uid:{}", uid());
    cli::ok(
        &server,
        &[
            "entry",
            "create",
            "--spiffe-id",
            &delegate,
            "--parent-id",
            &a,
            "--selector",
            &me,
            "--admin",
        ],
    )?;
    let (socket, admin, addr) = (
        node.socket.display().to_string(),
        node.admin_socket.display().to_string(),
        server.addr(),
    );
    let flags = [
        "--agent-socket",
        &admin,
        "--identity-fallback-wait",
        "30s",
        "--spiffe-id-mode",
        "opaque",
        "--trust-domain",
        TD,
        "--agent-spiffe-id",
        &a,
        "--server-address",
        &addr,
        "--agent-workload-socket",
        &socket,
        "--derived-entry-grace",
        "1s",
    ];
    let mut netd = NetdProcess::start_with(None, "opaque-spiffe", 211, 12, &flags)?;
    netd.cli_ok(&["endpoint", "create", &ep("cart"), "--labels", "app=cart"])?;
    let derived_of = |netd: &NetdProcess| {
        wait_until("cart's derived SPIFFE ID", Duration::from_secs(20), || {
            let out = netd.cli_ok(&["endpoint", "get", &ep("cart")]).ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["spiffe_id_source"] == "derived").then_some(v)
        })
    };
    let v = derived_of(&netd);
    let id = v["spiffe_id"].as_str().unwrap_or_default().to_owned();
    let n: u32 = id
        .strip_prefix(&format!("spiffe://{TD}/identity/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an opaque ID: {v}"));
    // The endpoint's own identity is that of its labels with the SPIFFE label: another number.
    let own = v["identity"].as_u64().unwrap_or_default();
    assert!(n >= 256 && u64::from(n) != own, "{v}");
    // Well past the grace, the entry and the ID are still there (the number stays allocated).
    let past = Instant::now() + Duration::from_secs(3);
    while Instant::now() < past {
        let d = derived(&server);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, id);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(derived_of(&netd)["spiffe_id"], id.as_str());
    // A restart keeps the number, the ID and the entry.
    netd.kill9();
    netd.spawn()?;
    let v = derived_of(&netd);
    assert_eq!(v["spiffe_id"], id.as_str(), "{v}");
    assert_eq!(derived(&server).len(), 1);
    Ok(())
}
