//! The service map's model: flows folded into identities (boxes) and identity pairs (edges) with
//! allowed/denied counts, drop reasons and the deciding policies; bounded everywhere (edges,
//! endpoints per identity, reasons, policies and ports per edge), with what did not fit counted.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sigil_proto::flow as fpb;

/// Default bound on edges held.
pub const DEFAULT_MAX_EDGES: usize = 4096;
/// Bound on endpoint names listed per identity.
pub const MAX_ENDPOINTS_PER_IDENTITY: usize = 32;
/// Bound on labels listed per identity.
pub const MAX_LABELS_PER_IDENTITY: usize = 64;
/// Bound on distinct drop reasons, policies and ports per edge.
pub const MAX_DETAILS_PER_EDGE: usize = 32;

/// The label that carries an endpoint's SPIFFE ID.
const SPIFFE_LABEL: &str = "spiffe:spiffe.io/spiffe-id=";
/// Where a flow's deciding rule path is among a policy's labels.
const RULE_LABEL: &str = "sigil:rule=";

/// One identity as the map shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Numeric identity.
    pub id: u32,
    /// Its SPIFFE ID, when it has one.
    pub spiffe_id: Option<String>,
    /// Its labels as last seen (bounded).
    pub labels: Vec<String>,
    /// Endpoints seen with it, `namespace/name` (bounded).
    pub endpoints: BTreeSet<String>,
}

/// A policy that decided flows of an edge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Decider {
    /// Policy kind.
    pub kind: String,
    /// Policy namespace (empty for cluster-wide ones).
    pub namespace: String,
    /// Policy name.
    pub name: String,
    /// The rule's path inside the policy (`spec.ingress[0]`).
    pub rule: String,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    /// `ingress` or `egress`.
    pub direction: &'static str,
}

/// A deciding policy and how many flows it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeciderCount {
    /// The policy rule.
    #[serde(flatten)]
    pub decider: Decider,
    /// Flows it decided.
    pub count: u64,
}

/// Flows from one identity to another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// Source identity.
    pub src: u32,
    /// Destination identity.
    pub dst: u32,
    /// Flows forwarded (not replies).
    pub allowed: u64,
    /// Flows dropped.
    pub denied: u64,
    /// Reply flows of this edge's connections.
    pub replies: u64,
    /// Dropped flows by Hubble's drop reason name.
    pub drop_reasons: BTreeMap<String, u64>,
    /// The policies that allowed or denied its flows.
    pub policies: Vec<DeciderCount>,
    /// Destination ports, `TCP/8080` (bounded).
    pub ports: BTreeSet<String>,
    /// Reasons, policies or ports left out because of the bounds.
    pub details_dropped: u64,
}

/// What `/api/graph` returns.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphView {
    /// The node these flows were seen on.
    pub node_name: String,
    /// Identities, by numeric identity.
    pub identities: Vec<Identity>,
    /// Edges, by (source, destination).
    pub edges: Vec<Edge>,
    /// Flows folded into the map.
    pub flows: u64,
    /// Flows not folded because the edge bound was reached.
    pub flows_dropped: u64,
    /// Flows overwritten in the ring before the map read them.
    pub flows_missed: u64,
    /// Datapath events lost before they became flows (the kernel's ring buffer was full).
    pub lost_events: u64,
    /// The edge bound.
    pub max_edges: usize,
}

/// The aggregate itself; one writer (the ring follower), read by the HTTP handlers.
#[derive(Debug)]
pub struct Graph {
    node_name: String,
    max_edges: usize,
    identities: BTreeMap<u32, Identity>,
    edges: BTreeMap<(u32, u32), Edge>,
    flows: u64,
    flows_dropped: u64,
    flows_missed: u64,
    lost_events: u64,
}

impl Graph {
    /// An empty map for `node_name` holding at most `max_edges` edges (at least 1).
    pub fn new(node_name: &str, max_edges: usize) -> Self {
        Self {
            node_name: node_name.to_owned(),
            max_edges: max_edges.max(1),
            identities: BTreeMap::new(),
            edges: BTreeMap::new(),
            flows: 0,
            flows_dropped: 0,
            flows_missed: 0,
            lost_events: 0,
        }
    }

    /// Counts `n` flows the ring overwrote before they were read.
    pub fn missed(&mut self, n: u64) {
        self.flows_missed = self.flows_missed.saturating_add(n);
    }

    /// Counts `n` events lost in the kernel.
    pub fn lost(&mut self, n: u64) {
        self.lost_events = self.lost_events.saturating_add(n);
    }

    /// Folds one flow in. A reply counts on the edge of its connection (destination → source).
    pub fn add(&mut self, f: &fpb::Flow) {
        let (Some(src), Some(dst)) = (&f.source, &f.destination) else {
            self.flows_dropped += 1;
            return;
        };
        let reply = f.is_reply.unwrap_or(f.reply);
        let key = if reply {
            (dst.identity, src.identity)
        } else {
            (src.identity, dst.identity)
        };
        if !self.edges.contains_key(&key) && self.edges.len() >= self.max_edges {
            self.flows_dropped += 1;
            return;
        }
        self.flows += 1;
        self.see(src);
        self.see(dst);
        let edge = self.edges.entry(key).or_insert_with(|| Edge {
            src: key.0,
            dst: key.1,
            ..Edge::default()
        });
        if reply {
            edge.replies += 1;
            return;
        }
        let dropped = f.verdict == fpb::Verdict::Dropped as i32;
        if dropped {
            edge.denied += 1;
            let reason = match fpb::DropReason::try_from(f.drop_reason_desc) {
                Ok(r) if r != fpb::DropReason::Unknown => r.as_str_name().to_owned(),
                _ => f.drop_reason.to_string(),
            };
            bump(&mut edge.drop_reasons, reason, &mut edge.details_dropped);
        } else {
            edge.allowed += 1;
        }
        if let Some(port) = port_of(f)
            && !edge.ports.contains(&port)
        {
            if edge.ports.len() < MAX_DETAILS_PER_EDGE {
                edge.ports.insert(port);
            } else {
                edge.details_dropped += 1;
            }
        }
        for (list, verdict, direction) in [
            (&f.ingress_allowed_by, "allowed", "ingress"),
            (&f.egress_allowed_by, "allowed", "egress"),
            (&f.ingress_denied_by, "denied", "ingress"),
            (&f.egress_denied_by, "denied", "egress"),
        ] {
            for p in list {
                let decider = Decider {
                    kind: p.kind.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    rule: p
                        .labels
                        .iter()
                        .find_map(|l| l.strip_prefix(RULE_LABEL))
                        .unwrap_or_default()
                        .to_owned(),
                    verdict,
                    direction,
                };
                let full = edge.policies.len() >= MAX_DETAILS_PER_EDGE;
                match edge.policies.iter_mut().find(|d| d.decider == decider) {
                    Some(d) => d.count += 1,
                    None if full => edge.details_dropped += 1,
                    None => edge.policies.push(DeciderCount { decider, count: 1 }),
                }
            }
        }
    }

    /// Records what an endpoint of a flow says about its identity (the newest labels win).
    fn see(&mut self, ep: &fpb::Endpoint) {
        let id = self
            .identities
            .entry(ep.identity)
            .or_insert_with(|| Identity {
                id: ep.identity,
                ..Identity::default()
            });
        if !ep.labels.is_empty() {
            id.labels = ep
                .labels
                .iter()
                .take(MAX_LABELS_PER_IDENTITY)
                .cloned()
                .collect();
            id.spiffe_id = ep
                .labels
                .iter()
                .find_map(|l| l.strip_prefix(SPIFFE_LABEL))
                .map(str::to_owned);
        }
        if !ep.pod_name.is_empty() && id.endpoints.len() < MAX_ENDPOINTS_PER_IDENTITY {
            id.endpoints
                .insert(format!("{}/{}", ep.namespace, ep.pod_name));
        }
    }

    /// A copy to serve.
    pub fn view(&self) -> GraphView {
        GraphView {
            node_name: self.node_name.clone(),
            identities: self.identities.values().cloned().collect(),
            edges: self.edges.values().cloned().collect(),
            flows: self.flows,
            flows_dropped: self.flows_dropped,
            flows_missed: self.flows_missed,
            lost_events: self.lost_events,
            max_edges: self.max_edges,
        }
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: String, dropped: &mut u64) {
    if let Some(n) = map.get_mut(&key) {
        *n += 1;
    } else if map.len() < MAX_DETAILS_PER_EDGE {
        map.insert(key, 1);
    } else {
        *dropped += 1;
    }
}

fn port_of(f: &fpb::Flow) -> Option<String> {
    use fpb::layer4::Protocol;
    Some(match f.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => format!("TCP/{}", t.destination_port),
        Protocol::Udp(u) => format!("UDP/{}", u.destination_port),
        Protocol::Sctp(s) => format!("SCTP/{}", s.destination_port),
        Protocol::IcmPv4(_) => "ICMPv4".to_owned(),
        Protocol::IcmPv6(_) => "ICMPv6".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(identity: u32, name: &str, labels: &[&str]) -> fpb::Endpoint {
        fpb::Endpoint {
            identity,
            namespace: "default".into(),
            pod_name: name.into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Even identities have a SPIFFE ID.
    fn labels(id: u32) -> Vec<&'static str> {
        if id.is_multiple_of(2) {
            vec!["k8s:app=x", "spiffe:spiffe.io/spiffe-id=spiffe://td/even"]
        } else {
            vec!["k8s:app=y"]
        }
    }

    fn flow(src: u32, dst: u32, dropped: bool, reply: bool) -> fpb::Flow {
        let policy = fpb::Policy {
            kind: "CiliumNetworkPolicy".into(),
            namespace: "default".into(),
            name: "backend-in".into(),
            labels: vec!["sigil:rule=spec.ingress[0]".into()],
            revision: 1,
        };
        let mut f = fpb::Flow {
            verdict: if dropped {
                fpb::Verdict::Dropped as i32
            } else {
                fpb::Verdict::Forwarded as i32
            },
            drop_reason: if dropped { 181 } else { 0 },
            drop_reason_desc: if dropped { 181 } else { 0 },
            source: Some(ep(src, &format!("ep{src}"), &labels(src))),
            destination: Some(ep(dst, &format!("ep{dst}"), &labels(dst))),
            is_reply: Some(reply),
            reply,
            l4: Some(fpb::Layer4 {
                protocol: Some(fpb::layer4::Protocol::Tcp(fpb::Tcp {
                    source_port: 40000,
                    destination_port: 8080,
                    flags: None,
                })),
            }),
            ..Default::default()
        };
        if dropped {
            f.ingress_denied_by.push(policy);
        } else if !reply {
            f.ingress_allowed_by.push(policy);
        }
        f
    }

    #[test]
    fn flows_fold_into_edges_with_counts_reasons_policies_and_replies_on_the_connection() {
        let mut g = Graph::new("n1", 10);
        g.add(&flow(300, 301, false, false));
        g.add(&flow(300, 301, false, false));
        g.add(&flow(301, 300, false, true));
        g.add(&flow(302, 301, true, false));
        let v = g.view();
        assert_eq!(v.flows, 4);
        assert_eq!(v.edges.len(), 2);
        let e = &v.edges[0];
        assert_eq!(
            (e.src, e.dst, e.allowed, e.denied, e.replies),
            (300, 301, 2, 0, 1)
        );
        assert_eq!(e.policies.len(), 1);
        assert_eq!(e.policies[0].count, 2);
        assert_eq!(e.policies[0].decider.rule, "spec.ingress[0]");
        assert_eq!(e.policies[0].decider.verdict, "allowed");
        assert_eq!(e.ports.iter().collect::<Vec<_>>(), vec!["TCP/8080"]);
        let d = &v.edges[1];
        assert_eq!((d.src, d.dst, d.allowed, d.denied), (302, 301, 0, 1));
        assert_eq!(d.drop_reasons.get("POLICY_DENY"), Some(&1));
        assert_eq!(d.policies[0].decider.verdict, "denied");
        let ids: Vec<_> = v.identities.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![300, 301, 302]);
        assert_eq!(
            v.identities[0].spiffe_id.as_deref(),
            Some("spiffe://td/even")
        );
        assert_eq!(v.identities[1].spiffe_id, None);
        assert!(v.identities[0].endpoints.contains("default/ep300"));
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["edges"][0]["policies"][0]["name"], "backend-in");
    }

    #[test]
    fn the_edge_bound_holds_and_what_did_not_fit_is_counted() {
        let mut g = Graph::new("n1", 2);
        for src in 0..100 {
            g.add(&flow(1000 + src, 1, src % 2 == 0, false));
        }
        // Known edges keep counting after the bound is reached.
        g.add(&flow(1000, 1, true, false));
        g.add(&flow(5, 6, false, false));
        g.add(&fpb::Flow::default());
        let v = g.view();
        assert_eq!(v.edges.len(), 2);
        assert_eq!(v.flows, 3);
        assert_eq!(v.flows_dropped, 100);
        assert_eq!(v.edges[0].denied, 2);
        // Identities only come with an edge that was kept.
        assert_eq!(v.identities.len(), 3);
    }

    #[test]
    fn per_edge_details_and_per_identity_lists_are_bounded() {
        let mut g = Graph::new("n1", 10);
        for i in 0..200u32 {
            let mut f = flow(1, 2, true, false);
            f.drop_reason_desc = 0;
            f.drop_reason = 10_000 + i;
            f.l4 = Some(fpb::Layer4 {
                protocol: Some(fpb::layer4::Protocol::Udp(fpb::Udp {
                    source_port: 1,
                    destination_port: i,
                })),
            });
            f.ingress_denied_by[0].name = format!("p{i}");
            let labels: Vec<String> = (0..100).map(|n| format!("k8s:l{n}=v")).collect();
            if let Some(s) = f.source.as_mut() {
                s.pod_name = format!("pod{i}");
                s.labels = labels;
            }
            g.add(&f);
        }
        let v = g.view();
        let e = &v.edges[0];
        assert_eq!(e.denied, 200);
        assert_eq!(e.drop_reasons.len(), MAX_DETAILS_PER_EDGE);
        assert_eq!(e.ports.len(), MAX_DETAILS_PER_EDGE);
        assert_eq!(e.policies.len(), MAX_DETAILS_PER_EDGE);
        assert_eq!(e.details_dropped, 3 * (200 - MAX_DETAILS_PER_EDGE as u64));
        let src = &v.identities[0];
        assert_eq!(src.endpoints.len(), MAX_ENDPOINTS_PER_IDENTITY);
        assert_eq!(src.labels.len(), MAX_LABELS_PER_IDENTITY);
    }
}
