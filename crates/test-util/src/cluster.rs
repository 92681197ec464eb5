//! A sigil cluster on one machine for root tests: a [`Topology`] of N nodes, one etcd in the
//! underlay namespace (reachable from every node on the bridge's address), and one
//! sigil-netd per node in cluster mode with its own socket, state and pin directories and
//! pod CIDR `10.<a>.<i>.0/24`. Dropped in order: netds (and their endpoints), etcd, the
//! namespaces.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{EtcdServer, NetdProcess, Topology};

static NEXT_CLUSTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Polls `cond` every 20 ms until it holds (Ok), fails with the last state after `timeout`.
/// `cond` returns `Ok(None)` when satisfied, `Ok(Some(state))` to go on (the state is shown
/// if time runs out).
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let last = cond()?;
        let Some(state) = last else {
            return Ok(());
        };
        if start.elapsed() > timeout {
            bail!("{what}: not after {timeout:?} (last: {state})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One node of a [`TestCluster`].
pub struct ClusterNode {
    /// Its netd.
    pub netd: NetdProcess,
    /// Node name (`node<i>`).
    pub name: String,
    /// Index in the topology.
    pub index: usize,
}

/// See the module documentation.
pub struct TestCluster {
    /// The nodes' netds (dropped first).
    pub nodes: Vec<ClusterNode>,
    /// The cluster's etcd.
    pub etcd: EtcdServer,
    /// The namespaces (dropped last).
    pub topo: Topology,
    /// Cluster name.
    pub name: String,
    /// Second octet of the pod CIDRs.
    pub a: u8,
    /// Extra `netd run` flags of every node.
    pub extra: Vec<String>,
    /// `--tunnel` of every node (`vxlan` or `disabled`).
    pub tunnel: String,
}

impl TestCluster {
    /// Builds `n` nodes with etcd and starts a netd on each (`--tunnel vxlan`, lease TTL
    /// 4 s, plus `extra`), waiting until each serves.
    pub fn start(n: usize, a: u8, extra: &[&str]) -> anyhow::Result<TestCluster> {
        Self::start_with_tunnel(n, a, "vxlan", extra)
    }

    /// As [`TestCluster::start`] with `--tunnel tunnel` (`vxlan` or `disabled`).
    pub fn start_with_tunnel(
        n: usize,
        a: u8,
        tunnel: &str,
        extra: &[&str],
    ) -> anyhow::Result<TestCluster> {
        Self::start_per_node(n, a, tunnel, extra, &|_| Vec::new())
    }

    /// As [`TestCluster::start_with_tunnel`], node `i`'s netd also getting `per_node(i)`
    /// (e.g. its own agent's socket).
    pub fn start_per_node(
        n: usize,
        a: u8,
        tunnel: &str,
        extra: &[&str],
        per_node: &dyn Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<TestCluster> {
        let mut topo = Topology::new(n)?;
        let ip = topo.underlay_address()?;
        let etcd = EtcdServer::start_at(Some(&topo.underlay_path()), ip)?;
        let mut c = TestCluster {
            nodes: Vec::new(),
            etcd,
            topo,
            // Unique per cluster too: two clusters of one process must not share netd pin
            // directories (named after the cluster) or etcd prefixes.
            name: format!(
                "t{}c{}",
                std::process::id(),
                NEXT_CLUSTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            a,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tunnel: tunnel.to_owned(),
        };
        for i in 0..n {
            let more = per_node(i);
            let more: Vec<&str> = more.iter().map(String::as_str).collect();
            let netd = c.spawn_netd(i, &format!("node{i}"), i as u8, &more)?;
            c.nodes.push(ClusterNode {
                netd,
                name: format!("node{i}"),
                index: i,
            });
        }
        Ok(c)
    }

    /// The flags that put a netd on topology node `i` into this cluster.
    pub fn cluster_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let node = self.topo.node(i)?;
        let mut v: Vec<String> = [
            "--kvstore",
            "etcd",
            "--kvstore-endpoints",
            &self.etcd.endpoint(),
            "--cluster-name",
            &self.name,
            "--cluster-id",
            "1",
            "--node-ip",
            &node.underlay_ip.to_string(),
            "--tunnel",
            &self.tunnel,
            "--kvstore-lease-ttl",
            "4s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(self.extra.iter().cloned());
        Ok(v)
    }

    /// Starts (and waits for) a netd on topology node `i` named `name`, pod CIDR
    /// `10.<a>.<b>.0/24`, with `more` flags; it is not added to [`TestCluster::nodes`].
    pub fn spawn_netd(
        &self,
        i: usize,
        name: &str,
        b: u8,
        more: &[&str],
    ) -> anyhow::Result<NetdProcess> {
        let mut args = self.cluster_args(i)?;
        args.extend(more.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let node = self.topo.node(i)?;
        let mut netd = NetdProcess::prepare(
            Some(&node.netns),
            &format!("{}-{name}-{b}", self.name),
            self.a,
            b,
            &refs,
        )?;
        netd.node_name = name.to_owned();
        netd.spawn()
            .with_context(|| format!("netd {name} on node {i}"))?;
        Ok(netd)
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> anyhow::Result<&ClusterNode> {
        self.nodes
            .get(i)
            .with_context(|| format!("no node {i} in a cluster of {}", self.nodes.len()))
    }

    /// The etcd key prefix of this cluster (`sigil/<name>/`).
    pub fn prefix(&self) -> String {
        format!("sigil/{}/", self.name)
    }
}
