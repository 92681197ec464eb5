//! The selector cache: each distinct selector in use and the set of identities it matches,
//! kept current as identities come and go. Selectors and identities are both indexed by one
//! `key=value` label, so adding an identity tests only the selectors that could match it and
//! adding a selector tests only the identities that could match it. CIDR selectors and CIDR
//! identities are indexed by prefix the same way, so an import of many CIDRs does not test
//! every CIDR identity against every CIDR selector.

use std::collections::{BTreeMap, HashMap, HashSet};

use sigil_labels::{Labels, NAMESPACE_KEY, Operator, Selector};

use crate::cidr::IpPrefix;
use crate::model::{Entity, PeerSelector};

use super::key::IntHashBuilder;

/// Handle of a cached selector.
pub(crate) type SelectorId = u32;

/// What is cached: a subject selector matches only endpoint identities, a peer selector any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum CacheKey {
    Subject(Selector),
    Peer(PeerSelector),
}

impl CacheKey {
    fn matches(&self, id: u32, labels: &Labels) -> bool {
        match self {
            CacheKey::Subject(s) => super::is_endpoint_identity(id) && s.matches(labels),
            CacheKey::Peer(p) => p.matches(labels),
        }
    }
}

/// How candidates for a selector are found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Hint {
    /// Only identities carrying this label key with this value can match.
    Label(String, String),
    /// Only CIDR identities whose prefix lies in this one can match.
    Cidr(IpPrefix),
    /// Any identity may match: test them all.
    Scan,
    /// Nothing matches.
    Never,
}

fn hint(key: &CacheKey) -> Hint {
    let sel = match key {
        CacheKey::Subject(s) | CacheKey::Peer(PeerSelector::Endpoints(s)) => s,
        CacheKey::Peer(PeerSelector::Entity(e)) => {
            return match e {
                Entity::All | Entity::World | Entity::Cluster => Hint::Scan,
                Entity::None => Hint::Never,
                other => Hint::Label(other.as_str().to_owned(), String::new()),
            };
        }
        // A `/0` also matches `reserved:world`, which has no prefix.
        CacheKey::Peer(PeerSelector::Cidr(c)) if c.cidr.is_default() => return Hint::Scan,
        CacheKey::Peer(PeerSelector::Cidr(c)) => return Hint::Cidr(c.cidr),
        CacheKey::Peer(PeerSelector::Fqdn(_)) => return Hint::Never,
    };
    let mut eq = sel
        .requirements()
        .iter()
        .filter(|r| r.op == Operator::In && r.values.len() == 1);
    // The namespace label is shared by many identities; any other equality is sharper.
    let pick = eq
        .clone()
        .find(|r| r.key.key != NAMESPACE_KEY)
        .or_else(|| eq.next());
    match pick.and_then(|r| r.values.iter().next().map(|v| (r, v))) {
        Some((r, v)) => Hint::Label(r.key.key.clone(), v.clone()),
        None => Hint::Scan,
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: CacheKey,
    hint: Hint,
    refs: usize,
    matches: HashSet<u32, IntHashBuilder>,
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectorCache {
    by_key: HashMap<CacheKey, SelectorId>,
    entries: HashMap<SelectorId, Entry, IntHashBuilder>,
    next: SelectorId,
    by_label: HashMap<(String, String), Vec<SelectorId>>,
    scan: HashSet<SelectorId, IntHashBuilder>,
    idents_by_label: HashMap<(String, String), HashSet<u32, IntHashBuilder>>,
    by_cidr: HashMap<IpPrefix, Vec<SelectorId>>,
    /// CIDR identities by their most specific prefix.
    idents_by_cidr: BTreeMap<IpPrefix, HashSet<u32, IntHashBuilder>>,
}

impl SelectorCache {
    /// The id of `key`, cached (and its matches computed) on first use; counts a reference.
    pub(crate) fn acquire(
        &mut self,
        key: CacheKey,
        identities: &HashMap<u32, Labels, IntHashBuilder>,
    ) -> SelectorId {
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(e) = self.entries.get_mut(&id) {
                e.refs += 1;
            }
            return id;
        }
        let id = self.next;
        self.next += 1;
        let hint = hint(&key);
        let mut matches = HashSet::default();
        match &hint {
            Hint::Label(k, v) => {
                if let Some(cands) = self.idents_by_label.get(&(k.clone(), v.clone())) {
                    for &i in cands {
                        if identities.get(&i).is_some_and(|l| key.matches(i, l)) {
                            matches.insert(i);
                        }
                    }
                }
                self.by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(id);
            }
            Hint::Cidr(c) => {
                let (lo, hi) = c.inner_bounds();
                for (p, ids) in self.idents_by_cidr.range(lo..=hi) {
                    if !c.contains(p) {
                        continue;
                    }
                    for &i in ids {
                        if identities.get(&i).is_some_and(|l| key.matches(i, l)) {
                            matches.insert(i);
                        }
                    }
                }
                self.by_cidr.entry(*c).or_default().push(id);
            }
            Hint::Scan => {
                for (&i, l) in identities {
                    if key.matches(i, l) {
                        matches.insert(i);
                    }
                }
                self.scan.insert(id);
            }
            Hint::Never => {}
        }
        self.by_key.insert(key.clone(), id);
        self.entries.insert(
            id,
            Entry {
                key,
                hint,
                refs: 1,
                matches,
            },
        );
        id
    }

    /// Drops a reference; the selector leaves the cache with its last one.
    pub(crate) fn release(&mut self, id: SelectorId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        if let Some(e) = self.entries.remove(&id) {
            self.by_key.remove(&e.key);
            match e.hint {
                Hint::Label(k, v) => {
                    let lk = (k, v);
                    if let Some(list) = self.by_label.get_mut(&lk) {
                        list.retain(|&s| s != id);
                        if list.is_empty() {
                            self.by_label.remove(&lk);
                        }
                    }
                }
                Hint::Cidr(c) => {
                    if let Some(list) = self.by_cidr.get_mut(&c) {
                        list.retain(|&s| s != id);
                        if list.is_empty() {
                            self.by_cidr.remove(&c);
                        }
                    }
                }
                Hint::Scan => {
                    self.scan.remove(&id);
                }
                Hint::Never => {}
            }
        }
    }

    /// Whether selector `sel` matches identity `id`.
    pub(crate) fn contains(&self, sel: SelectorId, id: u32) -> bool {
        self.entries
            .get(&sel)
            .is_some_and(|e| e.matches.contains(&id))
    }

    /// The identities selector `sel` matches.
    pub(crate) fn matches(&self, sel: SelectorId) -> impl Iterator<Item = u32> + '_ {
        self.entries
            .get(&sel)
            .into_iter()
            .flat_map(|e| e.matches.iter().copied())
    }

    /// How many identities selector `sel` matches.
    pub(crate) fn match_count(&self, sel: SelectorId) -> usize {
        self.entries.get(&sel).map_or(0, |e| e.matches.len())
    }

    /// Every cached selector with its key and matches (for inspection and tests).
    pub(crate) fn snapshot(&self) -> Vec<(&CacheKey, Vec<u32>)> {
        let mut out: Vec<(&CacheKey, Vec<u32>)> = self
            .entries
            .values()
            .map(|e| {
                let mut m: Vec<u32> = e.matches.iter().copied().collect();
                m.sort_unstable();
                (&e.key, m)
            })
            .collect();
        out.sort_by_key(|(k, _)| format!("{k:?}"));
        out
    }

    /// The selectors that match identity `id` (with `labels`), sorted.
    pub(crate) fn selectors_matching(&self, id: u32, labels: &Labels) -> Vec<SelectorId> {
        self.candidates(labels)
            .into_iter()
            .filter(|s| self.contains(*s, id))
            .collect()
    }

    fn candidates(&self, labels: &Labels) -> Vec<SelectorId> {
        let mut c: Vec<SelectorId> = self.scan.iter().copied().collect();
        for l in labels.iter() {
            if let Some(list) = self.by_label.get(&(l.key.clone(), l.value.clone())) {
                c.extend(list);
            }
        }
        if let Some(p) = IpPrefix::of_labels(labels) {
            for len in 0..=p.prefix_len() {
                if let Some(list) = IpPrefix::new(p.addr(), len).and_then(|a| self.by_cidr.get(&a))
                {
                    c.extend(list);
                }
            }
        }
        c.sort_unstable();
        c.dedup();
        c
    }

    /// Records a new identity; returns the selectors that now match it.
    pub(crate) fn add_identity(&mut self, id: u32, labels: &Labels) -> Vec<SelectorId> {
        for l in labels.iter() {
            self.idents_by_label
                .entry((l.key.clone(), l.value.clone()))
                .or_default()
                .insert(id);
        }
        if let Some(p) = IpPrefix::of_labels(labels) {
            self.idents_by_cidr.entry(p).or_default().insert(id);
        }
        let mut hit = Vec::new();
        for sel in self.candidates(labels) {
            if let Some(e) = self.entries.get_mut(&sel)
                && e.key.matches(id, labels)
                && e.matches.insert(id)
            {
                hit.push(sel);
            }
        }
        hit
    }

    /// Forgets an identity; returns the selectors that matched it.
    pub(crate) fn remove_identity(&mut self, id: u32, labels: &Labels) -> Vec<SelectorId> {
        for l in labels.iter() {
            let lk = (l.key.clone(), l.value.clone());
            if let Some(set) = self.idents_by_label.get_mut(&lk) {
                set.remove(&id);
                if set.is_empty() {
                    self.idents_by_label.remove(&lk);
                }
            }
        }
        if let Some(p) = IpPrefix::of_labels(labels)
            && let Some(set) = self.idents_by_cidr.get_mut(&p)
        {
            set.remove(&id);
            if set.is_empty() {
                self.idents_by_cidr.remove(&p);
            }
        }
        let mut hit = Vec::new();
        for sel in self.candidates(labels) {
            if let Some(e) = self.entries.get_mut(&sel)
                && e.matches.remove(&id)
            {
                hit.push(sel);
            }
        }
        hit
    }
}
