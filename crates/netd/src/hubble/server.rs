//! `observer.Observer` over the flow ring: `GetFlows` (history by `number`/`first`/`since`/`until`,
//! then `follow`), `ServerStatus`, `GetNodes` (this node), `GetNamespaces`; agent and debug events
//! are not produced (Unimplemented). Follow streams are bounded: past the limit a new one is
//! refused with `ResourceExhausted` instead of pinning more memory and tasks.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;
use sigil_proto::relay;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{timestamp, unix_ns};
use super::filter::Filters;
use super::ring::{Entry, FlowRing, Item};

/// The gRPC health service name of the Observer, as Hubble registers it.
pub const HEALTH_SERVICE: &str = "hubble.server.Observer";

/// The Observer service over a ring. Cheap to clone.
#[derive(Clone)]
pub struct Observer {
    ring: Arc<FlowRing>,
    node_name: Arc<str>,
    address: Arc<str>,
    started: Instant,
    follows: Arc<Semaphore>,
    max_follows: usize,
    stop: watch::Receiver<bool>,
}

impl Observer {
    /// An Observer over `ring` for node `node_name` reachable at `address` (reported by
    /// `GetNodes`), allowing `max_follows` follow streams at once; streams end when `stop` turns
    /// true.
    pub fn new(
        ring: Arc<FlowRing>,
        node_name: &str,
        address: &str,
        max_follows: usize,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            ring,
            node_name: Arc::from(node_name),
            address: Arc::from(address),
            started: Instant::now(),
            follows: Arc::new(Semaphore::new(max_follows)),
            max_follows,
            stop,
        }
    }

    /// The tonic service to add to a router.
    pub fn into_server(self) -> opb::observer_server::ObserverServer<Self> {
        opb::observer_server::ObserverServer::new(self)
    }

    fn uptime_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A validated `GetFlowsRequest`.
#[derive(Debug, Clone)]
pub struct FlowQuery {
    number: u64,
    first: bool,
    follow: bool,
    since: Option<i64>,
    until: Option<i64>,
    filters: Filters,
}

impl FlowQuery {
    /// Checks `req` with Hubble's rules; the error names the field.
    pub fn new(req: &opb::GetFlowsRequest) -> Result<Self, Status> {
        if req.first && req.follow {
            return Err(Status::invalid_argument(
                "first: invalid value true: cannot be combined with follow",
            ));
        }
        let time = |name: &str, t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .map(|t| {
                    unix_ns(t).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{name}: invalid value {}s {}ns: not a valid timestamp",
                            t.seconds, t.nanos
                        ))
                    })
                })
                .transpose()
        };
        let since = time("since", &req.since)?;
        let until = time("until", &req.until)?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(Status::invalid_argument(format!(
                "until: invalid value {u}ns since the epoch: before since ({s}ns)"
            )));
        }
        let filters = Filters::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Self {
            number: req.number,
            first: req.first,
            follow: req.follow,
            since,
            until,
            filters,
        })
    }

    fn in_window(&self, t: i64) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }

    /// The stored entries this query returns, oldest first: lost-event notices in the window are
    /// always kept (they are not filtered), flows only when they match; `number` limits the
    /// flows to the last (or, with `first`, the first) `number`.
    pub fn history(&self, entries: &[Entry]) -> Vec<Entry> {
        if self.follow && self.number == 0 && self.since.is_none() {
            // `follow` alone: only what comes next.
            return Vec::new();
        }
        let keep = |e: &&Entry| {
            self.in_window(e.time_ns)
                && match &*e.item {
                    Item::Flow(f) => self.filters.matches(f),
                    Item::Lost(_) => true,
                }
        };
        let is_flow = |e: &Entry| matches!(*e.item, Item::Flow(_));
        if self.number == 0 {
            return entries.iter().filter(keep).cloned().collect();
        }
        let mut out = Vec::new();
        let mut flows = 0;
        if self.first {
            for e in entries.iter().filter(keep) {
                if is_flow(e) {
                    if flows == self.number {
                        break;
                    }
                    flows += 1;
                }
                out.push(e.clone());
            }
        } else {
            for e in entries.iter().rev().filter(keep) {
                if is_flow(e) {
                    if flows == self.number {
                        break;
                    }
                    flows += 1;
                }
                out.push(e.clone());
            }
            out.reverse();
        }
        out
    }
}

fn response(e: &Entry, node_name: &str) -> opb::GetFlowsResponse {
    use opb::get_flows_response::ResponseTypes;
    let r = match &*e.item {
        Item::Flow(f) => ResponseTypes::Flow(f.clone()),
        Item::Lost(l) => ResponseTypes::LostEvents(*l),
    };
    opb::GetFlowsResponse {
        response_types: Some(r),
        node_name: node_name.to_owned(),
        time: Some(timestamp(e.time_ns)),
    }
}

fn lost_response(n: u64, node_name: &str) -> opb::GetFlowsResponse {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    opb::GetFlowsResponse {
        response_types: Some(opb::get_flows_response::ResponseTypes::LostEvents(
            fpb::LostEvent {
                source: fpb::LostEventSource::HubbleRingBuffer as i32,
                num_events_lost: n,
                cpu: None,
            },
        )),
        node_name: node_name.to_owned(),
        time: Some(timestamp(now)),
    }
}

/// The state of one GetFlows stream.
struct FlowStream {
    query: FlowQuery,
    ring: Arc<FlowRing>,
    node_name: Arc<str>,
    pending: VecDeque<opb::GetFlowsResponse>,
    last_seq: u64,
    wake: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    /// Held while the stream lives: one of the bounded follow places.
    _permit: Option<OwnedSemaphorePermit>,
    done: bool,
}

impl FlowStream {
    /// Queues what arrived after `last_seq`; ends the stream at the first flow after `until`.
    fn catch_up(&mut self) {
        let r = self.ring.read_after(self.last_seq);
        if r.missed > 0 {
            self.pending
                .push_back(lost_response(r.missed, &self.node_name));
        }
        for e in r.entries {
            self.last_seq = e.seq;
            if self.query.until.is_some_and(|u| e.time_ns > u) {
                self.done = true;
                return;
            }
            let keep = match &*e.item {
                Item::Flow(f) => self.query.in_window(e.time_ns) && self.query.filters.matches(f),
                Item::Lost(_) => true,
            };
            if keep {
                self.pending.push_back(response(&e, &self.node_name));
            }
        }
    }

    async fn next(mut self) -> Option<(Result<opb::GetFlowsResponse, Status>, Self)> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some((Ok(r), self));
            }
            if self.done || !self.query.follow || *self.stop.borrow() {
                return None;
            }
            let woke = tokio::select! {
                changed = self.wake.changed() => changed.is_ok(),
                _ = self.stop.wait_for(|s| *s) => false,
            };
            if !woke {
                return None;
            }
            self.catch_up();
        }
    }
}

type FlowsStream = Pin<Box<dyn Stream<Item = Result<opb::GetFlowsResponse, Status>> + Send>>;
type AgentStream = Pin<Box<dyn Stream<Item = Result<opb::GetAgentEventsResponse, Status>> + Send>>;
type DebugStream = Pin<Box<dyn Stream<Item = Result<opb::GetDebugEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl opb::observer_server::Observer for Observer {
    type GetFlowsStream = FlowsStream;
    type GetAgentEventsStream = AgentStream;
    type GetDebugEventsStream = DebugStream;

    async fn get_flows(
        &self,
        request: Request<opb::GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let query = FlowQuery::new(request.get_ref())?;
        let permit = if query.follow {
            Some(Arc::clone(&self.follows).try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(format!(
                    "follow: {} follow streams are open, the most this server allows \
                     (hubble_max_follow_streams)",
                    self.max_follows
                ))
            })?)
        } else {
            None
        };
        // Subscribe before reading the history so nothing pushed in between is missed.
        let wake = self.ring.subscribe();
        let (entries, last_seq) = self.ring.entries();
        let pending = query
            .history(&entries)
            .iter()
            .map(|e| response(e, &self.node_name))
            .collect();
        let state = FlowStream {
            query,
            ring: Arc::clone(&self.ring),
            node_name: Arc::clone(&self.node_name),
            pending,
            last_seq,
            wake,
            stop: self.stop.clone(),
            _permit: permit,
            done: false,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            FlowStream::next,
        ))))
    }

    async fn get_agent_events(
        &self,
        _: Request<opb::GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented(
            "GetAgentEvents: sigil-netd records no agent events",
        ))
    }

    async fn get_debug_events(
        &self,
        _: Request<opb::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented(
            "GetDebugEvents: sigil-netd records no datapath debug events",
        ))
    }

    async fn get_nodes(
        &self,
        _: Request<opb::GetNodesRequest>,
    ) -> Result<Response<opb::GetNodesResponse>, Status> {
        Ok(Response::new(opb::GetNodesResponse {
            nodes: vec![opb::Node {
                name: self.node_name.to_string(),
                version: version(),
                address: self.address.to_string(),
                state: relay::NodeState::NodeConnected as i32,
                tls: Some(opb::Tls::default()),
                uptime_ns: self.uptime_ns(),
                num_flows: self.ring.num_flows() as u64,
                max_flows: self.ring.capacity() as u64,
                seen_flows: self.ring.seen_flows(),
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<opb::GetNamespacesRequest>,
    ) -> Result<Response<opb::GetNamespacesResponse>, Status> {
        let (entries, _) = self.ring.entries();
        let mut seen = BTreeSet::new();
        for e in &entries {
            if let Item::Flow(f) = &*e.item {
                for ep in [&f.source, &f.destination].into_iter().flatten() {
                    if !ep.namespace.is_empty() {
                        seen.insert(ep.namespace.clone());
                    }
                }
            }
        }
        Ok(Response::new(opb::GetNamespacesResponse {
            namespaces: seen
                .into_iter()
                .map(|namespace| opb::Namespace {
                    cluster: String::new(),
                    namespace,
                })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _: Request<opb::ServerStatusRequest>,
    ) -> Result<Response<opb::ServerStatusResponse>, Status> {
        Ok(Response::new(opb::ServerStatusResponse {
            num_flows: self.ring.num_flows() as u64,
            max_flows: self.ring.capacity() as u64,
            seen_flows: self.ring.seen_flows(),
            uptime_ns: self.uptime_ns(),
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: Vec::new(),
            version: version(),
        }))
    }
}

fn version() -> String {
    format!("sigil-netd {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests;
