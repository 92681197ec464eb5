//! The carrier between nodes: one collect-metadata ("external") VXLAN device per node, whose
//! VNI is the packet's source identity (Cilium's VXLAN tunnel, UDP 8472).
//!
//! Sending: `sigil_from_ep` sets the tunnel key (VNI = the source endpoint's identity, remote
//! = the destination's IPCache tunnel endpoint) and redirects the packet to the VXLAN device;
//! the kernel builds the outer headers and routes them on the underlay. The host's own packets
//! to other nodes' pods (routed into the device by [`Datapath::route_via_tunnel`]) get their
//! key at the device's egress (`sigil_to_tunnel`) with VNI 6 (remote-node at the receiver).
//! Receiving: `sigil_from_tunnel` at the device's ingress checks the outer source (a node),
//! the VNI (a cluster identity or 6), the inner source (an address that node hosts) and the
//! inner destination (this node), and hands the identity to the endpoint's `sigil_to_ep` in
//! the skb mark, which trusts the mark only for packets that arrived on the device.
//!
//! With an underlay device ([`TunnelConfig::underlay`]) the programs do the device's work
//! themselves for endpoints' packets, with the same bytes on the wire: `sigil_from_ep` writes
//! the outer headers in place and sends the frame to the next hop's neighbour on the underlay
//! device, and `sigil_from_underlay` at the underlay device's ingress decapsulates what is for a
//! local endpoint after the same checks, and delivers it into the endpoint's namespace. That
//! skips, per packet, the device's route lookup, UDP socket lookup, VXLAN receive and GRO cell
//! queue. Whatever the programs do not take (packets too large for the underlay once
//! encapsulated, packets for the node itself, anything not plainly well formed) still goes
//! through the device, and its checks. The encrypted carrier needs the device path: its
//! packets must reach the TUN device through the routing table.

use std::net::{IpAddr, Ipv4Addr};

use aya::maps::{Array, MapData};
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, Vxlan, validate_ifname};

use crate::abi::TunnelConfigRaw;
use crate::error::DatapathError;
use crate::loader::{Datapath, TUNNEL_HOOKS, UNDERLAY_HOOKS};
use crate::maps::MAP_TUNNEL;

/// Name of the VXLAN device [`TunnelConfig::new`] uses.
pub const DEFAULT_DEVICE: &str = "sigil_vxlan";
/// UDP port of the carrier (Cilium's; also Linux's VXLAN default).
pub const DEFAULT_PORT: u16 = 8472;
/// Bytes VXLAN adds over an IPv4 underlay: outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
/// Endpoints whose MTU is the underlay's have their larger packets fragmented on the underlay;
/// lower their MTU by this much to avoid it.
pub const VXLAN_OVERHEAD: u32 = 50;
/// First identity that is not reserved (Cilium's cluster-scoped identities start here).
pub const IDENTITY_CLUSTER_MIN: u32 = 256;
/// Largest identity a 24-bit VNI holds; node-local identities (bit 24) never fit.
pub const VNI_MAX: u32 = 0xff_ffff;

/// Whether an identity may travel as a VNI: remote-node (6, a node's own traffic) or a cluster
/// identity (256..=0xffffff). 0, the other reserved identities and node-local ones may not; the
/// datapath drops them with [`crate::DROP_INVALID_IDENTITY`] on either side.
pub fn vni_ok(identity: u32) -> bool {
    identity == crate::IDENTITY_REMOTE_NODE || (IDENTITY_CLUSTER_MIN..=VNI_MAX).contains(&identity)
}

/// This node's end of the carrier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The VXLAN device (created if missing, adopted if present).
    pub device: String,
    /// UDP destination port.
    pub port: u16,
    /// This node's underlay address: the outer source of what it sends, and what other nodes
    /// know it by (their [`crate::IpCache::upsert_node`] entry for it).
    pub local_ip: Ipv4Addr,
    /// MTU of the device, i.e. of the packets it carries before encapsulation: the underlay's
    /// minus [`VXLAN_OVERHEAD`], so that encapsulated packets are never fragmented on the
    /// underlay. Endpoints whose traffic crosses the tunnel take it too
    /// ([`Datapath::tunnel_mtu`]).
    pub mtu: u32,
    /// The underlay device the programs encapsulate onto and decapsulate from themselves (the
    /// one that holds `local_ip`, see [`device_with_address`]); `None`: the VXLAN device does
    /// both for every packet.
    pub underlay: Option<String>,
}

/// The underlay MTU [`TunnelConfig::new`] assumes (Ethernet's).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

impl TunnelConfig {
    /// [`DEFAULT_DEVICE`] on [`DEFAULT_PORT`] with this node's underlay address.
    pub fn new(local_ip: Ipv4Addr) -> Self {
        Self {
            device: DEFAULT_DEVICE.to_owned(),
            port: DEFAULT_PORT,
            local_ip,
            mtu: DEFAULT_UNDERLAY_MTU - VXLAN_OVERHEAD,
            underlay: None,
        }
    }

    /// [`TunnelConfig::new`], with the programs encapsulating onto `underlay` themselves.
    pub fn direct(local_ip: Ipv4Addr, underlay: &str) -> Self {
        Self {
            underlay: Some(underlay.to_owned()),
            ..Self::new(local_ip)
        }
    }

    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<(), DatapathError> {
        validate_ifname(&self.device)
            .map_err(|e| DatapathError::invalid("tunnel device", &self.device, e.to_string()))?;
        if let Some(u) = &self.underlay {
            validate_ifname(u)
                .map_err(|e| DatapathError::invalid("tunnel underlay", u, e.to_string()))?;
            if *u == self.device {
                return Err(DatapathError::invalid(
                    "tunnel underlay",
                    u,
                    "must be the device that holds local_ip, not the VXLAN device",
                ));
            }
        }
        if self.port == 0 {
            return Err(DatapathError::invalid(
                "tunnel port",
                self.port,
                "must be a UDP port (1-65535)",
            ));
        }
        if !(1280..=65535 - VXLAN_OVERHEAD).contains(&self.mtu) {
            return Err(DatapathError::invalid(
                "tunnel mtu",
                self.mtu,
                format!(
                    "must be 1280-{} (IPv6's minimum to the largest that still encapsulates)",
                    65535 - VXLAN_OVERHEAD
                ),
            ));
        }
        let a = self.local_ip;
        if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
            return Err(DatapathError::invalid(
                "tunnel local_ip",
                a,
                "must be this node's unicast underlay address",
            ));
        }
        Ok(())
    }
}

/// The `sigil_tunnel` array: this node's tunnel device and underlay address.
pub(crate) struct TunnelMap {
    array: Array<MapData, TunnelConfigRaw>,
}

impl TunnelMap {
    pub(crate) fn new(array: Array<MapData, TunnelConfigRaw>) -> Self {
        Self { array }
    }

    pub(crate) fn get(&self) -> Result<TunnelConfigRaw, DatapathError> {
        self.array
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_TUNNEL, "lookup", e))
    }

    pub(crate) fn set(&mut self, v: TunnelConfigRaw) -> Result<(), DatapathError> {
        self.array
            .set(0, v, 0)
            .map_err(|e| DatapathError::map(MAP_TUNNEL, "update", e))
    }
}

/// Creates the collect-metadata VXLAN device of `cfg` (learning off, no ARP: the eBPF programs
/// choose every packet's remote) or adopts an existing device of that name as it is, switches
/// off reverse-path filtering on it (the host's own packets from other nodes come through it
/// with the sender's underlay address, which routes via the uplink), and brings it up.
/// Returns its ifindex. Idempotent.
pub fn ensure_device(nl: &dyn Netlink, cfg: &TunnelConfig) -> Result<u32, DatapathError> {
    cfg.validate()?;
    let ns = Ns::Current;
    if nl.link_index(ns, &cfg.device)?.is_none() {
        nl.add_vxlan(
            ns,
            &Vxlan {
                name: cfg.device.clone(),
                vni: None,
                port: cfg.port,
                local: Some(IpAddr::V4(cfg.local_ip)),
                dev: None,
                external: true,
                learning: false,
                arp: false,
            },
        )?;
    }
    nl.set_sysctl(ns, &format!("net/ipv4/conf/{}/rp_filter", cfg.device), "0")?;
    // Set on an adopted device too: a device left by an older netd may have the kernel's 1500.
    nl.set_mtu(ns, &cfg.device, cfg.mtu)?;
    nl.set_link_up(ns, &cfg.device, true)?;
    nl.link_index(ns, &cfg.device)?.ok_or_else(|| {
        DatapathError::invalid("tunnel device", &cfg.device, "vanished while being set up")
    })
}

/// The interface (in the current network namespace) that holds `ip`, if one does and it is
/// not a loopback device: the underlay device of a node whose underlay address is `ip`.
pub fn device_with_address(ip: Ipv4Addr) -> Result<Option<String>, DatapathError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| DatapathError::io("listing interface addresses", e.into()))?;
    Ok(addrs
        .filter(|a| {
            !a.flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
                && a.address
                    .as_ref()
                    .and_then(|s| s.as_sockaddr_in())
                    .is_some_and(|s| s.ip() == ip)
        })
        .map(|a| a.interface_name)
        .next())
}

/// The underlay device that holds `ip` ([`device_with_address`]) and its MTU, if one does.
pub fn underlay_of(ip: Ipv4Addr) -> Result<Option<(String, u32)>, DatapathError> {
    let Some(dev) = device_with_address(ip)? else {
        return Ok(None);
    };
    match RtNetlink::new().link_mtu(Ns::Current, &dev)? {
        Some(mtu) => Ok(Some((dev, mtu))),
        // Gone between the two reads.
        None => Ok(None),
    }
}

/// The route that sends a prefix into the tunnel device.
pub fn tunnel_route(device: &str, addr: IpAddr, prefix_len: u8) -> Result<Route, DatapathError> {
    let prefix = Prefix::new(addr, prefix_len).map_err(|_| {
        DatapathError::invalid("prefix_len", prefix_len, format!("too long for {addr}"))
    })?;
    let bits = u32::from(prefix_len);
    let host_bits = match addr {
        IpAddr::V4(a) => bits < 32 && u32::from(a) & (u32::MAX >> bits) != 0,
        IpAddr::V6(a) => bits < 128 && u128::from(a) & (u128::MAX >> bits) != 0,
    };
    if host_bits {
        return Err(DatapathError::invalid(
            "prefix",
            format!("{addr}/{prefix_len}"),
            "has host bits set",
        ));
    }
    Ok(Route::dev(prefix, device))
}

impl Datapath {
    /// Sets up this node's end of the carrier: the VXLAN device ([`ensure_device`]), the
    /// tunnel programs on its ingress and egress hooks, and the device and `local_ip` in the
    /// `sigil_tunnel` map, which arms encapsulation. Idempotent (a second call replaces the
    /// programs in place). Returns the device's ifindex.
    pub fn setup_tunnel(&mut self, cfg: &TunnelConfig) -> Result<u32, DatapathError> {
        let nl = RtNetlink::new();
        let ifindex = ensure_device(&nl, cfg)?;
        self.attach_hooks(&cfg.device, &TUNNEL_HOOKS)?;
        // An underlay an earlier setup armed that is not this one's loses its filter (the
        // address moved, or the device changed); the map tells which, while its pin lives.
        let before = self.maps().tunnel.get()?.underlay_ifindex;
        let underlay_ifindex = match &cfg.underlay {
            Some(dev) => {
                let index = nl.link_index(Ns::Current, dev)?.ok_or_else(|| {
                    DatapathError::invalid("tunnel underlay", dev, "no such interface")
                })?;
                self.attach_hooks(dev, &UNDERLAY_HOOKS)?;
                index
            }
            None => {
                // No earlier run's filter may stay on the underlay: with its pins removed it
                // would keep an armed copy of the old map, and deliver past this setup (past
                // the encrypted carrier's drop of plaintext VXLAN, say).
                if let Some(dev) = device_with_address(cfg.local_ip)? {
                    Self::detach_hooks(&dev, &UNDERLAY_HOOKS)?;
                }
                0
            }
        };
        // (Never an endpoint's veth, should the index have been reused: the same hook holds
        // its program.)
        if before != 0
            && before != underlay_ifindex
            && before != ifindex
            && self.maps().endpoints.get(before)?.is_none()
            && let Ok(old) = nix::net::if_::if_indextoname(before)
        {
            Self::detach_hooks(&old.to_string_lossy(), &UNDERLAY_HOOKS)?;
        }
        self.maps_mut().tunnel.set(TunnelConfigRaw {
            ifindex,
            local_ipv4: cfg.local_ip.octets(),
            underlay_ifindex,
            port_be: cfg.port.to_be(),
            pad: [0; 2],
        })?;
        self.tunnel_device = Some(cfg.device.clone());
        self.underlay_device = cfg.underlay.clone();
        Ok(ifindex)
    }

    /// Disarms encapsulation (packets to other nodes' addresses then drop with
    /// [`crate::DROP_NO_TUNNEL`]) and deletes the VXLAN device set up by this `Datapath`
    /// (else [`DEFAULT_DEVICE`]), with its programs and routes. Idempotent.
    pub fn teardown_tunnel(&mut self) -> Result<(), DatapathError> {
        self.maps_mut().tunnel.set(TunnelConfigRaw::default())?;
        let device = self
            .tunnel_device
            .take()
            .unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
        let nl = RtNetlink::new();
        nl.delete_link(Ns::Current, &device)?;
        if let Some(underlay) = self.underlay_device.take()
            && nl.link_index(Ns::Current, &underlay)?.is_some()
        {
            Self::detach_hooks(&underlay, &UNDERLAY_HOOKS)?;
        }
        Ok(())
    }

    /// The MTU of the tunnel device set up by this `Datapath` ([`TunnelConfig::mtu`]), `None`
    /// without one. Endpoints whose traffic crosses the tunnel take it, so that their packets
    /// are not fragmented on the underlay.
    pub fn tunnel_mtu(&self) -> Result<Option<u32>, DatapathError> {
        match &self.tunnel_device {
            Some(dev) => Ok(RtNetlink::new().link_mtu(Ns::Current, dev)?),
            None => Ok(None),
        }
    }

    /// The tunnel device's ifindex and this node's underlay address, if a tunnel is set up
    /// (read from the pinned map, so it survives a restart).
    pub fn tunnel(&self) -> Result<Option<(u32, Ipv4Addr)>, DatapathError> {
        let raw = self.maps().tunnel.get()?;
        Ok((raw.ifindex != 0).then(|| (raw.ifindex, Ipv4Addr::from(raw.local_ipv4))))
    }

    /// Routes a prefix (another node's pod CIDR) into the tunnel device, so that the host's
    /// own packets to it are carried (with VNI 6). Packets from local endpoints do not need
    /// the route: they are redirected into the tunnel by their IPCache entry's tunnel
    /// endpoint. Needs [`Datapath::setup_tunnel`] first. Idempotent (`ip route replace`).
    pub fn route_via_tunnel(&self, addr: IpAddr, prefix_len: u8) -> Result<(), DatapathError> {
        let route = tunnel_route(self.tunnel_device()?, addr, prefix_len)?;
        RtNetlink::new().replace_route(Ns::Current, &route)?;
        Ok(())
    }

    /// Removes a route added by [`Datapath::route_via_tunnel`] (absent routes are ignored).
    pub fn remove_route_via_tunnel(
        &self,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), DatapathError> {
        let route = tunnel_route(self.tunnel_device()?, addr, prefix_len)?;
        RtNetlink::new().delete_route(Ns::Current, &route)?;
        Ok(())
    }

    fn tunnel_device(&self) -> Result<&str, DatapathError> {
        self.tunnel_device.as_deref().ok_or_else(|| {
            DatapathError::invalid(
                "tunnel",
                "none",
                "no tunnel is set up by this datapath (call setup_tunnel first)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_netlink::FakeNetlink;

    #[test]
    fn only_cluster_identities_and_remote_node_travel() {
        for ok in [6, 256, 1000, 0xff_ffff] {
            assert!(vni_ok(ok), "{ok}");
        }
        for bad in [0, 1, 2, 5, 7, 255, 0x100_0000, 0x100_0001, u32::MAX] {
            assert!(!vni_ok(bad), "{bad}");
        }
    }

    #[test]
    fn bad_configs_name_the_field_and_value() {
        let ip = Ipv4Addr::new(192, 168, 1, 1);
        assert_eq!(TunnelConfig::new(ip).validate().ok(), Some(()));
        let cases = [
            (
                TunnelConfig {
                    port: 0,
                    ..TunnelConfig::new(ip)
                },
                "tunnel port",
                "0",
            ),
            (
                TunnelConfig {
                    device: "a-name-longer-than-15".into(),
                    ..TunnelConfig::new(ip)
                },
                "tunnel device",
                "a-name-longer-than-15",
            ),
            (
                TunnelConfig {
                    mtu: 1279,
                    ..TunnelConfig::new(ip)
                },
                "tunnel mtu",
                "1279",
            ),
            (
                TunnelConfig::new(Ipv4Addr::UNSPECIFIED),
                "tunnel local_ip",
                "0.0.0.0",
            ),
            (
                TunnelConfig::new(Ipv4Addr::new(224, 0, 0, 1)),
                "tunnel local_ip",
                "224.0.0.1",
            ),
        ];
        for (cfg, field, value) in cases {
            let err = cfg.validate().expect_err(field).to_string();
            assert!(err.contains(field) && err.contains(value), "{err}");
        }
        let err = ensure_device(&FakeNetlink::new(), &TunnelConfig::new(Ipv4Addr::LOCALHOST))
            .expect_err("loopback");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
    }

    #[test]
    fn the_device_is_created_once_external_without_learning_or_arp() {
        let nl = FakeNetlink::new();
        let cfg = TunnelConfig::new(Ipv4Addr::new(192, 168, 7, 1));
        let first = ensure_device(&nl, &cfg).expect("create");
        let again = ensure_device(&nl, &cfg).expect("adopt");
        assert_eq!(first, again);
        let adds: Vec<_> = nl
            .ops()
            .into_iter()
            .filter(|op| matches!(op, sigil_netlink::Op::AddVxlan { .. }))
            .collect();
        assert_eq!(adds.len(), 1, "{adds:?}");
        let sigil_netlink::Op::AddVxlan { vxlan, .. } = &adds[0] else {
            unreachable!()
        };
        assert_eq!(
            (
                vxlan.external,
                vxlan.learning,
                vxlan.arp,
                vxlan.port,
                vxlan.vni
            ),
            (true, false, false, DEFAULT_PORT, None)
        );
        assert_eq!(vxlan.local, Some(IpAddr::V4(cfg.local_ip)));
    }

    #[test]
    fn routes_refuse_host_bits() {
        let r = tunnel_route(DEFAULT_DEVICE, "10.2.0.0".parse().expect("ip"), 16).expect("ok");
        assert_eq!(r.to_string(), "route 10.2.0.0/16 dev sigil_vxlan");
        let err = tunnel_route(DEFAULT_DEVICE, "10.2.0.1".parse().expect("ip"), 16)
            .expect_err("host bits");
        assert!(err.to_string().contains("10.2.0.1/16"), "{err}");
        let err = tunnel_route(DEFAULT_DEVICE, "10.2.0.0".parse().expect("ip"), 33)
            .expect_err("too long");
        assert!(err.to_string().contains("33"), "{err}");
        tunnel_route(DEFAULT_DEVICE, "fd00:2::".parse().expect("ip"), 64).expect("v6");
    }
}
