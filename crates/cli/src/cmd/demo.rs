//! `sigil demo`: a throwaway server and agent in a temp directory, and a workload (this process) that gets
//! its X.509-SVID and a JWT-SVID through the agent's Workload API, as any workload would.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sigil_proto::admin::v1::bundles_client::BundlesClient;
use sigil_proto::admin::v1::entries_client::EntriesClient;
use sigil_proto::admin::v1::join_tokens_client::JoinTokensClient;
use sigil_proto::admin::v1::{
    BatchCreateEntryRequest, CreateJoinTokenRequest, Entry, GetBundleRequest, Selector,
};
use sigil_spiffe::TrustDomain;

use crate::client;
use crate::cmd::agent::api;
use crate::cmd::{server, svid};
use crate::output;
use crate::workload;

pub(crate) const TRUST_DOMAIN: &str = "identity.example.com";
const WORKLOAD_ID: &str = "spiffe://identity.example.com/demo/workload";
/// sigil-netd's SPIFFE ID: an authorized delegate of the agent (its Delegated Identity API).
pub(crate) const NETD_ID: &str = "spiffe://identity.example.com/netd";
const AUDIENCE: &str = "demo";
const TOKEN_TTL_SECS: i32 = 600;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one health probe, so that a socket bound before its server serves cannot stall the poll.
const PROBE_TIMEOUT: Duration = Duration::from_secs(7);
/// Bound on the first X.509-SVID: the agent mints it after its first entry sync.
const SVID_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 20;

/// Flags of `sigil demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the temp directory (server and agent data, logs, and the fetched SVID files) instead of
    /// removing it.
    #[arg(long)]
    keep: bool,
}

/// A child `sigil` process (server or agent) logging to a file; killed if dropped while still running
/// (e.g. on an early error).
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `sigil <args>` with standard output and error going to `log`.
    fn start(name: &'static str, args: &[&std::ffi::OsStr], log: PathBuf) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the path of this executable")?;
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start the {name}: {}", exe.display()))?;
        Ok(Daemon { name, child, log })
    }

    /// The end of the log, to explain a failure.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!(
            "--- last lines of the {} log ({}) ---\n{tail}",
            self.name,
            self.log.display()
        )
    }

    /// Polls `check` until it passes, the process exits, or [`READY_TIMEOUT`] passes.
    async fn wait_ready<F, Fut>(&mut self, mut check: F) -> anyhow::Result<Duration>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("cannot poll the {} process", self.name))?
            {
                anyhow::bail!("the {} exited during start-up ({status})", self.name);
            }
            match check().await {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() >= READY_TIMEOUT => {
                    anyhow::bail!(
                        "the {} was not ready after {} s: {e:#}",
                        self.name,
                        READY_TIMEOUT.as_secs()
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
        let name = self.name;
        let pid = i32::try_from(self.child.id())
            .with_context(|| format!("the {name}'s pid does not fit a pid_t"))?;
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .with_context(|| format!("cannot send SIGTERM to the {name}"))?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    anyhow::bail!("the {name} exited with {status} on SIGTERM");
                }
                return Ok(());
            }
            if start.elapsed() >= STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!(
                    "the {name} did not stop within {} s of SIGTERM; killed it",
                    STOP_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Daemon {
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

/// Where everything of one demo run lives, inside its temp directory.
struct Layout {
    dir: PathBuf,
    admin_socket: PathBuf,
    bind: String,
    bundle: PathBuf,
    workload_socket: PathBuf,
    agent_admin_socket: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        Ok(Layout {
            dir: dir.to_path_buf(),
            admin_socket: dir.join("server").join("admin.sock"),
            bind: format!("127.0.0.1:{}", free_port()?),
            bundle: dir.join("bootstrap-bundle.pem"),
            workload_socket: dir.join("agent").join("public").join("api.sock"),
            agent_admin_socket: dir.join("agent").join("private").join("admin.sock"),
        })
    }
}

/// The two children, stopped together at the end whatever happened.
struct Daemons {
    server: Daemon,
    agent: Option<Daemon>,
}

impl Daemons {
    fn log_tails(&self) -> String {
        let mut s = self.server.log_tail();
        if let Some(a) = &self.agent {
            s.push_str("\n\n");
            s.push_str(&a.log_tail());
        }
        s
    }

    /// Stops the agent first: it would otherwise log the server's disappearance as an error.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let agent = match &mut self.agent {
            Some(a) => a.stop().await,
            None => Ok(()),
        };
        let server = self.server.stop().await;
        agent.and(server)
    }
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("sigil-demo-")
        .tempdir()
        .context("cannot create a temp directory")?;
    let l = Layout::new(tmp.path())?;

    println!(
        "Starting sigil-server: trust domain {TRUST_DOMAIN}, agent API {}",
        l.bind
    );
    println!("  data dir     : {}", l.dir.join("server").display());
    println!("  admin socket : {}", l.admin_socket.display());
    let server = Daemon::start(
        "server",
        &[
            "server".as_ref(),
            "run".as_ref(),
            "--trust-domain".as_ref(),
            TRUST_DOMAIN.as_ref(),
            "--bind".as_ref(),
            l.bind.as_ref(),
            "--data-dir".as_ref(),
            l.dir.join("server").join("data").as_os_str(),
            "--admin-socket".as_ref(),
            l.admin_socket.as_os_str(),
        ],
        l.dir.join("server.log"),
    )?;
    let mut daemons = Daemons {
        server,
        agent: None,
    };
    let mut result = steps(&mut daemons, &l, a.keep).await;
    if let Ok(agent_id) = &result {
        let ctx = super::demo_net::Identity {
            admin_socket: l.admin_socket.clone(),
            agent_id: agent_id.clone(),
            agent_admin_socket: l.agent_admin_socket.clone(),
            server_address: l.bind.clone(),
            bundle: l.bundle.clone(),
        };
        let net = match super::demo_net::run(&l.dir, &ctx).await {
            Ok(()) => super::demo_cluster::run(&l.dir, &ctx).await,
            Err(e) => Err(e),
        };
        result = net.map(|()| String::new());
    }
    if result.is_err() {
        eprintln!("{}\n", daemons.log_tails());
    }
    let stopped = daemons.stop().await;
    if stopped.is_err() && result.is_ok() {
        eprintln!("{}\n", daemons.log_tails());
    }
    drop(daemons);
    if a.keep {
        let kept = tmp.keep();
        println!("\nKept {}", kept.display());
    } else {
        drop(tmp);
    }
    result?;
    stopped?;
    println!(
        "\nAgent and server stopped{}.",
        if a.keep {
            ""
        } else {
            "; temp directory removed"
        }
    );
    Ok(())
}

/// Server, agent and the workload's SVIDs; returns the agent's SPIFFE ID.
async fn steps(d: &mut Daemons, l: &Layout, keep: bool) -> anyhow::Result<String> {
    let admin = l.admin_socket.clone();
    let took = d.server.wait_ready(|| server::check(&admin, false)).await?;
    println!("Server ready after {:.1} s", took.as_secs_f64());
    let channel = client::connect(&l.admin_socket).await?;

    // The agent authenticates the server at first contact with this bundle (no insecure bootstrap).
    let bundle = client::reply(
        BundlesClient::new(channel.clone())
            .get_bundle(GetBundleRequest {})
            .await,
    )
    .context("fetching the trust bundle")?
    .bundle
    .ok_or_else(|| anyhow::anyhow!("the server returned no trust bundle"))?;
    svid::write_file(
        &l.bundle,
        &output::pem("CERTIFICATE", &bundle.x509_authorities),
        0o644,
    )?;
    println!(
        "Trust bundle written to {} ({} CA certificate(s))",
        l.bundle.display(),
        bundle.x509_authorities.len()
    );

    let token = client::reply(
        JoinTokensClient::new(channel.clone())
            .create_join_token(CreateJoinTokenRequest {
                ttl: TOKEN_TTL_SECS,
                spiffe_id: String::new(),
            })
            .await,
    )
    .context("generating a join token")?
    .token;
    let td = TrustDomain::parse(TRUST_DOMAIN)?;
    let agent_id = td.id_with_path(&format!("/sigil/agent/join_token/{token}"))?;
    println!("Join token generated; the agent will be {agent_id}");

    // SO_PEERCRED reports the effective uid, which is what the agent's unix attestor turns into unix:uid.
    let uid = nix::unistd::geteuid().as_raw();
    let selector = format!("unix:uid:{uid}");
    client::reply(
        EntriesClient::new(channel)
            .batch_create_entry(BatchCreateEntryRequest {
                entries: vec![Entry {
                    spiffe_id: WORKLOAD_ID.to_string(),
                    parent_id: agent_id.to_string(),
                    selectors: vec![Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    ..Entry::default()
                }],
            })
            .await,
    )
    .context("registering the demo workload")?;
    println!("Registered {WORKLOAD_ID} for {selector} under {agent_id}");

    println!("\nStarting sigil-agent");
    println!(
        "  data dir           : {}",
        l.dir.join("agent").join("data").display()
    );
    println!("  Workload API socket: {}", l.workload_socket.display());
    d.agent = Some(Daemon::start(
        "agent",
        &[
            "agent".as_ref(),
            "run".as_ref(),
            "--server-address".as_ref(),
            l.bind.as_ref(),
            "--trust-domain".as_ref(),
            TRUST_DOMAIN.as_ref(),
            "--trust-bundle".as_ref(),
            l.bundle.as_os_str(),
            "--join-token".as_ref(),
            token.as_ref(),
            "--data-dir".as_ref(),
            l.dir.join("agent").join("data").as_os_str(),
            "--socket-path".as_ref(),
            l.workload_socket.as_os_str(),
            "--admin-socket-path".as_ref(),
            l.agent_admin_socket.as_os_str(),
            "--authorized-delegate".as_ref(),
            NETD_ID.as_ref(),
        ],
        l.dir.join("agent.log"),
    )?);
    let socket = l.workload_socket.clone();
    if let Some(agent) = &mut d.agent {
        let took = agent
            .wait_ready(|| workload::health(&socket, false, PROBE_TIMEOUT))
            .await?;
        println!("Agent healthy after {:.1} s", took.as_secs_f64());
    }

    // From here on this process is the workload: it has no credentials, only its uid.
    let start = Instant::now();
    let resp = workload::within(SVID_TIMEOUT, &socket, async {
        workload::fetch_x509(&mut workload::connect(&socket).await?).await
    })
    .await
    .context("fetching the X.509-SVID through the Workload API")?;
    let view = api::x509_view(&resp)?;
    println!(
        "\nX.509-SVID fetched through the Workload API after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    print!("{}", api::x509_text(&view)?);
    if keep {
        let files = api::write_x509(&l.dir.join("svid"), &view)?;
        for f in files {
            println!("Written {}", f.display());
        }
    }
    let x509_id = view
        .svids
        .first()
        .map(|s| s.spiffe_id.clone())
        .ok_or_else(|| anyhow::anyhow!("the Workload API returned no X.509-SVID"))?;
    if x509_id != WORKLOAD_ID {
        anyhow::bail!("the Workload API returned {x509_id}, expected {WORKLOAD_ID}");
    }

    let audience = [AUDIENCE.to_string()];
    let (jwt, (validated_id, claims)) = workload::within(SVID_TIMEOUT, &socket, async {
        let mut c = workload::connect(&socket).await?;
        let jwt = workload::fetch_jwt(&mut c, &audience, None)
            .await
            .context("fetching the JWT-SVID")?;
        let token = jwt.first().map(|s| s.svid.clone()).unwrap_or_default();
        let validated = workload::validate_jwt(&mut c, AUDIENCE, &token)
            .await
            .context("validating the JWT-SVID")?;
        Ok((jwt, validated))
    })
    .await?;
    let jwt_expiry = jwt.first().and_then(|s| api::jwt_expiry(&s.svid));
    println!("\nJWT-SVID fetched through the Workload API (audience {AUDIENCE})");
    for s in &jwt {
        println!("  SPIFFE ID : {}", s.spiffe_id);
    }
    if let Some(exp) = jwt_expiry {
        println!(
            "  Expires   : {} ({})",
            output::rfc3339(exp).unwrap_or_else(|| exp.to_string()),
            output::remaining(exp)
        );
    }
    println!("ValidateJWTSVID: SVID is valid.");
    println!("  SPIFFE ID : {validated_id}");
    println!("  Claims    : {claims}");

    println!("\nSummary");
    println!(
        "  server   : trust domain {TRUST_DOMAIN}, agent API {}",
        l.bind
    );
    println!("  agent    : {agent_id} (join token)");
    println!("  workload : {selector} -> {x509_id}");
    println!(
        "  X.509-SVID from the Workload API, {} certificate(s), expires {}",
        view.svids.first().map_or(0, |s| s.chain.len()),
        view.svids
            .first()
            .and_then(|s| s.expires_at_rfc3339.clone())
            .unwrap_or_default()
    );
    println!("  JWT-SVID for audience {AUDIENCE} from the Workload API, validated by it");
    Ok(agent_id.to_string())
}
