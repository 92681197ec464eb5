//! The baseline of the benches: a linear first-match rule list, the way IP-rule firewalls
//! work (iptables rules matching ipsets of subject and remote identities, a port range and a
//! protocol; first match decides: denies first so that deny wins, then allows, then per
//! direction "accept endpoints no policy puts in default deny"; no match drops).
#![allow(dead_code)]

use std::collections::HashMap;

use sigil_identity::NumericIdentity;
use sigil_labels::{Labels, Selector};
use sigil_policy::{
    Action, Direction, Document, PeerSelector, Peers, PolicyEngine, Ports, is_endpoint_identity,
};

/// What an ipset of the baseline holds: the identities some selector matches.
#[derive(Debug, Clone)]
enum Matcher {
    Subject(Selector),
    Peers(Vec<PeerSelector>),
    /// Endpoints none of these subject selectors (of default-deny rules) match.
    Unenforced(Direction, Vec<Selector>),
}

impl Matcher {
    fn matches(&self, id: u32, labels: &Labels) -> bool {
        match self {
            Matcher::Subject(s) => s.matches(labels),
            Matcher::Peers(list) => list.iter().any(|p| p.matches(labels)),
            Matcher::Unenforced(_, subjects) => {
                is_endpoint_identity(id) && !subjects.iter().any(|s| s.matches(labels))
            }
        }
    }

    fn key(&self) -> String {
        match self {
            Matcher::Subject(s) => format!("subject:{s}"),
            Matcher::Peers(list) => {
                let keys: Vec<String> = list.iter().map(|p| format!("peer:{p}")).collect();
                keys.join("|")
            }
            Matcher::Unenforced(d, _) => format!("unenforced:{d}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IpSet {
    matcher: Matcher,
    /// Sorted.
    pub members: Vec<u32>,
}

impl IpSet {
    #[inline]
    fn contains(&self, id: u32) -> bool {
        self.members.binary_search(&id).is_ok()
    }
}

/// One firewall rule: direction, protocol (0 = any), port range, subject and remote sets.
#[derive(Debug, Clone, Copy)]
pub struct LinearRule {
    direction: Direction,
    proto: u8,
    lo: u16,
    hi: u16,
    subject: usize,
    /// `None`: any remote.
    remote: Option<usize>,
    allow: bool,
}

/// The baseline: an ordered rule list evaluated first match wins, default drop.
#[derive(Debug, Clone, Default)]
pub struct Linear {
    /// The rules in evaluation order.
    pub rules: Vec<LinearRule>,
    /// The ipsets the rules name.
    pub sets: Vec<IpSet>,
}

impl Linear {
    /// Builds the list from the policies. Set members come from `known` (selector text →
    /// identities, e.g. the engine's selector cache) when given, else by evaluating every
    /// selector against every identity.
    pub fn build(
        docs: &[Document],
        identities: &[(NumericIdentity, Labels)],
        known: Option<&HashMap<String, Vec<u32>>>,
    ) -> Linear {
        let mut lin = Linear::default();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut set_of = |m: Matcher, lin: &mut Linear| -> usize {
            let key = m.key();
            if let Some(i) = by_key.get(&key) {
                return *i;
            }
            let members = match (known, &m) {
                (Some(k), Matcher::Subject(_)) if k.contains_key(&key) => k[&key].clone(),
                (Some(k), Matcher::Peers(list))
                    if list.iter().all(|p| k.contains_key(&format!("peer:{p}"))) =>
                {
                    let mut v: Vec<u32> = list
                        .iter()
                        .flat_map(|p| k[&format!("peer:{p}")].iter().copied())
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                }
                (Some(k), Matcher::Unenforced(_, subjects))
                    if subjects
                        .iter()
                        .all(|s| k.contains_key(&format!("subject:{s}"))) =>
                {
                    let enforced: std::collections::HashSet<u32> = subjects
                        .iter()
                        .flat_map(|s| k[&format!("subject:{s}")].iter().copied())
                        .collect();
                    let mut v: Vec<u32> = identities
                        .iter()
                        .map(|(i, _)| i.get())
                        .filter(|i| is_endpoint_identity(*i) && !enforced.contains(i))
                        .collect();
                    v.sort_unstable();
                    v
                }
                _ => {
                    let mut v: Vec<u32> = identities
                        .iter()
                        .filter(|(i, l)| m.matches(i.get(), l))
                        .map(|(i, _)| i.get())
                        .collect();
                    v.sort_unstable();
                    v
                }
            };
            lin.sets.push(IpSet {
                matcher: m,
                members,
            });
            by_key.insert(key, lin.sets.len() - 1);
            lin.sets.len() - 1
        };
        let mut denies = Vec::new();
        let mut allows = Vec::new();
        for doc in docs {
            for rule in &doc.rules {
                let subject = set_of(Matcher::Subject(rule.subject.clone()), &mut lin);
                for e in &rule.entries {
                    let remote = match &e.peers {
                        Peers::Any => None,
                        Peers::Only(list) => Some(set_of(Matcher::Peers(list.clone()), &mut lin)),
                    };
                    let out = if e.action == Action::Deny {
                        &mut denies
                    } else {
                        &mut allows
                    };
                    let base = LinearRule {
                        direction: e.direction,
                        proto: 0,
                        lo: 0,
                        hi: u16::MAX,
                        subject,
                        remote,
                        allow: e.action == Action::Allow,
                    };
                    match &e.ports {
                        Ports::Any => out.push(base),
                        Ports::Only(list) => {
                            for pr in list {
                                for (proto, lo, hi) in pr.port_keys() {
                                    out.push(LinearRule {
                                        proto,
                                        lo,
                                        hi,
                                        ..base
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        lin.rules = denies;
        lin.rules.extend(allows);
        for d in Direction::BOTH {
            let enforcing: Vec<Selector> = docs
                .iter()
                .flat_map(|doc| &doc.rules)
                .filter(|r| r.default_deny.get(d))
                .map(|r| r.subject.clone())
                .collect();
            let subject = set_of(Matcher::Unenforced(d, enforcing), &mut lin);
            lin.rules.push(LinearRule {
                direction: d,
                proto: 0,
                lo: 0,
                hi: u16::MAX,
                subject,
                remote: None,
                allow: true,
            });
        }
        lin
    }

    /// First match wins; no match drops.
    #[inline]
    pub fn check(&self, ep: u32, dir: Direction, remote: u32, proto: u8, port: u16) -> bool {
        for r in &self.rules {
            if r.direction == dir
                && (r.proto == 0 || r.proto == proto)
                && r.lo <= port
                && port <= r.hi
                && self.sets[r.subject].contains(ep)
                && r.remote.is_none_or(|s| self.sets[s].contains(remote))
            {
                return r.allow;
            }
        }
        false
    }

    /// Adds an identity to every set whose selector matches it.
    pub fn add_identity(&mut self, id: u32, labels: &Labels) {
        for s in &mut self.sets {
            if s.matcher.matches(id, labels)
                && let Err(pos) = s.members.binary_search(&id)
            {
                s.members.insert(pos, id);
            }
        }
    }

    /// Removes an identity from every set.
    pub fn remove_identity(&mut self, id: u32) {
        for s in &mut self.sets {
            if let Ok(pos) = s.members.binary_search(&id) {
                s.members.remove(pos);
            }
        }
    }
}

/// The engine's selector cache as selector text → identities.
pub fn cache_sets(e: &PolicyEngine) -> HashMap<String, Vec<u32>> {
    e.selector_cache()
        .into_iter()
        .map(|(k, ids)| (k, ids.into_iter().map(NumericIdentity::get).collect()))
        .collect()
}
