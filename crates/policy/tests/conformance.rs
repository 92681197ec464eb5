//! Conformance table in the style of Cilium's distillery tests: allow and deny at L3, L4,
//! L3+L4 and L7 in combination, for flows from two peers on two ports and ICMP. Each row is
//! checked on the direct evaluator and on the compiled map, and must not depend on the order
//! of the rules: every permutation, in one policy or split over several applied in that
//! order, gives the same verdicts and the very same compiled map (apart from rule cookies,
//! which name rules whose paths and policies differ between permutations by construction;
//! every cookie is checked to name a rule of the right kind instead).
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use helpers::*;
use sigil_labels::Labels;
use sigil_policy::{
    Direction, EnforcementMode, PolicyEngine, PolicyEntry, PolicyKey, Verdict, evaluate,
};

const WEB: u32 = 256;
const DB: u32 = 257;
const API: u32 = 258;
const WORLD: u32 = 2;

fn identities() -> Vec<(u32, Labels)> {
    vec![
        (
            WEB,
            labels("k8s:app=web,k8s:io.kubernetes.pod.namespace=prod"),
        ),
        (
            DB,
            labels("k8s:app=db,k8s:io.kubernetes.pod.namespace=prod"),
        ),
        (
            API,
            labels("k8s:app=api,k8s:io.kubernetes.pod.namespace=prod"),
        ),
        (WORLD, labels("reserved:world")),
    ]
}

/// (name, section, entry)
const ATOMS: &[(&str, &str, &str)] = &[
    (
        "L3w",
        "ingress",
        "  - fromEndpoints: [{matchLabels: {app: web}}]\n",
    ),
    (
        "L4",
        "ingress",
        "  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
    ),
    (
        "L34w",
        "ingress",
        "  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
    ),
    (
        "L7w",
        "ingress",
        "  - fromEndpoints: [{matchLabels: {app: web}}]\n    toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]\n",
    ),
    (
        "AUTHa",
        "ingress",
        "  - fromEndpoints: [{matchLabels: {app: api}}]\n    authentication: {mode: required}\n",
    ),
    (
        "Dl3w",
        "ingressDeny",
        "  - fromEndpoints: [{matchLabels: {app: web}}]\n",
    ),
    (
        "Dl4",
        "ingressDeny",
        "  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n",
    ),
    (
        "Dl34a",
        "ingressDeny",
        "  - fromEndpoints: [{matchLabels: {app: api}}]\n    toPorts: [{ports: [{port: '81', protocol: TCP}]}]\n",
    ),
];

/// The flows: (remote, protocol, port).
const FLOWS: [(u32, u8, u16); 6] = [
    (WEB, TCP, 80),
    (WEB, TCP, 81),
    (API, TCP, 80),
    (API, TCP, 81),
    (WORLD, TCP, 80),
    (WEB, ICMP, 0),
];

const A: Verdict = Verdict::ALLOWED;
const D: Verdict = Verdict::DENIED;
const L: Verdict = Verdict {
    allowed: true,
    l7_redirect: true,
    auth_required: false,
};
const U: Verdict = Verdict {
    allowed: true,
    l7_redirect: false,
    auth_required: true,
};
const B: Verdict = Verdict {
    allowed: true,
    l7_redirect: true,
    auth_required: true,
};

/// Rows: the atoms in force and the verdict of each flow of [`FLOWS`].
const TABLE: &[(&[&str], [Verdict; 6])] = &[
    (&[], [A, A, A, A, A, A]),
    (&["L3w"], [A, A, D, D, D, A]),
    (&["L4"], [A, D, A, D, A, D]),
    (&["L34w"], [A, D, D, D, D, D]),
    (&["L7w"], [L, D, D, D, D, D]),
    (&["L3w", "L7w"], [L, A, D, D, D, A]),
    // L7 marks the port: every peer allowed on 80/TCP goes through the proxy.
    (&["L4", "L7w"], [L, D, L, D, L, D]),
    (&["L34w", "L7w"], [L, D, D, D, D, D]),
    (&["L3w", "Dl4"], [D, A, D, D, D, A]),
    (&["L4", "Dl3w"], [D, D, A, D, A, D]),
    (&["L7w", "Dl34a"], [L, D, D, D, D, D]),
    (&["L3w", "L4", "Dl34a", "AUTHa"], [A, A, U, D, A, A]),
    (&["AUTHa", "L7w", "L4"], [L, D, B, U, L, D]),
    (&["Dl3w", "Dl4"], [D, D, D, D, D, D]),
    (&["L3w", "L4", "L34w", "L7w", "Dl34a"], [L, A, L, D, L, A]),
    (&["L7w", "L4", "Dl4"], [D, D, D, D, D, D]),
    (&["L3w", "L7w", "Dl3w"], [D, D, D, D, D, D]),
    (&["AUTHa", "Dl34a"], [D, D, U, D, D, D]),
];

fn atom(name: &str) -> (&'static str, &'static str) {
    let (_, section, entry) = ATOMS.iter().find(|(n, _, _)| *n == name).unwrap();
    (section, entry)
}

/// One CNP holding the atoms in this order.
fn one_policy(names: &[&str]) -> String {
    let mut ingress = String::new();
    let mut deny = String::new();
    for n in names {
        let (section, entry) = atom(n);
        if section == "ingress" {
            ingress.push_str(entry)
        } else {
            deny.push_str(entry)
        }
    }
    let mut y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n".to_owned();
    if !ingress.is_empty() {
        y.push_str(&format!("  ingress:\n{ingress}"));
    }
    if !deny.is_empty() {
        y.push_str(&format!("  ingressDeny:\n{deny}"));
    }
    if names.is_empty() {
        y = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: other}}\n  ingress: []\n".to_owned();
    }
    y
}

/// One CNP per atom, in this order.
fn split_policies(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (section, entry) = atom(n);
            format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: db}}}}\n  {section}:\n{entry}")
        })
        .collect()
}

fn permutations(items: &[&'static str]) -> Vec<Vec<&'static str>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first);
            out.push(p);
        }
    }
    out
}

/// The map of DB with cookies cleared, after checking that each deny names an installed deny
/// rule and each allow with a cookie an installed allow rule.
fn map_shape(engine: &PolicyEngine) -> Vec<(PolicyKey, PolicyEntry)> {
    let mut map = engine.policy_map(id(DB)).unwrap();
    for (k, v) in &mut map {
        if v.deny || v.rule_cookie != 0 {
            let (_, path) = engine
                .rule_for_cookie(v.rule_cookie)
                .unwrap_or_else(|| panic!("{k:?}: cookie {} names no rule", v.rule_cookie));
            assert_eq!(
                path.starts_with("spec.ingressDeny["),
                v.deny,
                "{k:?}: {v:?} names {path}"
            );
        }
        v.rule_cookie = 0;
    }
    map
}

fn verdicts_of(engine: &PolicyEngine) -> Vec<Verdict> {
    FLOWS
        .iter()
        .map(|&(r, proto, port)| {
            engine
                .lookup(id(DB), Direction::Ingress, id(r), proto, port)
                .unwrap()
        })
        .collect()
}

#[test]
fn conformance_table_in_every_rule_order() {
    let ids = identities();
    let db_labels = ids[1].1.clone();
    let lab = |n: u32| ids.iter().find(|(i, _)| *i == n).unwrap().1.clone();
    for (row, expected) in TABLE {
        let reference_docs = docs(&one_policy(row));
        let reference = engine(EnforcementMode::Default, &ids, &reference_docs);
        let reference_map = map_shape(&reference);
        for (i, &(r, proto, port)) in FLOWS.iter().enumerate() {
            let ev = evaluate(
                &reference_docs,
                EnforcementMode::Default,
                &db_labels,
                Direction::Ingress,
                &lab(r),
                proto,
                port,
            );
            assert_eq!(ev.verdict, expected[i], "evaluator, row {row:?}, flow {i}");
        }
        assert_eq!(
            verdicts_of(&reference),
            expected.to_vec(),
            "engine, row {row:?}"
        );
        assert_agree(&reference, &reference_docs, EnforcementMode::Default, &ids);

        for perm in permutations(row) {
            let d = docs(&one_policy(&perm));
            let e = engine(EnforcementMode::Default, &ids, &d);
            assert_eq!(map_shape(&e), reference_map, "row {row:?} as {perm:?}");
            for (i, &(r, proto, port)) in FLOWS.iter().enumerate() {
                let ev = evaluate(
                    &d,
                    EnforcementMode::Default,
                    &db_labels,
                    Direction::Ingress,
                    &lab(r),
                    proto,
                    port,
                );
                assert_eq!(
                    ev.verdict, expected[i],
                    "evaluator, row {row:?} as {perm:?}, flow {i}"
                );
            }

            // The same rules as separate policies, applied one by one in this order, with
            // identities arriving last.
            let mut e = PolicyEngine::new(EnforcementMode::Default);
            for y in split_policies(&perm) {
                e.upsert_policies(docs(&y));
            }
            e.add_identities(ids.iter().map(|(i, l)| (id(*i), l.clone())));
            if !row.is_empty() {
                assert_eq!(
                    map_shape(&e),
                    reference_map,
                    "split row {row:?} as {perm:?}"
                );
            }
            assert_eq!(
                verdicts_of(&e),
                expected.to_vec(),
                "split row {row:?} as {perm:?}"
            );
        }
    }
}
