//! sigil-agent: attests the node to sigil-server, keeps the entries authorized for it, mints and rotates
//! workload SVIDs (keys made here, only CSRs sent), and serves the SPIFFE Workload API (public socket) and
//! SPIRE's Delegated Identity API (admin socket).
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod manager;
pub mod node;
pub mod workload;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sigil_attestor::{ChainAttestor, EndpointAttestor, NetdLookup, UnixAttestor, WorkloadAttestor};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

pub use config::{AgentConfig, AgentRunArgs};

/// Now in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
    let attestor = workload_attestor(&config)?;
    serve(config, attestor, sigil_daemon::Runtime::default()).await
}

/// The agent's workload attestation: `unix` selectors always, plus, unless `netd_socket` is `none`, the
/// `k8s` selectors of the sigil-netd endpoint whose network namespace the caller is in. Call it inside the
/// agent's runtime: netd is asked on it.
pub fn workload_attestor(config: &AgentConfig) -> anyhow::Result<Arc<dyn WorkloadAttestor>> {
    let unix: Arc<dyn WorkloadAttestor> = Arc::new(UnixAttestor::default());
    let Some(socket) = &config.netd_socket else {
        tracing::info!("endpoint workload attestation off (netd_socket = none)");
        return Ok(unix);
    };
    let runtime = tokio::runtime::Handle::try_current()
        .context("endpoint workload attestor: no async runtime to ask netd on")?;
    let lookup = NetdLookup::new(socket, runtime);
    let endpoint = EndpointAttestor::new(lookup).context("endpoint workload attestor")?;
    tracing::info!(netd_socket = %socket.display(), "endpoint workload attestation on");
    Ok(Arc::new(ChainAttestor::new(vec![unix, Arc::new(endpoint)])))
}

/// Starts the agent with the given workload attestor and serves until a signal or a fatal condition.
/// `rt.ready` turns true once both APIs serve, false when draining begins; subsystems register their
/// metrics into `rt.metrics`.
pub async fn serve(
    config: AgentConfig,
    attestor: Arc<dyn WorkloadAttestor>,
    rt: sigil_daemon::Runtime,
) -> anyhow::Result<()> {
    let bundles = Arc::new(arc_swap::ArcSwap::from_pointee(
        sigil_spiffe::bundle::BundleSet::new(),
    ));
    let cache = cache::Cache::new(config.trust_domain.clone(), bundles, config.svid_cache_max);
    let public = sigil_daemon::bind_unix("socket_path", &config.socket_path, 0o755, 0o777)?;
    let admin_listener =
        sigil_daemon::bind_unix("admin_socket_path", &config.admin_socket_path, 0o700, 0o600)?;
    let manager = manager::Manager::start(config.clone(), cache.clone()).await?;
    manager.metrics.register(&rt.metrics, &cache);
    let attestor = manager.metrics.counting(attestor);
    let grpc_metrics = sigil_daemon::GrpcMetrics::register(&rt.metrics, metrics::PREFIX);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(manager.clone().run_sync());
    tasks.spawn(manager.clone().run_minter());
    tasks.spawn(manager.clone().run_renewal());

    let workload = workload::WorkloadApi::new(manager.clone(), attestor.clone());
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sigil_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let health = sigil_daemon::Health::new(
        rt.ready.clone(),
        &[
            "SpiffeWorkloadAPI",
            "spire.api.agent.delegatedidentity.v1.DelegatedIdentity",
        ],
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut s1 = stop_rx.clone();
    // The servers apart from the background tasks: on stop they get the drain timeout.
    let mut servers = tokio::task::JoinSet::new();
    let health1 = health.clone();
    let workload_layer = grpc_metrics.layer(&["SpiffeWorkloadAPI"]);
    let delegated_layer =
        grpc_metrics.layer(&["spire.api.agent.delegatedidentity.v1.DelegatedIdentity"]);
    servers.spawn(async move {
        tonic::transport::Server::builder()
            .layer(workload_layer)
            .add_service(SpiffeWorkloadApiServer::new(workload))
            .add_service(reflection)
            .add_service(health1.into_server())
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
    servers.spawn(async move {
        tonic::transport::Server::builder()
            .layer(delegated_layer)
            .add_service(delegated.into_server())
            .add_service(health.into_server())
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
    let metrics_server = match config.metrics_address {
        Some(addr) => {
            let (bound, task) =
                sigil_daemon::serve_metrics(addr, rt.metrics.clone(), stop_rx.clone())
                    .with_context(|| format!("metrics_address: binding {addr}"))?;
            tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let ready = rt.ready;
    ready.set_ready();
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
        Some(r) = tasks.join_next() => task_outcome(r),
        Some(r) = servers.join_next() => task_outcome(r),
    };
    ready.set_not_ready();
    // Stop accepting; calls in flight (open Workload API streams) get the drain timeout, then end
    // with their connections.
    let _ = stop_tx.send(true);
    let drained = sigil_daemon::drain(
        "agent APIs",
        async { while servers.join_next().await.is_some() {} },
        config.drain_timeout,
    )
    .await;
    if drained.is_none() {
        servers.abort_all();
        while servers.join_next().await.is_some() {}
    }
    tasks.abort_all();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    let _ = std::fs::remove_file(&config.socket_path);
    let _ = std::fs::remove_file(&config.admin_socket_path);
    outcome
}

fn task_outcome(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => Err(anyhow::anyhow!("an agent task ended unexpectedly")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("an agent task failed: {e}")),
    }
}

pub mod delegated;
pub mod metrics;
