//! Reads the datapath's event ring buffer (one reader: a ring buffer has one consumer
//! position) and fans events out to monitor clients with identities and addresses named.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sigil_datapath::{Event, EventReader, drop_reason_name};
use sigil_proto::netd::v1 as pb;
use tokio::sync::broadcast;

use crate::daemon::Snapshot;

/// The API form of an event, named with `snap`.
pub fn event_pb(ev: &Event, snap: &Snapshot) -> pb::Event {
    let peer = |id: u32, addr: std::net::IpAddr, port: u16| pb::Peer {
        identity: id,
        labels: snap.identities.get(&id).cloned().unwrap_or_default(),
        endpoint: snap.addresses.get(&addr).cloned().unwrap_or_default(),
        addr: addr.to_string(),
        port: u32::from(port),
    };
    pb::Event {
        ts_ns: ev.ts_ns,
        verdict: ev.verdict.as_str().to_owned(),
        direction: ev.direction.to_string(),
        endpoint_id: ev.endpoint_id,
        endpoint: snap
            .endpoint_ids
            .get(&ev.endpoint_id)
            .cloned()
            .unwrap_or_default(),
        src: Some(peer(ev.src_identity, ev.saddr, ev.sport)),
        dst: Some(peer(ev.dst_identity, ev.daddr, ev.dport)),
        protocol: u32::from(ev.protocol),
        drop_reason: ev.drop_reason,
        drop_reason_name: drop_reason_name(ev.drop_reason).to_owned(),
        rule_cookie: ev.rule_cookie,
        rule: snap.rules.get(&ev.rule_cookie).cloned(),
    }
}

/// Reads events until the reader fails, publishing each to `tx` (no subscriber: dropped) and
/// recording it as a Hubble flow with `flows`.
pub async fn run(
    mut reader: EventReader,
    snapshot: Arc<ArcSwap<Snapshot>>,
    tx: broadcast::Sender<pb::Event>,
    flows: Option<crate::hubble::Recorder>,
    auth_kick: Option<Arc<tokio::sync::Notify>>,
) {
    loop {
        match reader.next().await {
            Ok(ev) => {
                // A pair that sends before it was authenticated: the auth manager looks now.
                if ev.drop_reason == sigil_datapath::DROP_AUTH_REQUIRED
                    && let Some(k) = &auth_kick
                {
                    k.notify_one();
                }
                let snap = snapshot.load();
                if let Some(f) = &flows {
                    f.record(&ev, &snap);
                }
                if tx.receiver_count() > 0 {
                    let _ = tx.send(event_pb(&ev, &snap));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event reader stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_datapath::{Direction, Verdict};

    #[test]
    fn events_name_the_rule_of_their_cookie() {
        let mut snap = Snapshot::default();
        snap.rules.insert(
            7,
            "CiliumNetworkPolicy/default/cut: spec.ingressDeny[0]".into(),
        );
        let mut ev = Event {
            ts_ns: 1,
            endpoint_id: 3,
            src_identity: 256,
            dst_identity: 257,
            protocol: 6,
            direction: Direction::Ingress,
            verdict: Verdict::Dropped,
            saddr: "10.0.0.2".parse().unwrap(),
            daddr: "10.0.0.3".parse().unwrap(),
            sport: 4000,
            dport: 8080,
            drop_reason: 181,
            rule_cookie: 7,
            via_tunnel: false,
            tcp_flags: 0,
            auth_required: false,
        };
        let pb = event_pb(&ev, &snap);
        assert_eq!(pb.rule_cookie, 7);
        assert_eq!(
            pb.rule.as_deref(),
            Some("CiliumNetworkPolicy/default/cut: spec.ingressDeny[0]")
        );
        ev.rule_cookie = 0;
        assert_eq!(event_pb(&ev, &snap).rule, None);
    }
}
