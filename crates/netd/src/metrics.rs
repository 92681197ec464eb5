//! sigil-netd's Prometheus metrics: Hubble's flow metrics (Hubble's names, labels and label values,
//! counted where flows are made, so they equal the flows seen) and sigil's own (endpoints,
//! identities, policy import latency, API calls, authentication handshakes).

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use sigil_daemon::{GaugeFn, GrpcMetrics, Metrics};
use sigil_proto::flow as fpb;

use crate::daemon::Snapshot;
use crate::hubble::convert::{MESSAGE_TYPE_DROP, MESSAGE_TYPE_POLICY_VERDICT, MESSAGE_TYPE_TRACE};

/// Prefix of sigil-netd's own metrics.
pub const PREFIX: &str = "sigil_netd";

type L<const N: usize> = [(&'static str, Cow<'static, str>); N];

/// Hubble's flow metrics, fed with every flow the recorder stores.
#[derive(Clone, Debug, Default)]
pub struct FlowMetrics {
    processed: Family<L<3>, Counter>,
    drops: Family<L<2>, Counter>,
    verdicts: Family<L<3>, Counter>,
    tcp_flags: Family<L<2>, Counter>,
    ports: Family<L<2>, Counter>,
    lost: Family<L<1>, Counter>,
}

/// Hubble's name of a trace observation point (Cilium's `TraceObservationPoints`), by sub type.
fn trace_point(sub_type: i32) -> &'static str {
    match sub_type {
        0 => "to-endpoint",
        1 => "to-proxy",
        2 => "to-host",
        3 => "to-stack",
        4 => "to-overlay",
        5 => "from-endpoint",
        6 => "from-proxy",
        7 => "from-host",
        8 => "from-stack",
        9 => "from-overlay",
        10 => "from-network",
        11 => "to-network",
        _ => "",
    }
}

/// Hubble's `FlowProtocol` for L3/L4 flows.
fn protocol(f: &fpb::Flow) -> &'static str {
    use fpb::layer4::Protocol as P;
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(P::Tcp(_)) => "TCP",
        Some(P::Udp(_)) => "UDP",
        Some(P::IcmPv4(_)) => "ICMPv4",
        Some(P::IcmPv6(_)) => "ICMPv6",
        Some(P::Sctp(_)) => "SCTP",
        _ => "Unknown L4",
    }
}

/// Lower-case name of Cilium's policy match type (`monitorAPI.PolicyMatchType`).
fn match_type(t: u32) -> &'static str {
    match t {
        1 => "l3-only",
        2 => "l3-l4",
        3 => "l4-only",
        4 => "all",
        5 => "l3-proto",
        6 => "proto-only",
        _ => "none",
    }
}

fn verdict_name(v: i32) -> &'static str {
    fpb::Verdict::try_from(v)
        .map(|v| v.as_str_name())
        .unwrap_or("VERDICT_UNKNOWN")
}

impl FlowMetrics {
    /// Registers Hubble's six families (unprefixed: they keep Hubble's names).
    pub fn register(m: &Metrics) -> Self {
        let s = Self::default();
        m.register_unprefixed(
            "hubble_flows_processed",
            "Total number of flows processed",
            s.processed.clone(),
        );
        m.register_unprefixed("hubble_drop", "Number of drops", s.drops.clone());
        m.register_unprefixed(
            "hubble_policy_verdicts",
            "Total number of Cilium network policy verdicts",
            s.verdicts.clone(),
        );
        m.register_unprefixed(
            "hubble_tcp_flags",
            "TCP flag occurrences",
            s.tcp_flags.clone(),
        );
        m.register_unprefixed(
            "hubble_port_distribution",
            "Numbers of packets distributed by destination port",
            s.ports.clone(),
        );
        m.register_unprefixed(
            "hubble_lost_events",
            "Number of lost events",
            s.lost.clone(),
        );
        s
    }

    /// Counts one flow as Hubble's handlers do.
    pub fn observe(&self, f: &fpb::Flow) {
        let et = f.event_type.as_ref();
        let (ty, sub_type) = (
            et.map(|e| e.r#type).unwrap_or(0),
            et.map(|e| e.sub_type).unwrap_or(0),
        );
        let (type_name, subtype): (&'static str, Cow<'static, str>) = match ty {
            MESSAGE_TYPE_DROP => ("Drop", "".into()),
            MESSAGE_TYPE_TRACE => ("Trace", trace_point(sub_type).into()),
            MESSAGE_TYPE_POLICY_VERDICT => ("PolicyVerdict", "".into()),
            other => ("Unknown", other.to_string().into()),
        };
        let verdict = f.verdict;
        self.processed
            .get_or_create(&[
                ("type", type_name.into()),
                ("subtype", subtype),
                ("verdict", verdict_name(verdict).into()),
            ])
            .inc();
        let forwarded =
            verdict == fpb::Verdict::Forwarded as i32 || verdict == fpb::Verdict::Redirected as i32;
        if verdict == fpb::Verdict::Dropped as i32 {
            let reason = fpb::DropReason::try_from(f.drop_reason_desc)
                .map(|r| r.as_str_name())
                .unwrap_or("DROP_REASON_UNKNOWN");
            self.drops
                .get_or_create(&[("reason", reason.into()), ("protocol", protocol(f).into())])
                .inc();
        }
        // Hubble ignores verdicts of traffic from the host (it may reach any local endpoint).
        if ty == MESSAGE_TYPE_POLICY_VERDICT
            && f.source.as_ref().map(|s| s.identity) != Some(sigil_identity_host())
        {
            let direction = match fpb::TrafficDirection::try_from(f.traffic_direction) {
                Ok(fpb::TrafficDirection::Ingress) => "ingress",
                Ok(fpb::TrafficDirection::Egress) => "egress",
                _ => "traffic_direction_unknown",
            };
            self.verdicts
                .get_or_create(&[
                    ("direction", direction.into()),
                    ("match", match_type(f.policy_match_type).into()),
                    ("action", verdict_name(verdict).to_ascii_lowercase().into()),
                ])
                .inc();
        }
        let Some(l4) = f.l4.as_ref().and_then(|l| l.protocol.as_ref()) else {
            return;
        };
        if !forwarded {
            return;
        }
        use fpb::layer4::Protocol as P;
        if let (P::Tcp(tcp), Some(ip)) = (l4, f.ip.as_ref())
            && let Some(flags) = tcp.flags.as_ref()
        {
            let family: Cow<'static, str> = fpb::IpVersion::try_from(ip.ip_version)
                .map(|v| v.as_str_name())
                .unwrap_or("IP_NOT_USED")
                .into();
            let count = |flag: &'static str| {
                self.tcp_flags
                    .get_or_create(&[("flag", flag.into()), ("family", family.clone())])
                    .inc();
            };
            if flags.fin {
                count("FIN");
            }
            if flags.syn {
                count(if flags.ack { "SYN-ACK" } else { "SYN" });
            }
            if flags.rst {
                count("RST");
            }
        }
        // Destination ports of connection openers only: a reply's destination is an ephemeral port.
        if f.is_reply != Some(false) {
            return;
        }
        let (proto, port) = match l4 {
            P::Tcp(t) => ("TCP", t.destination_port),
            P::Udp(u) => ("UDP", u.destination_port),
            P::Sctp(s) => ("SCTP", s.destination_port),
            P::IcmPv4(_) => ("ICMPv4", 0),
            P::IcmPv6(_) => ("ICMPv6", 0),
        };
        self.ports
            .get_or_create(&[
                ("protocol", proto.into()),
                ("port", port.to_string().into()),
            ])
            .inc();
    }

    /// Counts `n` events the kernel's ring buffer lost.
    pub fn lost(&self, n: u64) {
        self.lost
            .get_or_create(&[("source", "perf_event_ring_buffer".into())])
            .inc_by(n);
    }
}

/// Cilium's reserved identity of the host.
const fn sigil_identity_host() -> u32 {
    1
}

/// A handle on the authentication handshake counter,
/// `sigil_netd_auth_handshakes_total{result="success"|"failure"}`, for the mutual authentication
/// subsystem to increment.
#[derive(Clone, Debug, Default)]
pub struct AuthHandshakes(Family<L<1>, Counter>);

impl AuthHandshakes {
    /// One handshake that authenticated the peer.
    pub fn success(&self) {
        self.0.get_or_create(&[("result", "success".into())]).inc();
    }

    /// One handshake that failed (refused, timed out, wrong identity).
    pub fn failure(&self) {
        self.0.get_or_create(&[("result", "failure".into())]).inc();
    }
}

/// Every metric of sigil-netd, registered into the daemon's registry.
#[derive(Clone, Debug)]
pub struct NetdMetrics {
    /// Hubble's flow metrics.
    pub flows: FlowMetrics,
    /// Policy imports through the API: time from request to the datapath updated.
    pub import_latency: Histogram,
    /// Authentication handshakes.
    pub auth: AuthHandshakes,
    /// API calls by method and code.
    pub grpc: GrpcMetrics,
}

impl NetdMetrics {
    /// Registers every family; endpoints and identities are read from `snapshots` at scrape time.
    pub fn register(m: &Metrics, snapshots: Arc<ArcSwap<Snapshot>>) -> Self {
        let flows = FlowMetrics::register(m);
        let import_latency = sigil_daemon::metrics::latency_histogram();
        m.register(
            PREFIX,
            "policy_import_duration_seconds",
            "Time to import policies through the API, until the datapath enforces them",
            import_latency.clone(),
        );
        let auth = AuthHandshakes::default();
        m.register(
            PREFIX,
            "auth_handshakes",
            "Mutual authentication handshakes, by result",
            auth.0.clone(),
        );
        let s = Arc::clone(&snapshots);
        m.register_collector(
            PREFIX,
            GaugeFn::single("endpoints", "Endpoints on this node", move || {
                s.load().endpoints.len() as f64
            }),
        );
        let fill = |read: fn(u64, u64) -> f64| {
            let s = Arc::clone(&snapshots);
            move || {
                s.load()
                    .map_fill
                    .iter()
                    .map(|(name, used, max)| ((*name).to_owned(), read(*used, *max)))
                    .collect()
            }
        };
        m.register_collector(
            PREFIX,
            GaugeFn::labelled(
                "bpf_map_entries",
                "Entries in a kernel map, as counted by the writer",
                "map_name",
                fill(|used, _| used as f64),
            ),
        );
        m.register_collector(
            PREFIX,
            GaugeFn::labelled(
                "bpf_map_capacity",
                "Maximum entries of a kernel map",
                "map_name",
                fill(|_, max| max as f64),
            ),
        );
        m.register_collector(
            PREFIX,
            GaugeFn::labelled(
                "bpf_map_pressure",
                "Fill ratio of a kernel map (entries / capacity), as Cilium's bpf_map_pressure",
                "map_name",
                fill(|used, max| {
                    if max == 0 {
                        0.0
                    } else {
                        used as f64 / max as f64
                    }
                }),
            ),
        );
        let s = snapshots;
        m.register_collector(
            PREFIX,
            GaugeFn::single(
                "identities",
                "Numeric identities allocated on this node (endpoints and CIDRs)",
                move || s.load().identity_count as f64,
            ),
        );
        Self {
            flows,
            import_latency,
            auth,
            grpc: GrpcMetrics::register(m, PREFIX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: fpb::Verdict, ty: i32, reply: bool, flags: fpb::TcpFlags) -> fpb::Flow {
        fpb::Flow {
            verdict: verdict as i32,
            drop_reason_desc: if verdict == fpb::Verdict::Dropped {
                fpb::DropReason::PolicyDenied as i32
            } else {
                0
            },
            event_type: Some(fpb::CiliumEventType {
                r#type: ty,
                sub_type: 0,
            }),
            is_reply: Some(reply),
            traffic_direction: fpb::TrafficDirection::Ingress as i32,
            ip: Some(fpb::Ip {
                ip_version: fpb::IpVersion::IPv4 as i32,
                ..Default::default()
            }),
            l4: Some(fpb::Layer4 {
                protocol: Some(fpb::layer4::Protocol::Tcp(fpb::Tcp {
                    source_port: 40000,
                    destination_port: 8080,
                    flags: Some(flags),
                })),
            }),
            source: Some(fpb::Endpoint {
                identity: 300,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn flows_are_counted_with_hubbles_labels() {
        let m = Metrics::new();
        let fm = FlowMetrics::register(&m);
        let syn = fpb::TcpFlags {
            syn: true,
            ..Default::default()
        };
        let syn_ack = fpb::TcpFlags {
            syn: true,
            ack: true,
            ..Default::default()
        };
        fm.observe(&flow(
            fpb::Verdict::Forwarded,
            MESSAGE_TYPE_POLICY_VERDICT,
            false,
            syn,
        ));
        fm.observe(&flow(
            fpb::Verdict::Forwarded,
            MESSAGE_TYPE_TRACE,
            true,
            syn_ack,
        ));
        fm.observe(&flow(fpb::Verdict::Dropped, MESSAGE_TYPE_DROP, false, syn));
        fm.lost(3);
        let t = sigil_daemon::metrics::to_prometheus_text(&m.encode().expect("encode"));
        for want in [
            "hubble_flows_processed_total{type=\"PolicyVerdict\",subtype=\"\",verdict=\"FORWARDED\"} 1",
            "hubble_flows_processed_total{type=\"Trace\",subtype=\"to-endpoint\",verdict=\"FORWARDED\"} 1",
            "hubble_flows_processed_total{type=\"Drop\",subtype=\"\",verdict=\"DROPPED\"} 1",
            "hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"} 1",
            "hubble_policy_verdicts_total{direction=\"ingress\",match=\"none\",action=\"forwarded\"} 1",
            "hubble_tcp_flags_total{flag=\"SYN\",family=\"IPv4\"} 1",
            "hubble_tcp_flags_total{flag=\"SYN-ACK\",family=\"IPv4\"} 1",
            // The reply's and the drop's ports are not counted.
            "hubble_port_distribution_total{protocol=\"TCP\",port=\"8080\"} 1",
            "hubble_lost_events_total{source=\"perf_event_ring_buffer\"} 3",
        ] {
            assert!(t.contains(want), "missing {want} in\n{t}");
        }
        assert!(!t.contains("port=\"40000\""), "{t}");
    }
}
