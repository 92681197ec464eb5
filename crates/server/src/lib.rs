//! sigil-server: the trust-domain authority. It owns the CA, the registration entries and node
//! attestation, and serves the admin API (Unix socket) and the agent API (TLS 1.3 over TCP), where
//! admin workloads may also manage entries.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_tls;
pub mod agent_api;
pub mod catalog;
pub mod config;
pub mod error;
pub mod grpc;
pub mod listen;
pub mod metrics;
pub mod migrate;
pub mod state;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sigil_ca::{Clock, SystemClock};
use sigil_proto::admin::v1 as admin_pb;
use sigil_proto::agent::v1 as agent_pb;
use tokio::sync::watch;

pub use config::{RunArgs, ServerConfig};
pub use state::State;

/// How often the CA rotation and server-SVID renewal are checked.
pub const TICK: Duration = Duration::from_secs(5);

/// Largest gRPC message accepted or sent (batches of CSRs, bundle sets).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Runs `sigil server run` until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = ServerConfig::from_args(&args)?;
    sigil_daemon::init_logging(&config.log_level, config.log_format);
    sigil_daemon::raise_fd_limit();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        sigil_daemon::wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    serve(
        config,
        Arc::new(SystemClock),
        stop_rx,
        sigil_daemon::Runtime::default(),
    )
    .await
}

/// Serves both APIs with the given clock until `stop` turns true; `rt.ready` turns true once both
/// serve, false when draining begins; subsystems register their metrics into `rt.metrics`.
pub async fn serve(
    config: ServerConfig,
    clock: Arc<dyn Clock>,
    mut stop: watch::Receiver<bool>,
    rt: sigil_daemon::Runtime,
) -> anyhow::Result<()> {
    let state = tokio::task::spawn_blocking(move || State::open(config, clock))
        .await
        .context("start-up worker failed")??;
    let td = state.trust_domain();
    let admin_listener = listen::admin_listener(&state.config.admin_socket)?;
    let tcp = sigil_daemon::accept::bind_tcp(state.config.bind)
        .with_context(|| format!("bind: cannot listen on {}", state.config.bind))?;
    let bound = tcp.local_addr()?;

    state.metrics.register(&rt.metrics, &state);
    let grpc_metrics = sigil_daemon::GrpcMetrics::register(&rt.metrics, metrics::PREFIX);
    let admin = admin::Admin::new(state.clone());
    let tls_entries = admin_tls::TlsEntries::new(admin.clone(), state.clone());
    let admin_services = [
        "sigil.admin.v1.Entries",
        "sigil.admin.v1.Agents",
        "sigil.admin.v1.Bundles",
        "sigil.admin.v1.JoinTokens",
        "sigil.admin.v1.Svids",
        "sigil.admin.v1.TrustDomain",
    ];
    let admin_router = tonic::transport::Server::builder()
        .layer(grpc_metrics.layer(&admin_services))
        .add_service(
            admin_pb::entries_server::EntriesServer::new(admin.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(admin_pb::agents_server::AgentsServer::new(admin.clone()))
        .add_service(admin_pb::bundles_server::BundlesServer::new(admin.clone()))
        .add_service(admin_pb::join_tokens_server::JoinTokensServer::new(
            admin.clone(),
        ))
        .add_service(admin_pb::svids_server::SvidsServer::new(admin.clone()))
        .add_service(admin_pb::trust_domain_server::TrustDomainServer::new(admin))
        .add_service(sigil_daemon::Health::new(rt.ready.clone(), &admin_services).into_server());
    // The TLS listener also serves the entry API to admin workloads (checked per call).
    let node_router = tonic::transport::Server::builder()
        .layer(grpc_metrics.layer(&["sigil.agent.v1.Node", "sigil.admin.v1.Entries"]))
        .add_service(
            agent_pb::node_server::NodeServer::new(agent_api::NodeApi::new(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            admin_pb::entries_server::EntriesServer::new(tls_entries)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );

    let tls = listen::tls_acceptor(&state)?;
    let mut stop_admin = stop.clone();
    let mut stop_node = stop.clone();
    let admin_task = tokio::spawn(admin_router.serve_with_incoming_shutdown(
        sigil_h2_authority::normalize_incoming(sigil_daemon::accept::unix_incoming(
            admin_listener,
            "admin API",
        )),
        async move {
            let _ = stop_admin.wait_for(|s| *s).await;
        },
    ));
    let node_task = tokio::spawn(node_router.serve_with_incoming_shutdown(
        listen::tls_incoming(tcp, tls),
        async move {
            let _ = stop_node.wait_for(|s| *s).await;
        },
    ));
    let metrics_server = match state.config.metrics_address {
        Some(addr) => {
            let (bound, task) = sigil_daemon::serve_metrics(addr, rt.metrics.clone(), stop.clone())
                .with_context(|| format!("metrics_address: binding {addr}"))?;
            tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let ready = rt.ready;
    ready.set_ready();
    tracing::info!(
        trust_domain = %td,
        agent_api = %bound,
        admin_socket = %state.config.admin_socket.display(),
        "sigil-server ready"
    );

    let tick_state = state.clone();
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        loop {
            interval.tick().await;
            let s = tick_state.clone();
            match tokio::task::spawn_blocking(move || s.tick()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "rotation tick failed"),
                Err(e) => tracing::error!(error = %e, "rotation worker failed"),
            }
        }
    });

    let _ = stop.wait_for(|s| *s).await;
    ready.set_not_ready();
    ticker.abort();
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    // No new connections; calls in flight get the drain timeout, then end with their connections.
    let (admin_abort, node_abort) = (admin_task.abort_handle(), node_task.abort_handle());
    let joined = async { tokio::join!(admin_task, node_task) };
    let (a, n) = match sigil_daemon::drain("server APIs", joined, state.config.drain_timeout).await
    {
        Some(both) => both,
        None => {
            admin_abort.abort();
            node_abort.abort();
            let _ = std::fs::remove_file(&state.config.admin_socket);
            tracing::info!("sigil-server stopped");
            return Ok(());
        }
    };
    let _ = std::fs::remove_file(&state.config.admin_socket);
    a.context("admin API task")?.context("admin API")?;
    n.context("agent API task")?.context("agent API")?;
    tracing::info!("sigil-server stopped");
    Ok(())
}
