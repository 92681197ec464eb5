//! Kernel-side layouts of the map keys, values and events, mirroring `bpf/sigil.h` byte for byte.
#![allow(unsafe_code)]

use aya::Pod;

/// IPCache LPM data after the prefix length: 32 bits of family and padding, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IpCacheKey {
    pub(crate) family: u8,
    pub(crate) pad: [u8; 3],
    pub(crate) addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IpCacheValue {
    pub(crate) identity: u32,
    pub(crate) flags: u32,
}

/// Policy LPM data after the prefix length. `endpoint_id` and `remote_identity` are native
/// endian: the prefix always covers them whole, so their byte order never matters to the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PolicyKeyData {
    pub(crate) endpoint_id: u32,
    pub(crate) remote_identity: u32,
    pub(crate) direction: u8,
    pub(crate) protocol: u8,
    /// Network byte order, so that a port prefix covers the high bits.
    pub(crate) dport_be: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PolicyValueRaw {
    pub(crate) deny: u8,
    pub(crate) l7_redirect: u8,
    pub(crate) auth_required: u8,
    pub(crate) flags: u8,
    pub(crate) rule_cookie: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EndpointConfigRaw {
    pub(crate) ingress_enforced: u8,
    pub(crate) egress_enforced: u8,
    pub(crate) pad: [u8; 2],
    pub(crate) identity: u32,
    /// `EP_HAS_IPV4` | `EP_HAS_IPV6`.
    pub(crate) flags: u32,
    pub(crate) ipv4: [u8; 4],
    pub(crate) ipv6: [u8; 16],
}

/// `endpoint_config.flags`: `ipv4` holds the endpoint's IPv4 address.
pub(crate) const EP_HAS_IPV4: u32 = 1;
/// `endpoint_config.flags`: `ipv6` holds the endpoint's IPv6 address.
pub(crate) const EP_HAS_IPV6: u32 = 2;

/// Sizes of `struct frag_key` and `struct frag_value` (the map is only used by the programs).
pub(crate) const FRAG_KEY_SIZE: u32 = 44;
pub(crate) const FRAG_VALUE_SIZE: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct AuthKeyRaw {
    pub(crate) local_identity: u32,
    pub(crate) remote_identity: u32,
    pub(crate) remote_node: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AuthValueRaw {
    pub(crate) expiry_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CtKeyRaw {
    pub(crate) endpoint_id: u32,
    pub(crate) family: u8,
    pub(crate) protocol: u8,
    pub(crate) direction: u8,
    pub(crate) pad: u8,
    pub(crate) saddr: [u8; 16],
    pub(crate) daddr: [u8; 16],
    pub(crate) sport_be: [u8; 2],
    pub(crate) dport_be: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CtValueRaw {
    pub(crate) created_ns: u64,
    pub(crate) last_seen_ns: u64,
    pub(crate) flags: u8,
    pub(crate) pad: [u8; 7],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CounterKeyRaw {
    pub(crate) endpoint_id: u32,
    pub(crate) verdict: u8,
    pub(crate) pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct CounterValueRaw {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

/// Size of `struct event` in the ring buffer (68 bytes of fields, padded to 8).
pub(crate) const EVENT_SIZE: usize = 72;

// SAFETY: every type is #[repr(C)], built only from integers and byte arrays, with explicit
// padding fields so no byte is uninitialised; any bit pattern is a valid value.
unsafe impl Pod for IpCacheKey {}
// SAFETY: as above.
unsafe impl Pod for IpCacheValue {}
// SAFETY: as above.
unsafe impl Pod for PolicyKeyData {}
// SAFETY: as above.
unsafe impl Pod for PolicyValueRaw {}
// SAFETY: as above.
unsafe impl Pod for EndpointConfigRaw {}
// SAFETY: as above.
unsafe impl Pod for AuthKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for AuthValueRaw {}
// SAFETY: as above.
unsafe impl Pod for CtKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for CtValueRaw {}
// SAFETY: as above.
unsafe impl Pod for CounterKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for CounterValueRaw {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn sizes_match_the_c_header() {
        assert_eq!(size_of::<IpCacheKey>(), 20);
        assert_eq!(size_of::<IpCacheValue>(), 8);
        assert_eq!(size_of::<PolicyKeyData>(), 12);
        assert_eq!(size_of::<PolicyValueRaw>(), 8);
        assert_eq!(size_of::<EndpointConfigRaw>(), 32);
        assert_eq!(size_of::<AuthKeyRaw>(), 12);
        assert_eq!(size_of::<AuthValueRaw>(), 8);
        assert_eq!(size_of::<CtKeyRaw>(), 44);
        assert_eq!(size_of::<CtValueRaw>(), 24);
        assert_eq!(size_of::<CounterKeyRaw>(), 8);
        assert_eq!(size_of::<CounterValueRaw>(), 16);
    }
}
