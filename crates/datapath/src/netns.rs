//! Endpoint network plumbing: a named network namespace, a veth pair with its host side in the
//! node's namespace, addresses, routes, and teardown.
//!
//! This drives the `ip` command (iproute2) rather than netlink directly: `ip netns add` does the
//! bind mount under /run/netns that `ip netns exec` and `nsenter --net=` expect, and every step
//! stays reproducible by hand when debugging a node.
//!
//! Routing: inside the namespace, `eth0` holds the endpoint's IPv4 /32 and IPv6 /128; IPv4
//! uses `default dev eth0` (every destination on-link) and the host veth answers ARP for
//! whatever the node routes elsewhere (proxy ARP, without the default 0.8 s proxy delay); IPv6
//! uses `default via fe80::1`, an address every host veth carries. On the node, a /32 and /128
//! route per endpoint point at its host veth, and forwarding is switched on for the families
//! in use (for IPv6 that stops the node's interfaces from accepting router advertisements).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use crate::error::DatapathError;

/// Prefix of the namespaces this module creates.
pub const NETNS_PREFIX: &str = "sigil-";
/// Link-local gateway address of every host veth, the endpoints' IPv6 default route.
pub const IPV6_GATEWAY: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// What to create for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Endpoint name: 1-64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
    pub name: String,
    /// IPv4 address (a /32 on eth0).
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address (a /128 on eth0).
    pub ipv6: Option<Ipv6Addr>,
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
    let path = format!("/sys/class/net/{interface}/ifindex");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| DatapathError::io(format!("reading {path}"), e))?;
    text.trim()
        .parse()
        .map_err(|_| DatapathError::invalid("ifindex", text.trim(), format!("in {path}")))
}

/// Whether an interface exists in the node's namespace.
pub fn interface_exists(interface: &str) -> bool {
    PathBuf::from(format!("/sys/class/net/{interface}")).exists()
}

/// Whether an endpoint's namespace exists.
pub fn netns_exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(netns_name(name)).exists()
}

/// A `Command` that runs `program` inside an endpoint's namespace (`ip netns exec`).
pub fn command_in(name: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec"])
        .arg(netns_name(name))
        .arg(program);
    cmd
}

/// Creates an endpoint's namespace, veth pair, addresses and routes.
///
/// Fails with a clear error if the namespace or host veth already exists; if a later step
/// fails, what was created is removed again.
pub fn create_endpoint(spec: &EndpointSpec) -> Result<EndpointNet, DatapathError> {
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
    let ns = netns_name(&spec.name);
    let host = host_interface_name(&spec.name);
    if netns_exists(&spec.name) {
        return Err(DatapathError::invalid(
            "endpoint name",
            &spec.name,
            format!("network namespace {ns} already exists"),
        ));
    }
    if interface_exists(&host) {
        return Err(DatapathError::invalid(
            "endpoint name",
            &spec.name,
            format!("host interface {host} already exists"),
        ));
    }
    ip(&["netns", "add", &ns])?;
    match plumb(spec, &ns, &host) {
        Ok(net) => Ok(net),
        Err(e) => {
            if let Err(cleanup) = delete_endpoint(&spec.name) {
                tracing::warn!(endpoint = %spec.name, error = %cleanup, "cleanup after failed create");
            }
            Err(e)
        }
    }
}

fn plumb(spec: &EndpointSpec, ns: &str, host: &str) -> Result<EndpointNet, DatapathError> {
    ip(&[
        "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    if spec.ipv4.is_some() {
        write_sysctl(&format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1")?;
        write_sysctl(&format!("/proc/sys/net/ipv4/neigh/{host}/proxy_delay"), "0")?;
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    }
    if spec.ipv6.is_some() {
        write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{IPV6_GATEWAY}/64"),
            "dev",
            host,
            "nodad",
        ])?;
    }
    ip(&["link", "set", host, "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    if let Some(a) = spec.ipv4 {
        ip(&["-n", ns, "addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        ip(&["-n", ns, "route", "replace", "default", "dev", "eth0"])?;
        ip(&["route", "replace", &format!("{a}/32"), "dev", host])?;
    }
    if let Some(a) = spec.ipv6 {
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            &IPV6_GATEWAY.to_string(),
            "dev",
            "eth0",
        ])?;
        ip(&["-6", "route", "replace", &format!("{a}/128"), "dev", host])?;
    }
    Ok(EndpointNet {
        name: spec.name.clone(),
        netns: ns.to_owned(),
        netns_path: PathBuf::from("/run/netns").join(ns),
        host_interface: host.to_owned(),
        endpoint_id: ifindex(host)?,
        interface: "eth0".to_owned(),
        ipv4: spec.ipv4,
        ipv6: spec.ipv6,
    })
}

/// Removes an endpoint's veth pair (its routes go with it) and namespace; missing parts are
/// fine, so it also cleans up after a partial create.
pub fn delete_endpoint(name: &str) -> Result<(), DatapathError> {
    validate_name(name)?;
    let host = host_interface_name(name);
    if interface_exists(&host) {
        ip(&["link", "del", &host])?;
    }
    if netns_exists(name) {
        ip(&["netns", "del", &netns_name(name)])?;
    }
    Ok(())
}

/// Endpoint names that have a namespace (from /run/netns).
pub fn list_endpoints() -> Result<Vec<String>, DatapathError> {
    let dir = match std::fs::read_dir("/run/netns") {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DatapathError::io("reading /run/netns", e)),
    };
    let mut out: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix(NETNS_PREFIX).map(str::to_owned))
        .collect();
    out.sort();
    Ok(out)
}

/// Adds a route that discards traffic to `cidr` (e.g. the pod CIDR) unless a more specific
/// endpoint route matches, so packets to unassigned pod addresses never leave the node.
pub fn blackhole_route(cidr: &str) -> Result<(), DatapathError> {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    ip(&[family, "route", "replace", "blackhole", cidr])
}

/// Removes a route added by [`blackhole_route`] (absent is fine).
pub fn remove_blackhole_route(cidr: &str) -> Result<(), DatapathError> {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    match ip(&[family, "route", "del", "blackhole", cidr]) {
        Ok(()) => Ok(()),
        Err(DatapathError::Command { stderr, .. }) if stderr.contains("No such process") => Ok(()),
        Err(e) => Err(e),
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), DatapathError> {
    std::fs::write(path, value)
        .map_err(|e| DatapathError::io(format!("writing {value} to {path}"), e))
}

fn ip(args: &[&str]) -> Result<(), DatapathError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| DatapathError::io("running `ip` (install iproute2)", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DatapathError::Command {
            command: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
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
