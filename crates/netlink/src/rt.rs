//! [`Netlink`] over the kernel, with rtnetlink: each call runs on a dedicated thread that enters
//! the target namespace, opens a netlink socket there and drives the request on a
//! single-threaded runtime. A thread per call costs tens of microseconds; `ip` costs a fork
//! and exec per step.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::namespace::{self, run_in};
use crate::{
    Fdb, Mac, Netlink, NetlinkError, Ns, Route, RouteVia, Vxlan, validate_ifname,
    validate_netns_name,
};

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

/// The kernel implementation of [`Netlink`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RtNetlink;

impl RtNetlink {
    /// A handle; it holds no socket (each call opens one in its namespace).
    pub fn new() -> Self {
        Self
    }
}

fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(code) => std::io::Error::from_raw_os_error(-code.get()),
            None => std::io::Error::other("netlink error without a code"),
        },
        other => std::io::Error::other(other.to_string()),
    }
}

/// Runs `f` with a netlink handle whose socket is in `ns`.
fn with_handle<T, F, Fut>(ns: Ns<'_>, f: F) -> Result<T, NetlinkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    run_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| NetlinkError::kernel("starting a netlink runtime in", ns, e))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| NetlinkError::kernel("opening a netlink socket in", ns, e))?;
            let driver = tokio::spawn(conn);
            let out = f(handle).await;
            driver.abort();
            out
        })
    })
}

fn object(what: &str, name: &str, ns: Ns<'_>) -> String {
    format!("{what} {name} in {ns}")
}

async fn index_of(
    h: &Handle,
    ns: Ns<'_>,
    link: &str,
    op: &'static str,
) -> Result<u32, NetlinkError> {
    lookup(h, ns, link)
        .await?
        .ok_or_else(|| NetlinkError::NoSuchLink {
            op,
            link: link.to_owned(),
            ns: ns.to_string(),
        })
}

async fn lookup(h: &Handle, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError> {
    validate_ifname(link)?;
    match h
        .link()
        .get()
        .match_name(link.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = io_error(e);
            if e.raw_os_error() == Some(ENODEV) {
                Ok(None)
            } else {
                Err(NetlinkError::kernel(
                    "looking up",
                    object("link", link, ns),
                    e,
                ))
            }
        }
    }
}

fn route_message(route: &Route, oif: Option<u32>, for_delete: bool) -> RouteMessage {
    let mut msg = match route.dst.addr() {
        IpAddr::V4(a) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, route.dst.len());
            if let RouteVia::Gateway {
                gateway: IpAddr::V4(g),
                ..
            } = &route.via
            {
                b = b.gateway(*g);
            }
            b.build()
        }
        IpAddr::V6(a) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, route.dst.len());
            if let RouteVia::Gateway {
                gateway: IpAddr::V6(g),
                ..
            } = &route.via
            {
                b = b.gateway(*g);
            }
            b.build()
        }
    };
    if let Some(i) = oif {
        msg.attributes
            .push(rtnetlink::packet_route::route::RouteAttribute::Oif(i));
    }
    match &route.via {
        RouteVia::Dev(_) => msg.header.scope = RouteScope::Link,
        RouteVia::Blackhole => msg.header.kind = RouteType::BlackHole,
        RouteVia::Gateway { .. } => {}
    }
    if for_delete {
        // Match whoever added it (iproute2 marks its routes `boot`) and any scope.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
    }
    msg
}

fn route_dev(route: &Route) -> Option<&str> {
    match &route.via {
        RouteVia::Dev(d) => Some(d),
        RouteVia::Gateway { dev, .. } => dev.as_deref(),
        RouteVia::Blackhole => None,
    }
}

fn fdb_message(index: u32, fdb: &Fdb) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(fdb.mac.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(match fdb.dst {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    if let Some(vni) = fdb.vni {
        msg.attributes.push(NeighbourAttribute::Vni(vni));
    }
    msg
}

fn absent(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOENT | ESRCH | ENODEV))
}

impl Netlink for RtNetlink {
    fn add_netns(&self, name: &str) -> Result<PathBuf, NetlinkError> {
        namespace::add(name)
    }

    fn delete_netns(&self, name: &str) -> Result<bool, NetlinkError> {
        namespace::delete(name)
    }

    fn netns_exists(&self, name: &str) -> bool {
        validate_netns_name(name).is_ok() && namespace::netns_path(name).exists()
    }

    fn list_netns(&self) -> Result<Vec<String>, NetlinkError> {
        namespace::list()
    }

    fn add_veth(
        &self,
        ns: Ns<'_>,
        name: &str,
        peer: &str,
        peer_ns: Option<&str>,
    ) -> Result<(), NetlinkError> {
        validate_ifname(name)?;
        validate_ifname(peer)?;
        let target = match peer_ns {
            Some(p) => {
                validate_netns_name(p)?;
                Some(
                    std::fs::File::open(namespace::netns_path(p))
                        .map_err(|e| NetlinkError::kernel("opening", format!("netns {p}"), e))?,
                )
            }
            None => None,
        };
        with_handle(ns, |h| async move {
            let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
            if let Some(f) = &target {
                peer_msg = peer_msg.setns_by_fd(f.as_raw_fd());
            }
            let msg = LinkVeth::new(name, peer)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
                .build();
            h.link().add(msg).execute().await.map_err(|e| {
                NetlinkError::kernel(
                    "adding",
                    format!(
                        "veth {name} in {ns} with peer {peer} in {}",
                        peer_ns.map_or_else(|| ns.to_string(), |p| format!("netns {p}"))
                    ),
                    io_error(e),
                )
            })
        })
    }

    fn add_bridge(&self, ns: Ns<'_>, name: &str) -> Result<(), NetlinkError> {
        validate_ifname(name)?;
        with_handle(ns, |h| async move {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::kernel("adding", object("bridge", name, ns), io_error(e))
                })
        })
    }

    fn add_vxlan(&self, ns: Ns<'_>, vx: &Vxlan) -> Result<(), NetlinkError> {
        validate_ifname(&vx.name)?;
        if vx.vni.is_none() && !vx.external {
            return Err(NetlinkError::invalid(
                "vxlan vni",
                "none",
                format!("device {} needs a VNI unless it is external", vx.name),
            ));
        }
        with_handle(ns, |h| async move {
            let mut b = LinkMessageBuilder::<LinkVxlan>::new(&vx.name)
                .port(vx.port)
                .learning(vx.learning)
                .arp(vx.arp);
            if let Some(vni) = vx.vni {
                b = b.id(vni);
            }
            if vx.external {
                b = b.collect_metadata(true);
            }
            match vx.local {
                Some(IpAddr::V4(a)) => b = b.local(a),
                Some(IpAddr::V6(a)) => b = b.local6(a),
                None => {}
            }
            if let Some(dev) = &vx.dev {
                b = b.dev(index_of(&h, ns, dev, "adding a vxlan device").await?);
            }
            h.link().add(b.build()).execute().await.map_err(|e| {
                NetlinkError::kernel("adding", object("vxlan", &vx.name, ns), io_error(e))
            })
        })
    }

    fn set_master(&self, ns: Ns<'_>, link: &str, master: Option<&str>) -> Result<(), NetlinkError> {
        with_handle(ns, |h| async move {
            let i = index_of(&h, ns, link, "setting a master").await?;
            let b = LinkUnspec::new_with_index(i);
            let msg = match master {
                Some(m) => b.controller(index_of(&h, ns, m, "setting a master").await?),
                None => b.nocontroller(),
            }
            .build();
            h.link().set(msg).execute().await.map_err(|e| {
                NetlinkError::kernel(
                    "setting the master of",
                    format!(
                        "{} to {}",
                        object("link", link, ns),
                        master.unwrap_or("none")
                    ),
                    io_error(e),
                )
            })
        })
    }

    fn move_link(&self, ns: Ns<'_>, link: &str, target: &str) -> Result<(), NetlinkError> {
        validate_netns_name(target)?;
        let file = std::fs::File::open(namespace::netns_path(target))
            .map_err(|e| NetlinkError::kernel("opening", format!("netns {target}"), e))?;
        with_handle(ns, |h| async move {
            let i = index_of(&h, ns, link, "moving a link").await?;
            let msg = LinkUnspec::new_with_index(i)
                .setns_by_fd(file.as_raw_fd())
                .build();
            h.link().set(msg).execute().await.map_err(|e| {
                NetlinkError::kernel(
                    "moving",
                    format!("{} to netns {target}", object("link", link, ns)),
                    io_error(e),
                )
            })
        })
    }

    fn set_link_up(&self, ns: Ns<'_>, link: &str, up: bool) -> Result<(), NetlinkError> {
        with_handle(ns, |h| async move {
            let op = if up { "setting up" } else { "setting down" };
            let i = index_of(&h, ns, link, op).await?;
            let b = LinkUnspec::new_with_index(i);
            let msg = if up { b.up() } else { b.down() }.build();
            h.link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::kernel(op, object("link", link, ns), io_error(e)))
        })
    }

    fn delete_link(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetlinkError> {
        with_handle(ns, |h| async move {
            let Some(i) = lookup(&h, ns, link).await? else {
                return Ok(false);
            };
            match h.link().del(i).execute().await.map_err(io_error) {
                Ok(()) => Ok(true),
                Err(e) if absent(&e) => Ok(false),
                Err(e) => Err(NetlinkError::kernel(
                    "deleting",
                    object("link", link, ns),
                    e,
                )),
            }
        })
    }

    fn link_index(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError> {
        with_handle(ns, |h| async move { lookup(&h, ns, link).await })
    }

    fn set_mtu(&self, ns: Ns<'_>, link: &str, mtu: u32) -> Result<(), NetlinkError> {
        with_handle(ns, |h| async move {
            let op = "setting the MTU of";
            let i = index_of(&h, ns, link, op).await?;
            let msg = LinkUnspec::new_with_index(i).mtu(mtu).build();
            h.link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| NetlinkError::kernel(op, object("link", link, ns), io_error(e)))
        })
    }

    fn link_mtu(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError> {
        validate_ifname(link)?;
        with_handle(ns, |h| async move {
            match h
                .link()
                .get()
                .match_name(link.to_owned())
                .execute()
                .try_next()
                .await
            {
                Ok(Some(m)) => Ok(m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(v) => Some(*v),
                    _ => None,
                })),
                Ok(None) => Ok(None),
                Err(e) => {
                    let e = io_error(e);
                    if e.raw_os_error() == Some(ENODEV) {
                        Ok(None)
                    } else {
                        Err(NetlinkError::kernel(
                            "reading the MTU of",
                            object("link", link, ns),
                            e,
                        ))
                    }
                }
            }
        })
    }

    fn add_address(
        &self,
        ns: Ns<'_>,
        link: &str,
        address: IpAddr,
        prefix_len: u8,
        nodad: bool,
    ) -> Result<(), NetlinkError> {
        crate::Prefix::new(address, prefix_len)?;
        with_handle(ns, |h| async move {
            let i = index_of(&h, ns, link, "adding an address").await?;
            let mut req = h.address().add(i, address, prefix_len);
            if nodad {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute().await.map_err(|e| {
                NetlinkError::kernel(
                    "adding",
                    format!(
                        "address {address}/{prefix_len} to {}",
                        object("link", link, ns)
                    ),
                    io_error(e),
                )
            })
        })
    }

    fn replace_route(&self, ns: Ns<'_>, route: &Route) -> Result<(), NetlinkError> {
        route.check()?;
        with_handle(ns, |h| async move {
            let oif = match route_dev(route) {
                Some(d) => Some(index_of(&h, ns, d, "adding a route").await?),
                None => None,
            };
            h.route()
                .add(route_message(route, oif, false))
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::kernel("replacing", format!("{route} in {ns}"), io_error(e))
                })
        })
    }

    fn delete_route(&self, ns: Ns<'_>, route: &Route) -> Result<bool, NetlinkError> {
        route.check()?;
        with_handle(ns, |h| async move {
            let oif = match route_dev(route) {
                Some(d) => match lookup(&h, ns, d).await? {
                    Some(i) => Some(i),
                    // The device is gone, and its routes with it.
                    None => return Ok(false),
                },
                None => None,
            };
            match h
                .route()
                .del(route_message(route, oif, true))
                .execute()
                .await
                .map_err(io_error)
            {
                Ok(()) => Ok(true),
                Err(e) if absent(&e) => Ok(false),
                Err(e) => Err(NetlinkError::kernel(
                    "deleting",
                    format!("{route} in {ns}"),
                    e,
                )),
            }
        })
    }

    fn replace_neighbour(
        &self,
        ns: Ns<'_>,
        link: &str,
        address: IpAddr,
        mac: Mac,
    ) -> Result<(), NetlinkError> {
        with_handle(ns, |h| async move {
            let i = index_of(&h, ns, link, "adding a neighbour").await?;
            h.neighbours()
                .add(i, address)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::kernel(
                        "replacing",
                        format!(
                            "neighbour {address} lladdr {mac} on {}",
                            object("link", link, ns)
                        ),
                        io_error(e),
                    )
                })
        })
    }

    fn replace_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<(), NetlinkError> {
        with_handle(ns, |h| async move {
            let i = index_of(&h, ns, &fdb.link, "adding an fdb entry").await?;
            let mut req = h.neighbours().add_bridge(i, &fdb.mac.0).replace();
            *req.message_mut() = fdb_message(i, fdb);
            req.execute().await.map_err(|e| {
                NetlinkError::kernel(
                    "replacing",
                    format!(
                        "fdb {} dst {} on {}",
                        fdb.mac,
                        fdb.dst,
                        object("link", &fdb.link, ns)
                    ),
                    io_error(e),
                )
            })
        })
    }

    fn delete_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<bool, NetlinkError> {
        with_handle(ns, |h| async move {
            let Some(i) = lookup(&h, ns, &fdb.link).await? else {
                return Ok(false);
            };
            match h
                .neighbours()
                .del(fdb_message(i, fdb))
                .execute()
                .await
                .map_err(io_error)
            {
                Ok(()) => Ok(true),
                Err(e) if absent(&e) => Ok(false),
                Err(e) => Err(NetlinkError::kernel(
                    "deleting",
                    format!(
                        "fdb {} dst {} on {}",
                        fdb.mac,
                        fdb.dst,
                        object("link", &fdb.link, ns)
                    ),
                    e,
                )),
            }
        })
    }

    fn set_sysctl(&self, ns: Ns<'_>, key: &str, value: &str) -> Result<(), NetlinkError> {
        if key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|p| p == ".." || p.is_empty())
        {
            return Err(NetlinkError::invalid(
                "sysctl key",
                key,
                "must be a relative path under /proc/sys such as net/ipv4/ip_forward",
            ));
        }
        let path = format!("/proc/sys/{key}");
        run_in(ns, || {
            std::fs::write(&path, value).map_err(|e| {
                NetlinkError::kernel("writing", format!("{value} to {path} in {ns}"), e)
            })
        })
    }
}
