//! The kernel policy trie of all endpoints, with a mirror of what is installed so that updates
//! are computed as ordered diffs.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, lpm_trie::LpmTrie};
use sigil_policy::Direction;

use super::{
    FLAG_DEMOTED, Installed, PolicyEntry, PolicyKey, from_lpm, from_raw, intent_of,
    normalize_installed, to_lpm, to_raw,
};
use crate::abi::{PolicyKeyData, PolicyValueRaw};
use crate::error::DatapathError;
use crate::error::is_not_found;

const NAME: &str = "sigil_policy";

/// The `sigil_policy` LPM trie shared by all endpoints.
///
/// It assumes it is the only writer (the daemon): it mirrors the installed entries and diffs
/// against the mirror. Opening it scans the trie once, so a restarted daemon diffs against what
/// the kernel really holds. Allows that were demoted to denies (see [`super::normalize`]) are
/// not restored into the intent on adoption: reconcile with [`PolicyMap::replace_policy`].
pub struct PolicyMap {
    trie: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    intent: HashMap<u32, BTreeMap<PolicyKey, PolicyEntry>>,
    installed: HashMap<u32, BTreeMap<PolicyKey, Installed>>,
    max_entries: u32,
    /// Test seam: writes of [`PolicyMap::apply_plan`] allowed before one fails.
    fail_after: Option<usize>,
}

/// One planned kernel write: the key's installed value before and after.
#[derive(Clone, Copy, Debug)]
struct Write {
    endpoint: u32,
    key: PolicyKey,
    old: Option<Installed>,
    new: Option<Installed>,
}

/// Changes to several endpoints' policies, computed against what is installed without writing
/// anything (see [`PolicyMap::plan`]); applied whole or not at all by [`PolicyMap::apply_plan`].
#[derive(Debug, Default)]
pub struct PolicyPlan {
    writes: Vec<Write>,
    intent: Vec<(u32, PolicyKey, Option<PolicyEntry>, Option<PolicyEntry>)>,
}

impl PolicyPlan {
    /// Keys the plan adds (the map needs room for all of them before stale keys go).
    pub fn new_entries(&self) -> usize {
        self.writes
            .iter()
            .filter(|w| w.old.is_none() && w.new.is_some())
            .count()
    }

    /// Kernel writes (inserts, updates and deletes) the plan makes.
    pub fn writes(&self) -> usize {
        self.writes.len()
    }

    /// Whether the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.intent.is_empty()
    }
}

/// The writes an applied plan made, so that a later failure of the caller can undo them
/// (see [`PolicyMap::rollback`]).
#[derive(Debug, Default)]
#[must_use = "roll the plan back if the rest of the change fails"]
pub struct Applied {
    done: Vec<Write>,
    intent: Vec<(u32, PolicyKey, Option<PolicyEntry>, Option<PolicyEntry>)>,
}

impl PolicyMap {
    pub(crate) fn new(
        trie: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    ) -> Result<Self, DatapathError> {
        let mut installed: HashMap<u32, BTreeMap<PolicyKey, Installed>> = HashMap::new();
        for item in trie.iter() {
            let (key, raw) = item.map_err(|e| DatapathError::map(NAME, "scan", e))?;
            // Keys this build cannot decode were not written by it: leave them alone.
            let Some((ep, key)) = from_lpm(&key) else {
                continue;
            };
            installed.entry(ep).or_default().insert(
                key,
                Installed {
                    value: from_raw(raw),
                    demoted: raw.flags & FLAG_DEMOTED != 0,
                },
            );
        }
        let intent = installed
            .iter()
            .map(|(ep, m)| {
                let kept = m
                    .iter()
                    .filter(|(_, i)| !i.demoted)
                    .map(|(k, i)| (*k, i.value))
                    .collect();
                (*ep, kept)
            })
            .collect();
        let max_entries = aya::maps::IterableMap::map(&trie)
            .info()
            .map_err(|e| DatapathError::map(NAME, "info", e))?
            .max_entries();
        Ok(Self {
            trie,
            intent,
            installed,
            max_entries,
            fail_after: None,
        })
    }

    /// The map's capacity.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Entries installed by this daemon over all endpoints.
    pub fn len(&self) -> usize {
        self.installed.values().map(BTreeMap::len).sum()
    }

    /// Whether no entry is installed.
    pub fn is_empty(&self) -> bool {
        self.installed.values().all(BTreeMap::is_empty)
    }

    /// Free entries.
    pub fn free(&self) -> usize {
        usize::try_from(self.max_entries)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.len())
    }

    /// Test seam at the kernel writer: after `n` more writes of [`PolicyMap::apply_plan`] the
    /// next one fails with [`DatapathError::InjectedFailure`] (`None` turns it off).
    #[doc(hidden)]
    pub fn fail_writes_after(&mut self, n: Option<usize>) {
        self.fail_after = n;
    }

    /// Plans key changes of several endpoints: `(endpoint, key, new value or None to remove)`.
    ///
    /// Only the (identity, direction) groups a change touches are normalized again (deny
    /// precedence never crosses groups), so the cost follows the change, not the map size.
    /// Nothing is written.
    pub fn plan(
        &self,
        changes: impl IntoIterator<Item = (u32, PolicyKey, Option<PolicyEntry>)>,
    ) -> PolicyPlan {
        plan_from(&self.intent, &self.installed, changes)
    }

    /// Whether the map has room for the plan's new keys ([`DatapathError::PolicyMapFull`]
    /// says how many are needed and free).
    pub fn check(&self, plan: &PolicyPlan) -> Result<(), DatapathError> {
        let needed = plan.new_entries();
        let free = self.free();
        if needed > free {
            return Err(DatapathError::PolicyMapFull {
                needed,
                free,
                max_entries: self.max_entries,
            });
        }
        Ok(())
    }

    /// Applies a plan to the kernel over all its endpoints in the fail-closed order: (1) new
    /// or changed denies, (2) stale allows removed, (3) new or changed allows, (4) stale denies
    /// removed. It first checks that the map can take the plan's new keys
    /// ([`DatapathError::PolicyMapFull`], nothing written). If a write fails, the writes done
    /// are undone in reverse order, which passes back through the same fail-closed states, and
    /// the map is as before ([`DatapathError::PolicyRolledBack`]).
    pub fn apply_plan(&mut self, plan: PolicyPlan) -> Result<Applied, DatapathError> {
        self.check(&plan)?;
        let PolicyPlan { writes, intent } = plan;
        let ordered = ordered(writes);
        let total = ordered.len();
        let mut done: Vec<Write> = Vec::with_capacity(total);
        for w in ordered {
            let injected = self.fail_after.is_some_and(|n| done.len() >= n);
            let res = if injected {
                Err(DatapathError::InjectedFailure { write: done.len() })
            } else {
                self.write(w.endpoint, w.key, w.new)
            };
            if let Err(e) = res {
                let written = done.len();
                return match self.undo(done) {
                    Ok(()) => Err(DatapathError::PolicyRolledBack {
                        written,
                        total,
                        cause: Box::new(e),
                    }),
                    Err(r) => Err(DatapathError::PolicyRollbackFailed {
                        failed: e.to_string(),
                        cause: Box::new(r),
                    }),
                };
            }
            done.push(w);
        }
        for (ep, k, _, new) in &intent {
            self.set_intent(*ep, *k, *new);
        }
        Ok(Applied { done, intent })
    }

    /// Undoes an applied plan (when a later step of the caller's change failed).
    pub fn rollback(&mut self, applied: Applied) -> Result<(), DatapathError> {
        let Applied { done, intent } = applied;
        for (ep, k, old, _) in intent.iter().rev() {
            self.set_intent(*ep, *k, *old);
        }
        self.undo(done)
    }

    fn undo(&mut self, done: Vec<Write>) -> Result<(), DatapathError> {
        for w in done.into_iter().rev() {
            self.write(w.endpoint, w.key, w.old)?;
        }
        Ok(())
    }

    fn set_intent(&mut self, ep: u32, k: PolicyKey, v: Option<PolicyEntry>) {
        let m = self.intent.entry(ep).or_default();
        match v {
            Some(v) => {
                m.insert(k, v);
            }
            None => {
                m.remove(&k);
            }
        }
        if m.is_empty() {
            self.intent.remove(&ep);
        }
    }

    /// One kernel write, mirrored.
    fn write(&mut self, ep: u32, k: PolicyKey, v: Option<Installed>) -> Result<(), DatapathError> {
        match v {
            Some(v) => {
                let flags = if v.demoted { FLAG_DEMOTED } else { 0 };
                self.trie
                    .insert(&to_lpm(&k, ep), to_raw(v.value, flags), 0)
                    .map_err(|e| DatapathError::map(NAME, "insert", e))?;
                self.installed.entry(ep).or_default().insert(k, v);
            }
            None => {
                remove(&mut self.trie, &to_lpm(&k, ep))?;
                if let Some(m) = self.installed.get_mut(&ep) {
                    m.remove(&k);
                    if m.is_empty() {
                        self.installed.remove(&ep);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds or updates entries of an endpoint (an existing key takes the new value).
    pub fn upsert_policy(
        &mut self,
        endpoint_id: u32,
        entries: &[(PolicyKey, PolicyEntry)],
    ) -> Result<(), DatapathError> {
        let mut intent = self.intent.get(&endpoint_id).cloned().unwrap_or_default();
        for (k, v) in intent_of(entries)? {
            intent.insert(k, v);
        }
        self.apply(endpoint_id, intent)
    }

    /// Removes keys of an endpoint (keys not present are ignored).
    pub fn delete_policy(
        &mut self,
        endpoint_id: u32,
        keys: &[PolicyKey],
    ) -> Result<(), DatapathError> {
        let mut intent = self.intent.get(&endpoint_id).cloned().unwrap_or_default();
        for k in keys {
            intent.remove(k);
        }
        self.apply(endpoint_id, intent)
    }

    /// Makes `entries` the endpoint's whole policy.
    ///
    /// Writes happen in an order that never allows what the new policy denies and never
    /// briefly allows what neither the old nor the new policy allows: (1) new or changed
    /// denies, (2) new or changed allows, (3) delete stale allows, (4) delete stale denies.
    /// During (2)-(3) traffic the old policy allowed may still pass for the few microseconds
    /// until its entry is deleted; the reverse order (deleting first) would instead drop traffic
    /// both policies allow.
    pub fn replace_policy(
        &mut self,
        endpoint_id: u32,
        entries: &[(PolicyKey, PolicyEntry)],
    ) -> Result<(), DatapathError> {
        let intent = intent_of(entries)?;
        self.apply(endpoint_id, intent)
    }

    /// Removes every entry of an endpoint.
    pub fn clear_endpoint(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.apply(endpoint_id, BTreeMap::new())
    }

    /// The entries the kernel holds for an endpoint (after deny precedence).
    pub fn installed(&self, endpoint_id: u32) -> Vec<(PolicyKey, PolicyEntry)> {
        self.installed
            .get(&endpoint_id)
            .map(|m| m.iter().map(|(k, i)| (*k, i.value)).collect())
            .unwrap_or_default()
    }

    /// Endpoint ids that have at least one installed entry.
    pub fn endpoints(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .installed
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(ep, _)| *ep)
            .collect();
        v.sort_unstable();
        v
    }

    /// The kernel's longest-prefix match for one identity, as the datapath would see it.
    pub fn lookup(
        &self,
        endpoint_id: u32,
        remote_identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Result<Option<PolicyEntry>, DatapathError> {
        let key = aya::maps::lpm_trie::Key::new(
            96,
            PolicyKeyData {
                endpoint_id,
                remote_identity,
                direction: direction.as_u8(),
                protocol,
                dport_be: port.to_be_bytes(),
            },
        );
        match self.trie.get(&key, 0) {
            Ok(raw) => Ok(Some(from_raw(raw))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(NAME, "lookup", e)),
        }
    }

    fn apply(
        &mut self,
        endpoint_id: u32,
        intent: BTreeMap<PolicyKey, PolicyEntry>,
    ) -> Result<(), DatapathError> {
        let target = normalize_installed(&intent);
        let installed = self.installed.entry(endpoint_id).or_default();
        let trie = &mut self.trie;

        for want_deny in [true, false] {
            for (k, v) in target.iter().filter(|(_, v)| v.value.deny == want_deny) {
                if installed.get(k) == Some(v) {
                    continue;
                }
                let flags = if v.demoted { FLAG_DEMOTED } else { 0 };
                trie.insert(&to_lpm(k, endpoint_id), to_raw(v.value, flags), 0)
                    .map_err(|e| DatapathError::map(NAME, "insert", e))?;
                installed.insert(*k, *v);
            }
        }
        for stale_deny in [false, true] {
            let stale: Vec<PolicyKey> = installed
                .iter()
                .filter(|(k, v)| v.value.deny == stale_deny && !target.contains_key(k))
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                remove(trie, &to_lpm(&k, endpoint_id))?;
                installed.remove(&k);
            }
        }

        if installed.is_empty() {
            self.installed.remove(&endpoint_id);
        }
        if intent.is_empty() {
            self.intent.remove(&endpoint_id);
        } else {
            self.intent.insert(endpoint_id, intent);
        }
        Ok(())
    }
}

/// [`PolicyMap::plan`] over the mirrors `intents` and `installs`.
fn plan_from(
    intents: &HashMap<u32, BTreeMap<PolicyKey, PolicyEntry>>,
    installs: &HashMap<u32, BTreeMap<PolicyKey, Installed>>,
    changes: impl IntoIterator<Item = (u32, PolicyKey, Option<PolicyEntry>)>,
) -> PolicyPlan {
    let mut by_group: BTreeMap<(u32, u32, Direction), BTreeMap<PolicyKey, Option<PolicyEntry>>> =
        BTreeMap::new();
    for (ep, key, value) in changes {
        by_group
            .entry((ep, key.identity, key.direction))
            .or_default()
            .insert(key, value);
    }
    let empty_intent = BTreeMap::new();
    let empty_installed = BTreeMap::new();
    let mut plan = PolicyPlan::default();
    for ((ep, identity, direction), changes) in by_group {
        let intent = intents.get(&ep).unwrap_or(&empty_intent);
        let installed = installs.get(&ep).unwrap_or(&empty_installed);
        let range = group_range(identity, direction);
        let mut group: BTreeMap<PolicyKey, PolicyEntry> =
            intent.range(range.clone()).map(|(k, v)| (*k, *v)).collect();
        for (k, v) in changes {
            let old = intent.get(&k).copied();
            if old != v {
                plan.intent.push((ep, k, old, v));
            }
            match v {
                Some(v) => group.insert(k, v),
                None => group.remove(&k),
            };
        }
        let target = normalize_installed(&group);
        for (k, v) in &target {
            let old = installed.get(k).copied();
            if old != Some(*v) {
                plan.writes.push(Write {
                    endpoint: ep,
                    key: *k,
                    old,
                    new: Some(*v),
                });
            }
        }
        for (k, old) in installed.range(range) {
            if !target.contains_key(k) {
                plan.writes.push(Write {
                    endpoint: ep,
                    key: *k,
                    old: Some(*old),
                    new: None,
                });
            }
        }
    }
    plan
}

/// A plan's writes in the fail-closed order: new or changed denies, stale allows removed,
/// new or changed allows, stale denies removed (stable within each phase). Stale allows go
/// before new allows because a stale allow more specific than a new deny would win the
/// kernel's longest-prefix lookup; the price is that traffic both policies allow through
/// different keys drops between the two phases.
fn ordered(mut writes: Vec<Write>) -> Vec<Write> {
    let phase = |w: &Write| match (w.old, w.new) {
        (_, Some(n)) if n.value.deny => 0,
        (Some(o), None) if !o.value.deny => 1,
        (_, Some(_)) => 2,
        _ => 3,
    };
    writes.sort_by_key(phase);
    writes
}

/// Every key of one (identity, direction) group, in key order.
fn group_range(identity: u32, direction: Direction) -> std::ops::RangeInclusive<PolicyKey> {
    let key = |protocol, port, port_prefix_len| PolicyKey {
        identity,
        direction,
        protocol,
        port,
        port_prefix_len,
    };
    key(0, 0, 0)..=key(u8::MAX, u16::MAX, u8::MAX)
}

fn remove(
    trie: &mut LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    key: &aya::maps::lpm_trie::Key<PolicyKeyData>,
) -> Result<(), DatapathError> {
    match trie.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(DatapathError::map(NAME, "delete", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::{Installed, ordered, plan_from};
    use crate::codes::{Direction, PROTO_TCP};
    use crate::policy::{PolicyEntry, PolicyKey, decide, intent_of, normalize_installed};

    fn arb_entry() -> impl Strategy<Value = (PolicyKey, PolicyEntry)> {
        (
            0u32..3,
            prop_oneof![Just(0u8), Just(PROTO_TCP)],
            prop_oneof![Just(0u8), Just(14u8), Just(16u8)],
            0u16..8,
            any::<bool>(),
            0u32..3,
        )
            .prop_map(|(remote, protocol, len, port, deny, cookie)| {
                let len = if protocol == 0 { 0 } else { len };
                let port = if len == 0 {
                    0
                } else {
                    (8000 + port) & (u16::MAX << (16 - len))
                };
                (
                    PolicyKey {
                        identity: remote,
                        direction: Direction::Ingress,
                        protocol,
                        port,
                        port_prefix_len: len,
                    },
                    PolicyEntry {
                        deny,
                        l7_redirect: false,
                        auth_required: false,
                        rule_cookie: cookie,
                    },
                )
            })
    }

    fn verdicts(map: &BTreeMap<PolicyKey, PolicyEntry>) -> Vec<u32> {
        let mut out = Vec::new();
        for identity in 0..3 {
            for protocol in [PROTO_TCP, 17] {
                for port in [8000u16, 8001, 8004, 8007, 9000] {
                    let d = decide(
                        map,
                        identity,
                        Direction::Ingress,
                        protocol,
                        port,
                        true,
                        true,
                    );
                    out.push(d.drop_reason);
                }
            }
        }
        out
    }

    proptest! {
        /// Writing a plan key by key in its order never lets a flow through that both the old
        /// and the new policy drop, lets nothing the new policy denies explicitly through once
        /// the denies and stale-allow removals are written, and ends at the new policy.
        #[test]
        fn every_step_of_a_plan_fails_closed(
            old in prop::collection::vec(arb_entry(), 0..8),
            new in prop::collection::vec(arb_entry(), 0..8),
        ) {
            let old = intent_of(&old).expect("valid");
            let new = intent_of(&new).expect("valid");
            let installed: BTreeMap<PolicyKey, Installed> = normalize_installed(&old);
            let intents = HashMap::from([(1u32, old.clone())]);
            let installs = HashMap::from([(1u32, installed.clone())]);
            let changes = old
                .keys()
                .filter(|k| !new.contains_key(k))
                .map(|k| (1u32, *k, None))
                .chain(new.iter().map(|(k, v)| (1u32, *k, Some(*v))));
            let plan = plan_from(&intents, &installs, changes);
            let value = |m: &BTreeMap<PolicyKey, Installed>| -> BTreeMap<PolicyKey, PolicyEntry> {
                m.iter().map(|(k, i)| (*k, i.value)).collect()
            };
            let before = verdicts(&value(&installed));
            let after = verdicts(&value(&normalize_installed(&new)));
            let mut state = installed;
            let writes = ordered(plan.writes);
            // Writes of the first two phases: new or changed denies, stale allows removed.
            let closing = writes
                .iter()
                .filter(|w| {
                    w.new.is_some_and(|n| n.value.deny)
                        || (w.new.is_none() && w.old.is_some_and(|o| !o.value.deny))
                })
                .count();
            for (i, w) in writes.iter().enumerate() {
                match w.new {
                    Some(v) => state.insert(w.key, v),
                    None => state.remove(&w.key),
                };
                let now = verdicts(&value(&state));
                for (j, v) in now.iter().enumerate() {
                    if before[j] != 0 && after[j] != 0 {
                        prop_assert_ne!(*v, 0, "flow {} allowed after write {}", j, i);
                    }
                    if i + 1 >= closing && after[j] == 181 {
                        prop_assert_ne!(*v, 0, "flow {} allowed after the closing phases", j);
                    }
                }
            }
            prop_assert_eq!(state, normalize_installed(&new));
        }
    }
}
