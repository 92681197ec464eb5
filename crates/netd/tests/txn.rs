//! Policy imports as transactions against the real kernel (root): a write failing at any
//! point of an import leaves the policies, the identities and every kernel map as they were,
//! and the import applies whole once the kernel takes its writes.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use sigil_datapath::{Datapath, Maps, PolicyEntry, PolicyKey, intent_of, normalize};
use sigil_identity::NumericIdentity;
use sigil_netd::config::RunArgs;
use sigil_netd::daemon::CreateEndpoint;
use sigil_netd::{Config, Daemon};

fn can_run() -> bool {
    sigil_test_util::can_run_with_bpffs("the netd transaction test")
}

/// Removes the endpoints, routes and pins the daemon made.
struct Cleanup {
    endpoints: Vec<String>,
    routes: Vec<String>,
    pin_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for e in &self.endpoints {
            let _ = sigil_datapath::netns::delete_endpoint(e);
        }
        for r in &self.routes {
            let _ = sigil_datapath::netns::remove_blackhole_route(r);
        }
        let _ = Datapath::unpin(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Everything the kernel holds for the endpoints, from a fresh scan of the pins.
fn kernel(pin_dir: &Path, eps: &[u32]) -> String {
    let maps = Maps::open_pinned(pin_dir).expect("maps");
    let mut ipc = maps.ipcache.entries().expect("ipcache");
    ipc.sort_by_key(|e| (e.addr, e.prefix_len));
    let mut cfg = maps.endpoints.list().expect("endpoints");
    cfg.sort_by_key(|(id, _)| *id);
    let pol: Vec<_> = eps.iter().map(|e| maps.policy.installed(*e)).collect();
    format!("{ipc:?}\n{cfg:?}\n{pol:?}")
}

/// Every endpoint's kernel entries equal what installing the engine's whole map would write:
/// the key-by-key updates lose nothing.
fn assert_kernel_is_the_engine(d: &Daemon, pin_dir: &Path) {
    let maps = Maps::open_pinned(pin_dir).expect("maps");
    let snap = d.snapshot().load_full();
    for (rec, _) in snap.endpoints.values() {
        let engine_map = d
            .engine()
            .policy_map(NumericIdentity::new(rec.identity))
            .unwrap_or_default();
        let want = normalize(&intent_of(&engine_map).expect("valid"));
        let got: BTreeMap<PolicyKey, PolicyEntry> =
            maps.policy.installed(rec.endpoint_id).into_iter().collect();
        assert_eq!(got, want, "endpoint {}", rec.name);
    }
}

/// Policies, identities and endpoints as readers see them.
fn published(d: &Daemon) -> String {
    let snap = d.snapshot().load_full();
    let policies: Vec<_> = snap
        .list_policies()
        .into_iter()
        .map(|p| (p.id.to_string(), p.rules))
        .collect();
    format!(
        "{policies:?}\n{} identities\n{:?}",
        snap.identity_count,
        snap.endpoints.keys().collect::<Vec<_>>()
    )
}

const BASE: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-in\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: \"7001\", protocol: TCP}]}]\n";

/// Replaces web-in without its deny, adds an egress policy with CIDRs (new identities and
/// IPCache entries) and a deny for api.
const CHANGE: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-in\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web-out\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet:\n    - cidr: 198.18.1.0/24\n    - cidr: 198.18.2.0/24\n    - cidr: 198.18.3.0/24\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: api-out\nspec:\n  endpointSelector: {matchLabels: {app: api}}\n  egressDeny:\n  - toEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]\n";

#[test]
fn a_write_failing_anywhere_in_an_import_rolls_everything_back() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let tmp = tempfile::tempdir().expect("tmp");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sigil-netdtxn-{pid}"));
    let (v4, v6) = ("10.211.7.0/24", "fd00:d307::/64");
    let web_name = format!("txw{}", pid % 100_000);
    let api_name = format!("txa{}", pid % 100_000);
    let _cleanup = Cleanup {
        endpoints: vec![web_name.clone(), api_name.clone()],
        routes: vec![v4.to_owned(), v6.to_owned()],
        pin_dir: pin_dir.clone(),
    };
    let config = Config::from_args(&RunArgs {
        node_name: Some("txn".into()),
        pod_cidr: Some(v4.into()),
        pod_cidr_v6: Some(v6.into()),
        bpf_pin_dir: Some(pin_dir.clone()),
        api_socket: Some(tmp.path().join("run").join("netd.sock")),
        state_dir: Some(tmp.path().join("state")),
        ..RunArgs::default()
    })
    .expect("config");
    let mut d = Daemon::start(config).expect("start");
    let ep = |d: &mut Daemon, name: &str, app: &str| {
        d.create_endpoint(CreateEndpoint {
            name: name.to_owned(),
            labels: vec![format!("app={app}")],
            ..CreateEndpoint::default()
        })
        .expect("endpoint")
        .endpoint_id
    };
    let eps = [ep(&mut d, &web_name, "web"), ep(&mut d, &api_name, "api")];
    d.import_policies(vec![("base.yaml".into(), BASE.into())])
        .expect("base");
    let kernel_before = kernel(&pin_dir, &eps);
    let published_before = published(&d);

    let mut failures = 0;
    loop {
        d.fail_policy_writes_after(Some(failures));
        match d.import_policies(vec![("change.yaml".into(), CHANGE.into())]) {
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("rolled back") && text.contains("injected failure"),
                    "{text}"
                );
                assert_eq!(
                    kernel(&pin_dir, &eps),
                    kernel_before,
                    "kernel after a failure at write {failures}"
                );
                assert_eq!(
                    published(&d),
                    published_before,
                    "state after a failure at write {failures}"
                );
                failures += 1;
                assert!(failures < 10_000, "the import never succeeds");
            }
            Ok((ids, n)) => {
                assert_eq!(ids.len(), 3, "{ids:?}");
                assert_eq!(n, 2, "both endpoints updated");
                break;
            }
        }
    }
    // Every write position of the change failed once, half-way included.
    assert!(failures >= 6, "only {failures} writes");
    let after = published(&d);
    assert!(
        after.contains("web-out") && after.contains("api-out"),
        "{after}"
    );
    assert_ne!(kernel(&pin_dir, &eps), kernel_before);
    assert_kernel_is_the_engine(&d, &pin_dir);
    let maps = Maps::open_pinned(&pin_dir).expect("maps");
    let cidr = maps
        .ipcache
        .lookup("198.18.2.7".parse().expect("addr"))
        .expect("lookup");
    assert!(cidr.is_some(), "the CIDR identity reached the IPCache");
}

#[test]
fn a_change_compiled_while_an_endpoint_came_is_compiled_again_and_covers_it() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let tmp = tempfile::tempdir().expect("tmp");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sigil-netdstale-{pid}"));
    let (v4, v6) = ("10.211.8.0/24", "fd00:d308::/64");
    let names: Vec<String> = ["sw", "sa", "sn"]
        .iter()
        .map(|t| format!("{t}{}", pid % 100_000))
        .collect();
    let _cleanup = Cleanup {
        endpoints: names.clone(),
        routes: vec![v4.to_owned(), v6.to_owned()],
        pin_dir: pin_dir.clone(),
    };
    let config = Config::from_args(&RunArgs {
        node_name: Some("stale".into()),
        pod_cidr: Some(v4.into()),
        pod_cidr_v6: Some(v6.into()),
        bpf_pin_dir: Some(pin_dir.clone()),
        api_socket: Some(tmp.path().join("run").join("netd.sock")),
        state_dir: Some(tmp.path().join("state")),
        ..RunArgs::default()
    })
    .expect("config");
    let mut d = Daemon::start(config).expect("start");
    let ep = |d: &mut Daemon, name: &str, labels: &[&str]| {
        d.create_endpoint(CreateEndpoint {
            name: name.to_owned(),
            labels: labels.iter().map(ToString::to_string).collect(),
            ..CreateEndpoint::default()
        })
        .expect("endpoint")
    };
    ep(&mut d, &names[0], &["app=web"]);
    ep(&mut d, &names[1], &["app=api"]);
    d.import_policies(vec![("base.yaml".into(), BASE.into())])
        .expect("base");
    let identities_before = d.snapshot().load().identity_count;

    // Compile against the engine as it is, then let an endpoint come before the commit.
    let op = sigil_netd::daemon::parse_import(vec![("change.yaml".into(), CHANGE.into())])
        .expect("parse");
    let compiled = d.prepare_policy(op).compile().expect("compile");
    // Its own identity (another label), selected by the same policies.
    let newcomer = ep(&mut d, &names[2], &["app=web", "tier=new"]);
    let job = match d.try_commit_policy(compiled).expect("commit") {
        sigil_netd::daemon::Committed::Stale(job) => job,
        sigil_netd::daemon::Committed::Done(..) => panic!("a stale compilation was applied"),
    };
    // The stale compilation gave its CIDR identities back.
    assert_eq!(d.snapshot().load().identity_count, identities_before + 1);
    match d
        .try_commit_policy(job.compile().expect("compile again"))
        .expect("commit")
    {
        sigil_netd::daemon::Committed::Done(ids, n) => {
            assert_eq!(ids.len(), 3, "{ids:?}");
            assert_eq!(n, 3, "web, api and the newcomer updated");
        }
        sigil_netd::daemon::Committed::Stale(_) => panic!("stale twice without a change"),
    }
    assert_eq!(
        d.snapshot().load().identity_count,
        identities_before + 1 + 3
    );
    assert_kernel_is_the_engine(&d, &pin_dir);
    let maps = Maps::open_pinned(&pin_dir).expect("maps");
    assert!(
        maps.policy
            .installed(newcomer.endpoint_id)
            .iter()
            .any(|(k, v)| k.direction == sigil_datapath::Direction::Egress
                && !v.deny
                && k.identity >= 1 << 24),
        "the newcomer's egress allows the CIDR identities"
    );
}

/// Readiness follows the API: false before `serve` has its listener serving, true while it serves
/// (the socket answers), false again once a stop begins the drain; the stop ends `serve` cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_true_only_while_the_api_serves() {
    if !can_run() {
        return;
    }
    let pid = std::process::id();
    let tmp = tempfile::tempdir().expect("tmp");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/sigil-netdready-{pid}"));
    let (v4, v6) = ("10.212.7.0/24", "fd00:d308::/64");
    let _cleanup = Cleanup {
        endpoints: vec![],
        routes: vec![v4.to_owned(), v6.to_owned()],
        pin_dir: pin_dir.clone(),
    };
    let socket = tmp.path().join("run").join("netd.sock");
    let config = Config::from_args(&RunArgs {
        node_name: Some("ready".into()),
        pod_cidr: Some(v4.into()),
        pod_cidr_v6: Some(v6.into()),
        bpf_pin_dir: Some(pin_dir.clone()),
        api_socket: Some(socket.clone()),
        state_dir: Some(tmp.path().join("state")),
        common: sigil_daemon::CommonArgs {
            drain_timeout: Some("2s".into()),
            ..Default::default()
        },
        ..RunArgs::default()
    })
    .expect("config");
    let rt = sigil_daemon::Runtime::default();
    let ready = rt.ready.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    assert!(!ready.is_ready(), "ready before serving");
    assert!(!socket.exists(), "socket before serving");
    let served = tokio::spawn(sigil_netd::serve(config, stop_rx, rt));
    tokio::time::timeout(std::time::Duration::from_secs(60), ready.wait_ready())
        .await
        .expect("ready within 60 s");
    std::os::unix::net::UnixStream::connect(&socket).expect("the API socket answers once ready");
    stop_tx.send(true).expect("stop");
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), served)
        .await
        .expect("stopped within the drain timeout")
        .expect("joined");
    out.expect("serve ends cleanly");
    assert!(!ready.is_ready(), "still ready after stopping");
    assert!(!socket.exists(), "socket left after stopping");
}
