//! sigil-agent's Prometheus metrics: workload SVIDs minted and rotated, the agent's own SVID
//! (attestations, renewals), workload attestation outcomes, cache sizes (read at scrape time), and
//! Workload API / Delegated Identity API calls by method and code with latency histograms.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sigil_attestor::{AttestError, PeerIdentity, Selector, WorkloadAttestor};
use sigil_daemon::{GaugeFn, Metrics};

use crate::cache::Cache;

/// Prefix of sigil-agent's metrics.
pub const PREFIX: &str = "sigil_agent";

type L1 = [(&'static str, &'static str); 1];

/// The agent's counters; they count from creation and are registered when the daemon serves.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    svids: Family<L1, Counter>,
    agent_svid: Family<L1, Counter>,
    attestations: Family<L1, Counter>,
}

impl AgentMetrics {
    /// `n` workload X.509-SVIDs minted (first issue or rotation).
    pub fn x509_minted(&self, n: u64) {
        self.svids.get_or_create(&[("type", "x509")]).inc_by(n);
    }

    /// One JWT-SVID minted by the server for a workload.
    pub fn jwt_minted(&self) {
        self.svids.get_or_create(&[("type", "jwt")]).inc();
    }

    /// The agent's own SVID replaced by `how` (`attestation` or `renewal`).
    pub fn agent_svid(&self, how: &'static str) {
        self.agent_svid.get_or_create(&[("how", how)]).inc();
    }

    fn attestation(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.attestations.get_or_create(&[("result", result)]).inc();
    }

    /// Registers the counters and the cache gauges into `m`.
    pub fn register(&self, m: &Metrics, cache: &Arc<Cache>) {
        m.register(
            PREFIX,
            "svids_minted",
            "Workload SVIDs minted by the server for this agent (X.509: first issue and each rotation), by type",
            self.svids.clone(),
        );
        m.register(
            PREFIX,
            "agent_svid_updates",
            "The agent's own SVID replaced, by how (attestation, renewal)",
            self.agent_svid.clone(),
        );
        m.register(
            PREFIX,
            "workload_attestations",
            "Workload attestations of API callers (and of delegated pids), by result",
            self.attestations.clone(),
        );
        let c = Arc::downgrade(cache);
        m.register_collector(
            PREFIX,
            GaugeFn::single(
                "cache_entries",
                "Registration entries in the agent's cache",
                move || c.upgrade().map(|c| c.entry_count() as f64).unwrap_or(0.0),
            ),
        );
        let c = Arc::downgrade(cache);
        m.register_collector(
            PREFIX,
            GaugeFn::single(
                "cache_svids",
                "X.509-SVIDs held in the agent's cache",
                move || c.upgrade().map(|c| c.svid_count() as f64).unwrap_or(0.0),
            ),
        );
    }

    /// `inner` with each outcome counted.
    pub fn counting(&self, inner: Arc<dyn WorkloadAttestor>) -> Arc<dyn WorkloadAttestor> {
        Arc::new(Counting {
            inner,
            metrics: self.clone(),
        })
    }
}

struct Counting {
    inner: Arc<dyn WorkloadAttestor>,
    metrics: AgentMetrics,
}

impl WorkloadAttestor for Counting {
    fn attest(&self, peer: &PeerIdentity) -> Result<Vec<Selector>, AttestError> {
        let r = self.inner.attest(peer);
        self.metrics.attestation(r.is_ok());
        r
    }
}
