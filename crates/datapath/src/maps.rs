//! Typed handles on the pinned maps, opened either from a fresh load or from the pin directory.

mod auth;
pub(crate) mod conntrack;
mod counters;
mod endpoints;
mod ipcache;

pub use auth::{AuthKey, AuthMap};
pub use conntrack::{Conntrack, CtEntry};
pub use counters::{Counter, Counters};
pub use endpoints::{EndpointConfig, EndpointMap};
pub use ipcache::{IpCache, IpCacheEntry};

use std::path::Path;

use aya::maps::{Map, MapData, MapError, MapInfo, MapType};

use aya::maps::lpm_trie::Key;

use crate::abi::{
    AuthKeyRaw, AuthValueRaw, CounterKeyRaw, CounterValueRaw, CtKeyRaw, CtValueRaw,
    EndpointConfigRaw, EpAddrKey, FragKeyRaw, FragValueRaw, IpCacheKey, IpCacheValue,
    PolicyKeyData, PolicyValueRaw, TunnelConfigRaw, size32,
};
use crate::error::DatapathError;
use crate::policy::PolicyMap;

/// IPCache LPM trie: address prefix → identity.
pub const MAP_IPCACHE: &str = "sigil_ipcache";
/// Policy LPM trie of all endpoints.
pub const MAP_POLICY: &str = "sigil_policy";
/// Per-endpoint config (identity, enforcement).
pub const MAP_ENDPOINTS: &str = "sigil_endpoints";
/// Local endpoints' own addresses → endpoint id (kept with the endpoint config).
pub const MAP_EP_ADDRS: &str = "sigil_ep_addrs";
/// Auth entries for `auth_required` policy.
pub const MAP_AUTH: &str = "sigil_auth";
/// Connection tracking LRU hash.
pub const MAP_CT: &str = "sigil_ct";
/// Verdict and drop events ring buffer.
pub const MAP_EVENTS: &str = "sigil_events";
/// Per-endpoint, per-verdict counters.
pub const MAP_COUNTERS: &str = "sigil_counters";
/// Events lost because the ring buffer was full.
pub const MAP_EV_LOST: &str = "sigil_ev_lost";
/// Fragment tracking LRU hash: a first fragment's flow for its later fragments.
pub const MAP_FRAG: &str = "sigil_frag";
/// This node's tunnel device and underlay address (an array of one).
pub const MAP_TUNNEL: &str = "sigil_tunnel";

/// Layout of each map this build creates, checked against maps pinned by an earlier run.
///
/// Sizes come from the Rust mirrors, which `crate::abi` checks against `bpf/sigil.h`.
pub(crate) const MAP_SPECS: [(&str, MapType, u32, u32); 11] = [
    (
        MAP_IPCACHE,
        MapType::LpmTrie,
        size32::<Key<IpCacheKey>>(),
        size32::<IpCacheValue>(),
    ),
    (
        MAP_POLICY,
        MapType::LpmTrie,
        size32::<Key<PolicyKeyData>>(),
        size32::<PolicyValueRaw>(),
    ),
    (
        MAP_ENDPOINTS,
        MapType::Hash,
        size32::<u32>(),
        size32::<EndpointConfigRaw>(),
    ),
    (
        MAP_EP_ADDRS,
        MapType::Hash,
        size32::<EpAddrKey>(),
        size32::<u32>(),
    ),
    (
        MAP_AUTH,
        MapType::Hash,
        size32::<AuthKeyRaw>(),
        size32::<AuthValueRaw>(),
    ),
    (
        MAP_CT,
        MapType::LruHash,
        size32::<CtKeyRaw>(),
        size32::<CtValueRaw>(),
    ),
    // The kernel reports a ring buffer's key and value sizes as 0 (only the type is checked).
    (MAP_EVENTS, MapType::RingBuf, 0, 0),
    (
        MAP_COUNTERS,
        MapType::PerCpuHash,
        size32::<CounterKeyRaw>(),
        size32::<CounterValueRaw>(),
    ),
    (
        MAP_EV_LOST,
        MapType::PerCpuArray,
        size32::<u32>(),
        size32::<u64>(),
    ),
    (
        MAP_FRAG,
        MapType::LruHash,
        size32::<FragKeyRaw>(),
        size32::<FragValueRaw>(),
    ),
    (
        MAP_TUNNEL,
        MapType::Array,
        size32::<u32>(),
        size32::<TunnelConfigRaw>(),
    ),
];

/// Every map except the ring buffer (read through [`crate::EventReader`]).
pub struct Maps {
    /// Address → identity.
    pub ipcache: IpCache,
    /// Policy entries of all endpoints.
    pub policy: PolicyMap,
    /// Endpoint identity and enforcement.
    pub endpoints: EndpointMap,
    /// Authenticated identity pairs.
    pub auth: AuthMap,
    /// Connection tracking.
    pub conntrack: Conntrack,
    /// Packet and byte counters.
    pub counters: Counters,
    /// This node's tunnel device (written by [`crate::Datapath::setup_tunnel`]).
    pub(crate) tunnel: crate::tunnel::TunnelMap,
}

impl Maps {
    /// Opens the maps pinned under `pin_dir` without loading programs (CLI tools, monitors).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        check_pins(pin_dir)?;
        Self::from_maps(&mut |name| open_pin(pin_dir, name))
    }

    pub(crate) fn from_maps(
        take: &mut dyn FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            ipcache: IpCache::new(typed(MAP_IPCACHE, take(MAP_IPCACHE)?)?),
            policy: PolicyMap::new(typed(MAP_POLICY, take(MAP_POLICY)?)?)?,
            endpoints: EndpointMap::new(
                typed(MAP_ENDPOINTS, take(MAP_ENDPOINTS)?)?,
                typed(MAP_EP_ADDRS, take(MAP_EP_ADDRS)?)?,
            ),
            auth: AuthMap::new(typed(MAP_AUTH, take(MAP_AUTH)?)?),
            conntrack: Conntrack::new(typed(MAP_CT, take(MAP_CT)?)?),
            counters: Counters::new(
                typed(MAP_COUNTERS, take(MAP_COUNTERS)?)?,
                typed(MAP_EV_LOST, take(MAP_EV_LOST)?)?,
            ),
            tunnel: crate::tunnel::TunnelMap::new(typed(MAP_TUNNEL, take(MAP_TUNNEL)?)?),
        })
    }

    /// Removes everything the maps hold for an endpoint (policy, config, counters, conntrack).
    pub fn remove_endpoint_state(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        self.policy.clear_endpoint(endpoint_id)?;
        self.endpoints.remove(endpoint_id)?;
        self.counters.remove_endpoint(endpoint_id)?;
        self.conntrack.flush_endpoint(endpoint_id)?;
        Ok(())
    }
}

/// Opens one pinned map.
fn open_pin(pin_dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        if is_not_found(&e) {
            DatapathError::MapMissing {
                name,
                where_: pin_dir.display().to_string(),
            }
        } else {
            DatapathError::map(name, "open pin", e)
        }
    })?;
    Map::from_map_data(data).map_err(|e| DatapathError::map(name, "open pin", e))
}

impl Counters {
    /// Opens only the pinned counter maps (readers that need no other map, such as a status
    /// call that must not wait for the policy map's writer).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        check_pins(pin_dir)?;
        Ok(Counters::new(
            typed(MAP_COUNTERS, open_pin(pin_dir, MAP_COUNTERS)?)?,
            typed(MAP_EV_LOST, open_pin(pin_dir, MAP_EV_LOST)?)?,
        ))
    }
}

impl AuthMap {
    /// Opens the pinned auth map of a loaded datapath (netd's auth manager owns it).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        check_pins(pin_dir)?;
        Ok(AuthMap::new(typed(MAP_AUTH, open_pin(pin_dir, MAP_AUTH)?)?))
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    name: &'static str,
    map: Map,
) -> Result<T, DatapathError> {
    T::try_from(map).map_err(|e| DatapathError::map(name, "open", e))
}

/// Refuses maps pinned with another layout: reusing them would make the programs misread them.
pub(crate) fn check_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    for (name, kind, key, value) in MAP_SPECS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::map(name, "read pin", e))?;
        let found_type = info
            .map_type()
            .map_or_else(|_| "unknown".to_owned(), |t| format!("{t:?}"));
        let (want_key, want_value) = match kind {
            // The kernel reports a ring buffer's sizes as 0; only its type matters.
            MapType::RingBuf => (info.key_size(), info.value_size()),
            _ => (key, value),
        };
        if found_type != format!("{kind:?}")
            || info.key_size() != want_key
            || info.value_size() != want_value
        {
            return Err(DatapathError::IncompatiblePin {
                path,
                found_type,
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_type: format!("{kind:?}"),
                want_key,
                want_value,
            });
        }
    }
    Ok(())
}

pub(crate) use crate::error::is_not_found;

/// Nanoseconds of CLOCK_BOOTTIME, the clock of event timestamps, conntrack and auth expiry.
pub fn boot_time_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000_000).saturating_add(nanos)
        }
        // CLOCK_BOOTTIME exists on every kernel that has these programs (2.6.39+).
        Err(_) => 0,
    }
}
