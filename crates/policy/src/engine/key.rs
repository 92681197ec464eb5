//! Policy map keys and values (the one vocabulary the engine computes and the datapath
//! installs), the protocol/port prefix encoding, and the cheap hasher the per-packet lookup uses.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;

use crate::model::Direction;

/// Number of protocol/port prefix levels: level 0 is "any protocol, any port"; level
/// `1 + k` is "this protocol, port prefix of `k` bits" (`k` in 0..=16).
pub(crate) const LEVELS: usize = 18;

/// A protocol/port prefix: level, protocol and masked port (see [`LEVELS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Prefix {
    pub(crate) level: u8,
    pub(crate) proto: u8,
    pub(crate) port: u16,
}

/// `port` with only its first `bits` bits kept.
pub(crate) fn mask_port(port: u16, bits: u8) -> u16 {
    if bits == 0 {
        0
    } else {
        port & (u16::MAX << (16 - u32::from(bits.min(16))))
    }
}

impl Prefix {
    /// Every protocol and port.
    pub(crate) const ANY: Prefix = Prefix {
        level: 0,
        proto: 0,
        port: 0,
    };

    /// `proto` with the first `bits` bits of `port`.
    pub(crate) fn new(proto: u8, port: u16, bits: u8) -> Prefix {
        Prefix {
            level: 1 + bits,
            proto,
            port: mask_port(port, bits),
        }
    }

    /// The prefix of this level covering a flow.
    pub(crate) fn of_flow(level: u8, proto: u8, port: u16) -> Prefix {
        if level == 0 {
            Prefix::ANY
        } else {
            Prefix::new(proto, port, level - 1)
        }
    }

    /// Whether every flow covered by `other` is covered by `self`.
    pub(crate) fn contains(&self, other: &Prefix) -> bool {
        self.level == 0
            || (self.level <= other.level
                && self.proto == other.proto
                && mask_port(other.port, self.level - 1) == self.port)
    }

    /// This prefix and every shorter prefix containing it, longest first.
    pub(crate) fn ancestors(self) -> impl Iterator<Item = Prefix> {
        (0..=self.level)
            .rev()
            .map(move |l| Prefix::of_flow(l, self.proto, self.port))
    }

    fn pack(self) -> u32 {
        (u32::from(self.level) << 24) | (u32::from(self.proto) << 16) | u32::from(self.port)
    }
}

/// The prefixes covering ports `lo..=hi` exactly (a range becomes a few masked entries).
pub(crate) fn range_prefixes(proto: u8, lo: u16, hi: u16) -> Vec<Prefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        let mut k = lo.trailing_zeros().min(16);
        while k > 0 && lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        // lo < 2^16 here, so the cast is exact.
        out.push(Prefix::new(proto, lo as u16, (16 - k) as u8));
        lo += 1 << k;
    }
    out
}

/// Packed map key inside one endpoint direction: identity in the high half, prefix below.
pub(crate) fn pack(identity: u32, p: Prefix) -> u64 {
    (u64::from(identity) << 32) | u64::from(p.pack())
}

/// Unpacks [`pack`].
pub(crate) fn unpack(k: u64) -> (u32, Prefix) {
    let lo = k as u32;
    (
        (k >> 32) as u32,
        Prefix {
            level: (lo >> 24) as u8,
            proto: (lo >> 16) as u8,
            port: lo as u16,
        },
    )
}

/// A policy map key of one endpoint: what the engine computes and the datapath installs.
///
/// `protocol` 0 means any protocol; `port_prefix_len` says how many high bits of `port` must
/// match (16 = exactly `port`, 0 = any port). The engine only makes keys that [`PolicyKey::new`]
/// accepts; the datapath also takes protocol 0 with a port and expands it into the protocols
/// that have ports (its trie has the protocol byte before the port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyKey {
    /// Remote identity; 0 matches any identity.
    pub identity: u32,
    /// Direction relative to the endpoint.
    pub direction: Direction,
    /// IANA protocol number; 0 (any protocol) only with `port_prefix_len` 0.
    pub protocol: u8,
    /// Port, masked to `port_prefix_len` bits.
    pub port: u16,
    /// How many leading bits of `port` are significant (16 = exact port, 0 = any port).
    pub port_prefix_len: u8,
}

/// A policy key field out of range, with the field, its value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct InvalidKey {
    /// Field name.
    pub field: &'static str,
    /// The offending value.
    pub value: String,
    /// Why it is rejected.
    pub reason: String,
}

impl InvalidKey {
    fn new(field: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        InvalidKey {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl PolicyKey {
    pub(crate) fn from_parts(identity: u32, direction: Direction, p: Prefix) -> PolicyKey {
        PolicyKey {
            identity,
            direction,
            protocol: p.proto,
            port: p.port,
            port_prefix_len: p.level.saturating_sub(1),
        }
    }

    /// Builds a key of one trie entry: protocol 0 (any) must come with `port_prefix_len` 0,
    /// and `port` may not have bits set beyond `port_prefix_len`.
    pub fn new(
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
        port_prefix_len: u8,
    ) -> Result<Self, InvalidKey> {
        let key = PolicyKey {
            identity,
            direction,
            protocol,
            port,
            port_prefix_len,
        };
        key.check_port()?;
        if protocol == 0 && port_prefix_len != 0 {
            return Err(InvalidKey::new(
                "port_prefix_len",
                port_prefix_len,
                "a single key with protocol 0 (any) cannot match a port; expand it into the protocols with ports",
            ));
        }
        Ok(key)
    }

    /// Checks the port prefix: `port_prefix_len` in 0..=16 and no bit of `port` set beyond it.
    pub fn check_port(&self) -> Result<(), InvalidKey> {
        if self.port_prefix_len > 16 {
            return Err(InvalidKey::new(
                "port_prefix_len",
                self.port_prefix_len,
                "must be 0..=16 (16 = exact port, 0 = any port)",
            ));
        }
        if self.port != mask_port(self.port, self.port_prefix_len) {
            return Err(InvalidKey::new(
                "port",
                self.port,
                format!(
                    "has bits set beyond port_prefix_len {}",
                    self.port_prefix_len
                ),
            ));
        }
        Ok(())
    }

    /// Cilium's LPM prefix length over protocol (8 bits) and port (16 bits): 0 for any
    /// protocol, `8 + port_prefix_len` otherwise.
    pub fn lpm_prefix_len(&self) -> u8 {
        if self.protocol == 0 {
            0
        } else {
            8 + self.port_prefix_len
        }
    }

    /// Whether a packet with these fields falls under this key.
    pub fn matches(&self, identity: u32, direction: Direction, protocol: u8, port: u16) -> bool {
        self.identity == identity
            && self.direction == direction
            && (self.protocol == 0
                || (self.protocol == protocol
                    && mask_port(port, self.port_prefix_len) == self.port))
    }

    /// Whether every packet under `other` is also under `self` (same identity and direction,
    /// and `self` is a shorter or equal prefix of `other`).
    pub fn covers(&self, other: &PolicyKey) -> bool {
        self.identity == other.identity
            && self.direction == other.direction
            && (self.protocol == 0
                || (self.protocol == other.protocol
                    && self.port_prefix_len <= other.port_prefix_len
                    && mask_port(other.port, self.port_prefix_len) == self.port))
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} identity {} ", self.direction, self.identity)?;
        match (self.protocol, self.port_prefix_len) {
            (0, _) => f.write_str("any"),
            (p, 0) => write!(f, "proto {p} any port"),
            (p, 16) => write!(f, "proto {p} port {}", self.port),
            (p, l) => write!(f, "proto {p} port {}/{l}", self.port),
        }
    }
}

/// A policy map value of one key: what the engine computes and the datapath installs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyEntry {
    /// Drop the traffic.
    pub deny: bool,
    /// Send allowed traffic through the L7 proxy.
    pub l7_redirect: bool,
    /// Require mutual authentication before allowing.
    pub auth_required: bool,
    /// The rule that decided this entry (a deny rule for a deny, one of the allow rules for an
    /// allow); resolve it with [`crate::PolicyEngine::rule_for_cookie`]. 0: no rule (the
    /// default of a direction without default deny).
    pub rule_cookie: u32,
}

/// The allow/deny/L7/auth flags (and deciding cookies) of the rule contributions at one prefix, OR-ed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PrefixVerdict {
    pub(crate) allow: bool,
    pub(crate) deny: bool,
    pub(crate) l7: bool,
    pub(crate) auth: bool,
    /// Cookie of the deciding deny rule (0: none).
    pub(crate) deny_cookie: u32,
    /// Cookie of the allow rule reported for an allow (0: none).
    pub(crate) allow_cookie: u32,
}

/// The smaller non-zero cookie: comparing cookie values, never arrival order, keeps a map's
/// reported rule independent of the order rules were installed in.
fn pick_cookie(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, c) | (c, 0) => c,
        (a, b) => a.min(b),
    }
}

impl PrefixVerdict {
    pub(crate) fn or(self, o: PrefixVerdict) -> PrefixVerdict {
        PrefixVerdict {
            allow: self.allow || o.allow,
            deny: self.deny || o.deny,
            l7: self.l7 || o.l7,
            auth: self.auth || o.auth,
            deny_cookie: pick_cookie(self.deny_cookie, o.deny_cookie),
            allow_cookie: pick_cookie(self.allow_cookie, o.allow_cookie),
        }
    }

    /// The map value: deny wins; flags only on allow.
    pub(crate) fn entry(self) -> PolicyEntry {
        if self.deny {
            PolicyEntry {
                deny: true,
                l7_redirect: false,
                auth_required: false,
                rule_cookie: self.deny_cookie,
            }
        } else {
            PolicyEntry {
                deny: false,
                l7_redirect: self.l7,
                auth_required: self.auth,
                rule_cookie: self.allow_cookie,
            }
        }
    }
}

/// Multiplicative hasher for integer keys: one multiply and a fold, enough spread for
/// hashbrown's use of both the low and the high bits.
#[derive(Default, Clone, Copy)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 32);
    }
}

/// Hash builder for integer-keyed maps.
pub(crate) type IntHashBuilder = BuildHasherDefault<IntHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_minimal_prefixes() {
        let p = range_prefixes(6, 80, 80);
        assert_eq!(p, vec![Prefix::new(6, 80, 16)]);
        let all = range_prefixes(6, 0, u16::MAX);
        assert_eq!(all, vec![Prefix::new(6, 0, 0)]);
        let r = range_prefixes(6, 1000, 1999);
        let covered: u32 = r.iter().map(|p| 1u32 << (16 - (p.level - 1))).sum();
        assert_eq!(covered, 1000);
        for port in 0..=u16::MAX {
            let inside = (1000..=1999).contains(&port);
            let hit = r.iter().any(|p| p.contains(&Prefix::new(6, port, 16)));
            assert_eq!(inside, hit, "port {port}");
        }
    }

    #[test]
    fn containment_and_packing() {
        let any = Prefix::ANY;
        let tcp = Prefix::new(6, 0, 0);
        let p80 = Prefix::new(6, 80, 16);
        assert!(any.contains(&p80) && tcp.contains(&p80) && !p80.contains(&tcp));
        assert!(!Prefix::new(17, 0, 0).contains(&p80));
        assert_eq!(p80.ancestors().count(), 18);
        assert_eq!(unpack(pack(70000, p80)), (70000, p80));
    }
}
