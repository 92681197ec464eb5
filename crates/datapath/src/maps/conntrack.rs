//! Connection tracking entries, for listing and for flushing an endpoint's connections.

use std::net::IpAddr;

use aya::maps::{HashMap, MapData};

use super::{MAP_CT, is_not_found};
use crate::abi::CtKeyRaw;
use crate::abi::CtValueRaw;
use crate::codes::{CT_CLOSING, CT_SEEN_REPLY, Direction, addr_from};
use crate::error::DatapathError;

/// One tracked connection, keyed as seen in its opening direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Endpoint (host veth ifindex).
    pub endpoint_id: u32,
    /// IP protocol.
    pub protocol: u8,
    /// Direction of the opening packet relative to the endpoint.
    pub direction: Direction,
    /// Source address of the opening packet.
    pub saddr: IpAddr,
    /// Destination address of the opening packet.
    pub daddr: IpAddr,
    /// Source port (0 for protocols without ports).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// When it was opened (CLOCK_BOOTTIME ns).
    pub created_ns: u64,
    /// Last packet (CLOCK_BOOTTIME ns).
    pub last_seen_ns: u64,
    /// A reply has been seen.
    pub seen_reply: bool,
    /// A FIN or RST has been seen.
    pub closing: bool,
}

/// The `sigil_ct` LRU hash.
pub struct Conntrack {
    map: HashMap<MapData, CtKeyRaw, CtValueRaw>,
}

impl Conntrack {
    pub(crate) fn new(map: HashMap<MapData, CtKeyRaw, CtValueRaw>) -> Self {
        Self { map }
    }

    /// Every tracked connection.
    pub fn entries(&self) -> Result<Vec<CtEntry>, DatapathError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (k, v) = match item {
                Ok(kv) => kv,
                // LRU eviction between get_next_key and lookup: skip the vanished entry.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(DatapathError::map(MAP_CT, "scan", e)),
            };
            let Some(direction) = Direction::from_u8(k.direction) else {
                continue;
            };
            out.push(CtEntry {
                endpoint_id: k.endpoint_id,
                protocol: k.protocol,
                direction,
                saddr: addr_from(k.family, &k.saddr),
                daddr: addr_from(k.family, &k.daddr),
                sport: u16::from_be_bytes(k.sport_be),
                dport: u16::from_be_bytes(k.dport_be),
                created_ns: v.created_ns,
                last_seen_ns: v.last_seen_ns,
                seen_reply: v.flags & CT_SEEN_REPLY != 0,
                closing: v.flags & CT_CLOSING != 0,
            });
        }
        Ok(out)
    }

    /// Forgets every connection of an endpoint; returns how many were removed.
    pub fn flush_endpoint(&mut self, endpoint_id: u32) -> Result<usize, DatapathError> {
        let keys: Vec<CtKeyRaw> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint_id == endpoint_id)
            .collect();
        let mut removed = 0;
        for k in keys {
            match self.map.remove(&k) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_CT, "delete", e)),
            }
        }
        Ok(removed)
    }
}
