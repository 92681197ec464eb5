//! The network part of `sigil demo` (root only): a throwaway sigil-netd with its own pin dir,
//! endpoints `frontend`, `backend` and `other`, a policy allowing frontend → backend on TCP
//! 8080 only, real connections from each, their verdicts and the monitor's events.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, command_in_netns, netns_path};
use sigil_proto::netd::v1 as pb;
use tokio::sync::mpsc;

use crate::client;
use crate::cmd::monitor::event_line;

const POD_CIDR: &str = "10.199.0.0/24";
const POD_CIDR_V6: &str = "fd00:199::/64";

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-allow-frontend
spec:
  endpointSelector:
    matchLabels: {app: backend}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports:
      - {port: \"8080\", protocol: TCP}
";

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

fn probe(exe: &Path, netns: &str, target: &str) -> bool {
    command_in_netns(&netns_path(netns), exe)
        .args(["netd", "probe", "--connect", target, "--timeout", "500ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the network part, or says why it is skipped.
pub async fn run(dir: &Path) -> anyhow::Result<()> {
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
        "Imported {} (frontend -> backend on TCP 8080 only; backend ingress is now default deny)",
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
