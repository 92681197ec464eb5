//! The engine's policy keys and entries ([`PolicyKey`], [`PolicyEntry`] of `sigil-policy`) as the
//! datapath holds them: one LPM trie keyed by endpoint, remote identity, direction, protocol and
//! destination-port prefix, plus the pure logic (trie key encoding, deny precedence, the
//! per-packet decision) that the kernel map and tests share.

mod map;

pub use map::{Applied, PolicyMap, PolicyPlan};

use std::collections::{BTreeMap, HashMap};

use sigil_policy::{PolicyEntry, PolicyKey};

use crate::abi::{PolicyKeyData, PolicyValueRaw};
use crate::codes::{
    DROP_AUTH_REQUIRED, DROP_POLICY_DENIED, DROP_POLICY_DENY, Direction, PORT_PROTOCOLS,
};
use crate::error::DatapathError;

/// Bits of the key that every entry covers: endpoint id, remote identity, direction.
const BASE_PREFIX: u32 = 8 * std::mem::offset_of!(PolicyKeyData, protocol) as u32;

/// `flags` bit of an allow entry that a covering deny turned into a deny (see [`normalize`]).
pub(crate) const FLAG_DEMOTED: u8 = 1;

/// The trie keys of one policy key (three for protocol ANY with a port, else one), checked.
///
/// A protocol-ANY key with a port (`port_prefix_len > 0`) cannot be one trie key, because the
/// protocol byte precedes the port: it expands into TCP, UDP and SCTP keys, the protocols that
/// have ports.
pub fn lpm_keys(key: &PolicyKey) -> Result<Vec<PolicyKey>, DatapathError> {
    key.check_port()?;
    if key.protocol == 0 && key.port_prefix_len > 0 {
        Ok(PORT_PROTOCOLS
            .iter()
            .map(|&protocol| PolicyKey { protocol, ..*key })
            .collect())
    } else {
        Ok(vec![*key])
    }
}

/// The trie prefix length of a key in bits: 72 (endpoint, identity, direction), plus 8 with a
/// protocol, plus the port prefix.
pub fn trie_prefix_len(key: &PolicyKey) -> u32 {
    BASE_PREFIX + u32::from(key.lpm_prefix_len())
}

pub(crate) fn to_lpm(key: &PolicyKey, endpoint_id: u32) -> aya::maps::lpm_trie::Key<PolicyKeyData> {
    aya::maps::lpm_trie::Key::new(
        trie_prefix_len(key),
        PolicyKeyData {
            endpoint_id,
            remote_identity: key.identity,
            direction: key.direction.as_u8(),
            protocol: key.protocol,
            dport_be: key.port.to_be_bytes(),
        },
    )
}

pub(crate) fn from_lpm(key: &aya::maps::lpm_trie::Key<PolicyKeyData>) -> Option<(u32, PolicyKey)> {
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
    let key = PolicyKey::new(
        data.remote_identity,
        direction,
        protocol,
        port,
        port_prefix_len,
    )
    .ok()?;
    Some((data.endpoint_id, key))
}

pub(crate) fn to_raw(value: PolicyEntry, flags: u8) -> PolicyValueRaw {
    PolicyValueRaw {
        deny: u8::from(value.deny),
        l7_redirect: u8::from(value.l7_redirect),
        auth_required: u8::from(value.auth_required),
        flags,
        rule_cookie: value.rule_cookie,
    }
}

pub(crate) fn from_raw(raw: PolicyValueRaw) -> PolicyEntry {
    PolicyEntry {
        deny: raw.deny != 0,
        l7_redirect: raw.l7_redirect != 0,
        auth_required: raw.auth_required != 0,
        rule_cookie: raw.rule_cookie,
    }
}

/// What the kernel holds for one key: the value plus whether it is an allow demoted by a deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Installed {
    pub(crate) value: PolicyEntry,
    pub(crate) demoted: bool,
}

/// Builds one endpoint's intended key → value map from entries.
///
/// Within one call a key given twice merges: deny wins over allow; between two allows
/// `l7_redirect` and `auth_required` are or-ed and the first cookie is kept.
pub fn intent_of(
    entries: &[(PolicyKey, PolicyEntry)],
) -> Result<BTreeMap<PolicyKey, PolicyEntry>, DatapathError> {
    let mut out = BTreeMap::new();
    for (k, e) in entries {
        for key in lpm_keys(k)? {
            merge(&mut out, key, *e);
        }
    }
    Ok(out)
}

fn merge(map: &mut BTreeMap<PolicyKey, PolicyEntry>, key: PolicyKey, v: PolicyEntry) {
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
pub fn normalize(intent: &BTreeMap<PolicyKey, PolicyEntry>) -> BTreeMap<PolicyKey, PolicyEntry> {
    normalize_installed(intent)
        .into_iter()
        .map(|(k, i)| (k, i.value))
        .collect()
}

pub(crate) fn normalize_installed(
    intent: &BTreeMap<PolicyKey, PolicyEntry>,
) -> BTreeMap<PolicyKey, Installed> {
    let mut denies: HashMap<(u32, Direction), Vec<(&PolicyKey, &PolicyEntry)>> = HashMap::new();
    for (k, v) in intent.iter().filter(|(_, v)| v.deny) {
        denies
            .entry((k.identity, k.direction))
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
                    .get(&(k.identity, k.direction))
                    .into_iter()
                    .flatten()
                    .filter(|(d, _)| d.covers(k))
                    .max_by_key(|(d, _)| trie_prefix_len(d))
            };
            let installed = match cover {
                Some((_, d)) => Installed {
                    value: PolicyEntry {
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
    map: &BTreeMap<PolicyKey, PolicyEntry>,
    remote_identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<(PolicyKey, PolicyEntry)> {
    map.iter()
        .filter(|(k, _)| k.matches(remote_identity, direction, protocol, port))
        .max_by_key(|(k, _)| trie_prefix_len(k))
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
    map: &BTreeMap<PolicyKey, PolicyEntry>,
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
