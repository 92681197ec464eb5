//! One direction of a policy map: the hash map the datapath probes, the per-level counts that
//! keep the probe count small, and the resolution that turns rule contributions into entries
//! so that a datapath-style lookup returns what the rules say.
//!
//! Lookup (as the datapath will do it): longest protocol/port prefix for the exact remote
//! identity (A) and for the wildcard identity 0 (B); a deny in A or B wins; otherwise the
//! longer prefix wins, A on a tie. Resolution makes that exact: an entry's value folds every
//! contribution whose prefix contains it (its own identity's and the wildcard's), so deny
//! shadows narrower allows and flags flow into narrower entries; and where a wildcard entry
//! is narrower than an identity's entry and the flags differ, the identity gets its own copy
//! of that prefix. That copy also makes the map exact for a datapath that takes the exact
//! identity's entry whenever there is one (deny still checked in both), whatever the
//! prefix lengths.

use std::collections::{BTreeSet, HashMap};

use super::key::{IntHashBuilder, LEVELS, PolicyEntry, Prefix, PrefixVerdict, pack, unpack};

/// Entries of one direction of one policy map.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirMap {
    entries: HashMap<u64, PolicyEntry, IntHashBuilder>,
    ordered: BTreeSet<u64>,
    spec_count: [u32; LEVELS],
    wild_count: [u32; LEVELS],
    spec_mask: u32,
    wild_mask: u32,
}

impl DirMap {
    fn count(&mut self, identity: u32, level: u8, up: bool) {
        let (counts, mask) = if identity == 0 {
            (&mut self.wild_count, &mut self.wild_mask)
        } else {
            (&mut self.spec_count, &mut self.spec_mask)
        };
        let c = &mut counts[usize::from(level)];
        if up {
            *c += 1;
        } else {
            *c = c.saturating_sub(1);
        }
        if *c == 0 {
            *mask &= !(1 << level);
        } else {
            *mask |= 1 << level;
        }
    }

    /// Sets an entry, returning the previous value.
    pub(crate) fn insert(
        &mut self,
        identity: u32,
        p: Prefix,
        v: PolicyEntry,
    ) -> Option<PolicyEntry> {
        let k = pack(identity, p);
        let old = self.entries.insert(k, v);
        if old.is_none() {
            self.ordered.insert(k);
            self.count(identity, p.level, true);
        }
        old
    }

    /// Removes an entry, returning its value.
    pub(crate) fn remove(&mut self, identity: u32, p: Prefix) -> Option<PolicyEntry> {
        let k = pack(identity, p);
        let old = self.entries.remove(&k);
        if old.is_some() {
            self.ordered.remove(&k);
            self.count(identity, p.level, false);
        }
        old
    }

    /// The entry at exactly this key.
    pub(crate) fn get(&self, identity: u32, p: Prefix) -> Option<PolicyEntry> {
        self.entries.get(&pack(identity, p)).copied()
    }

    /// The entries of one remote identity.
    pub(crate) fn of_identity(&self, identity: u32) -> Vec<(Prefix, PolicyEntry)> {
        let lo = u64::from(identity) << 32;
        let hi = lo | u64::from(u32::MAX);
        self.ordered
            .range(lo..=hi)
            .filter_map(|k| self.entries.get(k).map(|v| (unpack(*k).1, *v)))
            .collect()
    }

    /// Every entry, ordered by identity then prefix.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, Prefix, PolicyEntry)> + '_ {
        self.ordered.iter().filter_map(|k| {
            let (id, p) = unpack(*k);
            self.entries.get(k).map(|v| (id, p, *v))
        })
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The datapath lookup; `None` is a miss (no entry covers the flow: denied).
    #[inline]
    pub(crate) fn lookup(&self, remote: u32, proto: u8, port: u16) -> Option<PolicyEntry> {
        let spec = if remote == 0 { 0 } else { self.spec_mask };
        let mut levels = spec | self.wild_mask;
        let mut wild: Option<PolicyEntry> = None;
        while levels != 0 {
            let level = 31 - levels.leading_zeros();
            levels &= !(1 << level);
            // level < LEVELS, so it fits in u8.
            let p = Prefix::of_flow(level as u8, proto, port);
            if spec & (1 << level) != 0
                && let Some(a) = self.entries.get(&pack(remote, p))
            {
                return Some(match wild {
                    Some(_) if a.deny => *a,
                    Some(b) if b.deny => b,
                    Some(b) => b,
                    None => *a,
                });
            }
            if wild.is_none()
                && self.wild_mask & (1 << level) != 0
                && let Some(b) = self.entries.get(&pack(0, p))
            {
                if b.deny {
                    return Some(*b);
                }
                wild = Some(*b);
                // Only a deny for the exact identity can still change the answer.
                if spec == 0 {
                    return wild;
                }
            }
        }
        wild
    }
}

/// The wildcard-identity contributions of one direction, by prefix.
#[derive(Debug, Clone, Default)]
pub(crate) struct WildcardContributions {
    aggs: HashMap<Prefix, PrefixVerdict>,
    mask: u32,
}

impl WildcardContributions {
    /// Adds a contribution.
    pub(crate) fn add(&mut self, p: Prefix, a: PrefixVerdict) {
        let e = self.aggs.entry(p).or_default();
        *e = e.or(a);
        self.mask |= 1 << p.level;
    }

    /// Every contribution whose prefix contains `q`, OR-ed.
    pub(crate) fn fold_at(&self, q: Prefix) -> PrefixVerdict {
        let mut acc = PrefixVerdict::default();
        if self.mask == 0 {
            return acc;
        }
        for anc in q.ancestors() {
            if self.mask & (1 << anc.level) != 0
                && let Some(a) = self.aggs.get(&anc)
            {
                acc = acc.or(*a);
            }
        }
        acc
    }

    /// The wildcard entries: one per contribution prefix, resolved.
    pub(crate) fn entries(&self) -> Vec<(Prefix, PolicyEntry)> {
        let mut out: Vec<(Prefix, PolicyEntry)> = self
            .aggs
            .keys()
            .map(|p| (*p, self.fold_at(*p).entry()))
            .collect();
        out.sort_unstable_by_key(|(p, _)| *p);
        out
    }

    fn prefixes(&self) -> impl Iterator<Item = &Prefix> {
        self.aggs.keys()
    }
}

/// The entries of one remote identity, given its own contributions (`own`, merged per
/// prefix) and the wildcard ones. See the module documentation for why this is exact.
pub(crate) fn resolve_identity(
    own: &[(Prefix, PrefixVerdict)],
    wild: &WildcardContributions,
) -> Vec<(Prefix, PolicyEntry)> {
    let mut out = Vec::with_capacity(own.len());
    let fold_own = |q: &Prefix| {
        own.iter()
            .filter(|(r, _)| r.contains(q))
            .fold(PrefixVerdict::default(), |acc, (_, a)| acc.or(*a))
    };
    for (q, _) in own {
        out.push((*q, fold_own(q).or(wild.fold_at(*q)).entry()));
    }
    if own.is_empty() {
        return out;
    }
    for w in wild.prefixes() {
        if own.iter().any(|(q, _)| q == w) {
            continue;
        }
        let mine = fold_own(w);
        let theirs = wild.fold_at(*w);
        if !mine.allow || mine.deny || theirs.deny {
            // No own allow around this prefix, or a deny that either lookup order finds.
            continue;
        }
        let full = mine.or(theirs);
        // The value an exact-identity-first datapath would use: the longest own entry
        // around `w` (its own part is `mine`, its wildcard part stops above `w`).
        let Some(enclosing) = own
            .iter()
            .filter(|(q, _)| q.contains(w))
            .map(|(q, _)| *q)
            .max_by_key(|q| q.level)
        else {
            continue;
        };
        let exact_first = mine.or(wild.fold_at(enclosing));
        let same = |a: PrefixVerdict| a.l7 == full.l7 && a.auth == full.auth;
        if !same(theirs) || !same(exact_first) {
            out.push((*w, full.entry()));
        }
    }
    out.sort_unstable_by_key(|(p, _)| *p);
    out
}
