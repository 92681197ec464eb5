//! A private, single-member etcd (Debian's `etcd-server`) for tests: free ports, a temporary data
//! directory, a readiness check on `/health`, killed on drop. Each test starts its own, so tests
//! run in parallel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::free_port;
use crate::root::skip_unless;

/// The etcd binary: `$SIGIL_ETCD` or `etcd` on `PATH`.
pub fn etcd_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SIGIL_ETCD") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// True when an etcd binary is there; otherwise says why `what` is skipped and returns false, or
/// panics under `CI=true` (scripts/ensure-deps.sh installs `etcd-server`).
pub fn can_run_etcd(what: &str) -> bool {
    skip_unless(
        what,
        etcd_bin()
            .is_none()
            .then(|| "no etcd binary (install Debian's etcd-server, or set SIGIL_ETCD)".to_owned()),
    )
}

/// A running etcd with its own data directory and ports; SIGKILLed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    root: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    bin: PathBuf,
}

impl EtcdServer {
    /// Starts an etcd and waits until it is healthy. Ports are picked free; if etcd loses the
    /// race for one, it is started again on others.
    pub fn start() -> anyhow::Result<EtcdServer> {
        let bin = etcd_bin().context("no etcd binary (install Debian's etcd-server)")?;
        let root = tempfile::tempdir()?;
        let mut server = EtcdServer {
            child: None,
            root,
            client_port: 0,
            peer_port: 0,
            bin,
        };
        let mut last = None;
        for _ in 0..5 {
            server.client_port = free_port();
            server.peer_port = free_port();
            if server.client_port == server.peer_port {
                continue;
            }
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no free ports for etcd")))
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("etcd.log")
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts etcd on the same data directory and ports and waits until healthy.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg("sigil-test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sigil-test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    /// Polls `GET /health` until etcd reports healthy, or fails when the process exits.
    fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "etcd exited with {status} during start-up; log:\n{}",
                    tail(&self.log_text())
                );
            }
            if health(self.client_port) {
                return Ok(());
            }
            if start.elapsed() > limit {
                self.kill();
                bail!(
                    "etcd not healthy after {limit:?}; log:\n{}",
                    tail(&self.log_text())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills etcd with SIGKILL (the data directory stays, for [`EtcdServer::spawn`]).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The temporary root holding the data directory and log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `GET /health` on the client port answers `"health":"true"`.
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
