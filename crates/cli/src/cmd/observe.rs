//! `sigil observe`: `hubble observe` against sigil-netd's Observer API — the same flags, filters
//! and output formats — on one node, or with `--cluster` on every node of the cluster, their
//! flows merged in time order (what Hubble Relay does, done in the client).

pub mod filter;
pub mod merge;
pub mod print;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use clap::ArgMatches;
use sigil_proto::netd::v1 as npb;
use sigil_proto::netd::v1::cluster_client::ClusterClient;
use sigil_proto::observer as opb;
use sigil_proto::observer::observer_client::ObserverClient;
use tonic::transport::{Channel, Endpoint};

use crate::client;
use crate::cmd::netd::NetdSocket;
use filter::{FILTER_FLAGS, FilterBuilder};
use print::{Format, Printer};

/// Hubble's default number of flows when neither `--last`, `--first`, `--all`, `--follow`,
/// `--since` nor `--until` says otherwise.
const DEFAULT_NUMBER: u64 = 20;
/// Hubble's agent port, where `--cluster` looks for each node's Observer.
pub const DEFAULT_HUBBLE_PORT: u16 = 4244;

/// Flags of `sigil observe` (the filter flags are read in command-line order from the matches).
#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// Observer to ask: `unix:///path/hubble.sock`, a socket path, or `host:port` (TCP).
    /// Default: sigil-netd's Hubble socket beside `--api-socket`.
    #[arg(long, value_name = "ADDRESS")]
    server: Option<String>,
    /// Every node of the cluster (from this node's sigil-netd), flows merged in time order.
    #[arg(long, conflicts_with = "server")]
    cluster: bool,
    /// With `--cluster`: the port of each node's Observer.
    #[arg(long, default_value_t = DEFAULT_HUBBLE_PORT, value_name = "PORT")]
    cluster_port: u16,
    /// With `--cluster`: how long a flow may wait for older flows of slower nodes while following.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    lookahead: Duration,
    #[command(flatten)]
    socket: NetdSocket,
    /// The last N flows.
    #[arg(long, value_name = "N", conflicts_with_all = ["first", "all"])]
    last: Option<u64>,
    /// The first N flows.
    #[arg(long, value_name = "N", conflicts_with_all = ["all", "follow"])]
    first: Option<u64>,
    /// Every flow held.
    #[arg(long)]
    all: bool,
    /// Keep printing new flows until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Flows since this time: RFC 3339 (`2026-12-05T10:00:00Z`) or a duration ago (`5m`).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Flows until this time: RFC 3339 or a duration ago.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    output: Format,
    /// Show the node of each flow in the text formats.
    #[arg(long)]
    print_node_name: bool,
    /// Negates the next filter flag (`--not --from-ip 10.0.0.1`).
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    not: Vec<bool>,
    /// Flows from or to this IP address or CIDR.
    #[arg(long, value_name = "IP", action = clap::ArgAction::Append)]
    ip: Vec<String>,
    /// Flows from this IP address or CIDR.
    #[arg(long, value_name = "IP", action = clap::ArgAction::Append)]
    from_ip: Vec<String>,
    /// Flows to this IP address or CIDR.
    #[arg(long, value_name = "IP", action = clap::ArgAction::Append)]
    to_ip: Vec<String>,
    /// Flows from or to this endpoint (`[namespace/]name-prefix`).
    #[arg(long, value_name = "POD", action = clap::ArgAction::Append)]
    pod: Vec<String>,
    /// Flows from this endpoint.
    #[arg(long, value_name = "POD", action = clap::ArgAction::Append)]
    from_pod: Vec<String>,
    /// Flows to this endpoint.
    #[arg(long, value_name = "POD", action = clap::ArgAction::Append)]
    to_pod: Vec<String>,
    /// Flows from or to endpoints of this namespace.
    #[arg(long, value_name = "NS", action = clap::ArgAction::Append)]
    namespace: Vec<String>,
    /// Flows from endpoints of this namespace.
    #[arg(long, value_name = "NS", action = clap::ArgAction::Append)]
    from_namespace: Vec<String>,
    /// Flows to endpoints of this namespace.
    #[arg(long, value_name = "NS", action = clap::ArgAction::Append)]
    to_namespace: Vec<String>,
    /// Flows from or to endpoints matching this label selector (`key=value`, `!key`, ...).
    #[arg(long, value_name = "SELECTOR", action = clap::ArgAction::Append)]
    label: Vec<String>,
    /// Flows from endpoints matching this label selector.
    #[arg(long, value_name = "SELECTOR", action = clap::ArgAction::Append)]
    from_label: Vec<String>,
    /// Flows to endpoints matching this label selector.
    #[arg(long, value_name = "SELECTOR", action = clap::ArgAction::Append)]
    to_label: Vec<String>,
    /// Flows from or to this numeric identity (or reserved name: host, world, ...).
    #[arg(long, value_name = "ID", action = clap::ArgAction::Append)]
    identity: Vec<String>,
    /// Flows from this identity.
    #[arg(long, value_name = "ID", action = clap::ArgAction::Append)]
    from_identity: Vec<String>,
    /// Flows to this identity.
    #[arg(long, value_name = "ID", action = clap::ArgAction::Append)]
    to_identity: Vec<String>,
    /// Flows from or to this port.
    #[arg(long, value_name = "PORT", action = clap::ArgAction::Append)]
    port: Vec<String>,
    /// Flows from this port.
    #[arg(long, value_name = "PORT", action = clap::ArgAction::Append)]
    from_port: Vec<String>,
    /// Flows to this port.
    #[arg(long, value_name = "PORT", action = clap::ArgAction::Append)]
    to_port: Vec<String>,
    /// Flows with this verdict (FORWARDED, DROPPED, ...).
    #[arg(long, value_name = "VERDICT", action = clap::ArgAction::Append)]
    verdict: Vec<String>,
    /// Flows of this L4 protocol (tcp, udp, icmp, icmpv4, icmpv6, sctp).
    #[arg(long, value_name = "PROTO", action = clap::ArgAction::Append)]
    protocol: Vec<String>,
    /// Flows of this event type (`drop`, `trace`, `policy-verdict`, `trace:to-endpoint`, ...).
    #[arg(short = 't', long = "type", value_name = "TYPE", action = clap::ArgAction::Append)]
    r#type: Vec<String>,
    /// Flows in this direction (ingress, egress).
    #[arg(long, value_name = "DIR", action = clap::ArgAction::Append)]
    traffic_direction: Vec<String>,
    /// Flows seen on nodes matching this name pattern.
    #[arg(long, value_name = "NAME", action = clap::ArgAction::Append)]
    node_name: Vec<String>,
    /// The flow with this UUID.
    #[arg(long, value_name = "UUID", action = clap::ArgAction::Append)]
    uuid: Vec<String>,
    /// Flows of this IP version (4, 6).
    #[arg(long, value_name = "V", action = clap::ArgAction::Append)]
    ip_version: Vec<String>,
    /// Flows with all these TCP flags set (`SYN,ACK`).
    #[arg(long, value_name = "FLAGS", action = clap::ArgAction::Append)]
    tcp_flags: Vec<String>,
    /// Only replies (true) or only requests (false).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Append)]
    reply: Vec<String>,
}

/// The filter flags and `--not` in command-line order, from the subcommand's matches.
pub fn filters_from_matches(m: &ArgMatches) -> anyhow::Result<FilterBuilder> {
    let mut events: Vec<(usize, &str, Option<String>)> = Vec::new();
    for flag in FILTER_FLAGS {
        let id = flag.replace('-', "_");
        let (Some(idx), Some(vals)) = (m.indices_of(&id), m.get_many::<String>(&id)) else {
            continue;
        };
        for (i, v) in idx.zip(vals) {
            events.push((i, flag, Some(v.clone())));
        }
    }
    // Each `--not` is one value, with its own index.
    if let Some(idx) = m.indices_of("not") {
        events.extend(idx.map(|i| (i, "not", None)));
    }
    events.sort_by_key(|(i, _, _)| *i);
    let mut b = FilterBuilder::default();
    for (_, flag, value) in events {
        match value {
            None => b.not(),
            Some(v) => b.add(flag, &v)?,
        }
    }
    Ok(b)
}

/// `--since`/`--until`: RFC 3339, or a duration before now.
pub fn parse_time(flag: &str, v: &str, now: SystemTime) -> anyhow::Result<prost_types::Timestamp> {
    let t = if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        t
    } else if let Ok(d) = humantime::parse_duration(v) {
        now.checked_sub(d)
            .ok_or_else(|| anyhow!("--{flag}: invalid value {v:?}: before 1970"))?
    } else {
        bail!(
            "--{flag}: invalid value {v:?}: neither an RFC 3339 time (2026-12-05T10:00:00Z) \
             nor a duration ago (5m)"
        );
    };
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("--{flag}: invalid value {v:?}: before 1970"))?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs())
            .map_err(|_| anyhow!("--{flag}: invalid value {v:?}: too far in the future"))?,
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    })
}

impl ObserveArgs {
    /// The request these flags ask for, with the filters from `m` (the subcommand's matches).
    pub fn request(&self, m: &ArgMatches) -> anyhow::Result<opb::GetFlowsRequest> {
        let (whitelist, blacklist) = filters_from_matches(m)?.build()?;
        let now = SystemTime::now();
        let since = self
            .since
            .as_deref()
            .map(|v| parse_time("since", v, now))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|v| parse_time("until", v, now))
            .transpose()?;
        if let (Some(s), Some(u)) = (&since, &until)
            && (s.seconds, s.nanos) > (u.seconds, u.nanos)
        {
            bail!(
                "--until: invalid value {:?}: before --since {:?}",
                self.until.as_deref().unwrap_or_default(),
                self.since.as_deref().unwrap_or_default()
            );
        }
        let (number, first) = if let Some(n) = self.first {
            (n, true)
        } else if let Some(n) = self.last {
            (n, false)
        } else if self.all || self.follow || since.is_some() || until.is_some() {
            (0, false)
        } else {
            (DEFAULT_NUMBER, false)
        };
        if self.first == Some(0) || self.last == Some(0) {
            bail!(
                "--{}: invalid value 0: must be at least 1",
                if self.first.is_some() {
                    "first"
                } else {
                    "last"
                }
            );
        }
        Ok(opb::GetFlowsRequest {
            number,
            first,
            follow: self.follow,
            blacklist,
            whitelist,
            since,
            until,
        })
    }

    fn default_socket(&self) -> PathBuf {
        self.socket
            .path
            .with_file_name(sigil_netd::hubble::DEFAULT_SOCKET_NAME)
    }
}

/// An Observer address: a Unix socket or TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// Parses `--server`.
pub fn parse_server(v: &str) -> anyhow::Result<Server> {
    if let Some(p) = v.strip_prefix("unix://") {
        if !p.starts_with('/') {
            bail!("--server: invalid value {v:?}: a unix:// address needs an absolute path");
        }
        return Ok(Server::Unix(PathBuf::from(p)));
    }
    if v.starts_with('/') {
        return Ok(Server::Unix(PathBuf::from(v)));
    }
    let hp = v
        .strip_prefix("tcp://")
        .or_else(|| v.strip_prefix("http://"))
        .unwrap_or(v);
    let valid = hp
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if !valid {
        bail!(
            "--server: invalid value {v:?}: expected unix:///path/to/hubble.sock, a socket path, \
             or host:port"
        );
    }
    Ok(Server::Tcp(hp.to_owned()))
}

/// Connects to an Observer.
pub async fn connect(server: &Server) -> anyhow::Result<Channel> {
    match server {
        Server::Unix(path) => client::dial(path).await.map_err(|e| {
            e.describe(
                "Hubble",
                path,
                "is sigil-netd running? its Observer socket is hubble.sock beside its API socket",
            )
        }),
        Server::Tcp(hp) => {
            let ep = Endpoint::from_shared(format!("http://{hp}"))
                .with_context(|| format!("--server: invalid value {hp:?}"))?
                .connect_timeout(Duration::from_secs(5));
            ep.connect()
                .await
                .map_err(|e| anyhow!("cannot connect to the Observer at {hp}: {}", root(&e)))
        }
    }
}

fn root(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(n) = cur.source() {
        cur = n;
    }
    cur.to_string()
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Runs `sigil observe` (`m`: the subcommand's matches, for the filter flags' order).
pub async fn run(args: ObserveArgs, m: &ArgMatches) -> anyhow::Result<()> {
    let req = args.request(m)?;
    let stdout = std::io::stdout().lock();
    let mut printer = Printer::new(
        args.output,
        args.print_node_name || args.cluster,
        args.follow,
        stdout,
    );
    if args.cluster {
        let nodes = cluster_nodes(&args).await?;
        merge::observe_merged(nodes, req, args.lookahead, &mut printer, interrupted()).await?;
    } else {
        let server = match &args.server {
            Some(s) => parse_server(s)?,
            None => Server::Unix(args.default_socket()),
        };
        let mut c = ObserverClient::new(connect(&server).await?);
        let mut stream = client::reply(c.get_flows(req).await)?;
        let stop = interrupted();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => printer.write(&resp)?,
                    Ok(None) => break,
                    Err(s) => {
                        printer.finish()?;
                        return Err(client::RpcError(s).into());
                    }
                },
                _ = &mut stop => break,
            }
        }
    }
    printer.finish()
}

/// The nodes `--cluster` asks: every node this node's sigil-netd knows, at its Hubble port.
async fn cluster_nodes(args: &ObserveArgs) -> anyhow::Result<Vec<merge::Node>> {
    let mut c = ClusterClient::new(args.socket.connect().await?);
    let r = client::reply(c.list_nodes(npb::ListNodesRequest {}).await)
        .context("listing the cluster's nodes (is sigil-netd in cluster mode?)")?;
    if r.nodes.is_empty() {
        bail!("sigil-netd knows no nodes (is it in cluster mode?)");
    }
    Ok(r.nodes
        .iter()
        .map(|n| {
            let ip: Result<std::net::IpAddr, _> = n.ip.parse();
            let addr = match ip {
                Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{}", args.cluster_port),
                _ => format!("{}:{}", n.ip, args.cluster_port),
            };
            merge::Node {
                name: n.name.clone(),
                server: Server::Tcp(addr),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ObserveArgs,
    }

    fn req(args: &[&str]) -> anyhow::Result<opb::GetFlowsRequest> {
        let m = T::command()
            .try_get_matches_from(std::iter::once("observe").chain(args.iter().copied()))?;
        let t = T::from_arg_matches(&m)?;
        t.a.request(&m)
    }

    #[test]
    fn flag_order_decides_what_not_negates() {
        let r = req(&[
            "--from-pod",
            "default/fe",
            "--not",
            "--to-port",
            "9090",
            "--verdict",
            "DROPPED",
        ])
        .unwrap();
        assert_eq!(r.whitelist.len(), 1);
        assert_eq!(r.whitelist[0].source_pod, vec!["default/fe"]);
        assert_eq!(r.whitelist[0].verdict, vec![2]);
        assert_eq!(r.blacklist.len(), 1);
        assert_eq!(r.blacklist[0].destination_port, vec!["9090"]);
        let r = req(&[
            "--not",
            "--from-ip",
            "10.0.0.1",
            "--to-port",
            "80",
            "--not",
            "--verdict",
            "DROPPED",
        ])
        .unwrap();
        assert_eq!(r.blacklist.len(), 1, "{r:?}");
        assert_eq!(r.blacklist[0].source_ip, vec!["10.0.0.1"]);
        assert_eq!(r.blacklist[0].verdict, vec![2]);
        assert_eq!(r.whitelist[0].destination_port, vec!["80"]);
        assert!(r.whitelist[0].verdict.is_empty());
        let r = req(&["--not", "--verdict", "DROPPED", "--to-port", "9090"]).unwrap();
        assert_eq!(r.blacklist[0].verdict, vec![2]);
        assert_eq!(r.whitelist[0].destination_port, vec!["9090"]);
    }

    #[test]
    fn number_follows_hubbles_defaults() {
        assert_eq!(req(&[]).unwrap().number, 20);
        assert_eq!(req(&["--last", "5"]).unwrap().number, 5);
        let r = req(&["--first", "3"]).unwrap();
        assert!(r.first && r.number == 3);
        let r = req(&["-f"]).unwrap();
        assert!(r.follow && r.number == 0);
        assert_eq!(req(&["--since", "5m"]).unwrap().number, 0);
        assert!(req(&["--first", "3", "--follow"]).is_err());
    }

    #[test]
    fn times_parse_and_bad_ones_name_the_flag() {
        let r = req(&[
            "--since",
            "2026-12-05T10:00:00Z",
            "--until",
            "2026-12-05T11:00:00Z",
        ])
        .unwrap();
        assert_eq!(r.since.unwrap().seconds, 1_796_464_800);
        let e = req(&["--since", "yesterday-ish"]).unwrap_err().to_string();
        assert!(
            e.starts_with("--since: invalid value \"yesterday-ish\""),
            "{e}"
        );
        let e = req(&["--since", "1m", "--until", "1h"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--until: invalid value \"1h\": before --since"),
            "{e}"
        );
        let e = req(&["--last", "0"]).unwrap_err().to_string();
        assert!(e.starts_with("--last: invalid value 0"), "{e}");
        let e = req(&["--to-port", "99999"]).unwrap_err().to_string();
        assert!(e.starts_with("--to-port: invalid value \"99999\""), "{e}");
    }

    #[test]
    fn servers_parse() {
        assert_eq!(
            parse_server("unix:///run/sigil/hubble.sock").unwrap(),
            Server::Unix("/run/sigil/hubble.sock".into())
        );
        assert_eq!(
            parse_server("10.0.0.1:4244").unwrap(),
            Server::Tcp("10.0.0.1:4244".into())
        );
        assert_eq!(
            parse_server("[::1]:4244").unwrap(),
            Server::Tcp("[::1]:4244".into())
        );
        for bad in [
            "unix://relative",
            "localhost",
            "host:0",
            "host:http",
            ":4244",
        ] {
            let e = parse_server(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--server: invalid value {bad:?}")),
                "{e}"
            );
        }
    }
}
