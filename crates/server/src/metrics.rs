//! sigil-server's Prometheus metrics: SVIDs signed by type, node attestations by attestor and
//! result, registration entries and agents (read at scrape time), and API calls by method and code.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sigil_daemon::{GaugeFn, Metrics};

use crate::State;

/// Prefix of sigil-server's metrics.
pub const PREFIX: &str = "sigil_server";

type L1 = [(&'static str, &'static str); 1];
type L2 = [(&'static str, &'static str); 2];

/// The server's counters; they count from creation and are registered once the daemon serves.
#[derive(Clone, Debug, Default)]
pub struct ServerMetrics {
    svids: Family<L1, Counter>,
    attestations: Family<L2, Counter>,
}

impl ServerMetrics {
    /// One X.509-SVID signed (for a workload or an agent).
    pub fn x509_signed(&self) {
        self.svids.get_or_create(&[("type", "x509")]).inc();
    }

    /// One JWT-SVID signed.
    pub fn jwt_signed(&self) {
        self.svids.get_or_create(&[("type", "jwt")]).inc();
    }

    /// One node attestation with `attestor` (`join_token`, `x509pop`) that succeeded or failed.
    pub fn attestation(&self, attestor: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.attestations
            .get_or_create(&[("attestor", attestor), ("result", result)])
            .inc();
    }

    /// Registers the counters and the scrape-time gauges of `state` into `m`.
    pub fn register(&self, m: &Metrics, state: &Arc<State>) {
        m.register(
            PREFIX,
            "svids_signed",
            "SVIDs signed, by type (x509, jwt)",
            self.svids.clone(),
        );
        m.register(
            PREFIX,
            "node_attestations",
            "Node attestations, by attestor and result",
            self.attestations.clone(),
        );
        let s = Arc::downgrade(state);
        m.register_collector(
            PREFIX,
            GaugeFn::single("entries", "Registration entries", move || {
                s.upgrade().map(|s| s.catalog.len() as f64).unwrap_or(0.0)
            }),
        );
        let s = Arc::downgrade(state);
        m.register_collector(
            PREFIX,
            GaugeFn::single("agents", "Attested agents (banned included)", move || {
                s.upgrade()
                    .and_then(|s| s.ds.list_agents(&Default::default()).ok())
                    .map(|a| a.len() as f64)
                    .unwrap_or(0.0)
            }),
        );
    }
}
