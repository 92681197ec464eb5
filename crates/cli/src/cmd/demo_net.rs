//! The network part of `sigil demo` (root only): a throwaway sigil-netd with its own pin dir that
//! asks the demo's agent for its endpoints' SVIDs (identity mode spiffe, Delegated Identity API),
//! endpoints `frontend`, `backend` and `other` whose SPIFFE IDs come from entries selecting them
//! by `k8s:` selectors, a policy allowing only frontend's SPIFFE ID into backend on TCP 8080, real
//! connections from each, their verdicts and the monitor's events; then frontend's entry is
//! deleted (the verdict changes) and created again (it comes back).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, command_in_netns, netns_path};
use sigil_proto::netd::v1 as pb;
use tokio::sync::mpsc;

use sigil_proto::admin::v1 as admin;
use sigil_proto::admin::v1::entries_client::EntriesClient;

use crate::client;
use crate::cmd::monitor::event_line;

const POD_CIDR: &str = "10.199.0.0/24";
const POD_CIDR_V6: &str = "fd00:199::/64";

pub(crate) const FRONTEND_ID: &str = "spiffe://identity.example.com/frontend";
pub(crate) const BACKEND_ID: &str = "spiffe://identity.example.com/backend";

pub(crate) const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-allow-frontend-spiffe-id
spec:
  endpointSelector:
    matchLabels: {spiffe.io/spiffe-id: spiffe://identity.example.com/backend}
  ingress:
  - fromEndpoints:
    - matchLabels: {spiffe.io/spiffe-id: spiffe://identity.example.com/frontend}
    toPorts:
    - ports:
      - {port: \"8080\", protocol: TCP}
";

/// The identity plane the network part uses: the server's admin socket, the agent's SPIFFE ID
/// and its admin (Delegated Identity API) socket.
pub struct Identity {
    /// Server admin socket.
    pub admin_socket: PathBuf,
    /// The agent's SPIFFE ID (parent of the entries).
    pub agent_id: String,
    /// The agent's admin socket.
    pub agent_admin_socket: PathBuf,
    /// The server's agent API address (for the cluster part's agents).
    pub server_address: String,
    /// The bootstrap trust bundle (PEM) agents start from.
    pub bundle: PathBuf,
}

pub(crate) fn entry(spiffe_id: &str, parent: &str, selectors: &[&str]) -> admin::Entry {
    admin::Entry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent.to_owned(),
        selectors: selectors
            .iter()
            .map(|s| {
                let (t, v) = s.split_once(':').unwrap_or((s, ""));
                admin::Selector {
                    r#type: t.to_owned(),
                    value: v.to_owned(),
                }
            })
            .collect(),
        ..admin::Entry::default()
    }
}

/// Creates an entry; returns its id.
pub(crate) async fn create_entry(
    entries: &mut EntriesClient<tonic::transport::Channel>,
    e: admin::Entry,
) -> anyhow::Result<String> {
    let what = e.spiffe_id.clone();
    let r = client::reply(
        entries
            .create_entry(admin::CreateEntryRequest { entry: Some(e) })
            .await,
    )
    .with_context(|| format!("registering {what}"))?;
    Ok(r.entry.map(|e| e.id).unwrap_or_default())
}

/// Polls endpoint `name` until `done` holds (at most `limit`).
pub(crate) async fn wait_endpoint(
    eps: &mut pb::endpoints_client::EndpointsClient<tonic::transport::Channel>,
    name: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&pb::Endpoint) -> bool,
) -> anyhow::Result<pb::Endpoint> {
    let start = Instant::now();
    loop {
        let e = client::reply(
            eps.get_endpoint(pb::GetEndpointRequest {
                name: name.to_owned(),
            })
            .await,
        )?;
        if done(&e) {
            return Ok(e);
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "endpoint {name}: {what} not reached after {limit:?} (now {} {})",
            e.spiffe_id_source,
            e.spiffe_id.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn show(e: &pb::Endpoint) -> String {
    format!(
        "{:<8} identity {:<6} {:<12} {} ({})",
        e.name,
        e.identity,
        e.ipv4,
        e.spiffe_id.as_deref().unwrap_or("no SPIFFE ID"),
        e.spiffe_id_source
    )
}

/// Everything the demo made, removed on drop (also after an error).
struct Cleanup {
    netd: Option<Child>,
    server: Option<Child>,
    endpoints: Vec<String>,
    pin_dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for name in &self.endpoints {
            let _ = Command::new(std::env::current_exe().unwrap_or_default())
                .args(["endpoint", "delete", name, "--api-socket"])
                .arg(&self.socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut n) = self.netd.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(n.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = n.wait();
        }
        // Belt and braces: whatever the daemon did not remove.
        let nl = RtNetlink::new();
        for name in &self.endpoints {
            // The host veth goes with its peer in the namespace.
            let _ = nl.delete_netns(&format!("sigil-{name}"));
        }
        for cidr in [POD_CIDR, POD_CIDR_V6] {
            if let Ok(p) = cidr.parse::<Prefix>() {
                let _ = nl.delete_route(Ns::Current, &Route::blackhole(p));
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

pub(crate) fn probe(exe: &Path, netns: &str, target: &str) -> bool {
    command_in_netns(&netns_path(netns), exe)
        .args(["netd", "probe", "--connect", target, "--timeout", "500ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the network part, or says why it is skipped.
pub async fn run(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    println!("\n== Network: identity-based policy in the eBPF datapath ==");
    if !nix::unistd::geteuid().is_root() {
        println!(
            "Skipped: the network part needs root (network namespaces, eBPF). Run `sudo sigil demo`."
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the sigil binary")?;
    let socket = dir.join("netd").join("netd.sock");
    let mut c = Cleanup {
        netd: None,
        server: None,
        endpoints: Vec::new(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/sigil-demo-{}", std::process::id())),
        socket: socket.clone(),
    };
    // netd is a workload of the agent (root) and its authorized delegate; frontend and backend
    // get SPIFFE IDs from entries written as for SPIRE's k8s workload attestor.
    let mut entries = EntriesClient::new(client::connect(&id.admin_socket).await?);
    let parent = id.agent_id.as_str();
    create_entry(
        &mut entries,
        entry(super::demo::NETD_ID, parent, &["unix:uid:0"]),
    )
    .await?;
    let fe_selectors = ["k8s:ns:default", "k8s:pod-label:app:frontend"];
    let frontend_entry =
        create_entry(&mut entries, entry(FRONTEND_ID, parent, &fe_selectors)).await?;
    create_entry(
        &mut entries,
        entry(
            BACKEND_ID,
            parent,
            &["k8s:ns:default", "k8s:pod-label:app:backend"],
        ),
    )
    .await?;
    println!(
        "Registered {} (netd, authorized delegate of the agent), {FRONTEND_ID} for {} and {BACKEND_ID} for k8s:ns:default,k8s:pod-label:app:backend",
        super::demo::NETD_ID,
        fe_selectors.join(",")
    );
    let delegate = sigil_delegated_client::Client::new(&id.agent_admin_socket);
    let start = Instant::now();
    while let Err(e) = delegate.check().await {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the agent never served netd as a delegate: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::File::create(dir.join("netd.log")).context("creating netd.log")?;
    c.netd = Some(
        Command::new(&exe)
            .args(["netd", "run", "--node-name", "demo", "--pod-cidr", POD_CIDR])
            .args(["--pod-cidr-v6", POD_CIDR_V6, "--api-socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("netd-state"))
            .arg("--bpf-pin-dir")
            .arg(&c.pin_dir)
            .arg("--agent-socket")
            .arg(&id.agent_admin_socket)
            .args(["--identity-fallback-wait", "2s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting sigil netd")?,
    );
    let start = Instant::now();
    let channel = loop {
        if let Ok(ch) = client::dial(&socket).await {
            let mut s = pb::status_client::StatusClient::new(ch.clone());
            if s.get_status(pb::GetStatusRequest {}).await.is_ok() {
                break ch;
            }
        }
        if let Some(n) = c.netd.as_mut()
            && let Ok(Some(st)) = n.try_wait()
        {
            anyhow::bail!(
                "sigil-netd exited with {st}: {}",
                std::fs::read_to_string(dir.join("netd.log")).unwrap_or_default()
            );
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "sigil-netd not ready after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "sigil-netd ready after {:.1} s (pins under {}, pod CIDR {POD_CIDR})",
        start.elapsed().as_secs_f64(),
        c.pin_dir.display()
    );
    let mut eps = pb::endpoints_client::EndpointsClient::new(channel.clone());
    let mut addr = std::collections::HashMap::new();
    for (name, app) in [
        ("frontend", "frontend"),
        ("backend", "backend"),
        ("other", "other"),
    ] {
        c.endpoints.push(name.to_owned());
        let e = client::reply(
            eps.create_endpoint(pb::CreateEndpointRequest {
                name: name.to_owned(),
                labels: vec![format!("app={app}")],
                namespace: "default".to_owned(),
                spiffe_id: String::new(),
                service_account: String::new(),
                no_wait: false,
            })
            .await,
        )
        .with_context(|| format!("creating endpoint {name}"))?;
        println!(
            "Endpoint {:<8} identity {} {:<12} netns {}",
            e.name, e.identity, e.ipv4, e.netns
        );
        addr.insert(name, (e.ipv4.clone(), e.netns_name.clone()));
    }
    // Each starts pending (reserved identity init, everything dropped) until netd has its SVID
    // from the agent; `other` has no entry and falls back to its classic labels after the wait.
    println!("SPIFFE identities from the agent (Delegated Identity API):");
    for (name, want) in [
        ("frontend", Some(FRONTEND_ID)),
        ("backend", Some(BACKEND_ID)),
        ("other", None),
    ] {
        let e = wait_endpoint(
            &mut eps,
            name,
            "its SPIFFE identity",
            Duration::from_secs(20),
            |e| match want {
                Some(id) => {
                    e.spiffe_id.as_deref() == Some(id) && e.spiffe_id_source == "registered"
                }
                None => e.spiffe_id_source == "classic-fallback",
            },
        )
        .await?;
        println!("  {}", show(&e));
    }
    let (backend_ip, backend_ns) = addr.get("backend").cloned().unwrap_or_default();
    c.server = Some(
        command_in_netns(&netns_path(&backend_ns), &exe)
            .args([
                "netd",
                "echo-server",
                "--bind",
                &format!("{backend_ip}:8080"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the TCP server in backend")?,
    );
    let target = format!("{backend_ip}:8080");
    let (front_ns, other_ns) = (
        addr.get("frontend")
            .map(|a| a.1.clone())
            .unwrap_or_default(),
        addr.get("other").map(|a| a.1.clone()).unwrap_or_default(),
    );
    let start = Instant::now();
    while !probe(&exe, &front_ns, &target) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the server in backend never answered"
        );
    }
    println!("TCP echo server listening in backend on {target}");

    let mut pol = pb::policies_client::PoliciesClient::new(channel.clone());
    let imported = client::reply(
        pol.import_policies(pb::ImportPoliciesRequest {
            files: vec![pb::PolicyFile {
                origin: "demo-policy.yaml".to_owned(),
                yaml: POLICY.to_owned(),
            }],
        })
        .await,
    )?;
    println!(
        "Imported {} (into backend's SPIFFE ID only from frontend's SPIFFE ID, TCP 8080; backend ingress is now default deny)",
        imported.policies.join(", ")
    );

    let mut mon = pb::monitor_client::MonitorClient::new(channel);
    let mut stream = client::reply(mon.events(pb::EventsRequest {}).await)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    for (from, ns) in [("frontend", &front_ns), ("other", &other_ns)] {
        let exe = exe.clone();
        let (ns, t) = (ns.clone(), target.clone());
        let ok = tokio::task::spawn_blocking(move || probe(&exe, &ns, &t)).await?;
        println!(
            "  {from:<8} -> backend {target}: {}",
            if ok {
                "ALLOWED (connected, echo received)"
            } else {
                "DENIED (no answer)"
            }
        );
    }
    let probe_now = |ns: &String| {
        let (exe, ns, t) = (exe.clone(), ns.clone(), target.clone());
        tokio::task::spawn_blocking(move || probe(&exe, &ns, &t))
    };
    let verdict = |ok: bool| if ok { "ALLOWED" } else { "DENIED" };

    // The entry goes: frontend loses its SPIFFE ID (classic labels), and with it the policy's allow.
    client::reply(
        entries
            .delete_entry(admin::DeleteEntryRequest {
                id: frontend_entry.clone(),
            })
            .await,
    )
    .context("deleting frontend's entry")?;
    let start = Instant::now();
    let e = wait_endpoint(
        &mut eps,
        "frontend",
        "classic-fallback",
        Duration::from_secs(10),
        |e| e.spiffe_id_source == "classic-fallback",
    )
    .await?;
    println!(
        "\nDeleted frontend's entry on the server: after {} ms frontend is {}",
        start.elapsed().as_millis(),
        show(&e)
    );
    println!(
        "  frontend -> backend {target}: {}",
        verdict(probe_now(&front_ns).await?)
    );
    create_entry(&mut entries, entry(FRONTEND_ID, parent, &fe_selectors)).await?;
    let start = Instant::now();
    let e = wait_endpoint(
        &mut eps,
        "frontend",
        "registered",
        Duration::from_secs(10),
        |e| e.spiffe_id_source == "registered",
    )
    .await?;
    println!(
        "Created it again: after {} ms frontend is {}",
        start.elapsed().as_millis(),
        show(&e)
    );
    println!(
        "  frontend -> backend {target}: {}",
        verdict(probe_now(&front_ns).await?)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    reader.abort();
    println!("Monitor events:");
    // TCP only: the node's IPv6 multicast listener reports would crowd the connections out.
    while let Ok(ev) = rx.try_recv() {
        if ev.protocol == 6 {
            println!("  {}", event_line(&ev));
        }
    }
    for name in std::mem::take(&mut c.endpoints) {
        client::reply(
            eps.delete_endpoint(pb::DeleteEndpointRequest { name })
                .await,
        )?;
    }
    drop(c);
    println!("Endpoints deleted, sigil-netd stopped, pins removed.");
    Ok(())
}
