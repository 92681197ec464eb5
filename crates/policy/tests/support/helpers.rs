//! Shared test helpers: building documents, engines and comparing the compiled maps with
//! the direct evaluator.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use sigil_identity::NumericIdentity;
use sigil_labels::Labels;
use sigil_policy::{
    Direction, Document, EnforcementMode, PolicyDeltas, PolicyEngine, PolicyEntry, PolicyKey,
    Ports, Verdict, evaluate, is_endpoint_identity, parse_str,
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;

pub fn labels(s: &str) -> Labels {
    Labels::parse_list(s).unwrap()
}

pub fn id(n: u32) -> NumericIdentity {
    NumericIdentity::new(n)
}

pub fn docs(yaml: &str) -> Vec<Document> {
    parse_str(yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// An engine holding `identities` and `docs`.
pub fn engine(
    mode: EnforcementMode,
    identities: &[(u32, Labels)],
    docs: &[Document],
) -> PolicyEngine {
    let mut e = PolicyEngine::new(mode);
    e.add_identities(identities.iter().map(|(i, l)| (id(*i), l.clone())));
    e.upsert_policies(docs.iter().cloned());
    e
}

/// The ports worth probing for these documents: every bound, its neighbours, and a few more.
pub fn probe_ports(docs: &[Document]) -> Vec<u16> {
    let mut ports: BTreeSet<u16> = [0u16, 1, 53, 79, 80, 81, 443, 8080, 65535].into();
    for d in docs {
        for r in &d.rules {
            for e in &r.entries {
                if let Ports::Only(list) = &e.ports {
                    for p in list {
                        let (lo, hi) = p.range();
                        for v in [lo, hi] {
                            ports.insert(v);
                            ports.insert(v.saturating_sub(1));
                            ports.insert(v.saturating_add(1));
                        }
                    }
                }
            }
        }
    }
    ports.into_iter().collect()
}

/// The lookup of a datapath that takes the exact identity's longest entry whenever there is
/// one and the wildcard's otherwise, a deny in either winning (the other order a datapath
/// may use; the engine's maps must be right for both).
pub fn lookup_exact_first(
    map: &[(PolicyKey, PolicyEntry)],
    dir: Direction,
    remote: u32,
    proto: u8,
    port: u16,
) -> Verdict {
    let lpm = |ident: u32| {
        map.iter()
            .filter(|(k, _)| k.identity == ident && k.direction == dir)
            .filter(|(k, _)| {
                k.protocol == 0 || {
                    let mask = if k.port_prefix_len == 0 {
                        0
                    } else {
                        u16::MAX << (16 - u32::from(k.port_prefix_len))
                    };
                    k.protocol == proto && port & mask == k.port
                }
            })
            .max_by_key(|(k, _)| k.lpm_prefix_len())
            .map(|(_, v)| *v)
    };
    let exact = if remote == 0 { None } else { lpm(remote) };
    let any = lpm(0);
    if exact.is_some_and(|v| v.deny) || any.is_some_and(|v| v.deny) {
        return Verdict::DENIED;
    }
    match exact.or(any) {
        Some(v) => Verdict {
            allowed: true,
            l7_redirect: v.l7_redirect,
            auth_required: v.auth_required,
        },
        None => Verdict::DENIED,
    }
}

/// Asserts that for every endpoint, direction, known remote identity and probed flow the
/// compiled lookup (and an exact-identity-first lookup of the same map) equals the direct
/// evaluation.
pub fn assert_agree(
    engine: &PolicyEngine,
    docs: &[Document],
    mode: EnforcementMode,
    identities: &[(u32, Labels)],
) {
    let ports = probe_ports(docs);
    for (ep, ep_labels) in identities.iter().filter(|(i, _)| is_endpoint_identity(*i)) {
        let map = engine.policy_map(id(*ep)).unwrap_or_default();
        for dir in Direction::BOTH {
            for (remote, r_labels) in identities {
                for proto in [TCP, UDP, SCTP, ICMP] {
                    for &port in &ports {
                        let want =
                            evaluate(docs, mode, ep_labels, dir, r_labels, proto, port).verdict;
                        let got = engine.lookup(id(*ep), dir, id(*remote), proto, port);
                        assert_eq!(
                            got,
                            Some(want),
                            "endpoint {ep} ({ep_labels}) {dir} remote {remote} ({r_labels}) proto {proto} port {port}\nmap: {:#?}",
                            engine.policy_map(id(*ep))
                        );
                        assert_eq!(
                            lookup_exact_first(&map, dir, *remote, proto, port),
                            want,
                            "exact-first lookup: endpoint {ep} ({ep_labels}) {dir} remote {remote} ({r_labels}) proto {proto} port {port}\nmap: {map:#?}"
                        );
                    }
                }
            }
        }
    }
}

/// Per-endpoint maps rebuilt from deltas alone.
#[derive(Default, Debug)]
pub struct Shadow(pub BTreeMap<u32, BTreeMap<PolicyKey, PolicyEntry>>);

impl Shadow {
    pub fn apply(&mut self, d: &PolicyDeltas) {
        for ed in &d.endpoints {
            let m = self.0.entry(ed.endpoint.get()).or_default();
            for c in ed.changes.iter() {
                let cur = m.get(&c.key).copied();
                assert_eq!(
                    cur, c.old,
                    "delta's old value disagrees for endpoint {} key {:?}",
                    ed.endpoint, c.key
                );
                match c.new {
                    Some(v) => {
                        m.insert(c.key, v);
                    }
                    None => {
                        m.remove(&c.key);
                    }
                }
            }
        }
        self.0.retain(|_, m| !m.is_empty());
    }

    /// Asserts the shadow equals the engine's maps.
    pub fn assert_matches(&self, engine: &PolicyEngine) {
        let mut real: BTreeMap<u32, BTreeMap<PolicyKey, PolicyEntry>> = BTreeMap::new();
        for ep in engine.endpoints() {
            let m: BTreeMap<PolicyKey, PolicyEntry> =
                engine.policy_map(ep).unwrap().into_iter().collect();
            if !m.is_empty() {
                real.insert(ep.get(), m);
            }
        }
        assert_eq!(
            self.0, real,
            "maps rebuilt from deltas differ from the engine's maps"
        );
    }
}

pub fn allowed() -> Option<Verdict> {
    Some(Verdict::ALLOWED)
}

pub fn denied() -> Option<Verdict> {
    Some(Verdict::DENIED)
}
