//! `sigil demo`: a throwaway server in a temp directory, an X.509-SVID and a JWT-SVID minted from it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client;
use crate::cmd::{server, svid};
use crate::output;

const TRUST_DOMAIN: &str = "identity.example.com";
const WORKLOAD_ID: &str = "spiffe://identity.example.com/demo/workload";
const WORKLOAD_DNS: &str = "workload.demo.internal";
const AUDIENCE: &str = "demo";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `sigil demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the temp directory (server data, log, and the minted SVID files) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// The server child process; killed if dropped while still running (e.g. on an early error).
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    fn start(dir: &Path, socket: &Path, bind: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the path of this executable")?;
        let log = dir.join("server.log");
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let child = Command::new(&exe)
            .args([
                "server",
                "run",
                "--trust-domain",
                TRUST_DOMAIN,
                "--bind",
                bind,
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--admin-socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {} server run", exe.display()))?;
        Ok(ServerProcess { child, log })
    }

    /// The end of the server's log, to explain a failure.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("last lines of the server log:\n{tail}")
    }

    /// Polls the health check until it passes, the server exits, or the deadline passes.
    async fn wait_ready(&mut self, socket: &Path) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("cannot poll the server process")?
            {
                anyhow::bail!(
                    "the server exited during start-up ({status})\n{}",
                    self.log_tail()
                );
            }
            match server::check(socket, false).await {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() >= READY_TIMEOUT => {
                    anyhow::bail!(
                        "the server was not ready after {} s: {e:#}\n{}",
                        READY_TIMEOUT.as_secs(),
                        self.log_tail()
                    );
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Sends SIGTERM and waits for the exit; SIGKILL if it takes longer than [`STOP_TIMEOUT`].
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid =
            i32::try_from(self.child.id()).context("the server's pid does not fit a pid_t")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).context("cannot send SIGTERM to the server")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    anyhow::bail!(
                        "the server exited with {status} on SIGTERM\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if start.elapsed() >= STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!(
                    "the server did not stop within {} s of SIGTERM; killed it",
                    STOP_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port: bound by the OS, then released for the server to take.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("sigil-demo-")
        .tempdir()
        .context("cannot create a temp directory")?;
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("admin").join("api.sock");
    let bind = format!("127.0.0.1:{}", free_port()?);

    println!("Starting sigil-server: trust domain {TRUST_DOMAIN}, agent API {bind}");
    println!("  data dir     : {}", dir.join("data").display());
    println!("  admin socket : {}", socket.display());
    let mut srv = ServerProcess::start(&dir, &socket, &bind)?;
    let result = steps(&mut srv, &socket, &dir, a.keep).await;
    let stopped = srv.stop().await;
    if a.keep {
        let kept = tmp.keep();
        println!("\nKept {}", kept.display());
    } else {
        drop(tmp);
    }
    result?;
    stopped?;
    println!(
        "\nServer stopped{}.",
        if a.keep {
            ""
        } else {
            "; temp directory removed"
        }
    );
    Ok(())
}

async fn steps(
    srv: &mut ServerProcess,
    socket: &Path,
    dir: &Path,
    keep: bool,
) -> anyhow::Result<()> {
    let took = srv.wait_ready(socket).await?;
    println!("Server ready after {:.1} s", took.as_secs_f64());

    let channel = client::connect(socket).await?;
    let m = svid::mint_x509(channel.clone(), WORKLOAD_ID, &[WORKLOAD_DNS.to_string()], 0)
        .await
        .context("minting the X.509-SVID")?;
    println!("\nX.509-SVID");
    println!("  SPIFFE ID : {WORKLOAD_ID}");
    println!(
        "  Expires   : {} ({})",
        output::rfc3339(m.expires_at).unwrap_or_else(|| m.expires_at.to_string()),
        output::remaining(m.expires_at)
    );
    println!("  Chain (leaf first):");
    print!("{}", svid::describe_chain(&m.chain)?);
    if keep {
        let files = svid::write_files(&dir.join("svid"), &m)?;
        println!(
            "  Written to {}",
            files.svid.parent().unwrap_or(dir).display()
        );
    }

    let (token, expires_at) = svid::mint_jwt(channel, WORKLOAD_ID, &[AUDIENCE.to_string()], 0)
        .await
        .context("minting the JWT-SVID")?;
    let (header, claims) = svid::jwt_parts(&token)?;
    println!("\nJWT-SVID (audience {AUDIENCE})");
    println!(
        "  Expires   : {} ({})",
        output::rfc3339(expires_at).unwrap_or_else(|| expires_at.to_string()),
        output::remaining(expires_at)
    );
    println!("  Header    : {header}");
    println!("  Claims    : {claims}");
    Ok(())
}
