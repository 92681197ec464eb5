//! The compiler: rules and identities in, per-endpoint policy maps out, kept current
//! incrementally with the changes reported as deltas (the future BPF map updates).
//!
//! Endpoints are the identities policies can select as subjects: cluster identities (256 and
//! up, not CIDR) and the reserved health, init and ingress identities. Endpoints selected by
//! the same set of rules share one compiled map (as Cilium shares a policy per identity), so
//! a change is computed once per distinct map and reported to each endpoint using it.

mod cache;
mod cookie;
mod delta;
mod key;
mod map;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sigil_identity::NumericIdentity;
use sigil_labels::Labels;

use crate::model::{
    Action, Direction, Document, EnforcementMode, PerDirection, PolicyId, PortKey, Ports,
    RuleEntry, Verdict,
};
use cache::{CacheKey, SelectorCache, SelectorId};
use cookie::CookieRegistry;
use delta::diff_into;
use key::{IntHashBuilder, Prefix, PrefixVerdict, range_prefixes};
use map::{DirMap, WildcardContributions, resolve_identity};

pub use delta::{EndpointDelta, KeyChange, PolicyDeltas};
pub use key::{InvalidKey, PolicyEntry, PolicyKey};

/// Whether an identity can be a policy subject (an endpoint with its own map).
pub fn is_endpoint_identity(id: u32) -> bool {
    let n = NumericIdentity::new(id);
    if n.is_cidr() {
        return false;
    }
    id >= NumericIdentity::MIN_CLUSTER_LOCAL
        || n == NumericIdentity::HEALTH
        || n == NumericIdentity::INIT
        || n == NumericIdentity::INGRESS
}

type RuleId = u64;
type MapId = usize;

/// The peers of a compiled rule entry: any identity, or those matched by the listed selectors.
#[derive(Debug, Clone)]
enum CompiledPeers {
    /// Every identity (the entry names no peer selector).
    Wildcard,
    /// Identities matched by any of these cached selectors.
    Selectors(Vec<SelectorId>),
}

/// What one port rule (or "all ports") of an entry adds at one prefix; `port` is the port
/// filter key, used to apply the port's L7 marking.
#[derive(Debug, Clone, Copy)]
struct Contribution {
    prefix: Prefix,
    agg: PrefixVerdict,
    port: Option<PortKey>,
}

/// One entry (allow or deny, one direction) of a rule, compiled to selector ids and contributions.
#[derive(Debug, Clone)]
struct CompiledEntry {
    dir: Direction,
    peers: CompiledPeers,
    /// The peer selectors sorted and deduplicated, for membership tests (an entry may name
    /// thousands of CIDRs).
    selector_index: Vec<SelectorId>,
    contribs: Vec<Contribution>,
    /// Port keys this (allow) entry puts L7 rules on.
    l7_ports: Vec<PortKey>,
}

/// One installed rule: the selector of the endpoints it applies to and its compiled entries.
#[derive(Debug, Clone)]
struct CompiledRule {
    subject: SelectorId,
    default_deny: PerDirection,
    entries: Vec<CompiledEntry>,
    /// The cookies registered for this rule's entries, released with it.
    cookies: Vec<u32>,
}

/// The map shared by every endpoint selected by exactly `rules`.
#[derive(Debug, Clone)]
struct PolicyMap {
    rules: Vec<RuleId>,
    members: HashSet<u32, IntHashBuilder>,
    dirs: [DirMap; 2],
    wild: [WildcardContributions; 2],
    l7_ports: [HashSet<PortKey>; 2],
}

/// Index of a direction in the per-direction arrays (`[ingress, egress]`).
fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn entry_contribs(e: &RuleEntry, cookie: u32) -> (Vec<Contribution>, Vec<PortKey>) {
    let allow = e.action == Action::Allow;
    let agg = PrefixVerdict {
        allow,
        deny: !allow,
        l7: false,
        auth: allow && e.auth_required,
        deny_cookie: if allow { 0 } else { cookie },
        allow_cookie: if allow { cookie } else { 0 },
    };
    match &e.ports {
        Ports::Any => (
            vec![Contribution {
                prefix: Prefix::ANY,
                agg,
                port: None,
            }],
            Vec::new(),
        ),
        Ports::Only(list) => {
            let mut out = Vec::new();
            let mut l7 = Vec::new();
            for pr in list {
                for key @ (proto, lo, hi) in pr.port_keys() {
                    for prefix in range_prefixes(proto, lo, hi) {
                        out.push(Contribution {
                            prefix,
                            agg,
                            port: Some(key),
                        });
                    }
                    if allow && pr.l7_redirect() {
                        l7.push(key);
                    }
                }
            }
            (out, l7)
        }
    }
}

/// A contribution as it applies in a map whose L7-marked ports are `l7`.
fn effective(c: &Contribution, l7: &HashSet<PortKey>) -> (Prefix, PrefixVerdict) {
    let marked = c.agg.allow && c.port.is_some_and(|k| l7.contains(&k));
    (
        c.prefix,
        PrefixVerdict {
            l7: marked,
            ..c.agg
        },
    )
}

/// Merges contributions with equal prefixes.
fn merge(mut c: Vec<(Prefix, PrefixVerdict)>) -> Vec<(Prefix, PrefixVerdict)> {
    c.sort_unstable_by_key(|(p, _)| *p);
    let mut out: Vec<(Prefix, PrefixVerdict)> = Vec::with_capacity(c.len());
    for (p, a) in c {
        match out.last_mut() {
            Some((lp, la)) if *lp == p => *la = la.or(a),
            _ => out.push((p, a)),
        }
    }
    out
}

/// Compiles policies against identities into per-endpoint policy maps; see the module docs.
///
/// `Clone` lets a caller compile a change on a copy and keep the original until the change
/// has reached the kernel (a transaction).
#[derive(Debug, Clone, Default)]
pub struct PolicyEngine {
    mode: EnforcementMode,
    identities: HashMap<u32, Labels, IntHashBuilder>,
    docs: BTreeMap<PolicyId, Document>,
    policy_rules: HashMap<PolicyId, Vec<RuleId>>,
    rules: HashMap<RuleId, CompiledRule>,
    next_rule: RuleId,
    cookies: CookieRegistry,
    cache: SelectorCache,
    subject_users: HashMap<SelectorId, Vec<RuleId>>,
    peer_users: HashMap<SelectorId, Vec<(RuleId, Direction)>>,
    maps: Vec<Option<PolicyMap>>,
    free_maps: Vec<MapId>,
    maps_by_rules: HashMap<Vec<RuleId>, MapId>,
    maps_by_rule: HashMap<RuleId, HashSet<MapId>>,
    endpoints: HashMap<u32, MapId, IntHashBuilder>,
}

impl PolicyEngine {
    /// An empty engine in the given enforcement mode.
    pub fn new(mode: EnforcementMode) -> PolicyEngine {
        PolicyEngine {
            mode,
            ..PolicyEngine::default()
        }
    }

    /// The enforcement mode.
    pub fn mode(&self) -> EnforcementMode {
        self.mode
    }

    /// Changes the enforcement mode, recompiling every map.
    pub fn set_mode(&mut self, mode: EnforcementMode) -> PolicyDeltas {
        if mode == self.mode {
            return PolicyDeltas::default();
        }
        self.mode = mode;
        let mut deltas = PolicyDeltas::default();
        for mid in 0..self.maps.len() {
            let Some(rules) = self.maps[mid].as_ref().map(|m| m.rules.clone()) else {
                continue;
            };
            let fresh = self.build_map(rules);
            let Some(old) = self.maps[mid].as_mut() else {
                continue;
            };
            let mut changes = Vec::new();
            for d in Direction::BOTH {
                diff_into(
                    d,
                    old.dirs[dir_index(d)].iter(),
                    fresh.dirs[dir_index(d)].iter(),
                    &mut changes,
                );
            }
            old.dirs = fresh.dirs;
            old.wild = fresh.wild;
            old.l7_ports = fresh.l7_ports;
            let changes: Arc<[KeyChange]> = changes.into();
            for &m in &old.members {
                deltas.push(m, &changes);
            }
        }
        deltas
    }

    // ---- identities ----

    /// Adds (or re-labels) one identity; see [`PolicyEngine::add_identities`].
    pub fn add_identity(&mut self, id: NumericIdentity, labels: Labels) -> PolicyDeltas {
        self.add_identities([(id, labels)])
    }

    /// Adds identities in one batch: the selector cache is updated for each, the maps that
    /// select them as peers get their entries, and each new endpoint gets its map (computed
    /// once per distinct rule set). Identity 0 is ignored (it means "any" in maps); an
    /// identity already known with other labels is removed first.
    pub fn add_identities(
        &mut self,
        ids: impl IntoIterator<Item = (NumericIdentity, Labels)>,
    ) -> PolicyDeltas {
        let mut deltas = PolicyDeltas::default();
        let mut dirty: HashMap<(MapId, usize), Vec<u32>> = HashMap::new();
        let mut new_endpoints: Vec<(u32, Vec<SelectorId>)> = Vec::new();
        for (nid, labels) in ids {
            let id = nid.get();
            if id == 0 {
                continue;
            }
            match self.identities.get(&id) {
                Some(old) if *old == labels => continue,
                Some(_) => deltas.extend(self.remove_identity(nid)),
                None => {}
            }
            let hits = self.cache.add_identity(id, &labels);
            self.identities.insert(id, labels);
            let mut subjects = Vec::new();
            for s in hits {
                if let Some(users) = self.peer_users.get(&s) {
                    for (rid, d) in users {
                        for &mid in self.maps_by_rule.get(rid).into_iter().flatten() {
                            dirty.entry((mid, dir_index(*d))).or_default().push(id);
                        }
                    }
                }
                if self.subject_users.contains_key(&s) {
                    subjects.push(s);
                }
            }
            if is_endpoint_identity(id) {
                new_endpoints.push((id, subjects));
            }
        }
        self.refresh_dirty(dirty, &mut deltas);

        let mut by_rules: BTreeMap<Vec<RuleId>, Vec<u32>> = BTreeMap::new();
        for (id, subjects) in new_endpoints {
            let mut rules: Vec<RuleId> = subjects
                .iter()
                .filter_map(|s| self.subject_users.get(s))
                .flatten()
                .copied()
                .collect();
            rules.sort_unstable();
            rules.dedup();
            by_rules.entry(rules).or_default().push(id);
        }
        for (rules, ids) in by_rules {
            let mid = self.map_for(rules);
            let Some(m) = self.maps[mid].as_mut() else {
                continue;
            };
            let mut changes = Vec::new();
            for d in Direction::BOTH {
                diff_into(
                    d,
                    std::iter::empty(),
                    m.dirs[dir_index(d)].iter(),
                    &mut changes,
                );
            }
            let changes: Arc<[KeyChange]> = changes.into();
            for id in ids {
                m.members.insert(id);
                self.endpoints.insert(id, mid);
                deltas.push(id, &changes);
            }
        }
        deltas
    }

    /// Removes an identity: its own map (if it is an endpoint) and its entries in other maps.
    pub fn remove_identity(&mut self, nid: NumericIdentity) -> PolicyDeltas {
        let id = nid.get();
        let mut deltas = PolicyDeltas::default();
        let Some(labels) = self.identities.remove(&id) else {
            return deltas;
        };
        if let Some(mid) = self.endpoints.remove(&id) {
            if let Some(m) = self.maps[mid].as_mut() {
                let mut changes = Vec::new();
                for d in Direction::BOTH {
                    diff_into(
                        d,
                        m.dirs[dir_index(d)].iter(),
                        std::iter::empty(),
                        &mut changes,
                    );
                }
                m.members.remove(&id);
                deltas.push(id, &changes.into());
            }
            self.drop_if_unused(mid);
        }
        let hits = self.cache.remove_identity(id, &labels);
        let mut dirty: HashMap<(MapId, usize), Vec<u32>> = HashMap::new();
        for s in hits {
            if let Some(users) = self.peer_users.get(&s) {
                for (rid, d) in users {
                    for &mid in self.maps_by_rule.get(rid).into_iter().flatten() {
                        dirty.entry((mid, dir_index(*d))).or_default().push(id);
                    }
                }
            }
        }
        self.refresh_dirty(dirty, &mut deltas);
        deltas
    }

    /// Recomputes the entries of the given identities in the given maps and reports the
    /// changes to each map's members.
    fn refresh_dirty(
        &mut self,
        dirty: HashMap<(MapId, usize), Vec<u32>>,
        deltas: &mut PolicyDeltas,
    ) {
        let mut per_map: BTreeMap<MapId, Vec<KeyChange>> = BTreeMap::new();
        let mut dirty: Vec<((MapId, usize), Vec<u32>)> = dirty.into_iter().collect();
        dirty.sort_unstable_by_key(|(k, _)| *k);
        for ((mid, d), mut ids) in dirty {
            ids.sort_unstable();
            ids.dedup();
            let changes = per_map.entry(mid).or_default();
            for id in ids {
                self.refresh_identity(mid, d, id, changes);
            }
        }
        for (mid, mut changes) in per_map {
            changes.sort_unstable_by_key(|c| c.key);
            let changes: Arc<[KeyChange]> = changes.into();
            if let Some(m) = self.maps[mid].as_ref() {
                let mut members: Vec<u32> = m.members.iter().copied().collect();
                members.sort_unstable();
                for e in members {
                    deltas.push(e, &changes);
                }
            }
        }
    }

    /// Recomputes identity `id`'s entries in one direction of one map.
    fn refresh_identity(&mut self, mid: MapId, d: usize, id: u32, out: &mut Vec<KeyChange>) {
        let Some(m) = self.maps[mid].as_ref() else {
            return;
        };
        let mut own = Vec::new();
        if self.mode != EnforcementMode::Never {
            // The few selectors matching `id`, each looked up in an entry's index: the cost
            // does not grow with the number of selectors an entry names.
            let mine = self
                .identities
                .get(&id)
                .map(|l| self.cache.selectors_matching(id, l))
                .unwrap_or_default();
            for rid in &m.rules {
                let Some(rule) = self.rules.get(rid) else {
                    continue;
                };
                for e in rule.entries.iter().filter(|e| dir_index(e.dir) == d) {
                    if matches!(e.peers, CompiledPeers::Selectors(_))
                        && mine
                            .iter()
                            .any(|s| e.selector_index.binary_search(s).is_ok())
                    {
                        own.extend(e.contribs.iter().map(|c| effective(c, &m.l7_ports[d])));
                    }
                }
            }
        }
        let new = if own.is_empty() {
            Vec::new()
        } else {
            resolve_identity(&merge(own), &m.wild[d])
        };
        let dir = Direction::BOTH[d];
        let Some(m) = self.maps[mid].as_mut() else {
            return;
        };
        let dm = &mut m.dirs[d];
        let old = dm.of_identity(id);
        let mut changes = Vec::new();
        diff_into(
            dir,
            old.iter().map(|(p, v)| (id, *p, *v)),
            new.iter().map(|(p, v)| (id, *p, *v)),
            &mut changes,
        );
        for c in &changes {
            let p = Prefix::of_flow(
                if c.key.protocol == 0 {
                    0
                } else {
                    c.key.port_prefix_len + 1
                },
                c.key.protocol,
                c.key.port,
            );
            match c.new {
                Some(v) => {
                    dm.insert(id, p, v);
                }
                None => {
                    dm.remove(id, p);
                }
            }
        }
        out.extend(changes);
    }

    // ---- policies ----

    /// Adds or replaces policies (by kind, namespace and name; a later document with the same
    /// id in `docs` wins). Documents identical to the installed ones change nothing.
    pub fn upsert_policies(&mut self, docs: impl IntoIterator<Item = Document>) -> PolicyDeltas {
        let mut removed: Vec<RuleId> = Vec::new();
        let mut added: Vec<RuleId> = Vec::new();
        for doc in docs {
            if self.docs.get(&doc.id) == Some(&doc) {
                continue;
            }
            if let Some(old) = self.policy_rules.remove(&doc.id) {
                added.retain(|r| !old.contains(r));
                removed.extend(old);
            }
            let ids = self.install_rules(&doc);
            added.extend(&ids);
            self.policy_rules.insert(doc.id.clone(), ids);
            self.docs.insert(doc.id.clone(), doc);
        }
        self.apply_rule_changes(&removed, &added)
    }

    /// Removes a policy; unknown ids change nothing.
    pub fn delete_policy(&mut self, id: &PolicyId) -> PolicyDeltas {
        self.docs.remove(id);
        let Some(old) = self.policy_rules.remove(id) else {
            return PolicyDeltas::default();
        };
        self.apply_rule_changes(&old, &[])
    }

    fn install_rules(&mut self, doc: &Document) -> Vec<RuleId> {
        let mut ids = Vec::new();
        for rule in &doc.rules {
            let rid = self.next_rule;
            self.next_rule += 1;
            let subject = self
                .cache
                .acquire(CacheKey::Subject(rule.subject.clone()), &self.identities);
            self.subject_users.entry(subject).or_default().push(rid);
            let mut entries = Vec::new();
            let mut cookies = Vec::new();
            for e in &rule.entries {
                let peers = if e.peers.is_wildcard() {
                    CompiledPeers::Wildcard
                } else {
                    let crate::model::Peers::Only(list) = &e.peers else {
                        continue;
                    };
                    let mut sels = Vec::new();
                    for p in list {
                        let s = self
                            .cache
                            .acquire(CacheKey::Peer(p.clone()), &self.identities);
                        self.peer_users
                            .entry(s)
                            .or_default()
                            .push((rid, e.direction));
                        sels.push(s);
                    }
                    CompiledPeers::Selectors(sels)
                };
                let cookie = self.cookies.acquire(&doc.id, &e.path);
                cookies.push(cookie);
                let (contribs, l7_ports) = entry_contribs(e, cookie);
                let mut selector_index = match &peers {
                    CompiledPeers::Selectors(sels) => sels.clone(),
                    CompiledPeers::Wildcard => Vec::new(),
                };
                selector_index.sort_unstable();
                selector_index.dedup();
                entries.push(CompiledEntry {
                    dir: e.direction,
                    peers,
                    selector_index,
                    contribs,
                    l7_ports,
                });
            }
            self.rules.insert(
                rid,
                CompiledRule {
                    subject,
                    default_deny: rule.default_deny,
                    entries,
                    cookies,
                },
            );
            ids.push(rid);
        }
        ids
    }

    fn release_rule(&mut self, rid: RuleId) {
        let Some(rule) = self.rules.remove(&rid) else {
            return;
        };
        if let Some(users) = self.subject_users.get_mut(&rule.subject) {
            users.retain(|r| *r != rid);
            if users.is_empty() {
                self.subject_users.remove(&rule.subject);
            }
        }
        self.cache.release(rule.subject);
        for c in rule.cookies {
            self.cookies.release(c);
        }
        for e in rule.entries {
            if let CompiledPeers::Selectors(sels) = e.peers {
                for s in sels {
                    if let Some(users) = self.peer_users.get_mut(&s) {
                        users.retain(|(r, _)| *r != rid);
                        if users.is_empty() {
                            self.peer_users.remove(&s);
                        }
                    }
                    self.cache.release(s);
                }
            }
        }
    }

    fn apply_rule_changes(&mut self, removed: &[RuleId], added: &[RuleId]) -> PolicyDeltas {
        let mut deltas = PolicyDeltas::default();
        let removed_set: HashSet<RuleId> = removed.iter().copied().collect();
        let mut affected: HashSet<u32, IntHashBuilder> = HashSet::default();
        for rid in removed {
            if let Some(rule) = self.rules.get(rid) {
                affected.extend(self.cache.matches(rule.subject));
            }
        }
        let mut gained: HashMap<u32, Vec<RuleId>, IntHashBuilder> = HashMap::default();
        for rid in added {
            if let Some(rule) = self.rules.get(rid) {
                for e in self.cache.matches(rule.subject) {
                    affected.insert(e);
                    gained.entry(e).or_default().push(*rid);
                }
            }
        }
        // Group endpoints by (old map, new rule set): each group's diff is computed once.
        let mut groups: BTreeMap<(Option<MapId>, Vec<RuleId>), Vec<u32>> = BTreeMap::new();
        let mut affected: Vec<u32> = affected.into_iter().collect();
        affected.sort_unstable();
        for e in affected {
            let old_mid = self.endpoints.get(&e).copied();
            let mut rules: Vec<RuleId> = old_mid
                .and_then(|m| self.maps[m].as_ref())
                .map(|m| m.rules.clone())
                .unwrap_or_default();
            rules.retain(|r| !removed_set.contains(r));
            if let Some(g) = gained.get(&e) {
                rules.extend(g);
            }
            rules.sort_unstable();
            rules.dedup();
            groups.entry((old_mid, rules)).or_default().push(e);
        }
        for ((old_mid, rules), members) in groups {
            let new_mid = self.map_for(rules);
            if Some(new_mid) == old_mid {
                continue;
            }
            let mut changes = Vec::new();
            for d in Direction::BOTH {
                let old_iter = old_mid
                    .and_then(|m| self.maps[m].as_ref())
                    .map(|m| m.dirs[dir_index(d)].iter());
                let Some(new_map) = self.maps[new_mid].as_ref() else {
                    continue;
                };
                diff_into(
                    d,
                    old_iter.into_iter().flatten(),
                    new_map.dirs[dir_index(d)].iter(),
                    &mut changes,
                );
            }
            let changes: Arc<[KeyChange]> = changes.into();
            for e in members {
                if let Some(m) = old_mid.and_then(|m| self.maps[m].as_mut()) {
                    m.members.remove(&e);
                }
                if let Some(m) = self.maps[new_mid].as_mut() {
                    m.members.insert(e);
                }
                self.endpoints.insert(e, new_mid);
                deltas.push(e, &changes);
            }
            if let Some(m) = old_mid {
                self.drop_if_unused(m);
            }
        }
        for rid in removed {
            // Maps still naming a removed rule have lost all their members above.
            let stale: Vec<MapId> = self
                .maps_by_rule
                .get(rid)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for m in stale {
                self.drop_map(m);
            }
            self.release_rule(*rid);
        }
        deltas
    }

    // ---- maps ----

    /// The map for a rule set, built if no endpoint uses one yet.
    fn map_for(&mut self, rules: Vec<RuleId>) -> MapId {
        if let Some(&mid) = self.maps_by_rules.get(&rules) {
            return mid;
        }
        let map = self.build_map(rules.clone());
        let mid = match self.free_maps.pop() {
            Some(mid) => {
                self.maps[mid] = Some(map);
                mid
            }
            None => {
                self.maps.push(Some(map));
                self.maps.len() - 1
            }
        };
        for r in &rules {
            self.maps_by_rule.entry(*r).or_default().insert(mid);
        }
        self.maps_by_rules.insert(rules, mid);
        mid
    }

    fn drop_if_unused(&mut self, mid: MapId) {
        if self.maps[mid]
            .as_ref()
            .is_some_and(|m| m.members.is_empty())
        {
            self.drop_map(mid);
        }
    }

    fn drop_map(&mut self, mid: MapId) {
        let Some(m) = self.maps[mid].take() else {
            return;
        };
        for r in &m.rules {
            if let Some(set) = self.maps_by_rule.get_mut(r) {
                set.remove(&mid);
                if set.is_empty() {
                    self.maps_by_rule.remove(r);
                }
            }
        }
        self.maps_by_rules.remove(&m.rules);
        for e in &m.members {
            if self.endpoints.get(e) == Some(&mid) {
                self.endpoints.remove(e);
            }
        }
        self.free_maps.push(mid);
    }

    fn build_map(&self, rules: Vec<RuleId>) -> PolicyMap {
        let mut dirs = [DirMap::default(), DirMap::default()];
        let mut wilds = [
            WildcardContributions::default(),
            WildcardContributions::default(),
        ];
        let mut l7_ports: [HashSet<PortKey>; 2] = [HashSet::new(), HashSet::new()];
        for rule in rules.iter().filter_map(|r| self.rules.get(r)) {
            for e in &rule.entries {
                l7_ports[dir_index(e.dir)].extend(&e.l7_ports);
            }
        }
        let allow_all = PrefixVerdict {
            allow: true,
            ..PrefixVerdict::default()
        };
        for d in Direction::BOTH {
            let wild = &mut wilds[dir_index(d)];
            let l7 = &l7_ports[dir_index(d)];
            if self.mode == EnforcementMode::Never {
                wild.add(Prefix::ANY, allow_all);
            } else {
                let enforced = self.mode == EnforcementMode::Always
                    || rules
                        .iter()
                        .filter_map(|r| self.rules.get(r))
                        .any(|r| r.default_deny.get(d));
                if !enforced {
                    wild.add(Prefix::ANY, allow_all);
                }
                let mut per_id: HashMap<u32, Vec<(Prefix, PrefixVerdict)>, IntHashBuilder> =
                    HashMap::default();
                for rule in rules.iter().filter_map(|r| self.rules.get(r)) {
                    for e in rule.entries.iter().filter(|e| e.dir == d) {
                        match &e.peers {
                            CompiledPeers::Wildcard => {
                                for c in &e.contribs {
                                    let (p, a) = effective(c, l7);
                                    wild.add(p, a);
                                }
                            }
                            CompiledPeers::Selectors(sels) if sels.len() == 1 => {
                                let contribs: Vec<(Prefix, PrefixVerdict)> =
                                    e.contribs.iter().map(|c| effective(c, l7)).collect();
                                for id in self.cache.matches(sels[0]) {
                                    per_id.entry(id).or_default().extend_from_slice(&contribs);
                                }
                            }
                            CompiledPeers::Selectors(sels) => {
                                let mut ids: Vec<u32> =
                                    sels.iter().flat_map(|s| self.cache.matches(*s)).collect();
                                ids.sort_unstable();
                                ids.dedup();
                                let contribs: Vec<(Prefix, PrefixVerdict)> =
                                    e.contribs.iter().map(|c| effective(c, l7)).collect();
                                for id in ids {
                                    per_id.entry(id).or_default().extend_from_slice(&contribs);
                                }
                            }
                        }
                    }
                }
                let dm = &mut dirs[dir_index(d)];
                for (id, contribs) in per_id {
                    for (p, v) in resolve_identity(&merge(contribs), wild) {
                        dm.insert(id, p, v);
                    }
                }
            }
            let dm = &mut dirs[dir_index(d)];
            for (p, v) in wilds[dir_index(d)].entries() {
                dm.insert(0, p, v);
            }
        }
        PolicyMap {
            rules,
            members: HashSet::default(),
            dirs,
            wild: wilds,
            l7_ports,
        }
    }

    // ---- queries ----

    /// The datapath lookup for one flow of `endpoint` in `direction` with a remote identity:
    /// exact identity then wildcard, deny wins, longest protocol/port prefix. `None` when
    /// `endpoint` has no map (unknown, or not an endpoint identity).
    #[inline]
    pub fn lookup(
        &self,
        endpoint: NumericIdentity,
        direction: Direction,
        remote: NumericIdentity,
        proto: u8,
        port: u16,
    ) -> Option<Verdict> {
        let mid = *self.endpoints.get(&endpoint.get())?;
        let m = self.maps.get(mid)?.as_ref()?;
        Some(
            match m.dirs[dir_index(direction)].lookup(remote.get(), proto, port) {
                Some(e) if !e.deny => Verdict {
                    allowed: true,
                    l7_redirect: e.l7_redirect,
                    auth_required: e.auth_required,
                },
                _ => Verdict::DENIED,
            },
        )
    }

    /// The map of one endpoint, ordered by key; `None` for an unknown endpoint.
    pub fn policy_map(&self, endpoint: NumericIdentity) -> Option<Vec<(PolicyKey, PolicyEntry)>> {
        let mid = *self.endpoints.get(&endpoint.get())?;
        let m = self.maps.get(mid)?.as_ref()?;
        let mut out = Vec::new();
        for d in Direction::BOTH {
            out.extend(
                m.dirs[dir_index(d)]
                    .iter()
                    .map(|(id, p, v)| (PolicyKey::from_parts(id, d, p), v)),
            );
        }
        Some(out)
    }

    /// The value at exactly this key of an endpoint's map (no prefix matching).
    pub fn map_entry(&self, endpoint: NumericIdentity, key: &PolicyKey) -> Option<PolicyEntry> {
        let mid = *self.endpoints.get(&endpoint.get())?;
        let m = self.maps.get(mid)?.as_ref()?;
        let p = Prefix::of_flow(
            if key.protocol == 0 {
                0
            } else {
                key.port_prefix_len + 1
            },
            key.protocol,
            key.port,
        );
        m.dirs[dir_index(key.direction)].get(key.identity, p)
    }

    /// Number of entries in an endpoint's map (0 when unknown).
    pub fn map_len(&self, endpoint: NumericIdentity) -> usize {
        self.endpoints
            .get(&endpoint.get())
            .and_then(|mid| self.maps.get(*mid)?.as_ref())
            .map_or(0, |m| m.dirs.iter().map(DirMap::len).sum())
    }

    /// The endpoints (identities with a map), sorted.
    pub fn endpoints(&self) -> Vec<NumericIdentity> {
        let mut v: Vec<NumericIdentity> = self
            .endpoints
            .keys()
            .map(|i| NumericIdentity::new(*i))
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of known identities.
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }

    /// The labels of a known identity.
    pub fn identity_labels(&self, id: NumericIdentity) -> Option<&Labels> {
        self.identities.get(&id.get())
    }

    /// The policy and rule path a map entry's `rule_cookie` names, while that rule is
    /// installed; `None` for 0 (no rule decided) and for unknown cookies.
    pub fn rule_for_cookie(&self, cookie: u32) -> Option<(PolicyId, String)> {
        self.cookies
            .get(cookie)
            .map(|(p, path)| (p.clone(), path.to_owned()))
    }

    /// Every cookie of the installed rules with its policy and rule path, in no order.
    pub fn rule_cookies(&self) -> impl Iterator<Item = (u32, &PolicyId, &str)> + '_ {
        self.cookies.iter()
    }

    /// Number of distinct compiled maps (endpoints with the same rules share one).
    pub fn distinct_maps(&self) -> usize {
        self.maps.iter().filter(|m| m.is_some()).count()
    }

    /// The installed policies, ordered by id (the input of [`crate::evaluate`]).
    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.docs.values()
    }

    /// The selector cache: each cached selector (`subject:` or `peer:` plus its text) with
    /// the identities it matches, sorted.
    pub fn selector_cache(&self) -> Vec<(String, Vec<NumericIdentity>)> {
        self.cache
            .snapshot()
            .into_iter()
            .map(|(k, ids)| {
                let name = match k {
                    CacheKey::Subject(s) => format!("subject:{s}"),
                    CacheKey::Peer(p) => format!("peer:{p}"),
                };
                (name, ids.into_iter().map(NumericIdentity::new).collect())
            })
            .collect()
    }

    /// Total number of (selector, identity) matches held by the cache.
    pub fn selector_cache_matches(&self) -> usize {
        self.subject_users
            .keys()
            .chain(self.peer_users.keys())
            .collect::<HashSet<_>>()
            .into_iter()
            .map(|s| self.cache.match_count(*s))
            .sum()
    }
}
