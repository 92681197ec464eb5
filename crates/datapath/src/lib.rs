//! sigil's eBPF datapath: TC programs on each endpoint's host-side veth that look up the peer's
//! identity in the IPCache and enforce the endpoint's policy on every packet, their pinned maps
//! (IPCache, policy, endpoint config, auth, conntrack, events, counters), and the network
//! namespace plumbing that creates endpoints.
//!
//! The endpoint id everywhere is the ifindex of the endpoint's host-side veth.

mod abi;
mod codes;
mod error;
mod events;
mod loader;
mod maps;
pub mod netns;
mod policy;
pub mod tunnel;

pub use codes::{
    DROP_AUTH_REQUIRED, DROP_ENCAP_PROHIBITED, DROP_FRAG_NOT_FOUND, DROP_INVALID,
    DROP_INVALID_EXTHDR, DROP_INVALID_IDENTITY, DROP_INVALID_SIP, DROP_NO_LOCAL_ENDPOINT,
    DROP_NO_TUNNEL, DROP_NO_TUNNEL_KEY, DROP_POLICY_DENIED, DROP_POLICY_DENY, DROP_UNKNOWN_SENDER,
    Direction, PORT_PROTOCOLS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Verdict,
};
pub use error::DatapathError;
pub use events::{Event, EventReader, drop_reason_name};
pub use loader::{
    Datapath, PROG_FROM_ENDPOINT, PROG_FROM_TUNNEL, PROG_TO_ENDPOINT, PROG_TO_TUNNEL, TC_HANDLE,
    TC_PRIORITY, ensure_bpffs, is_bpffs,
};
pub use maps::{
    AuthKey, AuthMap, Conntrack, Counter, Counters, CtEntry, EndpointConfig, EndpointMap, IpCache,
    IpCacheEntry, MAP_AUTH, MAP_COUNTERS, MAP_CT, MAP_ENDPOINTS, MAP_EP_ADDRS, MAP_EV_LOST,
    MAP_EVENTS, MAP_FRAG, MAP_IPCACHE, MAP_POLICY, MAP_TUNNEL, Maps, boot_time_ns,
};
pub use policy::{
    Applied, Decision, PolicyMap, PolicyPlan, decide, intent_of, lpm_keys, lpm_lookup, normalize,
    port_range_prefixes, trie_prefix_len,
};
/// The policy map vocabulary, shared with the engine that computes it.
pub use sigil_policy::{PolicyEntry, PolicyKey};

/// Identity the datapath gives addresses missing from the IPCache.
pub const IDENTITY_WORLD: u32 = 2;
/// Cilium's reserved identity of the local host.
pub const IDENTITY_HOST: u32 = 1;
/// Cilium's reserved identity of the other cluster nodes (what a node's own traffic is at the
/// receiver, and the identity of every [`IpCache::upsert_node`] entry).
pub const IDENTITY_REMOTE_NODE: u32 = 6;
