//! Policy imports as transactions against the real kernel (root): a write failing at any
//! point of an import leaves the policies, the identities and every kernel map as they were,
//! and the import applies whole once the kernel takes its writes.

use std::path::{Path, PathBuf};

use sigil_datapath::{Datapath, Maps};
use sigil_netd::config::RunArgs;
use sigil_netd::daemon::CreateEndpoint;
use sigil_netd::{Config, Daemon};

fn can_run() -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root (network namespaces, BPF)".to_owned())
    } else if let Err(e) = sigil_datapath::ensure_bpffs(Path::new("/sys/fs/bpf")) {
        Some(format!("no bpffs: {e}"))
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and the netd transaction test cannot run: {r}")
        }
        Some(r) => {
            eprintln!("skipping: {r}");
            false
        }
    }
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
    let maps = Maps::open_pinned(&pin_dir).expect("maps");
    let cidr = maps
        .ipcache
        .lookup("198.18.2.7".parse().expect("addr"))
        .expect("lookup");
    assert!(cidr.is_some(), "the CIDR identity reached the IPCache");
}
