//! Endpoint network plumbing: a named network namespace, a veth pair with its host side in the
//! node's namespace, addresses, routes, and teardown.
//!
//! Everything goes through [`sigil_netlink::Netlink`] (netlink, no `ip` processes); the
//! namespaces follow the iproute2 convention (`/run/netns/NAME`), so `ip netns exec` and
//! `nsenter --net=` still work when debugging a node. The `*_with` functions take the
//! implementation, so the logic is testable without root against `FakeNetlink`.
//!
//! Routing: inside the namespace, `eth0` holds the endpoint's IPv4 /32 and IPv6 /128; IPv4
//! uses `default dev eth0` (every destination on-link) and the host veth answers ARP for
//! whatever the node routes elsewhere (proxy ARP, without the default 0.8 s proxy delay); IPv6
//! uses `default via fe80::1`, an address every host veth carries. On the node, a /32 and /128
//! route per endpoint point at its host veth, and forwarding is switched on for the families
//! in use (for IPv6 that stops the node's interfaces from accepting router advertisements).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, command_in_netns, netns_path};

use crate::error::DatapathError;

/// Prefix of the namespaces this module creates.
pub const NETNS_PREFIX: &str = "sigil-";
/// Link-local gateway address of every host veth, the endpoints' IPv6 default route.
pub const IPV6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Interface name of an endpoint inside its namespace.
pub const ENDPOINT_INTERFACE: &str = "eth0";

/// The kernel implementation the functions without `_with` use.
const KERNEL: RtNetlink = RtNetlink;

/// Smallest endpoint MTU: IPv6's minimum link MTU (endpoints carry IPv6).
pub const ENDPOINT_MTU_MIN: u32 = 1280;
/// Largest endpoint MTU: a veth's maximum.
pub const ENDPOINT_MTU_MAX: u32 = 65535;

/// What to create for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Endpoint name: 1-64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
    pub name: String,
    /// IPv4 address (a /32 on eth0).
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address (a /128 on eth0).
    pub ipv6: Option<Ipv6Addr>,
    /// MTU of the endpoint's interface, `None` for the kernel's (1500). Over a tunnel it must
    /// leave room for the encapsulation (the tunnel device's MTU), or every full-sized packet
    /// is fragmented on the underlay.
    pub mtu: Option<u32>,
}

/// A created endpoint's network side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointNet {
    /// Endpoint name.
    pub name: String,
    /// Namespace name (`sigil-<name>`), usable with `ip netns exec`.
    pub netns: String,
    /// Namespace path (`/run/netns/sigil-<name>`), usable with `nsenter --net=`.
    pub netns_path: PathBuf,
    /// Host-side veth name (`lxc` + 12 hex digits).
    pub host_interface: String,
    /// Host-side veth ifindex: the endpoint id in the datapath maps.
    pub endpoint_id: u32,
    /// Interface name inside the namespace.
    pub interface: String,
    /// IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
}

/// Checks an endpoint name.
pub fn validate_name(name: &str) -> Result<(), DatapathError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(DatapathError::invalid(
            "endpoint name",
            name,
            "must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.' or '-'",
        ));
    }
    Ok(())
}

/// Namespace name of an endpoint.
pub fn netns_name(name: &str) -> String {
    format!("{NETNS_PREFIX}{name}")
}

/// Host-side veth name of an endpoint: `lxc` and 48 bits of an FNV-1a hash (15 characters,
/// the kernel's limit).
pub fn host_interface_name(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("lxc{:012x}", h & 0xffff_ffff_ffff)
}

/// The ifindex of an interface in the node's namespace.
pub fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    KERNEL.link_index(Ns::Current, interface)?.ok_or_else(|| {
        DatapathError::invalid(
            "interface",
            interface,
            "not found in the node's network namespace",
        )
    })
}

/// Whether an interface exists in the node's namespace.
pub fn interface_exists(interface: &str) -> bool {
    matches!(KERNEL.link_index(Ns::Current, interface), Ok(Some(_)))
}

/// Whether an endpoint's namespace exists.
pub fn netns_exists(name: &str) -> bool {
    KERNEL.netns_exists(&netns_name(name))
}

/// A `Command` that runs `program` inside an endpoint's namespace (the child enters it
/// between fork and exec).
pub fn command_in(name: &str, program: &str) -> Command {
    command_in_netns(&netns_path(&netns_name(name)), program)
}

/// Creates an endpoint's namespace, veth pair, addresses and routes.
///
/// Fails with a clear error if the namespace or host veth already exists; if a later step
/// fails, what was created is removed again.
pub fn create_endpoint(spec: &EndpointSpec) -> Result<EndpointNet, DatapathError> {
    create_endpoint_with(&KERNEL, spec)
}

/// [`create_endpoint`] through a given [`Netlink`].
pub fn create_endpoint_with(
    nl: &dyn Netlink,
    spec: &EndpointSpec,
) -> Result<EndpointNet, DatapathError> {
    validate_name(&spec.name)?;
    if let Some(a) = spec.ipv4
        && (a.is_unspecified() || a.is_multicast() || a.is_broadcast())
    {
        return Err(DatapathError::invalid("ipv4", a, "not a unicast address"));
    }
    if let Some(a) = spec.ipv6
        && (a.is_unspecified() || a.is_multicast())
    {
        return Err(DatapathError::invalid("ipv6", a, "not a unicast address"));
    }
    if let Some(m) = spec.mtu
        && !(ENDPOINT_MTU_MIN..=ENDPOINT_MTU_MAX).contains(&m)
    {
        return Err(DatapathError::invalid(
            "mtu",
            m,
            format!(
                "must be {ENDPOINT_MTU_MIN}-{ENDPOINT_MTU_MAX} (IPv6's minimum to a veth's maximum)"
            ),
        ));
    }
    let ns = netns_name(&spec.name);
    let host = host_interface_name(&spec.name);
    if nl.netns_exists(&ns) {
        return Err(DatapathError::invalid(
            "endpoint name",
            &spec.name,
            format!("network namespace {ns} already exists"),
        ));
    }
    if nl.link_index(Ns::Current, &host)?.is_some() {
        return Err(DatapathError::invalid(
            "endpoint name",
            &spec.name,
            format!("host interface {host} already exists"),
        ));
    }
    let path = nl.add_netns(&ns)?;
    match plumb(nl, spec, &ns, &host, path) {
        Ok(net) => Ok(net),
        Err(e) => {
            if let Err(cleanup) = delete_endpoint_with(nl, &spec.name) {
                tracing::warn!(endpoint = %spec.name, error = %cleanup, "cleanup after failed create");
            }
            Err(e)
        }
    }
}

fn plumb(
    nl: &dyn Netlink,
    spec: &EndpointSpec,
    ns: &str,
    host: &str,
    path: PathBuf,
) -> Result<EndpointNet, DatapathError> {
    let node = Ns::Current;
    let inside = Ns::Named(ns);
    let eth0 = ENDPOINT_INTERFACE;
    nl.add_veth(node, host, eth0, Some(ns))?;
    if let Some(mtu) = spec.mtu {
        nl.set_mtu(inside, eth0, mtu)?;
    }
    if spec.ipv4.is_some() {
        nl.set_sysctl(node, &format!("net/ipv4/conf/{host}/proxy_arp"), "1")?;
        nl.set_sysctl(node, &format!("net/ipv4/neigh/{host}/proxy_delay"), "0")?;
        nl.set_sysctl(node, "net/ipv4/ip_forward", "1")?;
    }
    if spec.ipv6.is_some() {
        nl.set_sysctl(node, "net/ipv6/conf/all/forwarding", "1")?;
        nl.add_address(node, host, IpAddr::V6(IPV6_GATEWAY), 64, true)?;
    }
    nl.set_link_up(node, host, true)?;
    nl.set_link_up(inside, "lo", true)?;
    nl.set_link_up(inside, eth0, true)?;
    if let Some(a) = spec.ipv4 {
        let a = IpAddr::V4(a);
        nl.add_address(inside, eth0, a, 32, false)?;
        nl.replace_route(inside, &Route::dev(Prefix::default_v4(), eth0))?;
        nl.replace_route(node, &Route::dev(Prefix::host(a), host))?;
    }
    if let Some(a) = spec.ipv6 {
        let a = IpAddr::V6(a);
        nl.add_address(inside, eth0, a, 128, true)?;
        nl.replace_route(
            inside,
            &Route::via(Prefix::default_v6(), IpAddr::V6(IPV6_GATEWAY), Some(eth0)),
        )?;
        nl.replace_route(node, &Route::dev(Prefix::host(a), host))?;
    }
    let endpoint_id = nl.link_index(node, host)?.ok_or_else(|| {
        DatapathError::invalid("interface", host, "vanished while the endpoint was created")
    })?;
    Ok(EndpointNet {
        name: spec.name.clone(),
        netns: ns.to_owned(),
        netns_path: path,
        host_interface: host.to_owned(),
        endpoint_id,
        interface: eth0.to_owned(),
        ipv4: spec.ipv4,
        ipv6: spec.ipv6,
    })
}

/// Removes an endpoint's veth pair (its routes go with it) and namespace; missing parts are
/// fine, so it also cleans up after a partial create.
pub fn delete_endpoint(name: &str) -> Result<(), DatapathError> {
    delete_endpoint_with(&KERNEL, name)
}

/// [`delete_endpoint`] through a given [`Netlink`].
pub fn delete_endpoint_with(nl: &dyn Netlink, name: &str) -> Result<(), DatapathError> {
    validate_name(name)?;
    nl.delete_link(Ns::Current, &host_interface_name(name))?;
    nl.delete_netns(&netns_name(name))?;
    Ok(())
}

/// Endpoint names that have a namespace (from /run/netns).
pub fn list_endpoints() -> Result<Vec<String>, DatapathError> {
    list_endpoints_with(&KERNEL)
}

/// [`list_endpoints`] through a given [`Netlink`].
pub fn list_endpoints_with(nl: &dyn Netlink) -> Result<Vec<String>, DatapathError> {
    Ok(nl
        .list_netns()?
        .into_iter()
        .filter_map(|n| n.strip_prefix(NETNS_PREFIX).map(str::to_owned))
        .collect())
}

fn parse_cidr(cidr: &str) -> Result<Prefix, DatapathError> {
    cidr.parse()
        .map_err(|_| DatapathError::invalid("cidr", cidr, "expected ADDRESS/LENGTH"))
}

/// Adds a route that discards traffic to `cidr` (e.g. the pod CIDR) unless a more specific
/// endpoint route matches, so packets to unassigned pod addresses never leave the node.
pub fn blackhole_route(cidr: &str) -> Result<(), DatapathError> {
    blackhole_route_with(&KERNEL, cidr)
}

/// [`blackhole_route`] through a given [`Netlink`].
pub fn blackhole_route_with(nl: &dyn Netlink, cidr: &str) -> Result<(), DatapathError> {
    nl.replace_route(Ns::Current, &Route::blackhole(parse_cidr(cidr)?))?;
    Ok(())
}

/// Removes a route added by [`blackhole_route`] (absent is fine).
pub fn remove_blackhole_route(cidr: &str) -> Result<(), DatapathError> {
    remove_blackhole_route_with(&KERNEL, cidr)
}

/// [`remove_blackhole_route`] through a given [`Netlink`].
pub fn remove_blackhole_route_with(nl: &dyn Netlink, cidr: &str) -> Result<(), DatapathError> {
    nl.delete_route(Ns::Current, &Route::blackhole(parse_cidr(cidr)?))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_fit_the_kernel_limit_and_differ() {
        let a = host_interface_name("frontend");
        let b = host_interface_name("backend");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("lxc"));
        assert_ne!(a, b);
        assert_eq!(a, host_interface_name("frontend"));
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            let err = validate_name(bad).expect_err(bad);
            assert!(err.to_string().contains("endpoint name"), "{err}");
        }
        for good in ["frontend", "a", "web-1.prod_x"] {
            validate_name(good).expect(good);
        }
    }
}
