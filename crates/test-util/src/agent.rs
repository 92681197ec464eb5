//! Launches the real `sigil agent run` against a test server and waits until its sockets answer.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{
    ServerProcess, kill9, log_text, sigil_bin, sigil_cli, spawn_logged, wait_ready,
};

/// A running `sigil agent run`; killed (SIGKILL) on drop.
pub struct AgentProcess {
    /// The child process.
    pub child: Option<Child>,
    /// Temporary root (data dir, sockets, log).
    pub root: tempfile::TempDir,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Flags it runs with (besides the sockets and data dir).
    pub args: Vec<String>,
}

impl AgentProcess {
    /// Writes the server's bundle, makes a join token, and starts an agent with `extra` flags.
    pub fn start(server: &ServerProcess, extra: &[&str]) -> anyhow::Result<Self> {
        let out = server.cli(&["token", "generate"])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .with_context(|| format!("no token in {text:?}"))?
            .trim()
            .to_string();
        Self::launch(server, vec!["--join-token".into(), token], extra)
    }

    /// Writes the server's bundle and starts an agent attesting by x509pop with `cert` (PEM chain, leaf
    /// first) and `key`, plus `extra` flags.
    pub fn start_x509pop(
        server: &ServerProcess,
        cert: &std::path::Path,
        key: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let node = vec![
            "--x509pop-cert".to_string(),
            cert.display().to_string(),
            "--x509pop-key".into(),
            key.display().to_string(),
        ];
        Self::launch(server, node, extra)
    }

    fn launch(
        server: &ServerProcess,
        node_attestation: Vec<String>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let bundle = root.path().join("bundle.pem");
        let out = server.cli(&["bundle", "show"])?;
        if !out.status.success() {
            bail!(
                "bundle show failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(&bundle, &out.stdout)?;
        let mut args = vec![
            "--server-address".to_string(),
            server.addr(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
        ];
        args.extend(node_attestation);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = AgentProcess {
            child: None,
            data_dir: root.path().join("data"),
            socket: root.path().join("public").join("api.sock"),
            admin_socket: root.path().join("private").join("admin.sock"),
            log: root.path().join("agent.log"),
            args,
            root,
        };
        a.spawn()?;
        Ok(a)
    }

    /// The agent's SPIFFE ID (join-token form), read from its flags.
    pub fn token(&self) -> Option<&str> {
        let i = self.args.iter().position(|a| a == "--join-token")?;
        self.args.get(i + 1).map(String::as_str)
    }

    /// (Re)starts the process with the same data dir and sockets; waits until the Workload API socket accepts.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let child = spawn_logged(
            Command::new(sigil_bin())
                .args(["agent", "run"])
                .args(&self.args)
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--socket-path")
                .arg(&self.socket)
                .arg("--admin-socket-path")
                .arg(&self.admin_socket),
            &self.log,
        )?;
        self.child = Some(child);
        let socket = &self.socket;
        wait_ready(
            &mut self.child,
            "agent",
            &self.log,
            Duration::from_secs(30),
            || {
                // The socket is bound before attestation; a real RPC proves the agent is serving.
                Ok(std::os::unix::net::UnixStream::connect(socket).is_ok()
                    && sigil_cli(&["agent", "healthcheck"], "--socket-path", socket)?
                        .status
                        .success())
            },
        )
    }

    /// The agent log so far.
    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    /// `unix://` endpoint of the Workload API.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// `unix://` endpoint of the admin socket.
    pub fn admin_endpoint(&self) -> String {
        format!("unix://{}", self.admin_socket.display())
    }

    /// Kills with SIGKILL.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Waits for the process to exit on its own (bounded); returns its log.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > limit {
                bail!("agent still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
