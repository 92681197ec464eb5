//! sigil-netd: creates endpoints (network namespace, veth, addresses from the pod CIDRs),
//! gives them identities from their labels, compiles policies with `sigil-policy` into the
//! eBPF datapath of `sigil-datapath`, streams verdict events, and serves a gRPC API on a Unix
//! socket. Maps and programs stay pinned and attached while the daemon is down; on start it
//! adopts them and reconciles with its state file.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod encryption;
pub mod error;
pub mod hubble;
pub mod identities;
pub mod metrics;
pub mod monitor;
pub mod reconcile;
pub mod registrar;
pub mod snapshot;
pub mod spiffe;
pub mod spiffe_id;
pub mod state;
pub mod txn;
pub mod ui;
pub mod watch;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use sigil_proto::netd::v1 as pb;
use tokio::sync::{broadcast, watch as tokio_watch};

pub use config::{Config, RunArgs};
pub use daemon::Daemon;
pub use error::NetdError;

/// Binds the API socket: a stale socket replaced, the socket 0600. Its directory (by default /run/sigil,
/// which also leads to the agent's public Workload API socket) is made 0755, ours, reached only
/// through directories of root or ours (see [`sigil_daemon::bind_unix`]); the socket's own mode keeps
/// other users out.
pub fn api_listener(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    Ok(sigil_daemon::bind_unix("api_socket", path, 0o755, 0o600)?)
}

/// Runs `sigil netd run` until SIGTERM or SIGINT. The datapath stays attached afterwards.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    sigil_daemon::init_logging(&config.log_level, config.log_format);
    sigil_daemon::raise_fd_limit();
    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    tokio::spawn(async move {
        sigil_daemon::wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    serve(config, stop_rx, sigil_daemon::Runtime::default()).await
}

/// Starts the daemon with `config` and serves until `stop` turns true; `rt.ready` turns true once the
/// API serves and false when draining begins. In-flight calls then get `drain_timeout` to finish.
/// Subsystems register their metrics into `rt.metrics`.
pub async fn serve(
    mut config: Config,
    mut stop: tokio_watch::Receiver<bool>,
    rt: sigil_daemon::Runtime,
) -> anyhow::Result<()> {
    let ready = rt.ready;
    let socket = config.api_socket.clone();
    let pin_dir = config.bpf_pin_dir.clone();
    let policy_dir = config.policy_dir.clone();
    sigil_daemon::own_dir(&config.state_dir, 0o700).context("state_dir")?;
    // Cluster mode: join before the datapath starts (the pod CIDR may be leased, and the
    // cluster's identities must be in the engine before any map is installed).
    // `--encryption spiffe`: the node SVID first, its SPIFFE ID goes into the registry.
    let node_svid = match config.cluster.as_ref().map(|c| &c.encryption) {
        Some(config::Encryption::Spiffe { workload_socket }) => {
            let svid = encryption::fetch_node_svid(workload_socket).await?;
            tracing::info!(id = %svid.id, "node SVID for the encrypted carrier");
            Some((svid, workload_socket.clone()))
        }
        _ => None,
    };
    let joined = match &config.cluster {
        Some(_) => {
            Some(cluster::join(&mut config, node_svid.as_ref().map(|(s, _)| s.id.clone())).await?)
        }
        None => None,
    };
    let cluster_start = joined.as_ref().map(|j| daemon::ClusterStart {
        ids: identities::ClusterIds::new(Arc::clone(&j.alloc), tokio::runtime::Handle::current()),
        identities: j.alloc.list(),
    });
    let agent = match config.identity_mode {
        config::IdentityMode::Spiffe => {
            let client = sigil_delegated_client::Client::new(&config.agent_socket);
            spiffe::check_agent(&client).await?;
            Some(client)
        }
        config::IdentityMode::Classic => None,
    };
    let config = Arc::new(config);
    let daemon =
        tokio::task::block_in_place(|| Daemon::start_with((*config).clone(), cluster_start))
            .context("starting netd")?;
    let endpoints = daemon.list_endpoints().len();
    let (handle, reconciler) = reconcile::spawn(daemon).context("starting the reconciler")?;
    // Derived SPIFFE ID modes: netd keeps this node's entries on the server itself.
    let registrar = config.spiffe_ids.registrar.clone().map(|cfg| {
        tracing::info!(mode = config.spiffe_ids.mode.name(), parent = %cfg.agent_spiffe_id, server = %cfg.server_address, "registering derived entries");
        tokio::spawn(registrar::run(cfg, handle.snapshot_cell(), stop.clone()))
    });
    let (events_tx, _) = broadcast::channel(4096);
    let reader = sigil_datapath::EventReader::open_pinned(&pin_dir)
        .context("opening the event ring buffer")?;
    let counters =
        sigil_datapath::Counters::open_pinned(&pin_dir).context("opening the counter maps")?;
    let flows = Arc::new(hubble::FlowRing::new(config.hubble.max_flows));
    let netd_metrics = metrics::NetdMetrics::register(&rt.metrics, handle.snapshot_cell());
    let recorder = hubble::Recorder::new(Arc::clone(&flows), &config.node_name)
        .with_metrics(netd_metrics.flows.clone());
    let (recorder, export_counters, export_thread) = match &config.hubble.export {
        Some(x) => {
            let (exporter, thread) = hubble::export::Exporter::start(x, &config.node_name)?;
            let counters = Arc::clone(exporter.counters());
            tracing::info!(path = %x.path.display(), max_size_bytes = x.max_size_bytes, max_backups = x.max_backups, "exporting flows");
            (recorder.with_export(exporter), Some(counters), Some(thread))
        }
        None => (recorder, None, None),
    };
    let auth_kick = Arc::new(tokio::sync::Notify::new());
    let keys = Arc::new(auth::Keys::default());
    let auth_view: auth::AuthView = Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new()));
    let (auth_settled_tx, auth_settled) = tokio::sync::watch::channel(BTreeSet::new());
    let monitor = tokio::spawn(monitor::run(
        reader,
        handle.snapshot_cell(),
        events_tx.clone(),
        Some(recorder.clone()),
        Some(Arc::clone(&auth_kick)),
    ));
    // Cluster mode: the auth manager owns the auth map; peers reach the handshake server on
    // the node address.
    let auth_tasks = match &config.cluster {
        Some(cc) => {
            let addr = std::net::SocketAddr::new(cc.node_ip, cc.mutual_auth_port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("mutual_auth_port: binding {addr}"))?;
            tracing::info!(%addr, "mutual authentication handshakes served");
            let (served_tx, served_rx) = tokio::sync::mpsc::unbounded_channel();
            let ctx: Arc<dyn sigil_mutual_auth::AuthContext> = Arc::new(
                auth::NetdAuth::new(handle.snapshot_cell(), Arc::clone(&keys))
                    .with_recorder(served_tx),
            );
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let server = tokio::spawn(async move {
                if let Err(e) = sigil_mutual_auth::serve(listener, ctx, done_tx).await {
                    tracing::error!(error = %e, "the mutual authentication server stopped");
                }
            });
            let served_count = netd_metrics.auth.clone();
            let served = tokio::spawn(async move {
                while let Some(a) = done_rx.recv().await {
                    served_count.success();
                    tracing::info!(peer = %a.peer_node, local = a.pair.local.get(), remote = a.pair.remote.get(), peer_id = %a.peer_id, "mutual auth: pair authenticated for a peer (server)");
                }
            });
            let manager = auth::Manager {
                map: sigil_datapath::AuthMap::open_pinned(&pin_dir)
                    .context("opening the auth map")?,
                snapshot: handle.snapshot_cell(),
                keys: Arc::clone(&keys),
                port: cc.mutual_auth_port,
                kick: Arc::clone(&auth_kick),
                view: Arc::clone(&auth_view),
                changes: handle.changes(),
                handshakes: netd_metrics.auth.clone(),
                served: served_rx,
                settled: auth_settled_tx,
            };
            let manager = tokio::spawn(auth::run(manager, stop.clone()));
            vec![server, served, manager]
        }
        None => Vec::new(),
    };
    let lost_watcher = tokio::spawn(hubble::watch_lost(
        sigil_datapath::Counters::open_pinned(&pin_dir).context("opening the counter maps")?,
        recorder,
        stop.clone(),
    ));
    let watcher = policy_dir.map(|dir| tokio::spawn(watch::run(dir, handle.clone(), stop.clone())));
    let identities = agent.map(|client| {
        tokio::spawn(spiffe::run(
            handle.clone(),
            client,
            config.node_name.clone(),
            config.identity_fallback_wait,
            config
                .spiffe_ids
                .registrar
                .as_ref()
                .map(|r| r.deriver.clone()),
            Arc::clone(&keys),
            stop.clone(),
        ))
    });
    let nodes_view: Option<cluster::NodesView> = joined
        .as_ref()
        .map(|_| Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())));
    let (published_tx, published_rx) = tokio::sync::watch::channel(cluster::Published::new());
    let mut carrier = None;
    let mut carrier_feed = None;
    match (node_svid, config.cluster.as_ref(), &nodes_view) {
        (Some((svid, socket)), Some(cc), Some(view)) => {
            let std::net::IpAddr::V4(node_ip) = cc.node_ip else {
                anyhow::bail!(
                    "node_ip: invalid value \"{}\": encryption spiffe needs IPv4",
                    cc.node_ip
                );
            };
            let hosted = Arc::new(encryption::Hosted::default());
            let changed = Arc::new(tokio::sync::Notify::new());
            carrier_feed = Some((Arc::clone(&hosted), Arc::clone(&changed)));
            carrier = Some(
                encryption::start(
                    node_ip,
                    svid,
                    socket,
                    Arc::clone(view),
                    hosted,
                    changed,
                    stop.clone(),
                )
                .await?,
            );
        }
        (None, Some(_), _) => {
            // A node switched back to disabled: nothing of an earlier carrier stays.
            tokio::task::spawn_blocking(encryption::remove_network).await?;
        }
        _ => {}
    }
    let cluster_task = match (joined, config.cluster.clone(), &nodes_view) {
        (Some(j), Some(cc), Some(view)) => Some(tokio::spawn(cluster::run(
            j,
            cc,
            config.state_dir.clone(),
            handle.clone(),
            cluster::Outputs {
                nodes: Arc::clone(view),
                published: published_tx,
            },
            carrier_feed,
            stop.clone(),
        ))),
        _ => None,
    };
    let listener = api_listener(&socket)?;
    let mut api = api::Api::new(handle, Arc::clone(&config), counters, events_tx)
        .with_import_latency(netd_metrics.import_latency.clone())
        // Only a cluster runs the auth manager that settles pairs; a single node has none.
        .with_auth(
            Arc::clone(&auth_view),
            config.cluster.is_some().then_some(auth_settled),
        );
    if let Some(view) = nodes_view {
        api = api.with_cluster(view, published_rx);
    }
    if let Some(c) = &carrier {
        api = api.with_encryption(Arc::clone(&c.status));
    }
    if let Some(c) = export_counters {
        api = api.with_export(c);
    }
    let services = [
        "sigil.netd.v1.Endpoints",
        "sigil.netd.v1.Policies",
        "sigil.netd.v1.Monitor",
        "sigil.netd.v1.Status",
        "sigil.netd.v1.Cluster",
        "sigil.netd.v1.Auth",
        "sigil.netd.v1.Encryption",
    ];
    let router = tonic::transport::Server::builder()
        .layer(netd_metrics.grpc.layer(&services))
        .add_service(pb::endpoints_server::EndpointsServer::new(api.clone()))
        .add_service(pb::policies_server::PoliciesServer::new(api.clone()))
        .add_service(pb::monitor_server::MonitorServer::new(api.clone()))
        .add_service(pb::cluster_server::ClusterServer::new(api.clone()))
        .add_service(pb::auth_server::AuthServer::new(api.clone()))
        .add_service(pb::encryption_server::EncryptionServer::new(api.clone()))
        .add_service(pb::status_server::StatusServer::new(api))
        .add_service(sigil_daemon::Health::new(ready.clone(), &services).into_server());
    let ui = match &config.ui {
        Some(c) => Some(ui::spawn(
            c,
            &config.node_name,
            Arc::clone(&flows),
            stop.clone(),
        )?),
        None => None,
    };
    let hubble_servers = serve_hubble(&config, flows, ready.clone(), stop.clone())?;
    let metrics_server = match config.metrics_address {
        Some(addr) => {
            let (bound, task) = sigil_daemon::serve_metrics(addr, rt.metrics.clone(), stop.clone())
                .with_context(|| format!("metrics_address: binding {addr}"))?;
            tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let mut stop_server = stop.clone();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(
        sigil_h2_authority::normalize_incoming(sigil_daemon::accept::unix_incoming(
            listener, "netd API",
        )),
        async move {
            let _ = stop_server.wait_for(|s| *s).await;
        },
    ));
    ready.set_ready();
    tracing::info!(hubble_socket = %config.hubble.socket.display(), hubble_listen_address = ?config.hubble.listen_address, max_flows = config.hubble.max_flows, "Hubble Observer API serving");
    tracing::info!(api_socket = %socket.display(), pin_dir = %pin_dir.display(), endpoints, "sigil-netd ready");
    let served = tokio::select! {
        r = &mut server => Some(r),
        _ = stop.wait_for(|s| *s) => None,
    };
    ready.set_not_ready();
    let served = match served {
        Some(r) => r,
        // Stopped: no new connections; calls in flight (an event stream, an import) get the drain
        // timeout, then the server is dropped with them.
        None => match sigil_daemon::drain("netd API", &mut server, config.drain_timeout).await {
            Some(r) => r,
            None => {
                server.abort();
                // Wait until the aborted server is dropped: it holds handles the reconciler
                // waits on.
                let _ = (&mut server).await;
                Ok(Ok(()))
            }
        },
    };
    let served = served.map_err(|e| anyhow::anyhow!("API server task: {e}"))?;
    let _ = stop.wait_for(|s| *s).await;
    // Follow streams end on stop, so the Hubble servers finish their graceful shutdown promptly;
    // the drain bound covers a client that does not read.
    for (what, mut h) in hubble_servers {
        match sigil_daemon::drain(what, &mut h, config.drain_timeout).await {
            Some(Ok(Err(e))) => tracing::warn!(error = %e, "{what} stopped with an error"),
            Some(_) => {}
            None => {
                h.abort();
                let _ = h.await;
            }
        }
    }
    let _ = lost_watcher.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    if let Some(u) = ui {
        let _ = u.await;
    }
    monitor.abort();
    let _ = monitor.await;
    // The manager revokes its entries on stop; the server and its log follow it.
    for (i, t) in auth_tasks.into_iter().enumerate().rev() {
        if i == 2 {
            let _ = t.await;
        } else {
            t.abort();
            let _ = t.await;
        }
    }
    // The recorders are gone: the export writer writes what is queued and ends.
    if let Some(t) = export_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some(r) = registrar {
        // A round cut short is harmless: the next start lists and adopts what is there.
        r.abort();
        let _ = r.await;
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    if let Some(i) = identities {
        let _ = i.await;
    }
    if let Some(c) = cluster_task {
        let _ = c.await;
    }
    if let Some(c) = carrier {
        c.stop().await;
    }
    // Every handle is gone with the server and the watcher: the reconciler finishes the
    // change in hand and stops.
    let _ = tokio::task::spawn_blocking(move || reconciler.join()).await;
    let _ = std::fs::remove_file(&socket);
    served.context("API server")?;
    tracing::info!("sigil-netd stopped; the datapath stays attached");
    Ok(())
}

/// A spawned gRPC server: what it is and its task.
type ServerTask = (
    &'static str,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
);

/// Binds the Hubble Unix socket (0600, like the API socket) and, if configured, the TCP address,
/// and serves `observer.Observer` with `grpc.health.v1` on each until `stop`.
fn serve_hubble(
    config: &Config,
    flows: Arc<hubble::FlowRing>,
    ready: sigil_daemon::Readiness,
    stop: tokio_watch::Receiver<bool>,
) -> anyhow::Result<Vec<ServerTask>> {
    let h = &config.hubble;
    let listener = sigil_daemon::bind_unix("hubble_socket", &h.socket, 0o755, 0o600)?;
    let router = |address: String| {
        let observer = hubble::Observer::new(
            Arc::clone(&flows),
            &config.node_name,
            &address,
            h.max_follow_streams,
            stop.clone(),
        );
        tonic::transport::Server::builder()
            // Each follow stream is an HTTP/2 stream: bound them per connection too.
            .max_concurrent_streams(Some(256))
            .add_service(observer.into_server())
            .add_service(
                sigil_daemon::Health::new(ready.clone(), &[hubble::HEALTH_SERVICE]).into_server(),
            )
    };
    let shutdown = |mut s: tokio_watch::Receiver<bool>| async move {
        let _ = s.wait_for(|v| *v).await;
    };
    let mut tasks: Vec<ServerTask> = vec![(
        "Hubble API (Unix socket)",
        tokio::spawn(
            router(format!("unix://{}", h.socket.display())).serve_with_incoming_shutdown(
                sigil_h2_authority::normalize_incoming(sigil_daemon::accept::unix_incoming(
                    listener,
                    "Hubble API",
                )),
                shutdown(stop.clone()),
            ),
        ),
    )];
    if let Some(addr) = h.listen_address {
        let tcp = sigil_daemon::accept::bind_tcp(addr)
            .with_context(|| format!("hubble_listen_address: binding {addr}"))?;
        let bound = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(address = %bound, "Hubble Observer API on TCP");
        tasks.push((
            "Hubble API (TCP)",
            tokio::spawn(router(bound).serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(tcp),
                shutdown(stop.clone()),
            )),
        ));
    }
    Ok(tasks)
}
