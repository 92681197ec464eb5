//! A policy change as a transaction: compiled on a copy of the engine away from the daemon's
//! writer (so status and reads are not held up), then applied to the kernel whole or not at
//! all by [`crate::Daemon::commit_policy`], which swaps the copy in only when the kernel took
//! every write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sigil_identity::Allocator;
use sigil_policy::{Document, IpPrefix, PeerSelector, Peers, PolicyDeltas, PolicyEngine, PolicyId};

use crate::error::NetdError;
use crate::state::{cidr_labels, nid};

/// (prefix, identity) pairs.
pub(crate) type CidrList = Vec<(IpPrefix, u32)>;

/// What a policy change does.
#[derive(Debug, Clone)]
pub enum PolicyOp {
    /// An API import of parsed documents and the (origin, YAML) files they came from.
    Import {
        /// The documents.
        docs: Vec<Document>,
        /// Their files.
        files: Vec<(String, String)>,
    },
    /// Deletes one policy.
    Delete(PolicyId),
    /// The watched directory as a whole: its policies replace the ones it gave before.
    Dir {
        /// The documents.
        docs: Vec<Document>,
        /// Its files.
        files: Vec<(String, String)>,
    },
}

/// A change ready to compile: the operation and copies of what it changes.
pub struct PolicyJob {
    pub(crate) generation: u64,
    pub(crate) op: PolicyOp,
    pub(crate) engine: PolicyEngine,
    pub(crate) cidr_identities: BTreeMap<String, u32>,
    /// Policies the directory gave before (deleted by a `Dir` change that no longer has them).
    pub(crate) dir_ids: BTreeSet<PolicyId>,
    pub(crate) alloc: Arc<crate::identities::Identities>,
}

/// A compiled change: the new engine and the deltas from the current one. Not yet in the
/// kernel; dropped without a commit (aborted, stale, or its caller gone), it gives back the
/// identities it allocated.
pub struct Compiled {
    pub(crate) generation: u64,
    pub(crate) op: PolicyOp,
    pub(crate) engine: PolicyEngine,
    pub(crate) cidr_identities: BTreeMap<String, u32>,
    pub(crate) deltas: Vec<PolicyDeltas>,
    /// CIDR identities allocated for prefixes named now.
    pub(crate) added: Allocated,
    /// CIDR identities of prefixes no longer named (released on commit).
    pub(crate) removed: CidrList,
}

impl PolicyJob {
    /// Compiles the change on the copy of the engine (CPU-bound; run it on a blocking worker).
    pub fn compile(self) -> Result<Compiled, NetdError> {
        let PolicyJob {
            generation,
            op,
            mut engine,
            mut cidr_identities,
            dir_ids,
            alloc,
        } = self;
        let mut deltas = Vec::new();
        match &op {
            PolicyOp::Import { docs, .. } => deltas.push(engine.upsert_policies(docs.clone())),
            PolicyOp::Delete(id) => deltas.push(engine.delete_policy(id)),
            PolicyOp::Dir { docs, .. } => {
                let new_ids: BTreeSet<&PolicyId> = docs.iter().map(|d| &d.id).collect();
                deltas.push(engine.upsert_policies(docs.clone()));
                for id in dir_ids.iter().filter(|id| !new_ids.contains(id)) {
                    deltas.push(engine.delete_policy(id));
                }
            }
        }
        let (added, removed) = sync_cidrs(&mut engine, &alloc, &mut cidr_identities, &mut deltas)?;
        Ok(Compiled {
            generation,
            op,
            engine,
            cidr_identities,
            deltas,
            added: Allocated { list: added, alloc },
            removed,
        })
    }
}

impl Compiled {
    /// Gives back the CIDR identities this change allocated (it will not be committed).
    pub fn abort(self) {
        drop(self);
    }

    /// Gives back the identities (see [`Compiled::abort`]) and returns the operation.
    pub fn into_op(self) -> PolicyOp {
        self.op
    }
}

/// CIDR identities a change allocated: given back when dropped, unless the change committed
/// ([`Allocated::keep`]).
pub struct Allocated {
    list: CidrList,
    alloc: Arc<crate::identities::Identities>,
}

impl Allocated {
    /// The (prefix, identity) pairs.
    pub(crate) fn list(&self) -> &CidrList {
        &self.list
    }

    /// Keeps the identities (the change committed).
    pub(crate) fn keep(mut self) {
        self.list.clear();
    }
}

impl Drop for Allocated {
    fn drop(&mut self) {
        release_added(&self.alloc, &self.list);
    }
}

fn release_added(alloc: &crate::identities::Identities, added: &CidrList) {
    for (p, id) in added {
        if let Err(e) = alloc.release(nid(*id)) {
            tracing::warn!(prefix = %p, identity = id, error = %e, "releasing an unused CIDR identity");
        }
    }
}

/// Allocates identities for CIDR prefixes the engine's policies name now and tells the
/// engine; the engine forgets those of prefixes no longer named. Returns (added, removed);
/// on error the identities allocated so far are given back.
pub(crate) fn sync_cidrs(
    engine: &mut PolicyEngine,
    alloc: &crate::identities::Identities,
    cidr_identities: &mut BTreeMap<String, u32>,
    deltas: &mut Vec<PolicyDeltas>,
) -> Result<(CidrList, CidrList), NetdError> {
    let named = named_cidrs(engine.documents());
    let mut added = Vec::new();
    let mut new_ids = Vec::new();
    for p in &named {
        let key = p.to_string();
        if cidr_identities.contains_key(&key) {
            continue;
        }
        let allocated = cidr_labels(p).and_then(|labels| {
            let (id, fresh) = alloc.allocate(&labels)?;
            Ok((id, fresh, labels))
        });
        let (id, fresh, labels) = match allocated {
            Ok(a) => a,
            Err(e) => {
                release_added(alloc, &added);
                return Err(e);
            }
        };
        if fresh {
            new_ids.push((id, labels));
        }
        cidr_identities.insert(key, id.get());
        added.push((*p, id.get()));
    }
    // One batch: the selector cache and the maps are updated once for all new prefixes.
    deltas.push(engine.add_identities(new_ids));
    let mut removed = Vec::new();
    let names: BTreeSet<String> = named.iter().map(ToString::to_string).collect();
    let stale: Vec<(String, u32)> = cidr_identities
        .iter()
        .filter(|(k, _)| !names.contains(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    for (key, id) in stale {
        cidr_identities.remove(&key);
        deltas.push(engine.remove_identity(nid(id)));
        if let Ok(p) = key.parse::<IpPrefix>() {
            removed.push((p, id));
        }
    }
    Ok((added, removed))
}

/// CIDR prefixes (and their exceptions) that policies name; `/0` is the world identity.
fn named_cidrs<'a>(docs: impl Iterator<Item = &'a Document>) -> BTreeSet<IpPrefix> {
    let mut out = BTreeSet::new();
    for d in docs {
        for r in &d.rules {
            for e in &r.entries {
                if let Peers::Only(sels) = &e.peers {
                    for s in sels {
                        if let PeerSelector::Cidr(c) = s {
                            out.extend(
                                std::iter::once(c.cidr)
                                    .chain(c.except.iter().copied())
                                    .filter(|p| !p.is_default()),
                            );
                        }
                    }
                }
            }
        }
    }
    out
}
