//! IPCache: the address prefix → numeric identity trie the datapath consults for every packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, lpm_trie::Key, lpm_trie::LpmTrie};

use super::{MAP_IPCACHE, is_not_found};
use crate::abi::{IpCacheKey, IpCacheValue};
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
}

/// The `sigil_ipcache` LPM trie. Addresses not in it have identity 2 (world).
pub struct IpCache {
    trie: LpmTrie<MapData, IpCacheKey, IpCacheValue>,
}

impl IpCache {
    pub(crate) fn new(trie: LpmTrie<MapData, IpCacheKey, IpCacheValue>) -> Self {
        Self { trie }
    }

    /// Maps a prefix to an identity (replacing any earlier identity of the same prefix).
    pub fn upsert(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        identity: u32,
    ) -> Result<(), DatapathError> {
        if identity == 0 {
            return Err(DatapathError::invalid(
                "identity",
                identity,
                "0 is reserved (it means 'any' in policy keys)",
            ));
        }
        let key = lpm_key(addr, prefix_len)?;
        self.trie
            .insert(&key, IpCacheValue { identity, flags: 0 }, 0)
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
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let key = lpm_key(addr, full)?;
        match self.trie.get(&key, 0) {
            Ok(v) => Ok(Some(v.identity)),
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
            out.push(IpCacheEntry {
                addr,
                prefix_len,
                identity: value.identity,
            });
        }
        Ok(out)
    }
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
