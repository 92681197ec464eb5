//! Auth entries: which (local identity, remote identity, remote node) pairs have authenticated,
//! consulted for policy entries with `auth_required`.

use std::time::Duration;

use aya::maps::{HashMap, MapData};

use super::{MAP_AUTH, boot_time_ns, is_not_found};
use crate::abi::{AuthKeyRaw, AuthValueRaw};
use crate::error::DatapathError;

/// Key of an auth entry. The datapath looks up `remote_node` 0 (this node) for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AuthKey {
    /// The endpoint's identity.
    pub local_identity: u32,
    /// The peer's identity.
    pub remote_identity: u32,
    /// The peer's node (0 = this node).
    pub remote_node: u32,
}

impl AuthKey {
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

    /// The expiry (CLOCK_BOOTTIME ns) of an authentication, if recorded.
    pub fn expiry(&self, key: AuthKey) -> Result<Option<u64>, DatapathError> {
        match self.map.get(&key.raw(), 0) {
            Ok(v) => Ok(Some(v.expiry_ns)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DatapathError::map(MAP_AUTH, "lookup", e)),
        }
    }
}
