//! The daemon's kernel writes: engine deltas planned over every affected endpoint and written
//! in the fail-closed order with enforcement flags and IPCache changes, undone on failure.

use std::collections::BTreeMap;

use sigil_datapath::{EndpointConfig, PolicyPlan, lpm_keys};
use sigil_policy::{Direction, IpPrefix, PolicyDeltas, PolicyEngine, PolicyEntry, PolicyKey};

use super::Daemon;
use crate::error::NetdError;
use crate::state::{EndpointRecord, nid};
use crate::txn::CidrList;

impl Daemon {
    /// Applies engine deltas of an endpoint change (the engine already holds the change) to
    /// the other endpoints' maps, key by key; `skip` is an identity whose endpoint was just
    /// installed whole.
    pub(super) fn apply_deltas(
        &mut self,
        deltas: &[PolicyDeltas],
        skip: Option<u32>,
    ) -> Result<usize, NetdError> {
        let (plan, flags, n) = self.plan_deltas(&self.engine, deltas, skip)?;
        self.write_kernel(plan, &flags, &[], &[])?;
        Ok(n)
    }

    /// The kernel writes of engine deltas (`engine` is the engine after them): one plan over
    /// every endpoint holding a changed identity, checked against the map's free entries, and
    /// each endpoint's enforcement flags. Returns them with the number of endpoints.
    pub(super) fn plan_deltas(
        &self,
        engine: &PolicyEngine,
        deltas: &[PolicyDeltas],
        skip: Option<u32>,
    ) -> Result<(PolicyPlan, Vec<Flags>, usize), NetdError> {
        // Fold the deltas: per endpoint identity, each key's final value.
        let mut wanted: BTreeMap<u32, BTreeMap<PolicyKey, Option<PolicyEntry>>> = BTreeMap::new();
        for d in deltas {
            for e in &d.endpoints {
                let m = wanted.entry(e.endpoint.get()).or_default();
                for ch in e.changes.iter() {
                    m.insert(ch.key, ch.new);
                }
            }
        }
        if let Some(id) = skip {
            wanted.remove(&id);
        }
        let targets: Vec<&EndpointRecord> = self
            .state
            .endpoints
            .values()
            // A pending endpoint keeps its drop-all map whatever policies say of init.
            .filter(|r| wanted.contains_key(&r.identity) && !r.is_pending())
            .collect();
        let mut changes = Vec::new();
        for rec in &targets {
            for (k, v) in wanted.get(&rec.identity).into_iter().flatten() {
                for key in lpm_keys(k)? {
                    changes.push((rec.endpoint_id, key, *v));
                }
            }
        }
        let maps = self.datapath.maps();
        let plan = maps.policy.plan(changes);
        maps.policy.check(&plan)?;
        let mut flags = Vec::new();
        for rec in &targets {
            let Some(old) = maps.endpoints.get(rec.endpoint_id)? else {
                continue;
            };
            let (ingress, egress) = enforcement_of(engine, rec.identity);
            flags.push(Flags {
                endpoint_id: rec.endpoint_id,
                old,
                ingress,
                egress,
            });
        }
        Ok((plan, flags, targets.len()))
    }

    /// Writes a plan with its flags and IPCache changes; on error the kernel is as before.
    /// Enforcement is tightened before the policy writes and relaxed after them.
    pub(super) fn write_kernel(
        &mut self,
        plan: PolicyPlan,
        flags: &[Flags],
        removed: &[(IpPrefix, u32)],
        added: &[(IpPrefix, u32)],
    ) -> Result<(), NetdError> {
        let mut undo = Undo::default();
        if let Err(e) = self.write_undoable(plan, flags, removed, added, &mut undo) {
            if let Err(r) = self.undo(undo) {
                tracing::error!(error = %r, "undoing a failed policy change");
            }
            return Err(e);
        }
        let eps = &mut self.datapath.maps_mut().endpoints;
        for f in flags {
            let cfg = EndpointConfig {
                ingress_enforced: f.ingress,
                egress_enforced: f.egress,
                ..f.old
            };
            // A relaxation that fails leaves the endpoint stricter: fail closed.
            if let Err(e) = eps.set(f.endpoint_id, cfg) {
                tracing::warn!(endpoint_id = f.endpoint_id, error = %e, "relaxing enforcement flags");
            }
        }
        Ok(())
    }

    fn write_undoable(
        &mut self,
        plan: PolicyPlan,
        flags: &[Flags],
        removed: &[(IpPrefix, u32)],
        added: &[(IpPrefix, u32)],
        undo: &mut Undo,
    ) -> Result<(), NetdError> {
        let maps = self.datapath.maps_mut();
        for f in flags {
            let cfg = EndpointConfig {
                ingress_enforced: f.ingress || f.old.ingress_enforced,
                egress_enforced: f.egress || f.old.egress_enforced,
                ..f.old
            };
            if cfg != f.old {
                maps.endpoints.set(f.endpoint_id, cfg)?;
                undo.flags.push((f.endpoint_id, f.old));
            }
        }
        for (p, id) in removed {
            maps.ipcache.remove(p.addr(), p.prefix_len())?;
            undo.ipcache_removed.push((*p, *id));
        }
        undo.applied = Some(maps.policy.apply_plan(plan)?);
        for (p, id) in added {
            maps.ipcache.upsert(p.addr(), p.prefix_len(), *id)?;
            undo.ipcache_added.push(*p);
        }
        Ok(())
    }

    fn undo(&mut self, undo: Undo) -> Result<(), NetdError> {
        let maps = self.datapath.maps_mut();
        for p in undo.ipcache_added.iter().rev() {
            maps.ipcache.remove(p.addr(), p.prefix_len())?;
        }
        if let Some(a) = undo.applied {
            maps.policy.rollback(a)?;
        }
        for (p, id) in undo.ipcache_removed.iter().rev() {
            maps.ipcache.upsert(p.addr(), p.prefix_len(), *id)?;
        }
        for (ep, old) in undo.flags.iter().rev() {
            maps.endpoints.set(*ep, *old)?;
        }
        Ok(())
    }

    /// Makes the kernel's map and config of one endpoint the engine's; the config carries the
    /// endpoint's addresses, the only sources the datapath lets its packets have.
    pub(super) fn install_endpoint(&mut self, rec: &EndpointRecord) -> Result<(), NetdError> {
        let (endpoint_id, identity) = (rec.endpoint_id, rec.identity);
        // A pending endpoint: no entry and both directions enforced, so every packet it sends
        // or receives is dropped, whatever policies allow (to init, to all).
        let map = if rec.is_pending() {
            Default::default()
        } else {
            self.engine.policy_map(nid(identity)).unwrap_or_default()
        };
        let (ingress, egress) = if rec.is_pending() {
            (true, true)
        } else {
            enforcement(&map)
        };
        let maps = self.datapath.maps_mut();
        let old = maps.endpoints.get(endpoint_id)?;
        let (old_in, old_eg) =
            old.map_or((true, true), |c| (c.ingress_enforced, c.egress_enforced));
        maps.endpoints.set(
            endpoint_id,
            EndpointConfig {
                identity,
                ingress_enforced: ingress || old_in,
                egress_enforced: egress || old_eg,
                ipv4: Some(rec.ipv4),
                ipv6: Some(rec.ipv6),
            },
        )?;
        maps.policy.replace_policy(endpoint_id, &map)?;
        maps.endpoints.set(
            endpoint_id,
            EndpointConfig {
                identity,
                ingress_enforced: ingress,
                egress_enforced: egress,
                ipv4: Some(rec.ipv4),
                ipv6: Some(rec.ipv6),
            },
        )?;
        Ok(())
    }
}

/// Whether each direction of an endpoint identity's map is in default deny (see
/// [`enforcement`]).
fn enforcement_of(engine: &PolicyEngine, identity: u32) -> (bool, bool) {
    let open = |direction| {
        let key = PolicyKey {
            identity: 0,
            direction,
            protocol: 0,
            port: 0,
            port_prefix_len: 0,
        };
        engine
            .map_entry(nid(identity), &key)
            .is_some_and(|e| !e.deny)
    };
    (!open(Direction::Ingress), !open(Direction::Egress))
}

/// Whether each direction (ingress, egress) is in default deny.
///
/// The engine does not report enforcement separately: a direction that is not in default deny
/// gets an allow entry for every identity, protocol and port (identity 0, protocol 0), and an
/// engine lookup that matches nothing denies. So a direction is enforced exactly when that
/// entry is absent; with it present the datapath flag makes no difference (every packet
/// matches the entry) but reports the engine's intent.
fn enforcement(map: &[(PolicyKey, PolicyEntry)]) -> (bool, bool) {
    let open = |d: Direction| {
        map.iter()
            .any(|(k, e)| k.direction == d && k.identity == 0 && k.protocol == 0 && !e.deny)
    };
    (!open(Direction::Ingress), !open(Direction::Egress))
}

/// An endpoint's enforcement flags before a change and after it.
pub(super) struct Flags {
    endpoint_id: u32,
    old: EndpointConfig,
    ingress: bool,
    egress: bool,
}

/// What a failed policy change undoes, newest first.
#[derive(Default)]
struct Undo {
    flags: Vec<(u32, EndpointConfig)>,
    ipcache_removed: CidrList,
    applied: Option<sigil_datapath::Applied>,
    ipcache_added: Vec<IpPrefix>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: u32, direction: Direction, protocol: u8, port: u16, len: u8) -> PolicyKey {
        PolicyKey {
            identity,
            direction,
            protocol,
            port,
            port_prefix_len: len,
        }
    }

    #[test]
    fn a_wildcard_allow_means_not_enforced() {
        let allow = PolicyEntry::default();
        let deny = PolicyEntry {
            deny: true,
            ..allow
        };
        let map = vec![
            (key(0, Direction::Ingress, 0, 0, 0), allow),
            (key(0, Direction::Egress, 0, 0, 0), deny),
            (key(256, Direction::Egress, 6, 80, 16), allow),
        ];
        assert_eq!(enforcement(&map), (false, true));
        assert_eq!(enforcement(&[]), (true, true));
    }
}
