//! Policy plans in the real kernel trie: a plan the map cannot hold is refused with nothing
//! written, and a write failing anywhere in a plan leaves the map exactly as it was.

use std::collections::BTreeMap;

use sigil_datapath::{
    Datapath, DatapathError, Direction, Maps, PROTO_TCP, PolicyEntry, PolicyKey, intent_of,
    normalize,
};

use crate::support::{Cleanup, can_run, pin_dir, rule};

fn entry(
    remote: u32,
    protocol: u8,
    port: u16,
    deny: bool,
    cookie: u32,
) -> (PolicyKey, PolicyEntry) {
    let len = if protocol == 0 { 0 } else { 16 };
    rule(
        remote,
        Direction::Ingress,
        (protocol, port, len),
        deny,
        cookie,
    )
}

/// `(endpoint, key, value)` changes setting each entry.
fn set(
    ep: u32,
    entries: &[(PolicyKey, PolicyEntry)],
) -> Vec<(u32, PolicyKey, Option<PolicyEntry>)> {
    intent_of(entries)
        .expect("valid")
        .into_iter()
        .map(|(k, v)| (ep, k, Some(v)))
        .collect()
}

/// `(endpoint, key, None)` changes removing each entry.
fn unset(
    ep: u32,
    entries: &[(PolicyKey, PolicyEntry)],
) -> Vec<(u32, PolicyKey, Option<PolicyEntry>)> {
    intent_of(entries)
        .expect("valid")
        .into_keys()
        .map(|k| (ep, k, None))
        .collect()
}

type Kernel = BTreeMap<u32, BTreeMap<PolicyKey, PolicyEntry>>;

/// What a fresh scan of the pinned trie holds for endpoints 1 and 2.
fn kernel(dir: &std::path::Path) -> Kernel {
    let scanned = Maps::open_pinned(dir).expect("open pinned");
    [1u32, 2]
        .into_iter()
        .map(|ep| (ep, scanned.policy.installed(ep).into_iter().collect()))
        .collect()
}

#[test]
fn a_failed_write_anywhere_in_a_plan_rolls_the_map_back() {
    if !can_run() {
        return;
    }
    let dir = pin_dir("txn");
    let mut cleanup = Cleanup::default();
    cleanup.pin_dirs.push(dir.clone());
    let mut dp = Datapath::load(&dir).expect("load");
    let policy = &mut dp.maps_mut().policy;

    let before1 = [entry(5, PROTO_TCP, 80, false, 1), entry(6, 0, 0, true, 2)];
    let before2 = [entry(5, 0, 0, false, 3), entry(7, PROTO_TCP, 22, false, 4)];
    let mut initial = set(1, &before1);
    initial.extend(set(2, &before2));
    let _ = policy.apply_plan(policy.plan(initial)).expect("initial");
    let before = kernel(&dir);
    assert_eq!(before[&1].len(), 2);

    // The change: endpoint 1 gets a deny covering its allow of identity 5 (the allow is
    // demoted), loses its deny of 6 and gains an allow of 9; endpoint 2 swaps its allow of 5
    // for a deny and gains an allow of 8.
    let after1 = [
        entry(5, 0, 0, true, 11),
        entry(5, PROTO_TCP, 80, false, 1),
        entry(9, PROTO_TCP, 443, false, 12),
    ];
    let after2 = [
        entry(5, 0, 0, true, 13),
        entry(7, PROTO_TCP, 22, false, 4),
        entry(8, 0, 0, false, 14),
    ];
    let mut change = set(1, &after1);
    change.extend(unset(1, &[entry(6, 0, 0, true, 2)]));
    change.extend(set(2, &after2));
    let total = policy.plan(change.clone()).writes();
    assert!(total >= 6, "the change writes {total} keys");

    for n in 0..total {
        policy.fail_writes_after(Some(n));
        let err = policy
            .apply_plan(policy.plan(change.clone()))
            .expect_err("injected failure");
        assert!(
            matches!(err, DatapathError::PolicyRolledBack { written, .. } if written == n),
            "after {n} writes: {err}"
        );
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(kernel(&dir), before, "kernel after a failure at write {n}");
        let mirror: Kernel = [1u32, 2]
            .into_iter()
            .map(|ep| (ep, policy.installed(ep).into_iter().collect()))
            .collect();
        assert_eq!(mirror, before, "mirror after a failure at write {n}");
    }

    policy.fail_writes_after(None);
    let _ = policy
        .apply_plan(policy.plan(change))
        .expect("change applies");
    let got = kernel(&dir);
    assert_eq!(got[&1], normalize(&intent_of(&after1).expect("valid")));
    assert_eq!(got[&2], normalize(&intent_of(&after2).expect("valid")));
    // The demoted allow is a deny in the kernel: the covering deny wins.
    let k = PolicyKey::new(5, Direction::Ingress, PROTO_TCP, 80, 16).expect("key");
    assert!(got[&1][&k].deny);
}

#[test]
fn a_plan_the_map_cannot_hold_is_refused_with_nothing_written() {
    if !can_run() {
        return;
    }
    let dir = pin_dir("txncap");
    let mut cleanup = Cleanup::default();
    cleanup.pin_dirs.push(dir.clone());
    let mut dp = Datapath::load_with(&dir, Some(8)).expect("load");
    let policy = &mut dp.maps_mut().policy;
    assert_eq!(policy.max_entries(), 8);
    let first: Vec<(PolicyKey, PolicyEntry)> = (0..5)
        .map(|i| entry(100 + i, PROTO_TCP, 80, i == 0, i))
        .collect();
    let _ = policy
        .apply_plan(policy.plan(set(1, &first)))
        .expect("fits");
    let before = kernel(&dir);

    let more: Vec<(PolicyKey, PolicyEntry)> = (0..4)
        .map(|i| entry(200 + i, PROTO_TCP, 80, false, i))
        .collect();
    let plan = policy.plan(set(1, &more));
    assert_eq!(plan.new_entries(), 4);
    let err = policy.apply_plan(plan).expect_err("too big");
    assert!(
        matches!(
            err,
            DatapathError::PolicyMapFull {
                needed: 4,
                free: 3,
                max_entries: 8
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("needs 4 new entries") && text.contains("3 of 8 are free"),
        "{text}"
    );
    assert_eq!(kernel(&dir), before, "nothing written");

    // Control: three more fit exactly.
    let _ = policy
        .apply_plan(policy.plan(set(1, &more[..3])))
        .expect("fits exactly");
    assert_eq!(kernel(&dir)[&1].len(), 8);
}
