//! The node registry: each node's entry (`nodes/<name>` → JSON) under its lease, and pod CIDRs
//! leased from a cluster range (`podcidrs/<addr>-<len>` → node name), also under the lease.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sigil_spiffe::SpiffeId;

use crate::error::KvError;
use crate::keys::validate_name;
use crate::store::{KvStore, Owned};
use crate::watch::{RawEvent, Watch};

/// An IP prefix whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// `addr/len`, checked: `len` fits the family and `addr` has no host bits set.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, KvError> {
        let text = format!("{addr}/{len}");
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if len > bits {
            return Err(KvError::invalid(
                "cidr",
                text,
                format!("prefix length over {bits}"),
            ));
        }
        if to_u128(addr) & !mask(len, bits) != 0 {
            return Err(KvError::invalid("cidr", text, "host bits are set"));
        }
        Ok(Cidr { addr, len })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a /0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        ip.is_ipv4() == self.addr.is_ipv4()
            && to_u128(ip) & mask(self.len, bits) == to_u128(self.addr)
    }

    /// The `i`-th subnet of length `len` inside this prefix.
    fn subnet(&self, len: u8, i: u128) -> Option<Cidr> {
        let bits: u8 = if self.addr.is_ipv4() { 32 } else { 128 };
        let shift = u32::from(bits - len);
        let offset = i.checked_shl(shift)?;
        let n = to_u128(self.addr).checked_add(offset)?;
        let addr = from_u128(n, self.addr.is_ipv4())?;
        Cidr::new(addr, len).ok().filter(|c| self.contains(c.addr))
    }
}

fn mask(len: u8, bits: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let all = if bits == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        all & !(all >> len)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(n: u128, v4: bool) -> Option<IpAddr> {
    if v4 {
        Some(IpAddr::V4(u32::try_from(n).ok()?.into()))
    } else {
        Some(IpAddr::V6(n.into()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| KvError::invalid("cidr", s, "expected ADDRESS/LENGTH"))?;
        let addr = a
            .parse()
            .map_err(|_| KvError::invalid("cidr", s, format!("{a:?} is not an IP address")))?;
        let len = l
            .parse()
            .map_err(|_| KvError::invalid("cidr", s, format!("{l:?} is not a prefix length")))?;
        Cidr::new(addr, len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// The node's name (also its key).
    pub name: String,
    /// Its underlay address (tunnel endpoint).
    pub ip: IpAddr,
    /// Its IPv4 pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v4: Option<Cidr>,
    /// Its IPv6 pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_v6: Option<Cidr>,
    /// Its agent's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<SpiffeId>,
    /// The SPIFFE ID of the node SVID its encrypted carrier presents (`--encryption spiffe`);
    /// peers pin exactly this ID in the carrier handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier_id: Option<SpiffeId>,
}

impl NodeInfo {
    /// Checks the fields' consistency; the error names the field and value.
    pub fn validate(&self) -> Result<(), KvError> {
        validate_name("node.name", &self.name)?;
        if self.ip.is_unspecified() || self.ip.is_multicast() {
            return Err(KvError::invalid(
                "node.ip",
                self.ip,
                "must be a unicast address",
            ));
        }
        if let Some(c) = self.pod_cidr_v4
            && !c.addr.is_ipv4()
        {
            return Err(KvError::invalid(
                "node.pod_cidr_v4",
                c,
                "not an IPv4 prefix",
            ));
        }
        if let Some(c) = self.pod_cidr_v6
            && c.addr.is_ipv4()
        {
            return Err(KvError::invalid(
                "node.pod_cidr_v6",
                c,
                "not an IPv6 prefix",
            ));
        }
        Ok(())
    }
}

/// A change of the node registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node appeared or changed.
    Upsert(NodeInfo),
    /// A node left (its lease expired or it was closed).
    Delete(String),
    /// Everything before this was the full set.
    Synced,
}

fn parse_node(prefix: &str, key: &str, value: &[u8]) -> Result<NodeInfo, KvError> {
    let corrupt = |reason: String| KvError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let info: NodeInfo =
        serde_json::from_slice(value).map_err(|e| corrupt(format!("not a node entry: {e}")))?;
    info.validate().map_err(|e| corrupt(e.to_string()))?;
    if key.strip_prefix(prefix) != Some(info.name.as_str()) {
        return Err(corrupt(format!("entry names node {:?}", info.name)));
    }
    Ok(info)
}

impl KvStore {
    /// Publishes this node's entry under its lease (again under a new lease if it is lost).
    pub async fn publish_node(&self, info: &NodeInfo) -> Result<(), KvError> {
        info.validate()?;
        if info.name != self.inner.cfg.node_name {
            return Err(KvError::invalid(
                "node.name",
                &info.name,
                format!("this store is node {:?}", self.inner.cfg.node_name),
            ));
        }
        let value =
            serde_json::to_vec(info).map_err(|e| KvError::invalid("node", &info.name, e))?;
        self.inner
            .put_owned(self.inner.keys.node(&info.name), value)
            .await
    }

    /// Registers this node's entry under its lease, refusing a name another live session holds
    /// (an etcd transaction: the key is absent or already under this node's lease). The error
    /// is [`KvError::Conflict`] naming the holder's address.
    pub async fn register_node(&self, info: &NodeInfo) -> Result<(), KvError> {
        info.validate()?;
        if info.name != self.inner.cfg.node_name {
            return Err(KvError::invalid(
                "node.name",
                &info.name,
                format!("this store is node {:?}", self.inner.cfg.node_name),
            ));
        }
        let value =
            serde_json::to_vec(info).map_err(|e| KvError::invalid("node", &info.name, e))?;
        let key = self.inner.keys.node(&info.name);
        self.claim(key, value, "node name", &info.name, |v| {
            serde_json::from_slice::<NodeInfo>(v)
                .map(|n| format!("{} at {}", n.name, n.ip))
                .unwrap_or_else(|_| String::from_utf8_lossy(v).into_owned())
        })
        .await
    }

    /// Claims `cidr` as this node's pod CIDR under its lease, refusing one that another live
    /// session holds or that overlaps another node's pod CIDR ([`KvError::Conflict`]).
    pub async fn claim_pod_cidr(&self, cidr: Cidr) -> Result<(), KvError> {
        let inner = &self.inner;
        let node = inner.cfg.node_name.clone();
        let prefix = inner.keys.podcidr_prefix();
        let mut c = inner.client.clone();
        let resp = inner
            .call(
                "get",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(other) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.rsplit_once('-'))
                .and_then(|(a, l)| Cidr::new(a.parse().ok()?, l.parse().ok()?).ok())
            else {
                continue;
            };
            let overlaps = other.contains(cidr.addr) || cidr.contains(other.addr);
            if overlaps && other != cidr && kv.value() != node.as_bytes() {
                return Err(KvError::Conflict {
                    what: "pod CIDR",
                    value: cidr.to_string(),
                    holder: format!(
                        "{} (overlapping {other})",
                        String::from_utf8_lossy(kv.value())
                    ),
                });
            }
        }
        let key = format!("{prefix}{}-{}", cidr.addr, cidr.len);
        self.claim(key, node.into_bytes(), "pod CIDR", &cidr.to_string(), |v| {
            String::from_utf8_lossy(v).into_owned()
        })
        .await
    }

    /// Writes `key` = `value` under this node's lease if the key is absent or already under
    /// that lease; otherwise a conflict naming `holder(existing value)`.
    async fn claim(
        &self,
        key: String,
        value: Vec<u8>,
        what: &'static str,
        claimed: &str,
        holder: impl Fn(&[u8]) -> String,
    ) -> Result<(), KvError> {
        let inner = &self.inner;
        let lease = inner.lease_id();
        let mut c = inner.client.clone();
        let put = || {
            TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        inner.remember(key.clone(), Owned::Plain(value.clone()));
        let mine = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([put()]);
        let res = inner.call("txn (claim)", c.txn(mine)).await;
        if let Ok(r) = &res
            && r.succeeded()
        {
            return Ok(());
        }
        let fresh = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = match res {
            Ok(_) => inner.call("txn (claim)", c.txn(fresh)).await,
            Err(e) => Err(e),
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                inner.forget(&key);
                return Err(e);
            }
        };
        if r.succeeded() {
            return Ok(());
        }
        inner.forget(&key);
        let held = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| holder(kv.value())),
                _ => None,
            })
            .unwrap_or_else(|| "another node".to_owned());
        Err(KvError::Conflict {
            what,
            value: claimed.to_owned(),
            holder: held,
        })
    }

    /// Every node entry now in etcd (invalid entries are skipped with a warning).
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, KvError> {
        let inner = &self.inner;
        let prefix = inner.keys.node_prefix();
        let mut c = inner.client.clone();
        let resp = inner
            .call(
                "get",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                parse_node(&prefix, &key, kv.value())
                    .inspect_err(|e| tracing::warn!(error = %e, "ignoring node entry"))
                    .ok()
            })
            .collect())
    }

    /// A stream of node registry changes (first the full set, then `Synced`, then changes).
    pub fn watch_nodes(&self) -> Watch<NodeEvent> {
        let prefix: Arc<str> = self.inner.keys.node_prefix().into();
        let p = Arc::clone(&prefix);
        crate::watch::spawn(
            Arc::downgrade(&self.inner),
            prefix.to_string(),
            move |ev| match ev {
                RawEvent::Put { key, value } => match parse_node(&p, &key, &value) {
                    Ok(info) => Some(NodeEvent::Upsert(info)),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring node entry");
                        key.strip_prefix(&*p)
                            .map(|n| NodeEvent::Delete(n.to_owned()))
                    }
                },
                RawEvent::Delete { key, .. } => key
                    .strip_prefix(&*p)
                    .map(|n| NodeEvent::Delete(n.to_owned())),
                RawEvent::Synced => Some(NodeEvent::Synced),
            },
        )
    }

    /// Leases a free `/prefix_len` of `cluster` for this node, race-free (create-if-absent in a
    /// transaction), bound to this node's lease; the one this node already holds if any.
    pub async fn lease_pod_cidr(&self, cluster: Cidr, prefix_len: u8) -> Result<Cidr, KvError> {
        let bits = if cluster.addr.is_ipv4() { 32 } else { 128 };
        if prefix_len < cluster.len || prefix_len > bits {
            return Err(KvError::invalid(
                "pod_cidr_prefix_len",
                prefix_len,
                format!(
                    "must lie within {}..={bits} for cluster range {cluster}",
                    cluster.len
                ),
            ));
        }
        let inner = &self.inner;
        let node = inner.cfg.node_name.clone();
        let prefix = inner.keys.podcidr_prefix();
        let key_of = |c: &Cidr| format!("{prefix}{}-{}", c.addr, c.len);
        let mut c = inner.client.clone();
        let resp = inner
            .call(
                "get",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut taken = std::collections::HashSet::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            taken.insert(key.clone());
            if kv.value() != node.as_bytes() {
                continue;
            }
            let Some(mine) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.rsplit_once('-'))
                .and_then(|(a, l)| Cidr::new(a.parse().ok()?, l.parse().ok()?).ok())
                .filter(|m| m.len == prefix_len && cluster.contains(m.addr))
            else {
                continue;
            };
            // Ours from before (e.g. a restart within the TTL): take it under this lease.
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, node.clone())])
                .and_then([TxnOp::put(
                    key.clone(),
                    node.clone(),
                    Some(PutOptions::new().with_lease(inner.lease_id())),
                )]);
            inner.remember(key.clone(), Owned::Plain(node.clone().into_bytes()));
            if inner.call("txn (pod cidr)", c.txn(txn)).await?.succeeded() {
                return Ok(mine);
            }
            inner.forget(&key);
        }
        let count: u128 = 1u128
            .checked_shl(u32::from(prefix_len - cluster.len))
            .unwrap_or(u128::MAX)
            .min(1 << 16);
        for i in 0..count {
            let Some(sub) = cluster.subnet(prefix_len, i) else {
                break;
            };
            let key = key_of(&sub);
            if taken.contains(&key) {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    node.clone(),
                    Some(PutOptions::new().with_lease(inner.lease_id())),
                )]);
            inner.remember(key.clone(), Owned::Plain(node.clone().into_bytes()));
            match inner.call("txn (pod cidr)", c.txn(txn)).await {
                Ok(r) if r.succeeded() => return Ok(sub),
                Ok(_) => {
                    inner.forget(&key);
                }
                Err(e) => {
                    inner.forget(&key);
                    return Err(e);
                }
            }
        }
        Err(KvError::PodCidrExhausted {
            cluster_cidr: cluster.to_string(),
            prefix_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_split() {
        let c: Cidr = "10.0.0.0/16".parse().unwrap();
        assert_eq!(c.subnet(24, 0).unwrap().to_string(), "10.0.0.0/24");
        assert_eq!(c.subnet(24, 255).unwrap().to_string(), "10.0.255.0/24");
        assert!(c.subnet(24, 256).is_none());
        let e = "10.0.0.1/16".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("10.0.0.1/16") && e.contains("host bits"), "{e}");
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("prefix length"), "{e}");
        let v6: Cidr = "fd00::/48".parse().unwrap();
        assert_eq!(v6.subnet(64, 1).unwrap().to_string(), "fd00:0:0:1::/64");
    }
}
