//! Random policies, identities and flows: the compiled map lookup must equal the direct
//! evaluation, whatever order identities and policies arrive in, and the deltas must rebuild
//! the maps exactly.
#![allow(clippy::unwrap_used)]

#[path = "support/helpers.rs"]
mod helpers;

use std::collections::BTreeMap;

use helpers::*;
use proptest::prelude::*;
use sigil_labels::{Labels, Operator, Selector};
use sigil_policy::{
    Action, CidrRule, Direction, Document, EnforcementMode, Entity, FqdnMatch, HttpRule, L7Rules,
    PeerSelector, Peers, PerDirection, PolicyDeltas, PolicyEngine, PolicyId, PolicyKind, PortRule,
    Ports, Protocol, Rule, RuleEntry,
};

const APPS: [&str; 3] = ["a", "b", "c"];
const ENVS: [&str; 2] = ["x", "y"];
const NSS: [&str; 2] = ["n1", "n2"];

fn sel(ml: &[(&str, &str)], ex: &[(&str, Operator, &[&str])]) -> Selector {
    let ml: BTreeMap<String, String> = ml
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ex: Vec<(String, Operator, Vec<String>)> = ex
        .iter()
        .map(|(k, o, v)| (k.to_string(), *o, v.iter().map(|s| s.to_string()).collect()))
        .collect();
    Selector::new(&ml, &ex).unwrap()
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(Selector::wildcard()),
        (0..3usize).prop_map(|a| sel(&[("k8s:app", APPS[a])], &[])),
        (0..2usize).prop_map(|e| sel(&[("env", ENVS[e])], &[])),
        (0..3usize, 0..2usize).prop_map(|(a, n)| sel(
            &[
                ("app", APPS[a]),
                ("k8s:io.kubernetes.pod.namespace", NSS[n])
            ],
            &[]
        )),
        (0..3usize).prop_map(|a| sel(&[], &[("app", Operator::NotIn, &[APPS[a]])])),
        Just(sel(&[], &[("env", Operator::DoesNotExist, &[])])),
        Just(sel(&[], &[("env", Operator::Exists, &[])])),
        (0..2usize).prop_map(|e| sel(&[], &[("k8s:env", Operator::In, &[ENVS[e], "z"])])),
    ]
}

fn arb_peer() -> impl Strategy<Value = PeerSelector> {
    let cidrs = [
        ("10.0.0.0/8", vec![]),
        ("10.0.0.0/8", vec!["10.1.0.0/16"]),
        ("10.1.0.0/16", vec![]),
        ("0.0.0.0/0", vec![]),
        ("0.0.0.0/0", vec!["192.168.0.0/16"]),
        ("192.168.1.0/24", vec![]),
    ];
    prop_oneof![
        3 => arb_selector().prop_map(PeerSelector::Endpoints),
        2 => (0..Entity::ALL.len()).prop_map(|i| PeerSelector::Entity(Entity::ALL[i])),
        1 => (0..cidrs.len()).prop_map(move |i| {
            let (c, ex) = &cidrs[i];
            PeerSelector::Cidr(CidrRule {
                cidr: c.parse().unwrap(),
                except: ex.iter().map(|e| e.parse().unwrap()).collect(),
            })
        }),
        1 => Just(PeerSelector::Fqdn(FqdnMatch { match_name: Some("example.com".into()), match_pattern: None })),
    ]
}

fn arb_port_rule(allow: bool) -> impl Strategy<Value = PortRule> {
    let ports = [0u16, 53, 80, 81, 443, 1000, 8080];
    (
        0..4usize,
        0..ports.len(),
        prop::option::of(0u16..3000),
        any::<bool>(),
    )
        .prop_map(move |(pr, pi, range, l7)| {
            let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Any][pr];
            let port = ports[pi];
            let end_port = if port == 0 {
                None
            } else {
                range.map(|r| port.saturating_add(r))
            };
            let mut rule = PortRule::new(protocol, port, end_port);
            if allow && l7 {
                rule.l7 = Some(L7Rules {
                    http: vec![HttpRule::default()],
                    ..L7Rules::default()
                });
            }
            rule
        })
}

fn arb_entry() -> impl Strategy<Value = RuleEntry> {
    (any::<bool>(), 0..5u8).prop_flat_map(|(ingress, a)| {
        let allow = a >= 2;
        let peers = prop_oneof![
            1 => Just(Peers::Any),
            4 => prop::collection::vec(arb_peer(), 0..3).prop_map(Peers::Only),
        ];
        let ports = prop_oneof![
            1 => Just(Ports::Any),
            3 => prop::collection::vec(arb_port_rule(allow), 0..3).prop_map(Ports::Only),
        ];
        (peers, ports, any::<bool>()).prop_map(move |(peers, ports, auth)| RuleEntry {
            path: String::new(),
            direction: if ingress {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            action: if allow { Action::Allow } else { Action::Deny },
            peers,
            ports,
            auth_required: allow && auth,
        })
    })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        arb_selector(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(arb_entry(), 0..4),
    )
        .prop_map(|(subject, di, de, mut entries)| {
            for (i, e) in entries.iter_mut().enumerate() {
                e.path = format!("spec.entry[{i}]");
            }
            Rule {
                path: "spec".into(),
                subject,
                description: None,
                default_deny: PerDirection {
                    ingress: di,
                    egress: de,
                },
                entries,
            }
        })
}

fn arb_docs() -> impl Strategy<Value = Vec<Document>> {
    prop::collection::vec(prop::collection::vec(arb_rule(), 1..3), 1..4).prop_map(|docs| {
        docs.into_iter()
            .enumerate()
            .map(|(i, rules)| Document {
                id: PolicyId::new(
                    PolicyKind::CiliumClusterwideNetworkPolicy,
                    None,
                    &format!("p{i}"),
                ),
                origin: "<gen>".into(),
                index: i + 1,
                rules,
            })
            .collect()
    })
}

/// A fixed universe of identities: label identities plus reserved and CIDR ones.
fn universe() -> Vec<(u32, Labels)> {
    let mut v = Vec::new();
    let mut n = 256;
    for app in APPS {
        for (i, env) in ["", "x", "y"].iter().enumerate() {
            let ns = NSS[(i + app.len()) % 2];
            let mut s = format!("k8s:app={app},k8s:io.kubernetes.pod.namespace={ns}");
            if !env.is_empty() {
                s.push_str(&format!(",k8s:env={env}"));
            }
            v.push((n, labels(&s)));
            n += 1;
        }
    }
    v.push((1, labels("reserved:host")));
    v.push((2, labels("reserved:world")));
    v.push((4, labels("reserved:health")));
    v.push((6, labels("reserved:remote-node")));
    v.push(((1 << 24) | 1, labels("cidr:10.1.0.0/16,reserved:world")));
    v.push(((1 << 24) | 2, labels("cidr:10.2.3.4/32,reserved:world")));
    v.push(((1 << 24) | 3, labels("cidr:192.168.1.7/32,reserved:world")));
    v
}

#[derive(Debug, Clone)]
enum Op {
    Identity(usize),
    Policy(usize),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn compiled_lookup_equals_direct_evaluation(
        docs in arb_docs(),
        mode in 0..3usize,
        order in Just(()).prop_perturb(|_, mut rng| {
            let mut ops: Vec<Op> = (0..universe().len()).map(Op::Identity).chain((0..4).map(Op::Policy)).collect();
            for i in (1..ops.len()).rev() {
                let j = (rng.next_u32() as usize) % (i + 1);
                ops.swap(i, j);
            }
            ops
        }),
        remove_mask in any::<u32>(),
        delete_first in any::<bool>(),
    ) {
        let mode = [EnforcementMode::Default, EnforcementMode::Always, EnforcementMode::Never][mode];
        let ids = universe();
        let mut engine = PolicyEngine::new(mode);
        let mut shadow = Shadow::default();
        let mut apply = |d: PolicyDeltas| shadow.apply(&d);
        for op in &order {
            match op {
                Op::Identity(i) => {
                    let (n, l) = &ids[*i];
                    let d = engine.add_identity(id(*n), l.clone());
                    apply(d);
                }
                Op::Policy(i) => {
                    if let Some(doc) = docs.get(*i) {
                        let d = engine.upsert_policies([doc.clone()]);
                        apply(d);
                    }
                }
            }
        }
        assert_agree(&engine, &docs, mode, &ids);

        // Remove some identities and a policy: still equal, deltas still exact.
        let kept: Vec<(u32, Labels)> = ids.iter().enumerate().filter(|(i, _)| remove_mask & (1 << i) == 0).map(|(_, x)| x.clone()).collect();
        for (i, (n, _)) in ids.iter().enumerate() {
            if remove_mask & (1 << i) != 0 {
                let d = engine.remove_identity(id(*n));
                apply(d);
            }
        }
        let mut remaining = docs.clone();
        if delete_first {
            let gone = remaining.remove(0);
            let d = engine.delete_policy(&gone.id);
            apply(d);
        }
        assert_agree(&engine, &remaining, mode, &kept);
        shadow.assert_matches(&engine);
    }
}
