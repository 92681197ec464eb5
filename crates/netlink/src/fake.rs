//! A recording [`Netlink`] for tests without root: it keeps a model of namespaces, links and
//! routes (so lookups answer like the kernel would; a new namespace has `lo`), records every operation in order, and can be told
//! to fail chosen operations, to test the caller's clean-up paths.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::{Fdb, Mac, Netlink, NetlinkError, Ns, Route, Vxlan, namespace::netns_path};

/// One recorded operation; `ns` is `None` for the current namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    AddNetns {
        name: String,
    },
    DeleteNetns {
        name: String,
    },
    AddVeth {
        ns: Option<String>,
        name: String,
        peer: String,
        peer_ns: Option<String>,
    },
    AddBridge {
        ns: Option<String>,
        name: String,
    },
    AddVxlan {
        ns: Option<String>,
        vxlan: Vxlan,
    },
    SetMaster {
        ns: Option<String>,
        link: String,
        master: Option<String>,
    },
    MoveLink {
        ns: Option<String>,
        link: String,
        target: String,
    },
    SetLinkUp {
        ns: Option<String>,
        link: String,
        up: bool,
    },
    SetMtu {
        ns: Option<String>,
        link: String,
        mtu: u32,
    },
    DeleteLink {
        ns: Option<String>,
        link: String,
    },
    AddAddress {
        ns: Option<String>,
        link: String,
        address: IpAddr,
        prefix_len: u8,
        nodad: bool,
    },
    ReplaceRoute {
        ns: Option<String>,
        route: Route,
    },
    DeleteRoute {
        ns: Option<String>,
        route: Route,
    },
    ReplaceNeighbour {
        ns: Option<String>,
        link: String,
        address: IpAddr,
        mac: Mac,
    },
    ReplaceFdb {
        ns: Option<String>,
        fdb: Fdb,
    },
    DeleteFdb {
        ns: Option<String>,
        fdb: Fdb,
    },
    SetSysctl {
        ns: Option<String>,
        key: String,
        value: String,
    },
}

/// The MTU the fake reports for a link nobody set one on (Ethernet's).
pub const FAKE_DEFAULT_MTU: u32 = 1500;

type FailWhen = Box<dyn Fn(&Op) -> bool + Send>;

#[derive(Default)]
struct State {
    ops: Vec<Op>,
    netns: BTreeSet<String>,
    /// (namespace, link) → ifindex.
    links: BTreeMap<(Option<String>, String), u32>,
    /// (namespace, link) → MTU set through [`Netlink::set_mtu`] (others: [`FAKE_DEFAULT_MTU`]).
    mtus: BTreeMap<(Option<String>, String), u32>,
    /// veth peers, both directions.
    peers: BTreeMap<(Option<String>, String), (Option<String>, String)>,
    routes: BTreeSet<(Option<String>, String)>,
    fdb: BTreeSet<(Option<String>, String)>,
    next_index: u32,
    fail_when: Option<FailWhen>,
}

/// The recording fake.
#[derive(Default)]
pub struct FakeNetlink {
    state: Mutex<State>,
}

fn owned(ns: Ns<'_>) -> Option<String> {
    ns.name().map(str::to_owned)
}

fn injected(op: &Op) -> NetlinkError {
    NetlinkError::kernel(
        "faking",
        format!("{op:?}"),
        std::io::Error::other("injected failure"),
    )
}

impl FakeNetlink {
    /// An empty fake: no namespaces, no links.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock left a usable state behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later operation for which `when` is true fail (and not take effect).
    pub fn fail_when(&self, when: impl Fn(&Op) -> bool + Send + 'static) {
        self.lock().fail_when = Some(Box::new(when));
    }

    /// The operations so far, in order (failed ones included).
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// Adds a link as if it existed already (e.g. the node's uplink).
    pub fn seed_link(&self, ns: Ns<'_>, name: &str) -> u32 {
        let mut s = self.lock();
        s.next_index += 1;
        let i = s.next_index + 1;
        s.links.insert((owned(ns), name.to_owned()), i);
        i
    }

    /// Links that exist now, as (namespace, name).
    pub fn links(&self) -> Vec<(Option<String>, String)> {
        self.lock().links.keys().cloned().collect()
    }

    /// Routes that exist now, as (namespace, rendered route).
    pub fn routes(&self) -> Vec<(Option<String>, String)> {
        self.lock().routes.iter().cloned().collect()
    }

    /// Records `op`; applies `apply` unless a failure is injected.
    fn record<T>(
        &self,
        op: Op,
        apply: impl FnOnce(&mut State) -> Result<T, NetlinkError>,
    ) -> Result<T, NetlinkError> {
        let mut s = self.lock();
        s.ops.push(op.clone());
        if s.fail_when.as_ref().is_some_and(|f| f(&op)) {
            return Err(injected(&op));
        }
        apply(&mut s)
    }
}

fn need_ns(s: &State, ns: &Option<String>) -> Result<(), NetlinkError> {
    match ns {
        Some(n) if !s.netns.contains(n) => Err(NetlinkError::kernel(
            "entering",
            format!("netns {n}"),
            std::io::Error::from_raw_os_error(2),
        )),
        _ => Ok(()),
    }
}

fn need_link(
    s: &State,
    ns: &Option<String>,
    link: &str,
    op: &'static str,
) -> Result<u32, NetlinkError> {
    need_ns(s, ns)?;
    s.links
        .get(&(ns.clone(), link.to_owned()))
        .copied()
        .ok_or_else(|| NetlinkError::NoSuchLink {
            op,
            link: link.to_owned(),
            ns: ns
                .as_deref()
                .map_or_else(|| Ns::Current.to_string(), |n| Ns::Named(n).to_string()),
        })
}

fn add_link(s: &mut State, ns: &Option<String>, name: &str) -> Result<u32, NetlinkError> {
    need_ns(s, ns)?;
    let key = (ns.clone(), name.to_owned());
    if s.links.contains_key(&key) {
        return Err(NetlinkError::kernel(
            "adding",
            format!("link {name}"),
            std::io::Error::from_raw_os_error(17),
        ));
    }
    s.next_index += 1;
    let i = s.next_index + 1;
    s.links.insert(key, i);
    Ok(i)
}

impl Netlink for FakeNetlink {
    fn add_netns(&self, name: &str) -> Result<PathBuf, NetlinkError> {
        crate::validate_netns_name(name)?;
        self.record(
            Op::AddNetns {
                name: name.to_owned(),
            },
            |s| {
                if !s.netns.insert(name.to_owned()) {
                    return Err(NetlinkError::NetnsExists {
                        name: name.to_owned(),
                    });
                }
                // Like the kernel's, a new namespace has a loopback device, ifindex 1.
                s.links.insert((Some(name.to_owned()), "lo".to_owned()), 1);
                Ok(netns_path(name))
            },
        )
    }

    fn delete_netns(&self, name: &str) -> Result<bool, NetlinkError> {
        self.record(
            Op::DeleteNetns {
                name: name.to_owned(),
            },
            |s| {
                let ns = Some(name.to_owned());
                let gone: Vec<_> = s.links.keys().filter(|(n, _)| *n == ns).cloned().collect();
                for k in gone {
                    s.links.remove(&k);
                    if let Some(p) = s.peers.remove(&k) {
                        s.peers.remove(&p);
                        s.links.remove(&p);
                    }
                }
                s.routes.retain(|(n, _)| *n != ns);
                Ok(s.netns.remove(name))
            },
        )
    }

    fn netns_exists(&self, name: &str) -> bool {
        self.lock().netns.contains(name)
    }

    fn list_netns(&self) -> Result<Vec<String>, NetlinkError> {
        Ok(self.lock().netns.iter().cloned().collect())
    }

    fn add_veth(
        &self,
        ns: Ns<'_>,
        name: &str,
        peer: &str,
        peer_ns: Option<&str>,
    ) -> Result<(), NetlinkError> {
        crate::validate_ifname(name)?;
        crate::validate_ifname(peer)?;
        let op = Op::AddVeth {
            ns: owned(ns),
            name: name.to_owned(),
            peer: peer.to_owned(),
            peer_ns: peer_ns.map(str::to_owned),
        };
        self.record(op, |s| {
            let a = owned(ns);
            let b = peer_ns.map(str::to_owned).or_else(|| a.clone());
            need_ns(s, &b)?;
            add_link(s, &a, name)?;
            if let Err(e) = add_link(s, &b, peer) {
                s.links.remove(&(a, name.to_owned()));
                return Err(e);
            }
            s.peers
                .insert((a.clone(), name.to_owned()), (b.clone(), peer.to_owned()));
            s.peers.insert((b, peer.to_owned()), (a, name.to_owned()));
            Ok(())
        })
    }

    fn add_bridge(&self, ns: Ns<'_>, name: &str) -> Result<(), NetlinkError> {
        crate::validate_ifname(name)?;
        self.record(
            Op::AddBridge {
                ns: owned(ns),
                name: name.to_owned(),
            },
            |s| add_link(s, &owned(ns), name).map(drop),
        )
    }

    fn add_vxlan(&self, ns: Ns<'_>, vxlan: &Vxlan) -> Result<(), NetlinkError> {
        crate::validate_ifname(&vxlan.name)?;
        self.record(
            Op::AddVxlan {
                ns: owned(ns),
                vxlan: vxlan.clone(),
            },
            |s| add_link(s, &owned(ns), &vxlan.name).map(drop),
        )
    }

    fn set_master(&self, ns: Ns<'_>, link: &str, master: Option<&str>) -> Result<(), NetlinkError> {
        let op = Op::SetMaster {
            ns: owned(ns),
            link: link.to_owned(),
            master: master.map(str::to_owned),
        };
        self.record(op, |s| {
            need_link(s, &owned(ns), link, "setting a master")?;
            if let Some(m) = master {
                need_link(s, &owned(ns), m, "setting a master")?;
            }
            Ok(())
        })
    }

    fn move_link(&self, ns: Ns<'_>, link: &str, target: &str) -> Result<(), NetlinkError> {
        let op = Op::MoveLink {
            ns: owned(ns),
            link: link.to_owned(),
            target: target.to_owned(),
        };
        self.record(op, |s| {
            let i = need_link(s, &owned(ns), link, "moving a link")?;
            let to = Some(target.to_owned());
            need_ns(s, &to)?;
            s.links.remove(&(owned(ns), link.to_owned()));
            s.links.insert((to.clone(), link.to_owned()), i);
            if let Some(p) = s.peers.remove(&(owned(ns), link.to_owned())) {
                s.peers.insert(p.clone(), (to.clone(), link.to_owned()));
                s.peers.insert((to, link.to_owned()), p);
            }
            Ok(())
        })
    }

    fn set_link_up(&self, ns: Ns<'_>, link: &str, up: bool) -> Result<(), NetlinkError> {
        self.record(
            Op::SetLinkUp {
                ns: owned(ns),
                link: link.to_owned(),
                up,
            },
            |s| need_link(s, &owned(ns), link, "setting up").map(drop),
        )
    }

    fn delete_link(&self, ns: Ns<'_>, link: &str) -> Result<bool, NetlinkError> {
        self.record(
            Op::DeleteLink {
                ns: owned(ns),
                link: link.to_owned(),
            },
            |s| {
                let key = (owned(ns), link.to_owned());
                let existed = s.links.remove(&key).is_some();
                s.mtus.remove(&key);
                if let Some(p) = s.peers.remove(&key) {
                    s.peers.remove(&p);
                    s.mtus.remove(&p);
                    s.links.remove(&p);
                }
                let gone = format!(" dev {link}");
                s.routes
                    .retain(|(n, r)| !(*n == key.0 && r.ends_with(&gone)));
                Ok(existed)
            },
        )
    }

    fn link_index(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError> {
        let s = self.lock();
        need_ns(&s, &owned(ns))?;
        Ok(s.links.get(&(owned(ns), link.to_owned())).copied())
    }

    fn set_mtu(&self, ns: Ns<'_>, link: &str, mtu: u32) -> Result<(), NetlinkError> {
        self.record(
            Op::SetMtu {
                ns: owned(ns),
                link: link.to_owned(),
                mtu,
            },
            |s| {
                need_link(s, &owned(ns), link, "setting the MTU of")?;
                s.mtus.insert((owned(ns), link.to_owned()), mtu);
                Ok(())
            },
        )
    }

    fn link_mtu(&self, ns: Ns<'_>, link: &str) -> Result<Option<u32>, NetlinkError> {
        let s = self.lock();
        need_ns(&s, &owned(ns))?;
        let key = (owned(ns), link.to_owned());
        Ok(s.links
            .contains_key(&key)
            .then(|| s.mtus.get(&key).copied().unwrap_or(FAKE_DEFAULT_MTU)))
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
        let op = Op::AddAddress {
            ns: owned(ns),
            link: link.to_owned(),
            address,
            prefix_len,
            nodad,
        };
        self.record(op, |s| {
            need_link(s, &owned(ns), link, "adding an address").map(drop)
        })
    }

    fn replace_route(&self, ns: Ns<'_>, route: &Route) -> Result<(), NetlinkError> {
        route.check()?;
        self.record(
            Op::ReplaceRoute {
                ns: owned(ns),
                route: route.clone(),
            },
            |s| {
                need_ns(s, &owned(ns))?;
                if let crate::RouteVia::Dev(d) | crate::RouteVia::Gateway { dev: Some(d), .. } =
                    &route.via
                {
                    need_link(s, &owned(ns), d, "adding a route")?;
                }
                // One route per destination, as in the kernel's main table.
                let (mid, end) = (format!(" {} ", route.dst), format!(" {}", route.dst));
                s.routes
                    .retain(|(n, r)| !(*n == owned(ns) && (r.contains(&mid) || r.ends_with(&end))));
                s.routes.insert((owned(ns), route.to_string()));
                Ok(())
            },
        )
    }

    fn delete_route(&self, ns: Ns<'_>, route: &Route) -> Result<bool, NetlinkError> {
        self.record(
            Op::DeleteRoute {
                ns: owned(ns),
                route: route.clone(),
            },
            |s| Ok(s.routes.remove(&(owned(ns), route.to_string()))),
        )
    }

    fn replace_neighbour(
        &self,
        ns: Ns<'_>,
        link: &str,
        address: IpAddr,
        mac: Mac,
    ) -> Result<(), NetlinkError> {
        let op = Op::ReplaceNeighbour {
            ns: owned(ns),
            link: link.to_owned(),
            address,
            mac,
        };
        self.record(op, |s| {
            need_link(s, &owned(ns), link, "adding a neighbour").map(drop)
        })
    }

    fn replace_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<(), NetlinkError> {
        self.record(
            Op::ReplaceFdb {
                ns: owned(ns),
                fdb: fdb.clone(),
            },
            |s| {
                need_link(s, &owned(ns), &fdb.link, "adding an fdb entry")?;
                s.fdb
                    .insert((owned(ns), format!("{} {} {}", fdb.link, fdb.mac, fdb.dst)));
                Ok(())
            },
        )
    }

    fn delete_fdb(&self, ns: Ns<'_>, fdb: &Fdb) -> Result<bool, NetlinkError> {
        self.record(
            Op::DeleteFdb {
                ns: owned(ns),
                fdb: fdb.clone(),
            },
            |s| {
                Ok(s.fdb
                    .remove(&(owned(ns), format!("{} {} {}", fdb.link, fdb.mac, fdb.dst))))
            },
        )
    }

    fn set_sysctl(&self, ns: Ns<'_>, key: &str, value: &str) -> Result<(), NetlinkError> {
        let op = Op::SetSysctl {
            ns: owned(ns),
            key: key.to_owned(),
            value: value.to_owned(),
        };
        self.record(op, |s| need_ns(s, &owned(ns)))
    }
}
