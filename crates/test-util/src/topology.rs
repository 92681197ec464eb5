//! A multi-node topology for root tests: N "nodes", each a network namespace whose `eth0` sits
//! on a bridge in a dedicated underlay namespace (so nothing touches the host's interfaces or
//! routes), each able to run processes and to host endpoint namespaces behind veths.
//! Everything is named per process and per topology, and removed on drop, also when a test
//! panics.
//!
//! ```text
//!  underlay netns: br0 ── n0 ─┐  n1 ─┐  n2 ─┐ (veths)
//!  node netns:           eth0 192.168.S.1  eth0 .2  eth0 .3
//!                           └─ e<k> ── eth0 (endpoint netns, /32, default dev eth0)
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};
use sigil_netlink::{Netlink, Ns, Prefix, Route, RtNetlink, command_in_netns};

/// Name of every node's underlay interface.
pub const NODE_UPLINK: &str = "eth0";
/// Name of the bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// One node: a network namespace with an underlay address.
#[derive(Clone, Debug)]
pub struct Node {
    /// Index in the topology (0-based).
    pub index: usize,
    /// Namespace name (under /run/netns).
    pub netns: String,
    /// Namespace path, for `nsenter --net=` or [`crate::netns::in_netns`].
    pub netns_path: PathBuf,
    /// Underlay address of [`NODE_UPLINK`] (a /24 shared by the topology's nodes).
    pub underlay_ip: Ipv4Addr,
}

impl Node {
    /// A `Command` running `program` inside this node's namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in_netns(&self.netns_path, program)
    }

    /// Starts `cmd` (from [`Node::command`]) and kills it when the guard is dropped.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {cmd:?} in node {}", self.netns))?;
        Ok(ChildGuard(Some(child)))
    }
}

/// An endpoint: a namespace behind a veth pair whose host side is in its node's namespace.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Index of the node it hangs off.
    pub node: usize,
    /// Namespace name.
    pub netns: String,
    /// Namespace path.
    pub netns_path: PathBuf,
    /// Its address (a /32 on its `eth0`).
    pub ip: Ipv4Addr,
    /// The veth end in the node's namespace.
    pub node_interface: String,
}

impl Endpoint {
    /// A `Command` running `program` inside this endpoint's namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in_netns(&self.netns_path, program)
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// The process.
    pub fn child(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// N nodes on a bridged underlay; see the module documentation.
pub struct Topology {
    nl: RtNetlink,
    /// Prefix of every namespace name of this topology (`sgt<pid>x<k>`).
    pub tag: String,
    /// The underlay namespace holding the bridge.
    pub underlay_netns: String,
    /// The underlay subnet.
    pub underlay: Prefix,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Endpoints created so far.
    pub endpoints: Vec<Endpoint>,
    /// Every namespace made, removed in reverse order on drop.
    created: Vec<String>,
    /// Whether the bridge has its `.254` address.
    underlay_addressed: bool,
    /// MTU of the underlay links (`None`: the kernel's default, 1500).
    underlay_mtu: Option<u32>,
}

impl Topology {
    /// Builds `n` nodes (1..=250) on a bridge and waits for nothing: links are up when this
    /// returns. Needs root.
    pub fn new(n: usize) -> anyhow::Result<Self> {
        Self::build_with(n, None)
    }

    /// [`Topology::new`] with every underlay link (each node's uplink and its bridge port) at
    /// `mtu`, e.g. jumbo frames.
    pub fn with_underlay_mtu(n: usize, mtu: u32) -> anyhow::Result<Self> {
        if !(1280..=65535).contains(&mtu) {
            bail!("underlay mtu: {mtu} is not 1280-65535");
        }
        Self::build_with(n, Some(mtu))
    }

    fn build_with(n: usize, underlay_mtu: Option<u32>) -> anyhow::Result<Self> {
        if n == 0 || n > 250 {
            bail!("a topology has 1 to 250 nodes, not {n}");
        }
        let k = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        sweep_dead_runs(&RtNetlink::new());
        let tag = format!("sgt{}x{k}", std::process::id());
        // The underlay is private to this topology; a distinct subnet per topology only keeps
        // captures and logs from different tests apart.
        let subnet = (std::process::id().wrapping_add(k) % 250) as u8 + 1;
        let mut t = Topology {
            nl: RtNetlink::new(),
            underlay_netns: format!("{tag}-u"),
            underlay: Prefix::new(IpAddr::V4(Ipv4Addr::new(192, 168, subnet, 0)), 24)?,
            tag,
            nodes: Vec::new(),
            endpoints: Vec::new(),
            created: Vec::new(),
            underlay_addressed: false,
            underlay_mtu,
        };
        t.build(n, subnet)?;
        Ok(t)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.nl.add_netns(name)?;
        self.created.push(name.to_owned());
        let ns = Ns::Named(name);
        self.nl.set_link_up(ns, "lo", true)?;
        Ok(path)
    }

    fn build(&mut self, n: usize, subnet: u8) -> anyhow::Result<()> {
        let underlay = self.underlay_netns.clone();
        self.add_netns(&underlay)?;
        let u = Ns::Named(&underlay);
        self.nl.add_bridge(u, UNDERLAY_BRIDGE)?;
        self.nl.set_link_up(u, UNDERLAY_BRIDGE, true)?;
        for i in 0..n {
            let netns = format!("{}-n{i}", self.tag);
            let netns_path = self.add_netns(&netns)?;
            let port = format!("n{i}");
            self.nl.add_veth(u, &port, NODE_UPLINK, Some(&netns))?;
            self.nl.set_master(u, &port, Some(UNDERLAY_BRIDGE))?;
            let ns = Ns::Named(&netns);
            if let Some(mtu) = self.underlay_mtu {
                self.nl.set_mtu(u, &port, mtu)?;
                self.nl.set_mtu(ns, NODE_UPLINK, mtu)?;
            }
            self.nl.set_link_up(u, &port, true)?;
            let underlay_ip = Ipv4Addr::new(192, 168, subnet, (i + 1) as u8);
            self.nl
                .add_address(ns, NODE_UPLINK, IpAddr::V4(underlay_ip), 24, false)?;
            self.nl.set_link_up(ns, NODE_UPLINK, true)?;
            self.nl.set_sysctl(ns, "net/ipv4/ip_forward", "1")?;
            self.nodes.push(Node {
                index: i,
                netns,
                netns_path,
                underlay_ip,
            });
        }
        Ok(())
    }

    /// The node with index `i`.
    pub fn node(&self, i: usize) -> anyhow::Result<&Node> {
        self.nodes
            .get(i)
            .with_context(|| format!("no node {i} in a topology of {}", self.nodes.len()))
    }

    /// Creates an endpoint namespace behind node `node`, with `ip` as a /32 and a default
    /// route through the veth; the node routes `ip` to the veth and answers ARP for the rest
    /// (proxy ARP), the plumbing sigil-netd gives its endpoints.
    pub fn add_endpoint(&mut self, node: usize, ip: Ipv4Addr) -> anyhow::Result<Endpoint> {
        let node_ns = self.node(node)?.netns.clone();
        let e = self.endpoints.len();
        let netns = format!("{}-n{node}-e{e}", self.tag);
        let netns_path = self.add_netns(&netns)?;
        let veth = format!("e{e}");
        let nl = self.nl;
        let n = Ns::Named(&node_ns);
        let ep = Ns::Named(&netns);
        nl.add_veth(n, &veth, "eth0", Some(&netns))?;
        nl.set_sysctl(n, &format!("net/ipv4/conf/{veth}/proxy_arp"), "1")?;
        nl.set_sysctl(n, &format!("net/ipv4/neigh/{veth}/proxy_delay"), "0")?;
        nl.set_link_up(n, &veth, true)?;
        nl.set_link_up(ep, "eth0", true)?;
        nl.add_address(ep, "eth0", IpAddr::V4(ip), 32, false)?;
        nl.replace_route(ep, &Route::dev(Prefix::default_v4(), "eth0"))?;
        nl.replace_route(n, &Route::dev(Prefix::host(IpAddr::V4(ip)), &veth))?;
        let endpoint = Endpoint {
            node,
            netns,
            netns_path,
            ip,
            node_interface: veth,
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Gives the underlay bridge the address `.254` of the underlay subnet (idempotent) and
    /// returns it: a service run in the underlay namespace on it (etcd, say) is reachable
    /// from every node.
    pub fn underlay_address(&mut self) -> anyhow::Result<Ipv4Addr> {
        let IpAddr::V4(net) = self.underlay.addr() else {
            bail!("the underlay is IPv4");
        };
        let o = net.octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], 254);
        if !self.underlay_addressed {
            let u = Ns::Named(&self.underlay_netns);
            self.nl
                .add_address(u, UNDERLAY_BRIDGE, IpAddr::V4(ip), 24, false)?;
            self.underlay_addressed = true;
        }
        Ok(ip)
    }

    /// Path of the underlay namespace.
    pub fn underlay_path(&self) -> PathBuf {
        crate::netns::named_netns_path(&self.underlay_netns)
    }

    /// Namespace path of node `i` (shorthand).
    pub fn node_path(&self, i: usize) -> anyhow::Result<&Path> {
        Ok(&self.node(i)?.netns_path)
    }
}

/// Removes namespaces left by test processes that were killed before their drop ran (their
/// pid, in the name, is gone). A live process with a reused pid keeps its namespaces.
fn sweep_dead_runs(nl: &RtNetlink) {
    let Ok(names) = nl.list_netns() else {
        return;
    };
    for name in names {
        let Some(pid) = name
            .strip_prefix("sgt")
            .and_then(|rest| rest.split_once(['x', 'n']))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nl.delete_netns(&name);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Removing a namespace removes its interfaces, and with each veth its peer.
        while let Some(ns) = self.created.pop() {
            if let Err(e) = self.nl.delete_netns(&ns) {
                eprintln!("topology clean-up: {e}");
            }
        }
    }
}
