//! The datapath's shared vocabulary, mirrored by `bpf/sigil.h` and used by the policy, map and
//! event modules alike (so none of them imports another for it): directions, verdicts, protocol
//! numbers, drop reasons, conntrack flags.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use sigil_policy::{Direction, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// IANA protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IANA protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Protocols that a protocol-ANY entry with a port expands into (the ones with ports).
pub const PORT_PROTOCOLS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

/// Drop reason: the packet left an endpoint with a source address that is not the endpoint's
/// (Cilium's 132).
pub const DROP_INVALID_SIP: u32 = 132;
/// Drop reason: the upper-layer header (ports) is missing or truncated (Cilium's 134).
pub const DROP_INVALID: u32 = 134;
/// Drop reason: IPv6 extension headers that cannot be walked within the bound, or that end
/// before the upper-layer header (Cilium's 156).
pub const DROP_INVALID_EXTHDR: u32 = 156;
/// Drop reason: a non-first fragment whose first fragment was not seen (or was dropped), on an
/// enforced direction (Cilium's 175).
pub const DROP_FRAG_NOT_FOUND: u32 = 175;
/// Drop reason: no allow entry matched and the direction is in default deny (Cilium's 133).
pub const DROP_POLICY_DENIED: u32 = 133;
/// Drop reason: an explicit deny entry matched (Cilium's 181).
pub const DROP_POLICY_DENY: u32 = 181;
/// Drop reason: the allow entry requires authentication and none is recorded (Cilium's 189).
pub const DROP_AUTH_REQUIRED: u32 = 189;

/// Drop reason: a packet on the tunnel device without tunnel metadata, or with an IPv6
/// underlay (Cilium's 147, error retrieving tunnel key).
pub const DROP_NO_TUNNEL_KEY: u32 = 147;
/// Drop reason: a packet from the tunnel for neither a local endpoint nor this node (Cilium's
/// 152, no matching local container): a node is no relay.
pub const DROP_NO_LOCAL_ENDPOINT: u32 = 152;
/// Drop reason: the destination lives on another node but there is no tunnel device, or the
/// host routed a packet into the tunnel for an address without a tunnel endpoint (Cilium's
/// 160, no tunnel endpoint).
pub const DROP_NO_TUNNEL: u32 = 160;
/// Drop reason: the host forwarded a packet from elsewhere into the tunnel; only local
/// endpoints and the host's own traffic may enter it (Cilium's 170, encapsulation prohibited).
pub const DROP_ENCAP_PROHIBITED: u32 = 170;
/// Drop reason: an identity that may not travel in a VNI — 0, a reserved identity other than
/// remote-node, or a node-local one — whether received or about to be sent (Cilium's 171).
pub const DROP_INVALID_IDENTITY: u32 = 171;
/// Drop reason: a tunnel packet whose outer source is not a cluster node in the IPCache
/// (Cilium's 172, unknown sender).
pub const DROP_UNKNOWN_SENDER: u32 = 172;

/// The datapath's verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Allowed by policy (original direction).
    Allowed,
    /// Dropped.
    Dropped,
    /// Allowed as a reply of a tracked connection.
    AllowedReply,
}

impl Verdict {
    /// The byte the datapath uses.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Allowed => 0,
            Self::Dropped => 1,
            Self::AllowedReply => 2,
        }
    }

    /// Parses the datapath's byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Allowed),
            1 => Some(Self::Dropped),
            2 => Some(Self::AllowedReply),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Dropped => "dropped",
            Self::AllowedReply => "allowed-reply",
        }
    }
}

/// Conntrack entry flag: a reply was seen.
pub(crate) const CT_SEEN_REPLY: u8 = 1;
/// Conntrack entry flag: the connection is closing.
pub(crate) const CT_CLOSING: u8 = 2;

/// The address in a datapath record: IPv4 in the first 4 bytes when `family` is 4, else IPv6.
pub(crate) fn addr_from(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*b))
    }
}
