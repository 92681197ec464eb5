//! IPCache sync: each node publishes its endpoints' IP → (identity, its underlay IP) at
//! `ipcache/<ip>` under its lease, and watches everyone's; entries of other nodes come out as a
//! stream of upserts and deletes for the datapath.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sigil_identity::NumericIdentity;

use crate::error::KvError;
use crate::keys::validate_name;
use crate::store::KvStore;
use crate::watch::{RawEvent, Watch};

/// One remote endpoint: its IP, identity and the node hosting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpCacheEntry {
    /// The endpoint's IP.
    pub ip: IpAddr,
    /// Its numeric identity.
    pub identity: NumericIdentity,
    /// The hosting node's underlay IP (tunnel endpoint).
    pub host_ip: IpAddr,
    /// The hosting node's name.
    pub node: String,
}

/// A change of another node's IPCache entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpCacheEvent {
    /// A remote endpoint appeared or changed.
    Upsert(IpCacheEntry),
    /// A remote endpoint's entry went away (withdrawn, lease expired, or replaced by this node's).
    Delete(IpAddr),
    /// Everything before this was the full set.
    Synced,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    identity: u32,
    host_ip: IpAddr,
    node: String,
}

/// Whether `id` may stand for an endpoint on the wire: a cluster identity (256..=65535 under any
/// cluster ID) or the reserved health / ingress identities. Never unknown, host, world, init,
/// remote-node, kube-apiserver (a node must not claim those for an IP) nor a node-local CIDR
/// identity.
fn endpoint_identity(id: NumericIdentity) -> bool {
    let v = id.get();
    if v & NumericIdentity::LOCAL_CIDR_FLAG != 0 || v >> 24 != 0 {
        return false;
    }
    (v & 0xffff) >= NumericIdentity::MIN_CLUSTER_LOCAL
        || id == NumericIdentity::HEALTH
        || id == NumericIdentity::INGRESS
}

fn parse_entry(prefix: &str, key: &str, value: &[u8]) -> Result<IpCacheEntry, KvError> {
    let corrupt = |reason: String| KvError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let ip: IpAddr = key
        .strip_prefix(prefix)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("not an IP address".into()))?;
    let w: Wire =
        serde_json::from_slice(value).map_err(|e| corrupt(format!("not an IPCache entry: {e}")))?;
    let identity = NumericIdentity::new(w.identity);
    if !endpoint_identity(identity) {
        return Err(corrupt(format!(
            "identity {} may not be published for an endpoint",
            w.identity
        )));
    }
    validate_name("ipcache.node", &w.node).map_err(|e| corrupt(e.to_string()))?;
    if w.host_ip.is_unspecified() || w.host_ip.is_multicast() {
        return Err(corrupt(format!(
            "host_ip {} is not a unicast address",
            w.host_ip
        )));
    }
    Ok(IpCacheEntry {
        ip,
        identity,
        host_ip: w.host_ip,
        node: w.node,
    })
}

impl KvStore {
    /// Publishes one of this node's endpoints under the node's lease.
    pub async fn publish_endpoint(
        &self,
        ip: IpAddr,
        identity: NumericIdentity,
    ) -> Result<(), KvError> {
        if !endpoint_identity(identity) {
            return Err(KvError::invalid(
                "identity",
                identity.get(),
                "not a cluster identity (256..=65535 above a cluster ID) nor health/ingress",
            ));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(KvError::invalid("ip", ip, "must be a unicast address"));
        }
        let cfg = &self.inner.cfg;
        let w = Wire {
            identity: identity.get(),
            host_ip: cfg.node_ip,
            node: cfg.node_name.clone(),
        };
        let value = serde_json::to_vec(&w).map_err(|e| KvError::invalid("ip", ip, e))?;
        let key = format!("{}{ip}", self.inner.keys.ipcache_prefix());
        self.inner.put_owned(key, value).await
    }

    /// Withdraws one of this node's endpoints (no-op if this node did not publish it, or
    /// another node has published the IP since).
    pub async fn withdraw_endpoint(&self, ip: IpAddr) -> Result<(), KvError> {
        let key = format!("{}{ip}", self.inner.keys.ipcache_prefix());
        self.inner.delete_owned(&key).await
    }

    /// A stream of other nodes' IPCache entries: the full set, `Synced`, then changes.
    /// Entries of this node are left out; invalid entries are ignored with a warning (and
    /// delete what the key held before).
    pub fn watch_ipcache(&self) -> Watch<IpCacheEvent> {
        let prefix: Arc<str> = self.inner.keys.ipcache_prefix().into();
        let me = self.inner.cfg.node_name.clone();
        let p = Arc::clone(&prefix);
        crate::watch::spawn(
            Arc::downgrade(&self.inner),
            prefix.to_string(),
            move |ev| match ev {
                RawEvent::Put { key, value } => match parse_entry(&p, &key, &value) {
                    Ok(e) if e.node == me => Some(IpCacheEvent::Delete(e.ip)),
                    Ok(e) => Some(IpCacheEvent::Upsert(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring IPCache entry");
                        key.strip_prefix(&*p)
                            .and_then(|s| s.parse().ok())
                            .map(IpCacheEvent::Delete)
                    }
                },
                RawEvent::Delete { key, prev } => {
                    let ours = parse_entry(&p, &key, &prev).is_ok_and(|e| e.node == me);
                    if ours {
                        return None;
                    }
                    key.strip_prefix(&*p)
                        .and_then(|s| s.parse().ok())
                        .map(IpCacheEvent::Delete)
                }
                RawEvent::Synced => Some(IpCacheEvent::Synced),
            },
        )
    }
}
