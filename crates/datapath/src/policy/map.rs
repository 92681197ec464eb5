//! The kernel policy trie of all endpoints, with a mirror of what is installed so that updates
//! are computed as ordered diffs.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, lpm_trie::LpmTrie};

use super::{
    FLAG_DEMOTED, Installed, PolicyEntry, PolicyKey, PolicyValue, intent_of, normalize_installed,
};
use crate::abi::{PolicyKeyData, PolicyValueRaw};
use crate::error::DatapathError;
use crate::maps::is_not_found;

const NAME: &str = "sigil_policy";

/// The `sigil_policy` LPM trie shared by all endpoints.
///
/// It assumes it is the only writer (the daemon): it mirrors the installed entries and diffs
/// against the mirror. Opening it scans the trie once, so a restarted daemon diffs against what
/// the kernel really holds. Allows that were demoted to denies (see [`super::normalize`]) are
/// not restored into the intent on adoption: reconcile with [`PolicyMap::replace_policy`].
pub struct PolicyMap {
    trie: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    intent: HashMap<u32, BTreeMap<PolicyKey, PolicyValue>>,
    installed: HashMap<u32, BTreeMap<PolicyKey, Installed>>,
}

impl PolicyMap {
    pub(crate) fn new(
        trie: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    ) -> Result<Self, DatapathError> {
        let mut installed: HashMap<u32, BTreeMap<PolicyKey, Installed>> = HashMap::new();
        for item in trie.iter() {
            let (key, raw) = item.map_err(|e| DatapathError::map(NAME, "scan", e))?;
            // Keys this build cannot decode were not written by it: leave them alone.
            let Some((ep, key)) = PolicyKey::from_lpm(&key) else {
                continue;
            };
            installed.entry(ep).or_default().insert(
                key,
                Installed {
                    value: PolicyValue::from_raw(raw),
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
        Ok(Self {
            trie,
            intent,
            installed,
        })
    }

    /// Adds or updates entries of an endpoint (an existing key takes the new value).
    pub fn upsert_policy(
        &mut self,
        endpoint_id: u32,
        entries: &[PolicyEntry],
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
        entries: &[PolicyEntry],
    ) -> Result<(), DatapathError> {
        let intent = intent_of(entries)?;
        self.apply(endpoint_id, intent)
    }

    /// Removes every entry of an endpoint.
    pub fn clear_endpoint(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.apply(endpoint_id, BTreeMap::new())
    }

    /// The entries the kernel holds for an endpoint (after deny precedence).
    pub fn installed(&self, endpoint_id: u32) -> Vec<(PolicyKey, PolicyValue)> {
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
        direction: super::Direction,
        protocol: u8,
        port: u16,
    ) -> Result<Option<PolicyValue>, DatapathError> {
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
            Ok(raw) => Ok(Some(PolicyValue::from_raw(raw))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(NAME, "lookup", e)),
        }
    }

    fn apply(
        &mut self,
        endpoint_id: u32,
        intent: BTreeMap<PolicyKey, PolicyValue>,
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
                trie.insert(&k.to_lpm(endpoint_id), v.value.to_raw(flags), 0)
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
                remove(trie, &k.to_lpm(endpoint_id))?;
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
