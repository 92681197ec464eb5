//! Policy entries as the datapath sees them: one LPM trie keyed by endpoint, remote identity,
//! direction, protocol and destination-port prefix, plus the pure logic (key encoding, deny
//! precedence, the per-packet decision) that the kernel map and tests share.

mod map;

pub use map::{Applied, PolicyMap, PolicyPlan};

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::abi::{PolicyKeyData, PolicyValueRaw};
use crate::codes::{
    DROP_AUTH_REQUIRED, DROP_POLICY_DENIED, DROP_POLICY_DENY, Direction, PORT_PROTOCOLS,
};
use crate::error::DatapathError;

/// Bits of the key that every entry covers: endpoint id, remote identity, direction.
const BASE_PREFIX: u32 = 8 * std::mem::offset_of!(PolicyKeyData, protocol) as u32;

/// `flags` bit of an allow entry that a covering deny turned into a deny (see [`normalize`]).
pub(crate) const FLAG_DEMOTED: u8 = 1;

/// One policy entry of an endpoint, as the policy engine hands it over.
///
/// `protocol` 0 means any protocol; `port_prefix_len` says how many high bits of `port` must
/// match (16 = exactly `port`, 0 = any port; bits of `port` beyond the prefix must be zero).
/// A protocol-ANY entry with a port (`port_prefix_len > 0`) cannot be one LPM key, because the
/// protocol byte precedes the port: it expands into TCP, UDP and SCTP keys, the protocols that
/// have ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// Remote numeric identity; 0 matches any.
    pub remote_identity: u32,
    /// Direction relative to the endpoint.
    pub direction: Direction,
    /// IP protocol number; 0 matches any.
    pub protocol: u8,
    /// Destination port (prefix base).
    pub port: u16,
    /// Number of leading bits of `port` that must match, 0..=16.
    pub port_prefix_len: u8,
    /// A deny entry (takes precedence over every allow).
    pub deny: bool,
    /// Traffic should go to an L7 proxy (recorded in the map; not acted on in-kernel yet).
    pub l7_redirect: bool,
    /// Traffic needs an entry in the auth map, else it drops with reason 189.
    pub auth_required: bool,
    /// Opaque id of the rule that produced this entry, reported in events.
    pub rule_cookie: u32,
}

impl PolicyEntry {
    /// The LPM keys of this entry (three for protocol ANY with a port, else one).
    pub fn keys(&self) -> Result<Vec<PolicyKey>, DatapathError> {
        if self.protocol == 0 && self.port_prefix_len > 0 {
            PORT_PROTOCOLS
                .iter()
                .map(|&p| {
                    PolicyKey::new(
                        self.remote_identity,
                        self.direction,
                        p,
                        self.port,
                        self.port_prefix_len,
                    )
                })
                .collect()
        } else {
            Ok(vec![PolicyKey::new(
                self.remote_identity,
                self.direction,
                self.protocol,
                self.port,
                self.port_prefix_len,
            )?])
        }
    }

    /// The map value of this entry.
    pub fn value(&self) -> PolicyValue {
        PolicyValue {
            deny: self.deny,
            l7_redirect: self.l7_redirect,
            auth_required: self.auth_required,
            rule_cookie: self.rule_cookie,
        }
    }
}

/// A validated policy map key of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    remote_identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
    port_prefix_len: u8,
}

impl PolicyKey {
    /// Builds a key; protocol 0 (any) must come with `port_prefix_len` 0 (use
    /// [`PolicyEntry::keys`] to expand protocol ANY with a port), and `port` may not have bits
    /// set beyond `port_prefix_len`.
    pub fn new(
        remote_identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
        port_prefix_len: u8,
    ) -> Result<Self, DatapathError> {
        if port_prefix_len > 16 {
            return Err(DatapathError::invalid(
                "port_prefix_len",
                port_prefix_len,
                "must be 0..=16 (16 = exact port, 0 = any port)",
            ));
        }
        if protocol == 0 && port_prefix_len != 0 {
            return Err(DatapathError::invalid(
                "port_prefix_len",
                port_prefix_len,
                "a single key with protocol 0 (any) cannot match a port; expand it with PolicyEntry::keys",
            ));
        }
        if port & !port_mask(port_prefix_len) != 0 {
            return Err(DatapathError::invalid(
                "port",
                port,
                format!("has bits set beyond port_prefix_len {port_prefix_len}"),
            ));
        }
        Ok(Self {
            remote_identity,
            direction,
            protocol,
            port,
            port_prefix_len,
        })
    }

    /// Remote identity (0 = any).
    pub fn remote_identity(&self) -> u32 {
        self.remote_identity
    }

    /// Direction relative to the endpoint.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Protocol (0 = any).
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Port prefix base.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port prefix length (0 = any port).
    pub fn port_prefix_len(&self) -> u8 {
        self.port_prefix_len
    }

    /// The LPM prefix length in bits: 72, plus 8 with a protocol, plus the port prefix.
    pub fn prefix_len(&self) -> u32 {
        if self.protocol == 0 {
            BASE_PREFIX
        } else {
            BASE_PREFIX + 8 + u32::from(self.port_prefix_len)
        }
    }

    /// Whether a packet with these fields falls under this key (ignoring the endpoint).
    pub fn matches(
        &self,
        remote_identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.remote_identity == remote_identity
            && self.direction == direction
            && (self.protocol == 0
                || (self.protocol == protocol
                    && port & port_mask(self.port_prefix_len) == self.port))
    }

    /// Whether every packet under `other` is also under `self` (same identity and direction,
    /// and `self` is a shorter or equal prefix of `other`).
    pub fn covers(&self, other: &PolicyKey) -> bool {
        self.remote_identity == other.remote_identity
            && self.direction == other.direction
            && (self.protocol == 0
                || (self.protocol == other.protocol
                    && self.port_prefix_len <= other.port_prefix_len
                    && other.port & port_mask(self.port_prefix_len) == self.port))
    }

    pub(crate) fn to_lpm(self, endpoint_id: u32) -> aya::maps::lpm_trie::Key<PolicyKeyData> {
        aya::maps::lpm_trie::Key::new(
            self.prefix_len(),
            PolicyKeyData {
                endpoint_id,
                remote_identity: self.remote_identity,
                direction: self.direction.as_u8(),
                protocol: self.protocol,
                dport_be: self.port.to_be_bytes(),
            },
        )
    }

    pub(crate) fn from_lpm(key: &aya::maps::lpm_trie::Key<PolicyKeyData>) -> Option<(u32, Self)> {
        let data = key.data();
        let direction = Direction::from_u8(data.direction)?;
        let prefix = key.prefix_len();
        let (protocol, port_prefix_len) = match prefix {
            BASE_PREFIX => (0, 0),
            p if (BASE_PREFIX + 8..=BASE_PREFIX + 24).contains(&p) => {
                (data.protocol, u8::try_from(p - BASE_PREFIX - 8).ok()?)
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(data.dport_be) & port_mask(port_prefix_len);
        let key = Self::new(
            data.remote_identity,
            direction,
            protocol,
            port,
            port_prefix_len,
        )
        .ok()?;
        Some((data.endpoint_id, key))
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} identity {} ", self.direction, self.remote_identity)?;
        match (self.protocol, self.port_prefix_len) {
            (0, _) => f.write_str("any"),
            (p, 0) => write!(f, "proto {p} any port"),
            (p, 16) => write!(f, "proto {p} port {}", self.port),
            (p, l) => write!(f, "proto {p} port {}/{l}", self.port),
        }
    }
}

/// The value of a policy map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// Deny (drop with reason 181).
    pub deny: bool,
    /// L7 redirect requested.
    pub l7_redirect: bool,
    /// Authentication required.
    pub auth_required: bool,
    /// Rule cookie reported in events.
    pub rule_cookie: u32,
}

impl PolicyValue {
    pub(crate) fn to_raw(self, flags: u8) -> PolicyValueRaw {
        PolicyValueRaw {
            deny: u8::from(self.deny),
            l7_redirect: u8::from(self.l7_redirect),
            auth_required: u8::from(self.auth_required),
            flags,
            rule_cookie: self.rule_cookie,
        }
    }

    pub(crate) fn from_raw(raw: PolicyValueRaw) -> Self {
        Self {
            deny: raw.deny != 0,
            l7_redirect: raw.l7_redirect != 0,
            auth_required: raw.auth_required != 0,
            rule_cookie: raw.rule_cookie,
        }
    }
}

/// What the kernel holds for one key: the value plus whether it is an allow demoted by a deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Installed {
    pub(crate) value: PolicyValue,
    pub(crate) demoted: bool,
}

/// Builds one endpoint's intended key → value map from entries.
///
/// Within one call a key given twice merges: deny wins over allow; between two allows
/// `l7_redirect` and `auth_required` are or-ed and the first cookie is kept.
pub fn intent_of(
    entries: &[PolicyEntry],
) -> Result<BTreeMap<PolicyKey, PolicyValue>, DatapathError> {
    let mut out = BTreeMap::new();
    for e in entries {
        for key in e.keys()? {
            merge(&mut out, key, e.value());
        }
    }
    Ok(out)
}

fn merge(map: &mut BTreeMap<PolicyKey, PolicyValue>, key: PolicyKey, v: PolicyValue) {
    map.entry(key)
        .and_modify(|old| {
            if v.deny && !old.deny {
                *old = v;
            } else if !v.deny && !old.deny {
                old.l7_redirect |= v.l7_redirect;
                old.auth_required |= v.auth_required;
            }
        })
        .or_insert(v);
}

/// The kernel map content for an intent: deny precedence made explicit.
///
/// The datapath does one longest-prefix lookup per identity (the real one and 0), so an allow
/// that is MORE specific than a deny for the same identity would win the lookup. Such an allow
/// is written as a deny instead (with the covering deny's cookie, the most specific one if
/// several cover it), which is what Cilium's map state does too.
pub fn normalize(intent: &BTreeMap<PolicyKey, PolicyValue>) -> BTreeMap<PolicyKey, PolicyValue> {
    normalize_installed(intent)
        .into_iter()
        .map(|(k, i)| (k, i.value))
        .collect()
}

pub(crate) fn normalize_installed(
    intent: &BTreeMap<PolicyKey, PolicyValue>,
) -> BTreeMap<PolicyKey, Installed> {
    let mut denies: HashMap<(u32, Direction), Vec<(&PolicyKey, &PolicyValue)>> = HashMap::new();
    for (k, v) in intent.iter().filter(|(_, v)| v.deny) {
        denies
            .entry((k.remote_identity, k.direction))
            .or_default()
            .push((k, v));
    }
    intent
        .iter()
        .map(|(k, v)| {
            let cover = if v.deny {
                None
            } else {
                denies
                    .get(&(k.remote_identity, k.direction))
                    .into_iter()
                    .flatten()
                    .filter(|(d, _)| d.covers(k))
                    .max_by_key(|(d, _)| d.prefix_len())
            };
            let installed = match cover {
                Some((_, d)) => Installed {
                    value: PolicyValue {
                        deny: true,
                        l7_redirect: false,
                        auth_required: false,
                        rule_cookie: d.rule_cookie,
                    },
                    demoted: true,
                },
                None => Installed {
                    value: *v,
                    demoted: false,
                },
            };
            (*k, installed)
        })
        .collect()
}

/// The longest-prefix match the kernel trie returns for one identity.
pub fn lpm_lookup(
    map: &BTreeMap<PolicyKey, PolicyValue>,
    remote_identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<(PolicyKey, PolicyValue)> {
    map.iter()
        .filter(|(k, _)| k.matches(remote_identity, direction, protocol, port))
        .max_by_key(|(k, _)| k.prefix_len())
        .map(|(k, v)| (*k, *v))
}

/// The datapath's per-packet verdict for a new or original-direction packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// 0 when allowed, else 133, 181 or 189.
    pub drop_reason: u32,
    /// Cookie of the deciding entry (0 when none matched).
    pub rule_cookie: u32,
}

/// Mirrors the C `decide()`: lookups with the real identity and with 0; any deny drops (181);
/// else any allow allows (189 if it needs auth and `authenticated` is false); else 133 when
/// `enforced`, allow when not.
pub fn decide(
    map: &BTreeMap<PolicyKey, PolicyValue>,
    remote_identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
    enforced: bool,
    authenticated: bool,
) -> Decision {
    let exact = lpm_lookup(map, remote_identity, direction, protocol, port).map(|(_, v)| v);
    let any = if remote_identity == 0 {
        None
    } else {
        lpm_lookup(map, 0, direction, protocol, port).map(|(_, v)| v)
    };
    let deny = [exact, any].into_iter().flatten().find(|v| v.deny);
    if let Some(d) = deny {
        return Decision {
            drop_reason: DROP_POLICY_DENY,
            rule_cookie: d.rule_cookie,
        };
    }
    if let Some(first) = exact.or(any) {
        let auth = exact.is_some_and(|v| v.auth_required) || any.is_some_and(|v| v.auth_required);
        return Decision {
            drop_reason: if auth && !authenticated {
                DROP_AUTH_REQUIRED
            } else {
                0
            },
            rule_cookie: first.rule_cookie,
        };
    }
    Decision {
        drop_reason: if enforced { DROP_POLICY_DENIED } else { 0 },
        rule_cookie: 0,
    }
}

/// Splits an inclusive port range into (port, prefix length) pairs that cover exactly it.
pub fn port_range_prefixes(first: u16, last: u16) -> Result<Vec<(u16, u8)>, DatapathError> {
    if first > last {
        return Err(DatapathError::invalid(
            "port range",
            format!("{first}-{last}"),
            "first port is above last port",
        ));
    }
    let mut out = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // Largest aligned block starting at `start` that stays within the range.
        let mut size_bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        let port = u16::try_from(start).unwrap_or(u16::MAX);
        out.push((port, 16 - size_bits as u8));
        start += 1u32 << size_bits;
    }
    Ok(out)
}

fn port_mask(prefix_len: u8) -> u16 {
    if prefix_len == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(prefix_len.min(16)))
    }
}
