//! Per-endpoint datapath config: the endpoint's identity, its own addresses and which directions
//! default-deny.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData};

use super::{MAP_ENDPOINTS, is_not_found};
use crate::abi::{EP_HAS_IPV4, EP_HAS_IPV6, EndpointConfigRaw};
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

/// The `sigil_endpoints` hash map, keyed by endpoint id (the host veth's ifindex).
pub struct EndpointMap {
    map: HashMap<MapData, u32, EndpointConfigRaw>,
}

impl EndpointMap {
    pub(crate) fn new(map: HashMap<MapData, u32, EndpointConfigRaw>) -> Self {
        Self { map }
    }

    /// Sets an endpoint's config.
    pub fn set(&mut self, endpoint_id: u32, config: EndpointConfig) -> Result<(), DatapathError> {
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
            .map_err(|e| DatapathError::map(MAP_ENDPOINTS, "insert", e))
    }

    /// An endpoint's config, if set.
    pub fn get(&self, endpoint_id: u32) -> Result<Option<EndpointConfig>, DatapathError> {
        match self.map.get(&endpoint_id, 0) {
            Ok(raw) => Ok(Some(from_raw(raw))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_ENDPOINTS, "lookup", e)),
        }
    }

    /// Removes an endpoint's config (absent is fine).
    pub fn remove(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        match self.map.remove(&endpoint_id) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_ENDPOINTS, "delete", e)),
        }
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

fn from_raw(raw: EndpointConfigRaw) -> EndpointConfig {
    EndpointConfig {
        identity: raw.identity,
        ingress_enforced: raw.ingress_enforced != 0,
        egress_enforced: raw.egress_enforced != 0,
        ipv4: (raw.flags & EP_HAS_IPV4 != 0).then(|| Ipv4Addr::from(raw.ipv4)),
        ipv6: (raw.flags & EP_HAS_IPV6 != 0).then(|| Ipv6Addr::from(raw.ipv6)),
    }
}
