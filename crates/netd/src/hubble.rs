//! Hubble's Observer API on sigil-netd: every datapath event becomes a `flow.Flow` in a bounded
//! ring buffer ([`ring`]), converted with the names of the moment ([`convert`]); clients read it
//! through `observer.Observer` ([`server`]) with Hubble's filters ([`filter`]) on a Unix socket
//! (0600) and, if configured, on TCP (loopback unless explicitly allowed: the API has no
//! authentication of its own).

pub mod convert;
pub mod export;
pub mod filter;
pub mod ring;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use sigil_datapath::{Counters, Event};
use sigil_proto::flow as fpb;
use tokio::sync::watch;

use crate::daemon::Snapshot;

pub use ring::{FlowRing, Item};
pub use server::{HEALTH_SERVICE, Observer};

/// Hubble's default ring capacity.
pub const DEFAULT_MAX_FLOWS: usize = 4095;
/// Default bound on follow streams open at once.
pub const DEFAULT_MAX_FOLLOW_STREAMS: usize = 64;
/// Largest ring the configuration accepts (each flow is about 1 KiB).
pub const MAX_MAX_FLOWS: usize = 1 << 20;
/// Default name of the Hubble socket, beside the API socket.
pub const DEFAULT_SOCKET_NAME: &str = "hubble.sock";
/// How often the kernel's lost-event counter is read.
const LOST_POLL: Duration = Duration::from_secs(1);

/// The writer side: turns datapath events into flows in the ring.
#[derive(Clone)]
pub struct Recorder {
    ring: Arc<FlowRing>,
    node_name: Arc<str>,
    export: Option<export::Exporter>,
}

impl Recorder {
    /// A recorder into `ring` for node `node_name`.
    pub fn new(ring: Arc<FlowRing>, node_name: &str) -> Self {
        Self {
            ring,
            node_name: Arc::from(node_name),
            export: None,
        }
    }

    /// Also hands every flow and lost-event notice to `exporter`.
    pub fn with_export(mut self, exporter: export::Exporter) -> Self {
        self.export = Some(exporter);
        self
    }

    /// Converts `ev` with the names in `snap` and stores it.
    pub fn record(&self, ev: &Event, snap: &Snapshot) {
        let unix = convert::boot_to_unix_offset_ns().saturating_add_unsigned(ev.ts_ns);
        let flow = convert::flow_of(
            ev,
            snap,
            &self.node_name,
            unix,
            uuid::Uuid::new_v4().to_string(),
        );
        if let Some(x) = &self.export {
            x.flow(&flow, flow.time);
        }
        self.ring.push(unix, Item::Flow(flow));
    }

    /// Stores a notice that `n` datapath events were lost (the kernel ring buffer was full).
    pub fn record_lost(&self, n: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let lost = fpb::LostEvent {
            source: fpb::LostEventSource::PerfEventRingBuffer as i32,
            num_events_lost: n,
            cpu: None,
        };
        if let Some(x) = &self.export {
            x.lost(
                lost,
                Some(prost_types::Timestamp {
                    seconds: now.div_euclid(1_000_000_000),
                    nanos: i32::try_from(now.rem_euclid(1_000_000_000)).unwrap_or(0),
                }),
            );
        }
        self.ring.push(now, Item::Lost(lost));
    }
}

/// Reads the kernel's lost-event counter every second until `stop`, storing each increase as a
/// lost-event notice (the count at start is history, not news).
pub async fn watch_lost(counters: Counters, recorder: Recorder, mut stop: watch::Receiver<bool>) {
    let mut last = counters.lost_events().unwrap_or(0);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOST_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match counters.lost_events() {
            Ok(n) if n > last => {
                recorder.record_lost(n - last);
                last = n;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the lost-event counter"),
        }
    }
}
