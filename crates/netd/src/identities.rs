//! Where the daemon's identity numbers come from: the node-local allocator alone (single
//! node), or, with a kvstore, the cluster allocator in etcd for endpoint label sets (the same
//! labels get the same number on every node) and the local one for reserved and node-local
//! CIDR identities, which never leave the node.
//!
//! The reconciler is a plain thread and the cluster allocator is async: a label set new to
//! this node is allocated with a blocking round trip bounded by [`ALLOCATE_TIMEOUT`]; further
//! references are counted here without asking etcd. When etcd cannot be asked the error is
//! [`IdentityError::Unavailable`] and the caller keeps the endpoint at `init` (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sigil_identity::{Allocator, IdentityError, LocalAllocator, NumericIdentity};
use sigil_kvstore::ClusterAllocator;
use sigil_labels::{Labels, Source};

/// Bound on one blocking allocation in etcd (the writer waits this long at most).
pub const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster side: the allocator and the runtime its futures run on.
pub struct ClusterIds {
    alloc: Arc<ClusterAllocator>,
    rt: tokio::runtime::Handle,
    /// This node's references: number → (labels, count).
    held: Mutex<HashMap<u32, (Labels, u64)>>,
}

impl ClusterIds {
    /// Wraps `alloc`, running its calls on `rt`.
    pub fn new(alloc: Arc<ClusterAllocator>, rt: tokio::runtime::Handle) -> Self {
        ClusterIds {
            alloc,
            rt,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<u32, (Labels, u64)>> {
        // Each update is one insert/remove/increment: a poisoned map is still consistent.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The daemon's allocator; see the module documentation.
pub struct Identities {
    local: LocalAllocator,
    cluster: Option<ClusterIds>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("cluster", &self.cluster.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether `labels` get a node-local number: reserved sets and `cidr:` sets (with or without
/// `reserved:world`).
fn node_local(labels: &Labels) -> bool {
    labels
        .iter()
        .all(|l| matches!(l.source, Source::Cidr | Source::Reserved))
}

impl Identities {
    /// A single-node allocator.
    pub fn local(grace: Duration) -> Self {
        Identities {
            local: LocalAllocator::new(0, grace),
            cluster: None,
        }
    }

    /// Endpoint identities from the cluster, CIDR identities local.
    pub fn clustered(grace: Duration, cluster: ClusterIds) -> Self {
        Identities {
            local: LocalAllocator::new(0, grace),
            cluster: Some(cluster),
        }
    }

    /// The node-local allocator (CIDR identities; everything without a cluster).
    pub fn local_allocator(&self) -> &LocalAllocator {
        &self.local
    }

    /// Whether endpoint identities come from the cluster.
    pub fn is_clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// Number of identities this node holds.
    pub fn len(&self) -> usize {
        self.local.len() + self.cluster.as_ref().map_or(0, |c| c.held().len())
    }

    /// Whether this node holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes recorded identities back after a restart: node-local ones through the local
    /// allocator (same numbers), cluster ones adopted as recorded (the kernel holds these
    /// numbers) and confirmed in etcd in the background; a number etcd now gives other labels
    /// is logged (it cannot happen while this node's references live).
    pub fn restore(&self, items: Vec<(u32, Labels)>) -> Result<(), crate::NetdError> {
        let Some(c) = &self.cluster else {
            return crate::state::restore_identities(&self.local, items);
        };
        let (local, remote): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(id, l)| node_local(l) || *id & NumericIdentity::LOCAL_CIDR_FLAG != 0);
        crate::state::restore_identities(&self.local, local)?;
        let mut confirm = Vec::new();
        {
            let mut held = c.held();
            for (id, labels) in remote {
                let e = held.entry(id).or_insert_with(|| {
                    confirm.push((id, labels.clone()));
                    (labels, 0)
                });
                e.1 += 1;
            }
        }
        let alloc = Arc::clone(&c.alloc);
        c.rt.spawn(async move {
            for (want, labels) in confirm {
                match alloc.allocate(&labels).await {
                    Ok((got, _)) if got.get() == want => {}
                    Ok((got, _)) => tracing::error!(
                        recorded = want, cluster = got.get(), labels = %labels.sorted_string(),
                        "the cluster gives these labels another number than recorded"
                    ),
                    Err(e) => tracing::warn!(
                        identity = want, error = %e,
                        "cannot confirm a restored identity in etcd; it stays as recorded"
                    ),
                }
            }
        });
        Ok(())
    }

    /// Labels of every cluster identity this node holds.
    pub fn cluster_held(&self) -> Vec<u32> {
        self.cluster
            .as_ref()
            .map(|c| c.held().keys().copied().collect())
            .unwrap_or_default()
    }
}

impl Allocator for Identities {
    fn allocate(&self, labels: &Labels) -> Result<(NumericIdentity, bool), IdentityError> {
        let Some(c) = self.cluster.as_ref().filter(|_| !node_local(labels)) else {
            return self.local.allocate(labels);
        };
        if labels.is_empty() {
            return Err(IdentityError::EmptyLabels);
        }
        if let Some((id, (_, n))) = c.held().iter_mut().find(|(_, (l, _))| l == labels) {
            *n += 1;
            return Ok((NumericIdentity::new(*id), false));
        }
        let alloc = Arc::clone(&c.alloc);
        let l = labels.clone();
        let got = c.rt.block_on(async move {
            tokio::time::timeout(ALLOCATE_TIMEOUT, alloc.allocate(&l)).await
        });
        let unavailable = |reason: String| IdentityError::Unavailable {
            labels: labels.sorted_string(),
            reason,
        };
        let (id, _) = match got {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => {
                return Err(unavailable(format!(
                    "etcd did not answer within {ALLOCATE_TIMEOUT:?}"
                )));
            }
        };
        let mut held = c.held();
        let e = held.entry(id.get()).or_insert_with(|| (labels.clone(), 0));
        e.1 += 1;
        let fresh = e.1 == 1;
        if !fresh {
            // A second reference raced in: etcd holds one per node, release the extra.
            let alloc = Arc::clone(&c.alloc);
            c.rt.spawn(async move {
                let _ = alloc.release(id).await;
            });
        }
        Ok((id, fresh))
    }

    fn release(&self, id: NumericIdentity) -> Result<bool, IdentityError> {
        let Some(c) = &self.cluster else {
            return self.local.release(id);
        };
        let mut held = c.held();
        let Some((_, n)) = held.get_mut(&id.get()) else {
            drop(held);
            return self.local.release(id);
        };
        *n -= 1;
        if *n > 0 {
            return Ok(false);
        }
        held.remove(&id.get());
        let alloc = Arc::clone(&c.alloc);
        c.rt.spawn(async move {
            if let Err(e) = alloc.release(id).await {
                tracing::warn!(identity = id.get(), error = %e, "releasing the cluster identity failed; its reference lapses with this node's lease");
            }
        });
        Ok(true)
    }

    fn lookup(&self, id: NumericIdentity) -> Option<Labels> {
        if let Some(c) = &self.cluster
            && let Some((l, _)) = c.held().get(&id.get())
        {
            return Some(l.clone());
        }
        self.local.lookup(id)
    }

    fn lookup_by_labels(&self, labels: &Labels) -> Option<NumericIdentity> {
        if let Some(c) = &self.cluster
            && let Some((id, _)) = c.held().iter().find(|(_, (l, _))| l == labels)
        {
            return Some(NumericIdentity::new(*id));
        }
        self.local.lookup_by_labels(labels)
    }

    fn list(&self) -> Vec<(NumericIdentity, Labels)> {
        let mut v = self.local.list();
        if let Some(c) = &self.cluster {
            v.extend(
                c.held()
                    .iter()
                    .map(|(id, (l, _))| (NumericIdentity::new(*id), l.clone())),
            );
        }
        v.sort_by_key(|(id, _)| id.get());
        v
    }
}
