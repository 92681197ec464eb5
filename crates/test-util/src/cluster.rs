//! A sigil cluster on one machine for root tests: a [`Topology`] of N nodes, one etcd in the
//! underlay namespace (reachable from every node on the bridge's address), and one
//! sigil-netd per node in cluster mode with its own socket, state and pin directories and
//! pod CIDR `10.<a>.<i>.0/24`. [`TestCluster::start_with_agents`] adds a sigil server and one
//! agent per node (each attested by its own join token), each node's netd in spiffe identity
//! mode as its agent's delegate. Dropped in order: netds (and their endpoints), agents and
//! server, etcd, the namespaces.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{AgentProcess, EtcdServer, NetdProcess, ServerProcess, Topology};

/// The trust domain of the test server.
pub const TRUST_DOMAIN: &str = "identity.example.com";
/// The SPIFFE ID every node's netd is registered under (as its agent's delegate).
pub const NETD_SPIFFE_ID: &str = "spiffe://identity.example.com/netd";

/// The identity side of a [`TestCluster`]: a server and an agent per node (agents first).
pub struct ClusterIdentity {
    /// One agent per node, in node order.
    pub agents: Vec<AgentProcess>,
    /// The server.
    pub server: ServerProcess,
}

impl ClusterIdentity {
    /// The SPIFFE ID of node `i`'s agent.
    pub fn agent_id(&self, i: usize) -> anyhow::Result<String> {
        let agent = self.agents.get(i).context("no such agent")?;
        Ok(format!(
            "spiffe://{TRUST_DOMAIN}/sigil/agent/join_token/{}",
            agent.token().context("agent without a join token")?
        ))
    }

    /// Registers `spiffe_id` for workloads with `selectors` under node `i`'s agent (so only
    /// that node is given its SVIDs).
    pub fn entry(&self, i: usize, spiffe_id: &str, selectors: &[&str]) -> anyhow::Result<()> {
        self.entry_with(i, spiffe_id, selectors, &[])
    }

    /// [`ClusterIdentity::entry`] with more `sigil entry create` flags (`--x509-svid-ttl 20`).
    pub fn entry_with(
        &self,
        i: usize,
        spiffe_id: &str,
        selectors: &[&str],
        more: &[&str],
    ) -> anyhow::Result<()> {
        let parent = self.agent_id(i)?;
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &parent,
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        args.extend(more);
        let out = self.server.cli(&args)?;
        if !out.status.success() {
            bail!(
                "entry create {spiffe_id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// The lease TTL flag; the fixture passes 4 s unless a node's own flags give one.
const LEASE_TTL_FLAG: &str = "--kvstore-lease-ttl";

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
    /// Server and agents, with [`TestCluster::start_with_agents`].
    pub identity: Option<ClusterIdentity>,
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
        Self::start_on(Topology::new(n)?, a, tunnel, extra, per_node)
    }

    /// As [`TestCluster::start`], on an underlay whose links have MTU `mtu`
    /// ([`Topology::with_underlay_mtu`]).
    pub fn start_with_underlay_mtu(
        n: usize,
        a: u8,
        extra: &[&str],
        mtu: u32,
    ) -> anyhow::Result<TestCluster> {
        Self::start_on(
            Topology::with_underlay_mtu(n, mtu)?,
            a,
            "vxlan",
            extra,
            &|_| Vec::new(),
        )
    }

    fn start_on(
        mut topo: Topology,
        a: u8,
        tunnel: &str,
        extra: &[&str],
        per_node: &dyn Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<TestCluster> {
        let n = topo.nodes.len();
        let ip = topo.underlay_address()?;
        let etcd = EtcdServer::start_at(Some(&topo.underlay_path()), ip)?;
        let mut c = TestCluster {
            nodes: Vec::new(),
            identity: None,
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

    /// As [`TestCluster::start`], plus a server and an agent per node; node `i`'s netd runs in
    /// spiffe identity mode with its agent (`--identity-fallback-wait 60s`, so endpoints wait
    /// for their SVIDs). netd refuses to start unless its agent serves it as a delegate, so
    /// `delegate_ready(admin_socket)` must return once the agent does (the test's own check
    /// of the Delegated Identity API; this crate has no gRPC client).
    pub fn start_with_agents(
        n: usize,
        a: u8,
        extra: &[&str],
        delegate_ready: impl Fn(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<TestCluster> {
        Self::start_with_agents_per_node(n, a, extra, &|_| Vec::new(), delegate_ready)
    }

    /// As [`TestCluster::start_with_agents`], node `i`'s netd also getting `per_node(i)`
    /// (e.g. its own `--kvstore-lease-ttl`, which replaces the fixture's 4 s).
    pub fn start_with_agents_per_node(
        n: usize,
        a: u8,
        extra: &[&str],
        per_node: &dyn Fn(usize) -> Vec<String>,
        delegate_ready: impl Fn(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<TestCluster> {
        let mut topo = Topology::new(n)?;
        let ip = topo.underlay_address()?;
        let etcd = EtcdServer::start_at(Some(&topo.underlay_path()), ip)?;
        let server = ServerProcess::start(&[])?;
        let mut agents = Vec::new();
        for _ in 0..n {
            agents.push(AgentProcess::start(
                &server,
                &["--authorized-delegate", NETD_SPIFFE_ID],
            )?);
        }
        let identity = ClusterIdentity { agents, server };
        for i in 0..n {
            identity.entry(i, NETD_SPIFFE_ID, &["unix:uid:0"])?;
        }
        for agent in &identity.agents {
            delegate_ready(&agent.admin_socket)?;
        }
        let mut c = TestCluster {
            nodes: Vec::new(),
            identity: Some(identity),
            etcd,
            topo,
            name: format!("t{}", std::process::id()),
            a,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tunnel: "vxlan".to_owned(),
        };
        for i in 0..n {
            let mut more = c.agent_args(i)?;
            more.extend(per_node(i));
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

    /// The flags that make a netd on topology node `i` its agent's delegate in spiffe identity
    /// mode (`--identity-fallback-wait 60s`), for [`TestCluster::spawn_netd`].
    pub fn agent_args(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let socket = self
            .identity
            .as_ref()
            .and_then(|id| id.agents.get(i))
            .map(|a| a.admin_socket.display().to_string())
            .context("no agent on this node")?;
        Ok(vec![
            "--agent-socket".to_owned(),
            socket,
            "--identity-fallback-wait".to_owned(),
            "60s".to_owned(),
        ])
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
            LEASE_TTL_FLAG,
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
        if more.contains(&LEASE_TTL_FLAG) {
            // The node's own TTL replaces the fixture's (netd takes each flag once).
            if let Some(at) = args.iter().position(|a| a == LEASE_TTL_FLAG) {
                args.drain(at..at + 2);
            }
        }
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
