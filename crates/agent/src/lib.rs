//! sigil-agent: attests the node to sigil-server, keeps the entries authorized for it, mints and rotates
//! workload SVIDs (keys made here, only CSRs sent), and serves the SPIFFE Workload API (public socket) and
//! SPIRE's Delegated Identity API (admin socket).
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod manager;
pub mod node;
pub mod workload;

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sigil_attestor::{UnixAttestor, WorkloadAttestor};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

pub use config::{AgentConfig, AgentRunArgs};

/// Now in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Binds a Unix socket after creating its directory with `dir_mode` (every directory above it must be
/// root's or ours, see [`sigil_daemon::own_dir`]) and replacing a stale socket file.
pub fn bind_socket(
    path: &Path,
    dir_mode: u32,
    sock_mode: u32,
) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    sigil_daemon::own_dir(dir, dir_mode)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by a running agent", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(sock_mode))?;
    Ok(l)
}

/// Runs `sigil agent run` until SIGTERM or SIGINT, or until the agent must stop (banned, evicted).
pub async fn run(args: AgentRunArgs) -> anyhow::Result<()> {
    let config = AgentConfig::from_args(&args)?;
    sigil_daemon::init_logging(
        &config.log_level,
        if config.log_json {
            sigil_daemon::LogFormat::Json
        } else {
            sigil_daemon::LogFormat::Text
        },
    );
    // Every workload stream holds a socket.
    sigil_daemon::raise_fd_limit();
    let attestor: Arc<dyn WorkloadAttestor> = Arc::new(UnixAttestor::default());
    serve(config, attestor).await
}

/// Starts the agent with the given workload attestor and serves until a signal or a fatal condition.
pub async fn serve(config: AgentConfig, attestor: Arc<dyn WorkloadAttestor>) -> anyhow::Result<()> {
    let bundles = Arc::new(arc_swap::ArcSwap::from_pointee(
        sigil_spiffe::bundle::BundleSet::new(),
    ));
    let cache = cache::Cache::new(config.trust_domain.clone(), bundles, config.svid_cache_max);
    let public = bind_socket(&config.socket_path, 0o755, 0o777).context("socket_path")?;
    let admin_listener =
        bind_socket(&config.admin_socket_path, 0o700, 0o600).context("admin_socket_path")?;
    let manager = manager::Manager::start(config.clone(), cache.clone()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(manager.clone().run_sync());
    tasks.spawn(manager.clone().run_minter());
    tasks.spawn(manager.clone().run_renewal());

    let workload = workload::WorkloadApi::new(manager.clone(), attestor.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sigil_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut s1 = stop_rx.clone();
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(workload))
            .add_service(reflection)
            .serve_with_incoming_shutdown(
                sigil_h2_authority::normalize_incoming(sigil_attestor::accept_stream(public)),
                async move {
                    let _ = s1.wait_for(|s| *s).await;
                },
            )
            .await
            .context("Workload API")
    });
    let mut s2 = stop_rx.clone();
    let delegated = delegated::DelegatedApi::new(manager.clone(), attestor.clone());
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(delegated.into_server())
            .serve_with_incoming_shutdown(
                sigil_h2_authority::normalize_incoming(sigil_attestor::accept_stream(
                    admin_listener,
                )),
                async move {
                    let _ = s2.wait_for(|s| *s).await;
                },
            )
            .await
            .context("admin API")
    });
    tracing::info!(
        socket = %config.socket_path.display(),
        admin_socket = %config.admin_socket_path.display(),
        "sigil-agent ready"
    );
    let mut fatal = manager.fatal.subscribe();
    let outcome = tokio::select! {
        _ = sigil_daemon::wait_for_signal() => Ok(()),
        r = fatal.wait_for(|f| f.is_some()) => {
            let msg = r.map(|f| f.clone().unwrap_or_default()).unwrap_or_default();
            Err(anyhow::anyhow!("sigil-agent stopping: {msg}"))
        }
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("an agent task ended unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("an agent task failed: {e}")),
        },
    };
    let _ = stop_tx.send(true);
    tasks.abort_all();
    let _ = std::fs::remove_file(&config.socket_path);
    let _ = std::fs::remove_file(&config.admin_socket_path);
    outcome
}

pub mod delegated;
