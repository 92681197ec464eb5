//! The live service map (`--ui-address`): a follower of the Hubble flow ring folds flows into a
//! bounded identity graph ([`graph`]), served over HTTP/1.1 ([`http`]) as one page, its script
//! and style, and `/api/graph` (JSON) that the page polls every second.

pub mod graph;
pub mod http;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;

use crate::hubble::{FlowRing, Item};
pub use graph::{Graph, GraphView};

/// Where the service map is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiConfig {
    /// The TCP address (loopback unless allowed).
    pub address: SocketAddr,
}

/// The UI settings from their layers: `ui_address` (default off), and `ui_allow_remote`, the
/// consent a non-loopback address needs (the map shows every flow and has no authentication).
pub fn config(
    l: &sigil_daemon::Layers,
    address: (Option<String>, Option<String>),
    allow_remote: (Option<bool>, Option<bool>),
) -> anyhow::Result<Option<UiConfig>> {
    let allow_remote = l
        .get("ui_allow_remote", allow_remote.0, allow_remote.1)?
        .unwrap_or(false);
    let address = l.parse("ui_address", address.0, address.1, |v| {
        match v.parse::<SocketAddr>() {
            Err(_) => Err("want IP:PORT (e.g. 127.0.0.1:12000)"),
            Ok(a) if !a.ip().is_loopback() && !allow_remote => Err(
                "not a loopback address: the service map is plaintext without authentication; set ui_allow_remote to serve it beyond this host",
            ),
            Ok(a) => Ok(a),
        }
    })?;
    Ok(address.map(|address| UiConfig { address }))
}

/// The shared graph.
pub type SharedGraph = Arc<Mutex<Graph>>;

/// Reads a poisoned lock too: every update leaves the graph consistent.
pub fn lock(g: &SharedGraph) -> std::sync::MutexGuard<'_, Graph> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows `ring` from its start until `stop`, folding every flow into `graph`; entries the ring
/// overwrote before they were read are counted as missed.
pub async fn follow(ring: Arc<FlowRing>, graph: SharedGraph, mut stop: watch::Receiver<bool>) {
    let mut wake = ring.subscribe();
    let mut seq = 0;
    loop {
        let r = ring.read_after(seq);
        if let Some(last) = r.entries.last() {
            seq = last.seq;
        }
        if r.missed > 0 || !r.entries.is_empty() {
            let mut g = lock(&graph);
            g.missed(r.missed);
            for e in &r.entries {
                match &*e.item {
                    Item::Flow(f) => g.add(f),
                    Item::Lost(l) => g.lost(l.num_events_lost),
                }
            }
        }
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Binds `config.address` and serves the map of `ring` until `stop`: the follower and the HTTP
/// server, as one task.
pub fn spawn(
    config: &UiConfig,
    node_name: &str,
    ring: Arc<FlowRing>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = sigil_daemon::accept::bind_tcp(config.address)
        .with_context(|| format!("ui_address: binding {}", config.address))?;
    let bound = listener.local_addr().context("ui_address: local address")?;
    tracing::info!(address = %bound, "service map serving");
    let graph: SharedGraph = Arc::new(Mutex::new(Graph::new(node_name, graph::DEFAULT_MAX_EDGES)));
    let follower = follow(ring, Arc::clone(&graph), stop.clone());
    let server = http::serve(listener, bound, graph, stop);
    Ok(tokio::spawn(async move {
        tokio::join!(follower, server);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn layers(env: &[(&str, &str)]) -> sigil_daemon::Layers {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        sigil_daemon::Layers::with_env("netd", None, env)
    }

    #[test]
    fn the_ui_is_off_by_default_and_a_remote_address_needs_consent() {
        let l = layers(&[]);
        assert_eq!(config(&l, (None, None), (None, None)).expect("off"), None);
        let c = config(&l, (Some("127.0.0.1:12000".into()), None), (None, None)).expect("lo");
        assert_eq!(c.map(|c| c.address.port()), Some(12000));
        let e = config(&l, (Some("0.0.0.0:12000".into()), None), (None, None)).expect_err("remote");
        assert!(
            e.to_string().starts_with(
                "ui_address: invalid value \"0.0.0.0:12000\" from flag: not a loopback"
            ),
            "{e}"
        );
        let c = config(&l, (None, Some("0.0.0.0:12000".into())), (None, Some(true)))
            .expect("consent in the file");
        assert!(c.is_some());
        let l = layers(&[
            ("SIGIL_NETD_UI_ADDRESS", "[::]:1"),
            ("SIGIL_NETD_UI_ALLOW_REMOTE", "true"),
        ]);
        assert!(
            config(&l, (None, None), (None, None))
                .expect("env")
                .is_some()
        );
        let l = layers(&[("SIGIL_NETD_UI_ADDRESS", "localhost:80")]);
        let e = config(&l, (None, None), (None, None)).expect_err("name");
        assert!(
            e.to_string().starts_with(
                "ui_address: invalid value \"localhost:80\" from environment variable SIGIL_NETD_UI_ADDRESS"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_toml_keys_reach_netds_config() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("netd.toml");
        let args = crate::RunArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let load = || {
            crate::Config::from_layers(&args, |p| {
                sigil_daemon::Layers::with_env("netd", p, HashMap::new())
            })
        };
        std::fs::write(
            &file,
            "ui_address = \"0.0.0.0:12000\"\nui_allow_remote = true\n",
        )
        .expect("write");
        let c = load().expect("config");
        assert_eq!(
            c.ui,
            Some(UiConfig {
                address: "0.0.0.0:12000".parse().expect("addr")
            })
        );
        std::fs::write(&file, "ui_address = \"0.0.0.0:12000\"\n").expect("write");
        let e = load().expect_err("no consent");
        assert!(
            e.to_string()
                .starts_with("ui_address: invalid value \"0.0.0.0:12000\" from config file"),
            "{e}"
        );
        std::fs::write(&file, "").expect("write");
        assert_eq!(load().expect("default").ui, None);
    }

    #[tokio::test]
    async fn the_follower_folds_the_ring_and_counts_what_it_missed() {
        use sigil_proto::flow as fpb;
        let ring = Arc::new(FlowRing::new(4));
        let flow = |src| {
            Item::Flow(fpb::Flow {
                source: Some(fpb::Endpoint {
                    identity: src,
                    ..Default::default()
                }),
                destination: Some(fpb::Endpoint::default()),
                ..Default::default()
            })
        };
        // Six pushed before the follower starts: two were overwritten.
        for n in 0..6 {
            ring.push(n, flow(300));
        }
        let graph: SharedGraph = Arc::new(Mutex::new(Graph::new("n", 10)));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(follow(Arc::clone(&ring), Arc::clone(&graph), stop));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while lock(&graph).view().flows < 4 {
            assert!(std::time::Instant::now() < deadline, "never read the ring");
            tokio::task::yield_now().await;
        }
        assert_eq!(lock(&graph).view().flows_missed, 2);
        ring.push(
            7,
            Item::Lost(fpb::LostEvent {
                num_events_lost: 3,
                ..Default::default()
            }),
        );
        ring.push(8, flow(301));
        loop {
            let v = lock(&graph).view();
            if v.flows == 5 && v.lost_events == 3 {
                assert_eq!(v.flows_missed, 2);
                assert_eq!(v.edges.len(), 2);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{v:?}");
            tokio::task::yield_now().await;
        }
        stop_tx.send_replace(true);
        task.await.expect("follower");
    }
}
