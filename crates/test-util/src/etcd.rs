//! A private, single-member etcd (Debian's `etcd-server`) for tests: free ports, a temporary data
//! directory, a readiness check on `/health`, killed on drop. Each test starts its own, so tests
//! run in parallel.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
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
    /// The network namespace it runs in (`None`: the test's own).
    netns: Option<PathBuf>,
    /// The address it listens on.
    host: Ipv4Addr,
}

impl EtcdServer {
    /// Starts an etcd and waits until it is healthy. Ports are picked free; if etcd loses the
    /// race for one, it is started again on others.
    pub fn start() -> anyhow::Result<EtcdServer> {
        Self::start_at(None, Ipv4Addr::LOCALHOST)
    }

    /// [`EtcdServer::start`] inside the network namespace at `netns`, listening on `host`
    /// (an address of that namespace, e.g. a [`crate::Topology`]'s underlay bridge), so that
    /// processes in other namespaces reach it.
    pub fn start_at(netns: Option<&Path>, host: Ipv4Addr) -> anyhow::Result<EtcdServer> {
        let bin = etcd_bin().context("no etcd binary (install Debian's etcd-server)")?;
        let root = tempfile::tempdir()?;
        let mut server = EtcdServer {
            child: None,
            root,
            client_port: 0,
            peer_port: 0,
            bin,
            netns: netns.map(Path::to_path_buf),
            host,
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

    /// The client URL, `http://<host>:<port>` (`127.0.0.1` unless started elsewhere).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
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
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => sigil_netlink::command_in_netns(ns, &self.bin),
            None => Command::new(&self.bin),
        };
        let child = cmd
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
            if self.healthy() {
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

impl EtcdServer {
    fn healthy(&self) -> bool {
        self.http("GET", "/health", "")
            .is_ok_and(|body| body.contains("\"health\":\"true\""))
    }

    /// One HTTP/1.0 request to etcd's client port (its JSON gateway: `/v3/kv/put`, ...),
    /// made from inside etcd's namespace; returns the response body.
    pub fn http(&self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        let (host, port) = (self.host, self.client_port);
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let call = move || -> anyhow::Result<String> {
            let mut s = TcpStream::connect((host, port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(req.as_bytes())?;
            let mut resp = Vec::new();
            s.read_to_end(&mut resp)?;
            let text = String::from_utf8_lossy(&resp).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .with_context(|| format!("no HTTP response from etcd: {text:?}"))?;
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                bail!("etcd answered {head:?}: {body}");
            }
            Ok(body.to_owned())
        };
        match &self.netns {
            Some(ns) => crate::netns::in_netns(ns, call),
            None => call(),
        }
    }

    /// Puts `key` = `value` directly (no validation: for hostile-input tests), optionally
    /// under `lease`.
    pub fn put_raw(&self, key: &str, value: &[u8], lease: Option<i64>) -> anyhow::Result<()> {
        let mut req = serde_json::json!({
            "key": base64(key.as_bytes()),
            "value": base64(value),
        });
        if let Some(l) = lease {
            req["lease"] = serde_json::Value::String(l.to_string());
        }
        self.http("POST", "/v3/kv/put", &req.to_string()).map(drop)
    }

    /// Deletes `key` directly.
    pub fn delete_raw(&self, key: &str) -> anyhow::Result<()> {
        let req = serde_json::json!({ "key": base64(key.as_bytes()) });
        self.http("POST", "/v3/kv/deleterange", &req.to_string())
            .map(drop)
    }

    /// Grants a lease of `ttl` seconds; returns its ID.
    pub fn grant_lease(&self, ttl: i64) -> anyhow::Result<i64> {
        let body = self.http(
            "POST",
            "/v3/lease/grant",
            &serde_json::json!({ "TTL": ttl.to_string() }).to_string(),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["ID"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no lease ID in {body}"))
    }

    /// Keys (and values) under `prefix`.
    pub fn list_raw(&self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let req = serde_json::json!({
            "key": base64(prefix.as_bytes()),
            "range_end": base64(&end),
        });
        let body = self.http("POST", "/v3/kv/range", &req.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let key = unbase64(kv["key"].as_str().unwrap_or_default())?;
            let value = unbase64(kv["value"].as_str().unwrap_or_default())?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value));
        }
        Ok(out)
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what etcd's JSON gateway takes for bytes).
fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64
            .iter()
            .position(|x| *x == c)
            .with_context(|| format!("not base64: {text:?}"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
