//! IP prefixes for CIDR rules, and how CIDR identities' labels map back to them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;
use sigil_labels::{Labels, Source};

/// An IPv4 or IPv6 prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// The prefix `addr/len`, host bits cleared; `None` when `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<IpPrefix> {
        let addr = match addr {
            IpAddr::V4(v4) => {
                if len > 32 {
                    return None;
                }
                IpAddr::V4((u32::from(v4) & mask32(len)).into())
            }
            IpAddr::V6(v6) => {
                if len > 128 {
                    return None;
                }
                IpAddr::V6((u128::from(v6) & mask128(len)).into())
            }
        };
        Some(IpPrefix { addr, len })
    }

    /// The single-address prefix of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> IpPrefix {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        IpPrefix { addr, len }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this is `0.0.0.0/0` or `::/0`.
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    /// Whether `other` lies entirely inside this prefix (same family).
    pub fn contains(&self, other: &IpPrefix) -> bool {
        if other.len < self.len {
            return false;
        }
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(b) & mask32(self.len) == u32::from(a),
            (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(b) & mask128(self.len) == u128::from(a),
            _ => false,
        }
    }

    /// Bounds, in this type's order, of every prefix inside this one: each prefix `p` with
    /// `self.contains(&p)` lies in `lo..=hi` (the range may hold others too; filter it).
    pub(crate) fn inner_bounds(&self) -> (IpPrefix, IpPrefix) {
        let last = match self.addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) | !mask32(self.len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) | !mask128(self.len)).into()),
        };
        (
            IpPrefix {
                addr: self.addr,
                len: 0,
            },
            IpPrefix {
                addr: last,
                len: u8::MAX,
            },
        )
    }

    /// Whether the two prefixes share any address (for prefixes: one contains the other).
    pub fn overlaps(&self, other: &IpPrefix) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The prefix a CIDR identity's label stands for: the key of `cidr:<key>`, with IPv6
    /// colons written as '-' the way Cilium writes them.
    pub fn from_label_key(key: &str) -> Option<IpPrefix> {
        key.replace('-', ":").parse().ok()
    }

    /// The most specific prefix among the `cidr:` labels of an identity, if it has any.
    pub fn of_labels(labels: &Labels) -> Option<IpPrefix> {
        labels
            .iter()
            .filter(|l| l.source == Source::Cidr)
            .filter_map(|l| IpPrefix::from_label_key(&l.key))
            .max_by_key(|p| p.len)
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a prefix could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PrefixParseError(pub &'static str);

impl FromStr for IpPrefix {
    type Err = PrefixParseError;

    /// `addr/len`; a bare address is taken as a single-host prefix. Host bits are cleared as
    /// Go's `net.ParseCIDR` does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| PrefixParseError("not an IP address before '/'"))?;
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PrefixParseError("prefix length is not a number"));
                }
                let len: u8 = len
                    .parse()
                    .map_err(|_| PrefixParseError("prefix length too long"))?;
                IpPrefix::new(addr, len).ok_or(PrefixParseError(
                    "prefix length too long for the address family",
                ))
            }
            None => s
                .parse::<IpAddr>()
                .map(IpPrefix::host)
                .map_err(|_| PrefixParseError("not an IP address or CIDR prefix")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn parse_clears_host_bits_and_checks_length() {
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(p("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0.0/x".parse::<IpPrefix>().is_err());
        assert!("bogus".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn containment() {
        assert!(p("10.0.0.0/8").contains(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").contains(&p("10.0.0.0/8")));
        assert!(p("0.0.0.0/0").contains(&p("192.168.1.1/32")));
        assert!(!p("0.0.0.0/0").contains(&p("::1/128")));
        assert!(p("10.1.0.0/16").overlaps(&p("10.0.0.0/8")));
        assert!(!p("10.1.0.0/16").overlaps(&p("10.2.0.0/16")));
    }

    #[test]
    fn from_cidr_labels() {
        let labels = Labels::parse_list("cidr:10.0.0.0/8,cidr:10.1.2.0/24,reserved:world").unwrap();
        assert_eq!(IpPrefix::of_labels(&labels), Some(p("10.1.2.0/24")));
        assert_eq!(
            IpPrefix::from_label_key("2001-db8--/32"),
            Some(p("2001:db8::/32"))
        );
        assert_eq!(
            IpPrefix::of_labels(&Labels::parse_list("k8s:a=b").unwrap()),
            None
        );
    }
}
