//! A datapath event as a Hubble `flow.Flow`: addresses, ports and TCP flags, both endpoints named
//! from the snapshot (id, identity, namespace, labels with the SPIFFE ID, name), Hubble's verdict,
//! drop reason and event type numbers, and the policy rule that decided it.

use std::net::IpAddr;

use sigil_datapath::{
    DROP_AUTH_REQUIRED, DROP_POLICY_DENY, Direction, Event, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, Verdict,
};
use sigil_proto::flow as fpb;

use crate::daemon::Snapshot;

/// Cilium's monitor message type of a drop notification.
pub const MESSAGE_TYPE_DROP: i32 = 1;
/// Cilium's monitor message type of a trace notification.
pub const MESSAGE_TYPE_TRACE: i32 = 4;
/// Cilium's monitor message type of a policy verdict notification.
pub const MESSAGE_TYPE_POLICY_VERDICT: i32 = 5;
/// Trace sub type: towards an endpoint (Cilium's `TraceToLxc`).
pub const TRACE_TO_LXC: i32 = 0;
/// Trace sub type: from an endpoint (Cilium's `TraceFromLxc`).
pub const TRACE_FROM_LXC: i32 = 5;

/// The offset from CLOCK_BOOTTIME (the datapath's clock) to Unix time, in nanoseconds: read both
/// clocks now, so a wall-clock step or a suspend is followed from the next event on.
pub fn boot_to_unix_offset_ns() -> i64 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |c: ClockId| {
        clock_gettime(c)
            .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
            .unwrap_or(0)
    };
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME)
}

/// A Unix time in nanoseconds as a protobuf timestamp.
pub fn timestamp(unix_ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_ns.div_euclid(1_000_000_000),
        // In 0..1e9, so it fits.
        nanos: i32::try_from(unix_ns.rem_euclid(1_000_000_000)).unwrap_or(0),
    }
}

/// A protobuf timestamp in Unix nanoseconds, `None` when out of range (nanos outside 0..1e9 or
/// seconds beyond what i64 nanoseconds hold).
pub fn unix_ns(t: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    t.seconds
        .checked_mul(1_000_000_000)?
        .checked_add(i64::from(t.nanos))
}

fn endpoint(snap: &Snapshot, addr: IpAddr, identity: u32) -> fpb::Endpoint {
    let labels = snap.identities.get(&identity).cloned().unwrap_or_default();
    match snap
        .addresses
        .get(&addr)
        .and_then(|n| snap.endpoints.get(n))
    {
        Some((rec, _)) => fpb::Endpoint {
            id: rec.endpoint_id,
            identity,
            namespace: rec.namespace.clone(),
            labels,
            pod_name: rec.name.clone(),
            workloads: Vec::new(),
        },
        None => fpb::Endpoint {
            identity,
            labels,
            ..Default::default()
        },
    }
}

fn tcp_flags(b: u8) -> fpb::TcpFlags {
    fpb::TcpFlags {
        fin: b & 0x01 != 0,
        syn: b & 0x02 != 0,
        rst: b & 0x04 != 0,
        psh: b & 0x08 != 0,
        ack: b & 0x10 != 0,
        urg: b & 0x20 != 0,
        ece: b & 0x40 != 0,
        cwr: b & 0x80 != 0,
        ns: false,
    }
}

fn layer4(ev: &Event) -> Option<fpb::Layer4> {
    use fpb::layer4::Protocol;
    let (s, d) = (u32::from(ev.sport), u32::from(ev.dport));
    let p = match ev.protocol {
        PROTO_TCP => Protocol::Tcp(fpb::Tcp {
            source_port: s,
            destination_port: d,
            flags: Some(tcp_flags(ev.tcp_flags)),
        }),
        PROTO_UDP => Protocol::Udp(fpb::Udp {
            source_port: s,
            destination_port: d,
        }),
        PROTO_SCTP => Protocol::Sctp(fpb::Sctp {
            source_port: s,
            destination_port: d,
        }),
        // The datapath does not report ICMP type and code.
        PROTO_ICMP => Protocol::IcmPv4(fpb::IcmPv4::default()),
        PROTO_ICMPV6 => Protocol::IcmPv6(fpb::IcmPv6::default()),
        _ => return None,
    };
    Some(fpb::Layer4 { protocol: Some(p) })
}

/// The policy a rule cookie stands for, as Hubble's `flow.Policy`.
fn policy(snap: &Snapshot, cookie: u32) -> Option<fpb::Policy> {
    let r = snap.rule_refs.get(&cookie)?;
    Some(fpb::Policy {
        name: r.policy.name.clone(),
        namespace: r.policy.namespace.clone().unwrap_or_default(),
        labels: vec![format!("sigil:rule={}", r.path)],
        revision: snap.revision,
        kind: r.policy.kind.as_str().to_owned(),
    })
}

/// The flow of `ev`, named with `snap`, captured on `node_name`, at `unix_ns`, with id `uuid`.
pub fn flow_of(
    ev: &Event,
    snap: &Snapshot,
    node_name: &str,
    unix_ns: i64,
    uuid: String,
) -> fpb::Flow {
    let is_reply = ev.verdict == Verdict::AllowedReply;
    // A reply travels against its connection: the connection's direction is the other one.
    let conn_direction = match (ev.direction, is_reply) {
        (Direction::Ingress, false) | (Direction::Egress, true) => fpb::TrafficDirection::Ingress,
        (Direction::Egress, false) | (Direction::Ingress, true) => fpb::TrafficDirection::Egress,
    };
    let (verdict, event_type, sub_type) = match ev.verdict {
        Verdict::Dropped => (
            fpb::Verdict::Dropped,
            MESSAGE_TYPE_DROP,
            i32::try_from(ev.drop_reason).unwrap_or(0),
        ),
        Verdict::Allowed => (fpb::Verdict::Forwarded, MESSAGE_TYPE_POLICY_VERDICT, 0),
        Verdict::AllowedReply => (
            fpb::Verdict::Forwarded,
            MESSAGE_TYPE_TRACE,
            if ev.direction == Direction::Ingress {
                TRACE_TO_LXC
            } else {
                TRACE_FROM_LXC
            },
        ),
    };
    let mut f = fpb::Flow {
        time: Some(timestamp(unix_ns)),
        uuid,
        verdict: verdict as i32,
        drop_reason: ev.drop_reason,
        drop_reason_desc: i32::try_from(ev.drop_reason).unwrap_or(0),
        auth_type: if ev.auth_required {
            fpb::AuthType::Spire as i32
        } else {
            fpb::AuthType::Disabled as i32
        },
        ip: Some(fpb::Ip {
            source: ev.saddr.to_string(),
            destination: ev.daddr.to_string(),
            ip_version: if ev.saddr.is_ipv4() {
                fpb::IpVersion::IPv4 as i32
            } else {
                fpb::IpVersion::IPv6 as i32
            },
            encrypted: false,
        }),
        l4: layer4(ev),
        source: Some(endpoint(snap, ev.saddr, ev.src_identity)),
        destination: Some(endpoint(snap, ev.daddr, ev.dst_identity)),
        r#type: fpb::FlowType::L3L4 as i32,
        node_name: node_name.to_owned(),
        reply: is_reply,
        is_reply: Some(is_reply),
        event_type: Some(fpb::CiliumEventType {
            r#type: event_type,
            sub_type,
        }),
        traffic_direction: conn_direction as i32,
        trace_observation_point: if event_type == MESSAGE_TYPE_TRACE {
            if ev.direction == Direction::Ingress {
                fpb::TraceObservationPoint::ToEndpoint as i32
            } else {
                fpb::TraceObservationPoint::FromEndpoint as i32
            }
        } else {
            fpb::TraceObservationPoint::UnknownPoint as i32
        },
        interface: Some(fpb::NetworkInterface {
            index: ev.endpoint_id,
            name: snap
                .endpoint_ids
                .get(&ev.endpoint_id)
                .and_then(|n| snap.endpoints.get(n))
                .map(|(r, _)| r.host_interface.clone())
                .unwrap_or_default(),
        }),
        ..Default::default()
    };
    if ev.rule_cookie != 0
        && let Some(p) = policy(snap, ev.rule_cookie)
    {
        let ingress = ev.direction == Direction::Ingress;
        match (ev.verdict, ev.drop_reason) {
            (Verdict::Allowed, _) if ingress => f.ingress_allowed_by.push(p),
            (Verdict::Allowed, _) => f.egress_allowed_by.push(p),
            // The deny rule, or the allow rule whose authentication was missing.
            (Verdict::Dropped, DROP_POLICY_DENY | DROP_AUTH_REQUIRED) if ingress => {
                f.ingress_denied_by.push(p)
            }
            (Verdict::Dropped, DROP_POLICY_DENY | DROP_AUTH_REQUIRED) => f.egress_denied_by.push(p),
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::RuleRef;
    use crate::state::EndpointRecord;
    use sigil_policy::{PolicyId, PolicyKind};

    fn snapshot() -> Snapshot {
        let rec: EndpointRecord = serde_json::from_value(serde_json::json!({
            "name": "web-1", "namespace": "shop", "pod_labels": ["app=web"], "spiffe_id": null,
            "identity": 256, "ipv4": "10.1.0.2", "ipv6": "fd00:101::2", "host_index": 2,
            "endpoint_id": 7, "host_interface": "lxc7", "netns_name": "sigil-web-1",
            "netns_path": "/run/netns/sigil-web-1", "interface": "eth0"
        }))
        .expect("record");
        let mut s = Snapshot::default();
        let labels = vec![
            "k8s:app=web".to_owned(),
            "spiffe:spiffe.io/spiffe-id=spiffe://example.org/web".to_owned(),
        ];
        s.identities.insert(256, labels.clone());
        s.identities.insert(2, vec!["reserved:world".to_owned()]);
        s.addresses
            .insert("10.1.0.2".parse().unwrap(), "web-1".into());
        s.endpoint_ids.insert(7, "web-1".into());
        s.endpoints.insert("web-1".into(), (rec, labels));
        s.rule_refs.insert(
            9,
            RuleRef {
                policy: PolicyId::new(PolicyKind::CiliumNetworkPolicy, Some("shop"), "cut"),
                path: "spec.egressDeny[0]".into(),
            },
        );
        s.revision = 42;
        s
    }

    fn event(verdict: Verdict, direction: Direction, reason: u32) -> Event {
        Event {
            ts_ns: 5,
            endpoint_id: 7,
            src_identity: 256,
            dst_identity: 2,
            protocol: PROTO_TCP,
            direction,
            verdict,
            saddr: "10.1.0.2".parse().unwrap(),
            daddr: "1.1.1.1".parse().unwrap(),
            sport: 40000,
            dport: 443,
            drop_reason: reason,
            rule_cookie: 9,
            via_tunnel: false,
            tcp_flags: 0x02,
            auth_required: false,
        }
    }

    #[test]
    fn a_denied_flow_names_endpoints_reason_type_and_the_deny_rule() {
        let snap = snapshot();
        let ev = event(Verdict::Dropped, Direction::Egress, DROP_POLICY_DENY);
        let f = flow_of(&ev, &snap, "n1", 1_700_000_000_123_456_789, "id".into());
        assert_eq!(
            f.time,
            Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(f.verdict, fpb::Verdict::Dropped as i32);
        assert_eq!(f.drop_reason_desc, fpb::DropReason::PolicyDeny as i32);
        assert_eq!(
            f.event_type,
            Some(fpb::CiliumEventType {
                r#type: 1,
                sub_type: 181
            })
        );
        assert_eq!(f.traffic_direction, fpb::TrafficDirection::Egress as i32);
        assert_eq!(f.is_reply, Some(false));
        let src = f.source.as_ref().unwrap();
        assert_eq!(
            (
                src.id,
                src.identity,
                src.namespace.as_str(),
                src.pod_name.as_str()
            ),
            (7, 256, "shop", "web-1")
        );
        assert!(
            src.labels
                .contains(&"spiffe:spiffe.io/spiffe-id=spiffe://example.org/web".to_owned())
        );
        let dst = f.destination.as_ref().unwrap();
        assert_eq!(
            (dst.id, dst.identity, dst.labels.clone()),
            (0, 2, vec!["reserved:world".to_owned()])
        );
        let Some(fpb::layer4::Protocol::Tcp(t)) = f.l4.and_then(|l| l.protocol) else {
            panic!("tcp")
        };
        assert_eq!((t.source_port, t.destination_port), (40000, 443));
        assert!(t.flags.unwrap().syn);
        assert_eq!(f.egress_denied_by.len(), 1);
        let p = &f.egress_denied_by[0];
        assert_eq!(
            (
                p.kind.as_str(),
                p.namespace.as_str(),
                p.name.as_str(),
                p.revision
            ),
            ("CiliumNetworkPolicy", "shop", "cut", 42)
        );
        assert_eq!(p.labels, vec!["sigil:rule=spec.egressDeny[0]".to_owned()]);
        assert!(f.ingress_denied_by.is_empty() && f.egress_allowed_by.is_empty());
        assert_eq!(f.interface.unwrap().name, "lxc7");
        // Default deny names no rule.
        let mut ev = event(Verdict::Dropped, Direction::Egress, 133);
        ev.rule_cookie = 0;
        let f = flow_of(&ev, &snap, "n1", 0, "id".into());
        assert_eq!(f.drop_reason_desc, fpb::DropReason::PolicyDenied as i32);
        assert!(f.egress_denied_by.is_empty());
    }

    #[test]
    fn allowed_flows_are_policy_verdicts_and_replies_are_traces_of_the_connection_direction() {
        let snap = snapshot();
        let mut ev = event(Verdict::Allowed, Direction::Ingress, 0);
        ev.auth_required = true;
        let f = flow_of(&ev, &snap, "n1", 0, "id".into());
        assert_eq!(
            (f.verdict, f.event_type.unwrap().r#type),
            (fpb::Verdict::Forwarded as i32, 5)
        );
        assert_eq!(f.traffic_direction, fpb::TrafficDirection::Ingress as i32);
        assert_eq!(f.auth_type, fpb::AuthType::Spire as i32);
        assert_eq!(f.ingress_allowed_by.len(), 1);
        // A reply entering the endpoint belongs to a connection it opened: egress.
        let ev = event(Verdict::AllowedReply, Direction::Ingress, 0);
        let f = flow_of(&ev, &snap, "n1", 0, "id".into());
        assert_eq!(
            f.event_type,
            Some(fpb::CiliumEventType {
                r#type: 4,
                sub_type: TRACE_TO_LXC
            })
        );
        assert_eq!(f.traffic_direction, fpb::TrafficDirection::Egress as i32);
        assert_eq!((f.is_reply, f.reply), (Some(true), true));
        assert_eq!(
            f.trace_observation_point,
            fpb::TraceObservationPoint::ToEndpoint as i32
        );
        assert_eq!(unix_ns(&timestamp(-1)), Some(-1));
        assert_eq!(
            unix_ns(&prost_types::Timestamp {
                seconds: 0,
                nanos: -1
            }),
            None
        );
    }
}
