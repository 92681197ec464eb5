//! Launches `sigil netd run` with its own socket, state dir, pin dir, policy dir and pod CIDRs,
//! waits until it answers, and on drop removes everything it made: the process, its
//! endpoints' namespaces and veths, the pins and the blackhole routes.

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use anyhow::bail;

use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, command_in_netns, netns_path};

use crate::process::{kill9, log_text, sigil_bin, sigil_cli, spawn_logged, wait_ready};

/// A running `sigil netd run`; killed and cleaned up on drop.
pub struct NetdProcess {
    /// The child process.
    pub child: Option<Child>,
    /// Temporary root: socket dir, state dir, policy dir, log.
    pub root: tempfile::TempDir,
    /// API socket.
    pub api_socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Watched policy directory.
    pub policy_dir: PathBuf,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// IPv4 pod CIDR.
    pub pod_cidr: String,
    /// IPv6 pod CIDR.
    pub pod_cidr_v6: String,
    /// Log file.
    pub log: PathBuf,
    /// The named namespace netd runs in (a topology node); `None` for the test's own.
    pub netns: Option<String>,
    /// Extra `netd run` flags, given on every (re)start.
    pub extra_args: Vec<String>,
    /// `--node-name` (default `e2e`).
    pub node_name: String,
}

impl NetdProcess {
    /// Starts netd with pod CIDRs `10.<a>.<b>.0/24` and `fd00:<a><b>::/64` (unique per test),
    /// a pin dir unique to this process and `tag`, and waits until it is ready.
    pub fn start(tag: &str, a: u8, b: u8) -> anyhow::Result<Self> {
        Self::start_in(None, tag, a, b)
    }

    /// [`NetdProcess::start`] inside the named namespace `netns` (e.g. a
    /// [`crate::topology::Node`]'s): endpoint veths, routes and sysctls then live in there.
    pub fn start_in(netns: Option<&str>, tag: &str, a: u8, b: u8) -> anyhow::Result<Self> {
        Self::start_with(netns, tag, a, b, &[])
    }

    /// [`NetdProcess::start_in`] with `extra` `netd run` flags, kept for restarts.
    pub fn start_with(
        netns: Option<&str>,
        tag: &str,
        a: u8,
        b: u8,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut n = Self::prepare(netns, tag, a, b, extra)?;
        n.spawn()?;
        Ok(n)
    }

    /// The directories and flags of [`NetdProcess::start_with`], not started: set fields
    /// (`node_name`, `pin_dir`) then call [`NetdProcess::spawn`].
    pub fn prepare(
        netns: Option<&str>,
        tag: &str,
        a: u8,
        b: u8,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let n = NetdProcess {
            child: None,
            api_socket: root.path().join("run").join("netd.sock"),
            state_dir: root.path().join("state"),
            policy_dir: root.path().join("policies"),
            pin_dir: PathBuf::from(format!(
                "/sys/fs/bpf/sigil-e2e-{}-{tag}",
                std::process::id()
            )),
            pod_cidr: format!("10.{a}.{b}.0/24"),
            pod_cidr_v6: format!("fd00:{a:x}{b:02x}::/64"),
            log: root.path().join("netd.log"),
            netns: netns.map(str::to_owned),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            node_name: "e2e".to_owned(),
            root,
        };
        std::fs::create_dir_all(&n.policy_dir)?;
        Ok(n)
    }

    /// (Re)starts the process with the same directories and waits until it answers.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => command_in_netns(&netns_path(ns), sigil_bin()),
            None => Command::new(sigil_bin()),
        };
        let child = spawn_logged(
            cmd.args(["netd", "run", "--node-name", &self.node_name])
                .arg("--api-socket")
                .arg(&self.api_socket)
                .arg("--state-dir")
                .arg(&self.state_dir)
                .arg("--policy-dir")
                .arg(&self.policy_dir)
                .arg("--bpf-pin-dir")
                .arg(&self.pin_dir)
                .args([
                    "--pod-cidr",
                    &self.pod_cidr,
                    "--pod-cidr-v6",
                    &self.pod_cidr_v6,
                ])
                .args(&self.extra_args),
            &self.log,
        )?;
        self.child = Some(child);
        let socket = &self.api_socket;
        wait_ready(
            &mut self.child,
            "netd",
            &self.log,
            Duration::from_secs(30),
            || {
                Ok(socket.exists()
                    && sigil_cli(&["netd", "healthcheck"], "--api-socket", socket)?
                        .status
                        .success())
            },
        )
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    /// Runs `sigil <args> --api-socket <socket>`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        sigil_cli(args, "--api-socket", &self.api_socket)
    }

    /// Runs a CLI command that must succeed; returns its standard output.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "sigil {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Endpoint names and host veths recorded in the state file.
    pub fn recorded_endpoints(&self) -> Vec<(String, String)> {
        let path = self.state_dir.join("netd-state.json");
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Vec::new();
        };
        v["endpoints"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap_or_default().to_owned(),
                            e["host_interface"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NetdProcess {
    fn drop(&mut self) {
        self.kill9();
        let nl = RtNetlink::new();
        let node = self.netns.as_deref().map_or(Ns::Current, Ns::Named);
        for (name, host) in self.recorded_endpoints() {
            let _ = nl.delete_link(node, &host);
            let _ = nl.delete_netns(&format!("sigil-{name}"));
        }
        for cidr in [&self.pod_cidr, &self.pod_cidr_v6] {
            if let Ok(p) = cidr.parse::<Prefix>() {
                let _ = nl.delete_route(node, &Route::blackhole(p));
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if !self.pin_dir.starts_with("/sys/fs/bpf") {
            // netd mounted a bpffs there.
            let _ = Command::new("umount").arg(&self.pin_dir).status();
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}
