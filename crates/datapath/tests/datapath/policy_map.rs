//! The kernel policy trie against the pure model: after any sequence of upserts, deletes and
//! replaces, a fresh scan of the pinned map holds exactly the normalised intent, and kernel
//! LPM lookups return what the model's longest-prefix match returns.

use std::cell::RefCell;
use std::collections::BTreeMap;

use proptest::prelude::*;
use sigil_datapath::{
    Datapath, Direction, Maps, PROTO_TCP, PROTO_UDP, PolicyEntry, PolicyKey, intent_of, lpm_keys,
    lpm_lookup, normalize,
};

use crate::support::{Cleanup, can_run, pin_dir};

#[derive(Clone, Debug)]
enum Op {
    Upsert(u32, Vec<(PolicyKey, PolicyEntry)>),
    Delete(u32, Vec<(PolicyKey, PolicyEntry)>),
    Replace(u32, Vec<(PolicyKey, PolicyEntry)>),
}

fn arb_entry() -> impl Strategy<Value = (PolicyKey, PolicyEntry)> {
    (
        0u32..3,
        prop_oneof![Just(0u8), Just(PROTO_TCP), Just(PROTO_UDP)],
        0u16..32,
        prop_oneof![Just(0u8), Just(12u8), Just(14u8), Just(16u8)],
        any::<bool>(),
        any::<bool>(),
        0u32..4,
    )
        .prop_map(|(remote, protocol, port, len, egress, deny, cookie)| {
            let port = 8000 + port;
            let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
            (
                PolicyKey {
                    identity: remote,
                    direction: if egress {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                    protocol,
                    port: port & mask,
                    port_prefix_len: len,
                },
                PolicyEntry {
                    deny,
                    l7_redirect: false,
                    auth_required: cookie == 3,
                    rule_cookie: cookie,
                },
            )
        })
}

fn arb_op() -> impl Strategy<Value = Op> {
    let entries = || prop::collection::vec(arb_entry(), 0..6);
    prop_oneof![
        (1u32..3, entries()).prop_map(|(ep, e)| Op::Upsert(ep, e)),
        (1u32..3, entries()).prop_map(|(ep, e)| Op::Delete(ep, e)),
        (1u32..3, entries()).prop_map(|(ep, e)| Op::Replace(ep, e)),
    ]
}

#[test]
fn kernel_policy_map_matches_the_model() {
    if !can_run() {
        return;
    }
    let dir = pin_dir("pmap");
    let mut cleanup = Cleanup::default();
    cleanup.pin_dirs.push(dir.clone());
    // proptest's closure is Fn: the datapath is borrowed mutably through a RefCell.
    let dp = RefCell::new(Datapath::load(&dir).expect("load"));
    let config = ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(arb_op(), 1..8))| {
        let mut dp = dp.borrow_mut();
        let mut model: BTreeMap<u32, BTreeMap<PolicyKey, PolicyEntry>> = BTreeMap::new();
        for ep in [1, 2] {
            dp.maps_mut().policy.clear_endpoint(ep).expect("clear");
        }
        for op in &ops {
            match op {
                Op::Upsert(ep, e) => {
                    dp.maps_mut().policy.upsert_policy(*ep, e).expect("upsert");
                    model.entry(*ep).or_default().extend(intent_of(e).expect("valid"));
                }
                Op::Delete(ep, e) => {
                    let keys: Vec<PolicyKey> = e.iter().flat_map(|(k, _)| lpm_keys(k).expect("valid")).collect();
                    dp.maps_mut().policy.delete_policy(*ep, &keys).expect("delete");
                    let m = model.entry(*ep).or_default();
                    for k in keys {
                        m.remove(&k);
                    }
                }
                Op::Replace(ep, e) => {
                    dp.maps_mut().policy.replace_policy(*ep, e).expect("replace");
                    model.insert(*ep, intent_of(e).expect("valid"));
                }
            }
        }
        let scanned = Maps::open_pinned(&dir).expect("open pinned");
        for ep in [1u32, 2] {
            let want = normalize(&model.get(&ep).cloned().unwrap_or_default());
            let got: BTreeMap<PolicyKey, PolicyEntry> = scanned.policy.installed(ep).into_iter().collect();
            prop_assert_eq!(&got, &want, "endpoint {}", ep);
            for identity in 0..3 {
                for direction in [Direction::Ingress, Direction::Egress] {
                    for protocol in [PROTO_TCP, PROTO_UDP, 1] {
                        for port in [0u16, 7999, 8000, 8001, 8007, 8016, 8031, 8032, 9000] {
                            let kernel = scanned.policy.lookup(ep, identity, direction, protocol, port).expect("lookup");
                            let model = lpm_lookup(&want, identity, direction, protocol, port).map(|(_, v)| v);
                            prop_assert_eq!(kernel, model, "ep {} id {} {} proto {} port {}", ep, identity, direction, protocol, port);
                        }
                    }
                }
            }
        }
    });
}

#[test]
fn ipcache_resolves_longest_prefix_and_rejects_bad_prefixes() {
    if !can_run() {
        return;
    }
    let dir = pin_dir("ipc");
    let mut cleanup = Cleanup::default();
    cleanup.pin_dirs.push(dir.clone());
    let mut dp = Datapath::load(&dir).expect("load");
    let ipc = &mut dp.maps_mut().ipcache;
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("addr") };
    ipc.upsert(ip("192.0.2.0"), 24, 16_777_217).expect("cidr");
    ipc.upsert(ip("192.0.2.7"), 32, 1001).expect("host");
    ipc.upsert(ip("2001:db8::"), 32, 16_777_218)
        .expect("v6 cidr");
    assert_eq!(ipc.lookup(ip("192.0.2.7")).expect("lookup"), Some(1001));
    assert_eq!(
        ipc.lookup(ip("192.0.2.8")).expect("lookup"),
        Some(16_777_217)
    );
    assert_eq!(
        ipc.lookup(ip("198.51.100.1")).expect("lookup"),
        None,
        "world"
    );
    assert_eq!(
        ipc.lookup(ip("2001:db8::1")).expect("lookup"),
        Some(16_777_218)
    );
    assert_eq!(
        ipc.lookup(ip("::ffff:192.0.2.7")).expect("lookup"),
        None,
        "families are apart"
    );
    assert_eq!(ipc.entries().expect("entries").len(), 3);
    ipc.remove(ip("192.0.2.7"), 32).expect("remove");
    ipc.remove(ip("192.0.2.7"), 32)
        .expect("remove again is fine");
    assert_eq!(
        ipc.lookup(ip("192.0.2.7")).expect("lookup"),
        Some(16_777_217)
    );

    let err = ipc.upsert(ip("192.0.2.1"), 24, 5).expect_err("host bits");
    assert!(err.to_string().contains("192.0.2.1/24"), "{err}");
    let err = ipc.upsert(ip("192.0.2.0"), 33, 5).expect_err("too long");
    assert!(
        err.to_string().contains("prefix_len") && err.to_string().contains("33"),
        "{err}"
    );
    let err = ipc.upsert(ip("192.0.2.0"), 24, 0).expect_err("identity 0");
    assert!(err.to_string().contains("identity"), "{err}");
}
