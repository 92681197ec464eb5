//! Pure policy logic: key encoding, entry expansion, validation, port ranges, and the compiled
//! map (deny precedence + two LPM lookups) against direct rule evaluation. No root needed.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sigil_datapath::{
    DROP_POLICY_DENIED, DROP_POLICY_DENY, Direction, PORT_PROTOCOLS, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP, PolicyEntry, PolicyKey, decide, intent_of, lpm_keys, normalize, port_range_prefixes,
    trie_prefix_len,
};

fn entry(remote: u32, protocol: u8, port: u16, len: u8, deny: bool) -> (PolicyKey, PolicyEntry) {
    let key = PolicyKey {
        identity: remote,
        direction: Direction::Ingress,
        protocol,
        port,
        port_prefix_len: len,
    };
    let value = PolicyEntry {
        deny,
        l7_redirect: false,
        auth_required: false,
        rule_cookie: u32::from(port) + u32::from(deny),
    };
    (key, value)
}

/// The trie keys of an entry.
fn keys(e: (PolicyKey, PolicyEntry)) -> Result<Vec<PolicyKey>, sigil_datapath::DatapathError> {
    lpm_keys(&e.0)
}

#[test]
fn prefix_lengths_cover_identity_direction_then_protocol_then_port_bits() {
    let key = |p, port, len| keys(entry(5, p, port, len, false)).expect("valid")[0];
    assert_eq!(trie_prefix_len(&key(0, 0, 0)), 72);
    assert_eq!(trie_prefix_len(&key(PROTO_TCP, 0, 0)), 80);
    assert_eq!(trie_prefix_len(&key(PROTO_TCP, 8080, 16)), 96);
    assert_eq!(trie_prefix_len(&key(PROTO_TCP, 8080, 13)), 93);
}

#[test]
fn protocol_any_with_a_port_expands_to_tcp_udp_sctp() {
    let expanded = keys(entry(5, 0, 443, 16, false)).expect("valid");
    let protocols: Vec<u8> = expanded.iter().map(|k| k.protocol).collect();
    assert_eq!(protocols, PORT_PROTOCOLS);
    assert!(
        expanded
            .iter()
            .all(|k| k.port == 443 && trie_prefix_len(k) == 96)
    );
    assert_eq!(keys(entry(5, 0, 0, 0, false)).expect("valid").len(), 1);
}

#[test]
fn invalid_keys_are_rejected_naming_the_field_and_value() {
    let err = keys(entry(5, PROTO_TCP, 80, 17, false)).expect_err("17 bits");
    assert!(
        err.to_string().contains("port_prefix_len") && err.to_string().contains("17"),
        "{err}"
    );
    let err = keys(entry(5, PROTO_TCP, 8081, 15, false)).expect_err("host bits");
    assert!(
        err.to_string().contains("port") && err.to_string().contains("8081"),
        "{err}"
    );
    let err = PolicyKey::new(5, Direction::Egress, 0, 80, 16).expect_err("any proto with port");
    assert!(err.to_string().contains("port_prefix_len"), "{err}");
    let err = port_range_prefixes(90, 80).expect_err("reversed");
    assert!(err.to_string().contains("90-80"), "{err}");
}

#[test]
fn duplicate_keys_in_one_batch_merge_with_deny_winning() {
    let intent = intent_of(&[
        entry(5, PROTO_TCP, 80, 16, false),
        entry(5, 0, 80, 16, true),
    ])
    .expect("valid");
    let tcp80 = PolicyKey::new(5, Direction::Ingress, PROTO_TCP, 80, 16).expect("key");
    assert!(intent[&tcp80].deny);
    assert_eq!(intent.len(), 3);
}

#[test]
fn a_more_specific_allow_under_a_deny_is_installed_as_a_deny() {
    let intent = intent_of(&[
        entry(5, PROTO_TCP, 8080, 16, false),
        entry(5, PROTO_TCP, 0, 0, true),
    ])
    .expect("valid");
    let map = normalize(&intent);
    assert!(map.values().all(|v| v.deny));
    let d = decide(&map, 5, Direction::Ingress, PROTO_TCP, 8080, false, true);
    assert_eq!((d.drop_reason, d.rule_cookie), (DROP_POLICY_DENY, 1));
    // Without normalisation the longest match (the allow) would have won.
    let d = decide(&intent, 5, Direction::Ingress, PROTO_TCP, 8080, false, true);
    assert_eq!(d.drop_reason, 0);
}

/// Direct evaluation of the rules, with no LPM: any matching deny (for the identity or for 0)
/// drops, else any matching allow allows, else the default.
fn direct(
    entries: &[(PolicyKey, PolicyEntry)],
    identity: u32,
    protocol: u8,
    port: u16,
    enforced: bool,
) -> u32 {
    let matching: Vec<&PolicyEntry> = entries
        .iter()
        .filter(|(e, _)| e.identity == identity || e.identity == 0)
        .filter(|(e, _)| {
            let proto_ok = e.protocol == protocol
                || (e.protocol == 0
                    && (e.port_prefix_len == 0 || PORT_PROTOCOLS.contains(&protocol)));
            let mask = if e.port_prefix_len == 0 {
                0
            } else {
                u16::MAX << (16 - e.port_prefix_len)
            };
            proto_ok && port & mask == e.port
        })
        .map(|(_, v)| v)
        .collect();
    if matching.iter().any(|e| e.deny) {
        DROP_POLICY_DENY
    } else if !matching.is_empty() || !enforced {
        0
    } else {
        DROP_POLICY_DENIED
    }
}

fn arb_entry() -> impl Strategy<Value = (PolicyKey, PolicyEntry)> {
    (
        prop_oneof![Just(0u32), Just(5u32), Just(6u32)],
        prop_oneof![
            Just(0u8),
            Just(PROTO_TCP),
            Just(PROTO_UDP),
            Just(PROTO_ICMP)
        ],
        0u16..64,
        0u8..=16,
        any::<bool>(),
    )
        .prop_map(|(remote, protocol, port, len, deny)| {
            // Ports live in 8000..8064 so that prefixes overlap often.
            let port = 8000 + port;
            let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
            entry(remote, protocol, port & mask, len, deny)
        })
}

proptest! {
    #[test]
    fn compiled_map_decides_like_direct_evaluation(
        entries in prop::collection::vec(arb_entry(), 0..12),
        identity in prop_oneof![Just(5u32), Just(6u32), Just(7u32)],
        protocol in prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(PROTO_ICMP)],
        port in 7990u16..8070,
        enforced in any::<bool>(),
    ) {
        let port = if protocol == PROTO_ICMP { 0 } else { port };
        let map: BTreeMap<PolicyKey, PolicyEntry> = normalize(&intent_of(&entries).expect("valid"));
        let got = decide(&map, identity, Direction::Ingress, protocol, port, enforced, true);
        prop_assert_eq!(got.drop_reason, direct(&entries, identity, protocol, port, enforced));
    }

    #[test]
    fn port_range_prefixes_cover_exactly_the_range(first in any::<u16>(), len in 0u32..3000) {
        let last = u16::try_from((u32::from(first) + len).min(65535)).expect("fits");
        let blocks = port_range_prefixes(first, last).expect("valid range");
        let mut next = u32::from(first);
        for (port, plen) in &blocks {
            prop_assert_eq!(u32::from(*port), next, "blocks are contiguous and ordered");
            let size = 1u32 << (16 - u32::from(*plen));
            prop_assert_eq!(u32::from(*port) % size, 0, "blocks are aligned");
            PolicyKey::new(1, Direction::Ingress, PROTO_TCP, *port, *plen).expect("valid key");
            next += size;
        }
        prop_assert_eq!(next, u32::from(last) + 1);
        prop_assert!(blocks.len() <= 30);
    }
}

#[test]
fn handles_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<sigil_datapath::Datapath>();
    assert_send::<sigil_datapath::Maps>();
    assert_send::<sigil_datapath::EventReader>();
}
