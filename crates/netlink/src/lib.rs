//! The node's network plumbing through netlink: named network namespaces, veth pairs, bridges,
//! VXLAN devices, addresses, routes, neighbours and FDB entries, behind the [`Netlink`] trait so
//! that the logic using it can be tested without root against [`FakeNetlink`].
//!
//! Every operation names the namespace it acts in ([`Ns`]). [`RtNetlink`] runs each one on a
//! dedicated thread that enters that namespace first and opens its netlink socket there, so the
//! socket (and every `/proc/sys/net` write) belongs to that namespace while the calling thread
//! never moves.

pub mod error;
pub mod fake;
pub mod namespace;
pub mod rt;
pub mod types;

pub use error::NetlinkError;
pub use fake::{FAKE_DEFAULT_MTU, FakeNetlink, Op};
pub use namespace::{NETNS_DIR, command_in_netns, netns_path};
pub use rt::RtNetlink;
pub use types::{Fdb, Mac, Ns, Prefix, Route, RouteVia, Vxlan};

use std::net::IpAddr;
use std::path::PathBuf;

/// The kernel's limit on interface names (IFNAMSIZ less the terminating NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Network plumbing operations. Each acts in the namespace given by `ns`.
///
/// Deletions report whether there was something to delete, so that teardown after a partial
/// setup needs no extra queries.
pub trait Netlink: Send + Sync {
    /// Creates the named namespace `/run/netns/<name>` (as `ip netns add` does) and returns its
    /// path; fails if it exists.
    fn add_netns(&self, name: &str) -> Result<PathBuf, NetlinkError>;
    /// Removes a named namespace; `false` if it did not exist.
    fn delete_netns(&self, name: &str) -> Result<bool, NetlinkError>;
    /// Whether a named namespace exists.
    fn netns_exists(&self, name: &str) -> bool;
    /// Names of all named namespaces, sorted.
    fn list_netns(&self) -> Result<Vec<String>, NetlinkError>;

    /// Creates a veth pair `name` (in `ns`) and `peer`, the peer directly in namespace
    /// `peer_ns` when given (so its name never clashes with one in `ns`).
    fn add_veth(
        &self,
        ns: Ns<'_>,
        name: &str,
        peer: &str,
        peer_ns: Option<&str>,
    ) -> Result<(), NetlinkError>;
    /// Creates a bridge device.
    fn add_bridge(&self, ns: Ns<'_>, name: &str) -> Result<(), NetlinkError>;
    /// Creates a VXLAN device.
    fn add_vxlan(&self, ns: Ns<'_>, vxlan: &Vxlan) -> Result<(), NetlinkError>;
    /// Attaches `link` to bridge `master`, or detaches it when `master` is `None`.
    fn set_master(&self, ns: Ns<'_>, link: &str, master: Option<&str>) -> Result<(), NetlinkError>;
    /// Moves `link` into the named namespace `target`.
    fn move_link(&self, ns: Ns<'_>, link: &str, target: &str) -> Result<(), NetlinkError>;
    /// Sets a link up or down.
    fn set_link_up(&self, ns: Ns<'_>, link: &str, up: bool) -> Result<(), NetlinkError>;
    /// Deletes a link (and its veth peer); `false` if it did not exist.
    fn delete_link(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetlinkError>;
    /// The ifindex of a link, `None` if it does not exist.
    fn link_index(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError>;
    /// Sets a link's MTU (bytes of IP packet it carries).
    fn set_mtu(&self, ns: Ns<'_>, link: &str, mtu: u32) -> Result<(), NetlinkError>;
    /// A link's MTU, `None` if the link does not exist.
    fn link_mtu(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError>;

    /// Adds an address to a link; `nodad` skips IPv6 duplicate address detection.
    fn add_address(
        &self,
        ns: Ns<'_>,
        link: &str,
        address: IpAddr,
        prefix_len: u8,
        nodad: bool,
    ) -> Result<(), NetlinkError>;
    /// Adds or replaces a route in the main table.
    fn replace_route(&self, ns: Ns<'_>, route: &Route) -> Result<(), NetlinkError>;
    /// Deletes a route from the main table; `false` if there was none.
    fn delete_route(&self, ns: Ns<'_>, route: &Route) -> Result<bool, NetlinkError>;
    /// Adds or replaces a permanent neighbour entry.
    fn replace_neighbour(
        &self,
        ns: Ns<'_>,
        link: &str,
        address: IpAddr,
        mac: Mac,
    ) -> Result<(), NetlinkError>;
    /// Adds or replaces a forwarding-database entry on a (VXLAN) device.
    fn replace_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<(), NetlinkError>;
    /// Deletes a forwarding-database entry; `false` if there was none.
    fn delete_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<bool, NetlinkError>;

    /// Writes `value` to `/proc/sys/<key>` as seen from `ns` (e.g. `net/ipv4/ip_forward`).
    fn set_sysctl(&self, ns: Ns<'_>, key: &str, value: &str) -> Result<(), NetlinkError>;
}

/// Checks an interface name against the kernel's rules.
pub fn validate_ifname(name: &str) -> Result<(), NetlinkError> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(NetlinkError::invalid(
            "interface name",
            name,
            "must be 1-15 bytes without '/', ':' or whitespace",
        ));
    }
    Ok(())
}

/// Checks a namespace name (a file name under [`NETNS_DIR`]).
pub fn validate_netns_name(name: &str) -> Result<(), NetlinkError> {
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.bytes().any(|b| b == b'/' || b == 0)
    {
        return Err(NetlinkError::invalid(
            "namespace name",
            name,
            "must be a file name: not empty, '.', '..', and without '/'",
        ));
    }
    Ok(())
}
