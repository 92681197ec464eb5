//! Per-endpoint datapath config: the endpoint's identity, its own addresses and which directions
//! default-deny; plus the reverse index of those addresses (`sigil_ep_addrs`), which the
//! datapath uses to refuse a local endpoint's address on packets that did not come from it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData};

use super::{MAP_ENDPOINTS, MAP_EP_ADDRS, is_not_found};
use crate::abi::{EP_HAS_IPV4, EP_HAS_IPV6, EndpointConfigRaw, EpAddrKey};
use crate::error::DatapathError;

/// What the datapath knows about an endpoint besides its policy entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    /// The endpoint's numeric identity (reported in events, used for auth lookups).
    pub identity: u32,
    /// Traffic into the endpoint that no entry allows is dropped (133); else it passes.
    pub ingress_enforced: bool,
    /// Traffic out of the endpoint that no entry allows is dropped (133); else it passes.
    pub egress_enforced: bool,
    /// The endpoint's IPv4 address: the only IPv4 source its packets may carry (none: every
    /// IPv4 packet it sends is dropped as spoofed, 132).
    pub ipv4: Option<Ipv4Addr>,
    /// The endpoint's IPv6 address: the only IPv6 source its packets may carry besides
    /// link-local and unspecified ones to link-local or multicast destinations.
    pub ipv6: Option<Ipv6Addr>,
}

impl EndpointConfig {
    /// The endpoint's addresses.
    fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        [self.ipv4.map(IpAddr::V4), self.ipv6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
    }
}

/// The `sigil_endpoints` hash map, keyed by endpoint id (the host veth's ifindex), and the
/// `sigil_ep_addrs` index of the endpoints' addresses that [`EndpointMap::set`] and
/// [`EndpointMap::remove`] keep in step with it.
pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointConfigRaw>,
    addrs: HashMap<MapData, EpAddrKey, u32>,
}

impl EndpointMap {
    pub(crate) fn new(
        map: HashMap<MapData, u32, EndpointConfigRaw>,
        addrs: HashMap<MapData, EpAddrKey, u32>,
    ) -> Self {
        Self { map, addrs }
    }

    /// Sets an endpoint's config. Its addresses become its own in `sigil_ep_addrs`: packets
    /// entering any endpoint with one of them as source must come through this endpoint's
    /// veth. Addresses of its previous config that it no longer has are released.
    pub fn set(&mut self, endpoint_id: u32, config: EndpointConfig) -> Result<(), DatapathError> {
        let old = self.get(endpoint_id)?;
        for addr in config.addrs() {
            self.addrs
                .insert(addr_key(addr), endpoint_id, 0)
                .map_err(|e| DatapathError::map(MAP_EP_ADDRS, "insert", e))?;
        }
        let raw = EndpointConfigRaw {
            ingress_enforced: u8::from(config.ingress_enforced),
            egress_enforced: u8::from(config.egress_enforced),
            pad: [0; 2],
            identity: config.identity,
            flags: config.ipv4.map_or(0, |_| EP_HAS_IPV4) | config.ipv6.map_or(0, |_| EP_HAS_IPV6),
            ipv4: config.ipv4.map_or([0; 4], |a| a.octets()),
            ipv6: config.ipv6.map_or([0; 16], |a| a.octets()),
        };
        self.map
            .insert(endpoint_id, raw, 0)
            .map_err(|e| DatapathError::map(MAP_ENDPOINTS, "insert", e))?;
        for addr in old.iter().flat_map(EndpointConfig::addrs) {
            if !config.addrs().any(|a| a == addr) {
                self.release(addr, endpoint_id)?;
            }
        }
        Ok(())
    }

    /// The local endpoint whose own address `addr` is, if any.
    pub fn owner_of(&self, addr: IpAddr) -> Result<Option<u32>, DatapathError> {
        match self.addrs.get(&addr_key(addr), 0) {
            Ok(id) => Ok(Some(id)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_EP_ADDRS, "lookup", e)),
        }
    }

    /// Removes `addr` from the index if it is still `endpoint_id`'s (another endpoint may
    /// have been given it since).
    fn release(&mut self, addr: IpAddr, endpoint_id: u32) -> Result<(), DatapathError> {
        if self.owner_of(addr)? != Some(endpoint_id) {
            return Ok(());
        }
        match self.addrs.remove(&addr_key(addr)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_EP_ADDRS, "delete", e)),
        }
    }

    /// An endpoint's config, if set.
    pub fn get(&self, endpoint_id: u32) -> Result<Option<EndpointConfig>, DatapathError> {
        match self.map.get(&endpoint_id, 0) {
            Ok(raw) => Ok(Some(from_raw(raw))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_ENDPOINTS, "lookup", e)),
        }
    }

    /// Removes an endpoint's config and its addresses' index entries (absent is fine).
    pub fn remove(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        let old = self.get(endpoint_id)?;
        match self.map.remove(&endpoint_id) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(DatapathError::map(MAP_ENDPOINTS, "delete", e)),
        }
        for addr in old.iter().flat_map(EndpointConfig::addrs) {
            self.release(addr, endpoint_id)?;
        }
        Ok(())
    }

    /// Every endpoint id with its config.
    pub fn list(&self) -> Result<Vec<(u32, EndpointConfig)>, DatapathError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| (k, from_raw(v)))
                    .map_err(|e| DatapathError::map(MAP_ENDPOINTS, "scan", e))
            })
            .collect()
    }
}

fn addr_key(addr: IpAddr) -> EpAddrKey {
    let (family, addr) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (4, b)
        }
        IpAddr::V6(a) => (6, a.octets()),
    };
    EpAddrKey {
        family,
        pad: [0; 3],
        addr,
    }
}

fn from_raw(raw: EndpointConfigRaw) -> EndpointConfig {
    EndpointConfig {
        identity: raw.identity,
        ingress_enforced: raw.ingress_enforced != 0,
        egress_enforced: raw.egress_enforced != 0,
        ipv4: (raw.flags & EP_HAS_IPV4 != 0).then(|| Ipv4Addr::from(raw.ipv4)),
        ipv6: (raw.flags & EP_HAS_IPV6 != 0).then(|| Ipv6Addr::from(raw.ipv6)),
    }
}
