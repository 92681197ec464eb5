//! Protocols without ports: ICMP echo is policy-checked with port 0 and its reply passes
//! through connection tracking like any other.

use std::net::Ipv4Addr;
use std::time::Duration;

use sigil_datapath::netns::EndpointNet;
use sigil_datapath::{
    DROP_POLICY_DENIED, Direction, PROTO_ICMP, PROTO_TCP, PolicyEntry, PolicyKey, Verdict,
};

use crate::support::{BLOCK_WAIT, Fixture, PASS_WAIT, can_run};

/// ICMP echo from inside `from`, answered within `wait`: test-util's, which needs no `ping` binary.
fn ping(from: &EndpointNet, to: Ipv4Addr, wait: Duration) -> bool {
    sigil_test_util::netns::ping(&from.netns_path, to, wait).expect("raw ICMP socket")
}

#[test]
fn icmp_is_checked_with_port_zero_and_replies_pass() {
    if !can_run() {
        return;
    }
    let mut fx = Fixture::new("icmp", 8);
    let fe = fx.endpoint("fe", 1001);
    let be = fx.endpoint("be", 1002);
    let be4 = be.ipv4.expect("v4");
    let mut events = fx.events();
    assert!(ping(&fe, be4, PASS_WAIT), "not enforced: echo passes");

    let tcp_only = (
        PolicyKey {
            identity: 1001,
            direction: Direction::Ingress,
            protocol: PROTO_TCP,
            port: 0,
            port_prefix_len: 0,
        },
        PolicyEntry {
            deny: false,
            l7_redirect: false,
            auth_required: false,
            rule_cookie: 50,
        },
    );
    fx.dp
        .maps_mut()
        .policy
        .replace_policy(be.endpoint_id, &[tcp_only])
        .expect("policy");
    fx.enforce(&be, 1002, true, true);
    events.drain();
    assert!(!ping(&fe, be4, BLOCK_WAIT), "ICMP is not TCP: dropped");
    let ev = events.wait_for("icmp drop", |e| e.verdict == Verdict::Dropped);
    assert_eq!(
        (ev.protocol, ev.sport, ev.dport, ev.drop_reason),
        (PROTO_ICMP, 0, 0, DROP_POLICY_DENIED)
    );

    let icmp = (
        PolicyKey {
            protocol: PROTO_ICMP,
            ..tcp_only.0
        },
        PolicyEntry {
            rule_cookie: 51,
            ..tcp_only.1
        },
    );
    fx.dp
        .maps_mut()
        .policy
        .upsert_policy(be.endpoint_id, &[icmp])
        .expect("policy");
    // The backend's egress is enforced with no entries: the echo reply passes as a reply.
    assert!(
        ping(&fe, be4, PASS_WAIT),
        "ICMP allowed: echo and reply pass"
    );
    let ev = events.wait_for("icmp allow", |e| {
        e.verdict == Verdict::Allowed && e.protocol == PROTO_ICMP
    });
    assert_eq!(ev.rule_cookie, 51);
}
