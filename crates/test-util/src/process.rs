//! Launches the real `sigil` binary as a server process and waits until it answers, and the
//! launching pieces the server, agent and netd launchers share (logged spawn, readiness poll,
//! CLI against a socket, SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Path of the `sigil` binary built for this test run (`target/<profile>/sigil`).
pub fn sigil_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SIGIL_BIN") {
        return PathBuf::from(p);
    }
    // Test binaries live in target/<profile>/deps; the CLI binary one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("sigil")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Spawns `cmd` with no stdin or stdout and its stderr appended to `log`.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", sigil_bin().display()))
}

/// Polls `ready` until it says yes; fails with the log when the process `what` exits first or
/// `limit` passes.
pub(crate) fn wait_ready(
    child: &mut Option<Child>,
    what: &str,
    log: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!(
                "{what} exited with {status} during start-up; log:\n{}",
                log_text(log)
            );
        }
        if ready()? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("{what} not ready after {limit:?}; log:\n{}", log_text(log));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The log written so far.
pub(crate) fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Runs `sigil <args> <socket_flag> <socket>`.
pub(crate) fn sigil_cli(args: &[&str], socket_flag: &str, socket: &Path) -> anyhow::Result<Output> {
    Command::new(sigil_bin())
        .args(args)
        .arg(socket_flag)
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run sigil {args:?}"))
}

/// Kills the process with SIGKILL and waits for it.
pub(crate) fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A running `sigil server run` with its own data directory and sockets; stopped (SIGKILL) on drop.
pub struct ServerProcess {
    /// The child process.
    pub child: Option<Child>,
    /// Temporary root holding data dir and socket.
    pub root: tempfile::TempDir,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Agent API port.
    pub port: u16,
    /// Extra flags the server was started with.
    pub extra: Vec<String>,
    /// Where the server's log goes.
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts a server with default settings plus `extra` flags and waits until it is healthy.
    pub fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let root = tempfile::tempdir()?;
        let data_dir = root.path().join("data");
        let admin_socket = root.path().join("admin").join("api.sock");
        let log = root.path().join("server.log");
        let mut s = ServerProcess {
            child: None,
            data_dir,
            admin_socket,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log,
            root,
        };
        s.spawn()?;
        Ok(s)
    }

    /// (Re)starts the process with the same data directory, socket and port, and waits until healthy.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let child = spawn_logged(
            Command::new(sigil_bin())
                .args(["server", "run", "--data-dir"])
                .arg(&self.data_dir)
                .arg("--admin-socket")
                .arg(&self.admin_socket)
                .arg("--bind")
                .arg(format!("127.0.0.1:{}", self.port))
                .args(&self.extra),
            &self.log,
        )?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(30))
    }

    /// Polls `sigil server healthcheck` until it succeeds or the process dies.
    pub fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let socket = &self.admin_socket;
        wait_ready(&mut self.child, "server", &self.log, limit, || {
            Ok(socket.exists()
                && sigil_cli(&["server", "healthcheck"], "--admin-socket", socket)?
                    .status
                    .success())
        })
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    /// Runs `sigil <args> --admin-socket <this server's socket>`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        sigil_cli(args, "--admin-socket", &self.admin_socket)
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Stops the process with SIGTERM and waits for it; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(c.wait()?.success())
    }

    /// The agent API address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Child processes (echo servers, monitors, followers) killed and reaped on drop, so a failing test
/// leaves none behind.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    /// Adds `child` to the set.
    pub fn push(&mut self, child: Child) {
        self.0.push(child);
    }

    /// A `sigil netd echo-server` on `0.0.0.0:port` inside the named namespace `netns`.
    pub fn echo(&mut self, netns: &str, port: u16) {
        self.echo_on(netns, &format!("0.0.0.0:{port}"));
    }

    /// A `sigil netd echo-server` on `bind` (`[::]:PORT` serves IPv6 and IPv4) inside `netns`.
    pub fn echo_on(&mut self, netns: &str, bind: &str) {
        let child = crate::netns::command_in_named_netns(netns, sigil_bin())
            .args(["netd", "echo-server", "--bind", bind])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("echo server");
        self.0.push(child);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
