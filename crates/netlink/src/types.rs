//! Values the [`crate::Netlink`] operations take: namespaces, prefixes, routes, VXLAN devices and
//! FDB entries.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::NetlinkError;

/// The network namespace an operation acts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns<'a> {
    /// The caller's namespace (the node's, for a daemon).
    Current,
    /// A named namespace under [`crate::NETNS_DIR`].
    Named(&'a str),
}

impl Ns<'_> {
    /// The namespace name, `None` for the current one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Ns::Current => None,
            Ns::Named(n) => Some(n),
        }
    }
}

impl fmt::Display for Ns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Current => f.write_str("the current netns"),
            Ns::Named(n) => write!(f, "netns {n}"),
        }
    }
}

/// An IP prefix (`10.0.0.0/24`, `fd00::/64`); host bits may be set (`10.0.0.1/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// A prefix; fails if `len` exceeds the family's address length.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, NetlinkError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(NetlinkError::invalid(
                "prefix length",
                len,
                format!("at most {max} for {addr}"),
            ));
        }
        Ok(Self { addr, len })
    }

    /// A host prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The default route's prefix of a family (`0.0.0.0/0` or `::/0`).
    pub fn default_v4() -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            len: 0,
        }
    }

    /// `::/0`.
    pub fn default_v6() -> Self {
        Self {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            len: 0,
        }
    }

    /// The address part.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a zero-length (default) prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl FromStr for Prefix {
    type Err = NetlinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| NetlinkError::invalid("prefix", s, why);
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/LENGTH"))?;
        let addr: IpAddr = a.parse().map_err(|_| bad("not an IP address"))?;
        let len: u8 = l.parse().map_err(|_| bad("length is not a number"))?;
        Self::new(addr, len).map_err(|_| bad("length too long for the address family"))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Where a route sends traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteVia {
    /// On-link through a device (`dev eth0`, scope link).
    Dev(String),
    /// Through a gateway, optionally on a given device (`via fe80::1 dev eth0`).
    Gateway {
        /// The next hop.
        gateway: IpAddr,
        /// The device, needed for link-local gateways.
        dev: Option<String>,
    },
    /// Discard (`blackhole`).
    Blackhole,
}

/// A route in the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: Prefix,
    /// Next hop.
    pub via: RouteVia,
}

impl Route {
    /// `dst dev <dev>`.
    pub fn dev(dst: Prefix, dev: &str) -> Self {
        Self {
            dst,
            via: RouteVia::Dev(dev.to_owned()),
        }
    }

    /// `blackhole dst`.
    pub fn blackhole(dst: Prefix) -> Self {
        Self {
            dst,
            via: RouteVia::Blackhole,
        }
    }

    /// `dst via gateway [dev dev]`.
    pub fn via(dst: Prefix, gateway: IpAddr, dev: Option<&str>) -> Self {
        Self {
            dst,
            via: RouteVia::Gateway {
                gateway,
                dev: dev.map(str::to_owned),
            },
        }
    }

    pub(crate) fn check(&self) -> Result<(), NetlinkError> {
        if let RouteVia::Gateway { gateway, .. } = &self.via
            && gateway.is_ipv4() != self.dst.addr().is_ipv4()
        {
            return Err(NetlinkError::invalid(
                "route gateway",
                gateway,
                format!("not of the family of destination {}", self.dst),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.via {
            RouteVia::Dev(d) => write!(f, "route {} dev {d}", self.dst),
            RouteVia::Gateway { gateway, dev: None } => {
                write!(f, "route {} via {gateway}", self.dst)
            }
            RouteVia::Gateway {
                gateway,
                dev: Some(d),
            } => write!(f, "route {} via {gateway} dev {d}", self.dst),
            RouteVia::Blackhole => write!(f, "route blackhole {}", self.dst),
        }
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = NetlinkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(|| {
                NetlinkError::invalid("MAC address", s, "expected xx:xx:xx:xx:xx:xx")
            })?;
            *b = u8::from_str_radix(p, 16)
                .map_err(|_| NetlinkError::invalid("MAC address", s, "not hexadecimal"))?;
        }
        if parts.next().is_some() {
            return Err(NetlinkError::invalid(
                "MAC address",
                s,
                "more than six bytes",
            ));
        }
        Ok(Mac(out))
    }
}

/// A VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vxlan {
    /// Device name.
    pub name: String,
    /// VNI; `None` with `external` (the VNI then comes with each packet's tunnel metadata).
    pub vni: Option<u32>,
    /// UDP destination port (4789 is IANA's; Linux defaults to 8472 when unset).
    pub port: u16,
    /// Local tunnel address.
    pub local: Option<IpAddr>,
    /// Underlay device.
    pub dev: Option<String>,
    /// Collect-metadata mode (`external`): one device for all tunnels, keys set by eBPF.
    pub external: bool,
    /// Learn remote MACs from received packets.
    pub learning: bool,
    /// Resolve neighbours on the device with ARP; `false` sets IFF_NOARP (neighbours resolve
    /// to the device's own address at once), for devices whose remote an eBPF program picks.
    pub arp: bool,
}

/// A forwarding-database entry on a VXLAN device: frames to `mac` go to the tunnel endpoint
/// `dst` (`bridge fdb replace MAC dev DEV dst DST self`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fdb {
    /// The device.
    pub link: String,
    /// Destination MAC (all zeros: the default for unknown destinations).
    pub mac: Mac,
    /// Remote tunnel endpoint.
    pub dst: IpAddr,
    /// VNI, for external devices.
    pub vni: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_print() {
        for ok in [
            "10.0.0.0/24",
            "0.0.0.0/0",
            "fd00::/64",
            "10.1.2.3/32",
            "::1/128",
        ] {
            let p: Prefix = ok.parse().expect(ok);
            assert_eq!(p.to_string(), ok);
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "x/1",
            "10.0.0.0/-1",
            "10.0.0.0/a",
        ] {
            let err = bad.parse::<Prefix>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "02:00:0a:ff:00:01".parse().expect("mac");
        assert_eq!(m.0, [2, 0, 10, 255, 0, 1]);
        assert_eq!(m.to_string(), "02:00:0a:ff:00:01");
        for bad in [
            "",
            "02:00",
            "02:00:0a:ff:00:01:02",
            "zz:00:0a:ff:00:01",
            "2:0:a:ff:0:1",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_gateway_must_match_the_destination_family() {
        let r = Route::via(Prefix::default_v4(), "fe80::1".parse().expect("ip"), None);
        let err = r.check().expect_err("mixed families");
        assert!(err.to_string().contains("fe80::1"), "{err}");
        Route::via(
            Prefix::default_v6(),
            "fe80::1".parse().expect("ip"),
            Some("eth0"),
        )
        .check()
        .expect("same family");
    }
}
