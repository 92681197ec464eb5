//! Flows of several nodes merged in time order (Hubble Relay's job, in the client): one stream per
//! node, a k-way merge that emits the oldest head once every open stream has one; while following,
//! a flow waits at most the lookahead for slower nodes, then goes out (a later, older flow of a
//! slow node is printed late rather than never). A node that cannot be reached, or whose stream
//! fails, is reported as a `NODE_UNAVAILABLE` node status (relay's `nodes_unavailable`), and the
//! others go on.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use sigil_proto::observer as opb;
use sigil_proto::observer::get_flows_response::ResponseTypes;
use sigil_proto::observer::observer_client::ObserverClient;
use sigil_proto::relay;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Server;
use super::print::Printer;

/// One node to read.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its name (for reports).
    pub name: String,
    /// Where its Observer is.
    pub server: Server,
}

/// Most responses held for one node before the oldest head is emitted anyway.
const MAX_QUEUED: usize = 65_536;

enum Msg {
    Resp(usize, Box<opb::GetFlowsResponse>),
    Done(usize),
    Failed(usize, String),
}

fn time_of(r: &opb::GetFlowsResponse) -> (i64, i32) {
    let flow_time = match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f.time,
        _ => None,
    };
    let t = r.time.or(flow_time);
    t.map(|t| (t.seconds, t.nanos)).unwrap_or((0, 0))
}

async fn read_node(i: usize, node: Node, req: opb::GetFlowsRequest, tx: mpsc::Sender<Msg>) {
    let channel = match super::connect(&node.server).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Msg::Failed(i, format!("{e:#}"))).await;
            return;
        }
    };
    let mut stream = match ObserverClient::new(channel).get_flows(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            let _ = tx
                .send(Msg::Failed(i, crate::client::RpcError(s).to_string()))
                .await;
            return;
        }
    };
    loop {
        let m = match stream.message().await {
            Ok(Some(r)) => Msg::Resp(i, Box::new(r)),
            Ok(None) => Msg::Done(i),
            Err(s) => Msg::Failed(i, crate::client::RpcError(s).to_string()),
        };
        let last = !matches!(m, Msg::Resp(..));
        if tx.send(m).await.is_err() || last {
            return;
        }
    }
}

/// The pure merge state: per-node queues and which nodes are still open.
pub struct Merger {
    queues: Vec<VecDeque<(Instant, opb::GetFlowsResponse)>>,
    open: Vec<bool>,
}

impl Merger {
    /// A merger of `n` open streams.
    pub fn new(n: usize) -> Self {
        Self {
            queues: (0..n).map(|_| VecDeque::new()).collect(),
            open: vec![true; n],
        }
    }

    /// Queues a response of node `i` that arrived at `at`.
    pub fn push(&mut self, i: usize, at: Instant, r: opb::GetFlowsResponse) {
        if let Some(q) = self.queues.get_mut(i) {
            q.push_back((at, r));
        }
    }

    /// Node `i`'s stream ended.
    pub fn close(&mut self, i: usize) {
        if let Some(o) = self.open.get_mut(i) {
            *o = false;
        }
    }

    fn oldest_head(&self) -> Option<usize> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|(_, r)| (time_of(r), i)))
            .min()
            .map(|(_, i)| i)
    }

    /// The next response in time order, if it can be known now: every open stream has a head
    /// (or `force`, or one queue is full).
    pub fn pop(&mut self, force: bool) -> Option<opb::GetFlowsResponse> {
        let complete = self
            .queues
            .iter()
            .zip(&self.open)
            .all(|(q, open)| !open || !q.is_empty());
        let full = self.queues.iter().any(|q| q.len() >= MAX_QUEUED);
        if !(complete || force || full) {
            return None;
        }
        let i = self.oldest_head()?;
        self.queues.get_mut(i)?.pop_front().map(|(_, r)| r)
    }

    /// When the longest-waiting queued response has waited `lookahead`.
    pub fn deadline(&self, lookahead: Duration) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.front().map(|(at, _)| *at))
            .min()
            .map(|at| at + lookahead)
    }

    /// Whether every stream ended and everything was emitted.
    pub fn finished(&self) -> bool {
        self.open.iter().all(|o| !o) && self.queues.iter().all(VecDeque::is_empty)
    }
}

fn unavailable(node: &str, why: &str) -> opb::GetFlowsResponse {
    opb::GetFlowsResponse {
        node_name: String::new(),
        time: None,
        response_types: Some(ResponseTypes::NodeStatus(relay::NodeStatusEvent {
            state_change: relay::NodeState::NodeUnavailable as i32,
            node_names: vec![node.to_owned()],
            message: why.to_owned(),
        })),
    }
}

/// Streams `req` from every node and prints the merged responses until every stream ended or
/// `stop` resolves; fails only if no node could be read at all.
pub async fn observe_merged<W: Write>(
    nodes: Vec<Node>,
    req: opb::GetFlowsRequest,
    lookahead: Duration,
    printer: &mut Printer<W>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let follow = req.follow;
    let (tx, mut rx) = mpsc::channel(4096);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, n) in nodes.iter().enumerate() {
        tasks.spawn(read_node(i, n.clone(), req.clone(), tx.clone()));
    }
    drop(tx);
    let mut m = Merger::new(nodes.len());
    let mut failed = 0usize;
    tokio::pin!(stop);
    loop {
        while let Some(r) = m.pop(false) {
            printer.write(&r)?;
        }
        if m.finished() {
            break;
        }
        let deadline = if follow { m.deadline(lookahead) } else { None };
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Resp(i, r)) => m.push(i, Instant::now(), *r),
                Some(Msg::Done(i)) => m.close(i),
                Some(Msg::Failed(i, why)) => {
                    m.close(i);
                    failed += 1;
                    let name = nodes.get(i).map(|n| n.name.as_str()).unwrap_or("?");
                    printer.write(&unavailable(name, &why))?;
                }
                None => {
                    // Every reader is gone: what is queued can all go out.
                    for i in 0..nodes.len() {
                        m.close(i);
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(r) = m.pop(true) {
                    printer.write(&r)?;
                }
            }
            _ = &mut stop => break,
        }
    }
    tasks.abort_all();
    if failed == nodes.len() {
        anyhow::bail!("no node's Observer could be read ({failed} unavailable)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, node: &str) -> opb::GetFlowsResponse {
        opb::GetFlowsResponse {
            node_name: node.into(),
            time: Some(prost_types::Timestamp {
                seconds: secs,
                nanos: 0,
            }),
            response_types: None,
        }
    }

    #[test]
    fn merges_in_time_order_waiting_for_every_open_stream() {
        let now = Instant::now();
        let mut m = Merger::new(2);
        m.push(0, now, at(1, "a"));
        m.push(0, now, at(3, "a"));
        assert!(
            m.pop(false).is_none(),
            "node b may still send an older flow"
        );
        m.push(1, now, at(2, "b"));
        let mut out = vec![];
        while let Some(r) = m.pop(false) {
            out.push(r.time.unwrap().seconds);
        }
        assert_eq!(out, vec![1, 2], "3 waits for b's next flow");
        m.close(1);
        assert_eq!(m.pop(false).unwrap().time.unwrap().seconds, 3);
        m.close(0);
        assert!(m.finished());
    }

    #[test]
    fn force_emits_the_oldest_head_and_deadline_is_the_longest_wait() {
        let t0 = Instant::now();
        let mut m = Merger::new(2);
        m.push(0, t0, at(5, "a"));
        assert_eq!(
            m.deadline(Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(1))
        );
        assert_eq!(m.pop(true).unwrap().time.unwrap().seconds, 5);
        assert!(m.deadline(Duration::from_secs(1)).is_none());
    }
}
