//! Auth entries: which (local identity, remote identity, remote node) pairs have authenticated,
//! consulted for policy entries with `auth_required`.

use std::time::Duration;

use aya::maps::{HashMap, MapData};

use super::{MAP_AUTH, boot_time_ns, is_not_found};
use crate::abi::{AuthKeyRaw, AuthValueRaw};
use crate::error::DatapathError;

/// Key of an auth entry. The datapath looks up the peer's node: on egress the destination's
/// IPCache tunnel endpoint, on ingress from the tunnel the source's (which the tunnel program
/// checked against the outer source); 0 for peers on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AuthKey {
    /// The endpoint's identity.
    pub local_identity: u32,
    /// The peer's identity.
    pub remote_identity: u32,
    /// The peer's node (0 = this node): see [`AuthKey::node`].
    pub remote_node: u32,
}

impl AuthKey {
    /// The `remote_node` of a peer on the node with underlay address `ip`: the address's
    /// bytes in network order, read as the datapath reads the IPCache's `tunnel_endpoint`.
    pub fn node(ip: std::net::Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    /// The underlay address `remote_node` stands for (`None` for this node).
    pub fn node_ip(&self) -> Option<std::net::Ipv4Addr> {
        (self.remote_node != 0).then(|| std::net::Ipv4Addr::from(self.remote_node.to_ne_bytes()))
    }

    fn raw(self) -> AuthKeyRaw {
        AuthKeyRaw {
            local_identity: self.local_identity,
            remote_identity: self.remote_identity,
            remote_node: self.remote_node,
        }
    }
}

/// The `sigil_auth` hash map.
pub struct AuthMap {
    map: HashMap<MapData, AuthKeyRaw, AuthValueRaw>,
}

impl AuthMap {
    pub(crate) fn new(map: HashMap<MapData, AuthKeyRaw, AuthValueRaw>) -> Self {
        Self { map }
    }

    /// Records an authentication valid for `valid_for` from now.
    pub fn grant(&mut self, key: AuthKey, valid_for: Duration) -> Result<(), DatapathError> {
        let ns = u64::try_from(valid_for.as_nanos()).unwrap_or(u64::MAX);
        self.grant_until(key, boot_time_ns().saturating_add(ns))
    }

    /// Records an authentication valid until `expiry_ns` on CLOCK_BOOTTIME.
    pub fn grant_until(&mut self, key: AuthKey, expiry_ns: u64) -> Result<(), DatapathError> {
        self.map
            .insert(key.raw(), AuthValueRaw { expiry_ns }, 0)
            .map_err(|e| DatapathError::map(MAP_AUTH, "insert", e))
    }

    /// Removes an authentication (absent is fine).
    pub fn revoke(&mut self, key: AuthKey) -> Result<(), DatapathError> {
        match self.map.remove(&key.raw()) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_AUTH, "delete", e)),
        }
    }

    /// Every recorded authentication with its expiry (CLOCK_BOOTTIME ns).
    pub fn entries(&self) -> Result<Vec<(AuthKey, u64)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(MAP_AUTH, "iterate", e))?;
            out.push((
                AuthKey {
                    local_identity: k.local_identity,
                    remote_identity: k.remote_identity,
                    remote_node: k.remote_node,
                },
                v.expiry_ns,
            ));
        }
        Ok(out)
    }

    /// The expiry (CLOCK_BOOTTIME ns) of an authentication, if recorded.
    pub fn expiry(&self, key: AuthKey) -> Result<Option<u64>, DatapathError> {
        match self.map.get(&key.raw(), 0) {
            Ok(v) => Ok(Some(v.expiry_ns)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_AUTH, "lookup", e)),
        }
    }
}
