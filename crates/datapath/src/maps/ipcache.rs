//! IPCache: the address prefix → numeric identity trie the datapath consults for every packet,
//! with, for addresses on other nodes, the node's underlay address (the tunnel endpoint) and,
//! for the nodes' own underlay addresses, a node mark.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, lpm_trie::Key, lpm_trie::LpmTrie};

use super::{MAP_IPCACHE, is_not_found};
use crate::abi::{IPCACHE_F_NODE, IPCACHE_F_TUNNEL, IpCacheKey, IpCacheValue};
use crate::error::DatapathError;

/// The bits before the address: family byte and three bytes of padding.
const HEADER_BITS: u32 = 8 * std::mem::offset_of!(IpCacheKey, addr) as u32;

/// One IPCache entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpCacheEntry {
    /// Prefix address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length (0..=32 or 0..=128).
    pub prefix_len: u8,
    /// Numeric identity.
    pub identity: u32,
    /// The underlay address of the node hosting the address, for addresses on other nodes
    /// (packets to them are encapsulated towards it; packets from them must come through the
    /// tunnel from it).
    pub tunnel_endpoint: Option<Ipv4Addr>,
    /// The address is a cluster node's underlay address ([`IpCache::upsert_node`]): tunnel
    /// packets are accepted only from such addresses.
    pub is_node: bool,
}

/// The `sigil_ipcache` LPM trie. Addresses not in it have identity 2 (world).
pub struct IpCache {
    trie: LpmTrie<MapData, IpCacheKey, IpCacheValue>,
}

impl IpCache {
    pub(crate) fn new(trie: LpmTrie<MapData, IpCacheKey, IpCacheValue>) -> Self {
        Self { trie }
    }

    /// Maps a prefix to an identity (replacing any earlier entry of the same prefix, tunnel
    /// endpoint and node mark included): an address on this node, or outside the cluster.
    pub fn upsert(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        identity: u32,
    ) -> Result<(), DatapathError> {
        self.insert(addr, prefix_len, identity, 0, None)
    }

    /// Maps a prefix on another node to an identity and to that node's underlay address:
    /// packets from local endpoints to it are encapsulated towards `tunnel_endpoint` with the
    /// source's identity as VNI, and packets from it are accepted only through the tunnel,
    /// from that node.
    pub fn upsert_tunneled(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        identity: u32,
        tunnel_endpoint: Ipv4Addr,
    ) -> Result<(), DatapathError> {
        check_underlay("tunnel_endpoint", tunnel_endpoint)?;
        self.insert(
            addr,
            prefix_len,
            identity,
            IPCACHE_F_TUNNEL,
            Some(tunnel_endpoint),
        )
    }

    /// Marks another cluster node's underlay address: identity remote-node (6), its own
    /// tunnel endpoint. Tunnel packets are accepted only from such addresses. This node's
    /// own address needs no entry (it is recognised by [`crate::tunnel::TunnelConfig`]'s
    /// `local_ip`; give it identity host, 1, with [`IpCache::upsert`] if wanted).
    pub fn upsert_node(&mut self, node_ip: Ipv4Addr) -> Result<(), DatapathError> {
        check_underlay("node_ip", node_ip)?;
        self.insert(
            IpAddr::V4(node_ip),
            32,
            crate::IDENTITY_REMOTE_NODE,
            IPCACHE_F_TUNNEL | IPCACHE_F_NODE,
            Some(node_ip),
        )
    }

    fn insert(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        identity: u32,
        flags: u32,
        tunnel_endpoint: Option<Ipv4Addr>,
    ) -> Result<(), DatapathError> {
        if identity == 0 {
            return Err(DatapathError::invalid(
                "identity",
                identity,
                "0 is reserved (it means 'any' in policy keys)",
            ));
        }
        let key = lpm_key(addr, prefix_len)?;
        let value = IpCacheValue {
            identity,
            flags,
            tunnel_endpoint: tunnel_endpoint.map_or([0; 4], |a| a.octets()),
        };
        self.trie
            .insert(&key, value, 0)
            .map_err(|e| DatapathError::map(MAP_IPCACHE, "insert", e))
    }

    /// Removes a prefix (absent prefixes are ignored).
    pub fn remove(&mut self, addr: IpAddr, prefix_len: u8) -> Result<(), DatapathError> {
        let key = lpm_key(addr, prefix_len)?;
        match self.trie.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_IPCACHE, "delete", e)),
        }
    }

    /// The identity the datapath resolves for an address (longest prefix), if any entry matches.
    pub fn lookup(&self, addr: IpAddr) -> Result<Option<u32>, DatapathError> {
        Ok(self.lookup_entry(addr)?.map(|e| e.identity))
    }

    /// What the datapath resolves for an address (longest prefix), if any entry matches. The
    /// kernel does not say which prefix matched: `addr` is the address asked about and
    /// `prefix_len` its full length.
    pub fn lookup_entry(&self, addr: IpAddr) -> Result<Option<IpCacheEntry>, DatapathError> {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let key = lpm_key(addr, full)?;
        match self.trie.get(&key, 0) {
            Ok(v) => Ok(Some(entry(addr, full, &v))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_IPCACHE, "lookup", e)),
        }
    }

    /// Every entry.
    pub fn entries(&self) -> Result<Vec<IpCacheEntry>, DatapathError> {
        let mut out = Vec::new();
        for item in self.trie.iter() {
            let (key, value) = item.map_err(|e| DatapathError::map(MAP_IPCACHE, "scan", e))?;
            let data = key.data();
            let Some(prefix_len) = key
                .prefix_len()
                .checked_sub(HEADER_BITS)
                .and_then(|l| u8::try_from(l).ok())
            else {
                continue;
            };
            let addr = match data.family {
                4 => IpAddr::V4(Ipv4Addr::new(
                    data.addr[0],
                    data.addr[1],
                    data.addr[2],
                    data.addr[3],
                )),
                6 => IpAddr::V6(Ipv6Addr::from(data.addr)),
                _ => continue,
            };
            out.push(entry(addr, prefix_len, &value));
        }
        Ok(out)
    }
}

fn entry(addr: IpAddr, prefix_len: u8, v: &IpCacheValue) -> IpCacheEntry {
    IpCacheEntry {
        addr,
        prefix_len,
        identity: v.identity,
        tunnel_endpoint: (v.flags & IPCACHE_F_TUNNEL != 0)
            .then(|| Ipv4Addr::from(v.tunnel_endpoint)),
        is_node: v.flags & IPCACHE_F_NODE != 0,
    }
}

/// An underlay address must be one a node can have: unicast, not loopback or unspecified.
fn check_underlay(field: &'static str, a: Ipv4Addr) -> Result<(), DatapathError> {
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(DatapathError::invalid(
            field,
            a,
            "must be a node's unicast underlay address (not unspecified, loopback, multicast or broadcast)",
        ));
    }
    Ok(())
}

fn lpm_key(addr: IpAddr, prefix_len: u8) -> Result<Key<IpCacheKey>, DatapathError> {
    let (family, bytes, max) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (4u8, b, 32u8)
        }
        IpAddr::V6(a) => (6u8, a.octets(), 128u8),
    };
    if prefix_len > max {
        return Err(DatapathError::invalid(
            "prefix_len",
            prefix_len,
            format!("must be at most {max} for {addr}"),
        ));
    }
    // IPv4 sits in the first four bytes, so for both families the prefix is the top bits.
    let full = u128::from_be_bytes(bytes);
    let mask = if prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix_len))
    };
    if full & !mask != 0 {
        return Err(DatapathError::invalid(
            "prefix",
            format!("{addr}/{prefix_len}"),
            "has host bits set",
        ));
    }
    Ok(Key::new(
        HEADER_BITS + u32::from(prefix_len),
        IpCacheKey {
            family,
            pad: [0; 3],
            addr: bytes,
        },
    ))
}
